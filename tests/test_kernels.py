"""The fused Triton losses against float64 references of the spec in `pkd_fast.losses`.

Runs on a GPU when there is one, else under Triton's CPU interpreter (tests/conftest.py). Every output is
allocated with torch.empty, which the `poison` fixture makes NaN-filled, so an element a kernel fails to
write shows up. The parameter axes are covered (every value of each, every V × reduction, every alpha ×
reduction), not crossed in full: the interpreter is slow.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pkd_fast.kernels import fused_kd_loss, fused_patient_loss
from pkd_fast.kernels import kd_loss as kd_module
from pkd_fast.kernels import patient_loss as pt_module
from pkd_fast.losses import KD_REDUCTIONS, kd_loss, kd_loss_reference, patient_loss, patient_loss_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100

# The interpreter is numpy: it warns about inf/NaN in lanes the kernels discard (padding, -inf logits).
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]


@pytest.fixture(autouse=True)
def poison():
    """torch.empty returns NaN-filled memory for the duration of each test."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was_on, warn_only=was_warn)
    torch.utils.deterministic.fill_uninitialized_memory = was_fill


def kd_ref64(s, t, temperature, labels=None, alpha=1.0, reduction="batchmean"):
    """The spec in float64 (it keeps float64 inputs in float64)."""
    t64 = None if t is None else t.double()
    return kd_loss_reference(s.double(), t64, temperature, labels, alpha=alpha, ignore_index=IGNORE, reduction=reduction)


def pt_ref64(student, teacher, normalize=True, reduction="mean"):
    """The spec in float64."""
    return patient_loss_reference([h.double() for h in student], [h.double() for h in teacher], normalize, reduction)


def rel_err(x, ref):
    """Largest error relative to the largest reference magnitude (0/0 counts as exact)."""
    x, ref = x.detach().double(), ref.detach().double()
    assert not x.isnan().any(), "NaN: an element was never written or the math broke"
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check(ours, eager, ref, dtype, what):
    """fp32: within 1e-5 of float64. Low precision: no worse than eager in that dtype, plus 1e-2."""
    err = rel_err(ours, ref)
    bound = 1e-5 if dtype == torch.float32 else rel_err(eager, ref) + 1e-2
    assert err <= bound, f"{what}: error {err:.3g} > {bound:.3g}"


def grad_output_for(loss, plain):
    if plain:
        return torch.ones_like(loss)
    return torch.rand_like(loss) + 0.5 if loss.dim() else torch.tensor(0.37, device=loss.device)


def run_kd(fn, s, t, temperature, labels, alpha, reduction, go):
    s = s.detach().requires_grad_()  # a fresh leaf over the same memory: strides kept
    loss = fn(s, t, temperature, labels, alpha=alpha, reduction=reduction)
    loss.backward(go)
    return loss.detach(), s.grad


def kd_inputs(n_rows, vocab, dtype, alpha, scale=3.0):
    s = (torch.randn(n_rows, vocab, device=DEVICE) * scale).to(dtype)
    t = (torch.randn(n_rows, vocab, device=DEVICE) * scale).to(dtype)
    labels = None
    if alpha != 1.0:
        labels = torch.randint(0, vocab, (n_rows,), device=DEVICE)
        labels[torch.rand(n_rows, device=DEVICE) < 0.25] = IGNORE
    return s, t, labels


def compare_kd(s, t, temperature, labels, alpha, reduction, plain_go=False):
    """Ours and eager (the spec, in the input dtype) against float64: loss and student gradient."""
    s64 = s.detach().double().requires_grad_()
    ref = kd_ref64(s64, t, temperature, labels, alpha, reduction)
    go = grad_output_for(ref.float(), plain_go)
    ref.backward(go.double())
    ours = run_kd(fused_kd_loss, s, t, temperature, labels, alpha, reduction, go)
    eager = run_kd(kd_loss_reference, s, t, temperature, labels, alpha, reduction, go)
    assert ours[0].shape == ref.shape and ours[0].dtype == torch.float32 and ours[1].dtype == s.dtype
    if s.dtype == torch.float32:  # the float64 replica is the spec: they agree where the spec is exact enough
        assert rel_err(eager[0], ref) < 1e-4
    check(ours[0], eager[0], ref, s.dtype, "loss")
    check(ours[1], eager[1], s64.grad, s.dtype, "grad")
    return ours


VOCABS = (1, 2, 3, 1271, 30522)
TEMPERATURES = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0)
ALPHAS = (0.0, 0.5, 1.0)
ROWS = (1, 7, 64)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kd_cases():
    """Every V × reduction; alpha cycles so each reduction meets each alpha, T, N and dtype cycle through
    all their values, and every fifth case has grad_output = 1 (the skipped scaling)."""
    for i, vocab in enumerate(VOCABS):
        for j, reduction in enumerate(KD_REDUCTIONS):
            c = 4 * i + j
            n_rows = ROWS[(i + j) % 3] if vocab < 30000 else (1, 7)[j % 2]  # keep the interpreter fast
            dtype = DTYPES[(i + 2 * j) % 3]  # with alpha = ALPHAS[(i + j) % 3]: all 9 pairs
            yield pytest.param(
                vocab, reduction, ALPHAS[(i + j) % 3], TEMPERATURES[c % 6], n_rows, dtype, c % 5 == 0,
                id=f"V{vocab}-{reduction}-a{ALPHAS[(i + j) % 3]}-T{TEMPERATURES[c % 6]}-N{n_rows}-{str(dtype)[6:]}",
            )


@pytest.mark.parametrize("vocab,reduction,alpha,temperature,n_rows,dtype,plain_go", list(_kd_cases()))
def test_kd_matches_reference(vocab, reduction, alpha, temperature, n_rows, dtype, plain_go):
    torch.manual_seed(vocab + n_rows)
    s, t, labels = kd_inputs(n_rows, vocab, dtype, alpha)
    compare_kd(s, t, temperature, labels, alpha, reduction, plain_go)


def test_kd_covers_every_axis_value():
    cases = [p.values for p in _kd_cases()]
    assert {c[0] for c in cases} == set(VOCABS) and {c[3] for c in cases} == set(TEMPERATURES)
    assert {c[4] for c in cases} == set(ROWS) and {(c[1], c[2]) for c in cases} == {
        (r, a) for r in KD_REDUCTIONS for a in ALPHAS
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kd_masked_teacher_vocabulary(dtype):
    """-inf teacher logits scattered, and over a span longer than a column block (8192)."""
    torch.manual_seed(1)
    s, t, labels = kd_inputs(3, 30522, dtype, 0.5)
    t[torch.rand(t.shape, device=DEVICE) < 0.3] = float("-inf")
    t[1, 2000:20000] = float("-inf")
    compare_kd(s, t, 2.0, labels, 0.5, "batchmean")


def test_kd_fully_masked_teacher_row():
    """A teacher row of only -inf has no distribution: 0 KL and 0 KL gradient (the spec's loss is 0 there
    too; its autograd gradient is NaN)."""
    torch.manual_seed(2)
    s, t, _ = kd_inputs(3, 1271, torch.float32, 1.0)
    t[1] = float("-inf")
    loss, grad = run_kd(fused_kd_loss, s, t, 2.0, None, 1.0, "none", torch.ones(3, device=DEVICE))
    keep = torch.tensor([0, 2], device=DEVICE)
    s64 = s[keep].double().requires_grad_()
    ref = kd_ref64(s64, t[keep], 2.0, reduction="none")
    ref.sum().backward()
    assert loss[1] == 0 and (grad[1] == 0).all()
    assert rel_err(loss[keep], ref) < 1e-5 and rel_err(grad[keep], s64.grad) < 1e-5


@pytest.mark.parametrize("reduction", KD_REDUCTIONS)
def test_kd_all_labels_ignored(reduction):
    """The CE term drops out entirely: finite, and 0 with its gradient when alpha = 0."""
    torch.manual_seed(3)
    s, t, labels = kd_inputs(7, 1271, torch.float32, 0.5)
    labels.fill_(IGNORE)
    compare_kd(s, t, 2.0, labels, 0.5, reduction)
    go = torch.ones(7 if reduction == "none" else (), device=DEVICE)
    loss, grad = run_kd(fused_kd_loss, s, None, 1.0, labels, 0.0, reduction, go)
    assert (loss == 0).all() and (grad == 0).all()


@pytest.mark.parametrize("impl, alpha", [(impl, a) for impl in ("eager", "triton") for a in (0.0, 0.5, 1.0)] + [("compile", 0.5)])
def test_kd_no_rows_adds_exactly_zero(impl, alpha):
    """A masked-LM micro-batch with no masked token: [0, V] logits add a loss of exactly 0 and a zero
    gradient in every implementation and reduction (a batchmean was 0/0 = NaN, the kernel refused N = 0)."""
    s, t, labels = kd_inputs(0, 1271, torch.float32, alpha)
    labels = torch.zeros(0, dtype=torch.long, device=DEVICE) if alpha != 1.0 else None
    divisors = torch.tensor([3.0, 5.0], device=DEVICE)
    cases = [("none", None), ("sum", divisors)] if impl == "compile" else [*((r, None) for r in KD_REDUCTIONS), ("sum", divisors)]
    for reduction, div in cases:  # compile: two cases, each new one recompiles (seconds)
        logits = s.detach().requires_grad_()
        loss = kd_loss(logits, t, 2.0, labels, alpha=alpha, reduction=reduction, divisors=div, impl=impl)
        loss.sum().backward()
        assert torch.equal(loss, torch.zeros_like(loss)) and logits.grad is not None and logits.grad.shape == (0, 1271), reduction
    body = torch.nn.Linear(4, 1271)  # and the rows' producer gets an exactly zero gradient through them
    loss = kd_loss(body(torch.zeros(0, 4, device=DEVICE)), t, 2.0, labels, alpha=alpha, reduction="sum", divisors=divisors, impl=impl)
    loss.backward()
    assert loss.item() == 0.0 and not body.weight.grad.any() and not body.bias.grad.any()


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_kd_divisors_match_reference(alpha):
    """Sums divided by device-side [CE, KL] divisors (the masked-LM step's share of its units), folded
    into the one launch: loss and gradient as the spec's."""
    torch.manual_seed(5)
    s, t, labels = kd_inputs(9, 1271, torch.float32, alpha)
    divisors = torch.tensor([2.5, 7.0], device=DEVICE)
    s64 = s.double().requires_grad_()
    ref = kd_loss_reference(s64, t.double(), 2.0, labels, alpha=alpha, reduction="sum", divisors=divisors.double())
    ref.backward()
    logits = s.detach().requires_grad_()
    ours = fused_kd_loss(logits, t, 2.0, labels, alpha, reduction="sum", divisors=divisors)
    ours.backward()
    assert rel_err(ours, ref) < 1e-5 and rel_err(logits.grad, s64.grad) < 1e-5
    if alpha not in (0.0, 1.0):  # the two divisors reach their own terms
        ce = kd_loss_reference(s.double(), None, 2.0, labels, alpha=0.0, reduction="sum")
        kl = kd_loss_reference(s.double(), t.double(), 2.0, alpha=1.0, reduction="sum")
        assert ref.item() == pytest.approx((1 - alpha) * ce.item() / 2.5 + alpha * kl.item() / 7.0, rel=1e-12)
    with pytest.raises(ValueError, match="need reduction 'sum'"):
        fused_kd_loss(logits, t, 2.0, labels, alpha, divisors=divisors)


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (5.0, 0.0), (0.5, 1.0)])
def test_kd_large_magnitude_logits(temperature, alpha):
    torch.manual_seed(4)
    s, t, labels = kd_inputs(7, 1271, torch.float32, alpha, scale=300.0)
    compare_kd(s, t, temperature, labels, alpha, "batchmean")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kd_student_equals_teacher(dtype):
    """Identical logits: the KL and its gradient are exactly 0, not rounding noise."""
    torch.manual_seed(5)
    s, _, _ = kd_inputs(5, 30522, dtype, 1.0)
    for temperature in (1.0, 3.0):
        go = torch.tensor(2.0, device=DEVICE)
        loss, grad = run_kd(fused_kd_loss, s, s.clone(), temperature, None, 1.0, "sum", go)
        assert loss.item() == 0.0 and (grad == 0).all()


def test_kd_strided_rows_and_mixed_dtypes():
    """Student rows strided inside a wider tensor, teacher fp32 beside a bf16 student (scalar-load path)."""
    torch.manual_seed(6)
    wide = torch.randn(7, 1300, device=DEVICE).to(torch.bfloat16)
    s = wide[:, 5:1276]
    _, t, labels = kd_inputs(7, 1271, torch.float32, 0.5)
    compare_kd(s, t, 2.0, labels, 0.5, "mean")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kd_inplace_reuses_the_logits(dtype):
    """inplace=True: the same gradient, written over the (row-strided) student logits and nowhere else.
    fp16 logits can't hold it before grad_output lifts it: they stay intact until backward writes it."""
    torch.manual_seed(7)
    wide = torch.randn(7, 1280, device=DEVICE).to(dtype)
    _, t, labels = kd_inputs(7, 1271, torch.float32, 0.5)
    s = wide[:, :1271].requires_grad_()
    go = torch.tensor(2.0**16 / 8, device=DEVICE)
    loss_ref = fused_kd_loss(s, t, 2.0, labels, alpha=0.5)
    loss_ref.backward(go)
    grad_ref, s.grad, margin, logits = s.grad.clone(), None, wide[:, 1271:].clone(), s.detach().clone()
    loss = fused_kd_loss(s, t, 2.0, labels, alpha=0.5, inplace=True)
    if dtype == torch.float16:
        assert torch.equal(s.detach(), logits)
    loss.backward(go)
    assert torch.equal(loss, loss_ref) and torch.equal(s.grad, grad_ref)
    assert torch.equal(s.detach(), grad_ref)  # the logits now hold the (scaled) gradient
    assert torch.equal(wide[:, 1271:], margin)


def test_kd_without_grad_matches():
    """No gradient wanted (inputs without grad, or grad mode off): the loss alone, the same bits."""
    torch.manual_seed(8)
    s, t, labels = kd_inputs(7, 1271, torch.bfloat16, 0.5)
    loss, _ = run_kd(fused_kd_loss, s, t, 2.0, labels, 0.5, "none", torch.ones(7, device=DEVICE))
    assert torch.equal(fused_kd_loss(s, t, 2.0, labels, alpha=0.5, reduction="none"), loss)
    with torch.no_grad():
        assert torch.equal(fused_kd_loss(s.requires_grad_(), t, 2.0, labels, alpha=0.5, reduction="none"), loss)


def test_kd_deterministic():
    torch.manual_seed(9)
    s, t, labels = kd_inputs(9, 30522, torch.bfloat16, 0.5)
    go = torch.tensor(0.3, device=DEVICE)
    first, second = (run_kd(fused_kd_loss, s, t, 2.0, labels, 0.5, "batchmean", go) for _ in range(2))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_kd_dispatch_and_pipeline_arguments():
    """`kd_loss(impl="triton")` reaches the kernel; fine-tuning passes no teacher with alpha = 0."""
    torch.manual_seed(10)
    s, t, labels = kd_inputs(7, 3, torch.float32, 0.5)
    assert torch.equal(kd_loss(s, t, 2.0, labels, alpha=0.5, impl="triton"), fused_kd_loss(s, t, 2.0, labels, 0.5))
    assert rel_err(fused_kd_loss(s, None, 1.0, labels, alpha=0.0), kd_ref64(s, None, 1.0, labels, 0.0)) < 1e-5


def test_kd_bad_arguments():
    s, t, labels = kd_inputs(4, 10, torch.float32, 0.5)
    with pytest.raises(ValueError, match="reduction"):
        fused_kd_loss(s, t, 1.0, labels, 0.5, reduction="avg")
    with pytest.raises(ValueError, match="teacher_logits"):
        fused_kd_loss(s, t[:, :5], 1.0, labels, 0.5)
    with pytest.raises(ValueError, match="labels are required"):
        fused_kd_loss(s, t, 1.0, None, 0.5)
    with pytest.raises(ValueError, match="labels must be"):
        fused_kd_loss(s, t, 1.0, labels[:3], 0.5)
    with pytest.raises(ValueError, match="temperature"):
        fused_kd_loss(s, t, 0.0, labels, 0.5)
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        fused_kd_loss(s[0], t[0], 1.0)
    loss = fused_kd_loss(s.requires_grad_(), t, 1.0, labels, 0.5)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_kd_refuses_out_of_range_labels():
    """Labels outside [0, V) other than ignore_index are refused, as the eager path's gather refuses them.
    On CUDA that is a device assert, which ruins the process's CUDA context: it runs in a subprocess."""
    if DEVICE == "cuda":
        code = (
            "import torch; from pkd_fast.kernels import fused_kd_loss; s = torch.randn(4, 10, device='cuda'); "
            "y = torch.tensor([0, -100, 9, 3], device='cuda'); fused_kd_loss(s, s, 1.0, y, 0.5); "
            "torch.cuda.synchronize(); print('valid labels pass'); y[2] = 10; "
            "fused_kd_loss(s, s, 1.0, y, 0.5); torch.cuda.synchronize()"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert result.stdout.strip() == "valid labels pass" and result.returncode != 0, result.stderr[-2000:]
        return
    s, t, _ = kd_inputs(4, 10, torch.float32, 1.0)
    for bad, ignore_index in ((10, IGNORE), (-1, IGNORE), (IGNORE, -1)):
        valid, labels = (torch.tensor([0, 9, ignore_index, y], device=DEVICE) for y in (3, bad))
        assert fused_kd_loss(s, t, 1.0, valid, 0.5, ignore_index).isfinite()
        with pytest.raises((IndexError, RuntimeError)):
            kd_loss_reference(s, t, 1.0, labels, 0.5, ignore_index)
        message = rf"labels must lie in \[0, 10\) or equal ignore_index={ignore_index}, got {bad}"
        with pytest.raises(ValueError, match=message):
            fused_kd_loss(s, t, 1.0, labels, 0.5, ignore_index)


# --- patient loss ---------------------------------------------------------------------------------------


def _layers(base, shape, stacked):
    """The layer views of [L, B, S, H] `base` in the given shape: cls ([B, H] slices at token 0, strided
    rows), tokens ([B, S, H]) or flat ([B·S, H]); as a list or one stacked tensor."""
    pick = {"cls": lambda x: x[..., 0, :], "tokens": lambda x: x, "flat": lambda x: x.flatten(-3, -2)}[shape]
    return pick(base) if stacked else [pick(base[layer]) for layer in range(base.shape[0])]


PT_CASES = [  # L, H, shape, stacked, reduction, normalize, student dtype, teacher dtype
    (1, 384, "cls", False, "mean", True, torch.float32, torch.float32),
    (5, 768, "tokens", False, "elementwise_mean", True, torch.bfloat16, torch.float32),
    (5, 1024, "flat", True, "sum", False, torch.float32, torch.float32),
    (5, 384, "cls", True, "mean", True, torch.bfloat16, torch.bfloat16),
    (1, 1024, "tokens", False, "sum", True, torch.float16, torch.float32),
    (5, 768, "cls", False, "elementwise_mean", False, torch.float32, torch.bfloat16),
]


@pytest.mark.parametrize("n_layers,hidden,shape,stacked,reduction,normalize,s_dtype,t_dtype", PT_CASES)
def test_patient_matches_reference(n_layers, hidden, shape, stacked, reduction, normalize, s_dtype, t_dtype):
    torch.manual_seed(n_layers * hidden)
    batch, seq = 6, 3
    s_base = torch.randn(n_layers, batch, seq, hidden, device=DEVICE)
    t_base = torch.randn(n_layers, batch, seq, hidden, device=DEVICE)
    t_base[0, 2] = 0.0  # a zero teacher row, a zero student row (its 1e12 gradient overflows fp16) ...
    if s_dtype != torch.float16:
        s_base[0, 1] = 0.0
    s_base[-1, 3], t_base[-1, 3] = 0.0, 0.0  # ... and a pair of zero rows
    s_base, t_base = s_base.to(s_dtype), t_base.to(t_dtype)
    teacher = _layers(t_base, shape, stacked)

    s64 = s_base.double().requires_grad_()
    ref = pt_ref64(_layers(s64, shape, stacked), teacher, normalize, reduction)
    ref.backward(torch.tensor(0.7, dtype=torch.float64, device=DEVICE))
    results = []
    for fn in (fused_patient_loss, patient_loss_reference):
        leaf = s_base.detach().clone().requires_grad_()
        loss = fn(_layers(leaf, shape, stacked), teacher, normalize, reduction)
        loss.backward(torch.tensor(0.7, device=DEVICE))
        results.append((loss.detach(), leaf.grad))
    (loss, grad), (eager_loss, eager_grad) = results
    assert loss.shape == () and loss.dtype == torch.float32 and grad.dtype == s_dtype
    check(loss, eager_loss, ref, s_dtype, "loss")
    rows = lambda g: g.reshape(-1, hidden)  # noqa: E731
    zero = rows(s_base).abs().amax(-1) == 0  # zero student vectors: 1e12-scale gradients, compared apart
    for part in (zero, ~zero):
        check(rows(grad)[part], rows(eager_grad)[part], rows(s64.grad)[part], s_dtype, "grad")


def test_patient_teacher_is_frozen_and_deterministic():
    torch.manual_seed(11)
    student = [torch.randn(32, 768, device=DEVICE, requires_grad=True) for _ in range(5)]
    teacher = [torch.randn(32, 768, device=DEVICE, requires_grad=True) for _ in range(5)]
    first = fused_patient_loss(student, teacher)
    first.backward()
    grads = [h.grad.clone() for h in student]
    for h in student:
        h.grad = None
    second = patient_loss(student, teacher, impl="triton")
    second.backward()
    assert torch.equal(first, second) and all(torch.equal(g, h.grad) for g, h in zip(grads, student))
    assert all(h.grad is None for h in teacher)


def test_patient_bad_arguments():
    h = [torch.randn(4, 8, device=DEVICE)]
    with pytest.raises(ValueError, match="reduction"):
        fused_patient_loss(h, h, reduction="avg")
    with pytest.raises(ValueError, match="layers"):
        fused_patient_loss(h * 2, h)
    with pytest.raises(ValueError, match="same non-empty"):
        fused_patient_loss(h, [torch.randn(4, 9, device=DEVICE)])
    with pytest.raises(ValueError, match="share a float dtype"):
        fused_patient_loss([h[0], h[0].half()], h * 2)
    with pytest.raises(ValueError, match="both"):
        fused_patient_loss(torch.stack(h), h)
    assert fused_patient_loss([], []).item() == 0.0


# --- gradients at the scales training uses -----------------------------------------------------------------
# A DeepSpeed step hands each loss term grad_output = loss scale (fp16: 2^16 and down) × its weight (β for
# the patient term) ÷ accumulation steps. In fp16 the gradient before that factor (1/N, α·T, 1/(N·L·H)
# folded in) can lie below the smallest subnormal where the scaled one, and the eager path's, does not.

LOSS_SCALES = (1.0, 2.0**8, 2.0**16)
BETAS = (1.0, 100.0, 1000.0)
ACCUM_STEPS = (1, 8, 64)
# fp32 and fp16: fp32 math, then one rounding to nearest (fp16's after the grad_output multiply). bf16 keeps
# its gradient in bf16 between forward and backward: two roundings, and Triton's interpreter truncates
# fp32 -> bf16 (each up to one ulp, 2^-7 of the value), so 2^-6 (a GPU rounds to nearest: 2^-7 at worst).
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-6, torch.float16: 2.0**-10}


def training_grad_outputs(row, beta):
    """Row `row` of two orthogonal 3×3 Latin squares: three loss scale × β ÷ accumulation steps factors,
    such that rows 0-2 together meet every pair of axis values once. Without `beta` (the KD term) β is 1."""
    for j, loss_scale in enumerate(LOSS_SCALES):
        weight = BETAS[(row + j) % 3] if beta else 1.0
        yield loss_scale * weight / ACCUM_STEPS[(row + 2 * j) % 3]


def check_training_grad(grad, eager, ref, what):
    """The fused `grad` against `ref` (the float64 spec) in grad's dtype, `eager` being the spec run in that
    dtype. Nothing eager keeps is flushed to zero (eager entries a margin above the smallest subnormal, so
    another fp32 rounding at the boundary can't trip it), and every entry is within the dtype's rounding,
    relative to the largest and elementwise (plus the smallest subnormal, and fp32 noise of 1e-6 of the
    largest: p_s - p_t cancels). The grad_outputs here keep every entry within fp16's range."""
    finfo, rtol = torch.finfo(grad.dtype), GRAD_RTOL[grad.dtype]
    subnormal = finfo.tiny * finfo.eps
    grad, eager, ref = grad.double(), eager.double(), ref.double()
    kept = eager.abs() >= 2 * subnormal
    flushed = kept & (grad == 0)
    assert not flushed.any(), f"{what}: {int(flushed.sum())} of the {int(kept.sum())} entries eager keeps are 0"
    assert ref.abs().max() < finfo.max, f"{what}: the spec overflows {finfo.dtype}; pick a smaller grad_output"
    assert grad.isfinite().all(), f"{what}: NaN or inf"
    err, largest = (grad - ref).abs(), ref.abs().max().item()
    worst = err.max().item()
    assert worst <= rtol * largest + subnormal, f"{what}: error {worst / largest:.3g} of the largest"
    bound = rtol * ref.abs() + subnormal + 1e-6 * largest
    assert (err <= bound).all(), f"{what}: {int((err > bound).sum())} entries off by more than {rtol:.3g}"


@pytest.mark.parametrize("row,dtype", enumerate(DTYPES))
def test_kd_grad_at_training_scale(row, dtype):
    """A vocabulary KD scaled down for the interpreter (V = 4096 for 30522, N = 64), T = 10, alpha = 0.5:
    under an fp16 loss scale a gradient stored in fp16 before the scaling flushes entries eager keeps."""
    torch.manual_seed(12)
    s, t, labels = kd_inputs(64, 4096, dtype, 0.5)
    for go in training_grad_outputs(row, beta=False):
        go = torch.tensor(go, device=DEVICE)
        s64 = s.detach().double().requires_grad_()
        kd_ref64(s64, t, 10.0, labels, 0.5).backward(go.double())
        _, grad = run_kd(fused_kd_loss, s, t, 10.0, labels, 0.5, "batchmean", go)
        _, eager = run_kd(kd_loss_reference, s, t, 10.0, labels, 0.5, "batchmean", go)
        check_training_grad(grad, eager, s64.grad, f"grad_output {go.item():g}")


@pytest.mark.parametrize(
    "row,dtype,shape", [(0, torch.float16, "cls"), (1, torch.bfloat16, "flat"), (2, torch.float32, "cls")]
)
def test_patient_grad_at_training_scale(row, dtype, shape):
    """The patient term as trained: 32 rows, 5 layers, H = 768, elementwise_mean, β·loss scale; the [CLS]
    rows are strided slices. In fp16 a gradient stored before the scaling is almost all zeros."""
    torch.manual_seed(13)
    t_base = torch.randn(5, 32 if shape == "cls" else 16, 2, 768, device=DEVICE)  # 32 rows a layer either way
    s_base = (t_base + 0.5 * torch.randn_like(t_base)).to(dtype)  # a student near its teacher, as in training
    t_base = t_base.to(dtype)
    teacher = _layers(t_base, shape, stacked=False)
    for go in training_grad_outputs(row, beta=True):
        go = torch.tensor(go, device=DEVICE)
        s64 = s_base.double().requires_grad_()
        pt_ref64(_layers(s64, shape, False), teacher, reduction="elementwise_mean").backward(go.double())
        grads = []
        for fn in (fused_patient_loss, patient_loss_reference):
            leaf = s_base.detach().clone().requires_grad_()
            fn(_layers(leaf, shape, False), teacher, reduction="elementwise_mean").backward(go)
            grads.append(leaf.grad)
        check_training_grad(*grads, s64.grad, f"grad_output {go.item():g}")


def test_one_launch_per_forward_and_backward(monkeypatch):
    """Forward is one kernel for the whole KD loss and one for all layer pairs; backward one scaling kernel."""
    launches = []

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launches.append(self.name)
            return self.kernel[grid]

    for module, name in ((kd_module, "_kd_fwd_kernel"), (kd_module, "_scale_kernel"), (pt_module, "_patient_fwd_kernel")):
        monkeypatch.setattr(module, name, Spy(name, getattr(module, name)))
    s, t, labels = kd_inputs(7, 30, torch.bfloat16, 0.5)
    loss = fused_kd_loss(s.requires_grad_(), t, 2.0, labels, 0.5)
    assert launches == ["_kd_fwd_kernel"]
    loss.backward()
    hidden = torch.randn(5, 4, 3, 8, device=DEVICE, requires_grad=True)
    loss = fused_patient_loss([h[:, 0] for h in hidden], [h[:, 0].detach() for h in hidden])
    assert launches == ["_kd_fwd_kernel", "_scale_kernel", "_patient_fwd_kernel"]
    loss.backward()
    assert launches[-1] == "_scale_kernel" and len(launches) == 4


def test_import_leaves_transformers_kernels_probe_alone(tmp_path):
    """pkd_fast.kernels must not register as the PyPI `kernels` package that transformers probes for."""
    probe = "import transformers.utils as u; print(u.is_kernels_available())"
    first = "import sys, pkd_fast, pkd_fast.kernels; assert 'kernels' not in sys.modules; "
    run = lambda code: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert run(first + probe) == run(probe)


def test_the_repository_root_does_not_shadow_the_pypi_kernels_package():
    """From the repository root (how the README runs pytest and the benchmarks) the folder kernels/ is on
    sys.path as a bare `kernels`; transformers >= 5.25 imports the PyPI package of that name while loading
    any model, which failed with `cannot import name 'CUDAProperties'` before the folder handed the name over."""
    root = Path(__file__).resolve().parents[1]
    code = ("import kernels, pkd_fast.kernels as ours; "
            "from transformers import AutoModelForSequenceClassification; "
            "print(kernels.__file__); print(ours.fused_kd_loss.__module__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    if "no `kernels` package is installed" in done.stderr:
        pytest.skip("the PyPI `kernels` package is not installed here")
    assert done.returncode == 0, done.stderr[-2000:]
    theirs, ours = done.stdout.split()
    assert not Path(theirs).resolve().is_relative_to(root) and ours == "pkd_fast.kernels.kd_loss"
