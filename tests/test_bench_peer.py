"""The peer benchmark's arithmetic: s/step from clock reads, the median over rounds, the targets' ratios."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_peer import summarize, window_seconds  # noqa: E402


def test_windows_are_seconds_per_step_between_reads():
    assert window_seconds([0.0, 5.0, 7.0], [0, 10, 20]) == pytest.approx([0.5, 0.2])


def run(s_per_step: float, windows: int = 3) -> dict:
    return {"dev_accuracy": 80.0, "steps": 250, "train_seconds": 1.0, "windows": [s_per_step] * windows,
            "wall_windows": [2 * s_per_step] * windows}


def test_rounds_and_ratios():
    """A round disturbed by load moves no median; ratios read as 'faster by' for steps/s, 'cost' for s/step."""
    steps = {"textbrewer": (0.9, 0.9, 3.0), "pkd-live": (0.3, 0.3, 0.3), "pkd-cache": (0.2, 0.2, 0.2),
             "pkd-ft": (0.22, 0.22, 0.22), "plain-ft": (0.2, 0.2, 0.2)}
    rounds = [{name: run(s[r]) for name, s in steps.items()} for r in range(3)]
    out = summarize(rounds)
    assert out["rows"]["textbrewer"]["s_per_step"] == pytest.approx(0.9)
    assert out["rows"]["textbrewer"]["wall_s_per_step"] == pytest.approx(1.8)
    assert out["ratios"]["pkd-live / textbrewer steps/s"]["ratio"] == pytest.approx(3.0)
    assert out["ratios"]["pkd-cache / textbrewer steps/s"]["by_round"] == pytest.approx([4.5, 4.5, 15.0])
    assert out["ratios"]["pkd-ft / plain-ft s/step"]["ratio"] == pytest.approx(1.1)
