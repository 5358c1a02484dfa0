"""`DistillationTrainer`: PKD inside the Hugging Face `Trainer` that most users already run (TRL's and
ModelOpt's shape for distillation), for those who keep HF's loop, callbacks, logging and `--deepspeed` JSON
instead of pkd_fast's own trainer.

The student is the Trainer's `model`; the loss is a `pkd_fast.Distiller`'s, called on each batch as HF hands
it over (its `input_ids`, `attention_mask`, `labels` and, for BERT, `token_type_ids`). The teacher stays
outside the optimizer, frozen and in eval mode, and follows the student to whichever device HF puts it on.
Under HF's DeepSpeed integration the student is the engine's module, as with any model; the teacher is not
partitioned (it is replicated on each rank, as pkd_fast's own loop does below ZeRO-3).
"""

from __future__ import annotations

from transformers import Trainer

from pkd_fast.distill import STUDENT, Distiller

__all__ = ["DistillationTrainer"]


class DistillationTrainer(Trainer):
    """An HF `Trainer` whose loss is `distiller`'s: (1-α)·CE + α·T²·KL + β·PT (+ γ·relations).

    Everything else is HF's: `TrainingArguments` (its `deepspeed=` JSON included), the data collator, the
    optimizer and schedule, checkpoints. At each logging step the loss's unweighted terms (ce, kd, pt, rel)
    are logged beside HF's `loss`. Give the student as `model`, with `remove_unused_columns` left on only
    if its forward names the columns (a Hugging Face model does)."""

    def __init__(self, *args, distiller: Distiller, **kwargs):
        if not isinstance(distiller, Distiller):
            raise TypeError(f"distiller must be a pkd_fast.Distiller, got {type(distiller).__name__}")
        self.distiller = distiller
        self._terms: dict[str, float] = {}
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """The distiller's loss on this batch; the terms are read only on the steps HF logs (no host sync on
        the others). With `return_outputs` (HF's evaluation), the student's logits ride along."""
        logging = model.training and (self.state.global_step + 1) % max(1, int(self.args.logging_steps)) == 0
        out = self.distiller(model, inputs, return_terms=logging)
        if logging:
            self._terms = {name: float(value) for name in ("ce", "kd", "pt", "rel")
                           if (value := getattr(out.terms, name)) is not None}
        return (out.loss, {"logits": out.watched[STUDENT]}) if return_outputs else out.loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._terms:
            logs = {**logs, **self._terms}
            self._terms = {}
        super().log(logs, *args, **kwargs)
