"""The relation study (studies/relation_study.py): general students by relations, started from in PKD-Skip
runs beside the width study's own students, paired by seed."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from studies import glue_table  # noqa: E402
from studies.glue_table import Sweep  # noqa: E402
from studies.relation_study import ARMS, GENERALS, PAIRS, arm_student, paired, plot, render  # noqa: E402
from studies.width_study import STUDENTS  # noqa: E402

MODELS = {name: f"/g/{name}" for name in GENERALS}


def test_each_arm_starts_from_its_general_student_with_its_baselines_layer_map_in_its_own_directory(tmp_path):
    assert arm_student("3L teacher layers", MODELS) is STUDENTS["3L-384"]  # the width study's runs, reused as they are
    assert arm_student("4L-192 random init", MODELS) is STUDENTS["4L-192"]
    narrow = arm_student("4L-192 rel general", MODELS)
    assert narrow.flags("skip") == ["--student-layers", "4", "--init-from", "pretrained", "--base-model", "/g/rel-4L-192",
                                    "--layer-map", "2,3,5"]
    assert arm_student("3L mlm-kd general", MODELS).flags("skip") == ["--student-layers", "3", "--init-from", "pretrained",
                                                                      "--base-model", "/g/mlm-kd-3L"]
    sweep = Sweep(glue_table.parse_args(["--task", "sst2", "--output-dir", str(tmp_path)]), students=list(STUDENTS.values()))
    point = {"temperature": 10, "alpha": 0.7, "beta_share": 0.1, "lr": 1e-4}
    dirs = {sweep.run_dir("skip", point, 1, arm_student(arm, MODELS)) for arm in ARMS}
    assert len(dirs) == len(ARMS)  # no two arms share a run


def _result() -> dict:
    seeds = {"3L teacher layers": [84.0, 85.0, 84.5], "3L mlm-kd general": [80.0, 81.0, 80.5], "3L rel general": [85.0, 86.5, 85.0],
             "3L mix general": [82.0, 83.0, 82.5],
             "4L-192 random init": [77.0, 78.0, 77.5], "4L-192 rel general": [80.0, 82.0, 81.0]}
    task = {"task": "sst2", "metric": "accuracy", "point": {"temperature": 10, "alpha": 0.7, "beta_share": 0.1}, "teacher": 86.47,
            "majority_class": 50.46, "train_rows": 8000, "epochs": 1, "max_seq_length": 64, "dev_half_rows": {"select": 436, "report": 436},
            "rows": {arm: {"report": v, "full_dev": v, "lr": 1e-4, "beta": [20.0] * 3, "layer_map": [2, 4], "train_seconds": 500.0}
                     for arm, v in seeds.items()}}
    task["paired"] = paired(task)
    generals = {
        "mlm-kd-3L": {"what": GENERALS["mlm-kd-3L"][0], "lr": 1e-4, "train_seconds": 1000.0, "head_fit_seconds": 300.0,
                      "held_out": {"mlm_loss": 7.1, "mlm_accuracy": 13.3}, "step1": {"ce": 9.0}},
        "rel-3L": {"what": GENERALS["rel-3L"][0], "lr": 1e-4, "train_seconds": 600.0, "head_fit_seconds": None,
                   "held_out": {"relation_loss": 0.5, "tokens": 100}, "step1": {"rel": 1.3}},
    }
    return {"teacher": "all-minilm-l6-v2", "device": {"name": "Some CPU"}, "date": "2026-12-07", "corpus_sentences": 86183,
            "train_blocks": 9231, "mlm_seq_length": 128, "mlm_epochs": 1, "seeds": [1, 2, 3], "generals": generals, "tasks": [task]}


def test_the_tables_give_each_general_student_each_arm_and_each_paired_difference_and_the_chart_is_written(tmp_path):
    result = _result()
    diffs = result["tasks"][0]["paired"]
    assert list(diffs) == [f"{a} − {b}" for a, b in PAIRS]
    assert diffs["3L rel general − 3L teacher layers"]["diffs"] == [1.0, 1.5, 0.5]
    text = render(result)
    assert "| rel-3L | relations only, teacher layers 1-3 | 0.0001 | - | 1.300 → 0.500 | 600 |" in text
    assert "| mlm-kd-3L |" in text and "MLM loss 7.100, accuracy 13.30%" in text and "700 (+ head fit 300)" in text
    assert "| 3L rel general | 0.0001 | 85.00, 86.50, 85.00 | 85.50 ± 0.87 |" in text
    assert "| 3L rel general − 3L teacher layers | +1.00 | [" in text
    plot(result, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 10_000
