"""Test-wide setup. Triton kernels run under Triton's CPU interpreter when there is no GPU; the variable
must be set before triton is first imported, which is why it lives here."""

import os

if not os.environ.get("CUDA_VISIBLE_DEVICES", "x") or not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_SESSION_ENV = {k: os.environ.get(k) for k in _DIST_ENV}


@pytest.fixture(autouse=True)
def _no_leaked_process_group_env():
    """train.main called in-process (by a test or a module fixture) makes a one-process group and sets
    RANK, MASTER_PORT, ... in os.environ; a later subprocess would inherit them and try to join that
    group. Each test starts from the session's original values (the group itself stays initialised)."""
    for key, value in _SESSION_ENV.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    yield
