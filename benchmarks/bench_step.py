"""End-to-end training-step throughput (samples/s, tokens/s), peak memory, and the loss's share of the step,
for each loss implementation.

    python -m benchmarks.bench_step [--device cuda|cpu] [--quick]

A BERT-base-sized teacher (12 layers, hidden 768; random weights, which speed does not depend on) distils
into a 6-layer student on DeepSpeed ZeRO-2 in bf16 (ds_configs/zero2.json), seq 128, every token real. A
step is the trainer's own (`harness.trainer_step`: the recipe context's training loader, its step function
with the loss impl that --loss-impl names, `Trainer.train_micro_batch`: the non-finite guard's look,
`engine.backward`, `engine.step`), with the recipe's default T, α, β and patient-loss reduction, the teacher
a `teacher.LiveTeacher`. Two cases:

  pkd-cls  the GLUE recipe's PKD-Skip on a 2-class task (random rows): KD + CE on [B, 2] logits, patient
           loss on [CLS] of 5 layer pairs
  mlm-kd   the masked-LM recipe (random text) with --kd-positions all and β = 0: KD on all [B·S, 30522]
           logits + MLM CE on 15% of tokens, where the loss is a real share of the step

The loss's share is its forward+backward, timed alone on the inputs of the `pkd_loss` call a step made
(`harness.loss_alone`), over the step's time.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer, BertConfig

from benchmarks import harness
from benchmarks.bench_losses import INTERPRET_MAX_ROWS, VOCAB
from pkd_fast import deepspeed_json
from pkd_fast.config import ZERO2_DS_CONFIG, Config, default_teacher
from pkd_fast import distill
from pkd_fast.dist import Dist, init_distributed
from pkd_fast.distill import Distiller
from pkd_fast.models import MaskedLMRows, build_mlm_student, build_student, layer_map
from pkd_fast.recipes import glue as glue_recipe
from pkd_fast.recipes import mlm as mlm_recipe
from pkd_fast.tasks import get_task

SEQ = 128
TEACHER_LAYERS, STUDENT_LAYERS = 12, 6
RECIPE = {k: Config.__dataclass_fields__[k].default for k in ("temperature", "alpha", "beta", "pt_reduction")}
TASK = get_task("sst2")
MLM_MASK_RATE = mlm_recipe.OBJECTIVE.defaults["mlm_probability"]
LR = 5e-5
BATCHES_PER_EPOCH = 4  # the loaders' rows: enough that consecutive steps read other batches

# case → micro-batches per grid
GRIDS = {
    "cuda": {"pkd-cls": (32, 64, 128, 256), "mlm-kd": (16, 32, 64)},
    "cuda-quick": {"pkd-cls": (64,), "mlm-kd": (32,)},
    "cpu": {"pkd-cls": (8, 16), "mlm-kd": (4,)},
    "cpu-quick": {"pkd-cls": (8,), "mlm-kd": (4,)},
}
IMPLS = ("triton", "compile", "eager")
# A step takes seconds on the CPU: there, three timed steps after one warm-up step (optimizer state, compile).
STEP_BUDGET = {
    "cuda": harness.Budget(warmup_ms=0, rep_ms=1000, min_reps=10, warmup_calls=3),
    "cpu": harness.Budget(warmup_ms=0, rep_ms=0, min_reps=3, warmup_calls=1),
}


@dataclass(frozen=True)
class ModelSize:
    """Teacher and student sizes: BERT-base → 6 layers by default; the GPU acceptance run's CPU dry run
    shrinks them so that a step takes milliseconds."""

    teacher_layers: int = TEACHER_LAYERS
    student_layers: int = STUDENT_LAYERS
    hidden: int = 768
    heads: int = 12
    seq: int = SEQ
    vocab: int = VOCAB  # pkd-cls: token ids are drawn from [1000, vocab); mlm-kd reads the tokenizer's text (VOCAB)

    def bert_config(self, **kwargs) -> BertConfig:
        return BertConfig(vocab_size=self.vocab, num_hidden_layers=self.teacher_layers, hidden_size=self.hidden,
                          num_attention_heads=self.heads, intermediate_size=4 * self.hidden, **kwargs)  # fmt: skip


# The smallest models, for the GPU acceptance run's CPU dry run and the tests: a step takes milliseconds.
TINY = ModelSize(teacher_layers=4, student_layers=2, hidden=32, heads=2, seq=16, vocab=1100)


def ds_json(micro_batch: int) -> dict:
    config = deepspeed_json.read_ds_config(str(ZERO2_DS_CONFIG))
    config.update(train_micro_batch_size_per_gpu=micro_batch, tensorboard={"enabled": False})
    return config


@dataclass
class TrainerSteps:
    """One case's student engine and live teacher, shared by every micro-batch and loss impl (DeepSpeed's
    step does not depend on them): `step(micro_batch, impl)` is the trainer's step at that micro-batch with
    that loss impl; `recipe` the module whose step calls the loss (`pkd_fast.distill`: `harness.loss_alone` records that call)."""

    step: Callable[[int, str], Callable[[], object]]
    recipe: ModuleType


@dataclass(frozen=True)
class StepCase:
    name: str
    mlm: bool
    patient: bool  # PKD-Skip's patient term on [CLS]; False: none
    size: ModelSize = ModelSize()

    @property
    def layer_map(self) -> tuple[int, ...]:
        """Teacher layers the patient loss reads; () for no patient term."""
        return layer_map("skip", self.size.teacher_layers, self.size.student_layers) if self.patient else ()

    def loss_rows(self, micro_batch: int) -> int:
        """Rows of logits the KD term reads (what decides whether the interpreter can run it)."""
        return micro_batch * self.size.seq if self.mlm else micro_batch

    def trainer_steps(self, workdir: Path, world: Dist, max_micro_batch: int) -> TrainerSteps:
        """The case's models (random weights) in the recipe's context, the engine's JSON at the largest
        micro-batch; files (the teacher, the corpus) under `workdir`."""
        return (self._mlm if self.mlm else self._glue)(workdir, world, max_micro_batch, AutoTokenizer.from_pretrained(default_teacher()))

    def _glue(self, workdir: Path, world: Dist, max_micro_batch: int, tokenizer) -> TrainerSteps:
        """PKD-Skip in the GLUE recipe's `Context`: the teacher is saved for its `Distiller` to load."""
        teacher = AutoModelForSequenceClassification.from_config(self.size.bert_config(num_labels=TASK.num_labels), attn_implementation="sdpa")
        teacher.save_pretrained(workdir / "teacher")
        tokenizer.save_pretrained(workdir / "teacher")
        student = build_student(teacher, self.size.student_layers, TASK)
        del teacher
        cfg = Config(teacher=str(workdir / "teacher"), max_seq_length=self.size.seq, output_dir=str(workdir))
        rows = harness.token_rows(BATCHES_PER_EPOCH * max_micro_batch, self.size.seq, self.size.vocab, tokenizer)
        spec = glue_recipe.Run(self.name, "skip", self.layer_map, cfg.alpha, cfg.beta if self.layer_map else 0.0, LR, 1, workdir)

        def context(micro_batch: int) -> glue_recipe.Context:
            return glue_recipe.Context(cfg, TASK, world, ds_json(micro_batch), tokenizer, rows, {})

        largest = context(max_micro_batch)
        engine = largest.trainer.engine(student, LR, total_steps=10**6, out=workdir)
        distiller = largest.distiller(engine.module, spec)

        def step(micro_batch: int, impl: str):
            ctx, at_impl = context(micro_batch), distiller.replace(loss_impl=impl)
            return harness.trainer_step(ctx.trainer, engine, at_impl, ctx.train_loader(at_impl))

        return TrainerSteps(step, distill)

    def _mlm(self, workdir: Path, world: Dist, max_micro_batch: int, tokenizer) -> TrainerSteps:
        """The masked-LM recipe's `MlmContext` with β = 0 and KL over every real token: its student plan,
        its step spec, its Distiller."""
        flags = {"kd_positions": "all", "beta": 0.0, "student_layers": self.size.student_layers}

        def context(micro_batch: int, impl: str = "auto") -> mlm_recipe.MlmContext:
            return harness.mlm_context(workdir, world, tokenizer, ds_json(micro_batch), self.size.seq,
                                       BATCHES_PER_EPOCH * max_micro_batch, loss_impl=impl, **flags)

        largest = context(max_micro_batch)
        config = replace(self.size, vocab=len(tokenizer)).bert_config()  # the masker draws replacements from the tokenizer
        teacher = AutoModelForMaskedLM.from_config(config, attn_implementation="sdpa")
        layers, pt_map = largest.student_plan(self.size.teacher_layers)
        spec = mlm_recipe.MlmRun(self.name, LR, 1, workdir, layers, pt_map, largest.cfg.alpha, largest.cfg.beta)
        engine = largest.trainer.engine(MaskedLMRows(build_mlm_student(teacher, layers)), LR, total_steps=10**6, out=workdir)
        distiller = Distiller(teacher, engine.module, largest.step_spec(spec), ds_config=largest.ds_config, device=world.device)

        def step(micro_batch: int, impl: str):
            ctx, at_impl = context(micro_batch, impl), distiller.replace(loss_impl=impl)
            return harness.trainer_step(ctx.trainer, engine, at_impl, ctx.train_loader(at_impl), at_impl.loss_units)

        return TrainerSteps(step, distill)


CASES = {
    "pkd-cls": StepCase("pkd-cls", mlm=False, patient=True),
    "mlm-kd": StepCase("mlm-kd", mlm=True, patient=False),
}


def skip_reason(case: StepCase, micro_batch: int, impl: str, device: torch.device) -> str | None:
    if impl == "triton" and harness.interpreted(device) and case.loss_rows(micro_batch) > INTERPRET_MAX_ROWS:
        return f"Triton interpreter (no GPU): run only up to {INTERPRET_MAX_ROWS} rows"
    return None


def measure(steps: TrainerSteps, case: StepCase, micro_batch: int, device: torch.device, quick: bool, impls=IMPLS,
            step_budget: harness.Budget | None = None) -> list[dict]:
    """Every loss impl (of `impls`) at one micro-batch: step time (impls taking turns on the CPU; `step_budget`,
    default STEP_BUDGET), throughput, peak memory, and the loss's own forward+backward. Failures (out of memory,
    say) are recorded, not raised."""
    seq = case.size.seq
    rows, calls = {}, {}
    for impl in impls:
        rows[impl] = {"case": case.name, "micro_batch": micro_batch, "seq": seq, "impl": impl,
                      "interpreter": impl == "triton" and harness.interpreted(device)}  # fmt: skip
        reason = skip_reason(case, micro_batch, impl, device)
        if reason:
            rows[impl]["skipped"] = reason
        else:
            calls[impl] = steps.step(micro_batch, impl)
    timings = harness.time_calls(calls, device, step_budget or STEP_BUDGET[device.type])
    timed = [impl for impl, t in timings.items() if isinstance(t, harness.Timing)]
    # before the loss-alone calls below hold a step's outputs, which would count in the peak
    peaks = {impl: harness.peak_memory_mb(calls[impl], device)[0] for impl in timed}
    losses = harness.time_calls({impl: harness.loss_alone(calls[impl], steps.recipe) for impl in timed}, device,
                                harness.budget(device, quick))
    for impl, step in timings.items():
        row, loss_time = rows[impl], losses.get(impl)
        if not isinstance(step, harness.Timing) or not isinstance(loss_time, harness.Timing):
            row["error"] = harness.error_text(step if isinstance(step, Exception) else loss_time)
            continue
        row.update(
            step=step.as_dict(),
            samples_per_s=harness.sig(micro_batch / step.ms * 1e3),
            tokens_per_s=harness.sig(micro_batch * seq / step.ms * 1e3),
            peak_mb=peaks[impl],
            loss=loss_time.as_dict(),
            loss_share=harness.sig(loss_time.ms / step.ms),
        )
    return list(rows.values())


def _line(row: dict) -> str:
    head = f"{row['case']:8} B={row['micro_batch']:<4} {row['impl']:8}"
    if "step" not in row:
        return f"{head} {row.get('skipped') or row.get('error')}"
    return (
        f"{head} step {row['step']['ms']:10.2f} ms  {row['samples_per_s']:9.1f} samples/s  "
        f"{row['tokens_per_s']:10.0f} tokens/s  loss {row['loss']['ms']:9.3f} ms ({row['loss_share']:.1%} of step)"
    )


def settings() -> dict:
    return {
        "teacher": f"BERT-base-sized, {TEACHER_LAYERS} layers, hidden 768, random weights",
        "student": f"{STUDENT_LAYERS} layers (pkd-cls: the teacher's lower layers by models.build_student; mlm-kd: every "
                   "other teacher layer, the masked-LM recipe's plan)",
        "seq": SEQ,
        "deepspeed": f"{ZERO2_DS_CONFIG.name}: ZeRO-2, bf16, AdamW; one process",
        "recipe": RECIPE,
        "step": "the trainer's own (harness.trainer_step): the recipe's loader and step function, Trainer.train_micro_batch",
        "cases": {
            "pkd-cls": f"GLUE recipe, PKD-Skip, layer map {list(CASES['pkd-cls'].layer_map)}, 2 classes, patient loss on [CLS]",
            "mlm-kd": f"masked-LM recipe, --kd-positions all: KD over all [B·S, {VOCAB}] logits + CE on {MLM_MASK_RATE:.0%} of "
                      "tokens, β = 0 (no patient term)",
        },
        "timing": "CUDA: device events (do_bench); CPU: host clock, the impls taking turns step by step; median after warm-up",
        "loss_share": "the step's pkd_loss call, fwd+bwd timed alone on its own inputs ÷ step time",
        "peak_mb": "CUDA only: max_memory_allocated during one step (weights, optimizer state and activations)",
    }


def measure_case(case: StepCase, micro_batches, device: torch.device, quick: bool, impls=IMPLS,
                 step_budget: harness.Budget | None = None) -> Iterator[list[dict]]:
    """`measure` at each micro-batch on one pair of models, yielding each micro-batch's rows (printed), so a
    caller can save a run cut short; the models and their files are freed at the end."""
    world = init_distributed()
    with tempfile.TemporaryDirectory(prefix=f"bench_step_{case.name}_") as tmp:
        steps = case.trainer_steps(Path(tmp), world, max(micro_batches))
        try:
            for micro_batch in micro_batches:
                rows = measure(steps, case, micro_batch, device, quick, impls, step_budget)
                for row in rows:
                    print(_line(row), flush=True)
                yield rows
        finally:
            del steps
            if device.type == "cuda":
                torch.cuda.empty_cache()


def run(device: torch.device, quick: bool = False, path=None) -> dict:
    path = path or harness.results_path(device)
    rows: list[dict] = []
    for name, micro_batches in GRIDS[device.type + ("-quick" if quick else "")].items():
        for batch_rows in measure_case(CASES[name], micro_batches, device, quick):
            rows += batch_rows
            harness.update_results(path, device, step_settings=settings(), step=rows)
    return harness.update_results(path, device, step_settings=settings(), step=rows)


def main(argv=None) -> None:
    args = harness.parser(__doc__, quick="one micro-batch per case").parse_args(argv)
    run(harness.pick_device(args.device), args.quick)


if __name__ == "__main__":
    main()
