"""Fused Triton kernels for the PKD losses, installed as `pkd_fast.kernels`.

From the repository root (`python -m pytest`, `python -m benchmarks...`) this folder is also found as a bare
`kernels`, which would shadow the PyPI package of that name that transformers (5.25 and later) imports. When
imported under that name, this module hands the name over to the installed package and defines nothing.
Each file here is kernels + host wrapper + autograd Function and imports nothing of pkd_fast (`_common` holds
what the kernels share with their eager references in `pkd_fast.losses`)."""

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
    import importlib

    # Each kernel loads (and imports Triton) at its first use: `pkd_fast.losses` imports `_common` from here
    # on every path, the eager one included, and must not need Triton for it.
    _HOMES = {"fused_kd_loss": ".kd_loss", "fused_patient_loss": ".patient_loss",
              "fused_relation_loss": ".relation_loss", "fused_topk_kd_loss": ".topk_kd_loss"}
    __all__ = list(_HOMES)

    def __getattr__(name: str):
        if name not in _HOMES:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        return getattr(importlib.import_module(_HOMES[name], __name__), name)
