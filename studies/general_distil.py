"""Does general (masked-LM) distillation help a task distillation on this teacher? (#10)

    python -m studies.general_distil                 # all of it; finished runs are reused
    python -m studies.general_distil --phase general # only the masked-LM stage

1. corpus   every training sentence of SST-2, MRPC and STS-B (both sides of a pair), one per line.
2. general  `--objective mlm`: a head is fitted on the headless MiniLM teacher, then a 3-layer student
            built from its first 3 layers is distilled on that corpus (CE + KD + PT on every token).
3. task     PKD-Skip on SST-2 and MRPC from the same fine-tuned teacher and teacher cache as the paired study
            (`glue_table.py`, same --output-dir), twice per seed: the student initialised from the teacher's
            first 3 layers (`--init-from teacher`, the paper's), or from the general student
            (`--init-from pretrained --base-model`). Same seed → same head, data order and dropout, so the
            per-seed difference is the measurement.

Writes results/general_distil.{json,md,png}.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from datetime import date
from pathlib import Path

from studies import glue_table
import torch

from benchmarks.harness import device_name, write_study
from pkd_fast import train
from pkd_fast.config import default_teacher
from pkd_fast.recipes.mlm import KD_POSITIONS

RESULTS = Path(__file__).resolve().parent / "results"
# The corpus: (task folder, the columns holding sentences).
SOURCES = (("SST-2", ("sentence",)), ("MRPC", ("#1 String", "#2 String")), ("STS-B", ("sentence1", "sentence2")))
# The task stage's point: the `cpu` grid of glue_table (its lr: short CPU runs at ≤ 5e-5 stayed at the majority class).
POINT = {"temperature": 10, "alpha": 0.7, "beta": 100, "lr": 1e-4}
# The paired study's settings per task (docs/results.md: `glue_table.py --grid paired`), so its fine-tuned teacher and
# teacher cache are reused as they are.
TASK_ARGS = {
    "sst2": ["--max-train-samples", "8000", "--epochs", "1", "--teacher-epochs", "2", "--max-seq-length", "64"],
    "mrpc": ["--epochs", "2", "--teacher-epochs", "3", "--max-seq-length", "128", "--teacher-lr", "1e-4"],
}
INITS = {"teacher": "teacher's layers 1-3", "general": "general-distilled student"}


def write_corpus(glue_dir: Path, path: Path) -> dict:
    """The training sentences of SOURCES as one text file; returns the count per task."""
    counts, lines = {}, []
    for task, columns in SOURCES:
        with open(glue_dir / task / "train.tsv", newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        counts[task] = len(rows) * len(columns)
        lines += [row[c] for row in rows for c in columns]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line.replace("\n", " ") + "\n" for line in lines), encoding="utf-8")
    return counts


def general_stage(args, corpus: Path) -> dict:
    """Head fit, then masked-LM PKD of the 3-layer student (train.py's mlm recipe; each resumes when rerun).
    Two calls, for two learning rates: the head is new (its transform and bias start from scratch), the
    student's layers are the teacher's own."""
    common = ["--objective", "mlm", "--text-files", str(corpus), "--output-dir", str(args.out / "general"),
              "--max-seq-length", str(args.mlm_seq_length), "--log-steps", "20", "--save-steps", "100", "--resume"]
    head = train.main([*common, "--stage", "teacher", "--teacher", args.teacher, "--epochs", str(args.mlm_epochs), "--lr", str(args.head_lr)])
    student = train.main([*common, "--stage", "student", "--teacher", str(args.out / "general" / "teacher" / "model"),
                          "--student-layer-choice", "first", "--student-layers", str(args.student_layers),
                          "--epochs", str(args.mlm_epochs), "--lr", str(args.mlm_lr), "--kd-positions", args.kd_positions])
    return {"train_blocks": student["train_blocks"], "runs": {**head["runs"], **student["runs"]}}


def task_stage(args, task: str, general_model: Path) -> dict:
    """PKD-Skip from both initialisations, every seed, on the paired study's teacher and cache."""
    sweep_args = glue_table.parse_args([
        "--task", task, "--student-layers", str(args.student_layers), "--output-dir", str(args.sweep_dir / task),
        "--glue-dir", str(args.glue_dir), *TASK_ARGS[task],
    ])
    sweep = glue_table.Sweep(sweep_args)
    teacher_path, teacher, _ = sweep.teacher()
    metric = sweep.task.main_metric
    scores = {init: [] for init in INITS}
    for init in INITS:
        for seed in args.seeds:
            out = args.out / task / init / f"seed{seed}"
            done = out / "students" / "skip" / "results.json"
            if not done.is_file():
                extra = ["--init-from", "pretrained", "--base-model", str(general_model)] if init == "general" else []
                train.main([*sweep.common, "--stage", "student", "--teacher", teacher_path, "--strategy", "skip",
                            "--student-layers", str(args.student_layers), "--seed", str(seed), "--output-dir", str(out),
                            "--teacher-cache", str(sweep.cache), *extra,
                            *(a for k, v in POINT.items() for a in (f"--{k}", str(v)))])
            scores[init].append(json.loads(done.read_text())["dev"][metric])
    rows = {init: {"mean": statistics.mean(s), "std": statistics.stdev(s) if len(s) > 1 else 0.0, "seeds": s} for init, s in scores.items()}
    return {"task": task, "metric": metric, "args": TASK_ARGS[task], "teacher": teacher["dev"][metric], "rows": rows,
            "general-teacher": glue_table.paired_difference(scores["general"], scores["teacher"])}


def render(result: dict) -> str:
    g = result["general"]
    lines = [
        f"General distillation, then PKD-Skip: {result['teacher']} → {result['student_layers']}-layer students; "
        f"{result['device']}, {result['date']}. Corpus: {result['corpus_sentences']:,} training sentences of SST-2, MRPC and STS-B "
        f"({g['train_blocks']:,} blocks of {result['mlm_seq_length']} tokens), {result['mlm_epochs']} epoch(s) each for the head (lr "
        f"{result['head_lr']:g}) and the student (lr {result['mlm_lr']:g}), KD over "
        f"{result['kd_positions']} tokens, PT over every token. Task stage: PKD-Skip at {result['point']}, [CLS] PT, seeds "
        f"{result['seeds']}; " + "; ".join(f"{t['task']} `{' '.join(t['args'])}`" for t in result["tasks"]) + " (whole dev split).",
        "",
        "| masked-LM held out (last 1% of blocks) | loss | accuracy % | train s |",
        "|---|---|---|---|",
    ]
    for name, r in g["runs"].items():
        dev = r["dev"]
        lines.append(f"| {'teacher (head fitted, body frozen)' if name == 'teacher' else 'general student (layers ' + ','.join(map(str, r['layers'])) + ')'}"
                     f" | {dev['mlm_loss']:.3f} | {dev['mlm_accuracy']:.2f} | {r.get('train_seconds', '-')} |")
    lines += ["", "| task (dev metric) | teacher | PKD-Skip from teacher layers | PKD-Skip from general student | general − teacher init (95% interval, p) |",
              "|---|---|---|---|---|"]
    for t in result["tasks"]:
        d = t["general-teacher"]
        ci = f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]" if d["ci95"] else "-"
        p = f"{d['p']:.3f}" if d["p"] is not None else "-"
        cells = [f"{t['rows'][i]['mean']:.2f} ± {t['rows'][i]['std']:.2f}" for i in INITS]
        lines.append(f"| {t['task']} ({t['metric']}) | {t['teacher']:.2f} | " + " | ".join(cells) + f" | {d['mean']:+.2f} {ci}, p {p} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    plt, fig, axes = glue_table._figure(len(result["tasks"]))
    for ax, t in zip(axes, result["tasks"]):
        for x, init in enumerate(INITS):
            seeds = t["rows"][init]["seeds"]
            ax.bar(x, t["rows"][init]["mean"], yerr=t["rows"][init]["std"], capsize=4, color=("#9aa5b1", "#d79b00")[x])
            ax.scatter([x] * len(seeds), seeds, color="k", s=10, zorder=3)
        for a, b in zip(t["rows"]["teacher"]["seeds"], t["rows"]["general"]["seeds"]):  # one line per seed: the pairing
            ax.plot([0, 1], [a, b], color="k", lw=0.6, alpha=0.5)
        ax.axhline(t["teacher"], ls="--", color="k", lw=1, label="fine-tuned teacher (6 layers)")
        ax.set_xticks(range(len(INITS)), [f"PKD-Skip from\n{v}" for v in INITS.values()], fontsize=8)
        low = min(min(r["seeds"]) for r in t["rows"].values())
        ax.set_ylim(low - 3, max(t["teacher"], *(max(r["seeds"]) for r in t["rows"].values())) + 2)
        ax.set_ylabel(f"dev {t['metric']} (%)")
        ax.set_title(f"{t['task']}: {result['student_layers']}-layer students, {len(result['seeds'])} seeds", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def general_args(p: argparse.ArgumentParser) -> None:
    """The flags of the corpus and the masked-LM general stage (`general_stage` reads them), shared with the
    studies that start from that stage (studies/relation_study.py)."""
    p.add_argument("--glue-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "glue")
    p.add_argument("--teacher", default=default_teacher())
    p.add_argument("--student-layers", type=int, default=3)
    p.add_argument("--mlm-seq-length", type=int, default=128)
    p.add_argument("--mlm-epochs", type=int, default=1)
    p.add_argument("--mlm-lr", type=float, default=1e-4, help="the general student's (from the teacher's layers)")
    p.add_argument("--head-lr", type=float, default=1e-3, help="the teacher's new MLM head's (its body stays frozen)")
    p.add_argument("--kd-positions", choices=KD_POSITIONS, default="masked",
                   help="masked keeps the vocabulary KL to the 15%% masked rows: the CPU budget (state it)")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3])
    p.add_argument("--results-dir", type=Path, default=RESULTS)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    general_args(p)
    p.add_argument("--phase", choices=("general", "all"), default="all")
    p.add_argument("--out", type=Path, default=Path("outputs/general_distil"))
    p.add_argument("--sweep-dir", type=Path, default=Path("outputs/paired"), help="the paired study's output dirs (<dir>/<task>)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    corpus = args.out / "corpus" / "glue_train_sentences.txt"
    counts = write_corpus(args.glue_dir, corpus)
    general = general_stage(args, corpus)
    if args.phase == "general":
        return general
    student = args.out / "general" / "students" / "first" / "model"
    result = {
        "teacher": glue_table.teacher_slug(args.teacher), "student_layers": args.student_layers, "device": device_name(torch.device("cpu")),
        "date": date.today().isoformat(), "corpus_sentences": sum(counts.values()), "corpus_counts": counts,
        "mlm_seq_length": args.mlm_seq_length, "mlm_epochs": args.mlm_epochs, "head_lr": args.head_lr, "mlm_lr": args.mlm_lr, "kd_positions": args.kd_positions,
        "point": POINT, "seeds": args.seeds, "general": general,
        "tasks": [task_stage(args, task, student) for task in ("sst2", "mrpc")],
    }
    print(write_study(args.results_dir / "general_distil", result, render, plot))
    return result


if __name__ == "__main__":
    main()
