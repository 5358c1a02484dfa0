"""Reproduce the PKD paper's comparison on one GLUE task: FT vs KD vs PKD-Skip vs PKD-Last.

For a task and a student depth: fine-tune the teacher once, search each strategy's hyperparameters on dev
(the paper's grid, or a CPU-sized subset), rerun each strategy's best point over several seeds, and write
mean ± std as JSON, a markdown table and a bar chart.

    python studies/glue_table.py --task mrpc --grid small --max-train-samples 1000
    deepspeed studies/glue_table.py --task sst2 --grid paper          # every rank runs each point together

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
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
from transformers import AutoConfig

if not __package__:  # run as `python studies/glue_table.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import device_name  # noqa: E402
from pkd_fast import train
from pkd_fast.config import PT_TOKENS, default_ds_config, default_teacher
from pkd_fast.errors import PkdError
from pkd_fast.metrics import DEV_HALVES, dev_halves
from pkd_fast.models import layer_map
from pkd_fast.tasks import TASKS, get_task

RESULTS = Path(__file__).resolve().parent / "results"
STRATEGIES = ("ft", "kd", "skip", "last")
NAMES = {"teacher": "Teacher", "ft": "FT", "kd": "KD", "skip": "PKD-Skip", "last": "PKD-Last"}
COLORS = {"ft": "#9aa5b1", "kd": "#6c8ebf", "skip": "#d79b00", "last": "#b85450"}
# --pt-tokens kinds (config.PT_TOKENS) a PKD strategy runs with: its row is "skip" for [CLS], "skip-all" /
# "skip-mean" otherwise.
PT_NAMES = {"cls": "", "all": " (all tokens)", "mean": " (mean-pooled)"}
PT_HATCHES = {"cls": "", "all": "//", "mean": ".."}
# Sun et al. 2019, Table 1: BERT-base teacher → 6-layer PKD student, GLUE test server (MRPC: F1).
PAPER_PKD6 = {"sst2": 92.0, "mrpc": 85.0}
# The paper's search space (Sun et al. 2019, §4.2); β on the authors' code scale (elementwise_mean PT).
GRIDS = {
    "paper": {"temperature": [5, 10, 20], "alpha": [0.2, 0.5, 0.7], "beta": [10, 100, 500, 1000], "lr": [1e-5, 2e-5, 5e-5]},
    "small": {"temperature": [10], "alpha": [0.5, 0.7], "beta": [100, 500], "lr": [5e-5]},  # 11 points: a CPU-sized subset
    "tiny": {"temperature": [10], "alpha": [0.7], "beta": [100], "lr": [5e-5]},  # one point each: a smoke test
    # One point, lr above the paper's range: short CPU runs at lr ≤ 5e-5 left every student at the majority class.
    "cpu": {"temperature": [10], "alpha": [0.7], "beta": [100], "lr": [1e-4]},
    # The paired study's: α and the patient term's share of the loss at step 0 (train.py --beta-share), which
    # means the same for [CLS], all-token and mean-pooled PT although their raw PT differs by orders of magnitude.
    "paired": {"temperature": [10], "alpha": [0.5, 0.7], "beta_share": [0.1, 0.3], "lr": [1e-4]},
}
# Knobs a grid's PKD rows take from KD's best point instead of searching them: in `paired`, PKD − KD then
# differs in the patient term alone, and each PKD row searches only β's share (2 points, not 4).
FROM_KD = {"paired": ("alpha",)}
# Which knobs each strategy has: FT ignores the teacher, KD has no patient term (β, or its share of the loss).
KNOBS = {"ft": ("lr",), "kd": ("temperature", "alpha", "lr"), "skip": ("temperature", "alpha", "beta", "lr"), "last": ("temperature", "alpha", "beta", "lr")}


def strategy_of(row: str) -> str:
    """'skip-mean' → 'skip'."""
    return row.split("-")[0]


def pt_kind(row: str) -> str:
    """'skip-mean' → 'mean'; [CLS] rows carry no suffix."""
    return row.split("-")[1] if "-" in row else "cls"


def row_name(strategy: str, pt: str) -> str:
    return f"{strategy}-{pt}" if strategy in ("skip", "last") and pt != "cls" else strategy


def display(row: str) -> str:
    return NAMES[strategy_of(row)] + PT_NAMES[pt_kind(row)]


def grid_points(grid: dict, row: str) -> list[dict]:
    knobs = [("beta_share" if k == "beta" and "beta_share" in grid else k) for k in KNOBS[strategy_of(row)]]
    return [dict(zip(knobs, values)) for values in itertools.product(*(grid[k] for k in knobs))]


def point_name(row: str, point: dict, seed: int) -> str:
    return f"{row}/" + "_".join(f"{k}{v:g}" for k, v in point.items()) + f"/seed{seed}"


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


def pt_share_at_start(log: Path, beta: float) -> float | None:
    """β·PT's share (%) of the loss at step 1 (the initial weights; train.py always logs that step)."""
    first = json.loads(log.read_text().splitlines()[0]) if log.is_file() else None
    if not first or first["step"] != 1 or "pt" not in first:
        return None
    return round(100 * beta * first["pt"] / first["total"], 1)


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


def pairs(rows: dict) -> list[tuple[str, str]]:
    """The differences the paper's claim is about, among the rows that were run: KD−FT, each PKD row − KD
    (PKD > KD), and PKD-Skip − PKD-Last for each --pt-tokens kind (Skip ≥ Last)."""
    found = [("kd", "ft")] if "kd" in rows and "ft" in rows else []
    pkd = [r for r in rows if strategy_of(r) in ("skip", "last")]
    found += [(r, "kd") for r in pkd if "kd" in rows]
    found += [(r, row_name("last", pt_kind(r))) for r in pkd if strategy_of(r) == "skip" and row_name("last", pt_kind(r)) in rows]
    return found


def paired_table(rows: dict) -> dict:
    """`paired_difference` for every pair of `pairs(rows)`, keyed "a-b" (a and b are in the value too)."""
    return {f"{a}-{b}": {**paired_difference(rows[a]["seeds"], rows[b]["seeds"]), "a": a, "b": b} for a, b in pairs(rows)}


@dataclass(frozen=True)
class Student:
    """A student's depth, width and initialisation. A glue_table sweep has one (the teacher's first
    --student-layers layers, at its width; its runs directly under the output directory); a study of
    several (studies/width_study.py) runs each under its own subdirectory `name`, all reading one teacher
    cache."""

    layers: int
    init_from: str | None = None  # train.py's default: the teacher's first `layers` layers
    hidden_size: int | None = None  # --init-from scratch: the width (default the teacher's)
    pkd_layers: tuple[int, ...] | None = None  # --layer-map of the PKD rows, where the depth does not divide the teacher's
    name: str = ""
    base_model: str | None = None  # --init-from pretrained: the model whose first `layers` layers it starts from

    def flags(self, strategy: str) -> list[str]:
        """train.py's flags for this student in a `strategy` run."""
        argv = ["--student-layers", str(self.layers)]
        if self.init_from is not None:
            argv += ["--init-from", self.init_from]
        if self.hidden_size is not None:
            argv += ["--student-hidden-size", str(self.hidden_size)]
        if self.base_model is not None:
            argv += ["--base-model", self.base_model]
        if self.pkd_layers is not None and strategy in ("skip", "last"):
            argv += ["--layer-map", ",".join(map(str, self.pkd_layers))]
        return argv

    def layer_map(self, strategy: str, teacher_layers: int) -> tuple[int, ...]:
        return layer_map(strategy, teacher_layers, self.layers, self.pkd_layers if strategy in ("skip", "last") else None)


def teacher_slug(teacher: str) -> str:
    return "all-minilm-l6-v2" if teacher == default_teacher() else Path(teacher.rstrip("/")).name.lower()


def _same_epochs(where: Path, run: dict, epochs: int) -> dict:
    """A finished run is reused by its directory, which names the point and seed but not the setup."""
    if run["epochs"] != epochs:
        raise PkdError(f"{where}: a finished run of {run['epochs']} epoch(s), this sweep asks for {epochs}; "
                       "pass another --output-dir (or remove that run) to train again")
    return run


def dev_score(dev: dict, metric: str, half: str | None) -> float:
    """The run's dev `metric` on the whole split (half None) or on one of its halves (metrics.dev_halves);
    a task with two dev splits (MNLI) is scored on its first."""
    if metric not in dev:
        dev = next(iter(dev.values()))
    return dev[metric if half is None else f"{half}/{metric}"]


class Sweep:
    """Selection and reporting use different numbers: each strategy's grid point is picked on the dev
    split's `select` half (first seed), and every seed of that point is reported on the `report` half (the
    whole split is kept beside it)."""

    def __init__(self, args, students: list[Student] | None = None):
        self.args = args
        self.students = students or [Student(args.student_layers)]
        self.task = get_task(args.task)
        self.out = Path(args.output_dir or f"outputs/sweep_{args.task}")
        self.cache = None if args.live_teacher else Path(args.teacher_cache or self.out / "teacher_cache")
        self.common = [
            "--deepspeed", args.deepspeed, "--task", args.task, "--max-seq-length", str(args.max_seq_length),
            "--epochs", str(args.epochs), "--log-steps", str(args.log_steps), "--resume",
        ]
        if args.glue_dir:
            self.common += ["--glue-dir", args.glue_dir]
        if args.max_train_samples:  # one subset for every run: --data-seed, apart from the seeds
            self.common += ["--max-train-samples", str(args.max_train_samples), "--data-seed", str(args.data_seed)]
        self.dev_rows = None
        # Every strategy with the first kind, then PKD-Skip's other kinds, then PKD-Last's: a sweep stopped
        # early (each finished row is written at once) has the comparisons that matter most.
        first, others = args.pt_tokens[0], args.pt_tokens[1:]
        self.rows = [row_name(s, first) for s in args.strategies] + [
            row_name(s, pt) for s in args.strategies if s in ("skip", "last") for pt in others]

    def teacher(self) -> tuple[str, dict, int]:
        """Fine-tune the teacher once (a finished one is reused; an already fine-tuned --teacher is only scored)."""
        out, epochs = self.out / "teacher", self.args.teacher_epochs or self.args.epochs
        summary = train.main([*self.common, "--stage", "teacher", "--teacher", self.args.teacher, "--output-dir", str(out),
                              "--lr", str(self.args.teacher_lr), "--teacher-epochs", str(epochs), "--seed", "42"])
        if summary["runs"]["teacher"].get("train_rows") is not None:  # trained here, maybe by an earlier sweep
            _same_epochs(out / "teacher", summary["runs"]["teacher"], epochs)
        self.dev_rows = sum(summary["dev_rows"].values())
        model = out / "teacher" / "model"
        path = str(model) if model.is_dir() else self.args.teacher
        if self.cache is not None:  # reuses a store whose fingerprint matches; refuses one of another teacher or data
            train.main([*self.common, "--stage", "cache", "--teacher", path, "--teacher-cache", str(self.cache),
                        "--output-dir", str(self.out / "cache_run"), *self._cache_rows(path)])
        return path, summary["runs"]["teacher"], summary["train_rows_available"]

    def _cache_rows(self, teacher: str) -> list[str]:
        """What the cache stores: the mapped layers of every PKD row, as [CLS] or mean-pooled rows when one
        kind runs, every token when several do (a store of every token serves all three kinds)."""
        n = AutoConfig.from_pretrained(teacher).num_hidden_layers
        layers = sorted({l for s in ("skip", "last") if s in self.args.strategies for st in self.students for l in st.layer_map(s, n)})
        kinds = set(self.args.pt_tokens)
        return ["--pt-tokens", kinds.pop() if len(kinds) == 1 else "all", *(["--cache-layers", ",".join(map(str, layers))] if layers else [])]

    def run_dir(self, row: str, point: dict, seed: int, student: Student | None = None) -> Path:
        """Where train.py writes one student run (results.json, train_log.jsonl, the model)."""
        return self.out / (student or self.students[0]).name / point_name(row, point, seed) / "students" / strategy_of(row)

    def student(self, teacher: str, row: str, point: dict, seed: int, student: Student | None = None) -> dict:
        strategy, student = strategy_of(row), student or self.students[0]
        done = self.run_dir(row, point, seed, student) / "results.json"
        if not done.is_file():
            argv = [*self.common, "--stage", "student", "--teacher", teacher, "--strategy", strategy,
                    *student.flags(strategy), "--seed", str(seed),
                    "--output-dir", str(done.parents[2])]
            if strategy in ("skip", "last"):
                argv += ["--pt-tokens", pt_kind(row)]
            if self.cache is not None and strategy != "ft":
                argv += ["--teacher-cache", str(self.cache)]
            train.main(argv + [arg for k, v in point.items() for arg in (f"--{k.replace('_', '-')}", str(v))])
        return _same_epochs(done, json.loads(done.read_text()), self.args.epochs)

    def search_lr(self, teacher: str, row: str, point: dict, lrs: list[float], student: Student | None = None) -> tuple[float, dict]:
        """`row` at `point` with each of `lrs`, on the first seed: the lr whose run scores best on the dev
        split's select half (the first listed on a tie), and each lr's run."""
        runs = {lr: self.student(teacher, row, {**point, "lr": lr}, self.args.seeds[0], student) for lr in lrs}
        return max(runs, key=lambda lr: dev_score(runs[lr]["dev"], self.task.main_metric, "select")), runs

    def run(self, on_row=lambda result: None) -> dict:
        """Teacher, then each row's search and seeds; `on_row` gets the result so far after every row."""
        metric = self.task.main_metric
        teacher_path, teacher, rows_available = self.teacher()
        rows = {"teacher": {"mean": dev_score(teacher["dev"], metric, "report"), "std": 0.0,
                            "seeds": [dev_score(teacher["dev"], metric, "report")], "full_dev": dev_score(teacher["dev"], metric, None),
                            "best": {"lr": self.args.teacher_lr}, "train_seconds": teacher.get("train_seconds", 0.0), "grid_points": 1,
                            "train_rows": teacher.get("train_rows"), "epochs": teacher.get("epochs")}}
        result = None
        for row in self.rows:
            grid = GRIDS[self.args.grid]
            if strategy_of(row) in ("skip", "last") and "kd" in rows:
                grid = {**grid, **{k: [rows["kd"]["best"][k]] for k in FROM_KD.get(self.args.grid, ())}}
            searched = [(p, self.student(teacher_path, row, p, self.args.seeds[0])) for p in grid_points(grid, row)]
            best_point, best = max(searched, key=lambda pr: dev_score(pr[1]["dev"], metric, "select"))
            seeds = [best] + [self.student(teacher_path, row, best_point, s) for s in self.args.seeds[1:]]
            reported = [dev_score(r["dev"], metric, "report") for r in seeds]
            whole = [dev_score(r["dev"], metric, None) for r in seeds]
            logs = [self.run_dir(row, best_point, s) / "train_log.jsonl" for s in self.args.seeds]
            shares = [pt_share_at_start(log, r["beta"]) for log, r in zip(logs, seeds)]
            rows[row] = {
                "mean": statistics.mean(reported), "std": statistics.stdev(reported) if len(reported) > 1 else 0.0, "seeds": reported,
                "full_dev": {"mean": statistics.mean(whole), "std": statistics.stdev(whole) if len(whole) > 1 else 0.0, "seeds": whole},
                "best": best_point, "layer_map": best["layer_map"], "pt_tokens": pt_kind(row) if best["layer_map"] else None,
                "beta": [r["beta"] for r in seeds],
                "pt_share_step1_percent": statistics.mean(shares) if best["layer_map"] and None not in shares else None,
                "grid": {point_name(row, p, self.args.seeds[0]).split("/")[1]: {
                    "select": dev_score(r["dev"], metric, "select"), "beta": r["beta"],
                    "pt_share_step1_percent": pt_share_at_start(self.run_dir(row, p, self.args.seeds[0]) / "train_log.jsonl", r["beta"])
                    if r["layer_map"] else None} for p, r in searched},
                "grid_points": len(searched), "loss_mix_percent": loss_mix(logs, best["alpha"], best["beta"]),
                "train_seconds": round(sum(r["train_seconds"] for r in [*(r for _, r in searched), *seeds[1:]]), 1),
                "runs": len(searched) + len(seeds) - 1,
            }
            result = self._result(teacher, rows, best["train_rows"], rows_available)
            on_row(result)
        return result

    def _result(self, teacher: dict, rows: dict, student_rows: int, rows_available: int) -> dict:
        metric, args = self.task.main_metric, self.args
        halves = {half: len(h) for half, h in zip(DEV_HALVES, dev_halves(self.dev_rows))}
        return {
            "task": self.task.name, "metric": metric, "reported_on": "report half of dev (grid point picked on the select half)",
            "dev_half_rows": halves,
            "teacher": teacher_slug(args.teacher), "teacher_layers": teacher.get("student_layers") or teacher.get("layers"),
            "student_layers": args.student_layers, "grid": args.grid, "grid_values": GRIDS[args.grid], "seeds": args.seeds,
            "data_seed": args.data_seed if args.max_train_samples else None, "train_rows": student_rows, "train_rows_available": rows_available,
            "max_seq_length": args.max_seq_length, "epochs": args.epochs,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else device_name(torch.device("cpu")),
            "date": date.today().isoformat(), "rows": rows, "paired": paired_table(rows),
            # Summed over every run, so a resumed sweep reports the training it took, not the resume's few seconds.
            "train_seconds_total": round(sum(r["train_seconds"] for r in rows.values()), 1),
            "runs_total": sum(r.get("runs", 1) for r in rows.values()),
        }


def _rows_epochs(run: dict) -> str:
    if run.get("train_rows") is None:  # an already fine-tuned --teacher: not trained here
        return "given"
    return f"{run['train_rows']:,} rows × {run['epochs']} epoch(s)"


def _reported_on(result: dict) -> str:
    halves = result.get("dev_half_rows")
    if not halves:  # a sweep from before the halves: picked and reported on the whole dev split
        return "whole dev split (grid point picked on it too)"
    return (f"dev `report` half ({halves['report']:,} rows); the grid point was picked on the `select` half "
            f"({halves['select']:,} rows, seed {result['seeds'][0]}), a fixed split (pkd_fast.metrics.dev_halves)")


def _pm(row: dict) -> str:
    return f"{row['mean']:.2f} ± {row['std']:.2f}"


def render_markdown(result: dict) -> str:
    rows = result["rows"]
    hours = result["train_seconds_total"] / 3600
    lines = [
        (f"**{result['task']}** dev {result['metric']} (%), teacher {result['teacher']} ({result['teacher_layers']} layers) → "
         f"{result['student_layers']}-layer students; students: {result['train_rows']:,} training rows"
         f"{' (--data-seed ' + str(result['data_seed']) + ')' if result.get('data_seed') is not None else ''} × {result['epochs']} epoch(s), "
         f"teacher: {_rows_epochs(rows['teacher'])}; max length {result['max_seq_length']}; grid `{result['grid']}` "
         f"{json.dumps(result.get('grid_values', {}))}, best point rerun over seeds {result['seeds']}; {result['device']}, {result['date']}."),
        "",
        f"Reported on: {_reported_on(result)}. Budget: {result.get('runs_total', '?')} training runs, "
        f"{hours:.2f} h of training summed over the runs (wall time, 1 thread each; runs shared the machine's cores).",
        "",
        "| model | reported (mean ± std) | whole dev | best point | β·PT % of loss at step 1 | loss mix % (1-α)CE / αKD / βPT | grid points: select-half score | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        best = ", ".join(f"{k}={v:g}" for k, v in r["best"].items())
        if r.get("layer_map"):
            best += f", layers {','.join(map(str, r['layer_map']))}, β≈{statistics.mean(r['beta']):.4g}"
        whole = r.get("full_dev")
        whole = (_pm(whole) if isinstance(whole, dict) else f"{whole:.2f}") if whole is not None else "-"
        share = f"{r['pt_share_step1_percent']:.1f}" if r.get("pt_share_step1_percent") is not None else "-"
        mix = " / ".join(f"{v:g}" for v in r["loss_mix_percent"].values()) if r.get("loss_mix_percent") else "-"
        grid = "; ".join(f"{k}: {v['select']:.2f}" if isinstance(v, dict) else f"{k}: {v:.2f}" for k, v in r.get("grid", {}).items()) or "-"
        lines.append(f"| {display(name)} | {_pm(r)} | {whole} | {best} | {share} | {mix} | {grid} | {r['train_seconds']} |")
    if result.get("paired"):
        lines += ["", "Paired by seed (same init, data order and dropout; only the loss differs), on the reported numbers:", "",
                  "| difference | mean | 95% interval | p (paired t) | seeds |", "|---|---|---|---|---|"]
        for pair, d in result["paired"].items():
            a, b = (d["a"], d["b"]) if "a" in d else pair.split("-")
            ci = f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]" if d["ci95"] else "-"
            p_value = f"{d['p']:.3f}" if d["p"] is not None else "-"
            lines.append(f"| {display(a)} − {display(b)} | {d['mean']:+.2f} | {ci} | {p_value} | {d['n']} |")
    return "\n".join(lines)


def _draw(ax, result: dict) -> None:
    """Students' mean ± std as bars (hatched by --pt-tokens kind), each seed a dot, the teacher a dashed line."""
    names = [n for n in result["rows"] if n != "teacher"]
    rows = [result["rows"][n] for n in names]
    teacher = result["rows"]["teacher"]["mean"]
    x = range(len(names))
    ax.bar(x, [r["mean"] for r in rows], yerr=[r["std"] for r in rows], capsize=3, color=[COLORS[strategy_of(n)] for n in names],
           edgecolor="k", linewidth=0.4)
    for i, (n, r) in enumerate(zip(names, rows)):
        ax.patches[i].set_hatch(PT_HATCHES[pt_kind(n)])
        if r.get("seeds"):
            ax.scatter([i] * len(r["seeds"]), r["seeds"], color="k", s=6, zorder=3)
    ax.set_xticks(list(x), [display(n).replace(" (", "\n(") for n in names], fontsize=7)
    ax.axhline(teacher, ls="--", color="k", lw=1, label=f"teacher ({result['teacher_layers']} layers)")
    low = min(min(r.get("seeds") or [r["mean"] - r["std"]]) for r in rows)
    ax.set_ylim(max(0, low - 3), max(max(r["mean"] + r["std"] for r in rows), teacher) + 2)
    ax.set_ylabel(f"dev {result['metric']} (%)" + (", report half" if result.get("dev_half_rows") else ""))
    ax.legend(fontsize=7, loc="lower right")


def _figure(n_axes: int, width: float = 5):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n_axes, figsize=(width * n_axes, 3.4), dpi=120, squeeze=False)
    return plt, fig, axes[0]


def plot(result: dict, path: Path) -> None:
    plt, fig, (ax,) = _figure(1, width=max(5, 0.8 * len(result["rows"])))
    _draw(ax, result)
    ax.set_title(f"{result['task']}: {result['student_layers']}-layer students, mean ± std over {len(result['seeds'])} seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _data(result: dict) -> str:
    available = result.get("train_rows_available")
    rows = f"{result['train_rows']:,}" + (" (full)" if available == result["train_rows"] else f" of {available:,}" if available else "")
    return f"{rows} rows × {result['epochs']} ep, len {result['max_seq_length']}"


def _best_variant(rows: dict) -> str:
    """The best all-token or mean-pooled PKD row, or '-' when none ran."""
    variants = [n for n in rows if pt_kind(n) != "cls"]
    if not variants:
        return "-"
    best = max(variants, key=lambda n: rows[n]["mean"])
    return f"{display(best)}: {_pm(rows[best])}"


def write_summary(results_dir: Path) -> str | None:
    """All tasks' tables in one (docs/results.md's, spliced in by `splice_results_doc`): teacher and students beside
    the paper's 6-layer PKD, plus one chart per task side by side. Returns the markdown, or None when no
    sweep has finished yet."""
    results = [json.loads(p.read_text()) for p in sorted(results_dir.glob("glue_*layers.json"))]
    if not results:
        return None
    results.sort(key=lambda r: list(TASKS).index(r["task"]) if r["task"] in TASKS else len(TASKS))
    lines = [
        "| task (dev metric) | students' data | reported on | teacher | FT | KD | PKD-Skip | PKD-Last | best all-token / mean-pooled PKD | measured order | paper: 6-layer PKD, GLUE test |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows = r["rows"]
        cells = [_pm(rows[s]) if s in rows else "-" for s in STRATEGIES]
        order = " > ".join(display(s) for s in sorted((s for s in rows if s != "teacher"), key=lambda s: -rows[s]["mean"]))
        paper = f"{PAPER_PKD6[r['task']]}" if r["task"] in PAPER_PKD6 else "not reported"
        where = f"report half, {len(r['seeds'])} seeds" if r.get("dev_half_rows") else f"whole dev, {len(r['seeds'])} seeds"
        lines.append(f"| {r['task']} ({r['metric']}) | {_data(r)} | {where} | {rows['teacher']['mean']:.2f} | " + " | ".join(cells)
                     + f" | {_best_variant(rows)} | {order} | {paper} |")
    markdown = "\n".join(lines)
    (results_dir / "glue_summary.md").write_text(markdown + "\n")
    plt, fig, axes = _figure(len(results), width=max(5, 0.8 * max(len(r["rows"]) for r in results)))
    for ax, r in zip(axes, results):
        _draw(ax, r)
        ax.set_title(f"{r['task']}: {r['teacher']} → {r['student_layers']} layers ({_data(r)})", fontsize=8)
    fig.tight_layout()
    fig.savefig(results_dir / "glue_summary.png")
    plt.close(fig)
    return markdown


RESULTS_DOC = Path(__file__).resolve().parents[1] / "docs" / "results.md"
RESULTS_DOC_MARKERS = ("<!-- glue_summary.md: begin (written by studies/glue_table.py) -->", "<!-- glue_summary.md: end -->")


def splice_results_doc(markdown: str, doc: Path = RESULTS_DOC) -> None:
    """Put the summary table between docs/results.md's markers: its numbers are the results files',
    never typed by hand (tests/test_glue_table.py checks the two agree)."""
    text = doc.read_text()
    begin, end = RESULTS_DOC_MARKERS
    if begin not in text or end not in text:
        raise PkdError(f"{doc}: no {begin} … {end} block to write the summary table into")
    head, rest = text.split(begin, 1)
    doc.write_text(head + begin + "\n" + markdown + "\n" + end + rest.split(end, 1)[1])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), default="sst2")
    p.add_argument("--glue-dir", default=None, help="(default $GLUE_DIR, through train.py)")
    p.add_argument("--teacher", default=default_teacher())
    p.add_argument("--teacher-lr", type=float, default=5e-5)
    p.add_argument("--student-layers", type=int, default=3)
    p.add_argument("--strategies", type=lambda s: tuple(s.split(",")), default=STRATEGIES)
    p.add_argument("--pt-tokens", type=lambda s: tuple(s.split(",")), default=("cls",),
                   help=f"PKD rows to run, each a row of the table: a comma-separated subset of {PT_TOKENS}")
    p.add_argument("--grid", choices=sorted(GRIDS), default="paper")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[42, 43, 44])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--teacher-epochs", type=int, default=None, help="(default: --epochs)")
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--max-train-samples", type=int, default=None, help="a fixed subset (state it: the table does)")
    p.add_argument("--data-seed", type=int, default=42, help="which --max-train-samples subset: the same for every run and seed")
    p.add_argument("--log-steps", type=int, default=20, help="log the loss terms every N steps (the loss mix averages them)")
    p.add_argument("--deepspeed", default=default_ds_config(), help="(default: train.py's, zero2.json on a GPU, cpu.json on a CPU)")
    p.add_argument("--output-dir", default=None, help="(default outputs/sweep_<task>)")
    p.add_argument("--teacher-cache", default=None, help="teacher cache directory (default <output-dir>/teacher_cache)")
    p.add_argument("--live-teacher", action="store_true", help="run the teacher in every KD/PKD point instead of caching it once")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--summary", action="store_true", help="only rewrite glue_summary.{md,png} (and docs/results.md's table) from the results there")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for pt in args.pt_tokens:
        if pt not in PT_TOKENS:
            p.error(f"--pt-tokens: {pt!r} is not one of {PT_TOKENS}")
    for strategy in args.strategies:
        if strategy not in STRATEGIES:
            p.error(f"--strategies: {strategy!r} is not one of {STRATEGIES}")
    return args


def write_results(result: dict, results_dir: Path, student_layers: int, doc: bool) -> None:
    """The task's JSON, markdown and chart, then the all-task summary (and docs/results.md's copy of it)."""
    stem = results_dir / f"glue_{result['task']}_{result['teacher']}_{student_layers}layers"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(render_markdown(result) + "\n")
    plot(result, stem.with_suffix(".png"))
    summary = write_summary(stem.parent)
    if doc:
        splice_results_doc(summary)


def main(argv=None) -> dict:
    args = parse_args(argv)
    results_dir = Path(args.results_dir)
    doc = results_dir.resolve() == RESULTS  # the shipped results: docs/results.md shows them
    if args.summary:
        summary = write_summary(results_dir)
        if summary and doc:
            splice_results_doc(summary)
        print(summary or f"no glue_*layers.json in {args.results_dir} yet")
        return {}
    try:
        # each finished row is written at once, so a sweep stopped midway still leaves its table
        result = Sweep(args).run(on_row=lambda r: write_results(r, results_dir, args.student_layers, doc)
                                 if torch.distributed.get_rank() == 0 else None)
    except PkdError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if result and torch.distributed.get_rank() == 0:
        print("\n" + render_markdown(result), flush=True)
    return result


if __name__ == "__main__":
    main()
