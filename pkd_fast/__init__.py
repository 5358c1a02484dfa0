"""pkd_fast: Patient Knowledge Distillation of BERT models on DeepSpeed, with fused Triton losses."""

__version__ = "0.1.0"
