"""Test-wide setup. Triton kernels run under Triton's CPU interpreter when there is no GPU; the variable
must be set before triton is first imported, which is why it lives here."""

import os
import tempfile

if not os.environ.get("CUDA_VISIBLE_DEVICES", "x") or not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# What --precision auto measured about this machine (pkd_fast.precision.probe_run_step) is kept per session, so
# no test depends on what an earlier session (or the user's own runs) left in ~/.cache/pkd_fast.
os.environ.setdefault("PKD_FAST_CACHE", tempfile.mkdtemp(prefix="pkd_fast_cache_"))

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


# Test files by their serial seconds on a 2-core CPU (uncontended, 2026-12-06), slowest first. The README's
# command runs the suite on two pytest-xdist workers a file at a time (`-n 2 --dist loadfile`, so a
# module's fixtures are built once); handing out the slow files first keeps one worker from starting a
# 5-minute file when the other is nearly done. Files not named keep their place after these.
SLOWEST_FIRST = ("test_train.py", "test_multinode.py", "test_mlm_train.py", "test_kernels_aot.py", "test_trainer.py",
                 "test_families.py", "test_kernels.py", "test_cache.py", "test_glue_table.py", "test_gpu_acceptance.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's order is kept
