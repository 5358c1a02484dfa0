"""The width study (studies/width_study.py): a narrow student from scratch against the teacher's first
layers, KD and PKD-Skip, paired by seed, with each student's size and CPU step cost."""

import json
import os
import sys
from pathlib import Path

import pytest
from transformers import BertConfig, BertForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from studies import glue_table  # noqa: E402
from studies.glue_table import Student, Sweep  # noqa: E402
from studies.width_study import STUDENTS, cpu_step_ms, main, parameter_counts, plot, render_markdown  # noqa: E402
from pkd_fast.config import default_teacher  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = Path(os.environ.get("GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))


def test_each_student_runs_in_its_own_directory_and_the_cache_holds_every_students_pkd_layers(tmp_path):
    narrow = STUDENTS["4L-192"]
    assert narrow.flags("skip") == ["--student-layers", "4", "--init-from", "scratch", "--student-hidden-size", "192", "--layer-map", "2,3,5"]
    assert narrow.flags("kd") == ["--student-layers", "4", "--init-from", "scratch", "--student-hidden-size", "192"]
    assert Student(3).flags("skip") == ["--student-layers", "3"]  # glue_table's own student: train.py's defaults
    args = glue_table.parse_args(["--task", "sst2", "--strategies", "kd,skip", "--output-dir", str(tmp_path)])
    point = {"temperature": 10, "alpha": 0.7, "lr": 1e-4}
    assert Sweep(args).run_dir("kd", point, 1) == tmp_path / "kd/temperature10_alpha0.7_lr0.0001/seed1/students/kd"
    study = Sweep(args, students=list(STUDENTS.values()))
    assert study.run_dir("kd", point, 1, narrow) == tmp_path / "4L-192/kd/temperature10_alpha0.7_lr0.0001/seed1/students/kd"
    # 3 layers learn teacher layers 2,4 and 4 layers 2,3,5: one cache of the teacher serves both
    assert study._cache_rows(default_teacher()) == ["--pt-tokens", "cls", "--cache-layers", "2,3,4,5"]


def test_cpu_step_ms_is_the_median_window_between_log_lines(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "cpu_time": t}) + "\n" for s, t in ((1, 0.0), (20, 1.9), (40, 3.9), (60, 9.9))))
    assert cpu_step_ms(log) == 100.0  # windows of 0.1, 0.1 and 0.3 s per step
    log.write_text(json.dumps({"step": 1, "cpu_time": 0.0}) + "\n")
    assert cpu_step_ms(log) is None and cpu_step_ms(tmp_path / "none.jsonl") is None


def test_parameter_counts_split_off_the_embeddings_and_count_the_projections_apart(tmp_path):
    config = BertConfig(vocab_size=100, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                        max_position_embeddings=20, type_vocab_size=2)
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    counts = parameter_counts(tmp_path, teacher_width=16, pt_layers=3)
    assert counts["embeddings"] == (100 + 20 + 2) * 8 + 2 * 8  # word, position, type; LayerNorm
    assert counts["total"] == sum(p.numel() for p in BertForSequenceClassification(config).parameters())
    assert counts["non_embedding"] == counts["total"] - counts["embeddings"]
    assert counts["pt_projections_train_only"] == 3 * (8 * 16 + 16)
    assert parameter_counts(tmp_path, teacher_width=8, pt_layers=3)["pt_projections_train_only"] == 0  # same width: no map


def _study_result() -> dict:
    def rows(kd: list[float], skip: list[float], ms: float) -> dict:
        return {name: {"mean": sum(v) / len(v), "std": 0.5, "seeds": v, "cpu_step_ms": ms, "train_seconds": 10.0, "layer_map": lmap}
                for name, v, lmap in (("kd", kd, []), ("skip", skip, [2, 3, 5]))}

    params = {"total": 7_780_000, "embeddings": 5_960_000, "non_embedding": 1_820_000, "pt_projections_train_only": 221_568}
    return {
        "task": "sst2", "metric": "accuracy", "teacher": "all-minilm-l6-v2", "teacher_layers": 6, "teacher_hidden_size": 384,
        "teacher_score": {"report": 86.0, "epochs": 2, "lr": 5e-5}, "glue_sweep_epochs": 1,
        "majority_class": {"report": 50.9}, "dev_half_rows": {"select": 436, "report": 436}, "points_from": "glue_sst2.json",
        "seeds": [1, 2], "scratch_lrs": [1e-4, 1e-3], "train_rows": 8000, "data_seed": 42, "epochs": 1, "max_seq_length": 64,
        "batch_size": 32, "device": {"name": "CPU", "threads": 1}, "date": "2026-12-06", "train_seconds_total": 120.0,
        "students": {
            "3L-384": {"init_from": "teacher", "lr": 1e-4, "lr_search_select": None, "lr_search_seconds": 0.0,
                       "params": {**params, "total": 17_390_000, "pt_projections_train_only": 0}, "rows": rows([84.0, 85.0], [84.5, 85.5], 240.0)},
            "4L-192": {"init_from": "scratch", "hidden_size": 192, "lr": 1e-3, "lr_search_select": {"0.0001": {"select": 50.9}, "0.001": {"select": 80.1}},
                       "lr_search_seconds": 5.0, "params": params, "rows": rows([80.0, 81.0], [80.0, 82.0], 120.0)},
        },
        "paired": {"4L-192 − 3L-384, KD": {"mean": -4.0, "ci95": [-4.0, -4.0], "p": None, "n": 2}},
    }


def test_the_table_states_sizes_lr_search_and_cost_and_the_chart_is_written(tmp_path):
    result = _study_result()
    lines = render_markdown(result).splitlines()
    narrow = next(line for line in lines if line.startswith("| 4L-192 |"))
    assert "0.001 (select half: 0.0001 → 50.9, 0.001 → 80.1)" in narrow and "7.78M / 1.82M (+0.22M PT projections" in narrow
    assert "| 80.50 ± 0.50 | 81.00 ± 0.50 | 120 / 120 |" in narrow
    assert "| 4L-192 − 3L-384, KD | -4.00 | [-4.00, -4.00] | - | 2 |" in lines
    assert any("the 3L-384 KD step costs 2.00× the 4L-192's" in line for line in lines)
    assert "answering the majority class scores 50.90" in lines[0]
    assert "the 3L-384 rows rerun that sweep's setup" in lines[2] and "192→384 projection" in lines[2]
    assert "the students train 2 epoch(s) where that sweep's trained 1" in render_markdown({**result, "epochs": 2})
    plot(result, tmp_path / "width.png")
    assert (tmp_path / "width.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.skipif(not (GLUE_DIR / "SST-2").is_dir(), reason=f"no GLUE data at {GLUE_DIR}")
def test_study_writes_its_results_and_a_rerun_trains_nothing(tmp_path, capsys):
    """Both students, KD and PKD-Skip, one seed, one scratch lr; 32 rows of 16 tokens (one step a run)."""
    config = json.loads((REPO / "ds_configs" / "cpu.json").read_text())
    config.update({"torch_autocast": {"enabled": False}, "tensorboard": {"enabled": False}})
    (tmp_path / "fp32.json").write_text(json.dumps(config))
    argv = ["--tasks", "sst2", "--seeds", "1", "--scratch-lrs", "1e-3", "--max-train-samples", "32", "--max-seq-length", "16",
            "--epochs", "1", "--teacher-epochs", "1", "--log-steps", "1", "--glue-dir", str(GLUE_DIR), "--deepspeed", str(tmp_path / "fp32.json"),
            "--output-dir", str(tmp_path / "study"), "--results-dir", str(tmp_path / "results")]
    main([*argv[:2], "--students", "4L-192", *argv[2:]])
    assert not (tmp_path / "results").exists()  # one student of two: trained, nothing written
    result = main(argv)["sst2"]
    narrow, wide = result["students"]["4L-192"], result["students"]["3L-384"]
    assert (narrow["hidden_size"], narrow["layers"], wide["hidden_size"], wide["layers"]) == (192, 4, 384, 3)
    assert narrow["rows"]["skip"]["layer_map"] == [2, 3, 5] and wide["rows"]["skip"]["layer_map"] == [2, 4]
    assert narrow["params"]["non_embedding"] < wide["params"]["non_embedding"] and narrow["lr"] == 1e-3
    assert set(result["paired"]) == {"4L-192 − 3L-384, KD", "4L-192 − 3L-384, PKD-Skip", "PKD-Skip − KD, 3L-384", "PKD-Skip − KD, 4L-192"}
    assert result["device"]["type"] == "cpu" and result["train_rows"] == 32
    assert result["majority_class"]["report"] == pytest.approx(50.46, abs=0.01)  # SST-2's train majority is positive
    assert (tmp_path / "results" / "width_sst2.png").is_file() and "| 4L-192 | scratch |" in (tmp_path / "results" / "width_sst2.md").read_text()
    finished = sorted((tmp_path / "study").glob("sst2/*/*/*/seed1/students/*/results.json"))
    assert len(finished) == 4
    stamps = [p.stat().st_mtime_ns for p in finished]
    main(argv)
    assert [p.stat().st_mtime_ns for p in finished] == stamps  # nothing trained again
