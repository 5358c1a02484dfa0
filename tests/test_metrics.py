"""GLUE metrics on the dev split and on its two fixed halves (one picks hyperparameters, one reports)."""

import numpy as np
import pytest

from pkd_fast.metrics import dev_halves, glue_metrics, glue_metrics_with_halves
from pkd_fast.tasks import get_task


@pytest.mark.parametrize("n", [1, 2, 7, 408, 872])
def test_dev_halves_split_every_row_once_the_same_way_each_time(n):
    select, report = dev_halves(n)
    assert len(select) == n // 2 and len(report) == n - n // 2
    assert sorted(np.concatenate([select, report]).tolist()) == list(range(n))
    assert np.array_equal(select, np.sort(select)) and np.array_equal(report, np.sort(report))
    again = dev_halves(n)
    assert np.array_equal(again[0], select) and np.array_equal(again[1], report)


def test_dev_halves_are_a_shuffle_not_the_first_and_second_half():
    select, _ = dev_halves(872)
    assert 0.4 < (select < 436).mean() < 0.6  # drawn from both halves of the file's order


def test_each_half_is_scored_on_its_own_rows_only():
    task = get_task("sst2")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 100)
    logits = rng.normal(size=(100, 2))
    select, report = dev_halves(100)
    logits[report] = np.eye(2)[labels[report]]  # perfect on the report half only
    metrics = glue_metrics_with_halves(logits, labels, task)
    assert metrics["report/accuracy"] == 100.0
    assert metrics["select/accuracy"] == pytest.approx(glue_metrics(logits[select], labels[select], task)["accuracy"])
    assert metrics["accuracy"] == pytest.approx((metrics["select/accuracy"] + metrics["report/accuracy"]) / 2)


def test_a_one_row_split_is_scored_without_its_empty_half():
    """A 1-row dev set (--max-eval-samples 1) has an empty selection half: the run reports the rest."""
    metrics = glue_metrics_with_halves(np.array([[0.0, 1.0]]), np.array([1]), get_task("sst2"))
    assert metrics == {"accuracy": 100.0, "report/accuracy": 100.0}
