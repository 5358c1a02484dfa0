"""What the kernels share with their eager references in `pkd_fast.losses`: the reductions each loss takes
and the checks of a call, so both sides refuse the same calls with the same words. Here, not in losses.py,
because losses.py imports the kernels and the kernels import nothing of pkd_fast; and free of Triton, so
the eager path imports it without loading a kernel."""

from __future__ import annotations

from typing import Sequence

import torch

KD_REDUCTIONS = ("batchmean", "sum", "none", "mean")
PT_REDUCTIONS = ("elementwise_mean", "mean", "sum")


def check_kd_reduction(reduction: str, divisors: torch.Tensor | None) -> None:
    """Validate a KD call's reduction (and `divisors`, which divide sums only)."""
    if reduction not in KD_REDUCTIONS:
        raise ValueError(f"reduction must be one of {KD_REDUCTIONS}, got {reduction!r}")
    if divisors is not None and reduction != "sum":
        raise ValueError(f"divisors divide the sums: they need reduction 'sum', got {reduction!r}")


def check_layer_pairs(student_hidden: Sequence[torch.Tensor] | torch.Tensor, teacher_hidden: Sequence[torch.Tensor] | torch.Tensor,
                      reduction: str) -> int:
    """Validate a patient-loss call; the number of layer pairs."""
    if reduction not in PT_REDUCTIONS:
        raise ValueError(f"reduction must be one of {PT_REDUCTIONS}, got {reduction!r}")
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"{len(student_hidden)} student layers vs {len(teacher_hidden)} teacher layers")
    return len(student_hidden)
