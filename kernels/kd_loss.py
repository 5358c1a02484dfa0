"""Fused KD loss: alpha·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1-alpha)·CE(s, labels), forward and backward.

One launch per forward reads each row of student and teacher logits, streams the softmax statistics over
column blocks (pass 1), then re-reads the row, which the L2 cache still holds, to write the gradient with
every scale folded in (pass 2). Backward only multiplies that gradient by grad_output, and skips even that
where grad_output is exactly 1, a test done on device so nothing syncs with the host.

The gradient is kept in the student dtype between forward and backward, except for fp16 students: there it
is kept in fp32 (see `grad_buffer_dtype`) and backward writes the fp16 gradient after the multiply, as the
eager path rounds to fp16 only after grad_output is applied.

The loss is reduced deterministically without float atomics: every program writes its partial sum and the
last program to finish (an integer atomic counts arrivals) adds the partials in a fixed order. The helpers
for that, and the grad_output scaling, are shared with `patient_loss`.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._common import check_kd_reduction

LN2 = tl.constexpr(math.log(2.0))
F32_MIN = tl.constexpr(-3.4028234663852886e38)
LOG2E = 1.0 / math.log(2.0)
MAX_BLOCK_V = 4096  # columns per block: one 16-byte vector of bf16 per thread and tensor at 16 warps
WARPS_PER_SM = 16  # KD programs resident per SM = this // num_warps: few rows in flight, so they stay in L2
SCALE_BLOCK = 4096


# ----------------------------------------------------------------------------------------------------------
# Shared by both losses: the deterministic final sum and the grad_output scaling.
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def finish_sum(partial_ptr, counter_ptr, out_ptr, partial, n_partials, BLOCK: tl.constexpr):
    """Publish this program's partial; the last program to arrive sums all partials in index order."""
    pid = tl.program_id(0)
    tl.store(partial_ptr + pid, partial)
    tl.debug_barrier()  # every thread's store precedes the release below
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if arrived == n_partials - 1:
        total = 0.0  # volatile loads below: the partials come from other SMs, never from this one's L1
        for start in range(0, n_partials, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            total += tl.sum(tl.load(partial_ptr + offs, mask=offs < n_partials, other=0.0, volatile=True), 0)
        tl.store(out_ptr, total)
        tl.store(counter_ptr, 0)  # ready for the next launch on this stream


# grad[r, c] *= go[r·go_stride]: go_stride is 0 for a scalar grad_output. Tiles whose factor is exactly 1
# are skipped, so the common unscaled backward reads a scalar and touches no gradient memory.
@triton.jit
def _scale_kernel(g_ptr, go_ptr, n_rows, n_cols, g_stride, go_stride, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    tiles_per_row = tl.cdiv(n_cols, BLOCK)
    if (go_stride != 0) | (tl.load(go_ptr).to(tl.float32) != 1.0):
        for tile in range(pid, n_rows * tiles_per_row, tl.num_programs(0)):
            row = tile // tiles_per_row
            go = tl.load(go_ptr + row * go_stride).to(tl.float32)
            if go != 1.0:
                cols = tl.cast(tile % tiles_per_row, tl.int64) * BLOCK + tl.arange(0, BLOCK)
                ptrs = g_ptr + tl.cast(row, tl.int64) * g_stride + cols
                g = tl.load(ptrs, mask=cols < n_cols, other=0.0)
                tl.store(ptrs, (g.to(tl.float32) * go).to(g_ptr.dtype.element_ty), mask=cols < n_cols)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def max_programs(device: torch.device, num_warps: int, warps_per_sm: int = WARPS_PER_SM) -> int:
    """Size of a persistent grid: `warps_per_sm` warps of programs on every SM. The CPU interpreter runs
    programs one after another, so there a few suffice (and still exercise the cross-program sum)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device) * max(1, warps_per_sm // num_warps)


_COUNTERS: dict[tuple, torch.Tensor] = {}


def arrival_counter(device: torch.device) -> torch.Tensor:
    """A zeroed int32 the reduction's last program resets, one per stream so concurrent launches don't share it."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros((), dtype=torch.int32, device=device)
    return _COUNTERS[key]


def grad_buffer_dtype(student_dtype: torch.dtype) -> torch.dtype:
    """The dtype forward keeps the student gradient in until backward multiplies it by grad_output.

    fp16 gets fp32: with the reduction's 1/count and the loss weights folded in, but not yet grad_output
    (an fp16 run's loss scale, up to 2^16, times β and ÷ accumulation steps), entries that the scaled
    gradient keeps lie below fp16's smallest subnormal (6e-8) and would be flushed to zero. bf16 and fp32
    have fp32's exponent range and keep the student dtype: no extra memory.
    """
    return torch.float32 if student_dtype == torch.float16 else student_dtype


def scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """grad *= grad_output in place, grad_output a scalar or one factor per row of the 2-D `grad`. An empty
    gradient (no rows) launches nothing: the kernel would read a per-row grad_output that has no element."""
    if grad.numel() == 0:
        return grad
    per_row = grad_output.dim() > 0
    if per_row:
        n_rows, n_cols, g_stride, go_stride = grad.shape[0], grad.shape[1], grad.stride(0), grad_output.stride(0)
    elif grad.is_contiguous():
        n_rows, n_cols, g_stride, go_stride = 1, grad.numel(), 0, 0
    else:
        n_rows, n_cols, g_stride, go_stride = grad.shape[0], grad.shape[1], grad.stride(0), 0
    n_tiles = n_rows * triton.cdiv(n_cols, SCALE_BLOCK)
    grid = (max(1, min(n_tiles, max_programs(grad.device, 8, warps_per_sm=64))),)
    _scale_kernel[grid](grad, grad_output, n_rows, n_cols, g_stride, go_stride, BLOCK=SCALE_BLOCK, num_warps=8)
    return grad


# ----------------------------------------------------------------------------------------------------------
# KD loss.
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _lane_lse_step(m, d, x, scale):
    """Per-lane streaming log-sum-exp of x·scale in base 2, kept as the lane's max m of x (raw units) and
    d = Σ 2^((x - m)·scale): one exp2 per element and no cross-lane reduction inside the column loop.
    Also returns that exp2 and whether x raised the max."""
    grew = x > m
    e = tl.exp2(-tl.abs(x - m) * scale)  # 2^((m - x)·scale) if x is the new max, else 2^((x - m)·scale)
    return tl.maximum(m, x), tl.where(grew, d * e + 1.0, d + e), e, grew


@triton.jit
def _merge_lanes(m, d, scale):
    """The row's (max, sum) from the per-lane ones, and the factor that rescales each lane's sums."""
    m_row = tl.max(m, 0)
    w = tl.exp2((m - m_row) * scale)
    return m_row, tl.sum(d * w, 0), w


@triton.jit
def _kd_stats_block(
    m_s, d_s, m_t, d_t, acc, d_c, s_row, t_row, idx, lo, hi, tau, tau_ce,
    HAS_KL: tl.constexpr, CE_OWN_STATS: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Pass 1 over one block: per-lane streaming statistics (see the math above `_kd_fwd_kernel`).
    Only the first and last block of a row are MASKED; interior ones compile to aligned vector loads."""
    mask = (idx >= lo) & (idx < hi) if MASKED else None
    other = float("-inf") if MASKED else None
    s = tl.load(s_row + idx, mask=mask, other=other, eviction_policy="evict_last").to(tl.float32)  # pass 2 rereads
    if CE_OWN_STATS:  # the same lane max as the KL's, another scale
        e_c = tl.exp2(-tl.abs(s - m_s) * tau_ce)
        d_c = tl.where(s > m_s, d_c * e_c + 1.0, d_c + e_c)
    m_s, d_s, _, _ = _lane_lse_step(m_s, d_s, s, tau)
    if HAS_KL:
        t = tl.load(t_row + idx, mask=mask, other=other, eviction_policy="evict_last").to(tl.float32)
        m_t, d_t, e_t, grew = _lane_lse_step(m_t, d_t, t, tau)
        diff = t - s
        acc = tl.where(grew, acc * e_t + diff, acc + tl.where(e_t > 0, e_t * diff, 0.0))  # e_t = 0: t = -inf
    return m_s, d_s, m_t, d_t, acc, d_c


@triton.jit
def _kd_grad_block(
    s_row, t_row, g_row, idx, lo, hi, y_idx, m_s, ld_s, m_t, ld_t, ld_c, g_kl, g_ce, tau, tau_ce,
    HAS_KL: tl.constexpr, HAS_CE: tl.constexpr, CE_OWN_STATS: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Pass 2 over one block: the gradient, written in g_row's dtype (`grad_buffer_dtype`)."""
    mask = (idx >= lo) & (idx < hi) if MASKED else None
    other = 0.0 if MASKED else None
    s = tl.load(s_row + idx, mask=mask, other=other, eviction_policy="evict_first").to(tl.float32)
    p_s = tl.exp2((s - m_s) * tau - ld_s)
    g = tl.zeros_like(s)
    if HAS_KL:
        t = tl.load(t_row + idx, mask=mask, other=other, eviction_policy="evict_first").to(tl.float32)
        g = g_kl * (p_s - tl.exp2((t - m_t) * tau - ld_t))
    if HAS_CE:
        if CE_OWN_STATS:
            p_s = tl.exp2((s - m_s) * tau_ce - ld_c)
        g += g_ce * (p_s - tl.where(idx == y_idx, 1.0, 0.0))
    tl.store(g_row + idx, g.to(g_row.dtype.element_ty), mask=mask, eviction_policy="evict_first")


# Per row, streamed over column blocks in base 2, kept per lane and merged at the row's end:
#   m_s = max s,  d_s = Σ 2^((s - m_s)·τ),  d_c = Σ 2^((s - m_s)·τ_c);  m_t, d_t as m_s, d_s for t
#   acc = Σ 2^((t - m_t)·τ)·(t - s),   τ = log2(e)/T,  τ_c = log2(e)
#   KL = ln2·[ (acc/d_t - (m_t - m_s))·τ + log2(d_s/d_t) ]     CE = ln2·[ (m_s - s_y)·τ_c + log2 d_c ]
#   loss_row = kl_weight·KL + ce_weight·CE,   kl_weight = α·T²·r,  ce_weight = (1-α)·r_ce  (0 if y ignored)
#   ∂loss/∂s = kl_weight/T·(p_s - p_t) + ce_weight·(softmax(s) - onehot(y)),  p_s = 2^((s - m_s)·τ - log2 d_s)
# r is 1/N (batchmean), 1/(N·V) (mean) or 1 (sum: then divided by the KL divisor if given); r_ce is
# 1/#valid labels for batchmean and mean, else 1 (or 1/the CE divisor). N = 0 launches one program that
# writes a loss of 0 (and no gradient rows).
# Exponents are formed from differences of raw logits, exact near the max, so large logits keep fp32
# accuracy, and s == t gives exactly 0 loss and gradient. Without a KL term τ = τ_c, and whenever
# τ = τ_c the CE reuses d_s (CE_OWN_STATS off). A teacher row that is all -inf has no distribution: it
# adds no KL and no KL gradient. Blocks index idx = head + column, where head puts the row start's 16-byte
# boundary at idx = 0, so every interior block is aligned and needs no mask.
@triton.jit
def _kd_fwd_kernel(
    s_ptr, t_ptr, y_ptr, g_ptr, loss_ptr, partial_ptr, counter_ptr, div_ptr,
    n_rows, n_cols, s_stride, t_stride, g_stride,
    kl_weight, kl_grad, ce_weight, tau, tau_ce, ignore_index,
    HAS_KL: tl.constexpr, HAS_CE: tl.constexpr, CE_MEAN: tl.constexpr, CE_OWN_STATS: tl.constexpr,
    PER_ROW: tl.constexpr, WRITE_GRAD: tl.constexpr, HAS_DIVISORS: tl.constexpr, VEC: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    if HAS_DIVISORS:  # [CE divisor, KL divisor] read on device: the caller's count never syncs with the host
        ce_weight = ce_weight / tl.load(div_ptr).to(tl.float32)
        kl_divisor = tl.load(div_ptr + 1).to(tl.float32)
        kl_weight = kl_weight / kl_divisor
        kl_grad = kl_grad / kl_divisor
    if HAS_CE and CE_MEAN:  # every program counts the valid labels itself: no extra launch, no host sync
        n_valid = 0
        for first in range(0, n_rows, BLOCK_N):
            offs = first + tl.arange(0, BLOCK_N)
            y_blk = tl.load(y_ptr + offs, mask=offs < n_rows, other=ignore_index)
            n_valid += tl.sum((y_blk != ignore_index).to(tl.int32), 0)
        ce_weight = ce_weight / tl.maximum(n_valid, 1).to(tl.float32)
    acc_loss = 0.0
    for row in range(pid, n_rows, tl.num_programs(0)):
        row64 = tl.cast(row, tl.int64)
        head = (row64 * s_stride) % VEC  # the same for t and g: the host checks their strides agree mod VEC
        s_row = s_ptr + tl.multiple_of(row64 * s_stride - head, VEC)
        t_row = t_ptr + tl.multiple_of(row64 * t_stride - head, VEC)
        n_idx = head + n_cols
        m_s = tl.full((BLOCK_V,), F32_MIN, tl.float32)  # per-lane state; F32_MIN, not -inf: no inf - inf
        d_s = tl.zeros((BLOCK_V,), tl.float32)
        m_t, d_t, acc, d_c = m_s, d_s, d_s, d_s
        for start in range(0, n_idx, BLOCK_V):
            idx = start + tl.arange(0, BLOCK_V)
            if (start > 0) & (start + BLOCK_V <= n_idx):
                m_s, d_s, m_t, d_t, acc, d_c = _kd_stats_block(
                    m_s, d_s, m_t, d_t, acc, d_c, s_row, t_row, idx, head, n_idx, tau, tau_ce,
                    HAS_KL, CE_OWN_STATS, MASKED=False,
                )  # fmt: skip
            else:
                m_s, d_s, m_t, d_t, acc, d_c = _kd_stats_block(
                    m_s, d_s, m_t, d_t, acc, d_c, s_row, t_row, idx, head, n_idx, tau, tau_ce,
                    HAS_KL, CE_OWN_STATS, MASKED=True,
                )  # fmt: skip
        if CE_OWN_STATS:
            d_c = tl.sum(d_c * tl.exp2((m_s - tl.max(m_s, 0)) * tau_ce), 0)
        m_s, d_s, _ = _merge_lanes(m_s, d_s, tau)
        ld_s = tl.log2(d_s)
        row_bits = 0.0  # the row's loss in bits: one multiply by ln 2 below, and no ce_weight·ln 2 held in a register
        ld_t = 0.0
        g_kl = 0.0
        if HAS_KL:
            m_t, d_t, w_t = _merge_lanes(m_t, d_t, tau)
            has_t = d_t > 0
            m_t = tl.where(has_t, m_t, float("inf"))  # then every p_t is 0 instead of NaN ...
            d_t = tl.where(has_t, d_t, 1.0)
            kl = (tl.sum(acc * w_t, 0) / d_t - (m_t - m_s)) * tau + tl.log2(d_s / d_t)
            row_bits += tl.where(has_t, kl_weight * kl, 0.0)  # ... and the row adds nothing
            ld_t = tl.log2(d_t)
            g_kl = tl.where(has_t, kl_grad, 0.0)
        y_idx = head - 1
        ld_c = ld_s
        g_ce = 0.0
        if HAS_CE:
            y = tl.load(y_ptr + row)
            valid = y != ignore_index
            y_idx = head + y
            s_y = tl.load(s_row + y_idx, mask=valid & (y >= 0) & (y < n_cols), other=0.0).to(tl.float32)
            if CE_OWN_STATS:
                ld_c = tl.log2(d_c)
            g_ce = tl.where(valid, ce_weight, 0.0)
            row_bits += tl.where(valid, ce_weight * ((m_s - s_y) * tau_ce + ld_c), 0.0)
        row_loss = LN2 * row_bits
        if PER_ROW:
            tl.store(loss_ptr + row, row_loss)
        else:
            acc_loss += row_loss
        if WRITE_GRAD:
            g_row = g_ptr + tl.multiple_of(row64 * g_stride - head, VEC)
            for start in range(0, n_idx, BLOCK_V):
                idx = start + tl.arange(0, BLOCK_V)
                if (start > 0) & (start + BLOCK_V <= n_idx):
                    _kd_grad_block(
                        s_row, t_row, g_row, idx, head, n_idx, y_idx, m_s, ld_s, m_t, ld_t, ld_c, g_kl, g_ce,
                        tau, tau_ce, HAS_KL, HAS_CE, CE_OWN_STATS, MASKED=False,
                    )  # fmt: skip
                else:
                    _kd_grad_block(
                        s_row, t_row, g_row, idx, head, n_idx, y_idx, m_s, ld_s, m_t, ld_t, ld_c, g_kl, g_ce,
                        tau, tau_ce, HAS_KL, HAS_CE, CE_OWN_STATS, MASKED=True,
                    )  # fmt: skip
    if not PER_ROW:
        finish_sum(partial_ptr, counter_ptr, loss_ptr, acc_loss, tl.num_programs(0), BLOCK=1024)


def _vector_width(*tensors: torch.Tensor) -> int:
    """Elements per 16-byte vector of the narrowest dtype if all rows share their alignment (base pointers
    on 16 bytes, row strides equal mod the width; a wider tensor, such as an fp16 student's fp32 gradient,
    is then aligned on a multiple of 16 bytes), else 1: then every load is scalar but still correct."""
    vec = max(1, 16 // min(x.element_size() for x in tensors))
    aligned = all(x.data_ptr() % 16 == 0 for x in tensors)
    return vec if aligned and len({x.stride(0) % vec for x in tensors}) == 1 else 1


def kd_blocks(n_cols: int, vec: int) -> tuple[int, int]:
    """BLOCK_V and num_warps of `_kd_fwd_kernel` for rows of `n_cols` read `vec` elements at a time; one
    function, so that benchmarks/aot_compile.py compiles exactly the blocks the launcher can pick."""
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(n_cols + vec - 1))  # ≥ vec: a head fits the first block
    if vec == 1:  # scalar loads need an address per element: half the elements per thread, or sm_80 spills
        return min(block_v, MAX_BLOCK_V // 2), max(1, min(16, block_v // 128))
    return block_v, max(1, min(16, block_v // 256))


def _kd_forward(s, t, labels, temperature, alpha, ignore_index, reduction, divisors, write_grad, inplace):
    """The loss and, with `write_grad`, the scaled-down student gradient: over the logits when `inplace`
    and the student dtype holds it (`grad_buffer_dtype`), else in a new buffer."""
    n_rows, n_cols = s.shape
    has_kl, has_ce, per_row = alpha != 0.0, alpha != 1.0, reduction == "none"
    r = {"batchmean": 1.0 / max(n_rows, 1), "mean": 1.0 / max(n_rows * n_cols, 1)}.get(reduction, 1.0)
    grad = None
    if write_grad:
        grad_dtype = grad_buffer_dtype(s.dtype)
        in_logits = inplace and grad_dtype == s.dtype
        grad = s.detach() if in_logits else torch.empty((n_rows, n_cols), dtype=grad_dtype, device=s.device)
    t, y, g = (t if has_kl else s), (labels if has_ce else s), (grad if write_grad else s)  # s: unused stand-in
    tau = LOG2E / temperature if has_kl else LOG2E  # student statistics at the KL's scale, else the CE's
    vec = _vector_width(s, t, g)
    block_v, num_warps = kd_blocks(n_cols, vec)
    n_prog = max(1, min(n_rows, max_programs(s.device, num_warps)))
    loss = torch.empty((n_rows,) if per_row else (), dtype=torch.float32, device=s.device)
    partials = loss if per_row else torch.empty(n_prog, dtype=torch.float32, device=s.device)
    counter = loss if per_row else arrival_counter(s.device)
    _kd_fwd_kernel[(n_prog,)](
        s, t, y, g, loss, partials, counter, s if divisors is None else divisors,
        n_rows, n_cols, s.stride(0), t.stride(0), g.stride(0),
        alpha * temperature**2 * r, alpha * temperature * r, 1.0 - alpha, tau, LOG2E, ignore_index,
        HAS_KL=has_kl, HAS_CE=has_ce, CE_MEAN=has_ce and reduction in ("batchmean", "mean"),
        CE_OWN_STATS=has_ce and tau != LOG2E, PER_ROW=per_row, WRITE_GRAD=write_grad,
        HAS_DIVISORS=divisors is not None, VEC=vec, BLOCK_V=block_v, BLOCK_N=1024, num_warps=num_warps,
    )  # fmt: skip
    return loss, grad


def take_scaled_grad(
    ctx, name: str, grad_output: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The gradient forward stored in `ctx.grad`, times grad_output, in the student `dtype`; handed over once.

    Stored in `dtype`, it is scaled in place, not copied. Stored in fp32 for an fp16 student, it is
    multiplied in fp32 and rounded to fp16 once, into `out` or a new tensor, and the fp32 buffer is freed.
    grad_output is a scalar or, for a 2-D gradient, one factor per row; it stays on device.
    """
    if ctx.grad is None:
        raise RuntimeError(f"{name}: backward ran twice; its stored gradient is consumed by the first")
    grad, ctx.grad = ctx.grad, None
    if grad.dtype == dtype:
        return scale_grad_(grad, grad_output)
    factor = grad_output[:, None] if grad_output.dim() else grad_output
    return torch.mul(grad, factor, out=torch.empty_like(grad, dtype=dtype) if out is None else out)


class FusedKDLoss(torch.autograd.Function):
    """Loss in forward, gradient w.r.t. the student logits also in forward; backward scales it."""

    @staticmethod
    def forward(ctx, s, t, labels, temperature, alpha, ignore_index, reduction, divisors, write_grad, inplace):
        loss, ctx.grad = _kd_forward(s, t, labels, temperature, alpha, ignore_index, reduction, divisors, write_grad, inplace)
        ctx.dtype = s.dtype
        ctx.out = s.detach() if inplace and ctx.grad is not None and ctx.grad.dtype != s.dtype else None
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        out, ctx.out = ctx.out, None
        grad = take_scaled_grad(ctx, "fused_kd_loss", grad_output, ctx.dtype, out)
        return grad, None, None, None, None, None, None, None, None, None


def fused_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    temperature: float,
    labels: torch.Tensor | None = None,
    alpha: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    divisors: torch.Tensor | None = None,
    *,
    inplace: bool = False,
) -> torch.Tensor:
    """`pkd_fast.losses.kd_loss_reference` in one kernel launch, differentiable w.r.t. the student logits.

    The teacher is a constant (it gets no gradient); labels must lie in [0, V) or equal `ignore_index`
    (on CUDA this is asserted on device, so a bad label surfaces at a later sync, as in the eager path).
    With `inplace=True` the gradient is written over the student logits, saving the one [N, V] buffer:
    only for callers that never read those logits again. fp16 logits can't hold the gradient before
    grad_output lifts it (`grad_buffer_dtype`): there forward keeps it in a separate fp32 buffer, leaving
    the logits intact, and backward writes the final fp16 gradient over the logits.
    """
    check_kd_reduction(reduction, divisors)
    if student_logits.dim() != 2 or student_logits.shape[1] == 0:
        raise ValueError(f"student_logits must be an [N, V] tensor with V > 0, got shape {tuple(student_logits.shape)}")
    if divisors is not None:
        if divisors.shape != (2,) or divisors.device != student_logits.device:
            raise ValueError(f"divisors must be a [2] tensor on the logits' device, got {tuple(divisors.shape)} on {divisors.device}")
        divisors = divisors.float().contiguous()
    alpha, temperature = float(alpha), float(temperature)
    if not 0.0 < temperature < math.inf:
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    n_rows, device = student_logits.shape[0], student_logits.device
    if alpha != 0.0:
        if teacher_logits is None or teacher_logits.shape != student_logits.shape:
            got = None if teacher_logits is None else tuple(teacher_logits.shape)
            raise ValueError(f"teacher_logits must match student_logits {tuple(student_logits.shape)}, got {got}")
        teacher_logits = _unit_column_stride(teacher_logits)
    if alpha != 1.0:
        if labels is None:
            raise ValueError("labels are required when alpha < 1 (the CE term has weight 1 - alpha)")
        if labels.shape != (n_rows,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            got = f"{labels.dtype} {tuple(labels.shape)}"
            raise ValueError(f"labels must be integer class ids of shape ({n_rows},), got {got}")
        labels = labels.contiguous()
        _check_label_range(labels, student_logits.shape[1], int(ignore_index))
    if any(x is not None and x.device != device for x in (teacher_logits, labels)):
        raise ValueError("student logits, teacher logits and labels must be on the same device")
    if inplace and student_logits.stride(1) != 1:
        raise ValueError("inplace=True needs student logits with unit column stride")
    write_grad = student_logits.requires_grad and torch.is_grad_enabled()
    return FusedKDLoss.apply(
        _unit_column_stride(student_logits), teacher_logits, labels, temperature, alpha, int(ignore_index), reduction,
        divisors, write_grad, inplace,
    )  # fmt: skip


def _check_label_range(labels: torch.Tensor, n_cols: int, ignore_index: int) -> None:
    """Refuse labels outside [0, V) other than `ignore_index`, as the eager path's gather does. On CUDA the
    check is an asynchronous device assert, so the step never waits on the host; elsewhere it raises here."""
    bad = ((labels < 0) | (labels >= n_cols)) & (labels != ignore_index)
    message = f"labels must lie in [0, {n_cols}) or equal ignore_index={ignore_index}"
    if labels.device.type == "cuda":
        torch._assert_async(~bad.any(), message)
    elif bad.any():
        raise ValueError(f"{message}, got {labels[bad][0].item()}")


def _unit_column_stride(x: torch.Tensor) -> torch.Tensor:
    """Rows may be strided (a slice of a bigger tensor); columns must be contiguous."""
    return x if x.stride(1) == 1 or x.shape[1] == 1 else x.contiguous()
