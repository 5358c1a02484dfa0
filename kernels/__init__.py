"""Fused Triton kernels for the PKD losses, installed as `pkd_fast.kernels`.

From the repository root (`python -m pytest`, `python -m benchmarks...`) this folder is also found as a bare
`kernels`, which would shadow the PyPI package of that name that transformers (5.25 and later) imports. When
imported under that name, this module hands the name over to the installed package and defines nothing."""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is None:
        raise ImportError("no `kernels` package is installed (this folder is pkd_fast.kernels, not the PyPI `kernels`)")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import system returns what sys.modules holds once this body ends
    _spec.loader.exec_module(_module)
else:
    from .kd_loss import fused_kd_loss
    from .patient_loss import fused_patient_loss
    from .relation_loss import fused_relation_loss
    from .topk_kd_loss import fused_topk_kd_loss

    __all__ = ["fused_kd_loss", "fused_patient_loss", "fused_relation_loss", "fused_topk_kd_loss"]
