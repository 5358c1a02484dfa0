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

    @property
    def regression(self) -> bool:
        return not self.labels

    @property
    def num_labels(self) -> int:
        return len(self.labels) or 1

    @property
    def main_metric(self) -> str:
        return self.metrics[0]


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("sst2", "SST-2", "sentence", None, "label", _BINARY, ("accuracy",)),
        Task("mrpc", "MRPC", "#1 String", "#2 String", "Quality", _BINARY, ("f1", "accuracy")),
        Task("stsb", "STS-B", "sentence1", "sentence2", "score", (), ("pearson", "spearman")),
        Task("qqp", "QQP", "question1", "question2", "is_duplicate", _BINARY, ("f1", "accuracy")),
        Task(
            "mnli", "MNLI", "sentence1", "sentence2", "gold_label", ("entailment", "neutral", "contradiction"),
            ("accuracy",), dev_splits=("dev_matched", "dev_mismatched"),
        ),
        Task("qnli", "QNLI", "question", "sentence", "label", _NLI2, ("accuracy",)),
        Task("rte", "RTE", "sentence1", "sentence2", "label", _NLI2, ("accuracy",)),
        Task(
            "cola", "CoLA", "sentence", None, "label", _BINARY, ("matthews_correlation",),
            header=("source", "label", "notes", "sentence"),
        ),
    )
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name.lower()]
    except KeyError:
        raise PkdError(f"unknown task {name!r}; expected one of: {', '.join(TASKS)}") from None
