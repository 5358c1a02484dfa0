"""GLUE metrics as GLUE defines them, computed with scikit-learn and SciPy; and the dev split's two halves."""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from pkd_fast.tasks import Task

_METRICS = {
    "accuracy": lambda y, p: accuracy_score(y, p),
    "f1": lambda y, p: f1_score(y, p),
    "matthews_correlation": lambda y, p: matthews_corrcoef(y, p),
    "pearson": lambda y, p: pearsonr(y, p)[0],
    "spearman": lambda y, p: spearmanr(y, p)[0],
}


def predictions(logits: np.ndarray, task: Task) -> np.ndarray:
    """Scores for regression, arg-max classes otherwise."""
    return logits.reshape(-1) if task.regression else logits.argmax(-1)


def glue_metrics(logits: np.ndarray, labels: np.ndarray, task: Task) -> dict[str, float]:
    """The task's metrics in percent (GLUE tables print them that way)."""
    preds = predictions(np.asarray(logits), task)
    return {name: 100.0 * float(_METRICS[name](np.asarray(labels), preds)) for name in task.metrics}


# The dev split's halves: one picks hyperparameters, the other reports (studies/glue_table.py), so the
# numbers a table reports were not also the ones that chose its grid point. A fixed permutation: every run
# of every strategy splits the same way.
DEV_HALVES_SEED = 20191104  # the PKD paper's EMNLP date: any fixed number
DEV_HALVES = ("select", "report")


def dev_halves(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row positions (ascending) of the selection half and the reporting half of an n-row dev split."""
    order = np.random.default_rng(DEV_HALVES_SEED).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2 :])


def glue_metrics_with_halves(logits: np.ndarray, labels: np.ndarray, task: Task) -> dict[str, float]:
    """`glue_metrics` on the whole split, plus each half's as "select/<metric>" and "report/<metric>"; a
    half with no rows (a 1-row split's selection half) has none, rather than failing the run."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    metrics = glue_metrics(logits, labels, task)
    for half, rows in zip(DEV_HALVES, dev_halves(len(labels))):
        if len(rows):
            metrics.update({f"{half}/{name}": value for name, value in glue_metrics(logits[rows], labels[rows], task).items()})
    return metrics
