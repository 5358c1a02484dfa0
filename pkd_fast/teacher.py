"""Where a run's teacher outputs come from: one interface, so that nothing downstream asks.

A recipe builds one `TeacherSource` per run and from then on only calls it: the loader applies its
`lookup()` at collate time (a cache's rows are read there, off the training step), and the loss calls
`source(batch, rows)` once per micro-batch, after the student's forward, for a `TeacherOutputs`:

    logits   the teacher's logits of the rows the loss reads: dense [N, C] (GLUE's [B, C], the masked-LM
             objective's gathered [n, V]), or their top-k form `TopkLogits` (ids, values, lse at T), which
             `losses.pkd_loss` turns into sparse KD; None when the loss reads no teacher logits (α = 0)
    hidden   the mapped teacher layers (in map order) cut to the rows the patient loss reads, exactly as
             `models.pt_rows` cuts the student's: [CLS] [B, H], every real token [tokens, H], or each
             example's mean [B, H] (fp32); [] without a PT term
    qkv      the relation layer's (q, k, v), stacked [3, B, S, H] over the batch's padded length (MiniLMv2's
             relation term, `losses.Relations`); None without one

`Rows` says which rows those are; the recipe builds it once per batch and cuts the student's side with the
same `Rows.states`, so the two sides pair up whatever the source.

Sources: `NoTeacher` (FT runs, the masked-LM head fit), `LiveTeacher` (a frozen module under no_grad in the
training dtype, or a ZeRO-3 inference engine: `engines.frozen_teacher`; it runs only what the loss reads), and
`CachedTeacher` (a teacher-output store read at collate time: `cache.TeacherCache` and any store with the
same `reader`). A source is the only place that knows where the outputs come from.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from pkd_fast import engines
from pkd_fast.families import model_inputs
from pkd_fast.losses import TeacherLogits, TopkLogits
from pkd_fast.models import pt_rows
from pkd_fast.relations import QkvCapture

__all__ = ["CachedTeacher", "LiveTeacher", "NoTeacher", "Rows", "TeacherOutputs", "TeacherSource", "TopkLogits"]

# The columns a store's collate-time reader adds to a batch (`CachedTeacher` reads them back): dense logits
# [B, C] or [n, V], or the top-k form's three tensors; and the mapped layers' states [B, L, S, H] in map
# order, S = 1 for [CLS] or already-pooled rows, else the batch's padded length; and the relation layer's
# q, k, v [B, 3, S, H].
LOGITS, TOPK_IDS, TOPK_VALUES, TOPK_LSE, HIDDEN, QKV = (
    "teacher_logits", "teacher_topk_ids", "teacher_topk_values", "teacher_topk_lse", "teacher_hidden", "teacher_qkv")


@dataclass(frozen=True)
class Rows:
    """Which rows of one batch the loss reads; both sides are cut by the same `Rows`.

    logits     flat positions into [B·S] whose vocabulary logits the loss reads (masked LM:
               `models.mlm_row_index`); None: the model's one output row per example (a classifier)
    tokens     the patient loss's rows, flat positions into [B·S] of every real token (--pt-tokens all)
    pool_mask  the [B, S] attention mask: the patient loss reads each example's mean (--pt-tokens mean)
    With neither `tokens` nor `pool_mask` the patient loss reads the [CLS] state.
    """

    logits: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    pool_mask: torch.Tensor | None = None

    def states(self, hidden_states: Sequence[torch.Tensor], layers: Sequence[int]) -> list[torch.Tensor]:
        """`hidden_states[l]` for l in `layers`, cut to these rows (`models.pt_rows`)."""
        return pt_rows(hidden_states, layers, self.tokens, self.pool_mask)


@dataclass
class TeacherOutputs:
    """What the loss reads of the teacher for one batch (module docstring)."""

    logits: TeacherLogits | None = None
    hidden: list[torch.Tensor] = field(default_factory=list)
    qkv: torch.Tensor | None = None

    def watched(self) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """The tensors the trainer's non-finite guard watches (`trainer.WATCHED` names)."""
        watched = {}
        if self.logits is not None:
            watched["teacher logits"] = self.logits.tensors() if isinstance(self.logits, TopkLogits) else self.logits
        if self.hidden:
            watched["teacher hidden states"] = self.hidden
        if self.qkv is not None:
            watched["teacher Q/K/V"] = self.qkv
        return watched


class TeacherSource(abc.ABC):
    """A run's teacher: `layers` are the 1-based teacher layers the student's layers 1..k-1 learn from (the
    PT map; empty without PT), `logits` whether the loss reads the teacher's logits (α > 0), `relation_layer`
    the 1-based teacher layer whose Q, K, V the relation term reads (None: no relation term)."""

    description = "no teacher"  # for the run's log line

    def __init__(self, layers: Sequence[int] = (), *, logits: bool = False, relation_layer: int | None = None):
        self.layers, self.logits, self.relation_layer = tuple(layers), logits, relation_layer

    def lookup(self) -> Callable[[dict], dict] | None:
        """What the run's loader adds to each batch at collate time (None: nothing)."""
        return None

    def follow(self, device: torch.device) -> None:
        """Be where the batches are (a user's loop may move the student after the teacher was set up)."""

    @abc.abstractmethod
    def __call__(self, batch: dict, rows: Rows) -> TeacherOutputs:
        """The teacher's outputs for `batch` (on the device), cut to `rows`."""


class NoTeacher(TeacherSource):
    """No teacher: the run learns from its labels alone (FT, the masked-LM head fit)."""

    def __init__(self):
        super().__init__()

    def __call__(self, batch: dict, rows: Rows) -> TeacherOutputs:
        return TeacherOutputs()


class LiveTeacher(TeacherSource):
    """The teacher run on every batch, under no_grad, in the training dtype (`engines.frozen_teacher`: a
    module, or under ZeRO-3 a partitioned inference engine). `model` is taken over (cast, moved or
    partitioned), so a recipe hands each run a fresh one. It runs only what the loss reads: hidden states
    only for a PT map, and, for a masked-LM model (`models.MaskedLMRows`), its head only on the gathered
    rows and on none of them when the loss reads no logits (a headless teacher, read for relations alone,
    runs no head at all). With a `relation_layer`, forward hooks on that layer's projections catch its Q, K, V
    during the same forward (`relations.QkvCapture`); the batch then runs as one forward."""

    description = "live teacher"

    def __init__(self, model: torch.nn.Module, ds_config: dict, device: torch.device, layers: Sequence[int] = (), *,
                 logits: bool = True, relation_layer: int | None = None):
        super().__init__(layers, logits=logits, relation_layer=relation_layer)
        self.capture = QkvCapture(model, relation_layer) if relation_layer else None
        self.model, self.device = engines.frozen_teacher(model, ds_config, device), torch.device(device)

    def follow(self, device: torch.device) -> None:
        if device != self.device and isinstance(self.model, torch.nn.Module) and not hasattr(self.model, "module"):
            self.model.to(device)  # a plain frozen module (a ZeRO-3 engine stays where DeepSpeed put it)
            self.device = device

    @torch.no_grad()
    def __call__(self, batch: dict, rows: Rows) -> TeacherOutputs:
        inputs, hidden = model_inputs(self.model, batch), bool(self.layers)  # the columns its family takes
        with self.capture.recording() if self.capture else contextlib.nullcontext():
            if rows.logits is None:  # a classifier: one output row per example, a CPU batch run by length
                out = (self.model(**inputs, output_hidden_states=hidden) if self.capture  # the hooks need one forward
                       else engines.teacher_forward(self.model, inputs, output_hidden_states=hidden))
                logits, states = out.logits, out.hidden_states
            else:  # a MaskedLMRows: the head on the gathered rows only (none when the loss reads no logits)
                row_index = rows.logits if self.logits else None
                logits, states = self.model(**inputs, row_index=row_index, output_hidden_states=hidden)
        qkv = torch.stack(self.capture.take()) if self.capture else None
        return TeacherOutputs(logits if self.logits else None, rows.states(states, self.layers) if hidden else [], qkv)


class CachedTeacher(TeacherSource):
    """The teacher's outputs read from a store (`cache.TeacherCache`, or any store with its `directory`,
    `topk_temperature` (None: dense logits) and `reader(layers, pt_tokens, pin=..., **read_options)`, which
    returns the collate-time lookup adding the columns named above: LOGITS or the TOPK_* three for the rows
    the loss reads, and HIDDEN): the loader's collate reads this batch's rows (`lookup`), so the step only
    picks them up, with no sync and no teacher on the device. The store pools --pt-tokens mean rows at
    collate time, so here they arrive as one row per example. `read_options` go to the store's reader (a
    masked-LM store's: which rows, --kd-positions)."""

    def __init__(self, store, layers: Sequence[int], pt_tokens: str, *, logits: bool = True, pin: bool = False,
                 relation_layer: int | None = None, **read_options):
        super().__init__(layers, logits=logits, relation_layer=relation_layer)
        self.store = store
        self.read = store.reader(self.layers, pt_tokens, pin=pin, relation_layer=relation_layer, **read_options)
        self.description = f"teacher outputs read from {store.directory}"

    def lookup(self) -> Callable[[dict], dict]:
        return self.read

    def __call__(self, batch: dict, rows: Rows) -> TeacherOutputs:
        logits = None
        if self.logits:
            logits = (TopkLogits(batch[TOPK_IDS], batch[TOPK_VALUES], batch[TOPK_LSE], self.store.topk_temperature)
                      if TOPK_IDS in batch else batch[LOGITS])
        hidden = []
        if self.layers:  # already in map order, and pooled where --pt-tokens mean: cut without a pool mask
            hidden = Rows(tokens=rows.tokens).states(batch[HIDDEN].unbind(1), range(len(self.layers)))
        return TeacherOutputs(logits, hidden, batch[QKV].transpose(0, 1) if self.relation_layer else None)
