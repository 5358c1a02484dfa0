"""Fused patient loss: Σ_l mean_i ‖ĥs_li − ĥt_li‖² over L layer pairs, forward and backward.

One launch covers every layer pair without stacking them: a small int64 table gives each layer's element
offset from the first layer's tensor and its row stride, so strided rows (a [CLS] slice `h[:, 0]` of
[B, S, H]) are read in place. Each program owns a tile of rows of one layer, holds whole rows in registers
(one read of the inputs), and writes the student gradient with every scale folded in; backward only
multiplies it by grad_output, as in `kd_loss`, and as there an fp16 student's gradient is kept in fp32
until then (`grad_buffer_dtype`: with the 1/(N·L·H) of elementwise_mean folded in, nearly all of it can
lie below fp16's smallest subnormal).
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import triton
import triton.language as tl

from ._common import check_layer_pairs
from .kd_loss import arrival_counter, finish_sum, grad_buffer_dtype, take_scaled_grad

MAX_HIDDEN = 16384  # a row lives in registers
TILE = 4096  # elements per program: rows of a layer × the padded hidden size
EPS = tl.constexpr(1e-12)  # F.normalize's clamp on the norm


# Per row of layer l (all fp32), with n = max(‖h‖, eps) and ĥ = h/n (F.normalize):
#   d = ĥs − ĥt,   loss_row = w·‖d‖²,   w = 1/N (mean), 1/(N·L·H) (elementwise_mean) or 1 (sum)
#   ∂loss/∂hs = 2w/n_s·(d − [‖hs‖ ≥ eps]·(ĥs·d)·ĥs)   (a clamped norm passes no gradient, as in torch)
# Without normalisation d = hs − ht and the gradient is 2w·d. The gradient goes to a contiguous
# [L, N, H] buffer in `grad_buffer_dtype` (fp32 for fp16); the loss partials are summed by `finish_sum`.
@triton.jit
def _patient_fwd_kernel(
    s_ptr, t_ptr, layout_ptr, g_ptr, loss_ptr, partial_ptr, counter_ptr,
    n_rows, n_cols, tiles_per_layer, weight,
    NORMALIZE: tl.constexpr, WRITE_GRAD: tl.constexpr, S_ALIGN: tl.constexpr, T_ALIGN: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    layer = pid // tiles_per_layer
    rows = (pid % tiles_per_layer) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    s_off = tl.multiple_of(tl.load(layout_ptr + 4 * layer), S_ALIGN)
    s_stride = tl.multiple_of(tl.load(layout_ptr + 4 * layer + 1), S_ALIGN)
    t_off = tl.multiple_of(tl.load(layout_ptr + 4 * layer + 2), T_ALIGN)
    t_stride = tl.multiple_of(tl.load(layout_ptr + 4 * layer + 3), T_ALIGN)
    rows64 = rows.to(tl.int64)[:, None]
    s = tl.load(s_ptr + s_off + rows64 * s_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + t_off + rows64 * t_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if NORMALIZE:
        norm_s = tl.sqrt(tl.sum(s * s, 1))
        inv_s = 1.0 / tl.maximum(norm_s, EPS)
        s_hat = s * inv_s[:, None]
        d = s_hat - t * (1.0 / tl.maximum(tl.sqrt(tl.sum(t * t, 1)), EPS))[:, None]
    else:
        d = s - t
    if WRITE_GRAD:
        if NORMALIZE:
            radial = tl.where(norm_s >= EPS, tl.sum(s_hat * d, 1), 0.0)
            g = (2.0 * weight * inv_s)[:, None] * (d - radial[:, None] * s_hat)
        else:
            g = 2.0 * weight * d
        g_rows = (layer * n_rows + rows).to(tl.int64)[:, None]
        tl.store(g_ptr + g_rows * n_cols + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=mask)
    partial = weight * tl.sum(tl.sum(d * d, 1), 0)
    finish_sum(partial_ptr, counter_ptr, loss_ptr, partial, tl.num_programs(0), BLOCK=1024)


def _align(x: torch.Tensor, offsets: Sequence[int], strides: Sequence[int]) -> int:
    """Elements per 16 bytes when every layer offset and row stride allows vector loads, else 1."""
    vec = max(1, 16 // x.element_size())
    aligned = x.data_ptr() % 16 == 0 and all(v % vec == 0 for v in (*offsets, *strides))
    return vec if aligned else 1


@functools.lru_cache(maxsize=64)
def _layout_table(layout: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The per-layer (offset, row stride) table on device; cached, as a model hands over the same layout."""
    table = torch.tensor(layout, dtype=torch.int64).view(-1, 4)
    if device.type == "cuda":  # pinned + non_blocking: the copy does not sync the host with the GPU
        return table.pin_memory().to(device, non_blocking=True)
    return table


def _rows(h: torch.Tensor, n_cols: int) -> torch.Tensor:
    """[*, H] as [N, H] rows with a unit column stride, without a copy where the strides allow."""
    rows = h.reshape(-1, n_cols)
    return rows if rows.stride(1) == 1 or n_cols == 1 else rows.contiguous()


def patient_blocks(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """BLOCK_R, BLOCK_H and num_warps of `_patient_fwd_kernel` for layers of `n_rows` rows of `n_cols`; one
    function, so that benchmarks/aot_compile.py compiles exactly the blocks the launcher can pick."""
    block_h = triton.next_power_of_2(n_cols)
    block_r = min(max(1, TILE // block_h), triton.next_power_of_2(n_rows))
    return block_r, block_h, max(1, min(8, block_r * block_h // 512))


def _patient_forward(student, teacher, normalize, reduction, write_grad):
    """student/teacher: L same-shape [*, H] layer tensors (views of a stacked input are fine)."""
    n_layers, n_cols = len(student), student[0].shape[-1]
    s_rows = [_rows(h, n_cols) for h in student]
    t_rows = [_rows(h, n_cols) for h in teacher]
    n_rows = s_rows[0].shape[0]
    s0, t0 = s_rows[0], t_rows[0]
    s_offs = [(h.data_ptr() - s0.data_ptr()) // h.element_size() for h in s_rows]
    t_offs = [(h.data_ptr() - t0.data_ptr()) // h.element_size() for h in t_rows]
    s_strides, t_strides = [h.stride(0) for h in s_rows], [h.stride(0) for h in t_rows]
    layout = tuple(v for quad in zip(s_offs, s_strides, t_offs, t_strides) for v in quad)
    table = _layout_table(layout, s0.device)
    weight = {"mean": 1.0 / n_rows, "elementwise_mean": 1.0 / (n_rows * n_layers * n_cols), "sum": 1.0}[reduction]
    block_r, block_h, num_warps = patient_blocks(n_rows, n_cols)
    tiles_per_layer = triton.cdiv(n_rows, block_r)
    n_prog = n_layers * tiles_per_layer
    device = s0.device
    grad = None
    if write_grad:
        grad = torch.empty((n_layers, n_rows, n_cols), dtype=grad_buffer_dtype(s0.dtype), device=device)
    loss = torch.empty((), dtype=torch.float32, device=device)
    partials = torch.empty(n_prog, dtype=torch.float32, device=device)
    _patient_fwd_kernel[(n_prog,)](
        s0, t0, table, grad if write_grad else s0, loss, partials, arrival_counter(device),
        n_rows, n_cols, tiles_per_layer, weight,
        NORMALIZE=normalize, WRITE_GRAD=write_grad,
        S_ALIGN=_align(s0, s_offs, s_strides), T_ALIGN=_align(t0, t_offs, t_strides),
        BLOCK_R=block_r, BLOCK_H=block_h, num_warps=num_warps,
    )  # fmt: skip
    return loss, grad


class FusedPatientLoss(torch.autograd.Function):
    """Loss and student gradient in forward; backward scales the gradient. Inputs after the flags are the
    student tensors then the teacher tensors: L layers each, or one stacked [L, ...] tensor each."""

    @staticmethod
    def forward(ctx, normalize, reduction, stacked, write_grad, *hidden):
        student, teacher = hidden[: len(hidden) // 2], hidden[len(hidden) // 2 :]
        ctx.stacked, ctx.shapes, ctx.dtype = stacked, [h.shape for h in student], student[0].dtype
        if stacked:
            student, teacher = student[0].unbind(0), teacher[0].unbind(0)
        loss, ctx.grad = _patient_forward(student, teacher, normalize, reduction, write_grad)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad = take_scaled_grad(ctx, "fused_patient_loss", grad_output, ctx.dtype)
        grads = [grad.view(ctx.shapes[0])] if ctx.stacked else [g.view(s) for g, s in zip(grad, ctx.shapes)]
        return None, None, None, None, *grads, *([None] * len(ctx.shapes))


def fused_patient_loss(
    student_hidden: Sequence[torch.Tensor] | torch.Tensor,
    teacher_hidden: Sequence[torch.Tensor] | torch.Tensor,
    normalize: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """`pkd_fast.losses.patient_loss_reference` in one kernel launch for all layer pairs.

    Layers are L tensors [*, H] (e.g. [N, H] rows, strided [CLS] slices welcome) or one stacked [L, *, H]
    tensor per side; student and teacher may differ in dtype. The teacher is frozen: it gets no gradient.
    """
    if not check_layer_pairs(student_hidden, teacher_hidden, reduction):
        return torch.zeros(())
    stacked = isinstance(student_hidden, torch.Tensor)
    if stacked != isinstance(teacher_hidden, torch.Tensor):
        raise ValueError("student and teacher hidden states must both be stacked tensors or both sequences")
    student = [student_hidden] if stacked else list(student_hidden)
    teacher = [teacher_hidden] if stacked else list(teacher_hidden)
    tensors = (*student, *teacher)
    shape = tensors[0].shape
    if any(h.shape != shape for h in tensors) or len(shape) < 1 + stacked or 0 in shape:
        got = [tuple(h.shape) for h in tensors]
        raise ValueError(f"every layer must have the same non-empty [*, H] shape, got {got}")
    if shape[-1] > MAX_HIDDEN:
        raise ValueError(f"hidden size {shape[-1]} exceeds the kernel's {MAX_HIDDEN}")
    for side in (student, teacher):
        if any(h.dtype != side[0].dtype or not h.dtype.is_floating_point for h in side):
            raise ValueError(f"the layers of one side must share a float dtype, got {[h.dtype for h in side]}")
    if any(h.device != tensors[0].device for h in tensors):
        raise ValueError("every hidden state must be on the same device")
    write_grad = torch.is_grad_enabled() and any(h.requires_grad for h in student)
    return FusedPatientLoss.apply(bool(normalize), reduction, stacked, write_grad, *student, *teacher)
