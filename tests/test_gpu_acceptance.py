"""benchmarks.gpu_acceptance: the one prepared GPU run must be right the first time (the lent GPU's 15 minutes
include start-up), so its CPU dry run goes through every stage here, and its stage bounds are checked."""

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import gpu_acceptance as ga  # noqa: E402
from benchmarks import harness  # noqa: E402

TARGET_KEYS = {"stage", "target", "want", "got", "met"}


def test_dry_run_reports_every_stage(tmp_path):
    """Every stage runs on tiny CPU shapes, the JSON and markdown carry each stage's part, and the precision
    stage (pkd_fast.precision comes from another branch) runs when that module exists and is recorded as an
    error, not a crash, when it does not."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_acceptance", "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    doc = json.loads((tmp_path / "gpu_cpu_dry_run.json").read_text())
    stages = doc["stages"]
    assert list(stages) == list(ga.STAGES)
    for name in ("kernel-tests", "losses", "steps"):
        assert stages[name]["status"] == "ok", stages[name]
        assert 0 < stages[name]["seconds"] <= stages[name]["budget_s"] + 5
    assert stages["precision"]["status"] == "ok", stages["precision"]
    assert stages["precision"]["choice"]["asked"] == "bf16"  # zero2.json's ask; what runs depends on this CPU
    assert stages["precision"]["choice"]["precision"] in ("bf16", "fp32")

    tests = stages["kernel-tests"]
    assert (tests["tests"], tests["failures"], tests["errors"], tests["returncode"]) == (len(ga.DRY_PLAN.kernel_tests), 0, 0, 0)
    assert tests["triton_interpret"] == "1"

    rows = stages["losses"]["rows"]
    assert {(r["family"], r["contender"]) for r in rows} == {(f, c) for f in ("kd-vocab", "pt-tokens") for c in ga.DRY_PLAN.loss_contenders
                                                             if (f, c) != ("pt-tokens", "liger")}  # fmt: skip
    fused = [r for r in rows if r["contender"] == "fused"]
    assert fused and all(r["check"]["ok"] and r["fwd_bwd"]["ms"] > 0 and r["interpreter"] for r in fused)
    assert {r["layers"] for r in rows if r["family"] == "pt-tokens"} == {6}

    glue, mlm = stages["steps"]["glue"]["rows"], stages["steps"]["mlm"]["rows"]
    assert [r["impl"] for r in glue] == list(ga.DRY_PLAN.step_impls) and all(r["tokens_per_s"] > 0 and 0 < r["loss_share"] for r in glue)
    assert {(r["head"], r["kd_positions"]) for r in mlm} == {(h, k) for h in ("rows", "full") for k in ("masked", "all")}
    assert all(r["tokens_per_s"] > 0 for r in mlm)

    targets = doc["targets"]
    assert {t["stage"] for t in targets} >= {"kernel-tests", "losses", "steps"}
    assert all(TARGET_KEYS <= set(t) and (t["met"] is not False or "missed_by" in t) for t in targets)
    assert any("masked-row heads" in t["target"] and t["met"] is not None for t in targets)
    assert doc["device"]["type"] == "cpu" and doc["device"]["torch"] == torch.__version__ and doc["run"]["dry_run"]

    md = (tmp_path / "gpu_cpu_dry_run.md").read_text()
    for heading in ("## Stages", "## Targets", "## 1. Kernel tests", "## 2. Losses", "## 3. Training steps"):
        assert heading in md


def _run(tmp_path, plan, budget_s=60.0) -> ga.Run:
    run = ga.Run(torch.device("cpu"), plan, True, tmp_path / "gpu_test.json", budget_s)
    run.doc.update(device=harness.describe(torch.device("cpu")), run={"command": "test", "dry_run": True, "budget_s": budget_s}, stages={})
    return run


def test_a_stage_past_its_budget_is_stopped_and_the_next_still_runs(tmp_path):
    """The alarm stops a stage at its budget even inside a benchmark's `except Exception` (StageTimeout is a
    BaseException), keeps what it saved, and a stage that raises is recorded; the run goes on."""
    plan = replace(ga.DRY_PLAN, budgets_s={"slow": 1, "broken": 5, "fine": 5})
    run = _run(tmp_path, plan)

    def slow(run, entry):
        entry["rows"] = ["measured before the alarm"]
        run.save()
        try:
            time.sleep(30)
        except Exception:  # noqa: BLE001 — what bench_losses / harness.time_calls do with a failing call
            entry["swallowed"] = True

    def broken(run, entry):
        raise ValueError("no such shape")

    t0 = time.monotonic()
    ga.run_stage(run, "slow", slow)
    assert time.monotonic() - t0 < 10
    ga.run_stage(run, "broken", broken)
    ga.run_stage(run, "fine", lambda run, entry: entry.update(targets=[{"target": "t", "want": "w", "got": "g", "met": True}]))
    saved = json.loads(run.json_path.read_text())["stages"]
    assert saved["slow"]["status"] == "timeout" and saved["slow"]["rows"] == ["measured before the alarm"]
    assert "swallowed" not in saved["slow"]
    assert saved["broken"]["status"] == "error" and saved["broken"]["error"] == "ValueError: no such shape"
    assert saved["fine"]["status"] == "ok"
    assert "| slow | timeout |" in run.json_path.with_suffix(".md").read_text()


def test_no_stage_starts_once_the_run_budget_is_spent(tmp_path):
    path = ga.main(["--dry-run", "--budget-s", "0", "--out", str(tmp_path)])
    doc = json.loads(path.read_text())
    assert list(doc["stages"]) == list(ga.STAGES)
    assert all(s["status"] == "skipped" and "budget" in s["reason"] for s in doc["stages"].values())
    assert "| precision | skipped |" in path.with_suffix(".md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_the_gpu_run_refuses_a_machine_without_cuda(tmp_path):
    with pytest.raises(SystemExit, match="no CUDA device"):
        ga.main(["--out", str(tmp_path)])


def test_precision_stage_records_the_choice_and_judges_bf16_on_a_gpu(tmp_path, monkeypatch):
    """Stage 4 on a GPU without bf16 units (torch.cuda stood in for, no GPU touched): the device block gets the
    capability, the choice is fp16 with loss scaling, and the bf16 target is reported missed, with the reason."""
    from pkd_fast import precision

    monkeypatch.setattr(precision, "describe_device", lambda device=None: {
        "kind": "cuda", "name": "Tesla T4", "gpu": "Tesla T4", "cpu_capability": "AVX2", "bf16_native": False})
    run = _run(tmp_path, ga.DRY_PLAN)
    run.device = torch.device("cuda")
    entry = {}
    ga.precision(run, entry)
    assert entry["choice"]["precision"] == "fp16" and entry["choice"]["asked"] == "bf16"
    assert run.doc["device"]["gpu"] == "Tesla T4" and run.doc["device"]["bf16_native"] is False
    assert entry["targets"][0]["met"] is False and entry["targets"][0]["missed_by"] == entry["choice"]["reason"]