"""Layer maps (skip / last / explicit) and the student's initialisation from the teacher's lower layers."""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from pkd_fast.config import default_teacher
from pkd_fast.data import real_token_index
from pkd_fast.errors import PkdError
from pkd_fast.models import build_student, is_finetuned, layer_map, load_classifier, pt_rows
from pkd_fast.tasks import get_task

SST2 = get_task("sst2")


@pytest.mark.parametrize(
    "n, k, skip, last",
    [
        (12, 6, (2, 4, 6, 8, 10), (7, 8, 9, 10, 11)),  # the paper's 12→6
        (12, 3, (4, 8), (10, 11)),
        (6, 3, (2, 4), (4, 5)),
        (24, 6, (4, 8, 12, 16, 20), (19, 20, 21, 22, 23)),
    ],
)
def test_skip_and_last_maps(n, k, skip, last):
    assert layer_map("skip", n, k) == skip
    assert layer_map("last", n, k) == last
    assert layer_map("ft", n, k) == () and layer_map("kd", n, k) == ()


@pytest.mark.parametrize("n, k", [(12, 6), (12, 3), (6, 3), (24, 6)])
def test_explicit_map_overrides_and_is_checked(n, k):
    custom = tuple(range(1, k))
    assert layer_map("skip", n, k, custom) == custom
    assert layer_map("last", n, k, custom) == custom
    with pytest.raises(PkdError, match=f"needs k-1 = {k - 1}"):
        layer_map("skip", n, k, custom + (n,))
    with pytest.raises(PkdError, match="out of range"):
        layer_map("skip", n, k, (n + 1,) + custom[1:])


def test_non_multiple_depth_fails_clearly_without_a_map():
    with pytest.raises(PkdError, match="multiple of the student depth.*--layer-map"):
        layer_map("skip", 12, 5)
    with pytest.raises(PkdError, match="multiple"):
        layer_map("last", 12, 5)
    assert layer_map("skip", 12, 5, (2, 5, 7, 10)) == (2, 5, 7, 10)


def tiny_bert(layers=12, labels=2):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=labels)
    return BertForSequenceClassification(cfg)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_student_copies_exactly_the_first_k_layers(k):
    teacher = tiny_bert()
    student = build_student(teacher, k, SST2)
    assert student.config.num_hidden_layers == k and len(student.bert.encoder.layer) == k
    t_state, s_state = teacher.state_dict(), student.state_dict()
    backbone = [key for key in s_state if key.startswith("bert.")]
    assert any(key.startswith(f"bert.encoder.layer.{k - 1}.") for key in backbone)
    for key in backbone:
        assert torch.equal(s_state[key], t_state[key]), key
    # The head is fresh, not the teacher's.
    assert not torch.equal(s_state["classifier.weight"], t_state["classifier.weight"])


def test_student_from_the_offline_minilm():
    teacher = load_classifier(default_teacher(), SST2)
    student = build_student(teacher, 3, SST2)
    for i in range(3):
        for (name, p_s), (_, p_t) in zip(student.bert.encoder.layer[i].named_parameters(), teacher.bert.encoder.layer[i].named_parameters()):
            assert torch.equal(p_s, p_t), (i, name)
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)
    assert torch.equal(student.bert.pooler.dense.weight, teacher.bert.pooler.dense.weight)
    assert student.config._attn_implementation == "sdpa"


def test_student_depth_out_of_range():
    with pytest.raises(PkdError, match="between 1 and"):
        build_student(tiny_bert(layers=6), 7, SST2)


def test_teacher_head_size_must_match_the_task(tmp_path):
    assert not is_finetuned(default_teacher(), SST2)  # a pretrained base: gets a fresh head
    tiny_bert(labels=3).save_pretrained(tmp_path)
    with pytest.raises(PkdError, match="3 outputs but sst2 has 2"):
        is_finetuned(str(tmp_path), SST2)
    assert is_finetuned(str(tmp_path), get_task("mnli"))


def test_pt_rows_cls_and_tokens():
    hidden = [torch.randn(2, 4, 3) for _ in range(4)]
    cls = pt_rows(hidden, (1, 3), None)
    assert [torch.equal(c, hidden[i][:, 0]) for c, i in zip(cls, (1, 3))] == [True, True]
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    rows = pt_rows(hidden, (2,), real_token_index(mask))
    assert torch.equal(rows[0], hidden[2][mask.bool()])
    # --pt-tokens mean: each example's mean over its real tokens, in fp32 whatever the states' dtype
    pooled = pt_rows([h.bfloat16() for h in hidden], (1, 2), pool_mask=mask)
    assert [p.dtype for p in pooled] == [torch.float32] * 2
    expected = torch.stack([hidden[2][0, :2].bfloat16().float().mean(0), hidden[2][1, :3].bfloat16().float().mean(0)])
    torch.testing.assert_close(pooled[1], expected, rtol=1e-6, atol=1e-6)


def _save_classifier(path, num_labels, id2label=None, finetuning_task=None):
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        num_labels=num_labels)
    if id2label is not None:
        config.id2label, config.label2id = dict(enumerate(id2label)), {n: i for i, n in enumerate(id2label)}
    if finetuning_task is not None:
        config.finetuning_task = finetuning_task
    BertForSequenceClassification(config).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("id2label, task, message", [
    (("positive", "negative"), "sst2", "the same labels in another order"),
    (("contradiction", "entailment", "neutral"), "mnli", "the same labels in another order"),
    (("not_duplicate", "duplicate"), "sst2", "labels of another task"),
    (("entailment", "not_entailment"), "mrpc", "labels of another task"),
])
def test_a_teacher_of_another_task_or_label_order_is_refused(tmp_path, id2label, task, message):
    path = _save_classifier(tmp_path / "t", len(id2label), id2label)
    with pytest.raises(PkdError, match=message):
        is_finetuned(path, get_task(task))


def test_teacher_label_names_that_agree_or_say_nothing_are_accepted(tmp_path):
    assert is_finetuned(_save_classifier(tmp_path / "a", 2, ("NEGATIVE", "Positive")), SST2)
    assert is_finetuned(_save_classifier(tmp_path / "b", 2, ("0", "1")), SST2)  # the TSV's own label strings
    assert is_finetuned(_save_classifier(tmp_path / "c", 2), SST2)  # LABEL_0, LABEL_1: nothing to check
    with pytest.raises(PkdError, match="fine-tuned on mrpc"):
        is_finetuned(_save_classifier(tmp_path / "d", 2, finetuning_task="mrpc"), SST2)


def test_a_fine_tuned_model_records_its_task_and_labels(tmp_path):
    model = load_classifier(default_teacher(), get_task("mrpc"))
    model.save_pretrained(tmp_path / "m")
    assert is_finetuned(str(tmp_path / "m"), get_task("mrpc"))
    with pytest.raises(PkdError, match="fine-tuned on mrpc"):
        is_finetuned(str(tmp_path / "m"), SST2)
