"""Masked-LM PKD from the top-k teacher cache against the live teacher (issue #20, item 4): do the loss
curves agree within the top-k error, how much faster is the student's step, how much memory does leaving
the teacher out free, how many bytes per token does the store take, and after how many students does
writing it pay for itself?

    python -m benchmarks.mlm_cache [--topk 64] [--sentences 1500]

Everything runs through the real CLI (`pkd_fast.train`), each run in its own process, so the step timed is
the trainer's own (`Trainer.fit`: the loader's collate, which reads the store, the recipe's loss, backward,
optimizer step) and each process's peak memory is its own:

  teacher  --stage teacher: a masked-LM head fitted on the offline MiniLM (6 × 384, 30,522 tokens), so the
           teacher's distribution is a real, peaked one (a random head's near-uniform row is the worst case
           for top-k)
  cache    --stage cache --teacher-cache DIR: the teacher over every epoch's masked blocks, written once;
           then the same command again, which only opens the store: the difference is the write's CPU time
           (one epoch of masks: each student trains one epoch, so the store holds exactly what it reads)
  live     --stage student: PKD (alternate layers 1,3,5; PT on 1,3 over every real token; KL over every
           real token), the teacher run on every batch
  cached   the same student with --teacher-cache DIR: sparse top-k KL, no teacher loaded

live and cached alternate (live, cached, live, cached) so that load from other processes on a shared
CPU falls on both alike. A step's cost is its CPU time (`cpu_time` deltas in train_log.jsonl, logged every
step), the median over the steps after the first few; the peak memory is each process's max RSS.
Break-even: writing the store costs W (CPU seconds) and each cached student saves S = (live - cached) per
step × steps; n students from one store cost W + n·cached against n·live, so it pays from n = ⌈W / S⌉.
Results: benchmarks/results/mlm_cache_<device>.json and .md.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from safetensors import safe_open

from benchmarks import harness
from pkd_fast.config import CPU_DS_CONFIG, default_teacher

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "pkd_fast" / "train.py"
GLUE_DIR = Path(os.environ.get("GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))
SKIP_STEPS = 3  # the first steps pay for allocation and warm caches


def write_corpus(path: Path, sentences: int) -> str:
    """SST-2 training sentences as raw text, one document per line."""
    with open(GLUE_DIR / "SST-2" / "train.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1 : 1 + sentences]
    path.write_text("".join(row[0] + "\n" for row in rows))
    return str(path)


def run(argv: list[str]) -> dict:
    """One CLI run in a fresh process: its CPU seconds (user + system) and peak RSS (MiB)."""
    proc = subprocess.Popen([sys.executable, str(TRAIN), *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: exit {proc.returncode}\n{output[-4000:]}")
    return {"cpu_s": usage.ru_utime + usage.ru_stime, "max_rss_mib": usage.ru_maxrss / 1024, "output": output}


def step_costs(run_dir: Path) -> dict:
    """Per-step CPU and wall seconds of the trainer's loop (train_log.jsonl, a line per step)."""
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    cpu = [b["cpu_time"] - a["cpu_time"] for a, b in zip(log, log[1:])][SKIP_STEPS:]
    wall = [b["time"] - a["time"] for a, b in zip(log, log[1:])][SKIP_STEPS:]
    return {"cpu_s": statistics.median(cpu), "wall_s": statistics.median(wall), "log": log}


def main() -> None:
    p = harness.parser(__doc__)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--sentences", type=int, default=1500, help="SST-2 sentences as the corpus (one epoch of it is trained)")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--head-steps", type=int, default=40)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="T of the KL (default 1: studies/results/topk_gap.md finds top-k KD of this teacher useful near T = 1 only)")
    args = p.parse_args()
    device = torch.device("cpu")
    root = Path(tempfile.mkdtemp(prefix="mlm_cache_bench-"))
    ds = json.loads(CPU_DS_CONFIG.read_text())
    ds.update({"train_micro_batch_size_per_gpu": args.micro_batch, "tensorboard": {"enabled": False}})
    (root / "ds.json").write_text(json.dumps(ds))
    corpus = write_corpus(root / "corpus.txt", args.sentences)
    common = ["--objective", "mlm", "--deepspeed", str(root / "ds.json"), "--text-files", corpus, "--max-seq-length", str(args.seq),
              "--loss-impl", "eager", "--log-steps", "1", "--seed", "1", "--temperature", str(args.temperature)]

    print("fitting the teacher's head ...", flush=True)
    run([*common, "--stage", "teacher", "--teacher", default_teacher(), "--max-steps", str(args.head_steps), "--lr", "1e-3",
         "--output-dir", str(root / "fit")])
    teacher = str(root / "fit" / "teacher" / "model")
    student = [*common, "--teacher", teacher, "--epochs", "1", "--lr", "1e-4"]
    store = root / "store"
    cache_argv = [*student, "--stage", "cache", "--teacher-cache", str(store), "--cache-topk", str(args.topk)]
    print("writing the store ...", flush=True)
    write = run([*cache_argv, "--output-dir", str(root / "cache")])
    reopen = run([*cache_argv, "--output-dir", str(root / "cache")])  # matches: opens it, writes nothing
    manifest = json.loads((store / "manifest.json").read_text())
    layout = manifest["layout"]
    store_bytes = sum(f["bytes"] for f in manifest["files"].values())

    runs = {"live": [], "cached": []}
    for rep in range(2):
        for name, extra in (("live", []), ("cached", ["--teacher-cache", str(store), "--cache-topk", str(args.topk)])):
            print(f"{name} student, repeat {rep + 1} ...", flush=True)
            out = root / f"{name}{rep}"
            proc = run([*student, "--stage", "student", *extra, "--output-dir", str(out)])
            runs[name].append({**step_costs(out / "students" / "alternate"), "max_rss_mib": proc["max_rss_mib"]})

    def summary(name):
        reps = runs[name]
        return {"step_cpu_s": statistics.median(r["cpu_s"] for r in reps), "step_wall_s": statistics.median(r["wall_s"] for r in reps),
                "max_rss_mib": statistics.median(r["max_rss_mib"] for r in reps),
                "per_repeat_step_cpu_s": [round(r["cpu_s"], 4) for r in reps]}

    curves = {name: [{k: r[k] for k in ("step", "total", "ce", "kd", "pt")} for r in runs[name][0]["log"]] for name in runs}
    live, cached = summary("live"), summary("cached")
    write_cpu = write["cpu_s"] - reopen["cpu_s"]
    steps = len(curves["live"])
    saving = (live["step_cpu_s"] - cached["step_cpu_s"]) * steps
    with safe_open(Path(teacher) / "model.safetensors", "pt") as f:
        teacher_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    results = {
        "setup": {"teacher": "all-MiniLM-L6-v2 + fitted masked-LM head (6 × 384, vocab 30,522)", "student": "alternate layers 1,3,5, PT on 1,3",
                  "seq": args.seq, "micro_batch": args.micro_batch, "steps": steps, "topk": args.topk, "temperature": args.temperature, "kd_positions": "all",
                  "pt_tokens": "all", "loss_impl": "eager", "blocks": layout["blocks"], "epochs": layout["epochs"],
                  "real_tokens_per_epoch": layout["tokens"], "store_dtype": layout["dtype"], "stored_layers": layout["layers"],
                  "contended": "2-core CPU shared with other jobs: trust the ratios of interleaved runs, not absolute seconds"},
        "store": {"bytes": store_bytes, "bytes_per_token": store_bytes / (layout["epochs"] * layout["tokens"]),
                  "topk_bytes_per_kd_row": layout["topk"] * (4 + (2 if layout["dtype"] != "float32" else 4)) + 4,
                  "states_bytes_per_token": len(layout["layers"]) * layout["hidden_size"] * (2 if layout["dtype"] != "float32" else 4),
                  "write_cpu_s": write_cpu},
        "live": live, "cached": cached,
        "step_speedup_cpu": live["step_cpu_s"] / cached["step_cpu_s"],
        "memory_freed_mib": live["max_rss_mib"] - cached["max_rss_mib"],
        "teacher_fp32_mib": teacher_params * 4 / 2**20,
        "break_even_students": math.ceil(write_cpu / saving) if saving > 0 else None,
        "loss_curves": curves, **compare_curves(curves),
    }
    path = harness.RESULTS_DIR / f"mlm_cache_{harness.device_slug(device)}.json"
    harness.update_results(path, device, **results)
    path.with_suffix(".md").write_text(render(json.loads(path.read_text())) + "\n")
    print(path.with_suffix(".md").read_text())


def compare_curves(curves: dict) -> dict:
    """How far the cached run's terms are from the live run's. At step 1 both students are the same weights
    on the same batch, so the KL's gap there is the top-k error alone (the part of the teacher's KL that its
    top k and one rest bucket do not carry); later steps add the drift of two trajectories."""
    pairs = list(zip(curves["live"], curves["cached"]))

    def max_rel(term):
        return max(abs(c[term] - l[term]) / abs(l[term]) for l, c in pairs)

    first_live, first_cached = pairs[0]
    return {"kd_step1_ratio": first_cached["kd"] / first_live["kd"], "ce_step1_rel_diff": abs(first_cached["ce"] - first_live["ce"]) / first_live["ce"],
            "pt_step1_rel_diff": abs(first_cached["pt"] - first_live["pt"]) / first_live["pt"],
            **{f"{term}_max_rel_diff": max_rel(term) for term in ("total", "ce", "kd", "pt")},
            "kd_ratio_range": [min(c["kd"] / l["kd"] for l, c in pairs), max(c["kd"] / l["kd"] for l, c in pairs)]}


def render(r: dict) -> str:
    s, st = r["setup"], r["store"]
    lines = [
        f"# Masked-LM PKD from the top-{s['topk']} teacher cache vs the live teacher",
        "",
        f"{r['device']['name']}, {r['device']['date']}, torch {r['device']['torch']}; {s['contended']}.",
        f"Teacher {s['teacher']}; student {s['student']}; {s['blocks']} blocks of {s['seq']} tokens, micro-batch {s['micro_batch']}, "
        f"{s['steps']} steps ({s['epochs']} epoch(s) of masks stored), KL over every real token at T = {s['temperature']:g}, "
        f"loss impl {s['loss_impl']}.",
        "",
        "| | live teacher | from the cache | |",
        "|---|---|---|---|",
        f"| student step, CPU s (median) | {r['live']['step_cpu_s']:.3f} | {r['cached']['step_cpu_s']:.3f} | **{r['step_speedup_cpu']:.2f}×** |",
        f"| student step, wall s (median) | {r['live']['step_wall_s']:.3f} | {r['cached']['step_wall_s']:.3f} | |",
        f"| peak RSS, MiB | {r['live']['max_rss_mib']:.0f} | {r['cached']['max_rss_mib']:.0f} | {r['memory_freed_mib']:.0f} MiB freed "
        f"(teacher weights fp32: {r['teacher_fp32_mib']:.0f} MiB) |",
        "",
        f"Store: {st['bytes'] / 2**20:.1f} MiB, **{st['bytes_per_token']:.0f} bytes per token** per epoch ({s['store_dtype']}: top-{s['topk']} "
        f"ids + values + lse = {st['topk_bytes_per_kd_row']} B per KD row, states of layers {s['stored_layers']} = "
        f"{st['states_bytes_per_token']} B per token); written in {st['write_cpu_s']:.1f} CPU s.",
        f"Break-even: {r['break_even_students']} student(s) (write cost ÷ CPU saved per student of {s['steps']} steps).",
        f"Loss curves (same seed, {s['steps']} steps). Step 1 (same weights, same batch): CE and PT equal to "
        f"{r['ce_step1_rel_diff']:.0e} / {r['pt_step1_rel_diff']:.0e}, the top-{s['topk']} KL is {100 * r['kd_step1_ratio']:.0f}% of the dense "
        f"KL: the top-k error of this teacher at T = {s['temperature']:g} (the mass outside its top {s['topk']} is one bucket). "
        f"Over the run the cached KL stays {100 * r['kd_ratio_range'][0]:.0f}–{100 * r['kd_ratio_range'][1]:.0f}% of the live one; "
        f"CE within {100 * r['ce_max_rel_diff']:.1f}%, PT within {100 * r['pt_max_rel_diff']:.1f}%, the total within "
        f"{100 * r['total_max_rel_diff']:.1f}% (the KL's weight α = 0.7 carries the top-k error into it).",
        "",
        "| step | total live | total cached | CE live | CE cached | KL live | KL cached | PT live | PT cached |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for l, c in zip(r["loss_curves"]["live"], r["loss_curves"]["cached"]):
        lines.append(f"| {l['step']} | {l['total']:.4f} | {c['total']:.4f} | {l['ce']:.4f} | {c['ce']:.4f} | {l['kd']:.4f} | {c['kd']:.4f} "
                     f"| {l['pt']:.5f} | {c['pt']:.5f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
