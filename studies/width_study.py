"""Width against depth on real GLUE data: a narrower, deeper student from scratch vs a shallower one from the
teacher's layers, distilled by KD and by PKD-Skip, paired by seed.

    OMP_NUM_THREADS=1 python studies/width_study.py --tasks sst2,mrpc
    python studies/width_study.py --tasks sst2 --students 4L-192        # one student only: trains, writes nothing

Each task reruns the setup of its glue_table sweep (studies/results/glue_<task>_all-minilm-l6-v2_3layers.json:
its training rows, --data-seed, max length, epochs, the teacher's epochs and lr) and the points that sweep
picked for KD and PKD-Skip (T, α, β's share of the loss, lr), so the teacher-initialised student's rows are
that sweep's runs on these seeds. The teacher is fine-tuned once per task and cached once for every student
(glue_table.Sweep, with one `Student` per shape); a finished run is never trained again. A student from
scratch has no teacher weights to start from, so its lr is searched: KD on the first seed at each
--scratch-lrs value, picked on the dev split's select half, then every row and seed of that student runs at it.

A CPU step's cost is read from the runs' own logs (train_log.jsonl: the process's CPU seconds between two
log lines, a line every --log-steps steps; one thread, so other processes on the cores do not inflate it).
Results: studies/results/width_<task>.{json,md,png}, written once every student of the task has finished
(so processes that run one student each can share the cores, and a last run without --students writes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from datetime import date
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

if not __package__:  # run as `python studies/width_study.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from studies import glue_table  # noqa: E402
from benchmarks.bench_peer import window_seconds  # noqa: E402
from studies.glue_table import NAMES, Student, Sweep, dev_score, paired_difference  # noqa: E402
from benchmarks.harness import describe, write_study  # noqa: E402
from pkd_fast.config import default_ds_config, default_teacher  # noqa: E402
from pkd_fast.deepspeed_json import read_ds_config  # noqa: E402
from pkd_fast.errors import PkdError  # noqa: E402
from pkd_fast.glue_files import load_glue  # noqa: E402
from pkd_fast.metrics import DEV_HALVES, dev_halves, glue_metrics_with_halves  # noqa: E402
from pkd_fast.tasks import get_task  # noqa: E402

RESULTS = glue_table.RESULTS
ROWS = ("kd", "skip")
# 6 teacher layers do not split into 4 evenly: layer j of 4 learns from teacher layer j·6/4, rounded half up.
STUDENTS = {
    "3L-384": Student(3, name="3L-384"),
    "4L-192": Student(4, init_from="scratch", hidden_size=192, pkd_layers=(2, 3, 5), name="4L-192"),
}


def glue_results(task: str, results_dir: Path) -> dict:
    """The task's glue_table sweep (the default teacher's, 3-layer students): the setup and points this study reuses."""
    path = results_dir / f"glue_{task}_{glue_table.teacher_slug(default_teacher())}_3layers.json"
    if not path.is_file():
        raise PkdError(f"{path}: no glue_table sweep of {task} to take the setup and KD/PKD-Skip points from; run studies/glue_table.py --task {task} first")
    return json.loads(path.read_text())


def sweep_args(task: str, glue: dict, args) -> argparse.Namespace:
    """glue_table's flags for the task's setup, from its sweep (--max-train-samples, --max-seq-length,
    --epochs and --teacher-epochs override it: the smoke test's tiny runs, a study cut to the time at hand)."""
    teacher = glue["rows"]["teacher"]
    rows = args.max_train_samples or (glue["train_rows"] if glue.get("data_seed") is not None else None)
    argv = ["--task", task, "--strategies", ",".join(ROWS), "--seeds", ",".join(map(str, args.seeds)),
            "--epochs", str(args.epochs or glue["epochs"]), "--teacher-epochs", str(args.teacher_epochs or teacher["epochs"]),
            "--teacher-lr", str(teacher["best"]["lr"]), "--max-seq-length", str(args.max_seq_length or glue["max_seq_length"]),
            "--log-steps", str(args.log_steps), "--deepspeed", args.deepspeed, "--output-dir", str(Path(args.output_dir) / task)]
    if rows:
        argv += ["--max-train-samples", str(rows), "--data-seed", str(glue.get("data_seed") or 42)]
    if args.glue_dir:
        argv += ["--glue-dir", args.glue_dir]
    return glue_table.parse_args(argv)


def cpu_step_ms(log: Path) -> float | None:
    """Median CPU milliseconds per optimizer step between the run's log lines (None: fewer than two lines)."""
    lines = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    windows = window_seconds([r["cpu_time"] for r in lines], [r["step"] for r in lines])
    return round(1000 * statistics.median(windows), 1) if windows else None


def parameter_counts(model_dir: Path, teacher_width: int, pt_layers: int) -> dict:
    """The saved student's parameters: all, its embeddings (word, position, type, their LayerNorm), the rest;
    and the PT projections to the teacher's width that a narrower PKD student trains beside it (not saved:
    the deployed model is the student alone)."""
    config = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embeddings = sum(p.numel() for p in model.base_model.embeddings.parameters())
    width = config.hidden_size
    projections = pt_layers * (width * teacher_width + teacher_width) if width != teacher_width else 0
    return {"total": total, "embeddings": embeddings, "non_embedding": total - embeddings, "pt_projections_train_only": projections}


def majority_class(task, glue_dir: str | None) -> dict:
    """The score of answering the training set's most frequent label for every dev row: a student at this
    number shows nothing it learned (MRPC's F1 is 81 there, not 0)."""
    raw = load_glue(task, glue_dir)
    majority = int(np.bincount(raw["train"]["label"]).argmax())
    labels = np.asarray(raw[task.dev_splits[0]]["label"])
    scores = glue_metrics_with_halves(np.eye(task.num_labels)[np.full(len(labels), majority)], labels, task)
    return {"label": majority, "report": dev_score(scores, task.main_metric, "report"), "full_dev": dev_score(scores, task.main_metric, None)}


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "seeds": values}


class WidthStudy:
    """One task: the teacher, then each student's lr (searched from scratch), rows and seeds."""

    def __init__(self, task: str, args):
        self.glue = glue_results(task, Path(args.glue_results))
        self.args = args
        self.sweep = Sweep(sweep_args(task, self.glue, args), students=list(STUDENTS.values()))
        self.points = {row: self.glue["rows"][row]["best"] for row in ROWS}

    def lr_of(self, teacher: str, student: Student) -> tuple[float, dict | None]:
        """The glue sweep's lr for a student from the teacher's layers; from scratch, the best of --scratch-lrs
        for KD on the first seed's select half, the first listed on a tie (each lr's select score and train
        seconds beside it)."""
        if student.init_from != "scratch":
            return self.points["kd"]["lr"], None
        best, runs = self.sweep.search_lr(teacher, "kd", self.points["kd"], self.args.scratch_lrs, student)
        metric = self.sweep.task.main_metric
        return best, {f"{lr:g}": {"select": dev_score(r["dev"], metric, "select"), "train_seconds": r["train_seconds"]}
                      for lr, r in runs.items()}

    def run(self, names: list[str]) -> dict | None:
        """Train what `names` need; the result (None unless every student was asked for)."""
        teacher_path, teacher, rows_available = self.sweep.teacher()
        metric = self.sweep.task.main_metric
        students = {}
        for name in names:
            student = STUDENTS[name]
            lr, lr_search = self.lr_of(teacher_path, student)
            rows = {}
            for row in ROWS:
                point = {**self.points[row], "lr": lr}
                runs = [self.sweep.student(teacher_path, row, point, seed, student) for seed in self.args.seeds]
                dirs = [self.sweep.run_dir(row, point, seed, student) for seed in self.args.seeds]
                steps = [ms for ms in (cpu_step_ms(d / "train_log.jsonl") for d in dirs) if ms is not None]
                rows[row] = {
                    **_spread([dev_score(r["dev"], metric, "report") for r in runs]),
                    "full_dev": _spread([dev_score(r["dev"], metric, None) for r in runs]),
                    "point": point, "layer_map": runs[0]["layer_map"], "beta": [r["beta"] for r in runs],
                    "cpu_step_ms": statistics.median(steps) if steps else None, "cpu_step_ms_seeds": steps,
                    "train_seconds": round(sum(r["train_seconds"] for r in runs), 1), "steps": runs[0]["steps"],
                    "train_rows": runs[0]["train_rows"],
                }
            pkd_map = rows["skip"]["layer_map"]
            model_dir = self.sweep.run_dir("skip", rows["skip"]["point"], self.args.seeds[0], student) / "model"
            students[name] = {
                "layers": student.layers, "hidden_size": AutoConfig.from_pretrained(model_dir).hidden_size,
                "init_from": student.init_from or "teacher", "lr": lr, "lr_search_select": lr_search,
                "params": parameter_counts(model_dir, AutoConfig.from_pretrained(teacher_path).hidden_size, len(pkd_map)),
                "rows": rows,
                # the chosen lr's search run is its KD row's first seed, counted there
                "lr_search_seconds": round(sum(v["train_seconds"] for k, v in (lr_search or {}).items() if float(k) != lr), 1),
            }
        if set(names) != set(STUDENTS):
            return None
        return self._result(teacher_path, teacher, rows_available, students)

    def _result(self, teacher_path: str, teacher: dict, rows_available: int, students: dict) -> dict:
        args, sweep = self.args, self.sweep
        metric = sweep.task.main_metric
        narrow, wide = "4L-192", "3L-384"
        paired = {f"{narrow} − {wide}, {NAMES[row]}": paired_difference(students[narrow]["rows"][row]["seeds"], students[wide]["rows"][row]["seeds"])
                  for row in ROWS}
        paired.update({f"PKD-Skip − KD, {name}": paired_difference(s["rows"]["skip"]["seeds"], s["rows"]["kd"]["seeds"])
                       for name, s in students.items()})
        halves = {half: len(rows) for half, rows in zip(DEV_HALVES, dev_halves(sweep.dev_rows))}
        teacher_config = AutoConfig.from_pretrained(teacher_path)
        return {
            "task": sweep.task.name, "metric": metric,
            "reported_on": "report half of dev (a scratch student's lr picked on the select half, first seed)",
            "dev_half_rows": halves, "teacher": glue_table.teacher_slug(sweep.args.teacher),
            "teacher_layers": teacher_config.num_hidden_layers, "teacher_hidden_size": teacher_config.hidden_size,
            "teacher_score": {"report": dev_score(teacher["dev"], metric, "report"), "full_dev": dev_score(teacher["dev"], metric, None),
                              "train_rows": teacher.get("train_rows"), "epochs": teacher.get("epochs"), "lr": sweep.args.teacher_lr},
            "majority_class": majority_class(sweep.task, sweep.args.glue_dir or os.environ.get("GLUE_DIR")),
            "points_from": f"studies/results/glue_{sweep.task.name}_{glue_table.teacher_slug(default_teacher())}_3layers.json (best KD and PKD-Skip points)",
            "seeds": args.seeds, "scratch_lrs": args.scratch_lrs,
            "train_rows": students[wide]["rows"]["kd"]["train_rows"],
            "train_rows_available": rows_available, "data_seed": sweep.args.data_seed if sweep.args.max_train_samples else None,
            "max_seq_length": sweep.args.max_seq_length, "epochs": sweep.args.epochs, "glue_sweep_epochs": self.glue["epochs"],
            "batch_size": read_ds_config(sweep.args.deepspeed)["train_micro_batch_size_per_gpu"],
            "students": students, "paired": paired,
            "train_seconds_total": round(teacher.get("train_seconds", 0.0) + sum(
                s["lr_search_seconds"] + sum(r["train_seconds"] for r in s["rows"].values()) for s in students.values()), 1),
            "device": describe(torch.device("cpu")), "date": date.today().isoformat(),
        }


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def render_markdown(result: dict) -> str:
    wide, narrow = result["students"]["3L-384"], result["students"]["4L-192"]
    teacher = result["teacher_score"]
    data = f"{result['train_rows']:,} training rows" + (f" (--data-seed {result['data_seed']})" if result.get("data_seed") is not None else " (all)")
    lines = [
        (f"**{result['task']}** dev {result['metric']} (%), teacher {result['teacher']} ({result['teacher_layers']} layers, "
         f"{teacher['report']:.2f} on the report half; {teacher['epochs']} epoch(s) at lr {teacher['lr']:g}; answering the majority "
         f"class scores {result['majority_class']['report']:.2f}) → two students: {data} × {result['epochs']} epoch(s), max length "
         f"{result['max_seq_length']}, batch {result['batch_size']}; seeds {result['seeds']}, paired; {result['device']['name']}, "
         f"{result['device'].get('threads', '?')} thread per run, {result['date']}."),
        "",
        (f"Reported on the dev split's report half ({result['dev_half_rows']['report']:,} rows). "
         f"Points: {result['points_from']}; T, α and β's share of the loss at step 1 are that sweep's for both students"
         + (", and so are the data and epochs: the 3L-384 rows rerun that sweep's setup on these seeds. "
            if result["epochs"] == result["glue_sweep_epochs"] else
            f"; the students train {result['epochs']} epoch(s) where that sweep's trained {result['glue_sweep_epochs']} "
            f"(cut to fit the time on a shared 2-core machine), the teacher as that sweep's. ") +
         f"The 3L-384 student starts from the teacher's first 3 layers at that sweep's lr; the 4L-192 student starts from "
         f"random weights, so its lr was searched ({', '.join(f'{lr:g}' for lr in result['scratch_lrs'])}, KD, seed "
         f"{result['seeds'][0]}, select half) and its KD and PKD-Skip rows run at the best: an lr search the other student "
         f"did not get, on top of the teacher's weights it did get. The 4L-192 PKD-Skip student learns teacher layers "
         f"{','.join(map(str, narrow['rows']['skip']['layer_map']))} through a learned {narrow['hidden_size']}→{result['teacher_hidden_size']} projection per layer "
         f"(train-only parameters, not in the deployed model)."),
        "",
        "| student | init | lr | parameters: all / without embeddings | KD | PKD-Skip | CPU ms/step KD / PKD-Skip | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in result["students"].items():
        rows, params = s["rows"], s["params"]
        tried = ", ".join(f"{lr} → {v['select']:.1f}" for lr, v in (s["lr_search_select"] or {}).items())
        search = f" (select half: {tried})" if tried else ""
        ms = " / ".join(f"{rows[r]['cpu_step_ms']:.0f}" if rows[r]["cpu_step_ms"] is not None else "-" for r in ROWS)
        extra = f" (+{_millions(params['pt_projections_train_only'])} PT projections in training)" if params["pt_projections_train_only"] else ""
        train_s = sum(r["train_seconds"] for r in rows.values()) + s["lr_search_seconds"]
        lines.append(f"| {name} | {s['init_from']} | {s['lr']:g}{search} | {_millions(params['total'])} / {_millions(params['non_embedding'])}{extra} | "
                     f"{rows['kd']['mean']:.2f} ± {rows['kd']['std']:.2f} | {rows['skip']['mean']:.2f} ± {rows['skip']['std']:.2f} | {ms} | {train_s:.0f} |")
    lines += ["", "Paired by seed (each student's runs of one seed share its init, head, data order and dropout):", "",
              "| difference | mean | 95% interval | p (paired t) | seeds |", "|---|---|---|---|---|"]
    for pair, d in result["paired"].items():
        ci = f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]" if d["ci95"] else "-"
        p_value = f"{d['p']:.3f}" if d["p"] is not None else "-"
        lines.append(f"| {pair} | {d['mean']:+.2f} | {ci} | {p_value} | {d['n']} |")
    ratio = wide["rows"]["kd"]["cpu_step_ms"] / narrow["rows"]["kd"]["cpu_step_ms"] if narrow["rows"]["kd"]["cpu_step_ms"] else None
    lines += ["", (f"Cost: CPU ms per optimizer step of {result['batch_size']} rows is the median over the runs' log windows "
                   f"(process CPU time, 1 thread; the teacher's outputs come from the cache, so a step is the student's forward, "
                   f"backward and update)" + (f"; the 3L-384 KD step costs {ratio:.2f}× the 4L-192's." if ratio else ".")
                   + f" Training summed over every run: {result['train_seconds_total'] / 60:.1f} min (wall, runs sharing the cores).")]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Dev score per student and row (bars mean ± std, dots the seeds, the teacher dashed, the majority class
    dotted), and CPU ms per step."""
    plt, fig, (score_ax, cost_ax) = glue_table._figure(2, width=4.2)
    names = list(result["students"])
    width = 0.38
    for j, row in enumerate(ROWS):
        xs = [i + (j - 0.5) * width for i in range(len(names))]
        rows = [result["students"][n]["rows"][row] for n in names]
        score_ax.bar(xs, [r["mean"] for r in rows], width, yerr=[r["std"] for r in rows], capsize=3, color=glue_table.COLORS[row],
                     edgecolor="k", linewidth=0.4, label=NAMES[row])
        for x, r in zip(xs, rows):
            score_ax.scatter([x] * len(r["seeds"]), r["seeds"], color="k", s=6, zorder=3)
        cost_ax.bar(xs, [r["cpu_step_ms"] or 0 for r in rows], width, color=glue_table.COLORS[row], edgecolor="k", linewidth=0.4, label=NAMES[row])
    labels = [f"{n}\n{result['students'][n]['init_from']}, {_millions(result['students'][n]['params']['total'])}" for n in names]
    teacher = result["teacher_score"]["report"]
    score_ax.axhline(teacher, ls="--", color="k", lw=1, label=f"teacher ({result['teacher_layers']}L-{result['teacher_hidden_size']})")
    majority = result["majority_class"]["report"]
    score_ax.axhline(majority, ls=":", color="k", lw=1, label="majority class")
    low = min(majority, *(min(r["seeds"]) for s in result["students"].values() for r in s["rows"].values()))
    score_ax.set_ylim(max(0, low - 3), teacher + 2)
    score_ax.set_ylabel(f"dev {result['metric']} (%), report half")
    score_ax.set_title(f"{result['task']}: mean ± std over seeds {result['seeds']}", fontsize=9)
    cost_ax.set_ylabel(f"CPU ms per step (batch {result['batch_size']}, 1 thread)")
    cost_ax.set_title(f"{result['task']}: step cost", fontsize=9)
    for ax in (score_ax, cost_ax):
        ax.set_xticks(range(len(names)), labels, fontsize=7)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_results(result: dict, results_dir: Path) -> Path:
    stem = results_dir / f"width_{result['task']}"
    write_study(stem, result, render_markdown, plot)
    return stem


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tasks", type=lambda s: s.split(","), default=["sst2", "mrpc"])
    p.add_argument("--students", type=lambda s: s.split(","), default=list(STUDENTS),
                   help="train only these (several processes can share the work); results are written when all ran")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3])
    p.add_argument("--scratch-lrs", type=lambda s: [float(x) for x in s.split(",")], default=[1e-4, 5e-4, 1e-3])
    p.add_argument("--glue-dir", default=None, help="(default $GLUE_DIR, through train.py)")
    p.add_argument("--glue-results", default=str(RESULTS), help="where the glue_table sweeps whose setup and points are reused are")
    p.add_argument("--max-train-samples", type=int, default=None, help="(default: the glue sweep's) a smoke run's few rows")
    p.add_argument("--max-seq-length", type=int, default=None, help="(default: the glue sweep's)")
    p.add_argument("--epochs", type=int, default=None, help="the students' (default: the glue sweep's)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="(default: the glue sweep's)")
    p.add_argument("--log-steps", type=int, default=20, help="log (and time) every N steps")
    p.add_argument("--deepspeed", default=default_ds_config())
    p.add_argument("--output-dir", default="outputs/width_study", help="one subdirectory per task")
    p.add_argument("--results-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    for name in args.students:
        if name not in STUDENTS:
            p.error(f"--students: {name!r} is not one of {list(STUDENTS)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    results = {}
    try:
        for task in args.tasks:
            get_task(task)
            result = WidthStudy(task, args).run(args.students)
            if result is not None:
                write_results(result, Path(args.results_dir))
                print("\n" + render_markdown(result), flush=True)
                results[task] = result
    except PkdError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return results


if __name__ == "__main__":
    main()
