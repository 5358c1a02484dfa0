"""The Distiller: one distillation step, written once, for every objective and for users' own loops.

A recipe (or a user) builds one `Distiller` per student from a frozen `DistillSpec` and a teacher. From then
on the step is data flowing one way (DESIGN.md):

    batch → student forward (hooks catch the relation layer's Q, K, V) → the rows the loss reads
          → the teacher's outputs for the same rows (live, cached or none: `teacher.TeacherSource`)
          → the student's PT rows through the width projection (a narrower student)
          → `losses.pkd_loss` → `DistillOutput` (the loss, its logged terms, what the guard watches)

What the Distiller owns, and nothing else does: which teacher source a spec needs (`teacher_source`), the
student's relation hooks (installed here, removed by `close`), cutting student and teacher rows the same
way (`teacher.Rows`), the projection (`prepare`), the loss and its log terms, and the units a step's sums
are divided by (`loss_units`). `pkd_fast.trainer.Trainer` calls it as its step; the recipes only choose the
spec, the data and the evaluation.

Two kinds of student output are read (`DistillSpec.logit_rows`): a classifier's one row per example
(None), or a masked-LM model's gathered rows ("masked" or "all", `models.MaskedLMRows`), whose CE and KL are
sums divided by the optimizer step's units (`pkd_fast.trainer`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pkd_fast.data import real_token_index
from pkd_fast.families import model_inputs
from pkd_fast.losses import LOSS_IMPLS, PT_REDUCTIONS, LossTerms, Relations, pkd_loss, resolve_impl
from pkd_fast.models import MaskedLMRows, WidthProjected, layer_map, mlm_row_count, mlm_rows, project_rows
from pkd_fast.relations import QkvCapture, RelationPlan
from pkd_fast.teacher import CachedTeacher, LiveTeacher, NoTeacher, Rows, TeacherSource

__all__ = ["DistillOutput", "DistillSpec", "Distiller", "STUDENT", "WATCHED"]

STUDENT = "student output"  # the watched name every step provides: the student's logits (its Q/K/V where it has none)
# What the non-finite guard watches each step (a live teacher's outputs and cache rows alike).
WATCHED = (STUDENT, "teacher logits", "teacher hidden states", "teacher Q/K/V", "loss")
PT_TOKENS = ("cls", "all", "mean")  # the patient loss's rows: models.pt_rows
LOGIT_ROWS = (None, "masked", "all")  # a classifier's row per example; a masked-LM model's masked or every real token


@dataclass(frozen=True)
class DistillSpec:
    """What one student learns, and how the loss reads it; frozen, so a run's step cannot drift.

    alpha, beta, gamma  the weights of T²·KL (1-α on CE), the patient term and MiniLMv2's relations
    temperature         T of the KD term
    layer_map           1-based teacher layers taught to student layers 1..len(layer_map) (PKD-Skip/Last;
                        empty: no patient term)
    pt_tokens           the patient term's rows: [CLS] ("cls"), every real token ("all"), each example's mean
    pt_reduction        the patient term's scale (`losses.patient_loss_reference`)
    relations           the relation term's layers and heads (`relations.RelationPlan`); None without one
    loss_impl           auto | triton | eager | compile (`losses.resolve_impl`)
    regression          a one-output regression head (STS-B): MSE to the label and to the teacher
    ce_weight           the masked-LM CE's weight w: w·(1-α)·CE
    logit_rows          None: a classifier's output row per example; "masked" / "all": a masked-LM model's
                        rows its KD reads (--kd-positions)
    student_head        a masked-LM student runs its head (False: no term reads logits, relations alone)
    """

    alpha: float = 0.5
    beta: float = 0.0
    gamma: float = 0.0
    temperature: float = 1.0
    layer_map: tuple[int, ...] = ()
    pt_tokens: str = "cls"
    pt_reduction: str = "elementwise_mean"
    relations: RelationPlan | None = None
    loss_impl: str = "auto"
    regression: bool = False
    ce_weight: float = 1.0
    logit_rows: str | None = None
    student_head: bool = True

    def __post_init__(self):
        object.__setattr__(self, "layer_map", tuple(self.layer_map))
        checks = [(self.pt_tokens in PT_TOKENS, f"pt_tokens must be one of {PT_TOKENS}, got {self.pt_tokens!r}"),
                  (self.pt_reduction in PT_REDUCTIONS, f"pt_reduction must be one of {PT_REDUCTIONS}, got {self.pt_reduction!r}"),
                  (self.loss_impl in LOSS_IMPLS, f"loss_impl must be one of {LOSS_IMPLS}, got {self.loss_impl!r}"),
                  (self.logit_rows in LOGIT_ROWS, f"logit_rows must be one of {LOGIT_ROWS}, got {self.logit_rows!r}"),
                  (0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha}"),
                  (self.beta >= 0.0 and self.gamma >= 0.0, f"beta and gamma must be >= 0, got {self.beta}, {self.gamma}"),
                  (self.temperature > 0.0, f"temperature must be > 0, got {self.temperature}"),
                  (not self.gamma or self.relations is not None, "gamma > 0 needs relations (a RelationPlan)")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def reads_teacher(self) -> bool:
        """Whether any term reads the teacher (FT reads none)."""
        return bool(self.alpha or self.layer_map or self.gamma)

    @property
    def masked_lm(self) -> bool:
        """Whether the student is a masked-LM model whose gathered rows the loss reads (else a classifier)."""
        return self.logit_rows is not None

    @property
    def relation_layer(self) -> int | None:
        """The teacher layer whose Q, K, V the relation term reads; None without the term."""
        return self.relations.teacher_layer if self.gamma else None

    def describe(self) -> str:
        """The spec in the run's log line."""
        relations = (f", relations γ={self.gamma:g} of layers {self.relations.teacher_layer}:{self.relations.student_layer} "
                     f"in {self.relations.heads} heads" if self.gamma else "")
        return f"α={self.alpha:g} β={self.beta:g} T={self.temperature:g}{relations}"


@dataclass
class DistillOutput:
    """One step's result: `loss` (what backward runs on), `terms` (its unweighted parts, when asked for:
    `losses.LossTerms`), and `watched`, the tensors the non-finite guard checks (`WATCHED` names)."""

    terms: LossTerms
    watched: dict[str, torch.Tensor | list[torch.Tensor]] = field(default_factory=dict)

    @property
    def loss(self) -> torch.Tensor:
        return self.terms.total


class Distiller:
    """One student's distillation step from a `DistillSpec` and a teacher (module docstring).

    teacher   an `nn.Module` run live (frozen, in the training dtype: `engines.frozen_teacher`), a zero-argument
              callable returning one (loaded only when the spec reads a live teacher), a teacher-output store
              (`cache.TeacherCache`, `mlm_cache.MlmTeacherCache`: read at collate time), a `TeacherSource`,
              or None (FT)
    student   the student model: its depth gives a `strategy`'s layer map, and the relation hooks go on it
    spec      a `DistillSpec`; or its fields as keywords, with `strategy` (ft, kd, skip, last) for the layer map

    `distiller(student, batch)` returns a `DistillOutput`. Used as a context manager (or `close()`), it
    removes the hooks it put on the student.
    """

    def __init__(self, teacher=None, student: torch.nn.Module | None = None, spec: DistillSpec | None = None, *,
                 strategy: str | None = None, ds_config: dict | None = None, device: torch.device | str | None = None,
                 **spec_fields):
        if spec is None:
            if strategy is not None:
                if "layer_map" not in spec_fields:
                    spec_fields["layer_map"] = layer_map(strategy, _depth(teacher), _depth(student))
                if strategy == "ft":
                    spec_fields.update(alpha=0.0, beta=0.0)
                elif strategy == "kd":
                    spec_fields["beta"] = 0.0
            spec = DistillSpec(**spec_fields)
        elif strategy is not None or spec_fields:
            raise ValueError("give a DistillSpec or its fields (and strategy), not both")
        self.spec = spec
        if device is None:
            device = next(student.parameters()).device if student is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.impl = self._impl(spec, self.device)
        self.teacher = self.teacher_source(teacher, spec, ds_config, self.device)
        self.capture = QkvCapture(student, spec.relations.student_layer) if spec.gamma else None

    @staticmethod
    def _impl(spec: DistillSpec, device: torch.device) -> str:
        """Who computes the terms (`losses.resolve_impl`); wide: vocabulary-sized logits or every token's states."""
        return resolve_impl(spec.loss_impl, device, wide=spec.masked_lm or (spec.pt_tokens == "all" and bool(spec.layer_map)))

    # -- what the step reads of the teacher ----------------------------------------------------------
    @staticmethod
    def teacher_source(teacher, spec: DistillSpec, ds_config: dict | None, device: torch.device) -> TeacherSource:
        """What `spec` learns from: nothing (it reads no teacher), a store's rows read at collate time, or a
        frozen module run live on only what the loss reads (a fresh one per run: it is cast and moved)."""
        if isinstance(teacher, TeacherSource):
            return teacher
        if not spec.reads_teacher or teacher is None:
            if spec.reads_teacher:
                raise ValueError(f"the spec ({spec.describe()}, layer map {list(spec.layer_map)}) reads a teacher: give one")
            return NoTeacher()
        logits = spec.alpha > 0
        if hasattr(teacher, "reader"):  # a teacher-output store (a masked-LM one reads the KD rows the spec names)
            read_options = {"kd_positions": spec.logit_rows} if spec.masked_lm else {}
            return CachedTeacher(teacher, spec.layer_map, spec.pt_tokens, logits=logits, pin=device.type == "cuda",
                                 relation_layer=spec.relation_layer, **read_options)
        model = teacher if isinstance(teacher, torch.nn.Module) else teacher()
        if spec.masked_lm and not isinstance(model, MaskedLMRows):
            model = MaskedLMRows(model)
        return LiveTeacher(model, ds_config or {}, device, spec.layer_map, logits=logits, relation_layer=spec.relation_layer)

    def lookup(self) -> Callable[[dict], dict] | None:
        """What a loader's collate adds to each batch: the store's rows of a cached teacher and, for a patient
        term over every real token, their flat positions, so the step needs no host sync to find them."""
        read = self.teacher.lookup()
        if not (self.spec.pt_tokens == "all" and self.spec.layer_map):
            return read

        def with_token_index(batch: dict) -> dict:
            extra = read(batch) if read is not None else {}
            return {**extra, "token_index": real_token_index(batch["attention_mask"])}

        return with_token_index

    @property
    def loss_units(self) -> Callable[[dict], torch.Tensor] | None:
        """The trainer's `count_fn` (`pkd_fast.trainer`): a masked-LM micro-batch's [masked tokens, KL rows,
        real tokens], the units its CE and KL sums and relation query rows are divided by over the optimizer
        step; None for a classifier, whose terms are means per micro-batch."""
        if not self.spec.masked_lm:
            return None
        kl_rows = self.spec.logit_rows if self.spec.alpha else "masked"  # without a KL its divisor is unused
        return lambda batch: torch.stack([mlm_row_count(batch, "masked"), mlm_row_count(batch, kl_rows), mlm_row_count(batch, "all")])

    def prepare(self, student: torch.nn.Module, teacher_width: int) -> torch.nn.Module:
        """The module to train in place of `student` (`with_projection`); make it before the optimizer is."""
        return with_projection(student, teacher_width, len(self.spec.layer_map))

    def replace(self, **changes) -> Distiller:
        """This distiller with some spec fields changed (--beta-share's β, a benchmark's loss impl), sharing
        its teacher source and hooks (which decide what the teacher runs: change no field they read)."""
        other = copy.copy(self)
        other.spec = dataclasses.replace(self.spec, **changes)
        other.impl = self._impl(other.spec, self.device)
        return other

    def describe(self) -> str:
        """The run's log line: the spec, the loss implementation and where the teacher's outputs come from."""
        return f", layer map {list(self.spec.layer_map) or '-'}, {self.spec.describe()}, loss impl {self.impl}, {self.teacher.description}"

    # -- the step ------------------------------------------------------------------------------------
    def __call__(self, model, batch: dict, return_terms: bool = True, divisors: torch.Tensor | None = None) -> DistillOutput:
        """One micro-batch: the student's forward (`model`: the student, or the engine around it), the
        teacher's outputs for the same rows, the loss. `divisors`: a masked-LM micro-batch's share of its
        step's units (`loss_units`; None: the terms are this batch's means)."""
        spec, capture = self.spec, self.capture
        self.teacher.follow(batch["attention_mask"].device)
        need_hidden = bool(spec.layer_map)
        with capture.recording() if capture else contextlib.nullcontext():
            if spec.masked_lm:
                student = mlm_rows(model, batch, rows=spec.logit_rows if spec.alpha else "masked",
                                   output_hidden_states=need_hidden, head=spec.student_head)
                logits, labels, hidden, logit_index = student.logits, student.labels, student.hidden, student.row_index
            else:
                out = model(**model_inputs(model, batch), output_hidden_states=need_hidden)
                logits, labels, hidden, logit_index = out.logits, batch["labels"], out.hidden_states, None
        rows = Rows(logits=logit_index, tokens=self._token_rows(batch, logit_index),
                    pool_mask=batch["attention_mask"] if spec.pt_tokens == "mean" else None)
        t = self.teacher(batch, rows)
        s_rows = project_rows(model, rows.states(hidden, range(1, len(spec.layer_map) + 1))) if need_hidden else []
        student_qkv = torch.stack(capture.take()) if capture else None
        relations = Relations(student_qkv, t.qkv, batch["attention_mask"], spec.relations.heads) if capture else None
        terms = pkd_loss(logits, t.logits, labels, s_rows, t.hidden,
                         temperature=spec.temperature, alpha=spec.alpha, beta=spec.beta, regression=spec.regression,
                         pt_reduction=spec.pt_reduction, impl=self.impl, return_terms=return_terms, divisors=divisors,
                         ce_weight=spec.ce_weight, gamma=spec.gamma, relations=relations)
        output = next(x for x in (logits, student_qkv, *s_rows) if x is not None)  # what the student put out
        return DistillOutput(terms, {STUDENT: output, "loss": terms.total, **t.watched()})

    def _token_rows(self, batch: dict, logit_index: torch.Tensor | None) -> torch.Tensor | None:
        """The patient term's rows under --pt-tokens all: a masked-LM step's KL rows when they are every real
        token already, else the collate's positions (`lookup`), else found here (one host sync)."""
        spec = self.spec
        if not (spec.pt_tokens == "all" and spec.layer_map):
            return None
        if logit_index is not None and spec.logit_rows == "all" and spec.alpha:
            return logit_index
        found = batch.get("token_index")
        return found if found is not None else real_token_index(batch["attention_mask"])

    # -- the hooks -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove the hooks this distiller put on the student (it can no longer compute relations)."""
        if self.capture is not None:
            self.capture.remove()

    def __enter__(self) -> Distiller:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def with_projection(student: torch.nn.Module, teacher_width: int, pt_layers: int) -> torch.nn.Module:
    """The module to train: `student`, or, when its width differs from the teacher's and a patient term
    compares `pt_layers` of their states, `student` with TinyBERT's learned projection per layer
    (`models.WidthProjected`, whose maps train and checkpoint with it; `project_rows` applies them)."""
    if pt_layers and student.config.hidden_size != teacher_width:
        return WidthProjected(student, teacher_width, pt_layers)
    return student


def _depth(model) -> int:
    """A model's number of layers (its config's, through a wrapper or engine)."""
    if model is None:
        raise ValueError("a strategy's layer map needs the teacher and the student (their depths)")
    config = getattr(getattr(model, "module", model), "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no config to read its depth from; give layer_map")
    return config.num_hidden_layers
