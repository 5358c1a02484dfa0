"""Fused masked-LM head + KD loss on CUDA: the student's and the teacher's vocabulary logits are computed
tile by tile from their transformed rows and decoders and never written to memory (issue #33).

    loss = kl_weight·Σ_rows KL(softmax(t/T) ‖ softmax(s/T)) + ce_weight·Σ_rows CE(s, y)
    s = hs @ W.T + b [N, V],  t = ht @ Wt.T + bt [N, V]

`pkd_fast.losses.kd_loss_reference` on the materialised logits is the specification (reductions
"batchmean", "sum" with divisors, "mean"; `pkd_fast.head_kd` is the public entry and the CPU path).

Three kernels, none with float atomics, so every result is deterministic:

  forward   one program per BLOCK_M rows: loop over BLOCK_V vocabulary tiles, each tile's student and
            teacher logits by a K-loop of tl.dot, streaming per-row statistics in base 2 (the same math
            as `kd_loss`, per row instead of per lane): m_s, d_s = Σ 2^((s - m_s)·τ), d_c at τ_c = log2 e
            for the CE when T ≠ 1, m_t, d_t, acc = Σ 2^((t - m_t)·τ)·(t - s), and s_y. It writes each row's
            KL and CE (the host sums them in a fixed order) and (m_s, log2 d_s, m_t, log2 d_t, log2 d_c).
  ∂hs       one program per BLOCK_M rows: recompute each vocabulary tile, g = ∂loss/∂s of the tile, and
            acc[BLOCK_M, H] += g @ W_tile (the whole padded hidden width in registers).
  ∂W, ∂b    one program per BLOCK_V vocabulary columns: loop over row blocks, recompute, g, and
            acc[BLOCK_V, H] += gᵀ @ hs_block, ∂b += Σ_rows g.

      g = kl_c·(p_s - p_t) + ce_c·valid·(softmax(s) - onehot(y)),  kl_c = α·T·r·go,  ce_c = (1-α)·r_ce·go

The coefficients are a device tensor (the divisors and the valid-label count never sync with the host).
Backward recomputes the logits twice (once per gradient kernel): 2 matmul-equivalents in forward, 6 in
backward. A teacher row that is all -inf adds no KL and no KL gradient. Not tuned on a GPU (none was
available): the block sizes are chosen to compile without spills for sm_80 and sm_90
(benchmarks/aot_compile.py). Student H up to MAX_HIDDEN (any teacher width); the top-k teacher runs `pkd_fast.head_kd`'s torch path.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ._common import check_kd_reduction

LOG2E = 1.0 / math.log(2.0)
LN2 = tl.constexpr(math.log(2.0))
F32_MIN = tl.constexpr(-3.4028234663852886e38)
MAX_HIDDEN = 1024  # the gradient kernels hold [block, next_pow2(H)] fp32 accumulators in registers
REDUCTIONS = ("batchmean", "sum", "mean")


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST (set under the CPU interpreter only): the operands go to fp32 first, as the
    interpreter's bf16/fp16 dot returns garbage (Triton 3.9); the values are the same, so is the result."""
    if UPCAST:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _tile_logits(h_ptr, w_ptr, bias_ptr, rows, cols, n_rows, n_cols, K, h_stride, w_stride,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """fp32 [BLOCK_M, BLOCK_V] logits h[rows] @ w[cols].T + bias[cols] (masked rows/columns give bias or 0)."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
    row_off = rows.to(tl.int64)[:, None] * h_stride
    col_off = cols.to(tl.int64)[:, None] * w_stride
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        h = tl.load(h_ptr + row_off + ks[None, :], mask=(rows[:, None] < n_rows) & (ks[None, :] < K), other=0.0)
        w = tl.load(w_ptr + col_off + ks[None, :], mask=(cols[:, None] < n_cols) & (ks[None, :] < K), other=0.0)
        acc = _dot(h, tl.trans(w), acc, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _head_kd_fwd_kernel(
    hs_ptr, w_ptr, b_ptr, ht_ptr, wt_ptr, bt_ptr, y_ptr, stats_ptr, rows_ptr,
    n_rows, n_cols, H, Ht, hs_stride, w_stride, ht_stride, wt_stride, tau, tau_ce, ignore_index,
    HAS_KL: tl.constexpr, HAS_CE: tl.constexpr, CE_OWN_STATS: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_TBIAS: tl.constexpr, PRECISION: tl.constexpr, T_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    m_s = tl.full((BLOCK_M,), F32_MIN, tl.float32)  # F32_MIN, not -inf: no inf - inf
    d_s = tl.zeros((BLOCK_M,), tl.float32)
    m_t, d_t, acc, d_c, s_y = m_s, d_s, d_s, d_s, d_s
    y = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index) if HAS_CE else rows
    for v0 in range(0, n_cols, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = (cols < n_cols)[None, :]
        s = _tile_logits(hs_ptr, w_ptr, b_ptr, rows, cols, n_rows, n_cols, H, hs_stride, w_stride,
                         HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, PRECISION, UPCAST)  # fmt: skip
        s = tl.where(col_ok, s, float("-inf"))
        m_new = tl.maximum(m_s, tl.max(s, 1))
        if CE_OWN_STATS:
            d_c = d_c * tl.exp2((m_s - m_new) * tau_ce) + tl.sum(tl.exp2((s - m_new[:, None]) * tau_ce), 1)
        d_s = d_s * tl.exp2((m_s - m_new) * tau) + tl.sum(tl.exp2((s - m_new[:, None]) * tau), 1)
        m_s = m_new
        if HAS_CE:
            s_y += tl.sum(tl.where(cols[None, :] == y[:, None], s, 0.0), 1)
        if HAS_KL:
            t = _tile_logits(ht_ptr, wt_ptr, bt_ptr, rows, cols, n_rows, n_cols, Ht, ht_stride, wt_stride,
                             HAS_TBIAS, BLOCK_M, BLOCK_V, BLOCK_K, T_PRECISION, UPCAST)  # fmt: skip
            t = tl.where(col_ok, t, float("-inf"))
            mt_new = tl.maximum(m_t, tl.max(t, 1))
            e = tl.exp2((t - mt_new[:, None]) * tau)
            scale = tl.exp2((m_t - mt_new) * tau)
            d_t = d_t * scale + tl.sum(e, 1)
            acc = acc * scale + tl.sum(tl.where(e > 0, e * (t - s), 0.0), 1)  # e = 0: t = -inf, no mass
            m_t = mt_new
    ld_s = tl.log2(d_s)
    ld_c = tl.log2(d_c) if CE_OWN_STATS else ld_s
    kl = tl.zeros((BLOCK_M,), tl.float32)
    ld_t = kl
    if HAS_KL:
        has_t = d_t > 0
        d_t = tl.where(has_t, d_t, 1.0)
        kl = tl.where(has_t, LN2 * ((acc / d_t - (m_t - m_s)) * tau + ld_s - tl.log2(d_t)), 0.0)
        m_t = tl.where(has_t, m_t, float("inf"))  # then every p_t of the row is 0 in backward
        ld_t = tl.log2(d_t)
    ce = kl * 0.0
    if HAS_CE:
        ce = tl.where(y != ignore_index, LN2 * ((m_s - s_y) * tau_ce + ld_c), 0.0)
    base = stats_ptr + rows.to(tl.int64) * 5
    tl.store(base, m_s, mask=row_ok)
    tl.store(base + 1, ld_s, mask=row_ok)
    tl.store(base + 2, m_t, mask=row_ok)
    tl.store(base + 3, ld_t, mask=row_ok)
    tl.store(base + 4, ld_c, mask=row_ok)
    tl.store(rows_ptr + rows.to(tl.int64) * 2, kl, mask=row_ok)
    tl.store(rows_ptr + rows.to(tl.int64) * 2 + 1, ce, mask=row_ok)


@triton.jit
def _grad_tile(
    hs_ptr, w_ptr, b_ptr, ht_ptr, wt_ptr, bt_ptr, y_ptr, stats_ptr, coef_ptr, rows, cols,
    n_rows, n_cols, H, Ht, hs_stride, w_stride, ht_stride, wt_stride, tau, tau_ce, ignore_index,
    HAS_KL: tl.constexpr, HAS_CE: tl.constexpr, CE_OWN_STATS: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_TBIAS: tl.constexpr, PRECISION: tl.constexpr, T_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """∂loss/∂s of the tile [rows, cols] (fp32, 0 off the matrix), recomputed from the forward's statistics."""
    row_ok = rows < n_rows
    ok = row_ok[:, None] & (cols < n_cols)[None, :]
    base = stats_ptr + rows.to(tl.int64) * 5
    m_s = tl.load(base, mask=row_ok, other=0.0)
    ld_s = tl.load(base + 1, mask=row_ok, other=0.0)
    s = _tile_logits(hs_ptr, w_ptr, b_ptr, rows, cols, n_rows, n_cols, H, hs_stride, w_stride,
                     HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, PRECISION, UPCAST)  # fmt: skip
    p_s = tl.exp2((s - m_s[:, None]) * tau - ld_s[:, None])
    g = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
    if HAS_KL:
        m_t = tl.load(base + 2, mask=row_ok, other=float("inf"))
        ld_t = tl.load(base + 3, mask=row_ok, other=0.0)
        kl_c = tl.where(m_t < float("inf"), tl.load(coef_ptr), 0.0)  # a row without a teacher: no KL gradient
        t = _tile_logits(ht_ptr, wt_ptr, bt_ptr, rows, cols, n_rows, n_cols, Ht, ht_stride, wt_stride,
                         HAS_TBIAS, BLOCK_M, BLOCK_V, BLOCK_K, T_PRECISION, UPCAST)  # fmt: skip
        g = kl_c[:, None] * (p_s - tl.exp2((t - m_t[:, None]) * tau - ld_t[:, None]))
    if HAS_CE:
        y = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index)
        ce_c = tl.where(y != ignore_index, tl.load(coef_ptr + 1), 0.0)
        p_c = p_s
        if CE_OWN_STATS:
            p_c = tl.exp2((s - m_s[:, None]) * tau_ce - tl.load(base + 4, mask=row_ok, other=0.0)[:, None])
        g += ce_c[:, None] * (p_c - tl.where(cols[None, :] == y[:, None], 1.0, 0.0))
    return tl.where(ok, g, 0.0)


@triton.jit
def _head_kd_bwd_dh_kernel(
    hs_ptr, w_ptr, b_ptr, ht_ptr, wt_ptr, bt_ptr, y_ptr, stats_ptr, coef_ptr, dh_ptr,
    n_rows, n_cols, H, Ht, hs_stride, w_stride, ht_stride, wt_stride, dh_stride, tau, tau_ce, ignore_index,
    HAS_KL: tl.constexpr, HAS_CE: tl.constexpr, CE_OWN_STATS: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_TBIAS: tl.constexpr, PRECISION: tl.constexpr, T_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    hcols = tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_M, BLOCK_H), tl.float32)
    for v0 in range(0, n_cols, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        g = _grad_tile(hs_ptr, w_ptr, b_ptr, ht_ptr, wt_ptr, bt_ptr, y_ptr, stats_ptr, coef_ptr, rows, cols,
                       n_rows, n_cols, H, Ht, hs_stride, w_stride, ht_stride, wt_stride, tau, tau_ce, ignore_index,
                       HAS_KL, HAS_CE, CE_OWN_STATS, HAS_BIAS, HAS_TBIAS, PRECISION, T_PRECISION, UPCAST,
                       BLOCK_M, BLOCK_V, BLOCK_K)  # fmt: skip
        w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * w_stride + hcols[None, :],
                    mask=(cols[:, None] < n_cols) & (hcols[None, :] < H), other=0.0)  # fmt: skip
        acc = _dot(g.to(w.dtype), w, acc, PRECISION, UPCAST)
    ptrs = dh_ptr + rows.to(tl.int64)[:, None] * dh_stride + hcols[None, :]
    tl.store(ptrs, acc.to(dh_ptr.dtype.element_ty), mask=(rows[:, None] < n_rows) & (hcols[None, :] < H))


@triton.jit
def _head_kd_bwd_dw_kernel(
    hs_ptr, w_ptr, b_ptr, ht_ptr, wt_ptr, bt_ptr, y_ptr, stats_ptr, coef_ptr, dw_ptr, db_ptr,
    n_rows, n_cols, H, Ht, hs_stride, w_stride, ht_stride, wt_stride, dw_stride, tau, tau_ce, ignore_index,
    HAS_KL: tl.constexpr, HAS_CE: tl.constexpr, CE_OWN_STATS: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_TBIAS: tl.constexpr, PRECISION: tl.constexpr, T_PRECISION: tl.constexpr, UPCAST: tl.constexpr, WRITE_DW: tl.constexpr,
    WRITE_DB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    hcols = tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_V, BLOCK_H), tl.float32)
    acc_b = tl.zeros((BLOCK_V,), tl.float32)
    for m0 in range(0, n_rows, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        g = _grad_tile(hs_ptr, w_ptr, b_ptr, ht_ptr, wt_ptr, bt_ptr, y_ptr, stats_ptr, coef_ptr, rows, cols,
                       n_rows, n_cols, H, Ht, hs_stride, w_stride, ht_stride, wt_stride, tau, tau_ce, ignore_index,
                       HAS_KL, HAS_CE, CE_OWN_STATS, HAS_BIAS, HAS_TBIAS, PRECISION, T_PRECISION, UPCAST,
                       BLOCK_M, BLOCK_V, BLOCK_K)  # fmt: skip
        if WRITE_DW:
            h = tl.load(hs_ptr + rows.to(tl.int64)[:, None] * hs_stride + hcols[None, :],
                        mask=(rows[:, None] < n_rows) & (hcols[None, :] < H), other=0.0)  # fmt: skip
            acc = _dot(tl.trans(g.to(h.dtype)), h, acc, PRECISION, UPCAST)
        if WRITE_DB:
            acc_b += tl.sum(g, 0)
    col_ok = cols < n_cols
    if WRITE_DW:
        ptrs = dw_ptr + cols.to(tl.int64)[:, None] * dw_stride + hcols[None, :]
        tl.store(ptrs, acc.to(dw_ptr.dtype.element_ty), mask=col_ok[:, None] & (hcols[None, :] < H))
    if WRITE_DB:
        tl.store(db_ptr + cols, acc_b.to(db_ptr.dtype.element_ty), mask=col_ok)


# -- host side ---------------------------------------------------------------------------------------------


def launch_config(hidden: int, dtype: torch.dtype) -> dict:
    """Blocks and warps of the three kernels for the student's hidden size `hidden` (the teacher's enters
    only K-loops) and input `dtype`: one function, so benchmarks/aot_compile.py compiles what a launch picks.
    The gradient kernels hold a [16, next_pow2(H)] fp32 accumulator and a [16 or 32, next_pow2(H)] operand
    tile: 8 warps keep both in registers at H ≤ 1024."""
    block_h = max(16, triton.next_power_of_2(hidden))
    fp32 = dtype == torch.float32  # IEEE fp32 dots on the FMA units: twice the operand registers
    return {
        "fwd": {"BLOCK_M": 64, "BLOCK_V": 64, "BLOCK_K": 16 if fp32 else 32, "num_warps": 8},
        "dh": {"BLOCK_M": 16, "BLOCK_V": 32 if block_h >= 1024 and not fp32 else 16, "BLOCK_K": 32, "BLOCK_H": block_h, "num_warps": 8},
        "dw": {"BLOCK_M": 32 if block_h >= 1024 else 16, "BLOCK_V": 16, "BLOCK_K": 32 if block_h >= 1024 else 16, "BLOCK_H": block_h, "num_warps": 8},
    }


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: exact fp32 dots, not TF32; bf16/fp16: ignored


def _unit_column_stride(x: torch.Tensor) -> torch.Tensor:
    """Rows may be strided (a slice of a bigger tensor); columns must be contiguous."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _coefficients(n_rows, n_cols, alpha, temperature, labels, ignore_index, reduction, divisors, device):
    """[kl_weight, ce_weight, kl_grad, ce_grad] fp32 on device: loss = kl_weight·ΣKL + ce_weight·ΣCE and
    g = kl_grad·(p_s - p_t) + ce_grad·(softmax(s) - onehot) per valid row."""
    one = torch.ones((), dtype=torch.float32, device=device)
    kl_r = {"batchmean": one / max(n_rows, 1), "mean": one / max(n_rows * n_cols, 1), "sum": one}[reduction]
    ce_r = one
    if reduction == "sum" and divisors is not None:
        kl_r, ce_r = one / divisors[1], one / divisors[0]
    elif reduction != "sum" and alpha != 1.0:
        ce_r = one / (labels != ignore_index).sum().clamp(min=1).float()
    return torch.stack([alpha * temperature**2 * kl_r, (1.0 - alpha) * ce_r, alpha * temperature * kl_r, (1.0 - alpha) * ce_r])


class FusedHeadKD(torch.autograd.Function):
    """Forward: the loss and per-row statistics; backward: the two gradient kernels, which recompute the logits."""

    @staticmethod
    def forward(ctx, hs, W, b, ht, Wt, bt, labels, temperature, alpha, ignore_index, reduction, divisors):
        n_rows, hidden = hs.shape
        n_cols = W.shape[0]
        has_kl, has_ce = alpha != 0.0, alpha != 1.0
        tau = LOG2E / temperature if has_kl else LOG2E
        y = labels if has_ce else hs
        ht_, Wt_ = (ht, Wt) if has_kl else (hs, W)
        cfg = launch_config(hidden, hs.dtype)
        flags = dict(HAS_KL=has_kl, HAS_CE=has_ce, CE_OWN_STATS=has_ce and tau != LOG2E, HAS_BIAS=b is not None,
                     HAS_TBIAS=has_kl and bt is not None, PRECISION=_precision(hs.dtype), T_PRECISION=_precision(ht_.dtype),
                     UPCAST=os.environ.get("TRITON_INTERPRET") == "1" and hs.device.type == "cpu")
        args = (hs, W, W if b is None else b, ht_, Wt_, Wt_ if bt is None or not has_kl else bt, y)
        dims = (n_rows, n_cols, hidden, ht_.shape[1], hs.stride(0), W.stride(0), ht_.stride(0), Wt_.stride(0))
        stats = torch.empty((n_rows, 5), dtype=torch.float32, device=hs.device)
        row_loss = torch.zeros((n_rows, 2), dtype=torch.float32, device=hs.device)
        f = cfg["fwd"]
        if n_rows:
            _head_kd_fwd_kernel[(triton.cdiv(n_rows, f["BLOCK_M"]),)](
                *args, stats, row_loss, *dims, tau, LOG2E, ignore_index, **flags,
                BLOCK_M=f["BLOCK_M"], BLOCK_V=f["BLOCK_V"], BLOCK_K=f["BLOCK_K"], num_warps=f["num_warps"],
            )  # fmt: skip
        coef = _coefficients(n_rows, n_cols, alpha, temperature, labels, ignore_index, reduction, divisors, hs.device)
        sums = row_loss.sum(0)
        loss = coef[0] * sums[0] + coef[1] * sums[1]
        ctx.save_for_backward(hs, W, b, ht_, Wt_, bt, y, stats, coef)
        ctx.launch = (args, dims, flags, cfg, tau, ignore_index)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        hs, W, b, ht_, Wt_, bt, y, stats, coef = ctx.saved_tensors
        _, dims, flags, cfg, tau, ignore_index = ctx.launch
        args = (hs, W, W if b is None else b, ht_, Wt_, Wt_ if bt is None or not flags["HAS_TBIAS"] else bt, y)
        n_rows, n_cols, hidden = dims[:3]
        go = (coef[2:] * grad_output.float()).contiguous()  # grad_output folded in on device
        d_hs = d_W = d_b = None
        if ctx.needs_input_grad[0]:
            d_hs = torch.empty_like(hs)
            c = cfg["dh"]
            if n_rows:
                _head_kd_bwd_dh_kernel[(triton.cdiv(n_rows, c["BLOCK_M"]),)](
                    *args, stats, go, d_hs, *dims, d_hs.stride(0), tau, LOG2E, ignore_index, **flags,
                    BLOCK_M=c["BLOCK_M"], BLOCK_V=c["BLOCK_V"], BLOCK_K=c["BLOCK_K"], BLOCK_H=c["BLOCK_H"],
                    num_warps=c["num_warps"],
                )  # fmt: skip
        want_w, want_b = ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2]
        if want_w or want_b:
            d_W = torch.empty_like(W) if want_w else None
            d_b = torch.empty_like(b) if want_b else None
            c = cfg["dw"]
            _head_kd_bwd_dw_kernel[(triton.cdiv(n_cols, c["BLOCK_V"]),)](
                *args, stats, go, W if d_W is None else d_W, W if d_b is None else d_b, *dims,
                W.stride(0) if d_W is None else d_W.stride(0), tau, LOG2E, ignore_index, **flags,
                WRITE_DW=want_w, WRITE_DB=want_b, BLOCK_M=c["BLOCK_M"], BLOCK_V=c["BLOCK_V"], BLOCK_K=c["BLOCK_K"],
                BLOCK_H=c["BLOCK_H"], num_warps=c["num_warps"],
            )  # fmt: skip
        return d_hs, d_W, d_b, None, None, None, None, None, None, None, None, None


def fused_head_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    temperature: float,
    labels: torch.Tensor | None = None,
    alpha: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    divisors: torch.Tensor | None = None,
) -> torch.Tensor:
    """`kd_loss_reference(hidden @ weight.T + bias, teacher_hidden @ teacher_weight.T + teacher_bias, ...)`
    without either [N, V] logits; differentiable w.r.t. hidden, weight and bias (the teacher is constant).
    Student rows and decoder share a dtype, as do the teacher's; H ≤ MAX_HIDDEN. Checks of the arguments'
    meaning (labels' range, shapes against each other) are `pkd_fast.head_kd.head_kd_loss`'s."""
    check_kd_reduction(reduction, divisors)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    alpha, temperature = float(alpha), float(temperature)
    if not 0.0 < temperature < math.inf:
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    if hidden.dtype != weight.dtype or (alpha != 0.0 and teacher_hidden.dtype != teacher_weight.dtype):
        raise ValueError("each model's rows and decoder weight must share a dtype")
    if hidden.shape[1] > MAX_HIDDEN:  # the teacher's width only sets K-loops: any
        raise ValueError(f"the Triton head KD kernels take student hidden sizes up to {MAX_HIDDEN}, got {hidden.shape[1]}")
    if alpha != 1.0 and labels is None:
        raise ValueError("labels are required when alpha < 1 (the CE term has weight 1 - alpha)")
    if divisors is not None:
        divisors = divisors.float().contiguous()
    hidden, weight = _unit_column_stride(hidden), _unit_column_stride(weight)
    if alpha != 0.0:
        teacher_hidden = teacher_hidden.detach().contiguous()
        teacher_weight = teacher_weight.detach().contiguous()
        teacher_bias = None if teacher_bias is None else teacher_bias.detach().contiguous()
    labels = None if labels is None else labels.contiguous()
    return FusedHeadKD.apply(hidden, weight, None if bias is None else bias.contiguous(), teacher_hidden, teacher_weight,
                             teacher_bias, labels, temperature, alpha, int(ignore_index), reduction, divisors)
