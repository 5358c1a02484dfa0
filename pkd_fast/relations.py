"""MiniLMv2's self-attention relations, wired into a run: which layers and how many relation heads
(--relation-layers T:S, --relation-heads R, checked against the models' configs before any work), and the
Q, K, V of one layer taken from a model's normal forward.

Why hooks: the relation loss (`losses.relation_loss_reference`) reads the query/key/value projections'
outputs of one teacher layer and one student layer. Forward hooks on those projections (`families`
names where each family keeps them; ModernBERT fuses them in one `Wqkv`, split here) catch them during
the forward the run does anyway, so neither model runs twice and nothing recomputes the projections.
Hooks see outputs only, so a ZeRO-3 model (parameters partitioned, gathered around each forward) is
caught alike. A hook keeps the first output of each projection while recording: DeBERTa also runs its
query/key projections on the relative position embeddings, after the hidden states.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from pkd_fast.errors import PkdError
from pkd_fast.families import family_of, layer_projections


@dataclass(frozen=True)
class RelationPlan:
    """One run's relation term: the 1-based teacher and student layers whose Q, K, V are compared, and R."""

    teacher_layer: int
    student_layer: int
    heads: int


def relation_plan(layers: tuple[int, int] | None, heads: int | None, teacher_config, student_layers: int,
                  student_width: int) -> RelationPlan:
    """The --relation-layers / --relation-heads of a run against its teacher's config and its student's depth
    and width (one `error:` line each): the layers in range (default: the last of each), and R dividing both
    widths (default: the teacher's attention head count), so each side splits into R heads of its own size."""
    family_of(teacher_config, "--teacher")  # a family pkd_fast knows where Q, K, V are in (others are refused there)
    n = teacher_config.num_hidden_layers
    teacher_layer, student_layer = layers or (n, student_layers)
    if not 1 <= teacher_layer <= n:
        raise PkdError(f"--relation-layers {teacher_layer}:{student_layer}: teacher layer {teacher_layer} out of range; the teacher has layers 1..{n}")
    if not 1 <= student_layer <= student_layers:
        raise PkdError(f"--relation-layers {teacher_layer}:{student_layer}: student layer {student_layer} out of range; "
                       f"the student has layers 1..{student_layers}")
    teacher_width = teacher_config.hidden_size
    heads = heads or teacher_config.num_attention_heads
    if teacher_width % heads or student_width % heads:
        raise PkdError(f"--relation-heads {heads}: must divide both the teacher's hidden size {teacher_width} and the student's "
                       f"{student_width}; give --relation-heads R with R a divisor of {math.gcd(teacher_width, student_width)}")
    return RelationPlan(teacher_layer, student_layer, heads)


class QkvCapture:
    """Forward hooks on the query, key and value projections of 1-based `layer` of `model` (a Hugging Face
    model, or a wrapper or engine around one). Inside `recording()` the first output of each projection is
    kept; `take()` hands back (q, k, v), each [B, T, H], and forgets them. Outside `recording()` the hooks
    keep nothing (a backward's activation recomputation runs the forward again)."""

    def __init__(self, model: torch.nn.Module, layer: int):
        self.projections = layer_projections(model, layer)
        self.outputs: list[torch.Tensor | None] = [None] * len(self.projections)
        self.active = False
        self.handles = [module.register_forward_hook(self._keep(i)) for i, module in enumerate(self.projections)]

    def _keep(self, i: int):
        def hook(module, args, output):
            if self.active and self.outputs[i] is None:
                self.outputs[i] = output
        return hook

    @contextlib.contextmanager
    def recording(self):
        self.outputs = [None] * len(self.projections)
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def take(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, k, v) of the last recorded forward (a fused projection's output split in three)."""
        outputs, self.outputs = self.outputs, [None] * len(self.projections)
        if any(o is None for o in outputs):
            raise RuntimeError("no Q/K/V recorded: the model's forward did not run inside recording()")
        return tuple(outputs[0].chunk(3, dim=-1)) if len(outputs) == 1 else tuple(outputs)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
