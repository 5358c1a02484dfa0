"""Student steps/s and peak memory with the teacher cache vs the live teacher: does a PKD step from the
cache cost no more than an FT step (target ≤ 1.1×), with no teacher weights in memory?

    python -m benchmarks.bench_cache [--device cuda|cpu] [--steps N]

Three ways to train the same student, timed together in one process (taking turns step by step on the
CPU, so load from other processes falls on each alike), and each alone in a fresh process for its memory:

  ft     fine-tuning: CE only, no teacher
  live   PKD-Skip with the frozen teacher run on every batch (engines.frozen_teacher)
  cache  PKD-Skip reading the teacher's logits and [CLS] states from a store written once by
         glue.Context.write_cache (the data loader's collate reads the rows)

A step is the trainer's own (`Trainer.train_micro_batch` on the run's `Context.distiller` and
`Context.train_loader`): the loader's next batch (with the cache's rows), on the
device, the loss, the non-finite guard's look, `engine.backward`, `engine.step`. Teacher and student have random weights (speed does
not depend on them); every token is real. On CUDA a BERT-base-sized teacher (12 × 768) in bf16 ZeRO-2
(ds_configs/zero2.json), timed with device events; on the CPU a 12 × 384 teacher in fp32, small enough for
a 2-core run, on one thread and timed in CPU time (the step's cost, even when others share the machine).
The student is the teacher's lower half (6 layers), saved once so no mode loads more than it needs.

Results go to benchmarks/results/cache_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig

from benchmarks import harness
from pkd_fast import cache as teacher_cache
from pkd_fast import deepspeed_json
from pkd_fast.config import ZERO2_DS_CONFIG, Config, default_teacher
from pkd_fast.dist import Dist, init_distributed
from pkd_fast.models import build_student, layer_map, load_classifier
from pkd_fast.recipes.glue import Context, Run
from pkd_fast.tasks import get_task

REPO = Path(__file__).resolve().parents[1]
TASK = get_task("sst2")
STUDENT_LAYERS = 6
MODES = ("ft", "live", "cache")
MEMORY_STEPS = 3  # steps over which each mode's peak memory is taken
SETUPS = {  # per device: teacher size, batch, sequence length, precision
    "cuda": {"layers": 12, "hidden": 768, "heads": 12, "micro_batch": 32, "seq": 128, "bf16": True, "steps": 30},
    "cpu": {"layers": 12, "hidden": 384, "heads": 12, "micro_batch": 8, "seq": 64, "bf16": False, "steps": 6},
}


def ds_config(setup: dict) -> dict:
    config = deepspeed_json.read_ds_config(str(ZERO2_DS_CONFIG))
    config.update(train_micro_batch_size_per_gpu=setup["micro_batch"], bf16={"enabled": setup["bf16"]}, tensorboard={"enabled": False})
    return config


def rows(setup: dict, tokenizer) -> datasets.Dataset:
    """Random full-length rows, the same in every process: enough for warm-up and the timed steps."""
    return harness.token_rows(setup["micro_batch"] * (setup["steps"] + 2), setup["seq"], tokenizer.vocab_size, tokenizer)


def context(setup: dict, workdir: Path, world: Dist) -> Context:
    tokenizer = AutoTokenizer.from_pretrained(workdir / "teacher")
    cfg = Config(teacher=str(workdir / "teacher"), teacher_cache=str(workdir / "cache"), max_seq_length=setup["seq"])
    return Context(cfg, TASK, world, ds_config(setup), tokenizer, rows(setup, tokenizer), {})


def fingerprint(ctx: Context) -> dict:
    return teacher_cache.fingerprint(
        ctx.cfg.teacher, ctx.tokenizer, TASK.name, ctx.cfg.max_seq_length, ctx.train_set, deepspeed_json.train_dtype(ctx.ds_config)
    )


def prepare(setup: dict, workdir: Path, world: Dist) -> dict:
    """Save a random teacher and the student's init, then write the cache through the trainer."""
    config = BertConfig(num_hidden_layers=setup["layers"], hidden_size=setup["hidden"], num_attention_heads=setup["heads"],
                        intermediate_size=4 * setup["hidden"], num_labels=TASK.num_labels)
    teacher = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
    teacher.save_pretrained(workdir / "teacher")
    AutoTokenizer.from_pretrained(default_teacher()).save_pretrained(workdir / "teacher")
    build_student(teacher, STUDENT_LAYERS, TASK).save_pretrained(workdir / "student")
    ctx = context(setup, workdir, world)
    t0 = time.perf_counter()
    ctx.write_cache(ctx.cfg.teacher, fingerprint(ctx))
    seconds = time.perf_counter() - t0
    files = {p.name: p.stat().st_size for p in (workdir / "cache").iterdir()}
    return {"write_seconds": round(seconds, 2), "rows": len(ctx.train_set), "bytes": files}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak bytes over a span of work: CUDA's max_memory_allocated, or on the CPU this process's RSS sampled
    every millisecond by a thread (torch's CPU allocator reports no peak; getrusage's covers the whole life)."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._done = device, 0, threading.Event()

    def _sample(self) -> None:
        while not self._done.wait(1e-3):
            self.peak = max(self.peak, _rss())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = _rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        harness.synchronize(self.device)
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._done.set()
            self._thread.join()
            self.peak = max(self.peak, _rss())


def trainer(mode: str, ctx: Context, setup: dict, workdir: Path, world: Dist) -> tuple[Callable[[], None], int]:
    """One training step of `mode` as a call, and the parameter count of the teacher it holds."""
    device = world.device
    lmap = () if mode == "ft" else layer_map("skip", setup["layers"], STUDENT_LAYERS)
    spec = Run(mode, "ft" if mode == "ft" else "skip", lmap, 0.0 if mode == "ft" else ctx.cfg.alpha,
               ctx.cfg.beta if lmap else 0.0, 5e-5, 1, workdir / mode)
    ctx.cache = teacher_cache.TeacherCache.open(workdir / "cache", fingerprint(ctx)) if mode == "cache" else None
    student = load_classifier(str(workdir / "student"), TASK)
    distiller = ctx.distiller(student, spec).replace(loss_impl="triton" if device.type == "cuda" else "eager")
    teacher = distiller.teacher
    engine = ctx.trainer.engine(student, spec.lr, total_steps=10**6, out=workdir)
    step = harness.trainer_step(ctx.trainer, engine, distiller, ctx.train_loader(distiller))
    for _ in range(2):  # warm-up: optimizer state, allocator pools, first touch of memory-mapped weights
        step()
    harness.synchronize(device)
    return step, sum(p.numel() for p in teacher.model.parameters()) if mode == "live" else 0


def timings(setup: dict, workdir: Path, world: Dist) -> dict:
    """Per-step time of every mode, in one process. On the CPU the modes take turns step by step, so load
    from other processes falls on each alike, and the time is CPU time on one thread: the step's cost.
    On CUDA each mode is timed in turn with device events."""
    ctx = context(setup, workdir, world)
    steps = {mode: trainer(mode, ctx, setup, workdir, world)[0] for mode in MODES}
    if world.device.type == "cuda":
        budget = harness.Budget(warmup_ms=0, rep_ms=0, min_reps=setup["steps"], warmup_calls=0)
        return {mode: harness.time_call(step, world.device, budget).as_dict() for mode, step in steps.items()}
    cpu, wall = ({mode: [] for mode in MODES} for _ in range(2))
    for _ in range(setup["steps"]):
        for mode, step in steps.items():
            c0, w0 = time.process_time(), time.perf_counter()
            step()
            cpu[mode].append((time.process_time() - c0) * 1e3)
            wall[mode].append((time.perf_counter() - w0) * 1e3)
    result = {}
    for mode in MODES:
        p20, _, _, p80 = statistics.quantiles(cpu[mode], n=5)
        result[mode] = {"ms": round(statistics.median(cpu[mode]), 3), "p20": round(p20, 3), "p80": round(p80, 3),
                        "reps": setup["steps"], "wall_ms": round(statistics.median(wall[mode]), 3)}
    return result


def memory(mode: str, setup: dict, workdir: Path, world: Dist) -> dict:
    """One mode alone in its process: memory after the warm-up and the peak over a few more steps."""
    step, teacher_params = trainer(mode, context(setup, workdir, world), setup, workdir, world)
    resident = torch.cuda.memory_allocated(world.device) if world.device.type == "cuda" else _rss()
    with PeakMemory(world.device) as peak:
        for _ in range(MEMORY_STEPS):
            step()
    return {"resident_mb_after_warmup": round(resident / 2**20, 1), "peak_mb": round(peak.peak / 2**20, 1),
            "teacher_params": teacher_params}


def _worker(job: str, device: torch.device, workdir: Path) -> None:
    if device.type == "cpu":
        torch.set_num_threads(1)  # CPU time per step is then its cost, whoever else uses the machine
    world = init_distributed()
    setup = SETUPS[device.type] | json.loads(os.environ.get("BENCH_CACHE_SETUP", "{}"))
    if job == "prepare":
        result = prepare(setup, workdir, world)
    elif job == "time":
        result = timings(setup, workdir, world)
    else:
        result = memory(job.removeprefix("memory-"), setup, workdir, world)
    print("RESULT " + json.dumps(result), flush=True)


def _spawn(job: str, device: torch.device, workdir: Path, setup: dict) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_cache", "--device", device.type, "--worker", job, "--workdir", str(workdir)]
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, env={**os.environ, "BENCH_CACHE_SETUP": json.dumps(setup)})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{job} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def table(results: dict) -> str:
    s, modes = results["settings"], results["modes"]
    ft = modes["ft"]["step"]["ms"]
    device = results["device"]
    lines = [
        (f"**Teacher cache** on {device['name']} ({device['date'][:10]}, torch {device['torch']}): {s['teacher']} → "
         f"{s['student']}, batch {s['micro_batch']} × seq {s['seq']}, {s['precision']}; step time: {s['timing']}"),
        "",
        f"| mode | step ms (p20–p80) | steps/s | × FT step | {s['resident']} MiB | peak MiB |",
        "|---|---|---|---|---|---|",
    ]
    for name, label in (("ft", "FT (no teacher)"), ("live", "PKD-Skip, live teacher"), ("cache", "PKD-Skip, teacher cache")):
        m = modes[name]
        lines.append(f"| {label} | {m['step']['ms']:.1f} ({m['step']['p20']:.1f}–{m['step']['p80']:.1f}) | {m['steps_per_s']:.2f} | "
                     f"{m['step']['ms'] / ft:.2f} | {m['resident_mb_after_warmup']:.0f} | {m['peak_mb']:.0f} |")
    verdict = "met" if results["target_met"] else "not met"
    lines += ["", (f"Target: cache step ≤ 1.1 × FT step: **{verdict}** ({results['ratios']['cache_vs_ft']:.3f}×). "
                   f"Writing the cache of {results['cache']['rows']} rows took {results['cache']['write_seconds']} s. "
                   f"Peak memory: {s['memory']}.")]
    return "\n".join(lines)


def run(device: torch.device, steps: int | None) -> dict:
    setup = SETUPS[device.type] | ({"steps": steps} if steps else {})
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        workdir = Path(tmp)
        cache = _spawn("prepare", device, workdir, setup)
        steps = _spawn("time", device, workdir, setup)
        modes = {}
        for mode in MODES:
            modes[mode] = {"step": steps[mode], "steps_per_s": round(1e3 / steps[mode]["ms"], 3),
                           **_spawn(f"memory-{mode}", device, workdir, setup)}
            print(f"{mode:6} {steps[mode]['ms']:9.1f} ms/step  peak {modes[mode]['peak_mb']:8.1f} MiB", flush=True)
    ft, live, cached = (modes[m]["step"]["ms"] for m in MODES)
    results = {
        "device": {**harness.describe(device), **({"threads": 1} if device.type == "cpu" else {}),
                   "load_average_at_end": os.getloadavg()},
        "settings": {
            "teacher": f"{setup['layers']} layers × {setup['hidden']} hidden (random weights)",
            "student": f"{STUDENT_LAYERS} layers, the teacher's lower half",
            "micro_batch": setup["micro_batch"], "seq": setup["seq"], "timed_steps": setup["steps"],
            "precision": "bf16 ZeRO-2" if setup["bf16"] else "fp32 ZeRO-2",
            "timing": "CUDA events (harness.time_call)" if device.type == "cuda"
                      else "CPU time per step, torch on 1 thread (median wall time in the JSON)",
            "layer_map": list(layer_map("skip", setup["layers"], STUDENT_LAYERS)),
            "resident": "allocated after warm-up" if device.type == "cuda" else "RSS after warm-up",
            "memory": f"each mode alone in its process, over {MEMORY_STEPS} steps after warm-up: "
                      + ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                         else "the process's RSS sampled every ms (python, torch, deepspeed included)"),
        },
        "cache": cache,
        "modes": modes,
        "ratios": {"cache_vs_ft": round(cached / ft, 3), "live_vs_ft": round(live / ft, 3), "live_vs_cache": round(live / cached, 3)},
        "target_met": cached <= 1.1 * ft,
    }
    stem = harness.RESULTS_DIR / f"cache_{harness.device_slug(device)}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    stem.with_suffix(".md").write_text(table(results) + "\n")
    print("\n" + table(results))
    return results


def main(argv=None) -> None:
    p = harness.parser(__doc__)
    p.add_argument("--steps", type=int, default=None, help="timed steps per mode (default: 30 on CUDA, 6 on the CPU)")
    p.add_argument("--worker", choices=("prepare", "time", *(f"memory-{mode}" for mode in MODES)), help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = harness.pick_device(args.device)
    if args.worker:
        _worker(args.worker, device, args.workdir)
    else:
        run(device, args.steps)


if __name__ == "__main__":
    main()
