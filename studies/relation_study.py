"""Is a general student distilled by MiniLMv2's self-attention relations a better start for PKD-Skip than the
teacher's own layers, or than the masked-LM KD general student? (#22, item 5)

    OMP_NUM_THREADS=1 python -m studies.relation_study                       # all of it; finished runs are reused
    OMP_NUM_THREADS=1 python -m studies.relation_study --only rel-3L         # one general student and its task runs
                                                                             # (one process per general student: two on
                                                                             # the same one meet its output-dir lock)

1. corpus   general_distil's: every training sentence of SST-2, MRPC and STS-B, in blocks of 128 tokens.
2. general  three general students, one epoch over those blocks each (general_distil's budget), from the
            offline teacher as it ships:
            mlm-kd-3L   general_distil's own (a masked-LM head fitted on the frozen teacher, then CE + KD over the
                        masked tokens + PT on every token into the teacher's layers 1-3);
            rel-3L      relations only (`--alpha 0 --beta 0 --mlm-ce-weight 0 --relation-weight 1`: Q-Q, K-K, V-V
                        of teacher layer 6 to student layer 3, 12 relation heads), from the teacher's layers 1-3;
            rel-4L-192  relations only, a 4-layer 192-wide student from random weights (MiniLMv2's kind of start);
            mix-3L      mlm-kd-3L's loss plus relations at γ 0.3 (about as large as the rest of that loss at
                        step 1: 0.3 × 7.8 against 2.3), from the same fitted head and layers.
3. task     PKD-Skip on SST-2 and MRPC in the width study's setup (studies/width_study.py: its fine-tuned
            teacher, teacher cache, training rows, epochs, T, α, β's share, its plain shuffled batches), seeds
            1-3. The 3-layer students run at that study's lr (1e-4); the 4L-192 one's lr is searched as that
            study searched it for the 4L-192 student from random weights (its lrs, seed 1, select half). The width study's own PKD-Skip runs are the baselines: the
            student from the teacher's layers 1-3 and the 4L-192 student from random weights (reuse them by
            pointing --width-dir at that study's output; absent, they are trained here).
            Same seed → same head, data order and dropout, so the per-seed difference is the measurement.

Writes results/relation_study.{json,md,png} once every student has run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import date
from pathlib import Path

import torch

if not __package__:  # run as `python studies/relation_study.py`: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from studies import general_distil, glue_table, width_study  # noqa: E402
from studies.glue_table import Student, Sweep, dev_score, paired_difference  # noqa: E402
from benchmarks.harness import describe, write_study  # noqa: E402
from pkd_fast import train  # noqa: E402
from pkd_fast.config import default_ds_config  # noqa: E402

RESULTS = glue_table.RESULTS
TASKS = ("sst2", "mrpc")
RELATIONS_ONLY = ["--alpha", "0", "--beta", "0", "--mlm-ce-weight", "0", "--relation-weight", "1"]
# name: (what it is, train.py's flags for the general stage, its model under the general output dir); a
# student whose loss reads logits learns from the teacher with general_distil's fitted head (that stage first).
GENERALS = {
    "mlm-kd-3L": ("masked-LM KD (CE + KD + PT), teacher layers 1-3", None, "general/students/first/model"),
    "rel-3L": ("relations only, teacher layers 1-3", ["--student-layer-choice", "first", "--student-layers", "3", *RELATIONS_ONLY],
               "general_rel_3L/students/first/model"),
    "rel-4L-192": ("relations only, 4 layers × 192 from random weights",
                   ["--init-from", "scratch", "--student-hidden-size", "192", "--student-layers", "4", *RELATIONS_ONLY],
                   "general_rel_4L192/students/scratch_4x192/model"),
    "mix-3L": ("masked-LM KD (CE + KD + PT) + relations γ 0.3, teacher layers 1-3",
               ["--student-layer-choice", "first", "--student-layers", "3", "--kd-positions", "masked", "--relation-weight", "0.3"],
               "general_mix_3L/students/first/model"),
}
# The task-stage students: (width-study student it pairs with, general student it starts from or None).
ARMS = {
    "3L teacher layers": ("3L-384", None),
    "3L mlm-kd general": ("3L-384", "mlm-kd-3L"),
    "3L rel general": ("3L-384", "rel-3L"),
    "3L mix general": ("3L-384", "mix-3L"),
    "4L-192 random init": ("4L-192", None),
    "4L-192 rel general": ("4L-192", "rel-4L-192"),
}
# Arms whose task lr is searched as the width study searched its random start's (its lrs, seed 1, the dev
# split's select half; PKD-Skip here): a pretrained start of another width has no lr of its own to reuse.
SEARCHED = ("4L-192 rel general",)
PAIRS = (("3L rel general", "3L teacher layers"), ("3L rel general", "3L mlm-kd general"),
         ("3L mlm-kd general", "3L teacher layers"), ("3L mix general", "3L mlm-kd general"), ("3L mix general", "3L teacher layers"),
         ("4L-192 rel general", "4L-192 random init"))


def general_stage(name: str, args, corpus: Path) -> dict:
    """Train (or reuse) one general student; its run summary and the model's path."""
    what, flags, model = GENERALS[name]
    if flags is None:  # general_distil's own two calls (head fit, then the student), in its output layout
        summary = general_distil.general_stage(args, corpus)
        run = summary["runs"]["first"]
        head = summary["runs"]["teacher"]
    else:
        out = args.out / Path(model).parts[0]
        lr = args.mlm_lr if "scratch" not in flags else args.scratch_lr
        teacher = args.teacher
        if "--alpha" not in flags:  # KD over the vocabulary: from the head general_distil fits (fitted once, reused)
            general_distil.general_stage(args, corpus)
            teacher = str(args.out / "general" / "teacher" / "model")
        summary = train.main(["--objective", "mlm", "--text-files", str(corpus), "--output-dir", str(out), "--teacher", teacher,
                              "--max-seq-length", str(args.mlm_seq_length), "--log-steps", "20", "--save-steps", "100", "--resume",
                              "--stage", "student", "--epochs", str(args.mlm_epochs), "--lr", str(lr), *flags])
        run, head = next(iter(summary["runs"].values())), None
    log = args.out / Path(model).parent / "train_log.jsonl"
    first = json.loads(log.read_text().splitlines()[0]) if log.is_file() else {}
    return {"what": what, "model": str(args.out / model), "lr": run["lr"], "epochs": run["epochs"], "steps": run["steps"],
            "train_blocks": summary["train_blocks"], "train_seconds": run["train_seconds"] + (head["train_seconds"] if head else 0.0),
            "head_fit_seconds": head["train_seconds"] if head else None, "held_out": run["dev"], "step1": first}


def sweep_for(task: str, args) -> tuple[Sweep, dict, dict]:
    """The width study's sweep of `task` (its teacher, cache, rows, epochs), with this study's students; the
    width study's result, and the PKD-Skip point."""
    glue = width_study.glue_results(task, args.glue_results)
    width = json.loads((args.glue_results / f"width_{task}.json").read_text())
    study_args = argparse.Namespace(max_train_samples=None, seeds=args.seeds, epochs=None, teacher_epochs=None, max_seq_length=None,
                                    log_steps=20, deepspeed=args.deepspeed, output_dir=str(args.width_dir), glue_dir=str(args.glue_dir))
    sweep = Sweep(width_study.sweep_args(task, glue, study_args), students=list(width_study.STUDENTS.values()))
    sweep.common += ["--no-group-by-length"]  # the width study's runs predate length grouping: the same batches as theirs
    return sweep, width, glue["rows"]["skip"]["best"]


def arm_student(arm: str, general_models: dict) -> Student:
    base, general = ARMS[arm]
    student = width_study.STUDENTS[base]
    if general is None:
        return student
    return Student(student.layers, init_from="pretrained", pkd_layers=student.pkd_layers, name=f"{base}-{general}",
                   base_model=general_models[general])


def task_stage(task: str, args, general_models: dict, arms: list[str]) -> dict:
    sweep, width, skip_point = sweep_for(task, args)
    teacher_path, teacher, _ = sweep.teacher()
    metric = sweep.task.main_metric
    rows = {}
    for arm in arms:
        student = arm_student(arm, general_models)
        lr, search = width["students"][ARMS[arm][0]]["lr"], None
        if arm in SEARCHED:  # the width study's search for the random start, on this start: seed 1, select half
            lr, tried = sweep.search_lr(teacher_path, "skip", skip_point, width["scratch_lrs"], student)
            search = {f"{tried_lr:g}": dev_score(r["dev"], metric, "select") for tried_lr, r in tried.items()}
        point = {**skip_point, "lr": lr}
        runs = [sweep.student(teacher_path, "skip", point, seed, student) for seed in args.seeds]
        rows[arm] = {"report": [dev_score(r["dev"], metric, "report") for r in runs],
                     "full_dev": [dev_score(r["dev"], metric, None) for r in runs],
                     "lr": point["lr"], "lr_search_select": search, "beta": [r["beta"] for r in runs], "layer_map": runs[0]["layer_map"],
                     "train_seconds": round(sum(r["train_seconds"] for r in runs), 1)}
    return {"task": task, "metric": metric, "point": skip_point, "teacher": dev_score(teacher["dev"], metric, "report"),
            "majority_class": width["majority_class"]["report"], "train_rows": width["train_rows"], "epochs": width["epochs"],
            "max_seq_length": width["max_seq_length"], "dev_half_rows": width["dev_half_rows"], "rows": rows}


def paired(task_result: dict) -> dict:
    rows = task_result["rows"]
    return {f"{a} − {b}": paired_difference(rows[a]["report"], rows[b]["report"]) for a, b in PAIRS if a in rows and b in rows}


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"


def render(result: dict) -> str:
    lines = [
        f"General distillation by relations, then PKD-Skip: {result['teacher']} (6 layers, 384 wide, no masked-LM head) → "
        f"general students on {result['corpus_sentences']:,} training sentences of SST-2, MRPC and STS-B "
        f"({result['train_blocks']:,} blocks of {result['mlm_seq_length']} tokens), {result['mlm_epochs']} epoch each; "
        f"{result['device']['name']}, 1 or 2 threads per process, {result['date']}.",
        "",
        "| general student | objective | lr | held out (last 1% of blocks) | relation loss at step 1 → held out | train s |",
        "|---|---|---|---|---|---|",
    ]
    for name, g in result["generals"].items():
        held = g["held_out"]
        scores = (f"MLM loss {held['mlm_loss']:.3f}, accuracy {held['mlm_accuracy']:.2f}%" if "mlm_loss" in held else "-")
        rel = f"{g['step1']['rel']:.3f} → {held['relation_loss']:.3f}" if "relation_loss" in held and "rel" in g["step1"] else "-"
        head = f" (+ head fit {g['head_fit_seconds']:.0f})" if g["head_fit_seconds"] else ""
        lines.append(f"| {name} | {g['what']} | {g['lr']:g} | {scores} | {rel} | {g['train_seconds'] - (g['head_fit_seconds'] or 0):.0f}{head} |")
    for t in result["tasks"]:
        lines += ["", (f"**{t['task']}** PKD-Skip (T {t['point']['temperature']:g}, α {t['point']['alpha']:g}, β's share "
                       f"{t['point']['beta_share']:g}), {t['train_rows']:,} rows × {t['epochs']} epoch(s), max length "
                       f"{t['max_seq_length']}; dev {t['metric']} (%) on the report half ({t['dev_half_rows']['report']} rows); "
                       f"teacher {t['teacher']:.2f}, majority class {t['majority_class']:.2f}."), "",
                  "| student | lr | seeds 1, 2, 3 | mean ± std | whole dev |", "|---|---|---|---|---|"]
        for arm, r in t["rows"].items():
            tried = ", ".join(f"{lr} → {v:.1f}" for lr, v in (r.get("lr_search_select") or {}).items())
            lines.append(f"| {arm} | {r['lr']:g}{f' (select half: {tried})' if tried else ''} | {', '.join(f'{v:.2f}' for v in r['report'])} | {_mean_std(r['report'])} | "
                         f"{_mean_std(r['full_dev'])} |")
        lines += ["", "| paired difference | mean | 95% interval | p (paired t) |", "|---|---|---|---|"]
        for pair, d in t["paired"].items():
            ci = f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]" if d["ci95"] else "-"
            lines.append(f"| {pair} | {d['mean']:+.2f} | {ci} | {d['p']:.3f} |" if d["p"] is not None else f"| {pair} | {d['mean']:+.2f} | {ci} | - |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    plt, fig, axes = glue_table._figure(len(result["tasks"]), width=6)
    colors = {"3L teacher layers": "#9aa5b1", "3L mlm-kd general": "#6c8ebf", "3L rel general": "#d79b00", "3L mix general": "#82b366",
              "4L-192 random init": "#c8ccd0", "4L-192 rel general": "#e8c170"}
    for ax, t in zip(axes, result["tasks"]):
        arms = list(t["rows"])
        for x, arm in enumerate(arms):
            seeds = t["rows"][arm]["report"]
            ax.bar(x, statistics.mean(seeds), color=colors[arm], edgecolor="k", linewidth=0.4)
            ax.scatter([x] * len(seeds), seeds, color="k", s=8, zorder=3)
        for a, b in PAIRS:  # one thin line per seed between the arms a pair compares
            if a in t["rows"] and b in t["rows"]:
                for ya, yb in zip(t["rows"][b]["report"], t["rows"][a]["report"]):
                    ax.plot([arms.index(b), arms.index(a)], [ya, yb], color="k", lw=0.5, alpha=0.35)
        ax.axhline(t["teacher"], ls="--", color="k", lw=1, label="teacher (6 layers)")
        low = min(min(r["report"]) for r in t["rows"].values()) - 3
        if t["majority_class"] >= low:  # a task whose students sit near it (MRPC): the line that says so
            ax.axhline(t["majority_class"], ls=":", color="k", lw=1, label="majority class")
        ax.set_ylim(low, max(t["teacher"], *(max(r["report"]) for r in t["rows"].values())) + 2)
        ax.set_xticks(range(len(arms)), [a.replace(" ", "\n") for a in arms], fontsize=7)
        ax.set_ylabel(f"dev {t['metric']} (%), report half")
        ax.set_title(f"{t['task']}: PKD-Skip from each start, seeds {result['seeds']}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    general_distil.general_args(p)  # the corpus and general_distil's masked-LM stage, whose student is mlm-kd-3L
    p.add_argument("--only", choices=list(GENERALS), default=None,
                   help="this general student and its task runs only (writes nothing); without it, everything, then the results")
    p.add_argument("--scratch-lr", type=float, default=5e-4, help="the general student from random weights")
    p.add_argument("--tasks", type=lambda s: s.split(","), default=list(TASKS))
    p.add_argument("--out", type=Path, default=Path("outputs/relation_study"))
    p.add_argument("--width-dir", type=Path, default=None, help="the width study's output (<dir>/<task>); default <out>/tasks")
    p.add_argument("--glue-results", type=Path, default=RESULTS, help="where width_<task>.json and the glue sweeps are")
    p.add_argument("--deepspeed", default=default_ds_config())
    args = p.parse_args(argv)
    args.width_dir = args.width_dir or args.out / "tasks"
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    corpus = args.out / "corpus" / "glue_train_sentences.txt"
    counts = general_distil.write_corpus(args.glue_dir, corpus)
    names = [args.only] if args.only else list(GENERALS)
    generals = {name: general_stage(name, args, corpus) for name in names}
    models = {name: g["model"] for name, g in generals.items()}
    arms = [arm for arm, (_, general) in ARMS.items() if (general in names if args.only else True)]
    tasks = [task_stage(task, args, models, arms) for task in args.tasks]
    if args.only:
        return None
    for t in tasks:
        t["paired"] = paired(t)
    result = {"teacher": glue_table.teacher_slug(args.teacher), "device": describe(torch.device("cpu")), "date": date.today().isoformat(),
              "corpus_sentences": sum(counts.values()), "corpus_counts": counts, "train_blocks": generals["rel-3L"]["train_blocks"],
              "mlm_seq_length": args.mlm_seq_length, "mlm_epochs": args.mlm_epochs, "seeds": args.seeds,
              "generals": generals, "tasks": tasks}
    print(write_study(args.results_dir / "relation_study", result, render, plot))
    return result


if __name__ == "__main__":
    main()
