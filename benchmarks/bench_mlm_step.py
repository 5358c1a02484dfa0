"""One masked-LM PKD training step (`--objective mlm`'s student step): tokens/s, the loss's share of the
step and peak memory, for the LM heads run on the gathered rows only (what the recipe does) against full
[B, L, V] logits, for KL over the masked rows or every real token, and per loss implementation.

    python -m benchmarks.bench_mlm_step [--device cuda|cpu] [--quick]

The step is the recipe's: a DeepSpeed ZeRO-2 student engine (`engine.student_engine`) and a frozen teacher
(`engine.frozen_teacher`), both `models.MaskedLMRows`; `models.mlm_rows` → `models.pt_rows` →
`losses.pkd_loss` with the recipe's default T, α, β, PT over every real token on the student's layers
1..k-1 against the teacher layers they were copied from. Random weights (speed does not depend on them),
BERT's 15% masking, every token real. "full" runs each model's own head on all B·L positions and then
selects the same rows, so both variants compute the same loss (checked before timing).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterator

import torch
from transformers import BertConfig, BertForMaskedLM

from benchmarks import harness
from benchmarks.bench_losses import VOCAB
from benchmarks.bench_step import RECIPE, STEP_BUDGET
from pkd_fast import engine as ds
from pkd_fast.config import ZERO2_DS_CONFIG
from pkd_fast.data import real_token_index
from pkd_fast.losses import pkd_loss
from pkd_fast.models import MaskedLMRows, MlmRows, build_mlm_student, mlm_row_index, mlm_rows, mlm_student_layers, pt_rows

MASK_RATE = 0.15
# Model sizes and batch per device: BERT-base → 6 layers on a GPU; MiniLM-sized (6 × 384) → 3 on the CPU.
SETUPS = {
    "cuda": {"teacher_layers": 12, "hidden": 768, "heads": 12, "micro_batch": 32, "seq": 128, "dtype": "bf16", "vocab": VOCAB},
    "cpu": {"teacher_layers": 6, "hidden": 384, "heads": 12, "micro_batch": 8, "seq": 64, "dtype": "fp32", "vocab": VOCAB},
}
HEADS = ("rows", "full")
KD_POSITIONS = ("masked", "all")


def impls(device: torch.device) -> tuple[str, ...]:
    """The fused kernels only where they run as kernels (the CPU interpreter times nothing useful)."""
    return ("triton", "compile", "eager") if device.type == "cuda" else ("compile", "eager")


def models(setup: dict) -> tuple[BertForMaskedLM, BertForMaskedLM, tuple[int, ...]]:
    config = BertConfig(vocab_size=setup["vocab"], num_hidden_layers=setup["teacher_layers"], hidden_size=setup["hidden"],
                        num_attention_heads=setup["heads"], intermediate_size=4 * setup["hidden"])
    teacher = BertForMaskedLM(config)
    layers = mlm_student_layers("alternate", setup["teacher_layers"])
    return teacher, build_mlm_student(teacher, layers), layers


def engines(setup: dict, device: torch.device):
    config = ds.read_ds_config(str(ZERO2_DS_CONFIG))
    config.update(train_micro_batch_size_per_gpu=setup["micro_batch"], tensorboard={"enabled": False},
                  bf16={"enabled": setup["dtype"] == "bf16"})
    config = ds.resolve_ds_config(config, lr=5e-5, total_steps=10**6, warmup_steps=100, tensorboard_dir=Path(tempfile.gettempdir()))
    teacher, student, layers = models(setup)
    student_engine = ds.student_engine(MaskedLMRows(student), config)
    return student_engine, ds.frozen_teacher(MaskedLMRows(teacher), config, device), layers


def draw(setup: dict, device: torch.device):
    def one_batch(gen):
        shape = (setup["micro_batch"], setup["seq"])
        ids = torch.randint(1000, setup["vocab"], shape, generator=gen, device=device)
        masked = torch.rand(shape, generator=gen, device=device) < MASK_RATE
        masked[:, 0] = True  # every batch has masked rows
        return ({"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
                 "mlm_labels": torch.where(masked, ids, -100)},)

    return one_batch


def full_rows(student, teacher, batch: dict, rows: str) -> MlmRows:
    """`mlm_rows` the naive way: each model's head on every position ([B, L, V]), then the rows selected."""
    index = mlm_row_index(batch, rows)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    everything = torch.arange(batch["input_ids"].numel(), device=index.device)
    s_logits, s_hidden = student(**inputs, row_index=everything, output_hidden_states=True)
    with torch.no_grad():
        t_logits, t_hidden = teacher(**inputs, row_index=everything, output_hidden_states=True)
    labels = batch["mlm_labels"].flatten().index_select(0, index)
    return MlmRows(s_logits.index_select(0, index), t_logits.index_select(0, index), labels, index, s_hidden, t_hidden)


def terms(rows: MlmRows, batch: dict, layers: tuple[int, ...], impl: str):
    """The recipe's loss on one batch's rows (PT on every real token)."""
    token_index = real_token_index(batch["attention_mask"])
    pt_map = layers[:-1]
    s_rows = pt_rows(rows.student_hidden, range(1, len(pt_map) + 1), token_index)
    t_rows = pt_rows(rows.teacher_hidden, pt_map, token_index)
    return pkd_loss(rows.student_logits, rows.teacher_logits, rows.labels, s_rows, t_rows, temperature=RECIPE["temperature"],
                    alpha=RECIPE["alpha"], beta=RECIPE["beta"], pt_reduction=RECIPE["pt_reduction"], impl=impl).total


def forward_rows(engine, teacher, batch, head: str, kd: str) -> MlmRows:
    if head == "full":
        return full_rows(engine, teacher, batch, kd)
    return mlm_rows(engine, teacher, batch, rows=kd, output_hidden_states=True)


def train_step(engine, teacher, layers, head: str, kd: str, impl: str):
    def step(batch):
        engine.backward(terms(forward_rows(engine, teacher, batch, head, kd), batch, layers, impl))
        engine.step()

    return step


def loss_alone(engine, teacher, layers, head: str, kd: str, impl: str, batch: dict):
    """The loss's forward+backward on one step's own (detached) rows, as a call."""
    with torch.no_grad():
        rows = forward_rows(engine, teacher, batch, head, kd)
    rows.student_logits = rows.student_logits.detach().requires_grad_()
    rows.student_hidden = tuple(h.detach().requires_grad_() for h in rows.student_hidden)
    wrt = [rows.student_logits, *rows.student_hidden[1 : len(layers)]]
    return lambda: torch.autograd.grad(terms(rows, batch, layers, impl), wrt)


def measure(device: torch.device, setup: dict, kd_grid=KD_POSITIONS, impl_names=None, quick: bool = False,
            step_budget: harness.Budget | None = None) -> Iterator[dict]:
    """Both heads × `kd_grid` × `impl_names` (default: `impls(device)`) at `setup`, steps timed with `step_budget`
    (default STEP_BUDGET), yielding each row as it is measured (printed). First checks that the two heads give
    the same loss (AssertionError if not)."""
    ds.init_distributed()
    engine, teacher, layers = engines(setup, device)
    batches = harness.rotating(draw(setup, device), 4 * setup["micro_batch"] * setup["seq"] * 8, device)
    engine.eval()  # no dropout: the two heads must give the same loss on the same batch
    with torch.no_grad():
        for kd in KD_POSITIONS:
            ref, full = (terms(forward_rows(engine, teacher, batches[0][0], head, kd), batches[0][0], layers, "eager") for head in HEADS)
            torch.testing.assert_close(full, ref, rtol=1e-3 if setup["dtype"] == "fp32" else 2e-2, atol=1e-4)
    engine.train()
    for kd in kd_grid:
        for impl in impl_names or impls(device):
            steps = {head: harness.cycling(train_step(engine, teacher, layers, head, kd, impl), batches) for head in HEADS}
            timings = harness.time_calls(steps, device, step_budget or STEP_BUDGET[device.type])
            for head, step in timings.items():
                row = {"head": head, "kd_positions": kd, "impl": impl}
                if not isinstance(step, harness.Timing):
                    yield {**row, "error": harness.error_text(step)}
                    continue
                loss = harness.time_call(loss_alone(engine, teacher, layers, head, kd, impl, batches[0][0]), device,
                                         harness.budget(device, quick))
                tokens = setup["micro_batch"] * setup["seq"]
                row = {**row, "step": step.as_dict(), "tokens_per_s": harness.sig(tokens / step.ms * 1e3),
                       "loss": loss.as_dict(), "loss_share": harness.sig(loss.ms / step.ms),
                       "peak_mb": harness.peak_memory_mb(steps[head], device)[0]}
                print(_line(row), flush=True)
                yield row
    del engine, teacher
    if device.type == "cuda":
        torch.cuda.empty_cache()


def settings(setup: dict) -> dict:
    layers = mlm_student_layers("alternate", setup["teacher_layers"])
    return {**setup, "student_layers": list(layers), "pt_map": list(layers[:-1]), "recipe": RECIPE, "mask_rate": MASK_RATE,
            "deepspeed": f"{ZERO2_DS_CONFIG.name}: ZeRO-2, AdamW, one process, {setup['dtype']}",
            "timing": "host clock on the CPU (variants taking turns step by step), device events on CUDA; median after warm-up",
            "peak_mb": "CUDA only: max_memory_allocated during one step"}


def run(device: torch.device, quick: bool = False) -> dict:
    setup = SETUPS[device.type]
    rows = list(measure(device, setup, ("all",) if quick else KD_POSITIONS, quick=quick))
    results = harness.update_results(harness.RESULTS_DIR / f"mlm_step_{harness.device_slug(device)}.json", device,
                                     mlm_step_settings=settings(setup), mlm_step=rows)
    write_markdown(results, device)
    return results


def _line(row: dict) -> str:
    head = f"{row['head']:4} kd={row['kd_positions']:6} {row['impl']:7}"
    if "step" not in row:
        return f"{head} {row['error']}"
    return (f"{head} step {row['step']['ms']:9.1f} ms  {row['tokens_per_s']:9.0f} tokens/s  "
            f"loss {row['loss']['ms']:8.2f} ms ({row['loss_share']:.1%} of step)  peak {row['peak_mb']} MB")


def write_markdown(results: dict, device: torch.device) -> None:
    s, dev = results["mlm_step_settings"], results["device"]
    lines = [f"# Masked-LM PKD step on {dev.get('name', device.type)} ({dev.get('date', '')})", "",
             f"Teacher {s['teacher_layers']} layers × {s['hidden']} (random weights) → student layers {s['student_layers']}, "
             f"micro-batch {s['micro_batch']} × seq {s['seq']}, {s['deepspeed']}. `rows`: the LM heads on the gathered rows "
             "only (the recipe); `full`: on all B·L positions, then selected.", "", *table_lines(results["mlm_step"])]
    (harness.RESULTS_DIR / f"mlm_step_{harness.device_slug(device)}.md").write_text("\n".join(lines) + "\n")


def table_lines(rows: list[dict]) -> list[str]:
    """The rows as a markdown table, a failed variant with its error."""
    lines = ["| head | KL rows | loss impl | step ms | tokens/s | loss ms | loss share | peak MB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "step" not in r:
            lines.append(f"| {r['head']} | {r['kd_positions']} | {r['impl']} | {r['error']} | | | | |")
            continue
        lines.append(f"| {r['head']} | {r['kd_positions']} | {r['impl']} | {r['step']['ms']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['loss']['ms']:.2f} | {r['loss_share']:.1%} | {r['peak_mb'] if r['peak_mb'] is not None else '-'} |")
    return lines


def main(argv=None) -> None:
    args = harness.parser(__doc__, quick="KL over every real token only").parse_args(argv)
    run(harness.pick_device(args.device), args.quick)


if __name__ == "__main__":
    main()
