"""Masked-LM model pieces: head detection, the fresh tied head and what trains, the layer-selected
student, and the row-gathered LM head against full [B, L, V] logits."""

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from pkd_fast import models
from pkd_fast.config import default_teacher
from pkd_fast.errors import PkdError
from pkd_fast.losses import kd_loss_reference, pkd_loss


def tiny_mlm(layers=6, vocab=50, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    model = BertForMaskedLM(cfg).eval()
    with torch.no_grad():  # a non-trivial head: the fresh init has a zero bias and unit LayerNorm
        for p in model.cls.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_default_teacher_has_no_head_until_one_is_added_and_saved(tmp_path):
    path = default_teacher()
    assert not models.has_mlm_head(path)
    with pytest.raises(PkdError, match="no masked-LM head"):
        models.load_mlm_teacher(path)

    model = models.fresh_mlm_head(path)
    head = model.cls.predictions
    assert head.decoder.weight is model.bert.embeddings.word_embeddings.weight
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"cls.predictions.{n}" for n in (
        "bias", "transform.dense.weight", "transform.dense.bias", "transform.LayerNorm.weight", "transform.LayerNorm.bias")}
    assert models.has_mlm_head(model)
    assert all(p.requires_grad for p in models.fresh_mlm_head(path, train_body=True).parameters())

    with torch.no_grad():
        head.bias.add_(0.5)  # as if fitted
    model.save_pretrained(tmp_path / "with_head")
    assert models.has_mlm_head(tmp_path / "with_head")
    with pytest.raises(PkdError, match="already has a masked-LM head"):
        models.fresh_mlm_head(str(tmp_path / "with_head"))
    teacher = models.load_mlm_teacher(str(tmp_path / "with_head"))
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert torch.equal(teacher.cls.predictions.bias, head.bias)
    assert torch.equal(teacher.cls.predictions.transform.dense.weight, head.transform.dense.weight)
    assert teacher.config._attn_implementation == "sdpa"


def test_checkpoint_errors(tmp_path):
    with pytest.raises(PkdError, match="not a local directory"):
        models.has_mlm_head(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PkdError, match="no model.safetensors"):
        models.has_mlm_head(str(tmp_path / "empty"))


@pytest.mark.parametrize("strategy, n, k, layers", [
    ("first", 6, 3, (1, 2, 3)),
    ("alternate", 12, None, (1, 3, 5, 7, 9, 11)),  # DistilBERT: encoder.layer 0,2,...,10
    ("alternate", 6, 2, (1, 3)),
    ("alternate", 5, None, (1, 3, 5)),
])
def test_student_layer_choices(strategy, n, k, layers):
    assert models.mlm_student_layers(strategy, n, k) == layers


def test_student_layer_choice_errors():
    assert models.mlm_student_layers("first", 6, None, (2, 5)) == (2, 5)
    for args, message in [
        (("first", 6, None), "first needs --student-layers k"), (("first", 6, 7), "between 1 and"),
        (("alternate", 6, 4), "at most 3"), (("middle", 6, 3), "unknown"),
        (("first", 6, 3, (1, 2)), "2 layers for a 3-layer"), (("first", 6, None, (0, 2)), "out of range"),
        (("first", 6, None, (3, 2)), "ascend"),
    ]:
        with pytest.raises(PkdError, match=message):
            models.mlm_student_layers(*args)


@pytest.mark.parametrize("strategy, k, explicit", [("first", 2, None), ("alternate", None, None), ("first", None, (2, 3, 6))])
def test_student_copies_the_chosen_layers_and_the_head(strategy, k, explicit):
    teacher = tiny_mlm()
    layers = models.mlm_student_layers(strategy, 6, k, explicit)
    student = models.build_mlm_student(teacher, layers)
    assert student.config.num_hidden_layers == len(layers) and isinstance(student, BertForMaskedLM)
    for j, t in enumerate(layers):
        s_state, t_state = student.bert.encoder.layer[j].state_dict(), teacher.bert.encoder.layer[t - 1].state_dict()
        assert s_state.keys() == t_state.keys() and all(torch.equal(s_state[key], t_state[key]) for key in s_state)
    for name in ("bert.embeddings", "cls"):
        s_state, t_state = student.get_submodule(name).state_dict(), teacher.get_submodule(name).state_dict()
        assert all(torch.equal(s_state[key], t_state[key]) for key in s_state)
    assert student.cls.predictions.decoder.weight is student.bert.embeddings.word_embeddings.weight
    # a student of all the teacher's layers is the teacher
    whole = models.build_mlm_student(teacher, range(1, 7)).eval()
    x = torch.randint(5, 50, (2, 9))
    assert torch.equal(whole(input_ids=x).logits, teacher(input_ids=x).logits)


def masked_batch(vocab=50, rows=3, length=16):
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, vocab, (rows, length), generator=g)
    attention_mask = torch.ones(rows, length, dtype=torch.long)
    attention_mask[1, 11:] = 0
    labels = torch.where(torch.rand(rows, length, generator=g) < 0.3, input_ids, -100)
    labels[attention_mask == 0] = -100
    input_ids[labels != -100] = 4  # [MASK]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": torch.zeros_like(input_ids),
            "mlm_labels": labels}


@pytest.mark.parametrize("rows", ["masked", "all"])
def test_gathered_rows_give_the_full_logits_loss(rows):
    teacher = tiny_mlm()
    student = models.build_mlm_student(teacher, (1, 4)).eval()  # no dropout: both passes see one network
    batch = masked_batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    keep = batch["mlm_labels"] != -100 if rows == "masked" else batch["attention_mask"].bool()

    # reference: full [B, L, V] logits, then select the rows
    full_s = student(**inputs).logits
    full_t = teacher(**inputs).logits
    ref = kd_loss_reference(full_s[keep], full_t[keep], 2.0, batch["mlm_labels"][keep], alpha=0.6)
    ref_grad = torch.autograd.grad(ref, student.cls.predictions.transform.dense.weight)[0]

    out = models.mlm_rows(models.MaskedLMRows(student), batch, rows=rows, output_hidden_states=True)
    with torch.no_grad():
        t_out = models.mlm_rows(models.MaskedLMRows(teacher), batch, rows=rows, output_hidden_states=True)
    assert out.logits.shape == (keep.sum().item(), 50) and torch.equal(t_out.row_index, out.row_index)
    assert torch.equal(out.labels, batch["mlm_labels"][keep])
    torch.testing.assert_close(out.logits, full_s[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t_out.logits, full_t[keep], rtol=1e-5, atol=1e-5)
    loss = pkd_loss(out.logits, t_out.logits, out.labels, temperature=2.0, alpha=0.6).total
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    grad = torch.autograd.grad(loss, student.cls.predictions.transform.dense.weight)[0]
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    # hidden states come back for the patient loss, and pt_rows reads the same rows
    assert len(out.hidden) == 3 and len(t_out.hidden) == 7
    rows_s = models.pt_rows(out.hidden, [2], out.row_index)[0]
    assert torch.equal(rows_s, out.hidden[2][keep])
