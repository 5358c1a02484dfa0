"""The GLUE task table: where each task lives in the classic `glue_data/` layout and on the hub, which
columns hold the text and the label, and how it is scored."""

from __future__ import annotations

from dataclasses import dataclass

from pkd_fast.errors import PkdError


@dataclass(frozen=True)
class Task:
    name: str  # CLI and hub config name (nyu-mll/glue)
    tsv_dir: str  # folder under the glue_data root
    text_a: str  # column names as in the TSV header (or as assigned for header-less files)
    text_b: str | None
    label: str
    labels: tuple[str, ...]  # label strings in the TSV, in the hub's id order; () for regression
    metrics: tuple[str, ...]  # the first one picks the best checkpoint / grid point
    dev_splits: tuple[str, ...] = ("dev",)  # TSV file stems; MNLI has matched and mismatched
    header: tuple[str, ...] | None = None  # column names for files without a header row (CoLA)
    label_names: tuple[str, ...] = ()  # what the classes mean, in id order (how hub checkpoints name them)
    label_range: tuple[float, float] = (float("-inf"), float("inf"))  # regression: the scores' scale
    skip_malformed_rows: bool = False  # the published file has malformed rows the GLUE processors skip (QQP)

    @property
    def regression(self) -> bool:
        return not self.labels

    @property
    def num_labels(self) -> int:
        return len(self.labels) or 1

    @property
    def id2label(self) -> dict[int, str]:
        """The names a fine-tuned model's config records for its classes (checked when it is reused)."""
        return dict(enumerate(self.label_names or self.labels or ("score",)))

    @property
    def main_metric(self) -> str:
        return self.metrics[0]


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("sst2", "SST-2", "sentence", None, "label", _BINARY, ("accuracy",), label_names=("negative", "positive")),
        Task("mrpc", "MRPC", "#1 String", "#2 String", "Quality", _BINARY, ("f1", "accuracy"),
             label_names=("not_equivalent", "equivalent")),
        Task("stsb", "STS-B", "sentence1", "sentence2", "score", (), ("pearson", "spearman"), label_range=(0.0, 5.0)),
        Task("qqp", "QQP", "question1", "question2", "is_duplicate", _BINARY, ("f1", "accuracy"),
             label_names=("not_duplicate", "duplicate"), skip_malformed_rows=True),
        Task(
            "mnli", "MNLI", "sentence1", "sentence2", "gold_label", ("entailment", "neutral", "contradiction"),
            ("accuracy",), dev_splits=("dev_matched", "dev_mismatched"),
        ),
        Task("qnli", "QNLI", "question", "sentence", "label", _NLI2, ("accuracy",)),
        Task("rte", "RTE", "sentence1", "sentence2", "label", _NLI2, ("accuracy",)),
        Task(
            "cola", "CoLA", "sentence", None, "label", _BINARY, ("matthews_correlation",),
            header=("source", "label", "notes", "sentence"), label_names=("unacceptable", "acceptable"),
        ),
    )
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name.lower()]
    except KeyError:
        raise PkdError(f"unknown task {name!r}; expected one of: {', '.join(TASKS)}") from None
