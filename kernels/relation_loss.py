"""Fused MiniLMv2 self-attention relation loss (Q-Q, K-K, V-V), forward and backward, in O(B·R·T) memory.

For one relation type with student X_s [B, T, H_s] and teacher X_t [B, T, H_t], each split into R heads of
size d = H/R, the relation of head r is P = softmax(X_r X_rᵀ / √d) over the real keys, and the loss is
w·Σ_i KL(P_t[i] ‖ P_s[i]) over the real query rows, w = 1/(R·N), N the real rows of the batch; the three
types are summed (`pkd_fast.losses.relation_loss_reference` is the spec). No T×T matrix is ever stored:

forward  one program per (query block, batch·head, type) streams key blocks, keeping for teacher and
         student an online log-sum-exp (running max m, running sum d) and acc = Σ_j e^(s_t − m_t)·(s_t − s_s),
         so KL_i = acc/d_t − (m_t − m_s) + log(d_s/d_t). It stores only each row's m and log d per side.
backward recomputes the score blocks and p = e^((s − m) − log d) from them (flash-attention style). With s_ij = c·x_i·x_j (c = 1/√d_s)
         and G_ij = ∂L/∂s_ij = w·(p_s,ij − p_t,ij) for real i, j (else 0), both factors of x_i·x_j depend
         on X, so ∂L/∂x_k = c·(Σ_j G_kj x_j + Σ_i G_ik x_i) = c·((G + Gᵀ) X)_k: a program owns a block of
         rows k and runs two loops, once with its rows as queries (G X) and once as keys (Gᵀ X). Each
         program writes only its own rows: no atomics, deterministic.

Inputs are the three tensors of each side as they come from the model (separate Q/K/V projections, or
views of one fused QKV projection, or of a [3, B, T, H] stack): the kernel reads them in place through
their element offsets from Q and one shared (batch, token) stride, so nothing is copied or stacked.
Scores are dot products of the inputs in their own dtype with fp32 accumulation (the products of two bf16
or fp16 numbers are exact in fp32, so this equals the spec's upcast); fp32 inputs use IEEE fp32, not TF32.
The gradient is accumulated in fp32 and multiplied by grad_output in the kernel before its one rounding to
the student dtype, so an fp16 student under a loss scale loses nothing eager keeps (the rule `kd_loss`
follows with `grad_buffer_dtype`, met here without an fp32 buffer because backward recomputes).

This file does not import pkd_fast (DESIGN.md): its constants and checks are its own.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import torch
import triton
import triton.language as tl

MAX_HEAD_DIM = 256  # a block of rows of one head lives in registers
NEG = tl.constexpr(-1.0e30)  # a masked score: its exp is 0, and NEG - NEG is 0 where -inf - -inf is NaN
N_TYPES = 3  # Q-Q, K-K, V-V
INTERPRETER_BLOCK = 16  # rows per block under TRITON_INTERPRET: small, so tiny tests cross block edges
# CUDA configurations by padded head dimension: (BLOCK_M, BLOCK_N, num_warps). Chosen for register
# budget (a [BLOCK_M, d] block of each side plus the fp32 gradient accumulator), not yet tuned on a GPU.
CUDA_CONFIGS = {16: (64, 64, 4), 32: (64, 64, 4), 64: (64, 64, 4), 128: (64, 32, 4), 256: (32, 32, 4)}


@triton.jit
def _type_offset(typ, off_k, off_v):
    """Element offset of relation type `typ`'s tensor (0 Q, 1 K, 2 V) from Q's."""
    return tl.where(typ == 1, off_k, tl.where(typ == 2, off_v, 0))


@triton.jit
def _load_rows(base, rows, seq_len, stride_t, head_dim, BLOCK_D: tl.constexpr):
    """A [rows, BLOCK_D] block of one head, zero past the sequence and the head dimension."""
    cols = tl.arange(0, BLOCK_D)
    ptrs = base + rows.to(tl.int64)[:, None] * stride_t + cols[None, :]
    return tl.load(ptrs, mask=(rows < seq_len)[:, None] & (cols < head_dim)[None, :], other=0.0)


@triton.jit
def _real(mask_ptr, b, rows, seq_len):
    """Which of `rows` are real tokens of sequence b."""
    inside = rows < seq_len
    return inside & (tl.load(mask_ptr + b * seq_len + rows, mask=inside, other=0) != 0)


@triton.jit
def _scores(a, b, scale, DOT_FP32: tl.constexpr):
    """scale·a bᵀ in fp32 (IEEE for fp32 inputs; 16-bit inputs multiply exactly into fp32, so upcasting
    them first, which the interpreter needs for bf16, changes nothing but speed)."""
    if DOT_FP32:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, tl.trans(b), input_precision="ieee") * scale


@triton.jit
def _relation_fwd_kernel(
    s_ptr, t_ptr, mask_ptr, n_real_ptr, stats_ptr, partial_ptr,
    s_off_k, s_off_v, s_stride_b, s_stride_t, t_off_k, t_off_v, t_stride_b, t_stride_t,
    seq_len, n_heads, head_dim_s, head_dim_t, scale_s, scale_t, stat_stride,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
    DOT_FP32: tl.constexpr,
):  # fmt: skip
    m_blk, bh, typ = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, r = bh // n_heads, bh % n_heads
    s_base = s_ptr + _type_offset(typ, s_off_k, s_off_v) + b.to(tl.int64) * s_stride_b + r * head_dim_s
    t_base = t_ptr + _type_offset(typ, t_off_k, t_off_v) + b.to(tl.int64) * t_stride_b + r * head_dim_t
    rows = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    row_real = _real(mask_ptr, b, rows, seq_len)
    xs_i = _load_rows(s_base, rows, seq_len, s_stride_t, head_dim_s, BLOCK_DS)
    xt_i = _load_rows(t_base, rows, seq_len, t_stride_t, head_dim_t, BLOCK_DT)
    m_s = tl.full((BLOCK_M,), NEG, tl.float32)
    d_s = tl.zeros((BLOCK_M,), tl.float32)
    m_t, d_t, acc = m_s, d_s, d_s
    for start in range(0, seq_len, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_real = _real(mask_ptr, b, keys, seq_len)[None, :]
        ss = tl.where(key_real, _scores(xs_i, _load_rows(s_base, keys, seq_len, s_stride_t, head_dim_s, BLOCK_DS), scale_s, DOT_FP32), NEG)
        st = tl.where(key_real, _scores(xt_i, _load_rows(t_base, keys, seq_len, t_stride_t, head_dim_t, BLOCK_DT), scale_t, DOT_FP32), NEG)
        m_s_new = tl.maximum(m_s, tl.max(ss, 1))
        d_s = d_s * tl.exp(m_s - m_s_new) + tl.sum(tl.where(key_real, tl.exp(ss - m_s_new[:, None]), 0.0), 1)
        m_s = m_s_new
        m_t_new = tl.maximum(m_t, tl.max(st, 1))
        e_t = tl.where(key_real, tl.exp(st - m_t_new[:, None]), 0.0)
        rescale_t = tl.exp(m_t - m_t_new)
        d_t = d_t * rescale_t + tl.sum(e_t, 1)
        acc = acc * rescale_t + tl.sum(e_t * (st - ss), 1)
        m_t = m_t_new
    # A padded query row may have no real key at all (an all-padding sequence): d = 0, kept out by row_real.
    d_s = tl.where(row_real, d_s, 1.0)
    d_t = tl.where(row_real, d_t, 1.0)
    kl = tl.where(row_real, acc / d_t - (m_t - m_s) + tl.log(d_s / d_t), 0.0)
    # The row statistics as (max, log-sum) pairs, not their sum m + log d: backward then forms
    # (s − m) − log d, exact near the max as log_softmax is, where s − lse would lose ulp(lse) to rounding.
    stats = stats_ptr + ((typ * tl.num_programs(1) + bh) * seq_len).to(tl.int64) + rows
    inside = rows < seq_len
    tl.store(stats, tl.where(row_real, m_s, 0.0), mask=inside)
    tl.store(stats + stat_stride, tl.where(row_real, tl.log(d_s), 0.0), mask=inside)
    tl.store(stats + 2 * stat_stride, tl.where(row_real, m_t, 0.0), mask=inside)
    tl.store(stats + 3 * stat_stride, tl.where(row_real, tl.log(d_t), 0.0), mask=inside)
    weight = 1.0 / (n_heads * tl.maximum(tl.load(n_real_ptr), 1).to(tl.float32))
    pid = (typ * tl.num_programs(1) + bh) * tl.num_programs(0) + m_blk
    tl.store(partial_ptr + pid, weight * tl.sum(kl, 0))


@triton.jit
def _load_stats(stats, rows, seq_len, stat_stride):
    """The rows' (m_s, log d_s, m_t, log d_t) that forward stored."""
    inside = rows < seq_len
    m_s = tl.load(stats + rows, mask=inside, other=0.0)
    ld_s = tl.load(stats + stat_stride + rows, mask=inside, other=0.0)
    m_t = tl.load(stats + 2 * stat_stride + rows, mask=inside, other=0.0)
    ld_t = tl.load(stats + 3 * stat_stride + rows, mask=inside, other=0.0)
    return m_s, ld_s, m_t, ld_t


@triton.jit
def _relation_grad(xs_q, xt_q, m_s, ld_s, m_t, ld_t, xs_k, xt_k, valid, scale_s, scale_t, DOT_FP32: tl.constexpr):
    """G = p_s − p_t on the valid (real query, real key) pairs of a block, recomputed from the row stats."""
    p_s = tl.exp((_scores(xs_q, xs_k, scale_s, DOT_FP32) - m_s[:, None]) - ld_s[:, None])
    p_t = tl.exp((_scores(xt_q, xt_k, scale_t, DOT_FP32) - m_t[:, None]) - ld_t[:, None])
    return tl.where(valid, p_s - p_t, 0.0)


@triton.jit
def _relation_bwd_kernel(
    s_ptr, t_ptr, mask_ptr, n_real_ptr, stats_ptr, go_ptr, g_ptr,
    s_off_k, s_off_v, s_stride_b, s_stride_t, t_off_k, t_off_v, t_stride_b, t_stride_t,
    seq_len, n_heads, head_dim_s, head_dim_t, scale_s, scale_t, stat_stride,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
    DOT_FP32: tl.constexpr,
):  # fmt: skip
    m_blk, bh, typ = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, r = bh // n_heads, bh % n_heads
    s_base = s_ptr + _type_offset(typ, s_off_k, s_off_v) + b.to(tl.int64) * s_stride_b + r * head_dim_s
    t_base = t_ptr + _type_offset(typ, t_off_k, t_off_v) + b.to(tl.int64) * t_stride_b + r * head_dim_t
    stats = stats_ptr + ((typ * tl.num_programs(1) + bh) * seq_len).to(tl.int64)
    own = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    own_real = _real(mask_ptr, b, own, seq_len)
    xs_own = _load_rows(s_base, own, seq_len, s_stride_t, head_dim_s, BLOCK_DS)
    xt_own = _load_rows(t_base, own, seq_len, t_stride_t, head_dim_t, BLOCK_DT)
    m_s_own, ld_s_own, m_t_own, ld_t_own = _load_stats(stats, own, seq_len, stat_stride)
    dx = tl.zeros((BLOCK_M, BLOCK_DS), tl.float32)
    for start in range(0, seq_len, BLOCK_N):  # own rows as queries: (G X)_own
        keys = start + tl.arange(0, BLOCK_N)
        xs_k = _load_rows(s_base, keys, seq_len, s_stride_t, head_dim_s, BLOCK_DS)
        xt_k = _load_rows(t_base, keys, seq_len, t_stride_t, head_dim_t, BLOCK_DT)
        valid = own_real[:, None] & _real(mask_ptr, b, keys, seq_len)[None, :]
        g = _relation_grad(xs_own, xt_own, m_s_own, ld_s_own, m_t_own, ld_t_own, xs_k, xt_k, valid, scale_s, scale_t, DOT_FP32)
        dx += tl.dot(g, xs_k.to(tl.float32), input_precision="ieee")
    for start in range(0, seq_len, BLOCK_N):  # own rows as keys: (Gᵀ X)_own
        queries = start + tl.arange(0, BLOCK_N)
        xs_q = _load_rows(s_base, queries, seq_len, s_stride_t, head_dim_s, BLOCK_DS)
        xt_q = _load_rows(t_base, queries, seq_len, t_stride_t, head_dim_t, BLOCK_DT)
        m_s_q, ld_s_q, m_t_q, ld_t_q = _load_stats(stats, queries, seq_len, stat_stride)
        valid = _real(mask_ptr, b, queries, seq_len)[:, None] & own_real[None, :]
        g = _relation_grad(xs_q, xt_q, m_s_q, ld_s_q, m_t_q, ld_t_q, xs_own, xt_own, valid, scale_s, scale_t, DOT_FP32)
        dx += tl.dot(tl.trans(g), xs_q.to(tl.float32), input_precision="ieee")
    weight = 1.0 / (n_heads * tl.maximum(tl.load(n_real_ptr), 1).to(tl.float32))
    dx = dx * (weight * scale_s * tl.load(go_ptr).to(tl.float32))  # grad_output before the one rounding
    n_batch = tl.num_programs(1) // n_heads
    g_rows = g_ptr + ((typ * n_batch + b) * seq_len).to(tl.int64) * (n_heads * head_dim_s) + r * head_dim_s
    cols = tl.arange(0, BLOCK_DS)
    ptrs = g_rows + own.to(tl.int64)[:, None] * (n_heads * head_dim_s) + cols[None, :]
    tl.store(ptrs, dx.to(g_ptr.dtype.element_ty), mask=(own < seq_len)[:, None] & (cols < head_dim_s)[None, :])


# ----------------------------------------------------------------------------------------------------------
# Launch configuration: the one place block sizes are chosen (the launcher and the AOT test read it).
# ----------------------------------------------------------------------------------------------------------


def _padded_head_dim(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs every dimension ≥ 16


def launch_config(head_dim_s: int, head_dim_t: int, device_type: str) -> dict:
    """Block sizes and warps for both kernels: BLOCK_M query rows × BLOCK_N key rows, head dims padded."""
    block_ds, block_dt = _padded_head_dim(head_dim_s), _padded_head_dim(head_dim_t)
    if device_type == "cuda":
        block_m, block_n, num_warps = CUDA_CONFIGS[max(block_ds, block_dt)]
    else:  # the interpreter runs programs one after another: small blocks, and tiny tests cross their edges
        block_m, block_n, num_warps = INTERPRETER_BLOCK, INTERPRETER_BLOCK, 1
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DS=block_ds, BLOCK_DT=block_dt, num_warps=num_warps)


def _dot_fp32(*tensors: torch.Tensor) -> bool:
    """Upcast the score dots' operands: Triton's interpreter multiplies bf16 blocks wrongly (their bits
    as integers: errors of 1e10 on unit inputs), fp32 and fp16 correctly; a GPU needs no upcast."""
    return os.environ.get("TRITON_INTERPRET") == "1" and any(x.dtype == torch.bfloat16 for x in tensors)


def aot_configs() -> list[dict]:
    """The CUDA configurations to compile ahead of time, for both kernels: every (BLOCK_M, BLOCK_N,
    num_warps) `launch_config` picks, at equal student and teacher head sizes, plus the two most unequal
    pairs (16 with 256 each way). Other pairs differ only in the padded head sizes between these.
    Each: {"kernel", "BLOCK_M", "BLOCK_N", "BLOCK_DS", "BLOCK_DT", "num_warps", "DOT_FP32"}; the other
    arguments are pointers (student/teacher/gradient one float dtype each, mask and N int32, the rest
    fp32), int64 offsets and strides, int32 sizes and fp32 scales."""
    dims = sorted(CUDA_CONFIGS)
    pairs = [(d, d) for d in dims] + [(dims[0], dims[-1]), (dims[-1], dims[0])]
    return [
        {"kernel": kernel, **launch_config(ds, dt, "cuda"), "DOT_FP32": False}
        for kernel in (_relation_fwd_kernel, _relation_bwd_kernel)
        for ds, dt in pairs
    ]


# ----------------------------------------------------------------------------------------------------------
# Host side.
# ----------------------------------------------------------------------------------------------------------


def _side_layout(side: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], tuple[int, int, int, int]]:
    """Q, K, V of one side readable through Q's pointer: (offset of K, offset of V, batch stride, token
    stride) in elements. Separate projections and views of one QKV projection pass as they are; tensors
    whose strides differ from each other (or whose columns are strided) are made contiguous first."""
    q = side[0]
    if any(x.stride() != q.stride() for x in side) or q.stride(2) != 1:
        side = [x.contiguous() for x in side]
        q = side[0]
    size = q.element_size()
    offsets = [(x.data_ptr() - q.data_ptr()) // size for x in side]
    return list(side), (offsets[1], offsets[2], q.stride(0), q.stride(1))


def _check(student, teacher, attention_mask, n_heads) -> None:
    if len(student) != N_TYPES or len(teacher) != N_TYPES:
        raise ValueError(f"relations need (q, k, v) for each side, got {len(student)} and {len(teacher)} tensors")
    tensors = (*student, *teacher)
    if any(x.dim() != 3 for x in tensors):
        raise ValueError(f"q, k and v must be [B, T, H], got shapes {[tuple(x.shape) for x in tensors]}")
    batch, seq_len = student[0].shape[:2]
    if batch == 0 or seq_len == 0:
        raise ValueError(f"relations need at least one sequence of one token, got [B, T] = {(batch, seq_len)}")
    if any(x.shape[:2] != (batch, seq_len) for x in tensors) or attention_mask.shape != (batch, seq_len):
        got = [tuple(x.shape) for x in (*tensors, attention_mask)]
        raise ValueError(f"q, k, v and attention_mask must share [B, T] = {(batch, seq_len)}, got {got}")
    for side, name in ((student, "student"), (teacher, "teacher")):
        hidden = side[0].shape[2]
        if any(x.shape[2] != hidden or x.dtype != side[0].dtype for x in side) or not side[0].dtype.is_floating_point:
            raise ValueError(f"the {name}'s q, k, v must share one hidden size and one float dtype")
        if n_heads < 1 or hidden % n_heads:
            raise ValueError(f"{n_heads} relation heads do not divide the {name}'s hidden size {hidden}")
        if hidden // n_heads > MAX_HEAD_DIM:
            raise ValueError(f"the {name}'s relation head size {hidden // n_heads} exceeds the kernel's {MAX_HEAD_DIM}")
    if any(x.device != attention_mask.device for x in tensors):
        raise ValueError("q, k, v and attention_mask must be on the same device")


class FusedRelationLoss(torch.autograd.Function):
    """Loss and the rows' softmax statistics in forward; backward recomputes the relations from them."""

    @staticmethod
    def forward(ctx, mask, n_heads, sq, sk, sv, tq, tk, tv):
        student, s_layout = _side_layout((sq, sk, sv))
        teacher, t_layout = _side_layout((tq, tk, tv))
        batch, seq_len, hidden_s = sq.shape
        head_dim_s, head_dim_t = hidden_s // n_heads, tq.shape[2] // n_heads
        scales = (1.0 / math.sqrt(head_dim_s), 1.0 / math.sqrt(head_dim_t))
        config = launch_config(head_dim_s, head_dim_t, sq.device.type)
        grid = (triton.cdiv(seq_len, config["BLOCK_M"]), batch * n_heads, N_TYPES)
        n_real = mask.sum(dtype=torch.int32)  # stays on device: read by the kernels, never by the host
        stats = torch.empty((4, N_TYPES, batch, n_heads, seq_len), dtype=torch.float32, device=sq.device)
        partials = torch.empty(grid[0] * grid[1] * grid[2], dtype=torch.float32, device=sq.device)
        args = (*s_layout, *t_layout, seq_len, n_heads, head_dim_s, head_dim_t, *scales, stats[0].numel())
        config = {**config, "DOT_FP32": _dot_fp32(sq, tq)}
        _relation_fwd_kernel[grid](student[0], teacher[0], mask, n_real, stats, partials, *args, **config)
        ctx.save_for_backward(*student, *teacher, mask, n_real, stats)
        ctx.launch, ctx.student_shape = (grid, args, config), sq.shape
        return partials.sum()  # a fixed-order sum: deterministic

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        sq, _, _, tq, _, _, mask, n_real, stats = ctx.saved_tensors
        grid, args, config = ctx.launch
        grad = torch.empty((N_TYPES, *ctx.student_shape), dtype=sq.dtype, device=sq.device)
        go = grad_output.to(torch.float32).reshape(1)
        _relation_bwd_kernel[grid](sq, tq, mask, n_real, stats, go, grad, *args, **config)
        return None, None, grad[0], grad[1], grad[2], None, None, None


def fused_relation_loss(
    student_qkv: Sequence[torch.Tensor] | torch.Tensor,
    teacher_qkv: Sequence[torch.Tensor] | torch.Tensor,
    attention_mask: torch.Tensor,
    n_heads: int,
) -> torch.Tensor:
    """`pkd_fast.losses.relation_loss_reference` in one forward and one backward launch, differentiable
    with respect to the student's q, k, v; the teacher is a constant.

    Each side is (q, k, v), each [B, T, H] (H may differ between the sides, R = n_heads divides both), or a
    stacked [3, B, T, H] tensor; attention_mask is [B, T], nonzero on real tokens.
    """
    student = list(student_qkv.unbind(0) if isinstance(student_qkv, torch.Tensor) else student_qkv)
    teacher = list(teacher_qkv.unbind(0) if isinstance(teacher_qkv, torch.Tensor) else teacher_qkv)
    n_heads = int(n_heads)
    _check(student, teacher, attention_mask, n_heads)
    mask = attention_mask.to(torch.int32).contiguous()
    return FusedRelationLoss.apply(mask, n_heads, *student, *(x.detach() for x in teacher))


__all__ = ["fused_relation_loss", "launch_config", "aot_configs"]
