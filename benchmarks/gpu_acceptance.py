"""One prepared GPU acceptance run (issue #19): everything a lent GPU must confirm, in at most 8 minutes, into
<out>/gpu_<device>.json and .md (default out: benchmarks/results/).

    python -m benchmarks.gpu_acceptance [--out DIR] [--budget-s S] [--dry-run]

Stages, in order; each is timed, bounded by its own budget and by what is left of the run's, and saved to
the JSON and the markdown when it ends (stages 2 and 3 also after every shape or step variant), so a run cut
short still leaves what it measured:

  1 kernel-tests  pytest tests/test_kernels.py tests/test_losses.py with the kernels compiled for the GPU
                  (TRITON_INTERPRET=0 given explicitly: tests/conftest.py turns the interpreter on whenever it
                  sees no /dev/nvidia0, and a machine may expose its GPU otherwise)
  2 losses        fused vs eager (fp32 spec, bf16) vs torch.compile vs Liger-Kernel at KD N=8192 × V=30522 bf16
                  and the patient loss over 6 layers × 8192 rows × 768: time, GB/s, peak memory, value checked
                  against the spec (bench_losses.measure_cases)
  3 steps         a GLUE PKD-Skip step (bench_step.measure_case) and a masked-LM PKD step with the LM heads on the
                  gathered rows vs full logits (bench_mlm_step.measure): BERT-base-sized random teacher 12×768 →
                  6-layer student, batch 256, length 128: tokens/s, the loss's share of the step, peak memory
  4 precision     what `--precision auto` picks here (pkd_fast.precision, imported only in this stage)

Each stage's targets (from the kernels and MLM issues, set for an H100/H200) are judged met or missed. A stage
past its budget is stopped by an alarm (StageTimeout, which the benchmarks' `except Exception` does not
swallow) and recorded as "timeout"; a stage that raises is recorded as "error" with the message; either way
the next stage runs. A stage with too little of the run's budget left is recorded as "skipped".

`--dry-run` runs every stage on tiny shapes on the CPU (the kernels under the Triton interpreter, three test
ids in stage 1, no torch.compile, whose first compile alone takes ~36 s on 2 cores) in well under a minute,
into a temporary folder unless --out is given; tests/test_gpu_acceptance.py runs it. The command for the lent
GPU machine is in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from benchmarks import bench_losses, bench_mlm_step, bench_step, harness, report
from benchmarks.bench_losses import VOCAB, Case
from pkd_fast.recipes import mlm as mlm_recipe

ROOT = Path(__file__).resolve().parent.parent
RUN_BUDGET_S = 450  # 8 minutes of device time less interpreter start-up and imports
MIN_STAGE_S = 5  # a stage is not started with less than this left of the run's budget
OUTPUT_TAIL = 3000  # characters of pytest's output kept in the results
STAGES = ("kernel-tests", "losses", "steps", "precision")
MLM_KD_DEFAULT = mlm_recipe.OBJECTIVE.defaults["kd_positions"]  # the recipe's default KL rows: the loss-share target's


@dataclass(frozen=True)
class Plan:
    """What each stage runs: the issue's shapes on the GPU, tiny ones for the CPU dry run."""

    kernel_tests: tuple[str, ...]
    kd: Case
    pt: Case
    loss_contenders: tuple[str, ...] | None  # None: every contender of bench_losses
    glue: bench_step.StepCase
    glue_batch: int
    step_impls: tuple[str, ...]
    mlm: dict  # a bench_mlm_step setup
    mlm_impls: tuple[str, ...]
    fused_impl: str  # the loss impl the step targets are judged on
    loss_budget: harness.Budget  # timing of one loss contender in one mode
    step_budget: harness.Budget  # timing of one training-step variant
    budgets_s: dict[str, float] = field(default_factory=dict)  # seconds per stage


GPU_PLAN = Plan(
    kernel_tests=("tests/test_kernels.py", "tests/test_losses.py"),
    kd=Case("kd-vocab", 8192, VOCAB),
    pt=Case("pt-tokens", 8192, 768, pt_layers=6),
    loss_contenders=None,
    glue=bench_step.CASES["pkd-cls"],
    glue_batch=256,
    step_impls=bench_step.IMPLS,
    mlm={**bench_mlm_step.SETUPS["cuda"], "micro_batch": 256},
    mlm_impls=("triton", "compile", "eager"),
    fused_impl="triton",
    loss_budget=harness.FULL["cuda"],
    # 10+ steps after 3 warm-up steps (optimizer state, compile), 0.3 s or more each: 15 variants fit the stage
    step_budget=harness.Budget(warmup_ms=0, rep_ms=300, min_reps=10, warmup_calls=3),
    budgets_s={"kernel-tests": 100, "losses": 120, "steps": 200, "precision": 30},  # 450 s: RUN_BUDGET_S
)
DRY_PLAN = Plan(
    kernel_tests=(
        "tests/test_kernels.py::test_kd_fully_masked_teacher_row",
        "tests/test_kernels.py::test_patient_bad_arguments",
        "tests/test_losses.py::test_first_row_is_the_textbook_value",
    ),
    kd=Case("kd-vocab", 8, 512),
    pt=Case("pt-tokens", 16, 64, pt_layers=6),
    loss_contenders=("fused", "eager-bf16", "eager-fp32", "liger"),
    glue=replace(bench_step.CASES["pkd-cls"], size=bench_step.TINY),
    glue_batch=4,
    step_impls=("triton", "eager"),
    mlm=bench_mlm_step.TINY,
    mlm_impls=("eager",),  # the interpreter on the LM rows, in 4 variants, would take most of the budget; the GLUE step runs it
    fused_impl="eager",
    loss_budget=harness.Budget(warmup_ms=0, rep_ms=0, min_reps=2),  # every path once more than warm-up: no numbers
    step_budget=harness.Budget(warmup_ms=0, rep_ms=0, min_reps=2),
    budgets_s={"kernel-tests": 90, "losses": 60, "steps": 120, "precision": 30},
)


class StageTimeout(BaseException):
    """A stage ran past its budget. A BaseException, so that the benchmarks' `except Exception` (which records
    a contender's failure and carries on) lets it through to the stage runner."""


def _alarm(signum, frame):
    raise StageTimeout


@dataclass
class Run:
    """The results document and where it goes; `save` rewrites the JSON and the markdown."""

    device: torch.device
    plan: Plan
    dry_run: bool
    json_path: Path
    budget_s: float
    doc: dict = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    stage_deadline: float = 0.0

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def stage_left_s(self) -> float:
        return self.stage_deadline - time.monotonic()

    def save(self) -> None:
        self.doc["run"]["seconds"] = round(time.monotonic() - self.started, 1)
        self.doc["targets"] = [{"stage": name, **t} for name, s in self.doc["stages"].items() for t in s.get("targets", [])]
        self.json_path.write_text(json.dumps(self.doc, indent=1, default=str) + "\n")  # str: another module's enums
        self.json_path.with_suffix(".md").write_text(render_markdown(self.doc))


def run_stage(run: Run, name: str, fn: Callable[[Run, dict], str | None]) -> None:
    """`fn(run, entry)` fills `entry` (saving as it goes) and may return its own status ("failed"); this
    bounds it by min(its budget, the run's time left), records status and seconds, and never raises, except
    on KeyboardInterrupt."""
    budget = run.plan.budgets_s[name]
    entry = run.doc["stages"][name] = {"budget_s": budget}
    left = run.left_s()
    if left < MIN_STAGE_S:
        entry.update(status="skipped", reason=f"the run's budget of {run.budget_s:g} s is spent ({left:.1f} s left)")
        run.save()
        print(f"[{name}] skipped: {entry['reason']}", flush=True)
        return
    limit = min(budget, left)
    entry["limit_s"] = round(limit, 1)
    run.stage_deadline = time.monotonic() + limit
    t0 = time.monotonic()
    print(f"[{name}] started, {limit:.0f} s at most", flush=True)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        try:
            entry["status"] = fn(run, entry) or "ok"
        finally:  # an alarm due just as `fn` returns still lands in the handlers below
            signal.setitimer(signal.ITIMER_REAL, 0)
    except StageTimeout:
        entry["status"] = "timeout"
        entry["error"] = f"stopped after its {limit:.0f} s; what it measured before is kept"
    except Exception as err:  # noqa: BLE001 — recorded; the next stage still runs
        entry["status"] = "error"
        entry["error"] = harness.error_text(err)
        entry["traceback"] = traceback.format_exc(limit=-6)[-OUTPUT_TAIL:]
    finally:
        signal.signal(signal.SIGALRM, previous)
    entry["seconds"] = round(time.monotonic() - t0, 1)
    if run.device.type == "cuda":
        try:  # a stage stopped mid-launch leaves no work queued for the next
            torch.cuda.synchronize(run.device)
            torch.cuda.empty_cache()
        except Exception as err:  # noqa: BLE001 — a broken CUDA context: the next stages will say so too
            entry["cuda_after"] = harness.error_text(err)
    run.save()
    print(f"[{name}] {entry['status']} in {entry['seconds']} s" + (f": {entry['error']}" if "error" in entry else ""), flush=True)


# -- 1: the kernel tests ---------------------------------------------------------------------------


def kernel_tests(run: Run, entry: dict) -> str:
    interpret = "0" if run.device.type == "cuda" else "1"
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        # on the GPU machine, where pytest-xdist is installed, 8 workers compile the kernels' variants in parallel
        workers = ["-n", "8"] if run.device.type == "cuda" and importlib.util.find_spec("xdist") else []
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *workers, *run.plan.kernel_tests]
        entry.update(command="python " + " ".join(command[1:]), triton_interpret=interpret)
        try:
            proc = subprocess.run([*command, f"--junitxml={junit}"], cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": interpret},
                                  capture_output=True, text=True, timeout=max(1.0, run.stage_left_s() - 3))  # fmt: skip
        except subprocess.TimeoutExpired as err:
            entry["output_tail"] = _text(err.stdout)[-OUTPUT_TAIL:]
            raise StageTimeout from None
        entry.update(returncode=proc.returncode, output_tail=(proc.stdout + proc.stderr)[-OUTPUT_TAIL:])
        entry.update(junit_summary(junit) if junit.is_file() else {"tests": 0})
    bad = entry.get("failures", 0) + entry.get("errors", 0)
    passed = entry["tests"] - bad - entry.get("skipped", 0)
    ok = proc.returncode == 0 and entry["tests"] > 0
    where = "compiled for the GPU" if interpret == "0" else "under the Triton interpreter"
    entry["targets"] = [{"target": f"kernel and loss tests, {where}", "want": "all pass", "got": f"{passed}/{entry['tests']} passed",
                         "met": ok, **({} if ok else {"missed_by": f"{bad} failed, exit code {proc.returncode}"})}]  # fmt: skip
    return "ok" if ok else "failed"


def _text(out) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else out or ""


def junit_summary(path: Path) -> dict:
    """Counts and the failed tests (with the first line of their message) from pytest's JUnit XML."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname')}::{case.get('name')}: {(bad.get('message') or '').splitlines()[0][:200] if bad.get('message') else ''}"
        for s in suites for case in s.iter("testcase") for bad in case if bad.tag in ("failure", "error")
    ]  # fmt: skip
    return {**counts, "failed": failed[:30]}


# -- 2: the losses ---------------------------------------------------------------------------------


def losses(run: Run, entry: dict) -> None:
    plan, device = run.plan, run.device
    b = plan.loss_budget
    entry["settings"] = {
        **bench_losses.settings(),
        "families": {case.family: case.description for case in (plan.kd, plan.pt)},
        "liger": "LigerKLDIVLoss (liger_kernel.transformers) on torch log_softmax / softmax ×T²: the same KL as the KD "
        "term over logits. Liger's fused-linear distillation losses take hidden states and the LM head: another computation.",
    }  # fmt: skip
    entry["copy_bandwidth"] = harness.copy_bandwidth(device, b)
    entry["rows"] = []
    run.save()
    for shape_rows in bench_losses.measure_cases([plan.kd, plan.pt], device, b, entry["copy_bandwidth"]["gbps"], plan.loss_contenders):
        entry["rows"] += shape_rows
        entry["targets"] = loss_targets(entry["rows"], plan.kd)
        run.save()


def loss_targets(rows: list[dict], kd: Case) -> list[dict]:
    """The kernels issue's KD targets at `kd`'s shape, and every fp32 contender matching the spec."""
    bad = bench_losses.failed_checks({"losses": rows})
    return [
        *bench_losses.targets(rows, (kd.family, kd.rows, kd.cols), small_shapes=False),
        {"target": "every fp32 contender gives the spec's loss and gradient", "want": "all match", "got": f"{len(bad)} differ",
         "met": not bad, **({"missed_by": "; ".join(bad)[:400]} if bad else {})},
    ]  # fmt: skip


# -- 3: the training steps -------------------------------------------------------------------------


def steps(run: Run, entry: dict) -> None:
    plan, device = run.plan, run.device
    glue = entry["glue"] = {"settings": {**asdict(plan.glue.size), "case": plan.glue.name, "layer_map": list(plan.glue.layer_map),
                                         "micro_batch": plan.glue_batch, "recipe": bench_step.RECIPE}, "rows": []}  # fmt: skip
    for rows in bench_step.measure_case(plan.glue, (plan.glue_batch,), device, run.dry_run, plan.step_impls, plan.step_budget):
        glue["rows"] += rows
        run.save()
    mlm = entry["mlm"] = {"settings": bench_mlm_step.settings(plan.mlm), "rows": []}
    for row in bench_mlm_step.measure(device, plan.mlm, bench_mlm_step.KD_POSITIONS, plan.mlm_impls, run.dry_run, plan.step_budget):
        mlm["rows"].append(row)
        entry["targets"] = step_targets(mlm["rows"], plan.fused_impl, plan.mlm["micro_batch"])
        run.save()


def step_targets(rows: list[dict], impl: str, micro_batch: int) -> list[dict]:
    """The MLM issue's targets: the loss ≤ 3% of the step (KL rows at the recipe's default), and the LM heads on
    the masked rows ≥ 1.3× full logits in tokens/s (KL over the masked rows, where the heads differ)."""

    def row(head, kd):
        return next((r for r in rows if (r["head"], r["kd_positions"], r["impl"]) == (head, kd, impl) and "step" in r), None)

    shared, masked, full = row("rows", MLM_KD_DEFAULT), row("rows", "masked"), row("full", "masked")
    share = shared and shared["loss_share"] * 100
    speedup = masked and full and masked["tokens_per_s"] / full["tokens_per_s"]
    return [
        bench_losses.judge(f"MLM step B={micro_batch} ({impl}, KL over {MLM_KD_DEFAULT} rows): loss share of the step", share, 3, " %", False),
        bench_losses.judge(f"MLM step B={micro_batch} ({impl}, KL over masked rows): masked-row heads vs full logits, tokens/s", speedup, 1.3, "×", True),
    ]  # fmt: skip


# -- 4: --precision auto ---------------------------------------------------------------------------


def precision(run: Run, entry: dict) -> None:
    """What `--precision auto` runs here for the main command's JSON (zero2.json asks for bf16): bf16 on a GPU
    with bf16 units, fp16 with loss scaling on one without, fp32 on a CPU that only emulates bf16."""
    from pkd_fast.config import ZERO2_DS_CONFIG
    from pkd_fast.precision import describe_device, resolve_precision

    info = describe_device(run.device)
    entry["device"] = info
    run.doc["device"].update(info)
    choice = resolve_precision("auto", run.device, json.loads(ZERO2_DS_CONFIG.read_text()), hardware=info)
    entry["choice"] = {"precision": choice.precision, "reason": choice.reason, "asked": choice.asked}
    if run.device.type == "cuda":
        bf16 = choice.precision == "bf16"
        entry["targets"] = [{"target": "--precision auto on this GPU (bf16-native from Ampere on)", "want": "bf16",
                             "got": choice.precision, "met": bf16, **({} if bf16 else {"missed_by": choice.reason})}]  # fmt: skip


STAGE_FNS = {"kernel-tests": kernel_tests, "losses": losses, "steps": steps, "precision": precision}


# -- the report ------------------------------------------------------------------------------------


def render_markdown(doc: dict) -> str:
    d, r, stages = doc["device"], doc["run"], doc["stages"]
    versions = ", ".join(f"{k} {d[k]}" for k in ("torch", "cuda", "triton", "transformers", "deepspeed", "liger-kernel") if d.get(k))
    lines = [f"# GPU acceptance on {d['name']}" + (" (CPU dry run, tiny shapes)" if r["dry_run"] else ""), "",
             f"{d['date']}, {versions}. `{r['command']}`: {r['seconds']} s of the run's {r['budget_s']} s.", ""]  # fmt: skip
    extra = {k: d[k] for k in ("cpu_capability", "bf16_native") if k in d}
    if extra:
        lines += [f"Device: {', '.join(f'{k} {v}' for k, v in extra.items())}.", ""]
    lines += ["## Stages", "", *report.md_table(["stage", "status", "seconds", "budget s", "note"], [
        [name, s.get("status", "running"), str(s.get("seconds", "–")), str(s["budget_s"]), str(s.get("error") or s.get("reason") or "")]
        for name, s in stages.items()
    ])]  # fmt: skip
    if doc.get("targets"):
        lines += ["", "## Targets (set for an H100/H200)", "", *report.target_table(doc["targets"])]
    tests = stages.get("kernel-tests", {})
    if "tests" in tests:
        lines += ["", "## 1. Kernel tests", "", f"`{tests['command']}` with TRITON_INTERPRET={tests['triton_interpret']}: "
                  f"{tests['tests']} tests, {tests.get('failures', 0)} failed, {tests.get('errors', 0)} errors, "
                  f"{tests.get('skipped', 0)} skipped, exit code {tests['returncode']}.", *(f"- {f}" for f in tests.get("failed", []))]  # fmt: skip
    loss = stages.get("losses", {})
    if loss.get("rows"):
        lines += ["", "## 2. Losses", *report.losses_section({"device": d, "losses": loss["rows"], "loss_settings": loss["settings"]})[2:]]
    step = stages.get("steps", {})
    if step.get("glue", {}).get("rows"):
        lines += ["", "## 3. Training steps", "", "### GLUE PKD-Skip step", *report.steps_section({"device": d, "step": step["glue"]["rows"],
                                                                   "step_settings": step["glue"]["settings"]})[2:]]  # fmt: skip
    if step.get("mlm", {}).get("rows"):
        s = step["mlm"]["settings"]
        lines += ["", f"### Masked-LM PKD step: {s['teacher_layers']} × {s['hidden']} → layers {s['student_layers']}, "
                  f"batch {s['micro_batch']} × {s['seq']}, {s['dtype']}", "", *bench_mlm_step.table_lines(step["mlm"]["rows"])]  # fmt: skip
    prec = stages.get("precision", {})
    if "choice" in prec:
        c = prec["choice"]
        lines += ["", "## 4. --precision auto", "", f"Asked `{c['asked']}`, chose **{c['precision']}**: {c['reason']}"]
    return "\n".join(lines) + "\n"


# -- the command -----------------------------------------------------------------------------------


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="folder for gpu_<device>.json/.md (default: benchmarks/results, "
                   "or a temporary folder with --dry-run)")  # fmt: skip
    p.add_argument("--budget-s", type=float, default=RUN_BUDGET_S, help="the whole run's time bound in seconds (default %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="every stage on tiny shapes on the CPU, for CI")
    args = p.parse_args(argv)
    if args.dry_run:
        device, plan = torch.device("cpu"), DRY_PLAN
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_acceptance: no CUDA device is visible (--dry-run runs the stages on the CPU)")
        device, plan = torch.device("cuda"), GPU_PLAN
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu_acceptance_")) if args.dry_run else harness.RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"gpu_{harness.device_slug(device)}{'_dry_run' if args.dry_run else ''}.json"
    run = Run(device, plan, args.dry_run, json_path, args.budget_s)
    command = " ".join(["python -m benchmarks.gpu_acceptance", *(argv if argv is not None else sys.argv[1:])])
    run.doc.update(device=harness.describe(device), run={"command": command, "dry_run": args.dry_run, "budget_s": args.budget_s,
                                                         "stages": list(STAGES)}, stages={})  # fmt: skip
    run.save()
    for name in STAGES:
        run_stage(run, name, STAGE_FNS[name])
    missed = [t["target"] for t in run.doc["targets"] if t["met"] is False]
    print(f"wrote {json_path} and {json_path.with_suffix('.md')} in {run.doc['run']['seconds']} s; "
          f"{len(missed)} target(s) missed" + "".join(f"\n  missed: {t}" for t in missed), flush=True)  # fmt: skip
    return json_path


if __name__ == "__main__":
    main()
