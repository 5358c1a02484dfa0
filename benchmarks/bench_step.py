"""End-to-end training-step throughput (samples/s, tokens/s), peak memory, and the loss's share of the step,
for each loss implementation.

    python -m benchmarks.bench_step [--device cuda|cpu] [--quick]

A BERT-base-sized teacher (12 layers, hidden 768; random weights, which speed does not depend on) distils
into a 6-layer student on DeepSpeed ZeRO-2 in bf16 (ds_configs/zero2.json), seq 128, every token real,
through the trainer's own pieces: engine.student_engine / frozen_teacher, models.pt_rows, losses.pkd_loss,
with the recipe's default T, α, β and patient-loss reduction. Two cases:

  pkd-cls  PKD-Skip on a 2-class task: KD + CE on [B, 2] logits, patient loss on [CLS] of 5 layer pairs
  mlm-kd   BertForMaskedLM teacher and student: KD on all [B·S, 30522] logits + MLM CE on 15% of tokens,
           where the loss is a real share of the step

The loss's share is its forward+backward, timed alone on one step's own tensors, over the step's time.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, BertConfig

from benchmarks import harness
from benchmarks.bench_losses import INTERPRET_MAX_ROWS, VOCAB
from pkd_fast import engine as ds
from pkd_fast.config import ZERO2_DS_CONFIG, Config
from pkd_fast.losses import pkd_loss
from pkd_fast.models import build_student, layer_map, pt_rows
from pkd_fast.tasks import get_task

SEQ = 128
TEACHER_LAYERS, STUDENT_LAYERS = 12, 6
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
MLM_MASK_RATE = 0.15
RECIPE = {k: Config.__dataclass_fields__[k].default for k in ("temperature", "alpha", "beta", "pt_reduction")}

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
    vocab: int = VOCAB  # token ids are drawn from [1000, vocab)

    def bert_config(self, **kwargs) -> BertConfig:
        return BertConfig(vocab_size=self.vocab, num_hidden_layers=self.teacher_layers, hidden_size=self.hidden,
                          num_attention_heads=self.heads, intermediate_size=4 * self.hidden, **kwargs)  # fmt: skip


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

    def models(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(teacher, student) with random weights, the student built as the trainer builds it."""
        config = self.size.bert_config(num_labels=2)
        if self.mlm:
            teacher = AutoModelForMaskedLM.from_config(config, attn_implementation="sdpa")
            config.num_hidden_layers = self.size.student_layers
            return teacher, AutoModelForMaskedLM.from_config(config, attn_implementation="sdpa")
        teacher = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
        return teacher, build_student(teacher, self.size.student_layers, get_task("sst2"))

    def draw(self, micro_batch: int, device: torch.device):
        """A function of a generator giving one fresh batch."""
        seq, vocab = self.size.seq, self.size.vocab

        def one_batch(gen):
            ids = torch.randint(1000, vocab, (micro_batch, seq), generator=gen, device=device)
            if self.mlm:
                masked = torch.rand(ids.shape, generator=gen, device=device) < MLM_MASK_RATE
                labels = torch.where(masked, torch.randint(1000, vocab, ids.shape, generator=gen, device=device), -100)
            else:
                labels = torch.randint(0, 2, (micro_batch,), generator=gen, device=device)
            return ({"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids), "labels": labels},)

        return one_batch


CASES = {
    "pkd-cls": StepCase("pkd-cls", mlm=False, patient=True),
    "mlm-kd": StepCase("mlm-kd", mlm=True, patient=False),
}


def forward(student, teacher, batch: dict, case: StepCase):
    """Student and teacher outputs, hidden states only where the patient loss reads them (as in train.py)."""
    inputs = {k: batch[k] for k in INPUT_KEYS}
    hidden = bool(case.layer_map)
    s_out = student(**inputs, output_hidden_states=hidden)
    with torch.no_grad():
        t_out = teacher(**inputs, output_hidden_states=hidden)
    return s_out, t_out


def loss(case: StepCase, impl: str, s_logits, t_logits, labels, s_hidden, t_hidden) -> torch.Tensor:
    """The trainer's loss seam on one step's outputs: logits flattened to rows ([B·S, V] for MLM)."""
    s_rows = pt_rows(s_hidden, range(1, len(case.layer_map) + 1), None) if case.layer_map else []
    t_rows = pt_rows(t_hidden, case.layer_map, None) if case.layer_map else []
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    return pkd_loss(
        flat(s_logits), flat(t_logits), labels.reshape(-1), s_rows, t_rows,
        temperature=RECIPE["temperature"], alpha=RECIPE["alpha"], beta=RECIPE["beta"] if case.layer_map else 0.0,
        pt_reduction=RECIPE["pt_reduction"], impl=impl,
    ).total  # fmt: skip


def train_step(engine, teacher, case: StepCase, impl: str):
    """One optimizer step of the student on a batch (micro-batch = global batch: one process, no accumulation)."""

    def step(batch):
        s_out, t_out = forward(engine, teacher, batch, case)
        engine.backward(loss(case, impl, s_out.logits, t_out.logits, batch["labels"], s_out.hidden_states, t_out.hidden_states))
        engine.step()

    return step


def loss_alone(engine, teacher, case: StepCase, impl: str, batch: dict):
    """The loss's forward+backward on one step's own outputs, detached from the models, as a call."""
    with torch.no_grad():
        s_out, t_out = forward(engine, teacher, batch, case)
    s_logits = s_out.logits.detach().requires_grad_()
    s_hidden = [h.detach().requires_grad_() for h in s_out.hidden_states] if case.layer_map else None
    wrt = [s_logits, *(s_hidden[1 : len(case.layer_map) + 1] if case.layer_map else [])]

    def call():
        total = loss(case, impl, s_logits, t_out.logits, batch["labels"], s_hidden, t_out.hidden_states)
        return torch.autograd.grad(total, wrt)

    return call


def engines(case: StepCase, micro_batch: int, device: torch.device):
    """The student's ZeRO-2 bf16 engine and the frozen teacher. The JSON's micro-batch is the case's
    largest: DeepSpeed's step does not depend on it, so one engine serves every micro-batch."""
    config = ds.read_ds_config(str(ZERO2_DS_CONFIG))
    config.update(train_micro_batch_size_per_gpu=micro_batch, tensorboard={"enabled": False})
    config = ds.resolve_ds_config(
        config, lr=5e-5, total_steps=10**6, warmup_steps=100, tensorboard_dir=Path(tempfile.gettempdir())
    )
    teacher, student = case.models()
    return ds.student_engine(student, config), ds.frozen_teacher(teacher, config, device)


def skip_reason(case: StepCase, micro_batch: int, impl: str, device: torch.device) -> str | None:
    if impl == "triton" and harness.interpreted(device) and case.loss_rows(micro_batch) > INTERPRET_MAX_ROWS:
        return f"Triton interpreter (no GPU): run only up to {INTERPRET_MAX_ROWS} rows"
    return None


def measure(engine, teacher, case: StepCase, micro_batch: int, device: torch.device, quick: bool, impls=IMPLS,
            step_budget: harness.Budget | None = None) -> list[dict]:
    """Every loss impl (of `impls`) at one micro-batch: step time (impls taking turns on the CPU; `step_budget`,
    default STEP_BUDGET), throughput, peak memory, and the loss's own forward+backward. Failures (out of memory,
    say) are recorded, not raised."""
    seq = case.size.seq
    batches = harness.rotating(case.draw(micro_batch, device), 4 * micro_batch * seq * 8, device)  # 4 int64 [B, S] at most
    rows, steps = {}, {}
    for impl in impls:
        rows[impl] = {"case": case.name, "micro_batch": micro_batch, "seq": seq, "impl": impl,
                      "interpreter": impl == "triton" and harness.interpreted(device)}  # fmt: skip
        reason = skip_reason(case, micro_batch, impl, device)
        if reason:
            rows[impl]["skipped"] = reason
        else:
            steps[impl] = harness.cycling(train_step(engine, teacher, case, impl), batches)
    timings = harness.time_calls(steps, device, step_budget or STEP_BUDGET[device.type])
    # before the loss-alone calls below hold a step's outputs, which would count in the peak
    peaks = {impl: harness.peak_memory_mb(steps[impl], device)[0] for impl, t in timings.items() if isinstance(t, harness.Timing)}
    losses = harness.time_calls(
        {impl: loss_alone(engine, teacher, case, impl, batches[0][0]) for impl, t in timings.items() if isinstance(t, harness.Timing)},
        device, harness.budget(device, quick),
    )  # fmt: skip
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
        "student": f"{STUDENT_LAYERS} layers (pkd-cls: built from the teacher's lower layers by models.build_student)",
        "seq": SEQ,
        "deepspeed": f"{ZERO2_DS_CONFIG.name}: ZeRO-2, bf16, AdamW; one process",
        "recipe": RECIPE,
        "cases": {
            "pkd-cls": f"PKD-Skip, layer map {list(CASES['pkd-cls'].layer_map)}, 2 classes, patient loss on [CLS]",
            "mlm-kd": f"BertForMaskedLM, KD over all [B·S, {VOCAB}] logits + CE on {MLM_MASK_RATE:.0%} of tokens, no patient term",
        },
        "timing": "CUDA: device events (do_bench); CPU: host clock, the impls taking turns step by step; median after warm-up",
        "loss_share": "loss fwd+bwd timed alone on one step's outputs ÷ step time",
        "peak_mb": "CUDA only: max_memory_allocated during one step (weights, optimizer state and activations)",
    }


def measure_case(case: StepCase, micro_batches, device: torch.device, quick: bool, impls=IMPLS,
                 step_budget: harness.Budget | None = None) -> Iterator[list[dict]]:
    """`measure` at each micro-batch on one pair of engines, yielding each micro-batch's rows (printed), so a
    caller can save a run cut short; the engines are freed at the end."""
    ds.init_distributed()
    engine, teacher = engines(case, max(micro_batches), device)
    try:
        for micro_batch in micro_batches:
            rows = measure(engine, teacher, case, micro_batch, device, quick, impls, step_budget)
            for row in rows:
                print(_line(row), flush=True)
            yield rows
    finally:
        del engine, teacher
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
