"""The paper-comparison sweep: grid → best point per strategy → seeds → mean ± std, the teacher cached
once for every distilled point, and a rerun resumes without training anything again."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.glue_table import GRIDS, grid_points, write_summary  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = Path(os.environ.get("GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))


def test_grid_points_follow_each_strategys_knobs():
    paper = GRIDS["paper"]
    assert len(grid_points(paper, "ft")) == 3
    assert len(grid_points(paper, "kd")) == 3 * 3 * 3
    assert len(grid_points(paper, "skip")) == 3 * 3 * 4 * 3
    assert {p["beta"] for p in grid_points(paper, "last")} == {10, 100, 500, 1000}


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


@pytest.mark.slow
@pytest.mark.skipif(not (GLUE_DIR / "MRPC").is_dir(), reason=f"no GLUE data at {GLUE_DIR}")
def test_sweep_writes_the_table_and_resumes_without_retraining(tmp_path):
    config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    config.update({"bf16": {"enabled": False}, "tensorboard": {"enabled": False}, "train_micro_batch_size_per_gpu": 16})
    (tmp_path / "fp32.json").write_text(json.dumps(config))
    cmd = [sys.executable, str(REPO / "benchmarks" / "glue_table.py"), "--task", "mrpc", "--glue-dir", str(GLUE_DIR),
           "--grid", "tiny", "--strategies", "ft,skip", "--seeds", "42,43", "--epochs", "1", "--max-seq-length", "32",
           "--max-train-samples", "64", "--deepspeed", str(tmp_path / "fp32.json"), "--log-steps", "2",
           "--output-dir", str(tmp_path / "sweep"), "--results-dir", str(tmp_path / "results")]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-4000:]
    stem = tmp_path / "results" / "glue_mrpc_all-minilm-l6-v2_3layers"
    result = json.loads(stem.with_suffix(".json").read_text())
    assert set(result["rows"]) == {"teacher", "ft", "skip"} and result["train_rows"] == 64
    skip = result["rows"]["skip"]
    assert len(skip["seeds"]) == 2 and skip["layer_map"] == [2, 4]
    assert skip["mean"] == pytest.approx(sum(skip["seeds"]) / 2)
    assert result["rows"]["ft"]["loss_mix_percent"] == {"ce": 100.0, "kd": 0.0, "pt": 0.0}
    assert skip["loss_mix_percent"]["pt"] > 0 and sum(skip["loss_mix_percent"].values()) == pytest.approx(100, abs=0.2)
    assert "| PKD-Skip |" in stem.with_suffix(".md").read_text()
    assert stem.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "| mrpc (f1) | 64 of 3,668 rows" in (tmp_path / "results" / "glue_summary.md").read_text()
    # The teacher ran over the training set once, into the cache the PKD points then read.
    assert (tmp_path / "sweep" / "teacher_cache" / "manifest.json").is_file()
    assert first.stderr.count("teacher cache: writing it") == 1, first.stderr[-4000:]
    assert first.stderr.count("teacher outputs read from") == 2, first.stderr[-4000:]

    finished = sorted((tmp_path / "sweep").glob("*/*/seed*/students/*/results.json"))
    assert len(finished) == 4
    stamps = [p.stat().st_mtime_ns for p in finished]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    assert [p.stat().st_mtime_ns for p in finished] == stamps  # nothing was trained again
    assert "teacher cache: writing it" not in again.stderr  # nor cached again
    # A changed setup in the same directory is refused, not silently served the old runs.
    longer = subprocess.run([*cmd[:cmd.index("--epochs") + 1], "2", *cmd[cmd.index("--epochs") + 2:]], capture_output=True, text=True, timeout=900)
    assert longer.returncode == 2 and "a finished run of 1 epoch(s), this sweep asks for 2" in longer.stderr, longer.stderr[-2000:]
    assert json.loads(stem.with_suffix(".json").read_text())["rows"]["skip"]["seeds"] == skip["seeds"]
