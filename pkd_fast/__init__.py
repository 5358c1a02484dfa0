"""pkd_fast: Patient Knowledge Distillation of BERT models on DeepSpeed, with fused Triton losses.

The public API (docs/api.md): `Distiller` (one distillation step from a `DistillSpec`, for any loop),
`DistillationTrainer` (a Hugging Face `Trainer` subclass), `student_from_teacher`, and the losses as
functions (`kd_loss`, `patient_loss`, `relation_loss`, `topk_kd_loss`: the fused kernel on CUDA, eager
elsewhere) and modules (`KDLoss`, `PatientLoss`, `RelationLoss`). Everything else is internal.

Names load on first use, so `import pkd_fast` (and the CLI's config parsing) costs no torch, transformers
or DeepSpeed import until one is asked for.
"""

import importlib

__version__ = "0.1.0"

_HOMES = {
    "Distiller": "pkd_fast.distill", "DistillSpec": "pkd_fast.distill", "DistillOutput": "pkd_fast.distill",
    "DistillationTrainer": "pkd_fast.hf_trainer",
    "student_from_teacher": "pkd_fast.models",
    "kd_loss": "pkd_fast.losses", "patient_loss": "pkd_fast.losses", "relation_loss": "pkd_fast.losses",
    "topk_kd_loss": "pkd_fast.losses", "KDLoss": "pkd_fast.losses", "PatientLoss": "pkd_fast.losses",
    "RelationLoss": "pkd_fast.losses", "TopkLogits": "pkd_fast.losses",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'pkd_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # the next lookup finds it without coming here
    return value


def __dir__():
    return sorted([*globals(), *__all__])
