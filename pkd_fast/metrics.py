"""GLUE metrics as GLUE defines them, computed with scikit-learn and SciPy."""

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
