"""benchmarks.bench_step's mlm-kd case at its tiny size: the masked-LM recipe's own step runs end to end and the
row has every field the results tables read. (tests/test_gpu_acceptance.py's dry run covers the pkd-cls case
and bench_mlm_step, both heads and both KL row sets, at the same sizes.)"""

from dataclasses import replace

import pytest
import torch

from benchmarks import bench_step, harness

ONCE = harness.Budget(warmup_ms=0, rep_ms=0, min_reps=1)  # one timed step after the warm-up: no numbers, every path
CPU = torch.device("cpu")


def test_mlm_kd_case_times_the_masked_lm_recipes_step():
    case = replace(bench_step.CASES["mlm-kd"], size=bench_step.TINY)
    (rows,) = bench_step.measure_case(case, (2,), CPU, True, ("eager",), ONCE)
    (row,) = rows
    assert "error" not in row, row.get("error")
    assert row["step"]["ms"] > 0 and row["loss"]["ms"] > 0 and row["loss_share"] > 0
    assert row["tokens_per_s"] == pytest.approx(row["samples_per_s"] * bench_step.TINY.seq, rel=1e-3)

