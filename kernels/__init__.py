"""Fused Triton kernels for the PKD losses (installed as pkd_fast.kernels)."""
