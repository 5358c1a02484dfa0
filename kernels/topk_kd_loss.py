"""Fused sparse KD loss: the teacher as its top-k logits, no [N, V] teacher row anywhere.

`pkd_fast.losses.topk_kd_loss_reference` is the specification (the k + 1 outcome KL, the lse-at-T
contract, the reductions). One launch per forward; per row:

  1. load the k teacher ids and logits, gather the k student logits at those ids, and mark the ids in
     this program's row of an int8 scratch mask (O(k) stores; cleared again at the row's end, so the
     scratch stays zero between launches and costs one memset when allocated);
  2. stream the student row once for three per-lane log-sum-exps: over all columns at 1/T (the student
     lse), over the unmarked columns at 1/T (the rest bucket: an lse of its own, never 1 - Σ q), and,
     when T ≠ 1 and there is a CE term, over all columns at 1 (reusing the first one's lane max);
  3. form the row's loss from the k-vectors and the three statistics;
  4. with a gradient wanted, re-read the row (the L2 cache still holds it) and write
        ∂loss/∂s = kl_grad·(softmax(s/T) - p̃) + ce_grad·(softmax(s) - onehot(y)),
     p̃ = p_i on the k ids (stored by one gather-shaped store) and p_rest·q_j/q_rest on every other
     column (stored by the streaming pass, masked off the k ids), kl_grad = α·T·r. This is the
     derivative of the reference, where the k + 1 softmax terms collapse to softmax(s/T) times the
     teacher's total mass Σ_i p_i + p_rest: 1, except where the top-k mass rounds above 1 (values in
     bf16 beside an fp32 lse) and p_rest is clamped to 0; the kernel keeps that factor, so its gradient
     is the derivative of the loss it reports.

Everything is in base 2 with differences of raw logits, as in `kd_loss`. The gradient buffer, the
grad_output scaling in backward, and the deterministic final sum are `kd_loss`'s.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import check_kd_reduction
from .kd_loss import (
    F32_MIN,
    LN2,
    LOG2E,
    _check_label_range,
    _lane_lse_step,
    _merge_lanes,
    _unit_column_stride,
    arrival_counter,
    finish_sum,
    grad_buffer_dtype,
    max_programs,
    take_scaled_grad,
)

MAX_BLOCK_V = 4096  # columns per streamed block: 8 per thread at 16 warps, three fp32 lane states each
MAX_K = 4096  # the k-vectors live in registers; a larger k is dense KD in all but name


def launch_config(n_cols: int, k: int) -> dict:
    """The launch's block sizes and warps for V = `n_cols` and `k` teacher ids per row: the constexprs
    of `_topk_kd_fwd_kernel` that vary with the shape (the AOT test compiles each of them)."""
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(max(n_cols, 1)))
    return {"BLOCK_V": block_v, "BLOCK_K": triton.next_power_of_2(max(k, 1)), "num_warps": max(1, min(16, block_v // 256))}


@triton.jit
def _log1mexp(x):
    """ln(1 - e^x) for x ≤ 0 with only exp and log: below -ln2 directly, above it via Kahan's expm1
    (u = e^x; expm1 = (u - 1)·x/ln u), which keeps the digits of a rest mass near 0. x ≥ 0: -inf."""
    x = tl.minimum(x, 0.0)
    u = tl.exp(x)
    expm1 = tl.where(u == 1.0, x, (u - 1.0) * x / tl.log(u))
    return tl.where(x > -0.6931471805599453, tl.log(-expm1), tl.log(1.0 - u))


# Per row (τ = log2(e)/T, τ_c = log2(e); lane states as in kd_loss, all columns / unmarked columns):
#   m_s, d_s: lse2(s·τ) = m_s·τ + log2 d_s        m_r, d_r: the same over the columns not in the top-k
#   lq_i = (s_i - m_s)·τ - log2 d_s                lq_r = (m_r - m_s)·τ + log2 d_r - log2 d_s
#   lp_i = (t_i/T - lse_t)·log2(e)                 ln p_r = log1mexp(ln Σ p_i), 0 mass if no column is left
#   KL = ln2·Σ_i p_i·(lp_i - lq_i) + p_r·(ln p_r - ln2·lq_r)     (terms with p = 0 add 0)
# r, r_ce, the divisors and the N = 0 launch are as in `_kd_fwd_kernel`.
@triton.jit
def _topk_kd_fwd_kernel(
    s_ptr, id_ptr, tv_ptr, lse_ptr, y_ptr, g_ptr, mark_ptr, loss_ptr, partial_ptr, counter_ptr, div_ptr,
    n_rows, n_cols, k, s_stride, id_stride, tv_stride, g_stride,
    kl_weight, kl_grad, ce_weight, inv_t, tau, tau_ce, ignore_index,
    HAS_KL: tl.constexpr, HAS_CE: tl.constexpr, CE_MEAN: tl.constexpr, CE_OWN_STATS: tl.constexpr,
    PER_ROW: tl.constexpr, WRITE_GRAD: tl.constexpr, HAS_DIVISORS: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    if HAS_DIVISORS:
        ce_weight = ce_weight / tl.load(div_ptr).to(tl.float32)
        kl_divisor = tl.load(div_ptr + 1).to(tl.float32)
        kl_weight = kl_weight / kl_divisor
        kl_grad = kl_grad / kl_divisor
    if HAS_CE and CE_MEAN:
        n_valid = 0
        for first in range(0, n_rows, BLOCK_N):
            offs = first + tl.arange(0, BLOCK_N)
            y_blk = tl.load(y_ptr + offs, mask=offs < n_rows, other=ignore_index)
            n_valid += tl.sum((y_blk != ignore_index).to(tl.int32), 0)
        ce_weight = ce_weight / tl.maximum(n_valid, 1).to(tl.float32)
    mark_row = mark_ptr + tl.cast(pid, tl.int64) * n_cols
    kk = tl.arange(0, BLOCK_K)
    k_mask = kk < k
    acc_loss = 0.0
    for row in range(pid, n_rows, tl.num_programs(0)):
        row64 = tl.cast(row, tl.int64)
        s_row = s_ptr + row64 * s_stride
        ids = tl.load(id_ptr + row64 * id_stride + kk, mask=k_mask, other=0)
        if HAS_KL:
            tl.debug_barrier()  # the previous row's clearing stores precede this row's marks
            tl.store(mark_row + ids, tl.full((BLOCK_K,), 1, tl.int8), mask=k_mask)
            tl.debug_barrier()  # every mark is visible to every thread of the streaming pass
        m_s = tl.full((BLOCK_V,), F32_MIN, tl.float32)
        d_s = tl.zeros((BLOCK_V,), tl.float32)
        m_r, d_r, d_c = m_s, d_s, d_s
        for start in range(0, n_cols, BLOCK_V):
            idx = start + tl.arange(0, BLOCK_V)
            valid = idx < n_cols
            s = tl.load(s_row + idx, mask=valid, other=float("-inf"), eviction_policy="evict_last").to(tl.float32)
            if CE_OWN_STATS:
                e_c = tl.exp2(-tl.abs(s - m_s) * tau_ce)
                d_c = tl.where(s > m_s, d_c * e_c + 1.0, d_c + e_c)
            m_s, d_s, _, _ = _lane_lse_step(m_s, d_s, s, tau)
            if HAS_KL:
                marked = tl.load(mark_row + idx, mask=valid, other=0) != 0
                m_r, d_r, _, _ = _lane_lse_step(m_r, d_r, tl.where(marked, float("-inf"), s), tau)
        if CE_OWN_STATS:
            d_c = tl.sum(d_c * tl.exp2((m_s - tl.max(m_s, 0)) * tau_ce), 0)
        m_s, d_s, _ = _merge_lanes(m_s, d_s, tau)
        ld_s = tl.log2(d_s)
        row_loss = 0.0
        g_kl = 0.0
        g_q = 0.0  # kl_grad × the teacher's total mass (see the module docstring)
        lp = tl.zeros((BLOCK_K,), tl.float32)
        rest_shift = float("-inf")  # log2 of p_r/(q_r·Σ 2^..): the rest target is 2^((s - m_r)·τ + rest_shift)
        s_k = tl.load(s_row + ids, mask=k_mask, other=0.0).to(tl.float32)
        if HAS_KL:
            m_r, d_r, _ = _merge_lanes(m_r, d_r, tau)
            has_rest = d_r > 0
            lse_t = tl.load(lse_ptr + row).to(tl.float32)
            t_k = tl.load(tv_ptr + row64 * tv_stride + kk, mask=k_mask, other=float("-inf")).to(tl.float32)
            lp = (t_k * inv_t - lse_t) * 1.4426950408889634
            p = tl.exp2(lp)
            lq = (s_k - m_s) * tau - ld_s
            kl = LN2 * tl.sum(tl.where(p > 0, p * (lp - lq), 0.0), 0)
            lp_max = tl.max(lp, 0)
            lse_k = (lp_max + tl.log2(tl.sum(tl.exp2(lp - lp_max), 0))) * LN2  # ln Σ p_i
            ln_p_rest = tl.where(has_rest, _log1mexp(lse_k), float("-inf"))
            p_rest = tl.exp(ln_p_rest)
            ld_r = tl.log2(tl.where(has_rest, d_r, 1.0))
            lq_rest = tl.where(has_rest, (m_r - m_s) * tau + ld_r - ld_s, float("-inf"))
            kl += tl.where(p_rest > 0, p_rest * (ln_p_rest - LN2 * lq_rest), 0.0)
            row_loss += kl_weight * kl
            g_kl = kl_grad
            g_q = kl_grad * (tl.sum(p, 0) + p_rest)
            rest_shift = tl.where(p_rest > 0, ln_p_rest * 1.4426950408889634 - ld_r, float("-inf"))
            m_r = tl.where(has_rest, m_r, 0.0)  # no column left: nothing reads the rest target, keep it finite
        y_idx = -1
        ld_c = ld_s
        g_ce = 0.0
        if HAS_CE:
            y = tl.load(y_ptr + row)
            valid_y = y != ignore_index
            y_idx = tl.where(valid_y, y, -1)
            s_y = tl.load(s_row + y, mask=valid_y & (y >= 0) & (y < n_cols), other=0.0).to(tl.float32)
            if CE_OWN_STATS:
                ld_c = tl.log2(d_c)
            g_ce = tl.where(valid_y, ce_weight, 0.0)
            row_loss += tl.where(valid_y, ce_weight * LN2 * ((m_s - s_y) * tau_ce + ld_c), 0.0)
        if PER_ROW:
            tl.store(loss_ptr + row, row_loss)
        else:
            acc_loss += row_loss
        if WRITE_GRAD:
            g_row = g_ptr + row64 * g_stride
            for start in range(0, n_cols, BLOCK_V):
                idx = start + tl.arange(0, BLOCK_V)
                valid = idx < n_cols
                s = tl.load(s_row + idx, mask=valid, other=0.0, eviction_policy="evict_first").to(tl.float32)
                q = tl.exp2((s - m_s) * tau - ld_s)
                g = g_q * q
                if HAS_KL:  # the rest bucket's target, 0 where p_rest = 0 (m_r is finite whenever it is read)
                    g -= g_kl * tl.exp2((s - m_r) * tau + rest_shift)
                if HAS_CE:
                    sm = tl.exp2((s - m_s) * tau_ce - ld_c) if CE_OWN_STATS else q
                    g += g_ce * (sm - tl.where(idx == y_idx, 1.0, 0.0))
                if HAS_KL:
                    valid = valid & (tl.load(mark_row + idx, mask=valid, other=0) == 0)
                tl.store(g_row + idx, g.to(g_row.dtype.element_ty), mask=valid, eviction_policy="evict_first")
            if HAS_KL:  # the k marked columns: their own target p_i
                g_k = g_q * tl.exp2((s_k - m_s) * tau - ld_s) - g_kl * tl.exp2(lp)
                if HAS_CE:
                    g_k += g_ce * (tl.exp2((s_k - m_s) * tau_ce - ld_c) - tl.where(ids == y_idx, 1.0, 0.0))
                tl.store(g_row + ids, g_k.to(g_row.dtype.element_ty), mask=k_mask)
        if HAS_KL:
            tl.debug_barrier()  # every read of this row's marks precedes their clearing
            tl.store(mark_row + ids, tl.zeros((BLOCK_K,), tl.int8), mask=k_mask)
    if not PER_ROW:
        finish_sum(partial_ptr, counter_ptr, loss_ptr, acc_loss, tl.num_programs(0), BLOCK=1024)


def _topk_forward(s, ids, tv, lse, labels, temperature, alpha, ignore_index, reduction, divisors, write_grad):
    """The loss and, with `write_grad`, the scaled-down student gradient in a new buffer."""
    n_rows, n_cols = s.shape
    k = ids.shape[1]
    has_kl, has_ce, per_row = alpha != 0.0, alpha != 1.0, reduction == "none"
    r = {"batchmean": 1.0 / max(n_rows, 1), "mean": 1.0 / max(n_rows * n_cols, 1)}.get(reduction, 1.0)
    grad = torch.empty((n_rows, n_cols), dtype=grad_buffer_dtype(s.dtype), device=s.device) if write_grad else None
    tau = LOG2E / temperature if has_kl else LOG2E
    config = launch_config(n_cols, k)
    n_prog = max(1, min(n_rows, max_programs(s.device, config["num_warps"])))
    marks = torch.zeros((n_prog, n_cols) if has_kl else (1,), dtype=torch.int8, device=s.device)
    loss = torch.empty((n_rows,) if per_row else (), dtype=torch.float32, device=s.device)
    partials = loss if per_row else torch.empty(n_prog, dtype=torch.float32, device=s.device)
    counter = loss if per_row else arrival_counter(s.device)
    stand_in = s  # for the operands a term without it never reads
    _topk_kd_fwd_kernel[(n_prog,)](
        s, ids, tv, lse, labels if has_ce else stand_in, grad if write_grad else stand_in, marks, loss, partials,
        counter, stand_in if divisors is None else divisors,
        n_rows, n_cols, k, s.stride(0), ids.stride(0), tv.stride(0), grad.stride(0) if write_grad else 0,
        alpha * temperature**2 * r, alpha * temperature * r, 1.0 - alpha, 1.0 / temperature, tau, LOG2E, ignore_index,
        HAS_KL=has_kl, HAS_CE=has_ce, CE_MEAN=reduction in ("batchmean", "mean"), CE_OWN_STATS=has_ce and tau != LOG2E,
        PER_ROW=per_row, WRITE_GRAD=write_grad, HAS_DIVISORS=divisors is not None, BLOCK_N=1024, **config,
    )  # fmt: skip
    return loss, grad


class FusedTopkKDLoss(torch.autograd.Function):
    """Loss and the student gradient in forward; backward scales that gradient by grad_output."""

    @staticmethod
    def forward(ctx, s, ids, tv, lse, labels, temperature, alpha, ignore_index, reduction, divisors, write_grad):
        loss, ctx.grad = _topk_forward(s, ids, tv, lse, labels, temperature, alpha, ignore_index, reduction, divisors, write_grad)
        ctx.dtype = s.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad = take_scaled_grad(ctx, "fused_topk_kd_loss", grad_output, ctx.dtype)
        return grad, None, None, None, None, None, None, None, None, None, None


def fused_topk_kd_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_lse: torch.Tensor,
    temperature: float,
    labels: torch.Tensor | None = None,
    alpha: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    divisors: torch.Tensor | None = None,
) -> torch.Tensor:
    """`pkd_fast.losses.topk_kd_loss_reference` in one kernel launch, differentiable w.r.t. the student.

    The teacher (ids, values, lse at T) is a constant. Ids must be distinct within a row and lie in
    [0, V): out-of-range ids are refused (asserted on device on CUDA, as labels are); duplicates are the
    caller's contract (a top-k never has them) and are not checked, as that would cost a sort per step.
    """
    check_kd_reduction(reduction, divisors)
    if student_logits.dim() != 2 or student_logits.shape[1] == 0:
        raise ValueError(f"student_logits must be an [N, V] tensor with V > 0, got shape {tuple(student_logits.shape)}")
    n_rows, n_cols = student_logits.shape
    device = student_logits.device
    if divisors is not None:
        if divisors.shape != (2,) or divisors.device != device:
            raise ValueError(f"divisors must be a [2] tensor on the logits' device, got {tuple(divisors.shape)} on {divisors.device}")
        divisors = divisors.float().contiguous()
    alpha, temperature = float(alpha), float(temperature)
    if not 0.0 < temperature < math.inf:
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    if teacher_ids.dim() != 2 or teacher_ids.shape[0] != n_rows or not 1 <= teacher_ids.shape[1] <= min(n_cols, MAX_K):
        raise ValueError(f"teacher_ids must be [{n_rows}, k] with 1 ≤ k ≤ min(V, {MAX_K}) = {min(n_cols, MAX_K)}, got {tuple(teacher_ids.shape)}")
    if teacher_ids.dtype.is_floating_point or teacher_ids.dtype == torch.bool:
        raise ValueError(f"teacher_ids must be integer ids, got {teacher_ids.dtype}")
    if teacher_values.shape != teacher_ids.shape:
        raise ValueError(f"teacher_values must match teacher_ids {tuple(teacher_ids.shape)}, got {tuple(teacher_values.shape)}")
    if teacher_lse.shape != (n_rows,):
        raise ValueError(f"teacher_lse must be [{n_rows}] (logsumexp of the full row at T), got {tuple(teacher_lse.shape)}")
    if alpha != 0.0:
        _check_id_range(teacher_ids, n_cols)
    if alpha != 1.0:
        if labels is None:
            raise ValueError("labels are required when alpha < 1 (the CE term has weight 1 - alpha)")
        if labels.shape != (n_rows,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integer class ids of shape ({n_rows},), got {labels.dtype} {tuple(labels.shape)}")
        labels = labels.contiguous()
        _check_label_range(labels, n_cols, int(ignore_index))
    if any(x is not None and x.device != device for x in (teacher_ids, teacher_values, teacher_lse, labels)):
        raise ValueError("student logits, teacher top-k tensors and labels must be on the same device")
    write_grad = student_logits.requires_grad and torch.is_grad_enabled()
    return FusedTopkKDLoss.apply(
        _unit_column_stride(student_logits), _unit_column_stride(teacher_ids), _unit_column_stride(teacher_values),
        teacher_lse.contiguous(), labels, temperature, alpha, int(ignore_index), reduction, divisors, write_grad,
    )  # fmt: skip


def _check_id_range(ids: torch.Tensor, n_cols: int) -> None:
    """Teacher ids outside [0, V) would read and write outside the row: refused (on CUDA asynchronously)."""
    bad = (ids < 0) | (ids >= n_cols)
    message = f"teacher_ids must lie in [0, {n_cols})"
    if ids.device.type == "cuda":
        torch._assert_async(~bad.any(), message)
    elif bad.any():
        raise ValueError(f"{message}, got {ids[bad][0].item()}")
