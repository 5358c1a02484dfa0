"""The fused MiniLMv2 relation loss against the float64 spec `pkd_fast.losses.relation_loss_reference`.

Under Triton's CPU interpreter every program runs one after another, so the shapes are tiny (T ≤ 40,
B ≤ 2, R ≤ 4) but chosen to cross the interpreter's 16-row blocks, end mid-block, and hold every kind of
padding. Outputs are allocated NaN-filled (the `poison` fixture of test_kernels), so a gradient row the
kernel fails to write shows up.
"""

import pytest
import torch
from test_kernels import DEVICE, GRAD_RTOL, check, poison, rel_err, training_grad_outputs  # noqa: F401

from pkd_fast.kernels import fused_relation_loss
from pkd_fast.kernels import relation_loss as rel_module
from pkd_fast import losses
from pkd_fast.losses import relation_loss, relation_loss_reference

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]


def qkv_inputs(batch, seq_len, hidden_s, hidden_t, lengths, dtype, seed=0):
    """Student and teacher [3, B, T, H] stacks (a student near its teacher where the widths match) and a
    mask whose sequence b has lengths[b] real tokens."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(3, batch, seq_len, hidden_t, generator=gen) * 1.5
    s = torch.randn(3, batch, seq_len, hidden_s, generator=gen) * 1.5
    if hidden_s == hidden_t:
        s = t + 0.7 * s
    mask = (torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]).long()
    return s.to(DEVICE, dtype), t.to(DEVICE, dtype), mask.to(DEVICE)


def run(fn, s, t, mask, n_heads, go=None):
    """Loss and student gradient of `fn` on a fresh leaf over the student stack."""
    leaf = s.detach().clone().requires_grad_()
    loss = fn(leaf, t, mask, n_heads)
    loss.backward(go)
    return loss.detach(), leaf.grad


def ref64(s, t, mask, n_heads, go=None):
    return run(relation_loss_reference, s.double(), t.double(), mask, n_heads, None if go is None else go.double())


# (B, T, H student, H teacher, R, real lengths, dtype): T = 37 and 17 end mid-block, T = 1 is one token,
# a zero length is an all-padding sequence; widths differ, and head sizes 3 and 6 are not powers of two.
CASES = [
    (2, 37, 8, 12, 2, (37, 20), torch.float32),
    (1, 1, 4, 4, 1, (1,), torch.float32),
    (2, 9, 16, 8, 4, (9, 0), torch.bfloat16),
    (2, 17, 12, 24, 4, (5, 17), torch.float16),
    (2, 33, 8, 8, 2, (33, 31), torch.float32),
]


@pytest.mark.parametrize("batch,seq_len,hidden_s,hidden_t,n_heads,lengths,dtype", CASES)
def test_relation_matches_reference(batch, seq_len, hidden_s, hidden_t, n_heads, lengths, dtype):
    s, t, mask = qkv_inputs(batch, seq_len, hidden_s, hidden_t, lengths, dtype)
    loss_ref, grad_ref = ref64(s, t, mask, n_heads)
    loss, grad = run(fused_relation_loss, s, t, mask, n_heads)
    loss_eager, grad_eager = run(relation_loss_reference, s, t, mask, n_heads)
    check(loss, loss_eager, loss_ref, dtype, "loss")
    check(grad, grad_eager, grad_ref, dtype, "grad")
    padded = mask == 0
    assert (grad[:, padded] == 0).all(), "a padded token got a gradient"


def test_relation_equal_inputs_and_empty_batch():
    """Student = teacher gives 0 and a zero gradient; a batch with no real token gives exactly 0."""
    s, _, mask = qkv_inputs(2, 9, 8, 8, (9, 4), torch.float32)
    loss, grad = run(fused_relation_loss, s, s, mask, 2)
    assert abs(loss.item()) < 1e-6 and grad.abs().max().item() < 1e-6
    loss, grad = run(fused_relation_loss, s, s * 2, torch.zeros_like(mask), 2)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_relation_reads_fused_qkv_views_in_place():
    """Q, K, V as column slices of one fused QKV projection [B, T, 3H] (strided, not stacked) and as a tuple
    of separate tensors give the stack's loss and gradient; the teacher gets none; runs are bitwise equal."""
    s, t, mask = qkv_inputs(2, 18, 8, 12, (18, 11), torch.float32, seed=3)
    _, grad_ref = ref64(s, t, mask, 2)
    fused = s.permute(1, 2, 0, 3).reshape(2, 18, 3 * 8).detach().requires_grad_()  # [B, T, (q|k|v)·H]
    teacher = tuple(x.clone().requires_grad_() for x in t)
    loss = fused_relation_loss(fused.split(8, dim=-1), teacher, mask, 2)
    loss.backward()
    grad = fused.grad.view(2, 18, 3, 8).permute(2, 0, 1, 3)
    assert rel_err(grad, grad_ref) < 1e-5
    assert all(x.grad is None for x in teacher)
    again = fused_relation_loss(fused.split(8, dim=-1), teacher, mask, 2)
    assert torch.equal(loss, again)


def test_relation_keeps_no_quadratic_state():
    """What forward saves for backward is the inputs and O(B·R·T) statistics, never a T×T relation."""
    s, t, mask = qkv_inputs(1, 40, 4, 4, (40,), torch.float32)
    loss = fused_relation_loss(s.clone().requires_grad_().unbind(0), t.unbind(0), mask, 1)
    saved = loss.grad_fn.saved_tensors
    assert max(x.numel() for x in saved) < 40 * 40
    assert sum(x.numel() for x in saved) <= 6 * 40 * 4 + 4 * 3 * 40 + 40 + 1


# The gradient Σ_j G_kj x_j + Σ_i G_ik x_i sums terms of both signs (each row of G sums to 0), so its small
# entries carry fp32 rounding of the large ones: measured at 1.3e-5 (eager in fp32) and 1.9e-5 (fused) of
# the largest entry on the inputs below, a few percent of the smallest. Hence a bound of 1e-4 of the
# largest, beside the dtype's own rounding (GRAD_RTOL), in place of test_kernels' 1e-6.
SUM_NOISE = 1e-4


def check_scaled_grad(grad, eager, ref, what):
    """Nothing eager keeps (a margin above the smallest subnormal) is flushed to zero, and every entry is
    within the dtype's rounding of the float64 spec plus the summation noise above."""
    finfo, rtol = torch.finfo(grad.dtype), GRAD_RTOL[grad.dtype]
    subnormal = finfo.tiny * finfo.eps
    grad, eager, ref = grad.double(), eager.double(), ref.double()
    flushed = (eager.abs() >= 2 * subnormal) & (grad == 0)
    assert not flushed.any(), f"{what}: {int(flushed.sum())} entries eager keeps are 0"
    assert grad.isfinite().all() and ref.abs().max() < finfo.max, f"{what}: NaN, inf or overflow"
    bound = rtol * ref.abs() + subnormal + SUM_NOISE * ref.abs().max()
    assert ((grad - ref).abs() <= bound).all(), f"{what}: {int(((grad - ref).abs() > bound).sum())} entries off"


@pytest.mark.parametrize("row,dtype", [(0, torch.float16), (1, torch.bfloat16), (2, torch.float16)])
def test_relation_grad_at_training_scale(row, dtype):
    """The student near its teacher (late in training: p_s − p_t small), grad_output = loss scale × weight
    ÷ accumulation steps. Before grad_output many entries lie below fp16's smallest subnormal; the kernel
    multiplies by grad_output before its one rounding, so nothing eager keeps is flushed."""
    s, t, mask = qkv_inputs(2, 24, 16, 16, (24, 13), dtype, seed=5)
    s = (t.float() + 0.003 * (s.float() - t.float())).to(dtype)
    leaves = {name: s.detach().clone().requires_grad_() for name in ("fused", "eager")}
    leaves["ref"] = s.double().requires_grad_()
    losses = {
        "ref": relation_loss_reference(leaves["ref"], t.double(), mask, 4),
        "fused": fused_relation_loss(leaves["fused"], t, mask, 4),
        "eager": relation_loss_reference(leaves["eager"], t, mask, 4),
    }
    losses["ref"].backward(retain_graph=True)
    unscaled = leaves["ref"].grad
    fp16_subnormal = torch.finfo(torch.float16).tiny * torch.finfo(torch.float16).eps
    assert ((unscaled != 0) & (unscaled.abs() < fp16_subnormal)).any(), "the test would not catch an early rounding"
    for go in training_grad_outputs(row, beta=True):  # one forward; backward recomputes for each factor
        for leaf in leaves.values():
            leaf.grad = None
        for loss in losses.values():
            loss.backward(torch.tensor(go, dtype=loss.dtype, device=DEVICE), retain_graph=True)
        check_scaled_grad(leaves["fused"].grad, leaves["eager"].grad, leaves["ref"].grad, f"grad_output {go:g}")


@pytest.mark.parametrize("impl", ["eager", "triton", "compile"])
def test_relation_dispatch(impl, monkeypatch):
    """`relation_loss(impl=...)` computes the spec with each implementation. compile hands the spec to
    `losses._compiled` (shared with kd_loss and patient_loss, whose tests compile for real); compiling
    this one, forward and backward, took 70-90 s on a busy 2-core machine, so the test stands in torch's
    eager backend for inductor."""
    if impl == "compile":
        compiled = []
        monkeypatch.setattr(losses, "_compiled", lambda fn: compiled.append(fn) or torch.compile(fn, backend="eager"))
    s, t, mask = qkv_inputs(2, 6, 8, 4, (6, 3), torch.float32, seed=7)
    loss_ref, grad_ref = ref64(s, t, mask, 2)
    loss, grad = run(lambda *a: relation_loss(*a, impl=impl), s, t, mask, 2)
    if impl == "compile":
        assert compiled == [relation_loss_reference]
    assert rel_err(loss, loss_ref) < 1e-5 and rel_err(grad, grad_ref) < 1e-5


def test_relation_bad_arguments():
    s, t, mask = qkv_inputs(2, 5, 8, 12, (5, 5), torch.float32)
    with pytest.raises(ValueError, match="do not divide"):
        fused_relation_loss(s, t, mask, 3)
    with pytest.raises(ValueError, match=r"\(q, k, v\)"):
        fused_relation_loss(s[:2], t, mask, 2)
    with pytest.raises(ValueError, match="share"):
        fused_relation_loss(s, t, mask[:, :4], 2)
    with pytest.raises(ValueError, match="one hidden size"):
        fused_relation_loss((s[0], s[1], s[2, ..., :4]), t, mask, 2)
    with pytest.raises(ValueError, match="exceeds"):
        fused_relation_loss(torch.zeros(3, 1, 2, 2 * 512), torch.zeros(3, 1, 2, 2 * 512), mask[:1, :2], 2)
    with pytest.raises(ValueError, match="do not divide"):
        relation_loss_reference(s, t, mask, 3)


def test_relation_launch_configs_cover_the_launcher():
    """`aot_configs()` (what AOT compile tests read) holds, for both kernels, every block shape and warp
    count the launcher picks on CUDA, and at equal head sizes its exact configuration; the head size is
    padded to what tl.dot accepts."""
    listed = rel_module.aot_configs()
    shapes = {(c["kernel"], c["BLOCK_M"], c["BLOCK_N"], c["num_warps"]) for c in listed}
    exact = [{k: v for k, v in c.items() if k not in ("kernel", "DOT_FP32")} for c in listed]
    for head_s in (1, 8, 16, 24, 64, 100, 256):
        for head_t in (8, 64, 128, head_s):
            c = rel_module.launch_config(head_s, head_t, "cuda")
            assert c["BLOCK_DS"] >= max(16, head_s) and c["BLOCK_DT"] >= max(16, head_t)
            for kernel in (rel_module._relation_fwd_kernel, rel_module._relation_bwd_kernel):
                assert (kernel, c["BLOCK_M"], c["BLOCK_N"], c["num_warps"]) in shapes
            if c["BLOCK_DS"] == c["BLOCK_DT"]:
                assert c in exact
