"""Reproduce the PKD paper's comparison on one GLUE task: FT vs KD vs PKD-Skip vs PKD-Last.

For a task and a student depth: fine-tune the teacher once, search each strategy's hyperparameters on dev
(the paper's grid, or a CPU-sized subset), rerun each strategy's best point over several seeds, and write
mean ± std as JSON, a markdown table and a bar chart.

    python benchmarks/glue_table.py --task mrpc --grid small --max-train-samples 1000
    deepspeed benchmarks/glue_table.py --task sst2 --grid paper          # every rank runs each point together

Every point is a `pkd_fast/train.py` run in this process; a finished point (its results.json exists) is
never run again, so an interrupted sweep resumes where it stopped. The teacher runs over the training set
once, into a teacher cache (reused when one matching it is already there), and every KD and PKD point reads
its soft labels and hidden states from there instead of running the teacher again.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from datetime import date
from pathlib import Path

import torch

from pkd_fast import train
from pkd_fast.config import default_ds_config, default_teacher
from pkd_fast.errors import PkdError
from pkd_fast.tasks import TASKS, get_task

RESULTS = Path(__file__).resolve().parent / "results"
STRATEGIES = ("ft", "kd", "skip", "last")
NAMES = {"teacher": "Teacher", "ft": "FT", "kd": "KD", "skip": "PKD-Skip", "last": "PKD-Last"}
COLORS = {"ft": "#9aa5b1", "kd": "#6c8ebf", "skip": "#d79b00", "last": "#b85450"}
# Sun et al. 2019, Table 1: BERT-base teacher → 6-layer PKD student, GLUE test server (MRPC: F1).
PAPER_PKD6 = {"sst2": 92.0, "mrpc": 85.0}
# The paper's search space (Sun et al. 2019, §4.2); β on the authors' code scale (elementwise_mean PT).
GRIDS = {
    "paper": {"temperature": [5, 10, 20], "alpha": [0.2, 0.5, 0.7], "beta": [10, 100, 500, 1000], "lr": [1e-5, 2e-5, 5e-5]},
    "small": {"temperature": [10], "alpha": [0.5, 0.7], "beta": [100, 500], "lr": [5e-5]},  # 11 points: a CPU-sized subset
    "tiny": {"temperature": [10], "alpha": [0.7], "beta": [100], "lr": [5e-5]},  # one point each: a smoke test
    # One point, lr above the paper's range: short CPU runs at lr ≤ 5e-5 left every student at the majority class.
    "cpu": {"temperature": [10], "alpha": [0.7], "beta": [100], "lr": [1e-4]},
}
# The differences the paper's claim is about (PKD > KD > FT; Skip ≥ Last), as (minuend, subtrahend).
PAIRS = (("kd", "ft"), ("skip", "kd"), ("last", "kd"), ("skip", "last"))
# Which knobs each strategy has: FT ignores the teacher, KD has no patient term.
KNOBS = {"ft": ("lr",), "kd": ("temperature", "alpha", "lr"), "skip": ("temperature", "alpha", "beta", "lr"), "last": ("temperature", "alpha", "beta", "lr")}


def grid_points(grid: dict, strategy: str) -> list[dict]:
    knobs = KNOBS[strategy]
    return [dict(zip(knobs, values)) for values in itertools.product(*(grid[k] for k in knobs))]


def point_name(strategy: str, point: dict, seed: int) -> str:
    return f"{strategy}/" + "_".join(f"{k}{v:g}" for k, v in point.items()) + f"/seed{seed}"


def loss_mix(logs: list[Path], alpha: float, beta: float) -> dict | None:
    """Each weighted term's share of the total loss, averaged over every logged step of these runs: how
    much of the signal the patient term (β on its scale) carried next to CE and KD. None when no run
    lasted past its first --log-steps."""
    steps = [json.loads(line) for log in logs if log.is_file() for line in log.read_text().splitlines()]
    if not steps:
        return None
    weighted = {"ce": (1 - alpha, "ce"), "kd": (alpha, "kd"), "pt": (beta, "pt")}
    means = {name: statistics.mean(w * step.get(key, 0.0) for step in steps) for name, (w, key) in weighted.items()}
    total = sum(means.values())
    return {name: round(100 * v / total, 1) for name, v in means.items()}


def paired_difference(a: list[float], b: list[float]) -> dict:
    """Per-seed differences a − b of two strategies run on the same seeds. Runs of one seed share the
    student's init, head, data order and dropout stream, so they differ only in the loss: the difference
    cancels the seed's own luck, which independent means ± std cannot. Mean, 95% t-interval and the
    two-sided paired t-test's p-value (None below 2 seeds, and p None when every difference is equal)."""
    from scipy import stats

    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return {"mean": mean, "ci95": None, "p": None, "n": len(diffs), "diffs": diffs}
    spread = statistics.stdev(diffs)
    half = float(stats.t.ppf(0.975, len(diffs) - 1)) * spread / len(diffs) ** 0.5
    p_value = float(stats.ttest_rel(a, b).pvalue) if spread > 0 else None  # no spread: the t-test is undefined
    return {"mean": mean, "ci95": [mean - half, mean + half], "p": p_value, "n": len(diffs), "diffs": diffs}


def paired_table(rows: dict) -> dict:
    """`paired_difference` for every pair in PAIRS whose two strategies were both run."""
    return {f"{a}-{b}": paired_difference(rows[a]["seeds"], rows[b]["seeds"]) for a, b in PAIRS if a in rows and b in rows}


def teacher_slug(teacher: str) -> str:
    return "all-minilm-l6-v2" if teacher == default_teacher() else Path(teacher.rstrip("/")).name.lower()


def _same_epochs(where: Path, run: dict, epochs: int) -> dict:
    """A finished run is reused by its directory, which names the point and seed but not the setup."""
    if run["epochs"] != epochs:
        raise PkdError(f"{where}: a finished run of {run['epochs']} epoch(s), this sweep asks for {epochs}; "
                       "pass another --output-dir (or remove that run) to train again")
    return run


class Sweep:
    def __init__(self, args):
        self.args = args
        self.task = get_task(args.task)
        self.out = Path(args.output_dir or f"outputs/sweep_{args.task}")
        self.cache = None if args.live_teacher else Path(args.teacher_cache or self.out / "teacher_cache")
        self.common = [
            "--deepspeed", args.deepspeed, "--task", args.task, "--max-seq-length", str(args.max_seq_length),
            "--epochs", str(args.epochs), "--log-steps", str(args.log_steps), "--resume",
        ]
        if args.glue_dir:
            self.common += ["--glue-dir", args.glue_dir]
        if args.max_train_samples:
            self.common += ["--max-train-samples", str(args.max_train_samples)]

    def teacher(self) -> tuple[str, dict, int]:
        """Fine-tune the teacher once (a finished one is reused; an already fine-tuned --teacher is only scored)."""
        out, epochs = self.out / "teacher", self.args.teacher_epochs or self.args.epochs
        summary = train.main([*self.common, "--stage", "teacher", "--teacher", self.args.teacher, "--output-dir", str(out),
                              "--lr", str(self.args.teacher_lr), "--teacher-epochs", str(epochs), "--seed", "42"])
        if summary["runs"]["teacher"].get("train_rows") is not None:  # trained here, maybe by an earlier sweep
            _same_epochs(out / "teacher", summary["runs"]["teacher"], epochs)
        model = out / "teacher" / "model"
        path = str(model) if model.is_dir() else self.args.teacher
        if self.cache is not None:  # reuses a store whose fingerprint matches; refuses one of another teacher or data
            train.main([*self.common, "--stage", "cache", "--teacher", path, "--teacher-cache", str(self.cache),
                        "--output-dir", str(self.out / "cache_run")])
        return path, summary["runs"]["teacher"], summary["train_rows_available"]

    def run_dir(self, strategy: str, point: dict, seed: int) -> Path:
        """Where train.py writes one student run (results.json, train_log.jsonl, the model)."""
        return self.out / point_name(strategy, point, seed) / "students" / strategy

    def student(self, teacher: str, strategy: str, point: dict, seed: int) -> dict:
        out = self.out / point_name(strategy, point, seed)
        done = self.run_dir(strategy, point, seed) / "results.json"
        if not done.is_file():
            argv = [*self.common, "--stage", "student", "--teacher", teacher, "--strategy", strategy,
                    "--student-layers", str(self.args.student_layers), "--seed", str(seed), "--output-dir", str(out)]
            if self.cache is not None and strategy != "ft":
                argv += ["--teacher-cache", str(self.cache)]
            train.main(argv + [arg for k, v in point.items() for arg in (f"--{k}", str(v))])
        return _same_epochs(done, json.loads(done.read_text()), self.args.epochs)

    def run(self) -> dict:
        metric = self.task.main_metric
        teacher_path, teacher, rows_available = self.teacher()
        rows = {"teacher": {"mean": teacher["dev"][metric], "std": 0.0, "seeds": [teacher["dev"][metric]],
                            "best": {"lr": self.args.teacher_lr}, "train_seconds": teacher.get("train_seconds", 0.0), "grid_points": 1,
                            "train_rows": teacher.get("train_rows"), "epochs": teacher.get("epochs")}}
        student_rows = None  # the same for every student run (one --data-seed subset)
        for strategy in self.args.strategies:
            searched = [(p, self.student(teacher_path, strategy, p, self.args.seeds[0])) for p in grid_points(GRIDS[self.args.grid], strategy)]
            best_point, best = max(searched, key=lambda pr: pr[1]["dev"][metric])
            student_rows = best["train_rows"]
            seeds = [best] + [self.student(teacher_path, strategy, best_point, s) for s in self.args.seeds[1:]]
            scores = [r["dev"][metric] for r in seeds]
            logs = [self.run_dir(strategy, best_point, s) / "train_log.jsonl" for s in self.args.seeds]
            rows[strategy] = {
                "mean": statistics.mean(scores), "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                "seeds": scores, "best": best_point, "layer_map": best["layer_map"],
                "grid": {point_name(strategy, p, self.args.seeds[0]).split("/")[1]: r["dev"][metric] for p, r in searched},
                "grid_points": len(searched), "loss_mix_percent": loss_mix(logs, best["alpha"], best["beta"]),
                "train_seconds": round(sum(r["train_seconds"] for r in [*(r for _, r in searched), *seeds[1:]]), 1),
            }
        return {
            "task": self.task.name, "metric": metric, "teacher": teacher_slug(self.args.teacher),
            "teacher_layers": teacher.get("student_layers") or teacher.get("layers"), "student_layers": self.args.student_layers,
            "grid": self.args.grid, "grid_values": GRIDS[self.args.grid], "seeds": self.args.seeds,
            "train_rows": student_rows, "train_rows_available": rows_available, "max_seq_length": self.args.max_seq_length, "epochs": self.args.epochs,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "date": date.today().isoformat(), "rows": rows, "paired": paired_table(rows),
            # Summed over every run, so a resumed sweep reports the training it took, not the resume's few seconds.
            "train_seconds_total": round(sum(r["train_seconds"] for r in rows.values()), 1),
        }


def _rows_epochs(run: dict) -> str:
    if run.get("train_rows") is None:  # an already fine-tuned --teacher: not trained here
        return "given"
    return f"{run['train_rows']:,} rows × {run['epochs']} epoch(s)"


def render_markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [
        (f"**{result['task']}** dev {result['metric']} (%), teacher {result['teacher']} ({result['teacher_layers']} layers) → "
        f"{result['student_layers']}-layer students; students: {result['train_rows']:,} training rows × {result['epochs']} epoch(s), "
        f"teacher: {_rows_epochs(rows['teacher'])}; "
        f"max length {result['max_seq_length']}; grid `{result['grid']}`, best point rerun over seeds {result['seeds']}; "
        f"{result['device']}, {result['date']}."),
        "",
        "| model | dev (mean ± std) | best hyperparameters | loss mix % (1-α)CE / αKD / βPT | grid points | train s (all runs) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        best = ", ".join(f"{k}={v:g}" for k, v in r["best"].items())
        if r.get("layer_map"):
            best += f", layers {','.join(map(str, r['layer_map']))}"
        mix = " / ".join(f"{v:g}" for v in r["loss_mix_percent"].values()) if r.get("loss_mix_percent") else "-"
        lines.append(f"| {NAMES[name]} | {r['mean']:.2f} ± {r['std']:.2f} | {best} | {mix} | {r['grid_points']} | {r['train_seconds']} |")
    if result.get("paired"):
        lines += ["", "Paired by seed (same init, data order and dropout; only the loss differs):", "",
                  "| difference | mean | 95% interval | p (paired t) | seeds |", "|---|---|---|---|---|"]
        for pair, d in result["paired"].items():
            a, b = pair.split("-")
            ci = f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]" if d["ci95"] else "-"
            p_value = f"{d['p']:.3f}" if d["p"] is not None else "-"
            lines.append(f"| {NAMES[a]} − {NAMES[b]} | {d['mean']:+.2f} | {ci} | {p_value} | {d['n']} |")
    return "\n".join(lines)


def _draw(ax, result: dict) -> None:
    """Students' mean ± std as bars, the teacher as a dashed line."""
    names = [n for n in result["rows"] if n != "teacher"]
    means = [result["rows"][n]["mean"] for n in names]
    stds = [result["rows"][n]["std"] for n in names]
    teacher = result["rows"]["teacher"]["mean"]
    ax.bar([NAMES[n] for n in names], means, yerr=stds, capsize=4, color=[COLORS[n] for n in names])
    ax.axhline(teacher, ls="--", color="k", lw=1, label=f"teacher ({result['teacher_layers']} layers)")
    low = min(m - s for m, s in zip(means, stds))
    ax.set_ylim(max(0, low - 5), max(max(means), teacher) + 3)
    ax.set_ylabel(f"dev {result['metric']} (%)")
    ax.legend(fontsize=8, loc="lower right")


def _figure(n_axes: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n_axes, figsize=(5 * n_axes, 3.2), dpi=120, squeeze=False)
    return plt, fig, axes[0]


def plot(result: dict, path: Path) -> None:
    plt, fig, (ax,) = _figure(1)
    _draw(ax, result)
    ax.set_title(f"{result['task']}: {result['student_layers']}-layer students, mean ± std over {len(result['seeds'])} seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _data(result: dict) -> str:
    available = result.get("train_rows_available")
    rows = f"{result['train_rows']:,}" + (" (full)" if available == result["train_rows"] else f" of {available:,}" if available else "")
    return f"{rows} rows × {result['epochs']} ep, len {result['max_seq_length']}"


def write_summary(results_dir: Path) -> str | None:
    """All tasks' tables in one (the README's): teacher and students beside the paper's 6-layer PKD, plus
    one chart per task side by side. Returns the markdown, or None when no sweep has finished yet."""
    results = [json.loads(p.read_text()) for p in sorted(results_dir.glob("glue_*layers.json"))]
    if not results:
        return None
    results.sort(key=lambda r: list(TASKS).index(r["task"]) if r["task"] in TASKS else len(TASKS))
    lines = [
        "| task (dev metric) | students' data | teacher | FT | KD | PKD-Skip | PKD-Last | measured order | paper: 6-layer PKD, GLUE test |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows = r["rows"]
        cells = [f"{rows[s]['mean']:.2f} ± {rows[s]['std']:.2f}" if s in rows else "-" for s in STRATEGIES]
        order = " > ".join(NAMES[s] for s in sorted((s for s in STRATEGIES if s in rows), key=lambda s: -rows[s]["mean"]))
        paper = f"{PAPER_PKD6[r['task']]}" if r["task"] in PAPER_PKD6 else "not reported"
        lines.append(f"| {r['task']} ({r['metric']}) | {_data(r)} | {rows['teacher']['mean']:.2f} | " + " | ".join(cells)
                     + f" | {order} | {paper} |")
    markdown = "\n".join(lines)
    (results_dir / "glue_summary.md").write_text(markdown + "\n")
    plt, fig, axes = _figure(len(results))
    for ax, r in zip(axes, results):
        _draw(ax, r)
        ax.set_title(f"{r['task']}: {r['teacher']} → {r['student_layers']} layers ({_data(r)})", fontsize=8)
    fig.tight_layout()
    fig.savefig(results_dir / "glue_summary.png")
    plt.close(fig)
    return markdown


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), default="sst2")
    p.add_argument("--glue-dir", default=None, help="(default $GLUE_DIR, through train.py)")
    p.add_argument("--teacher", default=default_teacher())
    p.add_argument("--teacher-lr", type=float, default=5e-5)
    p.add_argument("--student-layers", type=int, default=3)
    p.add_argument("--strategies", type=lambda s: tuple(s.split(",")), default=STRATEGIES)
    p.add_argument("--grid", choices=sorted(GRIDS), default="paper")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[42, 43, 44])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--teacher-epochs", type=int, default=None, help="(default: --epochs)")
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--max-train-samples", type=int, default=None, help="a fixed subset (state it: the table does)")
    p.add_argument("--log-steps", type=int, default=20, help="log the loss terms every N steps (the loss mix averages them)")
    p.add_argument("--deepspeed", default=default_ds_config(), help="(default: train.py's, zero2.json on a GPU, cpu.json on a CPU)")
    p.add_argument("--output-dir", default=None, help="(default outputs/sweep_<task>)")
    p.add_argument("--teacher-cache", default=None, help="teacher cache directory (default <output-dir>/teacher_cache)")
    p.add_argument("--live-teacher", action="store_true", help="run the teacher in every KD/PKD point instead of caching it once")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--summary", action="store_true", help="only rewrite glue_summary.{md,png} from the results already there")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.summary:
        print(write_summary(Path(args.results_dir)) or f"no glue_*layers.json in {args.results_dir} yet")
        return {}
    try:
        result = Sweep(args).run()
    except PkdError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if torch.distributed.get_rank() == 0:
        stem = Path(args.results_dir) / f"glue_{result['task']}_{result['teacher']}_{args.student_layers}layers"
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        stem.with_suffix(".md").write_text(render_markdown(result) + "\n")
        plot(result, stem.with_suffix(".png"))
        write_summary(stem.parent)
        print("\n" + render_markdown(result), flush=True)
    return result


if __name__ == "__main__":
    main()
