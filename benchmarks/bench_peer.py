"""pkd_fast against a peer toolkit and a plain PyTorch loop, on the same data, teacher and student, in one
command (issue #13's setup: SST-2, 8,000 rows, batch 32, length 64, 3-layer student, T=10, α=0.7, β=100,
lr 1e-4, 1 epoch):

    python -m benchmarks.bench_peer [--max-train-samples 8000] [--threads N] [--workdir DIR]

Each trainer runs in its own process, one after another:

  teacher     pkd_fast fine-tunes the offline MiniLM on the rows (reused from --workdir when present), then
              writes the teacher cache (train.py --stage teacher / --stage cache)
  textbrewer  TextBrewer 0.2.1's GeneralDistiller: PKD-Skip through its intermediate 'pkd' loss on the same
              layer map, live fp32 teacher (it has no bf16 path without apex). It is installed by this
              script with `pip install --no-deps --target` into the workdir, never a pkd_fast dependency.
  pkd-live    pkd_fast PKD-Skip with the live teacher     (pkd_fast/train.py, the CLI)
  pkd-cache   pkd_fast PKD-Skip from the teacher cache    (pkd_fast/train.py --teacher-cache)
  pkd-ft      pkd_fast FT                                 (pkd_fast/train.py --strategy ft)
  plain-ft    FT as a plain PyTorch loop of the same model: forward (under the same autocast as the
              DeepSpeed config), backward, clip to 1.0, fused AdamW, the same linear schedule

Same objective everywhere: TextBrewer's KD is a CE without T², so its kd weight is α·T² and its hard-label
weight 1-α; its 'pkd' loss is Σ_layer mean_batch ‖ĥs−ĥt‖², so its weight is β/(L·H), which equals
pkd_fast's default elementwise_mean scale (with weight β it is L·H times stronger). Same student
initialisation (the teacher's lower layers, the same seeded head), data order and batches (pkd_fast's loader,
grouped by length as pkd_fast's runs are by default), AdamW (weight decay 0.01 on every parameter) and warmup.

s/step is the process's CPU time per step, the median over 10-step windows after the first 10 steps
(pkd_fast: the `cpu_time` of its train_log.jsonl lines, written every 10 steps; the others: clocks read at
every 10th training step), so start-up, evaluation and saving stay out of it; with --threads 1 it is the
step's cost even while other processes share the cores (wall s/step is recorded beside it). Round 1 trains on
every row (the accuracies); later rounds are short runs in alternating order, and s/step is the median over
rounds. Dev accuracy is on the
full SST-2 dev set. Results: benchmarks/results/peer_<device>.{json,md,png}, on a CPU per kind (`--cpu-kind avx2` holds the
trainers to AVX2: peer_cpu-avx2.*).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks import harness
from pkd_fast.config import CPU_DS_CONFIG, ZERO2_DS_CONFIG

REPO = Path(__file__).resolve().parents[1]
TEXTBREWER = "textbrewer==0.2.1"
WINDOW = 10  # steps per timed window (pkd_fast logs every WINDOW steps)
SETUP = {"task": "sst2", "max_seq_length": 64, "student_layers": 3, "temperature": 10.0, "alpha": 0.7, "beta": 100.0,
         "lr": 1e-4, "teacher_lr": 5e-5, "epochs": 1, "warmup_ratio": 0.1, "seed": 42}
TRAINERS = ("textbrewer", "pkd-live", "pkd-cache", "pkd-ft", "plain-ft")


def window_seconds(times: list[float], steps: list[int]) -> list[float]:
    """Seconds per step of each window between consecutive clock reads, from the second read on."""
    return [(t1 - t0) / (s1 - s0) for (t0, s0), (t1, s1) in zip(zip(times, steps), zip(times[1:], steps[1:]))]


# -- pkd_fast, through its CLI ------------------------------------------------------------------------------


def pkd_args(args, out: Path, rows: int, *extra: str) -> list[str]:
    s = SETUP
    return [
        sys.executable, str(REPO / "pkd_fast" / "train.py"), "--deepspeed", str(args.ds_config), "--task", s["task"],
        "--glue-dir", args.glue_dir, "--max-train-samples", str(rows), "--max-seq-length", str(s["max_seq_length"]),
        "--student-layers", str(s["student_layers"]), "--temperature", str(s["temperature"]), "--alpha", str(s["alpha"]),
        "--beta", str(s["beta"]), "--lr", str(s["lr"]), "--teacher-lr", str(s["teacher_lr"]), "--epochs", str(s["epochs"]),
        "--warmup-ratio", str(s["warmup_ratio"]), "--seed", str(s["seed"]), "--log-steps", str(WINDOW),
        "--output-dir", str(out), *extra,
    ]


def run_child(cmd: list[str], env: dict, log: Path) -> float:
    """Run one trainer; its output goes to `log`; the wall seconds it took."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); see {log}")
    return round(time.perf_counter() - t0, 1)


def pkd_result(run_dir: Path, wall: float) -> dict:
    result = json.loads((run_dir / "results.json").read_text())
    lines = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines]
    return {"dev_accuracy": result["dev"]["accuracy"], "steps": result["steps"],
            "windows": window_seconds([r["cpu_time"] for r in lines], steps), "wall_windows": window_seconds([r["time"] for r in lines], steps),
            "train_seconds": result["train_seconds"], "process_seconds": wall}


# -- the peer and the plain loop, in a worker process ---------------------------------------------------------


def worker(kind: str, teacher_path: str, args) -> dict:
    """Train one student outside pkd_fast's trainer, on pkd_fast's data pipeline (same rows, order, padding)."""
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup, set_seed

    from pkd_fast import data, glue_files
    from pkd_fast.families import model_inputs
    from pkd_fast.metrics import glue_metrics
    from pkd_fast.models import build_student, layer_map, load_classifier
    from pkd_fast.precision import apply_precision, resolve_precision
    from pkd_fast.tasks import get_task

    s, task = SETUP, get_task(SETUP["task"])
    config = json.loads(Path(args.ds_config).read_text())
    config = apply_precision(config, resolve_precision("auto", torch.device("cpu"), config))  # as pkd_fast's run resolves it
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    raw = glue_files.load_glue(task, args.glue_dir)
    train_set = data.tokenize(data.subsample(raw["train"], args.max_train_samples, 42), tokenizer, s["max_seq_length"])
    dev_set = data.tokenize(data.subsample_head(raw["dev"], args.max_eval_samples), tokenizer, s["max_seq_length"])
    batch_size = config["train_micro_batch_size_per_gpu"]
    # pkd_fast's own batches (grouped by length, its default), so every trainer pads and orders alike
    loader = data.make_loader(train_set, tokenizer, batch_size, train=True, seed=s["seed"], group_by_length=True)
    total = len(loader) * s["epochs"]

    teacher = load_classifier(teacher_path, task)
    source = build_student(teacher, s["student_layers"], task)
    set_seed(s["seed"])  # the same fresh head as pkd_fast's student
    student = build_student(source, s["student_layers"], task)
    optimizer = torch.optim.AdamW(student.parameters(), lr=s["lr"], weight_decay=0.01, fused=kind == "plain-ft")
    schedule = {"num_warmup_steps": int(s["warmup_ratio"] * total), "num_training_steps": total}
    autocast = config.get("torch_autocast", {}).get("enabled") and kind == "plain-ft"
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(autocast))

    clock: list[float] = []
    cpu_clock: list[float] = []
    steps: list[int] = []

    def tick(module, _inputs):  # a forward pre-hook: the clocks at each WINDOW-th training step
        if module.training:
            tick.n += 1
            if (tick.n - 1) % WINDOW == 0:
                clock.append(time.perf_counter())
                cpu_clock.append(time.process_time())
                steps.append(tick.n - 1)
    tick.n = 0
    student.register_forward_pre_hook(tick)

    @torch.no_grad()
    def evaluate(model, **_):
        model.eval()
        rows = [(model(**model_inputs(model, b)).logits.float(), b["labels"]) for b in
                data.make_loader(dev_set, tokenizer, 2 * batch_size, train=False, seed=0)]
        model.train()
        logits, labels = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
        evaluate.metrics = glue_metrics(logits.numpy(), labels.numpy(), task)

    if kind == "textbrewer":
        from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig

        lmap = layer_map("skip", teacher.config.num_hidden_layers, s["student_layers"])
        pt_weight = s["beta"] / (len(lmap) * teacher.config.hidden_size)
        distill = DistillationConfig(
            temperature=s["temperature"], hard_label_weight=1 - s["alpha"], kd_loss_type="ce",
            kd_loss_weight=s["alpha"] * s["temperature"] ** 2,
            intermediate_matches=[{"layer_T": t, "layer_S": j, "feature": "hidden", "loss": "pkd", "weight": pt_weight}
                                  for j, t in enumerate(lmap, 1)],
        )
        training = TrainingConfig(device="cpu", output_dir=str(Path(args.workdir) / "textbrewer_out"), log_dir=None)

        def adaptor(_batch, out):
            return {"logits": out.logits, "hidden": out.hidden_states, "losses": [out.loss]}

        def inputs(batch):
            return {**model_inputs(student, batch), "labels": batch["labels"], "output_hidden_states": True}

        distiller = GeneralDistiller(training, distill, model_T=teacher.eval(), model_S=student, adaptor_T=adaptor, adaptor_S=adaptor)
        t0 = time.perf_counter()
        with distiller:
            distiller.train(optimizer, loader, num_epochs=s["epochs"], scheduler_class=get_linear_schedule_with_warmup,
                            scheduler_args=schedule, max_grad_norm=1.0, callback=evaluate, batch_postprocessor=inputs)
    else:
        del teacher, source
        scheduler = get_linear_schedule_with_warmup(optimizer, **schedule)
        student.train()
        t0 = time.perf_counter()
        for _ in range(s["epochs"]):
            for batch in loader:
                with amp:
                    loss = student(**model_inputs(student, batch), labels=batch["labels"]).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        with amp:
            evaluate(student)
    # Windows end at a clock read before a step's forward: the trailing partial window, which also holds
    # the evaluation, is not one of them.
    return {"dev_accuracy": evaluate.metrics["accuracy"], "steps": total, "windows": window_seconds(cpu_clock, steps)[1:],
            "wall_windows": window_seconds(clock, steps)[1:],
            "train_seconds": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads()}


# -- the comparison -----------------------------------------------------------------------------------------


def summarize(rounds: list[dict]) -> dict:
    """Per trainer: the full run's accuracy and times, each round's median s/step, and their median; the
    targets' ratios from those medians and, to show their spread, round by round."""
    rows = {}
    for name, full in rounds[0].items():
        per_round = [statistics.median(r[name]["windows"]) for r in rounds]
        s_step = statistics.median(per_round)
        wall = statistics.median(statistics.median(r[name]["wall_windows"]) for r in rounds)
        rows[name] = {**{k: v for k, v in full.items() if not k.endswith("windows")}, "s_per_step": round(s_step, 4),
                      "steps_per_s": round(1 / s_step, 3), "s_per_step_by_round": [round(x, 4) for x in per_round],
                      "wall_s_per_step": round(wall, 4), "full_run_windows": [round(w, 4) for w in full["windows"]]}
    pairs = [(f"{name} / textbrewer steps/s", "textbrewer", name) for name in ("pkd-live", "pkd-cache")]
    pairs.append(("pkd-ft / plain-ft s/step", "pkd-ft", "plain-ft"))
    ratios = {
        label: {"ratio": round(rows[num]["s_per_step"] / rows[den]["s_per_step"], 3),
                "by_round": [round(a / b, 3) for a, b in zip(rows[num]["s_per_step_by_round"], rows[den]["s_per_step_by_round"])]}
        for label, num, den in pairs if num in rows and den in rows
    }
    return {"rows": rows, "ratios": ratios}


def render(results: dict) -> str:
    d, s = results["device"], results["setup"]
    lines = [
        f"# pkd_fast vs TextBrewer {TEXTBREWER.split('==')[1]} vs a plain PyTorch loop ({d['name']}, {d['date'][:10]})",
        "",
        f"CPU kind: {d.get('cpu_kind', 'native')}, capability {d.get('cpu_capability', '?')}, bf16 native: "
        f"{d.get('bf16_native', '?')}; pkd_fast ran {d.get('auto_precision', 'the JSON precision')} (`--precision auto`).",
        "",
        f"SST-2, {results['train_rows']:,} training rows, batch {results['micro_batch']}, length {s['max_seq_length']}, "
        f"{s['student_layers']}-layer student of the fine-tuned MiniLM teacher (dev accuracy {results['teacher_dev_accuracy']:.2f}), "
        f"T={s['temperature']:g}, α={s['alpha']}, β={s['beta']:g}, lr {s['lr']:g}, {s['epochs']} epoch; pkd_fast on "
        f"`{results['ds_config']}`; torch threads per process: {results['threads']}. s/step: the process's CPU seconds "
        f"per step (on 1 thread, the step's cost even while other processes share the cores; wall s/step beside it), median over "
        f"{results['rounds']} rounds (the full run, then {results['timing_rows']:,}-row runs in alternating order) of each "
        f"run's median {WINDOW}-step window after its first {WINDOW} steps; dev accuracy and train s from the full run.",
        "",
        "| trainer | s/step | steps/s | s/step by round | wall s/step | dev acc (%) | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results["rows"].items():
        by_round = ", ".join(f"{x:.3f}" for x in r["s_per_step_by_round"])
        lines.append(f"| {LABELS[name]} | {r['s_per_step']:.3f} | {r['steps_per_s']:.2f} | {by_round} | {r['wall_s_per_step']:.3f} | "
                     f"{r['dev_accuracy']:.2f} | {r['train_seconds']} |")
    lines += ["", *(f"- {k}: **{v['ratio']}** (by round: {', '.join(map(str, v['by_round']))})" for k, v in results["ratios"].items())]
    return "\n".join(lines) + "\n"


LABELS = {
    "textbrewer": "TextBrewer GeneralDistiller, PKD-Skip ('pkd' loss), live teacher, fp32",
    "pkd-live": "pkd_fast PKD-Skip, live teacher",
    "pkd-cache": "pkd_fast PKD-Skip, teacher cache",
    "pkd-ft": "pkd_fast FT",
    "plain-ft": "plain PyTorch FT loop (same model, pkd_fast's precision, fused AdamW)",
}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["rows"])
    rows = [results["rows"][n] for n in names]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    bars = ax.barh(names[::-1], [r["steps_per_s"] for r in rows][::-1], color="#4c72b0")
    for bar, r in zip(bars, rows[::-1]):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {r['steps_per_s']:.2f}/s, dev {r['dev_accuracy']:.1f}", va="center", fontsize=8)
    ax.set_xlabel("training steps per second (higher is better)")
    ax.set_xlim(0, 1.35 * max(r["steps_per_s"] for r in rows))
    d = results["device"]
    ax.set_title(f"SST-2 {results['train_rows']:,} rows, batch {results['micro_batch']}, len 64: {d['name']}, {d['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_trainer(name: str, args, work: Path, teacher: Path, rows: int, eval_rows: int | None, env: dict) -> dict:
    """One trainer's run on `rows` training rows (dev: the first `eval_rows`, or all): its windows and dev metric."""
    work.mkdir(parents=True, exist_ok=True)
    log = work / f"{name}.log"
    evals = ("--max-eval-samples", str(eval_rows)) if eval_rows else ()
    if name.startswith("pkd-"):
        strategy = "ft" if name == "pkd-ft" else "skip"
        extra = ("--teacher-cache", str(work / f"cache-{rows}")) if name == "pkd-cache" else ()
        if extra and not Path(extra[1]).is_dir():  # written once per row count, outside the timed runs
            run_child(pkd_args(args, work / "cache-write", rows, "--stage", "cache", "--teacher", str(teacher), *extra), env, work / "cache.log")
        wall = run_child(pkd_args(args, work / name, rows, "--stage", "student", "--teacher", str(teacher),
                                  "--strategy", strategy, *extra, *evals), env, log)
        return pkd_result(work / name / "students" / strategy, wall)
    if name == "textbrewer":
        target = Path(args.workdir) / "textbrewer"
        if not (target / "textbrewer").is_dir():
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), TEXTBREWER], check=True)
        env = {**env, "PYTHONPATH": os.pathsep.join([str(target), str(REPO), env.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "benchmarks.bench_peer", "--worker", name, "--teacher", str(teacher), "--glue-dir", args.glue_dir,
           "--max-train-samples", str(rows), "--workdir", str(work), "--ds-config", args.ds_config, *evals]
    wall = run_child(cmd, env, log)
    result_line = [line for line in log.read_text().splitlines() if line.startswith("RESULT ")][-1]
    return {**json.loads(result_line[len("RESULT "):]), "process_seconds": wall}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-train-samples", type=int, default=8000)
    p.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR"), help="classic glue_data/ folder (default $GLUE_DIR)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of every trainer (default: torch's, all cores)")
    p.add_argument("--workdir", default=str(REPO / "outputs" / "bench_peer"), help="teacher, cache, runs, the TextBrewer install")
    p.add_argument("--ds-config", default=None, help="pkd_fast's DeepSpeed JSON (default: cpu.json on a CPU, zero2.json on CUDA)")
    p.add_argument("--cpu-kind", choices=sorted(harness.CPU_KINDS), default="native",
                   help="hold every trainer to this CPU kind (avx2: no native bf16, as on most cloud VMs)")
    p.add_argument("--trainers", default=",".join(TRAINERS), help=f"comma-separated subset of {TRAINERS}")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds: the full run, then short runs in alternating order")
    p.add_argument("--timing-rows", type=int, default=1600, help="training rows of each round after the first")
    p.add_argument("--max-eval-samples", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=("textbrewer", "plain-ft"), help=argparse.SUPPRESS)
    p.add_argument("--teacher", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = harness.pick_device(None)
    args.ds_config = args.ds_config or str(ZERO2_DS_CONFIG if device.type == "cuda" else CPU_DS_CONFIG)  # train.py's default
    if not args.glue_dir:
        raise SystemExit("error: --glue-dir (or GLUE_DIR) is required")
    micro_batch = json.loads(Path(args.ds_config).read_text())["train_micro_batch_size_per_gpu"]
    if min(args.max_train_samples, args.timing_rows) < 3 * WINDOW * micro_batch:
        raise SystemExit(f"error: --max-train-samples and --timing-rows must give {3 * WINDOW} steps of {micro_batch} rows or more "
                         f"(the first {WINDOW} are warm-up, the rest {WINDOW}-step windows)")
    work = Path(args.workdir)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.teacher, args)), flush=True)
        return

    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **harness.CPU_KINDS[args.cpu_kind], "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    teacher = work / "pkd-teacher" / "teacher" / "model"
    if not (teacher / "config.json").is_file():
        print("fine-tuning the teacher ...", flush=True)
        run_child(pkd_args(args, work / "pkd-teacher", args.max_train_samples, "--stage", "teacher"), env, work / "teacher.log")
    teacher_dev = json.loads((work / "pkd-teacher" / "results.json").read_text())["runs"]["teacher"]["dev"]["accuracy"]
    # Round 1 trains on every row and gives the accuracies; the later rounds are short runs in alternating
    # order, so load from other processes falls on every trainer alike; s/step is the median over rounds.
    rounds = []
    for r in range(args.rounds):
        rows, eval_rows = (args.max_train_samples, None) if r == 0 else (args.timing_rows, 64)
        order = args.trainers.split(",")
        print(f"round {r + 1}/{args.rounds}: {rows} rows", flush=True)
        rounds.append({name: run_trainer(name, args, work / f"round{r + 1}", teacher, rows, eval_rows, env)
                       for name in (order if r % 2 == 0 else order[::-1])})
        for name, result in rounds[-1].items():
            print(f"  {name}: {statistics.median(result['windows']):.3f} s/step, dev {result['dev_accuracy']:.2f}", flush=True)

    info = harness.describe(device)
    info["threads"] = int(args.threads) if args.threads else info.get("threads")
    if device.type == "cpu":  # what the trainers saw: the kind they were held to, not this process's CPU
        info.update(harness.cpu_kind_device(args.cpu_kind))
    results = {
        "device": info, "setup": SETUP, "train_rows": args.max_train_samples, "micro_batch": micro_batch,
        "ds_config": str(Path(args.ds_config).relative_to(REPO)) if Path(args.ds_config).is_relative_to(REPO) else args.ds_config,
        "threads": args.threads or torch.get_num_threads(), "teacher_dev_accuracy": teacher_dev, "peer": TEXTBREWER,
        "rounds": len(rounds), "timing_rows": args.timing_rows, **summarize(rounds),
    }
    # one file per CPU kind: peer_cpu-avx512, peer_cpu-avx2 (bf16 native or not changes every ratio)
    kind = f"-{info['cpu_capability'].lower()}" if device.type == "cpu" else ""
    stem = harness.RESULTS_DIR / f"peer_{harness.device_slug(device)}{kind}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    stem.with_suffix(".md").write_text(render(results))
    plot(results, stem.with_suffix(".png"))
    print(render(results))


if __name__ == "__main__":
    main()
