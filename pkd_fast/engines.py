"""The two models DeepSpeed runs: the student's training engine, the frozen teacher (a plain module, or
ZeRO-3's inference engine), and the teacher's forward over a padded batch cut by length on a CPU. Its own
module because building and running engines is apart from checking their JSON and from saving what they
train (issue #29)."""

from __future__ import annotations

import torch
from transformers.modeling_outputs import SequenceClassifierOutput

from pkd_fast.deepspeed_json import train_dtype, zero_stage  # first: through pkd_fast.dist it names the CPU accelerator
import deepspeed  # noqa: E402,I001


def student_engine(model: torch.nn.Module, config: dict):
    """The student's DeepSpeed engine; the optimizer is the one the JSON names (ds_configs/cpu.json: torch's
    fused AdamW, on fp32 weights under bf16 autocast).

    On one rank without ZeRO there is nothing to reduce, yet DeepSpeed's backward still flattens every
    gradient into one buffer, all-reduces it with itself, scales it by 1/1 and copies it back: three passes
    over all gradients, 10% of a CPU step of the 3-layer MiniLM student (benchmarks/results/cpu_step.md).
    That pass is turned off there; ZeRO stages keep it, since their partitioned gradients go through it.
    """
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config
    )
    if engine.dp_world_size == 1 and zero_stage(config) == 0:
        engine.enable_backward_allreduce = False
    return engine


def frozen_teacher(model: torch.nn.Module, config: dict, device: torch.device) -> torch.nn.Module:
    """The teacher in eval mode, without grads, in the training dtype, outside any optimizer.

    ZeRO-1/2 replicate it as a plain module (a DeepSpeed engine without optimizer asserts there);
    ZeRO-3 partitions it with its own inference engine, so a teacher bigger than one GPU fits.
    """
    model.eval().requires_grad_(False)
    if zero_stage(config) < 3:
        return model.to(device=device, dtype=train_dtype(config))
    teacher_config = {
        key: config[key] for key in ("train_micro_batch_size_per_gpu", "bf16", "fp16") if key in config
    }
    teacher_config["zero_optimization"] = {"stage": 3}
    engine, *_ = deepspeed.initialize(model=model, config=teacher_config)
    engine.eval()
    return engine


# Rows per forward of the frozen teacher on a CPU (`teacher_forward`): 8 rows of SST-2 sorted by length
# keep its matmuls 100+ rows tall while a 32-row batch's padded positions fall from 43 to 21 per row.
TEACHER_ROWS_PER_FORWARD = 8


def teacher_forward(teacher: torch.nn.Module, inputs: dict, **kwargs):
    """The frozen classifier teacher's outputs for a padded training batch: `logits` [B, C] and, when
    asked, `hidden_states` [B, S, H] per layer, equal to `teacher(**inputs)`'s on every real token up to
    round-off (not on padding positions, which no loss reads).

    Why: a training batch is padded to its longest row, and SST-2's rows are short with a long tail (2,000
    rows: 13 real tokens each on average, 43 positions a row in random 32-row batches), so most of the
    teacher's work was padding. On a CPU its rows are run sorted by length in forwards of
    TEACHER_ROWS_PER_FORWARD rows, each cut to its own longest row. The teacher is in eval mode (no
    dropout, no random numbers drawn), so nothing else of the run changes; reading the lengths is no
    device sync there. A GPU (where small forwards cost launches), a ZeRO-3 teacher engine (each forward
    gathers parameters with every rank), a batch of one forward's rows and one padded on the left (a cut
    would drop its real tokens) run as one forward."""
    mask = inputs.get("attention_mask")
    if (mask is None or mask.device.type != "cpu" or isinstance(teacher, deepspeed.DeepSpeedEngine)
            or mask.shape[0] <= TEACHER_ROWS_PER_FORWARD):
        return teacher(**inputs, **kwargs)
    lengths = mask.sum(1)
    if not torch.equal(mask.cumprod(1).sum(1), lengths):  # some row's real tokens do not all lead it
        return teacher(**inputs, **kwargs)
    order = torch.argsort(lengths, stable=True)
    parts = []
    for chunk in order.split(TEACHER_ROWS_PER_FORWARD):
        width = int(lengths[chunk].max())
        parts.append(teacher(**{name: value[chunk, :width] for name, value in inputs.items()}, **kwargs))
    back = torch.argsort(order)  # row i of the batch is row back[i] of the sorted outputs
    logits = torch.cat([part.logits for part in parts])[back]
    hidden = None
    if parts[0].hidden_states is not None:
        positions = mask.shape[1]
        hidden = tuple(
            torch.cat([torch.nn.functional.pad(part.hidden_states[layer], (0, 0, 0, positions - part.hidden_states[layer].shape[1]))
                       for part in parts])[back]
            for layer in range(len(parts[0].hidden_states))
        )
    return SequenceClassifierOutput(logits=logits, hidden_states=hidden)
