"""pkd_fast.teacher: a live teacher and the teacher cache give the loss the same TeacherOutputs for a batch,
whatever rows the patient loss reads; and the top-k form of the logits reaches the sparse KD."""

import copy

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

from pkd_fast.cache import Layout, Writer
from pkd_fast.data import real_token_index
from pkd_fast.dist import Dist
from pkd_fast.losses import TopkLogits, pkd_loss
from pkd_fast.models import MaskedLMRows, mlm_row_index
from pkd_fast.teacher import CachedTeacher, LiveTeacher, NoTeacher, Rows

ROWS, WIDTH, LAYERS = 12, 16, (3, 1)  # a PT map out of order: outputs come in map order
FP32 = {"train_micro_batch_size_per_gpu": 4}  # a DeepSpeed JSON without precision sections: fp32, no ZeRO


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random 3-layer classifier, a padded batch of every row, and a store of its outputs (every token
    of every layer) written by example index in another batch order, as `--stage cache` writes it."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=WIDTH, num_labels=2)
    model = BertForSequenceClassification(config).eval()
    lengths = torch.randint(3, WIDTH + 1, (ROWS,))
    mask = (torch.arange(WIDTH)[None] < lengths[:, None]).long()
    batch = {"input_ids": torch.randint(1, 64, (ROWS, WIDTH)) * mask, "attention_mask": mask,
             "token_type_ids": torch.zeros(ROWS, WIDTH, dtype=torch.long), "example_idx": torch.arange(ROWS)}
    layout = Layout(rows=ROWS, num_labels=2, teacher_layers=3, hidden_size=16, layers=(0, 1, 2, 3), positions=WIDTH, dtype="float32")
    with torch.no_grad(), Writer(tmp_path_factory.mktemp("cache") / "c", {"teacher": "tiny"}, layout, Dist(0, 1, torch.device("cpu"))) as writer:
        for rows in torch.randperm(ROWS).split(5):
            out = model(**{k: v[rows] for k, v in batch.items() if k != "example_idx"}, output_hidden_states=True)
            writer.write(rows, out.logits, out.hidden_states, mask[rows])
        store = writer.commit()
    return model, batch, store


def pt_selection(pt_tokens: str, mask: torch.Tensor) -> Rows:
    return Rows(tokens=real_token_index(mask) if pt_tokens == "all" else None, pool_mask=mask if pt_tokens == "mean" else None)


@pytest.mark.parametrize("pt_tokens", ["cls", "all", "mean"])
def test_live_and_cached_give_the_same_outputs(setup, pt_tokens):
    """The loss sees one TeacherOutputs: same logits, same PT rows (same shapes, same order), same watched."""
    model, batch, store = setup
    order = torch.tensor([7, 2, 11, 0, 5])  # a training batch: any rows, any order
    part = {k: v[order] for k, v in batch.items()}
    live = LiveTeacher(copy.deepcopy(model), FP32, torch.device("cpu"), LAYERS, logits=True)
    cached = CachedTeacher(store, LAYERS, pt_tokens, logits=True)
    assert live.lookup() is None
    rows = pt_selection(pt_tokens, part["attention_mask"])
    a, b = live(part, rows), cached({**part, **cached.lookup()(part)}, rows)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    assert len(a.hidden) == len(b.hidden) == len(LAYERS)
    for h_live, h_cached in zip(a.hidden, b.hidden):
        torch.testing.assert_close(h_cached, h_live, rtol=1e-5, atol=1e-5)
    assert a.watched().keys() == b.watched().keys() == {"teacher logits", "teacher hidden states"}


def test_a_source_returns_only_what_the_loss_reads(setup):
    """KD without PT: logits only; PT without KD (α = 0): states only; FT: nothing at all."""
    model, batch, store = setup
    rows = Rows()
    kd = LiveTeacher(copy.deepcopy(model), FP32, torch.device("cpu"), (), logits=True)(batch, rows)
    assert kd.logits is not None and kd.hidden == []
    pt = CachedTeacher(store, LAYERS, "cls", logits=False)
    out = pt({**batch, **pt.lookup()(batch)}, rows)
    assert out.logits is None and len(out.hidden) == 2 and out.watched().keys() == {"teacher hidden states"}
    none = NoTeacher()
    assert none.lookup() is None and none(batch, rows).watched() == {}


def test_a_live_masked_lm_teacher_runs_its_head_on_the_gathered_rows_only(setup):
    """Masked LM: `Rows.logits` picks the rows, whose logits equal the full head's at those positions; with
    α = 0 the head does not run at all (so a headless encoder serves) and the states still come."""
    _, batch, _ = setup
    torch.manual_seed(2)
    model = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                       intermediate_size=32, max_position_embeddings=WIDTH)).eval()
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.flatten(0, 1)
    mlm = {**batch, "mlm_labels": torch.where(torch.rand(ROWS, WIDTH) < 0.3, batch["input_ids"], -100)}
    rows = Rows(logits=mlm_row_index(mlm, "masked"), tokens=real_token_index(batch["attention_mask"]))
    kd = LiveTeacher(MaskedLMRows(copy.deepcopy(model)), FP32, torch.device("cpu"), LAYERS, logits=True)(mlm, rows)
    torch.testing.assert_close(kd.logits, full[rows.logits], rtol=1e-5, atol=1e-5)
    pt = LiveTeacher(MaskedLMRows(copy.deepcopy(model)), FP32, torch.device("cpu"), LAYERS, logits=False)
    heads = []
    pt.model.model.cls.predictions.register_forward_hook(lambda _m, inputs, _o: heads.append(inputs[0].shape[0]))
    out = pt(mlm, rows)
    assert out.logits is None and heads == [] and [h.shape for h in out.hidden] == [h.shape for h in kd.hidden]


def test_a_live_teacher_passes_only_the_inputs_its_family_takes(setup):
    """A pair task's batch carries segment ids 0/1; a RoBERTa teacher has one type embedding (its segment
    ids would index past it), and the live source hands it the rest: its logits are the model's own on those."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    _, batch, _ = setup
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                           max_position_embeddings=WIDTH + 2, type_vocab_size=1, num_labels=2)  # positions start after the pad id
    model = RobertaForSequenceClassification(config).eval()
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    pair = {**batch, "token_type_ids": (torch.arange(WIDTH) >= WIDTH // 2).long().expand(ROWS, WIDTH)}
    out = LiveTeacher(copy.deepcopy(model), FP32, torch.device("cpu"), (), logits=True)(pair, Rows())
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)


def test_topk_logits_reach_the_sparse_kd(setup):
    """The loss branches on the logits' form only: the top-k form with k = V is dense KD; a top-k whose lse
    was taken at another temperature is refused rather than read at the wrong T."""
    torch.manual_seed(1)
    student, teacher = torch.randn(6, 10, dtype=torch.float64), torch.randn(6, 10, dtype=torch.float64)
    labels = torch.randint(0, 10, (6,))
    values, ids = teacher.topk(10, dim=-1)
    topk = TopkLogits(ids.int(), values, torch.logsumexp(teacher / 2.0, -1), temperature=2.0)
    dense = pkd_loss(student, teacher, labels, temperature=2.0, alpha=0.7, return_terms=True)
    sparse = pkd_loss(student, topk, labels, temperature=2.0, alpha=0.7, return_terms=True)
    torch.testing.assert_close(sparse.total, dense.total)
    torch.testing.assert_close(sparse.kd, dense.kd)
    with pytest.raises(ValueError, match="T=2"):
        pkd_loss(student, topk, labels, temperature=1.0, alpha=0.7)
