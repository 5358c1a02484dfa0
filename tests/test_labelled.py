"""pkd_fast.labelled (reading and preparing the user's own labelled data, #30) and the metrics for it."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")

from pkd_fast.errors import PkdError  # noqa: E402
from pkd_fast.labelled import (IGNORE_INDEX, KNOWN_SUFFIXES, LabelSpace, align_tags, load_labelled,  # noqa: E402
                               prepare_classification, prepare_tokens, read_conll)
from pkd_fast.metrics import classification_metrics, tag_scheme, token_metrics  # noqa: E402

WNUT = Path("/work/shared/data/ner/wnut17")
ROWS = [{"text": "a fine film", "label": "pos"}, {"text": "dull", "label": "neg"}, {"text": "great, really", "label": "pos"}]


@pytest.fixture
def load(tmp_path):
    """load_labelled with the arrow cache under tmp_path (no test shares another's cache)."""
    return lambda **kw: load_labelled(cache_dir=str(tmp_path / "cache"), **kw)


def write(path: Path, rows: list[dict]) -> Path:
    """rows written in the format path's suffix names, through pandas (not the code under test)."""
    import pandas as pd

    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    df = pd.DataFrame(rows)
    if name.endswith(".parquet"):
        df.to_parquet(path)
    elif name.endswith(".csv") or name.endswith(".tsv"):
        df.to_csv(path, index=False, sep="\t" if name.endswith(".tsv") else ",")
    elif name.endswith(".jsonl"):
        text = "".join(json.dumps(r) + "\n" for r in rows)
        (gzip.open(path, "wt") if path.name.endswith(".gz") else open(path, "w")).write(text)
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows))
    return path


def error(fn, *args, **kw) -> str:
    with pytest.raises(PkdError) as info:
        fn(*args, **kw)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------------------ reading


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".parquet", ".csv.gz", ".jsonl.gz", ".parquet.gz"])
def test_each_file_type_reads_the_same_rows(tmp_path, load, suffix):
    path = tmp_path / f"train{suffix}"
    if suffix == ".parquet.gz":
        plain = write(tmp_path / "plain.parquet", ROWS)
        with open(plain, "rb") as src, gzip.open(path, "wb") as dst:
            dst.write(src.read())
    elif suffix == ".csv.gz":
        path.write_bytes(gzip.compress(write(tmp_path / "plain.csv", ROWS).read_bytes()))
    else:
        write(path, ROWS)
    dsd = load(train_file=path)
    assert list(dsd) == ["train"]
    assert dsd["train"]["text"] == [r["text"] for r in ROWS] and dsd["train"]["label"] == [r["label"] for r in ROWS]


def test_tsv_keeps_quotes_and_csv_keeps_na_text(tmp_path, load):
    tsv = tmp_path / "train.tsv"
    tsv.write_text('text\tlabel\n"a lone quote\tpos\nNA\tneg\n')
    assert load(train_file=tsv)["train"]["text"] == ['"a lone quote', "NA"]
    csv = tmp_path / "train.csv"
    csv.write_text("text,label\nNA,pos\nNone,neg\n")
    assert load(train_file=csv)["train"]["text"] == ["NA", "None"]


def test_csv_field_of_200000_characters(tmp_path, load):
    big = "word " * 40_000
    path = write(tmp_path / "train.csv", [{"text": big, "label": 1}, {"text": "short", "label": 0}])
    assert load(train_file=path)["train"]["text"][0] == big


def test_splits_and_save_to_disk(tmp_path, load):
    train = write(tmp_path / "train.csv", ROWS)
    dev = write(tmp_path / "dev.jsonl", ROWS[:2])
    dsd = load(train_file=train, validation_file=dev, test_file=dev)
    assert {k: len(v) for k, v in dsd.items()} == {"train": 3, "validation": 2, "test": 2}

    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": dsd["train"], "dev": dsd["validation"]}).save_to_disk(str(folder))
    loaded = load(dataset=str(folder), validation_split="dev")
    assert loaded["train"]["text"] == dsd["train"]["text"] and len(loaded["validation"]) == 2
    message = error(load, dataset=str(folder))
    assert "no split 'validation'" in message and "train, dev" in message
    single = tmp_path / "single"
    dsd["train"].save_to_disk(str(single))
    assert list(load(dataset=str(single), validation_split=None)) == ["train"]


def test_reader_errors_name_the_file_and_line(tmp_path, load):
    message = error(load, train_file=tmp_path / "train.xlsx")
    assert "train.xlsx" in message and all(s in message for s in KNOWN_SUFFIXES)
    assert "no such file" in error(load, train_file=tmp_path / "nope.csv")

    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\na,1\nb,2,3\n")
    message = error(load, train_file=bad)
    assert str(bad) in message and "line 3" in message

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 2\n')
    message = error(load, train_file=bad)
    assert str(bad) in message and "line 2" in message

    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    assert str(bad) in error(load, train_file=bad)

    bad = tmp_path / "latin1.csv"
    bad.write_bytes(b"text,label\n\xe9t\xe9,1\n")
    assert str(bad) in error(load, train_file=bad)

    empty = tmp_path / "dev.csv"
    empty.write_text("text,label\n")
    message = error(load, train_file=write(tmp_path / "train.csv", ROWS), validation_file=empty)
    assert "dev.csv" in message and "validation split" in message and "empty" in message


# --------------------------------------------------------------------------------- sequence classification


def test_string_labels_sorted_and_int_labels_numeric(tmp_path, load):
    dsd = load(train_file=write(tmp_path / "train.csv", ROWS), validation_file=write(tmp_path / "dev.csv", ROWS[1:]))
    out, space = prepare_classification(dsd, ("text",), "label", None)
    assert space == LabelSpace("single_label_classification", ("neg", "pos"))
    assert space.id2label == {0: "neg", 1: "pos"} and space.label2id == {"neg": 0, "pos": 1} and space.num_labels == 2
    assert out["train"].column_names == ["text_a", "label"]
    assert out["train"]["label"] == [1, 0, 1] and out["validation"]["label"] == [0, 1]

    rows = [{"text": f"t{i}", "label": label} for i, label in enumerate([10, 2, 0, 5, 3, 1, 2, 10])]  # 6 classes
    out, space = prepare_classification(load(train_file=write(tmp_path / "six.jsonl", rows)), ("text",), "label")
    assert space.names == ("0", "1", "2", "3", "5", "10")
    assert out["train"]["label"] == [5, 2, 0, 4, 3, 1, 2, 5]


def test_sentence_pairs(tmp_path, load):
    rows = [{"premise": "p1", "hypothesis": "h1", "y": 0, "extra": 1}, {"premise": "p2", "hypothesis": "h2", "y": 1, "extra": 2}]
    out, space = prepare_classification(load(train_file=write(tmp_path / "t.csv", rows)), ("premise", "hypothesis"), "y")
    assert out["train"].column_names == ["text_a", "text_b", "label"]
    assert out["train"]["text_b"] == ["h1", "h2"] and space.names == ("0", "1")


def test_regression_and_multilabel(tmp_path, load):
    rows = [{"text": "a", "score": 1.0}, {"text": "b", "score": 4.5}, {"text": "c", "score": 2.0}]
    out, space = prepare_classification(load(train_file=write(tmp_path / "r.jsonl", rows)), ("text",), "score")
    assert space == LabelSpace("regression") and space.num_labels == 1 and space.id2label == {}
    assert out["train"]["label"] == [1.0, 4.5, 2.0]
    integral = [{"text": "a", "score": 1.0}, {"text": "b", "score": 2.0}]  # a float column stays regression
    assert prepare_classification(load(train_file=write(tmp_path / "i.parquet", integral)), ("text",), "score")[1].problem_type == "regression"

    rows = [{"text": "a", "tags": ["sport", "news"]}, {"text": "b", "tags": []}, {"text": "c", "tags": ["art"]}]
    out, space = prepare_classification(load(train_file=write(tmp_path / "m.jsonl", rows)), ("text",), "tags")
    assert space == LabelSpace("multi_label_classification", ("art", "news", "sport"))
    assert out["train"]["label"] == [[0.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    dev = write(tmp_path / "m_dev.jsonl", [{"text": "d", "tags": ["art"]}, {"text": "e", "tags": ["news", "food"]}])
    message = error(prepare_classification, load(train_file=tmp_path / "m.jsonl", validation_file=dev), ("text",), "tags")
    assert "'food'" in message and "row 2" in message and "validation split" in message


def test_teacher_id2label(tmp_path, load):
    dsd = load(train_file=write(tmp_path / "t.csv", ROWS))
    out, space = prepare_classification(dsd, ("text",), "label", {0: "pos", 1: "neg"})
    assert space.names == ("pos", "neg") and out["train"]["label"] == [0, 1, 0]  # the teacher's id order
    _, space = prepare_classification(dsd, ("text",), "label", {"0": "LABEL_0", "1": "LABEL_1"})
    assert space.names == ("neg", "pos")  # generic names impose nothing
    message = error(prepare_classification, dsd, ("text",), "label", {0: "negative", 1: "positive"})
    assert "{negative, positive}" in message and "{neg, pos}" in message
    # no training split (evaluation only): the teacher's names are the label space
    dev_only = load(validation_file=write(tmp_path / "dev.csv", ROWS[1:]))
    out, space = prepare_classification(dev_only, ("text",), "label", {0: "neg", 1: "pos"})
    assert space.names == ("neg", "pos") and out["validation"]["label"] == [0, 1]
    assert "no training split" in error(prepare_classification, dev_only, ("text",), "label")


def test_hub_style_classlabel_names(tmp_path, load):
    features = datasets.Features({"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "positive"])})
    ds = datasets.Dataset.from_dict({"sentence": ["bad", "good", "ok"], "label": [0, 1, 1]}, features=features)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hub"))
    dsd = load(dataset=str(tmp_path / "hub"), validation_split=None)
    out, space = prepare_classification(dsd, ("sentence",), "label", {0: "negative", 1: "positive"})
    assert space.names == ("negative", "positive") and out["train"]["label"] == [0, 1, 1]
    unlabelled = datasets.Dataset.from_dict({"sentence": ["?"], "label": [-1]}, features=features)
    message = error(prepare_classification, datasets.DatasetDict({"train": ds, "test": unlabelled}), ("sentence",), "label")
    assert "test split" in message and "label -1 at row 1" in message

    multi = datasets.Features({"sentence": datasets.Value("string"),
                               "label": datasets.List(datasets.ClassLabel(names=["joy", "anger", "awe"]))})
    ds = datasets.Dataset.from_dict({"sentence": ["a", "b"], "label": [[2, 0], [2]]}, features=multi)
    out, space = prepare_classification(datasets.DatasetDict({"train": ds}), ("sentence",), "label")
    assert space.names == ("joy", "awe") and out["train"]["label"] == [[1.0, 1.0], [0.0, 1.0]]


def test_bad_classification_inputs(tmp_path, load):
    train = write(tmp_path / "train.csv", ROWS)
    dsd = load(train_file=train)
    message = error(prepare_classification, dsd, ("sentence",), "label")
    assert "'sentence'" in message and "train.csv" in message and "text, label" in message

    dev = write(tmp_path / "dev.csv", [{"text": "x", "label": "pos"}, {"text": "y", "label": "meh"}])
    message = error(prepare_classification, load(train_file=train, validation_file=dev), ("text",), "label")
    assert "'meh'" in message and "validation split" in message and "row 2" in message

    blank = write(tmp_path / "blank.csv", [{"text": t, "label": "pos"} for t in ["ok", "", "  ", "fine", None]])
    message = error(prepare_classification, load(train_file=blank), ("text",), "label")
    assert "rows 2, 3, 5 (3 in all)" in message and "'text'" in message

    mixed = write(tmp_path / "mixed.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0}, {"text": "c", "label": "pos"}])
    message = error(prepare_classification, load(train_file=mixed), ("text",), "label")
    assert "row 3" in message and "changes type" in message
    mixed_csv = write(tmp_path / "mixed.csv", [{"text": "a", "label": "1"}, {"text": "b", "label": "pos"}])
    assert "row 2" in error(prepare_classification, load(train_file=mixed_csv), ("text",), "label")
    lists = write(tmp_path / "lists.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": [0, 1]}])
    assert "row 2" in error(prepare_classification, load(train_file=lists), ("text",), "label")

    late = tmp_path / "late.csv"  # the csv builder reads 10,000-row chunks: the name comes in the second
    late.write_text("text,label\n" + "".join(f"t{i},{i % 3}\n" for i in range(10_005)) + "x,pos\n")
    message = error(prepare_classification, load(train_file=late), ("text",), "label")
    assert "row 10006" in message and "'pos'" in message

    missing = tmp_path / "missing.csv"
    missing.write_text("text,label\na,1\nb,\nc,0\n")
    message = error(prepare_classification, load(train_file=missing), ("text",), "label")
    assert "no label" in message and "row 2" in message


# ------------------------------------------------------------------------------------ token classification


CONLL = """-DOCSTART- -X- O O

EU\tB-ORG
rejects\tO
German B-MISC
call O
 \t
Peter\tB-PER
Blackburn\tI-PER

\t
"""


def test_read_conll(tmp_path, load):
    path = tmp_path / "train.conll"
    path.write_text(CONLL)
    ds = read_conll(path)
    assert ds["tokens"] == [["EU", "rejects", "German", "call"], ["Peter", "Blackburn"]]
    assert ds["ner_tags"] == [["B-ORG", "O", "B-MISC", "O"], ["B-PER", "I-PER"]]
    gz = tmp_path / "dev.conll.gz"
    gz.write_bytes(gzip.compress(CONLL.encode()))
    assert read_conll(gz)["tokens"] == ds["tokens"]
    assert load(train_file=path, validation_file=gz)["validation"]["ner_tags"] == ds["ner_tags"]

    bad = tmp_path / "bad.conll"
    bad.write_text("EU\tB-ORG\nrejects\n")
    assert error(read_conll, bad).startswith(f"{bad}:2:")


@pytest.mark.skipif(not (WNUT / "train.conll").is_file(), reason="no WNUT 2017 data here")
def test_read_conll_wnut17():
    ds = read_conll(WNUT / "train.conll")
    assert len(ds) > 1000  # the README: 3,394 sentences, split by whitespace-only lines
    tags = {t for row in ds["ner_tags"] for t in row}
    assert "O" in tags and any(t.startswith("B-") for t in tags) and any(t.startswith("I-") for t in tags)
    assert all(len(w) == len(t) for w, t in zip(ds["tokens"], ds["ner_tags"]))


def test_prepare_tokens(tmp_path, load):
    path = tmp_path / "train.conll"
    path.write_text(CONLL)
    out, space = prepare_tokens(load(train_file=path))
    assert space.names == ("O", "B-MISC", "B-ORG", "B-PER", "I-PER") and space.problem_type == "single_label_classification"
    assert out["train"]["tags"] == [[2, 0, 1, 0], [3, 4]] and out["train"]["tokens"][1] == ["Peter", "Blackburn"]

    features = datasets.Features({"tokens": datasets.List(datasets.Value("string")),
                                  "ner_tags": datasets.List(datasets.ClassLabel(names=["O", "B-PER", "I-PER"]))})
    ds = datasets.Dataset.from_dict({"tokens": [["Ann", "Lee", "ran"]], "ner_tags": [[1, 2, 0]]}, features=features)
    out, space = prepare_tokens(datasets.DatasetDict({"train": ds}))
    assert space.names == ("O", "B-PER", "I-PER") and out["train"]["tags"] == [[1, 2, 0]]

    dev = tmp_path / "dev.conll"
    dev.write_text("Paris\tB-LOC\n")
    message = error(prepare_tokens, load(train_file=path, validation_file=dev))
    assert "'B-LOC'" in message and "row 1" in message and "dev.conll" in message

    rows = [{"words": ["a", "b"], "tags": ["O", "B-X"]}, {"words": ["c"], "tags": ["O", "O"]}]
    message = error(prepare_tokens, load(train_file=write(tmp_path / "t.jsonl", rows)), "words", "tags")
    assert "row 2" in message and "1 word but 2 tags" in message
    message = error(prepare_tokens, load(train_file=write(tmp_path / "u.jsonl", rows[:1])), "tokens", "tags")
    assert "'tokens'" in message and "words, tags" in message


def test_align_tags():
    from transformers import AutoTokenizer

    from pkd_fast.config import default_teacher

    tokenizer = AutoTokenizer.from_pretrained(default_teacher())
    words = [["Blackburnshire", "is", "nice"], ["Hi", "Zzyzxqwv"]]
    enc = align_tags(tokenizer, words, [[1, 0, 0], [0, 2]], max_seq_length=32)
    assert set(enc) >= {"input_ids", "attention_mask", "labels"}
    for i, sentence in enumerate(words):
        word_ids = tokenizer(sentence, is_split_into_words=True).word_ids()
        labels = enc["labels"][i]
        assert len(labels) == len(enc["input_ids"][i]) == len(word_ids)
        assert labels[0] == labels[-1] == IGNORE_INDEX  # [CLS], [SEP]
        firsts = [labels[j] for j, w in enumerate(word_ids) if w is not None and word_ids[j - 1] != w]
        assert firsts == [[1, 0, 0], [0, 2]][i]
        continuation = [labels[j] for j, w in enumerate(word_ids) if w is not None and word_ids[j - 1] == w]
        assert continuation and set(continuation) == {IGNORE_INDEX}  # both first words split into pieces
    short = align_tags(tokenizer, words[:1], [[1, 0, 0]], max_seq_length=4)
    assert len(short["labels"][0]) == 4 and short["labels"][0][1] == 1

    slow = type("SlowTokenizer", (), {"is_fast": False})()
    assert "fast tokenizer" in error(align_tags, slow, words, [[1, 0, 0], [0, 2]], 32)


# -------------------------------------------------------------------------------------------------- metrics


def test_classification_metrics():
    logits = np.array([[2.0, 0.1], [0.3, 0.9], [1.0, 0.0], [0.0, 1.0]])
    m = classification_metrics(logits, np.array([0, 1, 1, 1]), "single_label_classification")
    # preds 0,1,0,1: accuracy 3/4; F1 class 0 = 2/3 (p 1/2, r 1), class 1 = 4/5 (p 1, r 2/3); macro 11/15
    assert m["accuracy"] == pytest.approx(75.0) and m["macro_f1"] == pytest.approx(100 * 11 / 15)

    multi = classification_metrics(np.array([[3.0, -2.0, 1.0], [-1.0, 2.0, -3.0]]),
                                   np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]), "multi_label_classification")
    # preds [1,0,1],[0,1,0]: tp 2, fp 1, fn 1 -> micro 2/3; per class F1 1, 1, 0 -> macro 2/3
    assert multi["micro_f1"] == pytest.approx(200 / 3) and multi["macro_f1"] == pytest.approx(200 / 3)

    reg = classification_metrics(np.array([[1.0], [2.0], [3.5]]), np.array([1.0, 2.0, 3.0]), "regression")
    assert reg["spearman"] == pytest.approx(100.0) and 99 < reg["pearson"] < 100
    for preds, labels in [([1.0], [2.0]), ([1.0, 2.0], [2.0, 3.0]), ([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])]:
        with np.errstate(all="raise"):
            m = classification_metrics(np.array(preds)[:, None], np.array(labels), "regression")
        assert all(math.isfinite(v) for v in m.values())
    assert classification_metrics(np.array([[1.0], [2.0]]), np.array([2.0, 3.0]), "regression")["pearson"] == pytest.approx(100.0)
    assert classification_metrics(np.array([[1.0]]), np.array([2.0]), "regression") == {}


def test_token_metrics():
    id2label = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC"}
    labels = [[-100, 1, 2, 0, 3, -100], [-100, 1, 0, -100]]
    preds = [[0, 1, 2, 0, 0, 3], [0, 1, 0, 2]]
    m = token_metrics(preds, labels, id2label)
    # true entities: PER(1-2), LOC(4), PER(1); predicted: PER(1-2), PER(1): tp 2, fp 0, fn 1
    assert m["precision"] == pytest.approx(100.0) and m["recall"] == pytest.approx(200 / 3) and m["f1"] == pytest.approx(80.0)
    assert m["accuracy"] == pytest.approx(100 * 5 / 6)  # the -100 positions are not counted
    # strict IOB2: an entity that starts with I- is no entity
    assert token_metrics([[2, 0]], [[1, 0]], id2label)["f1"] == 0.0
    logits = np.eye(4)[[[0, 1, 2, 0, 0, 3], [0, 1, 0, 2, 0, 0]]]
    assert token_metrics(logits, [labels[0], labels[1] + [-100, -100]], id2label)["f1"] == pytest.approx(80.0)
    assert tag_scheme(["O", "B-X", "I-X"]) == "IOB2" and tag_scheme(["O", "S-X", "E-X", "B-X"]) == "IOBES"
    assert tag_scheme(["O", "PER", "LOC"]) is None and tag_scheme(["O", "B-X", "MISC"]) is None
    plain = token_metrics([[1, 1, 0]], [[1, 1, 0]], {0: "O", 1: "PER"})  # lenient default: runs of a type
    assert plain["f1"] == pytest.approx(100.0) and plain["accuracy"] == pytest.approx(100.0)
