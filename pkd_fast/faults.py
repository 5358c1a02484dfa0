"""Fault injection (PKD_FAST_FAULT): the points where the trainer, the checkpoints and the teacher cache let a
test kill or signal a process. Its own module because it is a test hook those writers share, not part of
any one of them (issue #29)."""

from __future__ import annotations

import os
import signal

# Fault injection for the tests of crash safety, signals and the non-finite guard: "PHASE@N" is met at the
# N-th pass of that phase on every rank; ":rankR" narrows it to one rank, ":SIGTERM" (any signal's name) sends
# that signal instead of SIGKILL, e.g. "step@3:rank1:SIGTERM".
FAULT_ENV = "PKD_FAST_FAULT"


def fault_here(phase: str, n: int) -> bool:
    """Whether PKD_FAST_FAULT names this phase, count and (when it names one) this process's rank."""
    spec = os.environ.get(FAULT_ENV)
    if spec is None:
        return False
    where, *options = spec.split(":")
    ranks = [o[4:] for o in options if o.startswith("rank")]
    return where == f"{phase}@{n}" and all(r == os.environ.get("RANK", "0") for r in ranks)


def fault_point(phase: str, n: int) -> None:
    """SIGKILL (or the signal PKD_FAST_FAULT names) this process here when it names this phase and count."""
    if fault_here(phase, n):
        name = next((o for o in os.environ[FAULT_ENV].split(":")[1:] if o.startswith("SIG")), "SIGKILL")
        os.kill(os.getpid(), signal.Signals[name])
