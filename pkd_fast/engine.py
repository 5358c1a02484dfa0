"""DeepSpeed plumbing: process group, the resolved JSON config, the student engine, the frozen teacher,
checkpoints that survive a crash, and saving a model that `from_pretrained` loads."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.config import get_torch_autocast_dtype

from pkd_fast.errors import PkdError


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> Dist:
    """Join the launcher's process group, or make a one-process group for a plain `python train.py`."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not dist.is_initialized():
        deepspeed.init_distributed(verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    accel = get_accelerator()
    device = torch.device(accel.device_name(local_rank) if accel.device_name() != "cpu" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if device.type == "cpu":
        _share_cores()
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def _share_cores() -> None:
    """Give each CPU rank its share of this node's cores. The launchers start every rank with torch's
    default of one thread per core, so 2 ranks on 2 cores ran 4 threads that kept preempting each other
    in every matmul: an FT step of 2 × 32 rows on cpu.json took 6.2 s of wall time against 0.55-0.61 s with
    a core each (2-core EPYC, 2026-11-30, interleaved runs). An explicit OMP_NUM_THREADS (or the
    launcher's --bind_cores_to_rank, which sets it) wins."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_ranks))


def _find_auto(node, path=""):
    if node == "auto":
        return path
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        found = _find_auto(value, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


def read_ds_config(path: str) -> dict:
    """The JSON as written, refusing the HF Trainer's "auto" values (nothing here fills them in)."""
    try:
        config = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise PkdError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    auto = _find_auto(config)
    if auto:
        raise PkdError(f"{path}: {auto} is \"auto\"; pkd_fast's DeepSpeed JSON files hold resolved values only")
    if "train_micro_batch_size_per_gpu" not in config:
        raise PkdError(f"{path}: train_micro_batch_size_per_gpu is required (the batch size comes from the JSON)")
    if config.get("torch_autocast", {}).get("enabled") and "dtype" not in config["torch_autocast"]:
        raise PkdError(f"{path}: torch_autocast.dtype is required (bfloat16 or float16): the frozen teacher runs in it")
    return config


def resolve_ds_config(config: dict, *, lr: float, total_steps: int, warmup_steps: int, tensorboard_dir: Path) -> dict:
    """A copy with what only the run knows filled in: the learning rate (--lr) and the schedule's length."""
    config = json.loads(json.dumps(config))
    config.setdefault("gradient_accumulation_steps", 1)
    if "optimizer" in config:
        config["optimizer"].setdefault("params", {})["lr"] = lr
    scheduler = config.get("scheduler")
    if scheduler and scheduler.get("type") in ("WarmupDecayLR", "WarmupLR", "WarmupCosineLR"):
        params = scheduler.setdefault("params", {})
        params.update(warmup_num_steps=max(1, warmup_steps), warmup_max_lr=lr)  # DeepSpeed refuses 0
        if scheduler["type"] != "WarmupLR":
            params["total_num_steps"] = max(total_steps, warmup_steps + 2)
    monitor = config.get("tensorboard")
    if monitor and monitor.get("enabled"):
        monitor.setdefault("output_path", str(tensorboard_dir))
        monitor.setdefault("job_name", "pkd")
    return config


def zero_stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def train_dtype(config: dict) -> torch.dtype:
    """The dtype the forward computes in: the frozen teacher is cast to it and the teacher cache stores it.
    Under torch_autocast the student keeps fp32 weights but its matmuls run in the autocast dtype, so the
    teacher, which needs no fp32 master copy, runs wholly in that dtype (3x faster than fp32 on a CPU)."""
    if config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if config.get("fp16", {}).get("enabled"):
        return torch.float16
    if config.get("torch_autocast", {}).get("enabled"):
        return get_torch_autocast_dtype(config)
    return torch.float32


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


# -- checkpoints ------------------------------------------------------------------------------------

def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, directory: Path, step: int, rank: int) -> None:
    """Model, optimizer, scheduler (DeepSpeed's own format) plus each rank's RNG, so a resumed run
    draws the same dropout masks as an uninterrupted one. Only the newest checkpoint is kept."""
    tag = f"step{step}"
    engine.save_checkpoint(str(directory), tag=tag, client_state={"step": step})
    torch.save(_rng_state(), directory / tag / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        for old in directory.glob("step*"):
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(engine, directory: Path, rank: int) -> int:
    """Restore the latest checkpoint under `directory`; the optimizer step it was taken at, or 0."""
    if not (directory / "latest").is_file():
        return 0
    path, client_state = engine.load_checkpoint(str(directory))
    if path is None:
        raise PkdError(f"{directory}: checkpoint named in 'latest' could not be loaded")
    _set_rng_state(torch.load(Path(path).parent / f"rng_rank{rank}.pt", weights_only=False))  # path: the model-states file
    return int(client_state["step"])


def save_pretrained(engine_or_module, path: Path, tokenizer, rank: int) -> None:
    """`save_pretrained` of the weights the run evaluated (gathered first under ZeRO-3)."""
    module = getattr(engine_or_module, "module", engine_or_module)
    params = list(module.parameters())
    partitioned = any(hasattr(p, "ds_id") for p in params)
    ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if partitioned else contextlib.nullcontext()
    with ctx:
        if rank == 0:
            module.save_pretrained(path, safe_serialization=True)
            tokenizer.save_pretrained(path)
    dist.barrier()

