"""Benchmarks of pkd_fast's losses and training step (see benchmarks/README.md).

Triton kernels run under Triton's CPU interpreter when there is no GPU; the variable must be set before
triton is first imported, and this package is imported before anything else by both `python -m
benchmarks.run_all` and `pytest benchmarks/`, which is why it lives here (as in tests/conftest.py).
"""

import os
import warnings

if not os.environ.get("CUDA_VISIBLE_DEVICES", "x") or not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # the interpreter evaluates masked-off lanes too (numpy's -inf - -inf): noise, not a result
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
