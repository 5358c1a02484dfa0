"""The paper-comparison sweep: grid → best point per strategy → seeds → mean ± std, the teacher cached
once for every distilled point, and a rerun resumes without training anything again."""

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from studies.glue_table import (GRIDS, RESULTS_DOC, RESULTS_DOC_MARKERS, grid_points, paired_difference, paired_table,  # noqa: E402
                                pairs, splice_results_doc, write_summary)
from studies.glue_table import main as glue_table_main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = Path(os.environ.get("GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))


def test_grid_points_follow_each_strategys_knobs():
    paper = GRIDS["paper"]
    assert len(grid_points(paper, "ft")) == 3
    assert len(grid_points(paper, "kd")) == 3 * 3 * 3
    assert len(grid_points(paper, "skip")) == 3 * 3 * 4 * 3
    assert {p["beta"] for p in grid_points(paper, "last")} == {10, 100, 500, 1000}


def test_paired_difference_is_the_mean_of_per_seed_differences_with_a_t_interval():
    d = paired_difference([81.0, 83.0, 85.0], [80.0, 81.0, 82.0])  # differences 1, 2, 3
    assert d["diffs"] == [1.0, 2.0, 3.0] and d["mean"] == pytest.approx(2.0)
    half = 4.302652729911275 / 3 ** 0.5  # t(0.975, 2) · sd 1 / √3
    assert d["ci95"] == pytest.approx([2.0 - half, 2.0 + half])
    assert d["p"] == pytest.approx(0.07417990022744853)  # t = 2√3 on 2 degrees of freedom, two-sided
    # A seed's luck shared by both strategies cancels: independent stds of 10 points, one constant gap.
    noisy = paired_difference([60.0, 80.0, 70.0, 90.0], [59.0, 79.0, 69.0, 89.0])
    assert noisy["ci95"] == pytest.approx([1.0, 1.0]) and noisy["p"] is None  # zero spread: no test to run
    assert paired_difference([1.0], [0.5])["ci95"] is None
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])


def test_paired_table_covers_the_pairs_that_were_run():
    rows = {s: {"seeds": [float(i), float(i) + 1]} for i, s in enumerate(("ft", "kd", "skip"))}
    assert set(paired_table(rows)) == {"kd-ft", "skip-kd"}


def test_pairs_compare_each_pt_kind_with_kd_and_skip_with_last_of_the_same_kind():
    rows = {n: {"seeds": [1.0, 2.0]} for n in ("ft", "kd", "skip", "last", "skip-all", "skip-mean", "last-mean")}
    assert pairs(rows) == [("kd", "ft"), ("skip", "kd"), ("last", "kd"), ("skip-all", "kd"), ("skip-mean", "kd"),
                           ("last-mean", "kd"), ("skip", "last"), ("skip-mean", "last-mean")]
    assert paired_table(rows)["skip-mean-kd"]["a"] == "skip-mean"
    assert [grid_points(GRIDS["paired"], r)[0] for r in ("kd", "skip-mean")] == [
        {"temperature": 10, "alpha": 0.5, "lr": 1e-4}, {"temperature": 10, "alpha": 0.5, "beta_share": 0.1, "lr": 1e-4}]


def test_the_results_doc_table_is_the_results_summary_spliced_in(tmp_path):
    """docs/results.md's GLUE table is written by glue_table.py from the results files, never by hand."""
    begin, end = RESULTS_DOC_MARKERS
    doc = RESULTS_DOC.read_text()
    assert doc.split(begin, 1)[1].split(end, 1)[0].strip() == (REPO / "studies" / "results" / "glue_summary.md").read_text().strip()
    copy = tmp_path / "results.md"
    copy.write_text(f"intro\n{begin}\nold\n{end}\nrest\n")
    splice_results_doc("| new |", copy)
    assert copy.read_text() == f"intro\n{begin}\n| new |\n{end}\nrest\n"


def _result(task, metric, means, rows=3668, available=3668):
    return {
        "task": task, "metric": metric, "teacher": "t", "teacher_layers": 6, "student_layers": 3, "seeds": [1, 2],
        "train_rows": rows, "train_rows_available": available, "epochs": 3, "max_seq_length": 128,
        "rows": {name: {"mean": m, "std": 0.5} for name, m in means.items()},
    }


def test_summary_orders_the_strategies_as_measured_and_sets_the_paper_beside_them(tmp_path):
    assert write_summary(tmp_path) is None  # nothing finished yet: no table
    mrpc = _result("mrpc", "f1", {"teacher": 86.0, "ft": 80.0, "kd": 82.5, "skip": 81.0, "last": 83.0})
    stsb = _result("stsb", "pearson", {"teacher": 85.0, "ft": 84.0, "kd": 83.0, "skip": 82.0, "last": 81.0}, 2000, 5749)
    for name, result in (("glue_mrpc_t_3layers", mrpc), ("glue_stsb_t_3layers", stsb)):
        (tmp_path / f"{name}.json").write_text(json.dumps(result))
    lines = write_summary(tmp_path).splitlines()
    assert lines == (tmp_path / "glue_summary.md").read_text().splitlines()
    mrpc_row, stsb_row = lines[2:]
    assert "3,668 (full) rows" in mrpc_row and "PKD-Last > KD > PKD-Skip > FT" in mrpc_row and mrpc_row.endswith("| 85.0 |")
    assert "2,000 of 5,749 rows" in stsb_row and "FT > KD > PKD-Skip > PKD-Last" in stsb_row and "not reported" in stsb_row
    assert (tmp_path / "glue_summary.png").read_bytes()[:4] == b"\x89PNG"


def sweep(argv: list[str], caplog) -> list[str]:
    """glue_table.main in this process (no process start per sweep): its pkd_fast log lines."""
    caplog.clear()
    with caplog.at_level("INFO", logger="pkd_fast"):
        glue_table_main(argv)
    return [r.getMessage() for r in caplog.records]


@pytest.mark.slow
@pytest.mark.skipif(not (GLUE_DIR / "MRPC").is_dir(), reason=f"no GLUE data at {GLUE_DIR}")
def test_sweep_writes_the_table_and_resumes_without_retraining(tmp_path, caplog, capsys):
    """The smallest sweep that still has every part: two strategies (one with PKD), two [CLS]/mean kinds
    sharing one cache, two seeds; 32 rows of 16 tokens (2 steps a run)."""
    config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    config.update({"bf16": {"enabled": False}, "tensorboard": {"enabled": False}, "train_micro_batch_size_per_gpu": 16})
    (tmp_path / "fp32.json").write_text(json.dumps(config))
    argv = ["--task", "mrpc", "--glue-dir", str(GLUE_DIR), "--grid", "tiny", "--strategies", "ft,skip", "--pt-tokens", "cls,mean",
            "--seeds", "42,43", "--epochs", "1", "--max-seq-length", "16", "--max-train-samples", "32",
            "--deepspeed", str(tmp_path / "fp32.json"), "--log-steps", "2",
            "--output-dir", str(tmp_path / "sweep"), "--results-dir", str(tmp_path / "results")]
    first = sweep(argv, caplog)
    stem = tmp_path / "results" / "glue_mrpc_all-minilm-l6-v2_3layers"
    result = json.loads(stem.with_suffix(".json").read_text())
    assert set(result["rows"]) == {"teacher", "ft", "skip", "skip-mean"} and result["train_rows"] == 32
    skip = result["rows"]["skip"]
    assert len(skip["seeds"]) == 2 and skip["layer_map"] == [2, 4]
    assert skip["mean"] == pytest.approx(sum(skip["seeds"]) / 2)
    # Reported on the dev split's report half (408 rows: 204 each); the whole split's score kept beside it.
    assert result["dev_half_rows"] == {"select": 204, "report": 204}
    runs = [json.loads(p.read_text())["dev"] for p in sorted((tmp_path / "sweep" / "skip-mean").glob("*/seed*/students/skip/results.json"))]
    mean_row = result["rows"]["skip-mean"]
    assert mean_row["seeds"] == [r["report/f1"] for r in runs] and mean_row["full_dev"]["seeds"] == [r["f1"] for r in runs]
    assert mean_row["pt_tokens"] == "mean" and 0 < mean_row["pt_share_step1_percent"] < 100
    assert result["rows"]["ft"]["pt_share_step1_percent"] is None
    assert result["rows"]["ft"]["loss_mix_percent"] == {"ce": 100.0, "kd": 0.0, "pt": 0.0}
    assert skip["loss_mix_percent"]["pt"] > 0 and sum(skip["loss_mix_percent"].values()) == pytest.approx(100, abs=0.2)
    assert "| PKD-Skip |" in stem.with_suffix(".md").read_text() and "| PKD-Skip (mean-pooled) |" in stem.with_suffix(".md").read_text()
    assert result["paired"] == {}  # ft and skip only: none of the paper's pairs (KD−FT, Skip−KD, Last−KD, Skip−Last)
    assert stem.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "| mrpc (f1) | 32 of 3,668 rows" in (tmp_path / "results" / "glue_summary.md").read_text()
    # The teacher ran over the training set once, into the cache the PKD points then read.
    # [CLS] and mean rows both ran: one store of every token, of the mapped layers only, serves both.
    layout = json.loads((tmp_path / "sweep" / "teacher_cache" / "manifest.json").read_text())["layout"]
    assert layout["positions"] == 16 and layout["layers"] == [2, 4]
    assert sum("teacher cache: writing it" in line for line in first) == 1, first
    assert sum("teacher outputs read from" in line for line in first) == 4, first

    finished = sorted((tmp_path / "sweep").glob("*/*/seed*/students/*/results.json"))
    assert len(finished) == 6
    stamps = [p.stat().st_mtime_ns for p in finished]
    again = sweep(argv, caplog)
    assert [p.stat().st_mtime_ns for p in finished] == stamps  # nothing was trained again
    assert not any("teacher cache: writing it" in line for line in again)  # nor cached again
    # A changed setup in the same directory is refused, not silently served the old runs.
    capsys.readouterr()
    with pytest.raises(SystemExit) as longer:
        sweep([*argv[:argv.index("--epochs") + 1], "2", *argv[argv.index("--epochs") + 2:]], caplog)
    # the teacher's run is refused first: its finished key records the epochs (one line naming them)
    err = capsys.readouterr().err
    assert longer.value.code == 2 and "epochs: finished 1 ≠ now 2" in err, err[-2000:]
    assert json.loads(stem.with_suffix(".json").read_text())["rows"]["skip"]["seeds"] == skip["seeds"]


@pytest.mark.slow
@pytest.mark.skipif(not (GLUE_DIR / "SST-2").is_dir(), reason=f"no GLUE data at {GLUE_DIR}")
def test_strategies_of_one_seed_differ_only_in_the_loss(tmp_path):
    """What makes the per-seed difference a paired measurement: with α = β = 0 a KD run is FT, and it must
    then reproduce FT's run exactly (same init, head, data order and dropout masks, teacher and all)."""
    from transformers import AutoTokenizer

    from pkd_fast.config import default_teacher
    from pkd_fast.models import load_classifier
    from pkd_fast.tasks import get_task
    from pkd_fast.train import main as train_main

    load_classifier(default_teacher(), get_task("sst2")).save_pretrained(tmp_path / "teacher")  # dropout on
    AutoTokenizer.from_pretrained(default_teacher()).save_pretrained(tmp_path / "teacher")
    config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    config.update({"bf16": {"enabled": False}, "tensorboard": {"enabled": False}, "train_micro_batch_size_per_gpu": 16})
    (tmp_path / "fp32.json").write_text(json.dumps(config))
    train_main(["--stage", "student", "--teacher", str(tmp_path / "teacher"),
                "--strategy", "ft,kd", "--alpha", "0", "--glue-dir", str(GLUE_DIR), "--max-train-samples", "64",
                "--max-seq-length", "32", "--max-eval-samples", "32", "--epochs", "1", "--log-steps", "1",
                "--deepspeed", str(tmp_path / "fp32.json"), "--output-dir", str(tmp_path / "run")])  # in this process
    ft, kd = ([json.loads(line) for line in (tmp_path / "run" / "students" / s / "train_log.jsonl").read_text().splitlines()]
              for s in ("ft", "kd"))
    assert [r["total"] for r in kd] == [r["total"] for r in ft] and len(ft) == 4
    results = [json.loads((tmp_path / "run" / "students" / s / "results.json").read_text())["dev"] for s in ("ft", "kd")]
    assert results[0] == results[1]
