"""GLUE metrics as GLUE defines them, computed with scikit-learn and SciPy; and the dev split's two halves."""

from __future__ import annotations

import warnings

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


# Labelled data of the user's own (pkd_fast.labelled, `--objective classify` / `--objective tokens`).


def _correlations(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman in percent, each left out where it is undefined (under 2 rows, or either side
    constant): as `glue_metrics_with_halves` leaves out a half it cannot score, rather than failing the run
    or reporting NaN."""
    out: dict[str, float] = {}
    if len(labels) < 2 or np.ptp(preds) == 0 or np.ptp(labels) == 0:
        return out
    for name in ("pearson", "spearman"):
        value = float(_METRICS[name](labels, preds))
        if np.isfinite(value):
            out[name] = 100.0 * value
    return out


def classification_metrics(logits: np.ndarray, labels: np.ndarray, problem_type: str) -> dict[str, float]:
    """Percent metrics by `LabelSpace.problem_type`: single-label accuracy and macro-F1; regression Pearson
    and Spearman (left out where undefined: fewer than 2 rows or constant predictions); multi-label micro-
    and macro-F1 of sigmoid(logits) > 0.5 against the multi-hot labels."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if problem_type == "single_label_classification":
        preds = logits.argmax(-1)
        return {"accuracy": 100.0 * float(accuracy_score(labels, preds)),
                "macro_f1": 100.0 * float(f1_score(labels, preds, average="macro", zero_division=0))}
    if problem_type == "regression":
        return _correlations(logits.reshape(-1), labels.reshape(-1).astype(np.float64))
    if problem_type == "multi_label_classification":
        preds = (1.0 / (1.0 + np.exp(-logits)) > 0.5).astype(int)
        truth = (labels > 0.5).astype(int)
        return {"micro_f1": 100.0 * float(f1_score(truth, preds, average="micro", zero_division=0)),
                "macro_f1": 100.0 * float(f1_score(truth, preds, average="macro", zero_division=0))}
    raise ValueError(f"unknown problem_type {problem_type!r}")


def tag_scheme(tags) -> str | None:
    """seqeval's scheme name for a tag set: "IOBES" when it has E-/S- tags, "BILOU" for L-/U-, "IOB2" for B-/I-
    only; None (seqeval's lenient conlleval-style default) for tags without such prefixes."""
    tags = [t for t in tags if t != "O"]
    if any("-" not in t for t in tags):  # "PER", "MISC": no scheme that strict mode could check
        return None
    prefixes = {t.split("-", 1)[0] for t in tags}
    if prefixes & {"E", "S"} and prefixes <= {"B", "I", "E", "S"}:
        return "IOBES"
    if prefixes & {"L", "U"} and prefixes <= {"B", "I", "L", "U"}:
        return "BILOU"
    if prefixes and prefixes <= {"B", "I"}:
        return "IOB2"
    return None


def token_metrics(pred_ids, label_ids, id2label: dict[int, str]) -> dict[str, float]:
    """Entity-level precision, recall and F1 (seqeval; strict mode with the scheme the tags show, see
    `tag_scheme`) and token accuracy, all in percent, over the labelled positions (label != -100: each word's
    first sub-token). Rows of `pred_ids` are ids shaped like `label_ids`' rows, or logits (..., num_tags);
    rows may differ in length (lists of lists)."""
    from seqeval import metrics as seq
    from seqeval import scheme as schemes

    names = {int(k): v for k, v in id2label.items()}
    y_true, y_pred = [], []
    for p_row, l_row in zip(pred_ids, label_ids, strict=True):
        p_row, l_row = np.asarray(p_row), np.asarray(l_row)
        if p_row.ndim == l_row.ndim + 1:
            p_row = p_row.argmax(-1)
        keep = l_row != -100
        y_true.append([names[int(i)] for i in l_row[keep]])
        y_pred.append([names[int(i)] for i in p_row[keep]])
    scheme = tag_scheme(names.values())
    kwargs = {"mode": "strict", "scheme": getattr(schemes, scheme)} if scheme else {}
    total = sum(len(r) for r in y_true)
    correct = sum(t == p for tr, pr in zip(y_true, y_pred) for t, p in zip(tr, pr))
    with warnings.catch_warnings():  # unprefixed tags ("PER"): seqeval warns once per entity, then counts it
        warnings.filterwarnings("ignore", message=".*seems not to be NE tag", category=UserWarning)
        return {"precision": 100.0 * float(seq.precision_score(y_true, y_pred, zero_division=0, **kwargs)),
                "recall": 100.0 * float(seq.recall_score(y_true, y_pred, zero_division=0, **kwargs)),
                "f1": 100.0 * float(seq.f1_score(y_true, y_pred, zero_division=0, **kwargs)),
                "accuracy": 100.0 * correct / total if total else 0.0}
