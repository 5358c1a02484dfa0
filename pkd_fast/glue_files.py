"""The GLUE files: a task's train and dev splits read from the classic `glue_data/` TSV folder (each row
checked, with the line it is on) or from the hub, as `datasets.Dataset`s of text_a, text_b and label. Its
own module, apart from the task table in `pkd_fast.tasks` that it reads, because that table is read by
the flag parser, which should not import `datasets`; and apart from `pkd_fast.data`, whose batching
serves every objective's rows, not only GLUE's (issue #29)."""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path

import datasets

from pkd_fast.errors import PkdError
from pkd_fast.tasks import Task

log = logging.getLogger("pkd_fast")

HUB_DATASET = "nyu-mll/glue"
# Text columns of the hub's GLUE configs, where they differ from sentence1/sentence2.
_HUB_TEXT = {
    "sst2": ("sentence", None), "cola": ("sentence", None), "qqp": ("question1", "question2"),
    "mnli": ("premise", "hypothesis"), "qnli": ("question", "sentence"),
}


def _parse_label(task: Task, raw: str, where: str) -> int | float:
    if task.regression:
        try:
            value = float(raw)
        except ValueError:
            raise PkdError(f"{where}: label {raw!r} is not a number (column {task.label!r})") from None
        low, high = task.label_range
        if not low <= value <= high:  # also refuses nan and inf, which no comparison admits
            raise PkdError(f"{where}: label {raw!r} outside [{low:g}, {high:g}] (column {task.label!r})")
        return value
    try:
        return task.labels.index(raw)
    except ValueError:
        raise PkdError(f"{where}: label {raw!r} not in {list(task.labels)} (column {task.label!r})") from None


def _utf8_lines(path: Path):
    """The file's text, refusing bytes that are not UTF-8 with the line they are on."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise PkdError(f"{path}:{line}: not UTF-8 text ({err.reason} at byte {err.start}); GLUE files are UTF-8") from None


def read_glue_tsv(path: Path, task: Task) -> dict[str, list]:
    """Rows of one GLUE TSV file as columns text_a, text_b, label, validated line by line.

    GLUE files are raw: quotes are text, not CSV quoting, and some start with a byte-order mark. A row
    with another number of fields than the header (too few, or more: a stray tab in a sentence, which
    would otherwise be cut off there) or an unparsable label is an error naming its line, except in tasks
    whose published files hold such rows (QQP's train.tsv): the standard GLUE processors skip them, and so
    does this reader, counting them and saying so.
    """
    if not path.is_file():
        raise PkdError(f"{path}: missing; expected the classic glue_data layout <glue-dir>/{task.tsv_dir}/<split>.tsv")
    rows = csv.reader(io.StringIO(_utf8_lines(path), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = list(task.header) if task.header else next(rows, None)
    if header is None:
        raise PkdError(f"{path}: empty file")
    wanted = [task.text_a, task.label] + ([task.text_b] if task.text_b else [])
    missing = [c for c in wanted if c not in header]
    if missing:
        raise PkdError(f"{path}:1: header lacks column(s) {missing}; found {header}")
    col = {c: header.index(c) for c in wanted}
    out: dict[str, list] = {"text_a": [], "text_b": [], "label": []}
    skipped: list[int] = []
    first_line = 1 if task.header else 2
    for line, row in enumerate(rows, start=first_line):
        where = f"{path}:{line}"
        try:
            if len(row) != len(header):  # more fields: a tab inside the text, which would shift or cut it
                raise PkdError(f"{where}: {len(row)} tab-separated fields, expected {len(header)} ({header})"
                               + ("; a tab inside the text?" if len(row) > len(header) else ""))
            label = _parse_label(task, row[col[task.label]].strip(), where)
        except PkdError:
            if not task.skip_malformed_rows:
                raise
            skipped.append(line)
            continue
        out["text_a"].append(row[col[task.text_a]])
        out["text_b"].append(row[col[task.text_b]] if task.text_b else None)
        out["label"].append(label)
    if not out["label"]:  # header only (or every row skipped): nothing to train on or score
        raise PkdError(f"{path}: no data rows" + (f" (all {len(skipped)} malformed)" if skipped else "") + "; expected one example per line")
    if skipped:
        log.warning("%s: skipped %d malformed row(s) (lines %s), as the GLUE processors do", path, len(skipped),
                    ", ".join(map(str, skipped[:5])) + (", …" if len(skipped) > 5 else ""))
    if not task.text_b:
        del out["text_b"]
    return out


def _from_glue_dir(task: Task, glue_dir: Path) -> datasets.DatasetDict:
    if not glue_dir.is_dir():
        raise PkdError(f"--glue-dir {glue_dir}: not a directory")
    folder = glue_dir / task.tsv_dir
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_dict(read_glue_tsv(folder / f"{split}.tsv", task))
         for split in ("train", *task.dev_splits)}
    )


def _from_hub(task: Task) -> datasets.DatasetDict:
    try:
        raw = datasets.load_dataset(HUB_DATASET, task.name)
    except Exception as err:  # offline, hub down, auth: all end the same way for the user
        raise PkdError(
            f"no GLUE data for {task.name}: the hub ({HUB_DATASET}) is unreachable ({type(err).__name__}). "
            f"Provide the classic glue_data folder with --glue-dir DIR or GLUE_DIR=DIR "
            f"(DIR/{task.tsv_dir}/train.tsv and {', '.join(s + '.tsv' for s in task.dev_splits)}; "
            "the GLUE download script writes this layout)"
        ) from None
    a, b = _HUB_TEXT.get(task.name, ("sentence1", "sentence2"))
    out = {}
    for split in ("train", *task.dev_splits):
        ds = raw[split.replace("dev", "validation")]
        columns = {"text_a": ds[a], "label": ds["label"]}
        if b:
            columns["text_b"] = ds[b]
        out[split] = datasets.Dataset.from_dict(columns)
    return datasets.DatasetDict(out)


def load_glue(task: Task, glue_dir: str | os.PathLike | None) -> datasets.DatasetDict:
    """Train and dev splits of `task`, from the TSV folder when given, else from the hub."""
    return _from_glue_dir(task, Path(glue_dir)) if glue_dir else _from_hub(task)
