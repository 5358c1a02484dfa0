"""How hard does the patient term pull? A diagnostic for the β scale, the normalisation and the layer map.

For a fine-tuned teacher and a student (fresh from the teacher's first k layers, as PKD starts, or a
trained one), over a few training batches: how close each mapped [CLS] pair already is (cosine), how alike
the teacher's [CLS] vectors of *different* examples are (if they share one direction, the normalised
distance is small whatever the student does), and the gradient norm that each weighted term puts on the
student's weights. The ratio β·‖∇PT‖ / ‖∇(α·KD)‖ says whether β, on the chosen PT reduction, gives the
patient term any say next to the soft labels.

    python studies/pt_signal.py --task mrpc --teacher outputs/sweep_mrpc/teacher/teacher/model
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from pkd_fast import data, glue_files
from pkd_fast.families import model_inputs
from pkd_fast.losses import patient_loss, pkd_loss
from pkd_fast.models import build_student, layer_map, load_classifier, num_layers, pt_rows
from pkd_fast.tasks import TASKS, get_task

RESULTS = Path(__file__).resolve().parent / "results"


def _grad_norm(term: torch.Tensor, params: list[torch.Tensor]) -> float:
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return torch.sqrt(sum(g.float().pow(2).sum() for g in grads if g is not None)).item()


def _cross_cosine(rows: torch.Tensor) -> float:
    """Mean cosine between the [CLS] vectors of different examples in the batch."""
    unit = F.normalize(rows.float(), dim=-1)
    sim = unit @ unit.T
    n = sim.shape[0]
    return ((sim.sum() - sim.diagonal().sum()) / (n * (n - 1))).item()


def measure(args) -> dict:
    task = get_task(args.task)
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    teacher = load_classifier(args.teacher, task).eval()
    student = (load_classifier(args.student, task) if args.student else build_student(teacher, args.student_layers, task)).eval()
    n, k = num_layers(teacher), num_layers(student)
    lmap = layer_map(args.strategy, n, k)
    train = data.subsample(glue_files.load_glue(task, args.glue_dir)["train"], args.batches * args.batch_size, seed=0)
    loader = data.make_loader(data.tokenize(train, tokenizer, args.max_seq_length), tokenizer, args.batch_size, train=True, seed=0)
    params = [p for p in student.parameters() if p.requires_grad]
    per_batch = []
    for batch in loader:
        inputs = model_inputs(teacher, batch)  # the student is of the teacher's family
        with torch.no_grad():
            t_out = teacher(**inputs, output_hidden_states=True)
        s_out = student(**inputs, output_hidden_states=True)
        token_index = data.real_token_index(batch["attention_mask"]) if args.pt_tokens == "all" else None
        s_rows = pt_rows(s_out.hidden_states, range(1, k), token_index)
        t_rows = pt_rows(t_out.hidden_states, lmap, token_index)
        # Each unweighted term alone, through the trainer's own loss: α=0 is the label term, α=1 the KD term.
        terms = {alpha: pkd_loss(s_out.logits, t_out.logits, batch["labels"], temperature=args.temperature, alpha=alpha,
                                 regression=task.regression).total for alpha in (0.0, 1.0)}
        ce, kd = terms[0.0], terms[1.0]
        pt = patient_loss(s_rows, t_rows, reduction=args.pt_reduction)
        per_batch.append({
            "ce_weighted": (1 - args.alpha) * ce.item(), "kd_weighted": args.alpha * kd.item(), "pt": pt.item(),
            "grad_ce_weighted": (1 - args.alpha) * _grad_norm(ce, params), "grad_kd_weighted": args.alpha * _grad_norm(kd, params),
            "grad_pt": _grad_norm(pt, params),
            "pair_cosine": [F.cosine_similarity(s.float(), t.float(), dim=-1).mean().item() for s, t in zip(s_rows, t_rows)],
            "teacher_cross_cosine": [_cross_cosine(t) for t in t_rows],
        })
    mean = {key: statistics.mean(b[key] for b in per_batch) for key in per_batch[0] if not isinstance(per_batch[0][key], list)}
    for key in ("pair_cosine", "teacher_cross_cosine"):
        mean[key] = [round(statistics.mean(b[key][i] for b in per_batch), 4) for i in range(len(lmap))]
    return {
        "task": task.name, "teacher": args.teacher, "student": args.student or f"fresh: teacher's first {k} layers",
        "strategy": args.strategy, "layer_map": list(lmap), "alpha": args.alpha, "temperature": args.temperature,
        "pt_tokens": args.pt_tokens, "pt_reduction": args.pt_reduction, "batches": len(per_batch), "batch_size": args.batch_size, "date": date.today().isoformat(),
        "mean": mean,
        "by_beta": {f"{beta:g}": {"pt_weighted": beta * mean["pt"], "grad_ratio_pt_to_kd": beta * mean["grad_pt"] / mean["grad_kd_weighted"]}
                    for beta in args.betas},
    }


def render_markdown(result: dict) -> str:
    m = result["mean"]
    lines = [
        f"**{result['task']}** PKD-{result['strategy']} (teacher layers {','.join(map(str, result['layer_map']))}, {result['pt_tokens']} tokens), student: "
        f"{result['student']}; α={result['alpha']:g}, T={result['temperature']:g}, PT reduction {result['pt_reduction']}; "
        f"{result['batches']} training batches of {result['batch_size']}, eval mode, {result['date']}.",
        "",
        f"- mapped pairs, student vs teacher cosine: {m['pair_cosine']}; teacher rows of different examples (or tokens), "
        f"mean cosine: {m['teacher_cross_cosine']}",
        f"- loss: (1-α)·CE {m['ce_weighted']:.4g}, α·KD {m['kd_weighted']:.4g}, PT (before β) {m['pt']:.3g}",
        f"- gradient norm on the student: (1-α)·CE {m['grad_ce_weighted']:.4g}, α·KD {m['grad_kd_weighted']:.4g}, PT (before β) {m['grad_pt']:.4g}",
        "",
        "| β | β·PT | β·‖∇PT‖ / ‖∇(α·KD)‖ |",
        "|---|---|---|",
    ]
    lines += [f"| {beta} | {r['pt_weighted']:.3g} | {r['grad_ratio_pt_to_kd']:.3g} |" for beta, r in result["by_beta"].items()]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), required=True)
    p.add_argument("--teacher", required=True, help="a teacher fine-tuned on --task")
    p.add_argument("--student", default=None, help="a trained student (default: fresh from the teacher's first --student-layers)")
    p.add_argument("--student-layers", type=int, default=3)
    p.add_argument("--strategy", choices=("skip", "last"), default="skip")
    p.add_argument("--alpha", type=float, default=0.7)
    p.add_argument("--temperature", type=float, default=10.0)
    p.add_argument("--betas", type=lambda s: [float(x) for x in s.split(",")], default=[10, 100, 500, 1000])
    p.add_argument("--pt-tokens", choices=("cls", "all"), default="cls", help="as train.py's: [CLS] only, or every real token")
    p.add_argument("--pt-reduction", choices=("elementwise_mean", "mean", "sum"), default="elementwise_mean")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--glue-dir", default=None, help="(default $GLUE_DIR; else the hub)")
    p.add_argument("--output", default=None, help="JSON path (default results/pt_signal_<task>_<strategy>_<pt-tokens>.json; .md beside it)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.glue_dir = args.glue_dir or os.environ.get("GLUE_DIR")
    torch.manual_seed(0)
    result = measure(args)
    out = Path(args.output or RESULTS / f"pt_signal_{args.task}_{args.strategy}_{args.pt_tokens}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(render_markdown(result) + "\n")
    print(render_markdown(result))
    return result


if __name__ == "__main__":
    main()
