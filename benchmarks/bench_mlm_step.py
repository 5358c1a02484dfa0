"""One masked-LM PKD training step (`--objective mlm`'s student step): tokens/s, the loss's share of the
step and peak memory, for the LM heads run on the gathered rows only (what the recipe does) against full
[B, L, V] logits, for KL over the masked rows or every real token, and per loss implementation.

    python -m benchmarks.bench_mlm_step [--device cuda|cpu] [--quick]

The step is the trainer's own (`harness.trainer_step`) in the masked-LM recipe's context
(`recipes.mlm.MlmContext` over a random text corpus: its masking loader, student plan, step function with
the loss impl that --loss-impl names, loss units), a DeepSpeed ZeRO-2 student engine (`Trainer.engine`) and
a live teacher (`teacher.LiveTeacher`), both `models.MaskedLMRows`; the recipe's default T, α, β, PT over
every real token on the student's layers 1..k-1 against the teacher layers they were copied from. Random
weights (speed does not depend on them), BERT's 15% masking, every token real. "full" runs each model's own
head on all B·L positions and then selects the same rows (`FullOrGatheredHead`), so both variants compute
the same loss (checked before timing). The loss's share is the step's `pkd_loss` call timed alone on its
own inputs (`harness.loss_alone`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterator

import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

from benchmarks import harness
from benchmarks.bench_losses import VOCAB
from benchmarks.bench_step import LR, RECIPE, STEP_BUDGET
from pkd_fast import deepspeed_json
from pkd_fast.config import ZERO2_DS_CONFIG, default_teacher
from pkd_fast.dist import init_distributed
from pkd_fast.models import MaskedLMRows, build_mlm_student, mlm_student_layers
from pkd_fast import distill
from pkd_fast.distill import Distiller
from pkd_fast.recipes import mlm as mlm_recipe

MASK_RATE = mlm_recipe.OBJECTIVE.defaults["mlm_probability"]
# Model sizes and batch per device: BERT-base → 6 layers on a GPU; MiniLM-sized (6 × 384) → 3 on the CPU. The
# vocabulary is the tokenizer's (default_teacher's, bert-base-uncased's): the masker draws replacements from it.
SETUPS = {
    "cuda": {"teacher_layers": 12, "hidden": 768, "heads": 12, "micro_batch": 32, "seq": 128, "dtype": "bf16", "vocab": VOCAB},
    "cpu": {"teacher_layers": 6, "hidden": 384, "heads": 12, "micro_batch": 8, "seq": 64, "dtype": "fp32", "vocab": VOCAB},
}
# The smallest, for the GPU acceptance run's CPU dry run and the tests.
TINY = {**SETUPS["cpu"], "teacher_layers": 4, "hidden": 32, "heads": 2, "micro_batch": 2, "seq": 16}
HEADS = ("rows", "full")
KD_POSITIONS = ("masked", "all")
BATCHES_PER_EPOCH = 4  # the corpus's training blocks: enough that consecutive steps read other batches


def impls(device: torch.device) -> tuple[str, ...]:
    """The fused kernels only where they run as kernels (the CPU interpreter times nothing useful)."""
    return ("triton", "compile", "eager") if device.type == "cuda" else ("compile", "eager")


class FullOrGatheredHead(MaskedLMRows):
    """`MaskedLMRows` whose LM head runs either on the gathered rows only (the recipe's way) or, with `full`
    set, on all B·L positions, the rows then selected (the naive way): one model in one engine for both
    variants, so they are timed on the same weights and optimizer state."""

    full = False

    def forward(self, input_ids, attention_mask, token_type_ids=None, *, row_index, output_hidden_states=False):
        if not self.full:
            return super().forward(input_ids, attention_mask, token_type_ids, row_index=row_index,
                                   output_hidden_states=output_hidden_states)
        everything = torch.arange(input_ids.numel(), device=input_ids.device)
        logits, hidden = super().forward(input_ids, attention_mask, token_type_ids, row_index=everything,
                                         output_hidden_states=output_hidden_states)
        return logits.index_select(0, row_index), hidden


def models(setup: dict, layers: tuple[int, ...]) -> tuple[FullOrGatheredHead, FullOrGatheredHead]:
    """(teacher, student) with random weights, the student built from the teacher's `layers` as the recipe builds it."""
    config = BertConfig(vocab_size=setup["vocab"], num_hidden_layers=setup["teacher_layers"], hidden_size=setup["hidden"],
                        num_attention_heads=setup["heads"], intermediate_size=4 * setup["hidden"])
    teacher = BertForMaskedLM(config)
    return FullOrGatheredHead(teacher), FullOrGatheredHead(build_mlm_student(teacher, layers))


def ds_json(setup: dict) -> dict:
    config = deepspeed_json.read_ds_config(str(ZERO2_DS_CONFIG))
    config.update(train_micro_batch_size_per_gpu=setup["micro_batch"], tensorboard={"enabled": False},
                  bf16={"enabled": setup["dtype"] == "bf16"})
    return config


def measure(device: torch.device, setup: dict, kd_grid=KD_POSITIONS, impl_names=None, quick: bool = False,
            step_budget: harness.Budget | None = None) -> Iterator[dict]:
    """Both heads × `kd_grid` × `impl_names` (default: `impls(device)`) at `setup`, steps timed with `step_budget`
    (default STEP_BUDGET), yielding each row as it is measured (printed). First checks that the two heads give
    the same loss (AssertionError if not)."""
    world = init_distributed()
    tokenizer = AutoTokenizer.from_pretrained(default_teacher())
    if len(tokenizer) != setup["vocab"]:
        raise ValueError(f"setup vocab {setup['vocab']}: the masked-LM recipe's tokenizer has {len(tokenizer)} entries")
    with tempfile.TemporaryDirectory(prefix="bench_mlm_step_") as tmp:
        workdir = Path(tmp)

        def context(kd: str, impl: str) -> mlm_recipe.MlmContext:
            return harness.mlm_context(workdir, world, tokenizer, ds_json(setup), setup["seq"],
                                       BATCHES_PER_EPOCH * setup["micro_batch"], loss_impl=impl, kd_positions=kd)

        plan = context("all", "eager")
        layers, pt_map = plan.student_plan(setup["teacher_layers"])
        spec = mlm_recipe.MlmRun("student", LR, 1, workdir, layers, pt_map, plan.cfg.alpha, plan.cfg.beta)
        teacher, student = models(setup, layers)
        engine = plan.trainer.engine(student, LR, total_steps=10**6, out=workdir)
        # the recipe's step (`MlmContext.step_spec`) on a live teacher, around the switchable head
        distiller = Distiller(teacher, student, plan.step_spec(spec), ds_config=plan.ds_config, device=world.device)

        def on_head(head: str, call):
            def run():
                teacher.full = student.full = head == "full"
                return call()
            return run

        def step(ctx: mlm_recipe.MlmContext, head: str):
            at = distiller.replace(loss_impl=ctx.cfg.loss_impl, logit_rows=ctx.cfg.options.kd_positions)
            return on_head(head, harness.trainer_step(ctx.trainer, engine, at, ctx.train_loader(at), at.loss_units))

        engine.eval()  # no dropout: the two heads must give the same loss on the same batch
        with torch.no_grad():
            for kd in KD_POSITIONS:
                ctx = context(kd, "eager")
                at = distiller.replace(logit_rows=kd)
                batch, divisors = next(ctx.trainer.micro_batches(ctx.train_loader(at), at.loss_units))
                ref, full = (on_head(head, lambda: at(engine, batch, False, divisors).terms.total)()
                             for head in HEADS)
                torch.testing.assert_close(full, ref, rtol=1e-3 if setup["dtype"] == "fp32" else 2e-2, atol=1e-4)
        engine.train()
        for kd in kd_grid:
            for impl in impl_names or impls(device):
                ctx = context(kd, impl)
                steps = {head: step(ctx, head) for head in HEADS}
                timings = harness.time_calls(steps, device, step_budget or STEP_BUDGET[device.type])
                for head, timing in timings.items():
                    row = {"head": head, "kd_positions": kd, "impl": impl}
                    if not isinstance(timing, harness.Timing):
                        yield {**row, "error": harness.error_text(timing)}
                        continue
                    loss = harness.time_call(harness.loss_alone(steps[head], distill), device, harness.budget(device, quick))
                    tokens = setup["micro_batch"] * setup["seq"]
                    row = {**row, "step": timing.as_dict(), "tokens_per_s": harness.sig(tokens / timing.ms * 1e3),
                           "loss": loss.as_dict(), "loss_share": harness.sig(loss.ms / timing.ms),
                           "peak_mb": harness.peak_memory_mb(steps[head], device)[0]}
                    print(_line(row), flush=True)
                    yield row
        del engine, teacher, student, distiller
        if device.type == "cuda":
            torch.cuda.empty_cache()


def settings(setup: dict) -> dict:
    layers = mlm_student_layers("alternate", setup["teacher_layers"])
    return {**setup, "student_layers": list(layers), "pt_map": list(layers[:-1]), "recipe": RECIPE, "mask_rate": MASK_RATE,
            "deepspeed": f"{ZERO2_DS_CONFIG.name}: ZeRO-2, AdamW, one process, {setup['dtype']}",
            "step": "the trainer's own (harness.trainer_step) in the masked-LM recipe's MlmContext, a LiveTeacher",
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
