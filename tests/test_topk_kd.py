"""Sparse KD from a top-k teacher: the fused kernel against the float64 spec (`topk_kd_loss_reference`),
and the spec against dense KD where they must agree (k = V). Small shapes: the interpreter is slow."""

import pytest
import torch

from pkd_fast.kernels import fused_kd_loss, fused_topk_kd_loss
from pkd_fast.kernels import topk_kd_loss as topk_module
from pkd_fast.losses import KD_REDUCTIONS, kd_loss_reference, topk_kd_loss, topk_kd_loss_reference
from test_kernels import DEVICE, IGNORE, check, check_training_grad, grad_output_for, poison, rel_err, training_grad_outputs  # noqa: F401

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]


def topk_inputs(n_rows, vocab, k, temperature, dtype, alpha, scale=3.0):
    """Student logits, a teacher's top-k (ids shuffled within each row, values in `dtype`, the fp32 lse of
    the full fp32 row at T, as a cache stores them) and labels with some ignored."""
    s = (torch.randn(n_rows, vocab, device=DEVICE) * scale).to(dtype)
    t = torch.randn(n_rows, vocab, device=DEVICE) * scale
    values, ids = t.topk(k, dim=-1)
    order = torch.rand(n_rows, k, device=DEVICE).argsort(-1)
    ids, values = ids.gather(-1, order).int(), values.gather(-1, order).to(dtype)
    lse = torch.logsumexp(t / temperature, dim=-1)
    labels = None
    if alpha != 1.0:
        labels = torch.randint(0, vocab, (n_rows,), device=DEVICE)
        labels[torch.rand(n_rows, device=DEVICE) < 0.25] = IGNORE
    return s, (ids, values, lse), labels, t


def ref64(s, teacher, temperature, labels, alpha, reduction, divisors=None):
    ids, values, lse = teacher
    div = None if divisors is None else divisors.double()
    return topk_kd_loss_reference(s, ids, values.double(), lse.double(), temperature, labels, alpha, IGNORE, reduction, div)


def run(fn, s, teacher, temperature, labels, alpha, reduction, go, divisors=None):
    s = s.detach().requires_grad_()
    loss = fn(s, *teacher, temperature, labels, alpha, IGNORE, reduction, divisors)
    loss.backward(go)
    return loss.detach(), s.grad


def compare(s, teacher, temperature, labels, alpha, reduction, plain_go=False, divisors=None):
    """The kernel and eager (the spec run on the inputs' dtype) against float64: loss and gradient."""
    s64 = s.detach().double().requires_grad_()
    ref = ref64(s64, teacher, temperature, labels, alpha, reduction, divisors)
    go = grad_output_for(ref.float(), plain_go)
    ref.backward(go.double())
    ours = run(fused_topk_kd_loss, s, teacher, temperature, labels, alpha, reduction, go, divisors)
    eager = run(topk_kd_loss_reference, s, teacher, temperature, labels, alpha, reduction, go, divisors)
    assert ours[0].shape == ref.shape and ours[0].dtype == torch.float32 and ours[1].dtype == s.dtype
    check(ours[0], eager[0], ref, s.dtype, "loss")
    check(ours[1], eager[1], s64.grad, s.dtype, "grad")
    return ours


DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (V, k, T, alpha, reduction, dtype): k = 1, k = V (no rest bucket), V off any power of two, every
# reduction, alpha with and without each term, T = 1 (the CE shares the student lse) and T ≠ 1.
CASES = [
    (300, 1, 2.0, 1.0, "batchmean", torch.float32),
    (300, 32, 1.0, 0.5, "sum", torch.float32),
    (300, 300, 2.0, 0.5, "none", torch.bfloat16),
    (257, 64, 10.0, 0.0, "mean", torch.float16),
    (37, 37, 1.0, 1.0, "mean", torch.float16),
    (129, 8, 5.0, 0.3, "batchmean", torch.bfloat16),
    (3, 2, 0.5, 0.5, "sum", torch.float32),
    (300, 255, 10.0, 1.0, "none", torch.float32),
]


@pytest.mark.parametrize("vocab,k,temperature,alpha,reduction,dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_topk_matches_reference(vocab, k, temperature, alpha, reduction, dtype):
    torch.manual_seed(vocab + k)
    s, teacher, labels, _ = topk_inputs(9, vocab, k, temperature, dtype, alpha)
    compare(s, teacher, temperature, labels, alpha, reduction, plain_go=k == 32)


def test_topk_cases_cover_every_axis():
    assert {c[4] for c in CASES} == set(KD_REDUCTIONS) and {c[5] for c in CASES} == set(DTYPES)
    assert {c[3] for c in CASES} == {0.0, 0.3, 0.5, 1.0} and any(c[1] == 1 for c in CASES) and any(c[0] == c[1] for c in CASES)


def test_topk_many_blocks_with_a_ragged_tail(monkeypatch):
    """The streaming passes over several column blocks, the last one partial, top-k ids in every block."""
    monkeypatch.setattr(topk_module, "MAX_BLOCK_V", 64)
    assert topk_module.launch_config(300, 40) == {"BLOCK_V": 64, "BLOCK_K": 64, "num_warps": 1}
    torch.manual_seed(1)
    s, teacher, labels, _ = topk_inputs(7, 300, 40, 3.0, torch.float32, 0.5)
    compare(s, teacher, 3.0, labels, 0.5, "batchmean")


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_topk_with_every_column_is_dense_kd(temperature):
    """k = V: the rest bucket is empty and the top-k KL is the dense KL, in the spec (float64, to 1e-12)
    and in the kernel (against the dense kernel): loss and gradient."""
    torch.manual_seed(2)
    s, (ids, values, lse), labels, t = topk_inputs(6, 50, 50, temperature, torch.float32, 0.5)
    s64 = s.double().requires_grad_()
    sparse = topk_kd_loss_reference(s64, ids, t.double().gather(-1, ids.long()), torch.logsumexp(t.double() / temperature, -1), temperature, labels, 0.5)
    (g_sparse,) = torch.autograd.grad(sparse, s64)
    dense = kd_loss_reference(s64, t.double(), temperature, labels, 0.5)
    (g_dense,) = torch.autograd.grad(dense, s64)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-12) and rel_err(g_sparse, g_dense) < 1e-12
    ours = run(fused_topk_kd_loss, s, (ids, values, lse), temperature, labels, 0.5, "batchmean", torch.tensor(1.0))
    dense_s = s.detach().requires_grad_()
    dense_loss = fused_kd_loss(dense_s, t, temperature, labels, 0.5)
    dense_loss.backward()
    theirs = dense_loss.detach(), dense_s.grad
    assert rel_err(ours[0], theirs[0]) < 1e-5 and rel_err(ours[1], theirs[1]) < 1e-5


def test_topk_student_mass_on_the_topk():
    """The student puts all but ~e^-40 of its mass on the teacher's k ids while the teacher leaves 30%
    outside them: log q_rest ≈ -40 must come from an lse over the other columns (1 - Σ q is 0 in fp32,
    an infinite loss), and the rest gradient spread over those columns in proportion to q."""
    torch.manual_seed(3)
    s, (ids, values, lse), _, _ = topk_inputs(5, 200, 16, 1.0, torch.float32, 1.0, scale=1.0)
    s.scatter_add_(-1, ids.long(), torch.full(ids.shape, 40.0))
    log_p = values / 1.0 - lse[:, None]
    lse = lse + torch.log(log_p.exp().sum(-1) / 0.7)  # the teacher's top-k now holds 70% of its mass
    loss, grad = compare(s, (ids, values, lse), 1.0, None, 1.0, "none")
    assert loss.isfinite().all() and (loss > 0.3 * 30).all()
    off_topk = torch.ones_like(s, dtype=torch.bool).scatter(-1, ids.long(), False)
    assert (grad[off_topk] < 0).all()  # every non-top-k column is pulled up toward the rest bucket


@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_topk_no_rows_adds_exactly_zero(impl):
    """N = 0 (a micro-batch with no masked token): a loss of exactly 0 and a zero gradient, every reduction."""
    s, teacher, _, _ = topk_inputs(0, 40, 8, 2.0, torch.float32, 1.0)
    labels = torch.zeros(0, dtype=torch.long, device=DEVICE)
    for reduction, div in [*((r, None) for r in KD_REDUCTIONS), ("sum", torch.tensor([3.0, 5.0], device=DEVICE))]:
        body = torch.nn.Linear(4, 40)
        loss = topk_kd_loss(body(torch.zeros(0, 4, device=DEVICE)), *teacher, 2.0, labels, alpha=0.5, reduction=reduction, divisors=div, impl=impl)
        loss.sum().backward()
        assert torch.equal(loss, torch.zeros_like(loss)) and not body.weight.grad.any() and not body.bias.grad.any(), reduction


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_topk_divisors_match_reference(alpha):
    torch.manual_seed(4)
    s, teacher, labels, _ = topk_inputs(9, 120, 16, 2.0, torch.float32, alpha)
    compare(s, teacher, 2.0, labels, alpha, "sum", divisors=torch.tensor([2.5, 7.0], device=DEVICE))
    with pytest.raises(ValueError, match="need reduction 'sum'"):
        fused_topk_kd_loss(s, *teacher, 2.0, labels, alpha, divisors=torch.tensor([2.5, 7.0]))


def test_topk_dispatch():
    torch.manual_seed(5)
    s, teacher, labels, _ = topk_inputs(5, 30, 4, 2.0, torch.float32, 0.5)
    assert torch.equal(topk_kd_loss(s, *teacher, 2.0, labels, alpha=0.5, impl="triton"), fused_topk_kd_loss(s, *teacher, 2.0, labels, 0.5))
    assert torch.equal(topk_kd_loss(s, *teacher, 2.0, labels, alpha=0.5), topk_kd_loss_reference(s, *teacher, 2.0, labels, 0.5))


@pytest.mark.parametrize("row,dtype", enumerate(DTYPES))
def test_topk_grad_at_training_scale(row, dtype):
    """Vocabulary KD at T = 10, alpha = 0.5, under fp16 loss scales 1…2^16 ÷ accumulation 1…64: no entry
    the eager spec keeps is flushed, every entry within the dtype's rounding of the float64 spec. Logits
    spread ±50 put q of most columns far below fp16's subnormals before grad_output lifts them (a gradient
    kept in fp16 between forward and backward fails here). Values in bf16/fp16 beside an fp32 lse: the
    top-k mass can round above 1, which the kernel's gradient must follow as the spec's does."""
    torch.manual_seed(12)
    s, teacher, labels, _ = topk_inputs(16, 300, 32, 10.0, dtype, 0.5, scale=50.0)
    for go in training_grad_outputs(row, beta=False):
        go = torch.tensor(go, device=DEVICE)
        s64 = s.detach().double().requires_grad_()
        ref64(s64, teacher, 10.0, labels, 0.5, "batchmean").backward(go.double())
        _, grad = run(fused_topk_kd_loss, s, teacher, 10.0, labels, 0.5, "batchmean", go)
        _, eager = run(topk_kd_loss_reference, s, teacher, 10.0, labels, 0.5, "batchmean", go)
        check_training_grad(grad, eager, s64.grad, f"grad_output {go.item():g}")


def test_topk_bad_arguments():
    s, (ids, values, lse), labels, _ = topk_inputs(4, 10, 3, 1.0, torch.float32, 0.5)
    with pytest.raises(ValueError, match="teacher_ids must lie in"):
        fused_topk_kd_loss(s, ids + 8, values, lse, 1.0, labels, 0.5)
    with pytest.raises(ValueError, match="teacher_ids must be"):
        fused_topk_kd_loss(s, torch.zeros(4, 11, dtype=torch.int32), values, lse, 1.0, labels, 0.5)
    with pytest.raises(ValueError, match="teacher_values must match"):
        fused_topk_kd_loss(s, ids, values[:, :2], lse, 1.0, labels, 0.5)
    with pytest.raises(ValueError, match="teacher_lse must be"):
        fused_topk_kd_loss(s, ids, values, lse[:2], 1.0, labels, 0.5)
    with pytest.raises(ValueError, match="labels are required"):
        fused_topk_kd_loss(s, ids, values, lse, 1.0, None, 0.5)
