"""Fused Triton kernels for the PKD losses (installed as pkd_fast.kernels, never as a bare `kernels`)."""

from .kd_loss import fused_kd_loss
from .patient_loss import fused_patient_loss
from .relation_loss import fused_relation_loss
from .topk_kd_loss import fused_topk_kd_loss

__all__ = ["fused_kd_loss", "fused_patient_loss", "fused_relation_loss", "fused_topk_kd_loss"]
