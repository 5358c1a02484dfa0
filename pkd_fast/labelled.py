"""Labelled data of the user's own: the data layer behind `--objective classify` and `--objective tokens` (#30).

GLUE tasks come with known columns and labels (pkd_fast.tasks); any other labelled dataset does not, so this
module reads it and settles its columns and label space once, with one clear `PkdError` for each thing that
can be wrong with it, before a model is built. The recipes use it in three steps:

1. `load_labelled(train_file=..., validation_file=...)` (or `dataset=` a hub name or a `save_to_disk` folder)
   reads CSV, TSV, JSON, JSON Lines, Parquet (each optionally gzipped) and CoNLL files through `datasets`'
   own builders into a DatasetDict with splits "train", "validation", "test".
2. `prepare_classification(dsd, ("sentence",), "label", teacher_id2label)` gives columns text_a[, text_b],
   label and a `LabelSpace` (problem type, class names, id2label/label2id for the student's config);
   `prepare_tokens(dsd)` gives tokens, tags and the tag LabelSpace.
3. The recipe tokenizes: text_a/text_b as GLUE pairs are; tokens with `align_tags`, which labels each word's
   first sub-token and masks the rest with -100. `pkd_fast.metrics.classification_metrics` and
   `token_metrics` score the predictions.
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pkd_fast.errors import PkdError

IGNORE_INDEX = -100  # the label of sub-tokens that carry no tag (continuations, specials, padding)

# Suffix -> (builder, builder options). TSV has no quoting (a field may start with a lone `"`, as GLUE's do);
# in CSV only an empty cell is missing: pandas' default would read the text "NA" or "None" as missing too.
_BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {"keep_default_na": False, "na_values": [""]}),
    ".tsv": ("csv", {"delimiter": "\t", "quoting": 3, "keep_default_na": False, "na_values": [""]}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
    ".conll": ("conll", {}),
}
_FORMAT_NAMES = {".csv": "CSV", ".tsv": "TSV", ".json": "JSON", ".jsonl": "JSON Lines", ".parquet": "Parquet"}
KNOWN_SUFFIXES = tuple(itertools.chain.from_iterable((s, s + ".gz") for s in _BUILDERS))

# Where each loaded split came from, for error messages ("validation split (dev.csv)").
_SOURCES: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()
_MAX_ROWS_LISTED = 5


@dataclass(frozen=True)
class LabelSpace:
    """What the label column means: the problem type (as transformers' `config.problem_type` spells it) and
    the class names in id order (empty for regression)."""

    problem_type: str  # "single_label_classification" (tokens too: one class per word) | "regression" | "multi_label_classification"
    names: tuple[str, ...] = ()

    @property
    def num_labels(self) -> int:
        return 1 if self.problem_type == "regression" else len(self.names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}


# ---------------------------------------------------------------------------------------------- reading


def _suffix(path: Path) -> tuple[str, bool]:
    """The known suffix of `path` (".csv", ...) and whether it is gzipped; PkdError for any other."""
    name = path.name.lower()
    gz = name.endswith(".gz")
    base = name[:-3] if gz else name
    for suffix in _BUILDERS:
        if base.endswith(suffix):
            return suffix, gz
    raise PkdError(f"{path}: unknown file type {''.join(path.suffixes) or '(no suffix)'!r}; "
                   f"known: {', '.join(KNOWN_SUFFIXES)}")


def _root_cause(err: BaseException) -> BaseException:
    """The first error in `err`'s chain that is not `datasets`' generic wrapper."""
    seen = err
    while type(seen).__name__ == "DatasetGenerationError" and (seen.__cause__ or seen.__context__) is not None:
        seen = seen.__cause__ or seen.__context__
    return seen


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _bad_json_line(path: Path, gz: bool) -> str | None:
    """For a JSON Lines file the reader refused: "line N: what json says" of its first bad line (the reader's
    row numbers count within its block, not the file), or None when every line parses."""
    opener = gzip.open if gz else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        json.loads(line.strip())
                    except json.JSONDecodeError as err:
                        return f"line {number}: {err.msg} (column {err.colno})"
    except (OSError, UnicodeDecodeError) as err:
        return _one_line(err)
    return None


def _load_file(path: Path, split: str, cache_dir: str | None):
    import datasets
    import pyarrow as pa

    suffix, gz = _suffix(path)
    if not path.is_file():
        raise PkdError(f"{path}: no such file (given as the {split} file)")
    builder, options = _BUILDERS[suffix]
    if builder == "conll":
        return read_conll(path)
    tmp = None
    try:
        source = path
        if gz and builder == "parquet":  # the parquet builder reads no compressed files: unpack it first
            tmp = tempfile.mkdtemp(prefix="pkd_fast_parquet_")
            source = Path(tmp) / path.name[:-3]
            with gzip.open(path, "rb") as src, open(source, "wb") as dst:
                shutil.copyfileobj(src, dst)
        try:
            try:
                ds = datasets.load_dataset(builder, data_files=str(source), split="train", cache_dir=cache_dir, **options)
            except Exception as err:  # noqa: BLE001
                # The csv builder infers column types per 10,000-row chunk and casts later chunks to the first's:
                # a label column of ints that turns to names (or to 0.5) after row 10,000 fails to cast. Read
                # such a file in one chunk, so that each column's type is inferred from all its rows.
                if builder != "csv" or not isinstance(_root_cause(err), pa.ArrowException):
                    raise
                ds = datasets.load_dataset(builder, data_files=str(source), split="train", cache_dir=cache_dir,
                                           chunksize=2**62, **options)
        except Exception as err:  # noqa: BLE001 - every reader error becomes one line naming the file
            cause = _root_cause(err)
            if isinstance(cause, ValueError) and "corresponds to no data" in str(cause):
                raise PkdError(f"{path}: the {split} split is empty (no rows)") from err
            # The JSON reader's "in row N" counts within a block: find the file's line here instead.
            where = _bad_json_line(path, gz) if suffix == ".jsonl" else None
            raise PkdError(f"{path}: cannot read it as {_FORMAT_NAMES[suffix]}: {where or _one_line(cause)}") from err
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return ds


def _load_dataset_arg(dataset: str, dataset_config: str | None, cache_dir: str | None):
    import datasets

    folder = Path(dataset)
    try:
        if folder.is_dir() and ((folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(folder))
        else:
            loaded = datasets.load_dataset(dataset, dataset_config, cache_dir=cache_dir)
    except Exception as err:  # noqa: BLE001
        raise PkdError(f"dataset {dataset!r}{f' (config {dataset_config!r})' if dataset_config else ''}: "
                       f"cannot load it: {_one_line(_root_cause(err))}") from err
    if isinstance(loaded, datasets.Dataset):  # a single saved Dataset: it is the training split
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def load_labelled(train_file: str | Path | None = None, validation_file: str | Path | None = None,
                  test_file: str | Path | None = None, dataset: str | None = None, dataset_config: str | None = None,
                  train_split: str = "train", validation_split: str | None = "validation", test_split: str | None = None,
                  *, cache_dir: str | None = None):
    """A DatasetDict with splits "train", "validation", "test" (those given) read from files or from `dataset`
    (a hub name, or a folder written by `save_to_disk`); `*_split` pick the dataset's splits (None: none).
    Files by suffix: .csv, .tsv, .json, .jsonl, .parquet, .conll, each optionally .gz. Raises PkdError for
    an unreadable file (naming it and the line where the reader says), an unknown suffix, a missing split or
    an empty one."""
    import datasets

    files = {"train": train_file, "validation": validation_file, "test": test_file}
    files = {split: Path(f) for split, f in files.items() if f is not None}
    if dataset is not None and files:
        raise PkdError(f"give either a dataset ({dataset!r}) or files ({', '.join(map(str, files.values()))}), not both")
    if dataset is None and not files:
        raise PkdError("no data: give a training file (or validation/test files), or a dataset")
    out = datasets.DatasetDict()
    if files:
        for split, path in files.items():
            out[split] = _load_file(path, split, cache_dir)
            _SOURCES[out[split]] = f"{split} split ({path})"
    else:
        loaded = _load_dataset_arg(dataset, dataset_config, cache_dir)
        for split, name in (("train", train_split), ("validation", validation_split), ("test", test_split)):
            if name is None:
                continue
            if name not in loaded:
                raise PkdError(f"dataset {dataset!r} has no split {name!r} (wanted as the {split} split); "
                               f"it has: {', '.join(loaded) or 'none'}")
            out[split] = loaded[name]
            _SOURCES[out[split]] = f"{split} split ({dataset}[{name}])" if name != split else f"{split} split ({dataset})"
    for split, ds in out.items():
        if len(ds) == 0:
            raise PkdError(f"the {_where(ds, split)} is empty (no rows)")
    return out


def _where(ds, split: str) -> str:
    """ "validation split (dev.csv)" for a split that load_labelled read, else "validation split"."""
    try:
        return _SOURCES.get(ds) or f"{split} split"
    except TypeError:
        return f"{split} split"


def _rows(rows: list[int]) -> str:
    """ "rows 3, 7 (2 in all)" with the first few rows, 1-based."""
    shown = ", ".join(str(r) for r in rows[:_MAX_ROWS_LISTED])
    more = ", ..." if len(rows) > _MAX_ROWS_LISTED else ""
    return f"row{'s' if len(rows) > 1 else ''} {shown}{more} ({len(rows)} in all)"


def _col(ds, name: str) -> list:
    """A column as a list, read in one go (`ds[name]` is a lazy column that decodes row by row: 100x slower)."""
    return ds.select_columns([name])[:][name]


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _require_columns(dsd, columns: tuple[str, ...]) -> None:
    for split, ds in dsd.items():
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            raise PkdError(f"the {_where(ds, split)} has no column {', '.join(map(repr, missing))}; "
                           f"its columns: {', '.join(ds.column_names)}")


def _generic(id2label: dict) -> bool:
    """True for transformers' placeholder names (LABEL_0, LABEL_1, ...): a teacher not fine-tuned on labels."""
    return all(str(name) == f"LABEL_{int(i)}" for i, name in id2label.items())


def _teacher_names(teacher_id2label: dict | None) -> tuple[str, ...] | None:
    """The teacher's class names in id order, or None when it has none to impose (None or LABEL_i names)."""
    if not teacher_id2label or _generic(teacher_id2label):
        return None
    ids = sorted(int(i) for i in teacher_id2label)
    if ids != list(range(len(ids))):
        raise PkdError(f"the teacher's id2label has ids {ids}, not 0..{len(ids) - 1}")
    by_id = {int(i): str(name) for i, name in teacher_id2label.items()}
    return tuple(by_id[i] for i in ids)


def _set(names) -> str:
    return "{" + ", ".join(sorted(map(str, names))) + "}"


def _fix_classes(train_names: tuple[str, ...], teacher: tuple[str, ...] | None, what: str) -> tuple[str, ...]:
    """The class names: the teacher's (its id order) when it has real ones, and then the training data's
    label set must be the same set; else the training data's (sorted)."""
    if teacher is None:
        if not train_names:
            raise PkdError("the training split has no labels at all (every multi-label row is empty)")
        return train_names
    if set(teacher) != set(train_names):
        hint = ("; integer labels are compared as text with the teacher's names, so write the names in the label "
                "column" if what == "int" else "")
        raise PkdError(f"the teacher was fine-tuned on labels {_set(teacher)} but the training data's labels are "
                       f"{_set(train_names)}{hint}")
    return teacher


# ----------------------------------------------------------------------------- sequence classification


def _kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple)):
        return "list"
    return type(value).__name__


def _numeric_text(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _check_label_values(values: list, where: str, column: str) -> str:
    """The kind of every label ("int", "float", "str", "list"); PkdError for a missing one or for a change
    of kind (ints then strings, numbers then lists), naming the row."""
    first_kind = None
    for row, value in enumerate(values, 1):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise PkdError(f"the {where} has no label in column {column!r} at row {row}")
        kind = _kind(value)
        if kind in ("int", "float") and first_kind in ("int", "float"):
            kind = first_kind if first_kind == "float" or kind == "int" else "float"
            first_kind = kind
            continue
        if first_kind is None:
            first_kind = kind
        elif kind != first_kind:
            raise PkdError(f"the {where}'s label column {column!r} changes type at row {row}: {value!r} is "
                           f"{kind}, the rows before it are {first_kind}")
    if first_kind == "str":  # a CSV reads "1, 0, pos" as text: numbers mixed with names is a broken column too
        numeric = [_numeric_text(v) for v in values]
        if any(numeric) and not all(numeric):
            row = next(i for i, n in enumerate(numeric, 1) if n != numeric[0])
            raise PkdError(f"the {where}'s label column {column!r} changes type at row {row}: {values[row - 1]!r} "
                           f"is {'a number' if numeric[row - 1] else 'a name'}, the rows before it are "
                           f"{'numbers' if numeric[0] else 'names'}")
    if first_kind == "list":
        for row, value in enumerate(values, 1):
            kinds = {_kind(v) for v in value}
            if len(kinds) > 1 or kinds & {"list", "float", "bool"}:
                raise PkdError(f"the {where}'s label column {column!r} at row {row} holds {value!r}: a multi-label "
                               "row is a list of class names or integer ids, all of one type")
    if first_kind not in ("int", "float", "str", "list", "bool"):
        raise PkdError(f"the {where}'s label column {column!r} holds {first_kind} values; expected integers, "
                       "names, numbers (regression) or lists (multi-label)")
    return first_kind


def _label_feature_names(ds, column: str, where: str, values: list):
    """A ClassLabel's names for an int label column or a list of them (hub datasets store classes so), else
    None; PkdError for an id that is no class of it (hub test splits hold -1: no label)."""
    import datasets

    feature = ds.features.get(column)
    feature = getattr(feature, "feature", feature)  # List(ClassLabel): multi-label
    if not isinstance(feature, datasets.ClassLabel):
        return None
    for row, value in enumerate(values, 1):
        for item in value if isinstance(value, list) else [value]:
            if not 0 <= int(item) < feature.num_classes:
                hint = ": -1 marks a row without a label (a hub dataset's test split)" if int(item) == -1 else ""
                raise PkdError(f"the {where} has label {item} at row {row}, which is no class of its column "
                               f"{column!r} (classes 0..{feature.num_classes - 1}){hint}")
    return list(feature.names)


def _label_kind_of_column(ds, column: str, kind: str) -> str:
    """A column whose dtype is float is regression even when every value is integral (1.0, 2.0)."""
    import datasets

    feature = ds.features.get(column)
    if isinstance(feature, datasets.Value) and feature.dtype.startswith("float"):
        return "float"
    return kind


def prepare_classification(dsd, text_columns: tuple[str, ...], label_column: str,
                           teacher_id2label: dict | None = None):
    """(DatasetDict with columns text_a[, text_b] and label, LabelSpace) for sequence classification.

    Labels: integers or strings are classes (the training split's set, sorted; a fine-tuned teacher's names
    in its id order instead, when it has real ones), floats are regression, lists are multi-label (encoded as
    multi-hot float vectors). Raises PkdError naming the split, column and rows for anything that cannot be
    trained on as given."""
    import datasets

    text_columns = tuple(text_columns)
    if len(text_columns) not in (1, 2):
        raise PkdError(f"give one or two text columns, not {len(text_columns)}: {', '.join(text_columns) or 'none'}")
    if label_column in text_columns:
        raise PkdError(f"column {label_column!r} is both a text column and the label column")
    _require_columns(dsd, (*text_columns, label_column))
    teacher = _teacher_names(teacher_id2label)
    if "train" not in dsd and teacher is None:
        raise PkdError(f"no training split to take the label set from (splits: {', '.join(dsd) or 'none'})")

    # Text: every cell a non-blank string (numbers a CSV parsed as numbers are read back as text).
    texts: dict[str, dict[str, list[str]]] = {}
    for split, ds in dsd.items():
        texts[split] = {}
        for out_name, column in zip(("text_a", "text_b"), text_columns):
            values = _col(ds, column)
            bad = [row for row, v in enumerate(values, 1) if v is None or not str(v).strip() or isinstance(v, (list, dict))]
            if bad:
                raise PkdError(f"the {_where(ds, split)} has empty or non-text cells in column {column!r} at {_rows(bad)}")
            texts[split][out_name] = [v if isinstance(v, str) else str(v) for v in values]

    # Labels: the kind per split; all splits must agree with training.
    labels = {split: _col(ds, label_column) for split, ds in dsd.items()}
    kinds = {}
    for split, ds in dsd.items():
        kinds[split] = _label_kind_of_column(ds, label_column, _check_label_values(labels[split], _where(ds, split), label_column))
    ref_split = "train" if "train" in dsd else next(iter(dsd))
    kind = kinds[ref_split]
    for split, other in kinds.items():
        if {other, kind} not in ({"int"}, {"float"}, {"str"}, {"list"}, {"bool"}, {"int", "float"}) or (kind == "int" and other == "float"
                                                                                                and not all(float(v).is_integer() for v in labels[split])):
            raise PkdError(f"the {_where(dsd[split], split)}'s labels in {label_column!r} are {other}, the "
                           f"{_where(dsd[ref_split], ref_split)}'s are {kind}")

    if kind == "float":
        if teacher is not None and len(teacher) > 1:
            raise PkdError(f"the label column {label_column!r} holds numbers (regression) but the teacher was "
                           f"fine-tuned as a classifier on labels {_set(teacher)}")
        space = LabelSpace("regression")
        encoded = {split: [float(v) for v in values] for split, values in labels.items()}
        feature = datasets.Value("float32")
    else:
        def items_of(split: str) -> list:
            return [item for row in labels[split] for item in row] if kind == "list" else labels[split]

        def names_of(split: str) -> list[str]:
            values = items_of(split)
            class_names = _label_feature_names(dsd[split], label_column, _where(dsd[split], split), labels[split])
            if class_names is not None:
                return [class_names[int(v)] for v in values]
            return [str(int(v)) if kind == "int" else str(v) for v in values]

        if "train" in dsd:
            items = items_of("train")
            class_names = _label_feature_names(dsd["train"], label_column, _where(dsd["train"], "train"), labels["train"])
            if class_names is not None:  # a ClassLabel: its id order
                train_names = tuple(class_names[v] for v in sorted({int(v) for v in items}))
            elif items and all(_kind(v) == "int" for v in items):  # ints: numerically
                train_names = tuple(str(v) for v in sorted({int(v) for v in items}))
            else:  # names (and the ints of a float column's integral values): as text
                train_names = tuple(sorted({str(int(v)) if kind == "int" else str(v) for v in items}))
            names = _fix_classes(train_names, teacher, kind)
        else:
            names = teacher
        space = LabelSpace("multi_label_classification" if kind == "list" else "single_label_classification", names)
        label2id = space.label2id
        encoded = {}
        for split in dsd:
            flat = names_of(split)
            for position, name in enumerate(flat):
                if name not in label2id:
                    row = position + 1
                    if kind == "list":  # position counts list items: find the row that holds it
                        counts = itertools.accumulate(len(r) for r in labels[split])
                        row = next(i for i, c in enumerate(counts, 1) if c > position)
                    raise PkdError(f"the {_where(dsd[split], split)} has label {name!r} at row {row}, which the "
                                   f"{'teacher' if 'train' not in dsd else 'training split'} does not have; known "
                                   f"labels: {_set(names)}")
            if kind == "list":
                out, it = [], iter(flat)
                for row in labels[split]:
                    hot = [0.0] * len(names)
                    for name in itertools.islice(it, len(row)):
                        hot[label2id[name]] = 1.0
                    out.append(hot)
                encoded[split] = out
            else:
                encoded[split] = [label2id[name] for name in flat]
        feature = datasets.List(datasets.Value("float32")) if kind == "list" else datasets.ClassLabel(names=list(names))

    out = datasets.DatasetDict()
    for split in dsd:
        columns = {**texts[split], "label": encoded[split]}
        features = datasets.Features({name: datasets.Value("string") for name in texts[split]} | {"label": feature})
        out[split] = datasets.Dataset.from_dict(columns, features=features)
        _SOURCES[out[split]] = _where(dsd[split], split)
    return out, space


# ----------------------------------------------------------------------------------- token classification


def read_conll(path: str | Path):
    """A Dataset with columns tokens and ner_tags (lists of strings) from a CoNLL-style file: one
    `word<TAB>tag` or `word tag` line per word (the word is the first field, the tag the last), sentences
    separated by blank or whitespace-only lines, `-DOCSTART-` lines skipped, optionally gzipped."""
    import datasets

    path = Path(path)
    if not path.is_file():
        raise PkdError(f"{path}: no such file")
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    sentences: list[list[str]] = []
    tags: list[list[str]] = []
    words, labels = [], []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                fields = line.split()
                if not fields or fields[0] == "-DOCSTART-":
                    if words:
                        sentences.append(words)
                        tags.append(labels)
                        words, labels = [], []
                    continue
                if len(fields) < 2:
                    raise PkdError(f"{path}:{number}: expected `word<TAB>tag` (or `word tag`), got {line.rstrip()!r}")
                words.append(fields[0])
                labels.append(fields[-1])
    except (OSError, UnicodeDecodeError, EOFError) as err:
        raise PkdError(f"{path}: cannot read it as CoNLL: {_one_line(err)}") from err
    if words:
        sentences.append(words)
        tags.append(labels)
    if not sentences:
        raise PkdError(f"{path}: no sentences in it")
    features = datasets.Features({"tokens": datasets.List(datasets.Value("string")),
                                  "ner_tags": datasets.List(datasets.Value("string"))})
    ds = datasets.Dataset.from_dict({"tokens": sentences, "ner_tags": tags}, features=features)
    _SOURCES[ds] = str(path)
    return ds


def _tag_names(ds, column: str):
    import datasets

    feature = ds.features.get(column)
    inner = getattr(feature, "feature", None)
    return list(inner.names) if isinstance(inner, datasets.ClassLabel) else None


def _sort_tags(names) -> tuple[str, ...]:
    """Tags sorted, "O" first when present (so id 0 is "outside", as most NER label maps have it)."""
    names = sorted(set(names))
    return tuple((["O"] if "O" in names else []) + [n for n in names if n != "O"])


def prepare_tokens(dsd, tokens_column: str = "tokens", tags_column: str = "ner_tags",
                   teacher_id2label: dict | None = None):
    """(DatasetDict with columns tokens (list of words) and tags (list of tag ids), LabelSpace) for token
    classification. Tags are strings or ints (ints of a ClassLabel feature mean its names); the tag set is
    the training split's, sorted with "O" first, or a fine-tuned teacher's names in its id order."""
    import datasets

    _require_columns(dsd, (tokens_column, tags_column))
    teacher = _teacher_names(teacher_id2label)
    if "train" not in dsd and teacher is None:
        raise PkdError(f"no training split to take the tag set from (splits: {', '.join(dsd) or 'none'})")
    rows: dict[str, tuple[list[list[str]], list[list[str]]]] = {}
    for split, ds in dsd.items():
        where = _where(ds, split)
        class_names = _tag_names(ds, tags_column)
        words_col, tags_col = _col(ds, tokens_column), _col(ds, tags_column)
        words_out, tags_out = [], []
        empty, tag_kind = [], None
        for row, (words, tags) in enumerate(zip(words_col, tags_col), 1):
            if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                raise PkdError(f"the {where}'s column {tokens_column!r} at row {row} is not a list of words: {words!r}")
            if not isinstance(tags, list):
                raise PkdError(f"the {where}'s column {tags_column!r} at row {row} is not a list of tags: {tags!r}")
            if len(words) != len(tags):
                raise PkdError(f"the {where} has {_n(len(words), 'word')} but {_n(len(tags), 'tag')} at row {row}")
            if not words or not all(w.strip() for w in words):
                empty.append(row)
            for tag in tags:
                kind = _kind(tag)
                if kind not in ("int", "str"):
                    raise PkdError(f"the {where}'s column {tags_column!r} at row {row} holds tag {tag!r}: tags are "
                                   "names or integer ids")
                if tag_kind is None:
                    tag_kind = kind
                elif kind != tag_kind:
                    raise PkdError(f"the {where}'s column {tags_column!r} changes type at row {row}: {tag!r} is "
                                   f"{kind}, the tags before it are {tag_kind}")
            if class_names is not None and not all(0 <= t < len(class_names) for t in tags):
                raise PkdError(f"the {where}'s column {tags_column!r} at row {row} holds tag ids {tags}, not all "
                               f"classes of it (0..{len(class_names) - 1})")
            words_out.append(words)
            tags_out.append([class_names[t] if class_names is not None else str(t) for t in tags])
        if empty:
            raise PkdError(f"the {where} has empty words (or no words) in column {tokens_column!r} at {_rows(empty)}")
        rows[split] = (words_out, tags_out)

    if "train" in dsd:
        seen = {t for row in rows["train"][1] for t in row}
        class_names = _tag_names(dsd["train"], tags_column)
        if class_names is not None:  # a ClassLabel's own order (its ids) rather than a re-sort
            train_names = tuple(n for n in class_names if n in seen)
        elif seen and all(t.lstrip("-").isdigit() for t in seen):
            train_names = tuple(str(t) for t in sorted(int(t) for t in seen))
        else:
            train_names = _sort_tags(seen)
        names = _fix_classes(train_names, teacher, "tags")
    else:
        names = teacher
    space = LabelSpace("single_label_classification", names)  # one class per word
    label2id = space.label2id
    out = datasets.DatasetDict()
    for split, (words_rows, tag_rows) in rows.items():
        for row, tags in enumerate(tag_rows, 1):
            for tag in tags:
                if tag not in label2id:
                    raise PkdError(f"the {_where(dsd[split], split)} has tag {tag!r} at row {row}, which the "
                                   f"{'teacher' if 'train' not in dsd else 'training split'} does not have; known "
                                   f"tags: {_set(names)}")
        features = datasets.Features({"tokens": datasets.List(datasets.Value("string")),
                                      "tags": datasets.List(datasets.ClassLabel(names=list(names)))})
        out[split] = datasets.Dataset.from_dict(
            {"tokens": words_rows, "tags": [[label2id[t] for t in tags] for tags in tag_rows]}, features=features)
        _SOURCES[out[split]] = _where(dsd[split], split)
    return out, space


def align_tags(tokenizer, words_batch: list[list[str]], tags_batch: list[list[int]], max_seq_length: int) -> dict:
    """Tokenize pre-split words and label the sub-tokens: each word's first sub-token gets its tag id, its
    other sub-tokens and the special tokens IGNORE_INDEX (-100), so a word counts once in loss and metrics.
    Returns input_ids, attention_mask (token_type_ids when the tokenizer makes them) and labels, unpadded
    and truncated to `max_seq_length` (words past it lose their tags). Needs a fast tokenizer (word_ids)."""
    if not getattr(tokenizer, "is_fast", False):
        raise PkdError(f"token classification needs a fast tokenizer (it maps sub-tokens to words); "
                       f"{type(tokenizer).__name__} is a slow one")
    if len(words_batch) != len(tags_batch):
        raise PkdError(f"align_tags: {len(words_batch)} sentences but {len(tags_batch)} tag lists")
    enc = tokenizer(list(words_batch), is_split_into_words=True, truncation=True, max_length=max_seq_length)
    labels = []
    for i, tags in enumerate(tags_batch):
        if len(tags) != len(words_batch[i]):
            raise PkdError(f"align_tags: sentence {i + 1} has {_n(len(words_batch[i]), 'word')} but {_n(len(tags), 'tag')}")
        row, previous = [], None
        for word in enc.word_ids(i):
            row.append(IGNORE_INDEX if word is None or word == previous else int(tags[word]))
            previous = word
        labels.append(row)
    out = {key: enc[key] for key in enc.keys()}
    out["labels"] = labels
    return out
