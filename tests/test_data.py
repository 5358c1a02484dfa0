"""The GLUE loader: real TSVs, clear errors with file and line, dynamic padding."""

import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from pkd_fast import data, glue_files
from pkd_fast.config import default_teacher
from pkd_fast.errors import PkdError
from pkd_fast.tasks import get_task

GLUE_DIR = Path(os.environ.get("GLUE_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))
needs_glue = pytest.mark.skipif(not (GLUE_DIR / "SST-2").is_dir(), reason=f"no GLUE data at {GLUE_DIR}")


@needs_glue
@pytest.mark.parametrize("task, train_rows, dev_rows", [("sst2", 67349, 872), ("mrpc", 3668, 408), ("stsb", 5749, 1500)])
def test_reads_the_real_glue_files(task, train_rows, dev_rows):
    splits = glue_files.load_glue(get_task(task), GLUE_DIR)
    assert (len(splits["train"]), len(splits["dev"])) == (train_rows, dev_rows)
    row = splits["train"][0]
    assert row["text_a"] and ("text_b" in row) == (task != "sst2")
    if task == "stsb":
        assert isinstance(row["label"], float) and 0.0 <= row["label"] <= 5.0
    else:
        assert row["label"] in (0, 1)


@needs_glue
def test_mrpc_header_with_byte_order_mark_is_read():
    cols = glue_files.read_glue_tsv(GLUE_DIR / "MRPC" / "dev.tsv", get_task("mrpc"))
    assert cols["text_a"][0] and set(cols["label"]) == {0, 1}


def write(tmp_path, task_dir, text):
    folder = tmp_path / task_dir
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_text(text)
    (folder / "dev.tsv").write_text("sentence\tlabel\ngood\t1\n")
    return tmp_path


def test_bad_label_names_file_and_line(tmp_path):
    root = write(tmp_path, "SST-2", 'sentence\tlabel\nfine "quoted" text\t1\nbad row\tpositive\n')
    with pytest.raises(PkdError, match=r"SST-2/train.tsv:3: label 'positive' not in \['0', '1'\]"):
        glue_files.load_glue(get_task("sst2"), root)


def test_short_row_and_missing_column_and_missing_file(tmp_path):
    root = write(tmp_path, "SST-2", "sentence\tlabel\nonly one field\n")
    with pytest.raises(PkdError, match=r"train.tsv:2: 1 tab-separated fields, expected 2"):
        glue_files.load_glue(get_task("sst2"), root)
    write(tmp_path, "SST-2", "text\tlabel\nx\t1\n")
    with pytest.raises(PkdError, match=r"train.tsv:1: header lacks column\(s\) \['sentence'\]"):
        glue_files.load_glue(get_task("sst2"), root)
    with pytest.raises(PkdError, match=r"MRPC/train.tsv: missing; expected the classic glue_data layout"):
        glue_files.load_glue(get_task("mrpc"), root)


def test_quotes_are_text_not_csv_quoting(tmp_path):
    root = write(tmp_path, "SST-2", 'sentence\tlabel\n" a lone quote\t0\n')
    assert glue_files.load_glue(get_task("sst2"), root)["train"][0]["text_a"] == '" a lone quote'


def test_no_glue_dir_and_no_hub_says_how_to_provide_data(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(glue_files.datasets, "load_dataset", offline)
    with pytest.raises(PkdError, match=r"--glue-dir DIR or GLUE_DIR=DIR \(DIR/SST-2/train.tsv"):
        glue_files.load_glue(get_task("sst2"), None)


@needs_glue
def test_batches_are_padded_to_their_own_longest_row():
    tok = AutoTokenizer.from_pretrained(default_teacher())
    train = data.tokenize(data.subsample(glue_files.load_glue(get_task("sst2"), GLUE_DIR)["train"], 256, seed=0), tok, 128)
    assert sorted(train["example_idx"]) == list(range(256))
    loader = data.make_loader(train, tok, 16, train=True, seed=0)
    widths = {batch["input_ids"].shape[1] for batch in loader}
    assert all(w % 8 == 0 for w in widths) and len(widths) > 1 and max(widths) < 128
    for batch in loader:
        assert batch["attention_mask"].sum(1).max() > batch["input_ids"].shape[1] - 8


@pytest.mark.parametrize("task_dir, task, text", [
    ("SST-2", "sst2", "sentence\tlabel\ngood\t1\na stray\ttab\t0\n"),
    ("MRPC", "mrpc", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA.\tB.\n0\t3\t4\tOne\ttab.\tC.\n"),
])
def test_a_row_with_more_fields_than_the_header_names_its_line(tmp_path, task_dir, task, text):
    """A tab inside a sentence used to cut the row at the header's width, silently dropping text."""
    root = write(tmp_path, task_dir, text)
    fields = text.splitlines()[0].count("\t") + 1
    with pytest.raises(PkdError, match=rf"{task_dir}/train.tsv:3: {fields + 1} tab-separated fields, expected {fields} .*a tab inside"):
        glue_files.load_glue(get_task(task), root)


@pytest.mark.parametrize("task_dir, task, text", [("SST-2", "sst2", "sentence\tlabel\n"), ("CoLA", "cola", ""),
                                                   ("QQP", "qqp", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n1\t2\n")],
                         ids=["header only", "header-less and empty", "every row skipped"])
def test_a_file_without_data_rows_is_refused(tmp_path, task_dir, task, text):
    """It used to load as an empty split: a run with nothing to train on or score."""
    with pytest.raises(PkdError, match=rf"{task_dir}/train.tsv: no data rows"):
        glue_files.load_glue(get_task(task), write(tmp_path, task_dir, text))


def test_a_file_that_is_not_utf8_names_its_line(tmp_path):
    folder = tmp_path / "SST-2"
    folder.mkdir()
    (folder / "train.tsv").write_bytes(b"sentence\tlabel\ngood\t1\ncaf\xe9 latin-1\t0\n")
    (folder / "dev.tsv").write_text("sentence\tlabel\ngood\t1\n")
    with pytest.raises(PkdError, match=r"SST-2/train.tsv:3: not UTF-8 text"):
        glue_files.load_glue(get_task("sst2"), tmp_path)


@pytest.mark.parametrize("score", ["nan", "inf", "5.5", "-0.1"])
def test_stsb_score_that_is_not_finite_or_outside_0_to_5(tmp_path, score):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    row = "0\tmain\tf\t2012\t1\tnone\tnone\ta man\ta person\t{}\n"
    folder = tmp_path / "STS-B"
    folder.mkdir()
    (folder / "train.tsv").write_text(header + row.format("3.2") + row.format(score))
    (folder / "dev.tsv").write_text(header + row.format("1.0"))
    with pytest.raises(PkdError, match=rf"STS-B/train.tsv:3: label '{score}' outside \[0, 5\]"):
        glue_files.load_glue(get_task("stsb"), tmp_path)


def test_malformed_qqp_rows_are_skipped_counted_and_reported(tmp_path, caplog):
    """The published QQP train.tsv has rows with missing fields, which the GLUE processors skip."""
    header = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    good = "1\t1\t2\tHow?\tWhy?\t0\n"
    text = (header + good + "2\t3\t4\tA question with a newline\n" + "5\t6\t7\tok?\tsure?\tmaybe\n"
            + "8\t9\t10\ta stray\ttab?\tsure?\t1\n" + good)
    folder = tmp_path / "QQP"
    folder.mkdir()
    (folder / "train.tsv").write_text(text)
    (folder / "dev.tsv").write_text(header + good)
    with caplog.at_level("WARNING", logger="pkd_fast"):
        splits = glue_files.load_glue(get_task("qqp"), tmp_path)
    assert len(splits["train"]) == 2
    assert "QQP/train.tsv: skipped 3 malformed row(s) (lines 3, 4, 5)" in caplog.text


@pytest.mark.parametrize("rows, batch_size, counted", [
    (3, 1, [[True, True], [True, False]]),  # 2 rows on rank 0, 1 on rank 1: one filler evens the count
    (1, 4, [[True], [False]]),  # fewer rows than ranks: rank 1 has none and runs one filler
    (0, 4, [[], []]),
])
def test_inference_batches_give_every_rank_the_same_count_and_each_row_once(rows, batch_size, counted):
    """Under ZeRO-3 every forward gathers parameters with every rank, so each rank must run the same number;
    the filler is marked, so metrics read each real row exactly once."""
    tok = AutoTokenizer.from_pretrained(default_teacher())
    dev = data.tokenize(datasets.Dataset.from_dict({"text_a": [f"row {i}" for i in range(rows)], "label": [0] * rows}), tok, 16)
    seen = []
    for rank, expected in enumerate(counted):
        batches, n = data.inference_batches(dev, tok, batch_size, rank=rank, world_size=2)
        pairs = list(batches)
        assert n == len(pairs) and [c for _, c in pairs] == expected
        seen += [i for batch, c in pairs if c for i in batch["example_idx"].tolist()]
    assert sorted(seen) == list(range(rows))


def grouped_order(lengths, world, micro, accumulation, epoch=0, seed=1):
    """Each rank's row order from `LengthGroupedSampler` for one epoch."""
    orders = []
    for rank in range(world):
        sampler = data.LengthGroupedSampler(list(range(len(lengths))), lengths, micro, accumulation, num_replicas=world, rank=rank, seed=seed)
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
        assert len(orders[-1]) == len(sampler)
    return orders


def step_rows(orders, micro, accumulation):
    """The rows of each optimizer step, whichever rank and micro-batch they came in."""
    per_rank = micro * accumulation
    return [sorted(row for order in orders for row in order[i * per_rank : (i + 1) * per_rank]) for i in range(len(orders[0]) // per_rank)]


def padded_tokens(order, micro, lengths):
    """Tokens a loader feeds the model when each micro-batch is padded to its longest row (full batches)."""
    full = len(order) - len(order) % micro
    return sum(max(lengths[r] for r in order[i : i + micro]) * micro for i in range(0, full, micro))


def test_length_grouped_steps_cover_the_epoch_pad_little_and_do_not_depend_on_the_split():
    """Every row once per epoch (the same rows as DistributedSampler keeps), a fresh order each epoch;
    a step's rows are the same on 1 rank, 2 ranks and with accumulation (so such runs stay comparable);
    on SST-2-like lengths (mostly short, a long tail) the padded tokens drop from ~3× the real ones to
    near 1×."""
    rng = np.random.default_rng(0)
    lengths = np.minimum(64, 4 + rng.geometric(1 / 10, size=1024)).tolist()
    one = grouped_order(lengths, 1, 16, 1)
    assert sorted(one[0]) == list(range(1024))
    assert grouped_order(lengths, 1, 16, 1, epoch=1)[0] != one[0] and grouped_order(lengths, 1, 16, 1) == one
    two = grouped_order(lengths, 2, 8, 1)
    assert sorted(two[0] + two[1]) == list(range(1024)) and len(two[0]) == len(two[1])
    steps = step_rows(one, 16, 1)
    assert steps == step_rows(two, 8, 1) == step_rows(grouped_order(lengths, 1, 8, 2), 8, 2) == step_rows(grouped_order(lengths, 2, 4, 2), 4, 2)
    real = sum(lengths[r] for r in one[0])
    shuffled = torch.randperm(1024, generator=torch.Generator().manual_seed(1)).tolist()
    assert padded_tokens(one[0], 16, lengths) < 1.15 * real < 1.15 / 2 * padded_tokens(shuffled, 16, lengths)


def test_an_uneven_epoch_gives_every_rank_the_same_number_of_rows():
    """1,003 rows on 2 ranks with 3-row micro-batches and accumulation 2: DistributedSampler's 501 rows
    each, every row at most once."""
    lengths = list(range(1003))
    orders = grouped_order(lengths, 2, 3, 2)
    assert [len(o) for o in orders] == [501, 501] and len(set(orders[0]) | set(orders[1])) == 1002
