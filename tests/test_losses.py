"""The PKD loss terms against values computed by hand (closed forms with `math`, not torch)."""

import math

import pytest
import torch

from pkd_fast.losses import kd_loss_reference, patient_loss_reference, pkd_loss, regression_kd_loss


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def softmax(xs, temperature=1.0):
    e = [math.exp(x / temperature) for x in xs]
    return [v / sum(e) for v in e]


S = [[0.0, 0.0], [1.0, -1.0]]
T_ = [[math.log(3.0), 0.0], [0.5, 0.25]]
LABELS = [0, 1]


@pytest.mark.parametrize("temperature", [1.0, 2.0, 10.0])
def test_kd_term_matches_hand_computed_kl(temperature):
    rows = [kl(softmax(t, temperature), softmax(s, temperature)) for s, t in zip(S, T_)]
    expected = temperature**2 * sum(rows) / 2  # batchmean
    got = kd_loss_reference(torch.tensor(S, dtype=torch.float64), torch.tensor(T_, dtype=torch.float64), temperature, alpha=1.0)
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_first_row_is_the_textbook_value():
    # p_t = (3/4, 1/4) against the uniform student: KL = 3/4·ln 1.5 + 1/4·ln 0.5
    got = kd_loss_reference(torch.tensor([S[0]]), torch.tensor([T_[0]]), 1.0, alpha=1.0)
    assert got.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-6)


def test_ce_term_and_mixture():
    ce = (-math.log(softmax(S[0])[0]) - math.log(softmax(S[1])[1])) / 2
    kd = 4.0 * sum(kl(softmax(t, 2.0), softmax(s, 2.0)) for s, t in zip(S, T_)) / 2
    got = kd_loss_reference(torch.tensor(S), torch.tensor(T_), 2.0, torch.tensor(LABELS), alpha=0.3)
    assert got.item() == pytest.approx(0.7 * ce + 0.3 * kd, rel=1e-5)


def test_ignored_rows_drop_out_and_all_ignored_is_zero():
    s, t = torch.tensor(S), torch.tensor(T_)
    one = kd_loss_reference(s, t, 1.0, torch.tensor([0, -100]), alpha=0.0)
    assert one.item() == pytest.approx(-math.log(softmax(S[0])[0]), rel=1e-6)
    none = kd_loss_reference(s, t, 1.0, torch.tensor([-100, -100]), alpha=0.0)
    assert none.item() == 0.0 and not torch.isnan(none)


def test_reductions_and_masked_teacher_vocabulary():
    s, t = torch.tensor(S), torch.tensor(T_)
    per_row = kd_loss_reference(s, t, 1.0, reduction="none")
    assert per_row.shape == (2,)
    assert kd_loss_reference(s, t, 1.0, reduction="sum").item() == pytest.approx(per_row.sum().item())
    assert kd_loss_reference(s, t, 1.0, reduction="mean").item() == pytest.approx(per_row.sum().item() / 4)
    masked = kd_loss_reference(torch.tensor([[0.0, 0.0, 5.0]]), torch.tensor([[0.0, 0.0, -math.inf]]), 1.0)
    # The teacher's -inf entry has probability 0: KL((1/2, 1/2, 0) ‖ softmax(0, 0, 5)).
    q = softmax([0.0, 0.0, 5.0])
    assert masked.item() == pytest.approx(kl([0.5, 0.5, 0.0], q), rel=1e-5)


def test_patient_loss_normalises_then_squares():
    hs = [torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[3.0, 4.0], [1.0, 1.0]])]
    ht = [torch.tensor([[0.0, 2.0], [1.0, 0.0]]), torch.tensor([[3.0, 4.0], [-1.0, -1.0]])]
    # layer 1: ‖(1,0)-(0,1)‖² = 2, zero vector stays 0 → ‖(0,0)-(1,0)‖² = 1; layer 2: 0 and ‖2·(1,1)/√2‖² = 4
    per_layer_mean = (2 + 1) / 2 + (0 + 4) / 2
    assert patient_loss_reference(hs, ht, reduction="mean").item() == pytest.approx(per_layer_mean)
    assert patient_loss_reference(hs, ht, reduction="sum").item() == pytest.approx(2 + 1 + 0 + 4)
    assert patient_loss_reference(hs, ht, reduction="elementwise_mean").item() == pytest.approx(per_layer_mean / (2 * 2))
    stacked = patient_loss_reference(torch.stack(hs), torch.stack(ht), reduction="mean")
    assert stacked.item() == pytest.approx(per_layer_mean)


def test_pkd_loss_sums_weighted_terms_and_reports_them():
    s = torch.tensor(S, requires_grad=True)
    hs, ht = [torch.tensor([[1.0, 0.0], [0.0, 1.0]])], [torch.tensor([[0.0, 1.0], [0.0, 1.0]])]
    terms = pkd_loss(s, torch.tensor(T_), torch.tensor(LABELS), hs, ht, temperature=2.0, alpha=0.3, beta=10.0,
                     pt_reduction="mean", return_terms=True)
    ce = (-math.log(softmax(S[0])[0]) - math.log(softmax(S[1])[1])) / 2
    kd = 4.0 * sum(kl(softmax(t, 2.0), softmax(x, 2.0)) for x, t in zip(S, T_)) / 2
    pt = (2 + 0) / 2
    assert terms.ce.item() == pytest.approx(ce, rel=1e-5)
    assert terms.kd.item() == pytest.approx(kd, rel=1e-5)
    assert terms.pt.item() == pytest.approx(pt, rel=1e-6)
    assert terms.total.item() == pytest.approx(0.7 * ce + 0.3 * kd + 10.0 * pt, rel=1e-5)
    terms.total.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_ft_needs_no_teacher_and_kd_needs_one():
    s = torch.tensor(S)
    assert pkd_loss(s, None, torch.tensor(LABELS)).total.item() == pytest.approx(
        (-math.log(softmax(S[0])[0]) - math.log(softmax(S[1])[1])) / 2, rel=1e-6
    )
    with pytest.raises(ValueError, match="teacher logits"):
        pkd_loss(s, None, torch.tensor(LABELS), alpha=0.5)


def test_regression_mixes_mse_to_label_and_to_teacher():
    s, t, y = torch.tensor([[1.0], [2.0]]), torch.tensor([[1.5], [2.5]]), torch.tensor([0.0, 2.0])
    expected = 0.4 * ((1 - 0) ** 2 + 0) / 2 + 0.6 * (0.25 + 0.25) / 2
    assert regression_kd_loss(s, t, y, 0.6).item() == pytest.approx(expected)
    terms = pkd_loss(s, t, y, temperature=5.0, alpha=0.6, regression=True, return_terms=True)
    assert terms.total.item() == pytest.approx(expected)
    assert terms.ce.item() == pytest.approx(0.5) and terms.kd.item() == pytest.approx(0.25)


def test_auto_picks_the_loss_implementation_per_device_and_shape(monkeypatch):
    """Triton on CUDA; on a CPU, compile only where it repays its first call (vocabulary KD, every-token PT,
    benchmarks/results/loss_impl_cpu.md) and a C++ compiler is there for inductor; eager otherwise."""
    from pkd_fast import losses

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert losses.resolve_impl("auto", cuda) == losses.resolve_impl("auto", cuda, wide=True) == "triton"
    monkeypatch.setattr(losses.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert losses.resolve_impl("auto", cpu, wide=True) == "compile"
    assert losses.resolve_impl("auto", cpu) == "eager"
    monkeypatch.setattr(losses.shutil, "which", lambda name: None)
    assert losses.resolve_impl("auto", cpu, wide=True) == "eager"
    assert losses.resolve_impl("eager", cuda) == "eager" and losses.resolve_impl("compile", cpu) == "compile"
    with pytest.raises(ValueError):
        losses.resolve_impl("fast", cpu)


def _mlm_micro_batches(masked_per_batch, vocab=11, hidden=6, length=8, seed=0):
    """Micro-batches of one masked-LM step (one block each): `features` stand in for the encoder's rows,
    `mlm_labels` hold the given number of masked tokens (0 included)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for n_masked in masked_per_batch:
        labels = torch.full((1, length), -100)
        labels[0, :n_masked] = torch.randint(0, vocab, (n_masked,), generator=g)
        batches.append({"features": torch.randn(1, length, hidden, generator=g), "mlm_labels": labels,
                        "attention_mask": torch.ones(1, length, dtype=torch.long)})
    return batches


def _step_gradient(batches, accumulation, impl="eager", teacher_seed=1):
    """The gradient DeepSpeed applies for one optimizer step of these micro-batches on one rank: each
    micro-batch's masked-LM loss, with the divisors the trainer counts before the step, ÷ accumulation
    (what engine.backward does, scale_wrt_gas); the model is one linear head over the masked rows."""
    from pkd_fast.dist import init_distributed
    from pkd_fast.models import mlm_row_count, mlm_row_index
    from pkd_fast.trainer import Trainer

    world = init_distributed()
    trainer = Trainer(world, {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": accumulation},
                      log_steps=1, save_steps=0, warmup_ratio=0.0, resume=False, on_nonfinite="stop")
    torch.manual_seed(0)
    head, teacher = torch.nn.Linear(6, 11), torch.nn.Linear(6, 11)
    torch.nn.init.normal_(teacher.weight, generator=torch.Generator().manual_seed(teacher_seed))
    count = lambda b: torch.stack([mlm_row_count(b, "masked"), mlm_row_count(b, "masked")])  # noqa: E731
    for batch, divisors in trainer._counted_steps(batches, count):
        rows = batch["features"].flatten(0, 1).index_select(0, mlm_row_index(batch))
        labels = batch["mlm_labels"].flatten().index_select(0, mlm_row_index(batch))
        loss = pkd_loss(head(rows), teacher(rows).detach(), labels, temperature=2.0, alpha=0.5, impl=impl, divisors=divisors)
        (loss.total / accumulation).backward()
    return head.weight.grad, head.bias.grad


@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_mlm_step_gradient_is_the_same_in_one_or_four_micro_batches(impl):
    """Masked-LM CE and KL are sums ÷ the step's masked tokens: the same 4 blocks (3, 0, 1 and 5 masked
    tokens) give the same gradient as one micro-batch of 4 or as 4 accumulated micro-batches."""
    blocks = _mlm_micro_batches([3, 0, 1, 5])
    whole = {k: torch.cat([b[k] for b in blocks]) for k in blocks[0]}
    one = _step_gradient([whole], accumulation=1, impl=impl)
    four = _step_gradient(blocks, accumulation=4, impl=impl)
    for a, b in zip(one, four):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert one[0].abs().sum() > 0


def test_a_short_micro_batch_no_longer_dominates_the_step():
    """One masked token alone in a micro-batch weighs as much as each of the 20 in a full one (1/21 each),
    not 0.5 against 0.025 (a per-micro-batch mean, then DeepSpeed's average of two micro-batches)."""
    full, short = _mlm_micro_batches([20, 1], length=24)
    unmasked = lambda b: {**b, "mlm_labels": torch.full_like(b["mlm_labels"], -100)}  # noqa: E731
    full_mean = _step_gradient([full, unmasked(short)], accumulation=2)  # the 20 tokens' mean gradient
    lone = _step_gradient([unmasked(full), short], accumulation=2)  # the lone token's gradient
    both = _step_gradient([full, short], accumulation=2)
    for b, f, x in zip(both, full_mean, lone):
        torch.testing.assert_close(b, f * 20 / 21 + x / 21, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(b, (f + x) / 2, rtol=1e-3)  # what the per-micro-batch mean gave
