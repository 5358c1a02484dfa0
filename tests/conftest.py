"""Test-wide setup. Triton kernels run under Triton's CPU interpreter when there is no GPU; the variable
must be set before triton is first imported, which is why it lives here."""

import os

if not os.environ.get("CUDA_VISIBLE_DEVICES", "x") or not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
