"""DeepSpeed plumbing: process group, the resolved JSON config, the student engine, the frozen teacher,
checkpoints that survive a crash, and saving a model that `from_pretrained` loads."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.config import get_torch_autocast_dtype

from pkd_fast.config import DEFAULT_DIST_TIMEOUT_S
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


def init_distributed(timeout_s: float = DEFAULT_DIST_TIMEOUT_S) -> Dist:
    """Join the launcher's process group, or make a one-process group for a plain `python train.py`.

    `timeout_s` bounds the rendezvous and every collective: a peer that stops answering without closing its
    sockets (a frozen host, a dead link) ends the survivors' wait after that long. It must reach every group,
    not just the world's: DeepSpeed runs ZeRO's gradient reductions on its own clone of the world group, made
    by `new_group` without a timeout, which torch fills in from its module default (30 minutes), so that
    default is set too."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
        deepspeed.init_distributed(verbose=False, timeout=timeout)
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


def require_shared_directory(directory: Path, world: Dist, named: str, advice: str) -> None:
    """Refuse a directory that is not one filesystem for every rank (a node-local path given on several
    nodes), naming the ranks and hosts that cannot see rank 0's files; `named` is what the message calls it
    (e.g. the flag and its value). Rank 0 writes a file whose name is new to this call (so a file left on
    another node's disk cannot pass for it), and every rank looks for it."""
    if world.world_size == 1:
        return
    name = [f".ranks_see_this-{socket.gethostname()}-{os.getpid()}" if world.is_main else None]
    dist.broadcast_object_list(name, src=0)
    token = directory / name[0]
    if world.is_main:
        token.write_text("")
    dist.barrier()
    seen = [None] * world.world_size
    dist.all_gather_object(seen, (token.is_file(), socket.gethostname()))
    dist.barrier()
    if world.is_main:
        token.unlink()
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(seen) if not ok]
    if blind:
        raise PkdError(f"{named}: not on a filesystem shared by all ranks ({', '.join(blind)} cannot see "
                       f"rank 0's files); {advice}")


class OutputLock:
    """One run at a time per --output-dir. Two runs in one directory race on its checkpoints (one pruned
    the step the other was writing: FileNotFoundError in `_write_atomic`), so rank 0 of a run holds a lock
    file naming its host and pid (and the pid's start time, so a reused pid does not pass for the holder)
    until the run ends. A lock whose process is gone from this host is stale and taken over; one from
    another host cannot be checked and is refused, saying how to remove it."""

    NAME = ".pkd_fast.lock"

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def take(cls, directory: Path, world: Dist) -> OutputLock | None:
        """Rank 0 takes the lock (ranks of one run share it); every rank raises its refusal. Collective."""
        lock, refusal = None, [None]
        if world.is_main:
            try:
                lock = cls(directory / cls.NAME)
                lock._acquire(directory)
            except PkdError as err:
                lock, refusal = None, [str(err)]
        if world.world_size > 1:
            dist.broadcast_object_list(refusal, src=0)
        if refusal[0] is not None:
            raise PkdError(refusal[0])
        return lock

    def _acquire(self, directory: Path) -> None:
        me = _process_identity(os.getpid())
        while True:
            try:
                with open(self.path, "x") as f:
                    json.dump(me, f)
                return
            except FileExistsError:
                pass
            holder = self._holder()
            who = f"pid {holder.get('pid')} on host {holder.get('host')}"
            if holder.get("host") != me["host"]:
                raise PkdError(f"--output-dir {directory}: held by the run of {who} (lock file {self.path}); "
                               f"a run on another host cannot be checked from here: if it has ended, delete {self.path}")
            if _process_identity(holder.get("pid")) == holder:
                raise PkdError(f"--output-dir {directory}: a live run ({who}) is writing there; wait for it to end, "
                               "stop it, or give another --output-dir")
            stale = self.path.with_name(f"{self.NAME}.stale-{me['pid']}")
            try:
                os.replace(self.path, stale)  # atomic: of two runs taking over, one moves it and the other retries
            except FileNotFoundError:
                continue
            stale.unlink()
            logging.getLogger("pkd_fast").warning("--output-dir %s: took over the lock of %s, which is no longer running",
                                                  directory, who)

    def _holder(self) -> dict:
        """The lock's contents; a lock still being written (or damaged) reads as held by an unknown process."""
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            holder = None
        return holder if isinstance(holder, dict) else {"host": "an unknown host", "pid": "unknown"}

    def release(self) -> None:
        if self._holder() == _process_identity(os.getpid()):
            self.path.unlink(missing_ok=True)


def _process_identity(pid) -> dict | None:
    """{host, pid, started} of a process alive on this host, None when there is none. `started` (clock
    ticks after boot, from /proc) tells a reused pid from the process that held it."""
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    try:
        started = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        started = None
    return {"host": socket.gethostname(), "pid": pid, "started": started}


_BACKEND_SOURCE = re.compile(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*")  # gloo's "[.../pair.cc:537] " prefix
_PEER_ADDRESS = re.compile(r"\[([0-9A-Fa-f:.]+)\]:\d+")  # gloo names a peer as "[10.0.0.2]:30352"


def lost_peer_message(err: BaseException, rank: int, timeout_s: float) -> str | None:
    """One line for a collective that failed because another rank died or stopped answering (the backend's
    own error is a long traceback that ends in a source path), naming the peer where the backend names its
    address; None for any other error. Every node is then relaunched with --resume."""
    text = str(err).strip()
    if not (isinstance(err, dist.DistError) or "gloo" in text or "NCCL" in text):
        return None
    detail = _BACKEND_SOURCE.sub("", text.splitlines()[0] if text else type(err).__name__).split(". This is typically")[0]
    peer = _PEER_ADDRESS.search(detail)
    if "timed out" in detail.lower():
        what = f"a peer sent nothing for --dist-timeout {timeout_s:g} s (a frozen process or host, or a dead link)"
    elif peer:
        what = f"lost the connection to the peer at {peer.group(1)} (its process or host is gone)"
    else:
        what = "lost a peer"
    return (f"rank {rank}: {what}; backend: {detail}. Relaunch every node with --resume: it continues from the "
            "last checkpoint")


def _find_auto(node, path=""):
    if node == "auto":
        return path
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        found = _find_auto(value, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


SCHEDULERS = ("WarmupDecayLR", "WarmupLR", "WarmupCosineLR")  # the ones whose warmup/decay the run fills in


def read_ds_config(path: str) -> dict:
    """The JSON as written, checked for what a run needs (resolved values only: nothing here fills in the
    HF Trainer's "auto"). The batch layout's consistency with the world size is `check_batch_layout`'s."""
    try:
        config = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise PkdError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PkdError(f"{path}: cannot read ({err})") from None
    if not isinstance(config, dict):
        raise PkdError(f"{path}: expected a JSON object of DeepSpeed settings, got {type(config).__name__}")
    auto = _find_auto(config)
    if auto:
        raise PkdError(f"{path}: {auto} is \"auto\"; pkd_fast's DeepSpeed JSON files hold resolved values only")
    if "train_micro_batch_size_per_gpu" not in config:
        raise PkdError(f"{path}: train_micro_batch_size_per_gpu is required (the batch size comes from the JSON)")
    if config.get("torch_autocast", {}).get("enabled") and "dtype" not in config["torch_autocast"]:
        raise PkdError(f"{path}: torch_autocast.dtype is required (bfloat16 or float16): the frozen teacher runs in it")
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        value = config.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PkdError(f"{path}: {key} must be a positive integer, got {json.dumps(value)}")
    if not isinstance(config.get("optimizer"), dict) or "type" not in config["optimizer"]:
        raise PkdError(f'{path}: no "optimizer" with a "type"; the student trains with the optimizer the JSON names (e.g. AdamW)')
    if all(isinstance(config.get(k), dict) and config[k].get("enabled") for k in ("fp16", "bf16")):
        raise PkdError(f"{path}: fp16 and bf16 are both enabled; enable one (bf16 where the GPU has it)")
    scheduler = config.get("scheduler")
    if scheduler is not None and (not isinstance(scheduler, dict) or scheduler.get("type") not in SCHEDULERS):
        got = scheduler.get("type") if isinstance(scheduler, dict) else scheduler
        raise PkdError(f"{path}: scheduler {got!r}: the run fills in --lr and --warmup-ratio only for {', '.join(SCHEDULERS)} "
                       "(or drop the scheduler for a constant --lr)")
    return config


def check_batch_layout(config: dict, path: str, world_size: int) -> dict:
    """A copy whose gradient_accumulation_steps agrees with train_batch_size = micro-batch × accumulation ×
    world size (derived when only the global batch is given); a mismatch is refused, not adjusted."""
    config = dict(config)
    micro = config["train_micro_batch_size_per_gpu"]
    if "train_batch_size" in config:
        total = config["train_batch_size"]
        if "gradient_accumulation_steps" not in config:
            if total % (micro * world_size):
                raise PkdError(f"{path}: train_batch_size {total} is not a multiple of micro-batch {micro} × {world_size} rank(s)")
            config["gradient_accumulation_steps"] = total // (micro * world_size)
        accum = config["gradient_accumulation_steps"]
        if total != micro * accum * world_size:
            raise PkdError(f"{path}: train_batch_size {total} ≠ micro-batch {micro} × accumulation {accum} × "
                           f"{world_size} rank(s) = {micro * accum * world_size}")
    config.setdefault("gradient_accumulation_steps", 1)
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


# Fault injection for the tests of crash safety, signals and the non-finite guard: "PHASE@N" is met at the
# N-th pass of that phase on every rank; ":rankR" narrows it to one rank, ":SIGTERM" (any signal's name) sends
# that signal instead of SIGKILL, e.g. "step@3:rank1:SIGTERM".
FAULT_ENV = "PKD_FAST_FAULT"


def fault_here(phase: str, n: int) -> bool:
    """Whether PKD_FAST_FAULT names this phase, count and (when it names one) this process's rank."""
    spec = os.environ.get(FAULT_ENV)
    if spec is None:
        return False
    where, *options = spec.split(":")
    ranks = [o[4:] for o in options if o.startswith("rank")]
    return where == f"{phase}@{n}" and all(r == os.environ.get("RANK", "0") for r in ranks)


def fault_point(phase: str, n: int) -> None:
    """SIGKILL (or the signal PKD_FAST_FAULT names) this process here when it names this phase and count."""
    if fault_here(phase, n):
        name = next((o for o in os.environ[FAULT_ENV].split(":")[1:] if o.startswith("SIG")), "SIGKILL")
        os.kill(os.getpid(), signal.Signals[name])


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(engine, directory: Path, step: int, rank: int, run_key: dict, *, rank_state: dict | None = None,
                    keep: int = 1) -> None:
    """Model, optimizer, scheduler (DeepSpeed's own format) plus each rank's RNG and `rank_state` (what
    else that rank needs to continue exactly, such as a streaming loader's position), so a resumed run
    draws the same dropout masks and data as an uninterrupted one. Per-rank state goes in a file of each
    rank's own: DeepSpeed's `client_state` is written by rank 0 only. Crash-safe: the step's files are all
    written first and the checkpoint is published last, by rank 0 replacing `latest` atomically, so a kill
    at any instant leaves the previous checkpoint resumable. Only then are checkpoints beyond the newest
    `keep` removed. `run_key` is what the run's results depend on; `load_checkpoint` refuses to resume a
    run that differs in it."""
    tag = f"step{step}"
    engine.save_checkpoint(str(directory), tag=tag, client_state={"step": step, "run_key": run_key}, save_latest=False)
    fault_point("ckpt-engine-saved", step)
    buffer = io.BytesIO()
    torch.save({**_rng_state(), "rank_state": rank_state or {}}, buffer)
    _write_atomic(directory / tag / f"rng_rank{rank}.pt", buffer.getvalue())
    dist.barrier()  # every rank's files exist before the checkpoint is published
    fault_point("ckpt-files-written", step)
    if rank == 0:
        _write_atomic(directory / "latest", tag.encode())
    dist.barrier()
    fault_point("ckpt-published", step)
    if rank == 0:
        prune_checkpoints(directory, keep)


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Remove all but the newest `keep` step checkpoints (by step number)."""
    steps = sorted((d for d in directory.glob("step*") if d.name[4:].isdigit()), key=lambda d: int(d.name[4:]))
    for old in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def remove_checkpoints(directory: Path) -> None:
    """Drop a finished run's checkpoints: unpublish first, so a kill mid-removal leaves nothing to resume."""
    (directory / "latest").unlink(missing_ok=True)
    shutil.rmtree(directory, ignore_errors=True)


def load_checkpoint(engine, directory: Path, rank: int, run_key: dict) -> tuple[int, dict]:
    """Restore the checkpoint `latest` names: the optimizer step it was taken at and this rank's
    `rank_state`, or (0, {}) when there is none. Refuses a checkpoint of a run that differs from this one
    in anything its results depend on."""
    latest = directory / "latest"
    if not latest.is_file():
        return 0, {}
    tag = latest.read_text().strip()
    rng_file = directory / tag / f"rng_rank{rank}.pt"
    if not rng_file.is_file():
        raise PkdError(f"{directory}/{tag}: no {rng_file.name}; the checkpoint was written by another number of ranks "
                       "or is damaged: resume with the same ranks, or start a new --output-dir")
    path, client_state = engine.load_checkpoint(str(directory), tag=tag)
    if path is None:
        raise PkdError(f"{directory}/{tag}: the checkpoint named in 'latest' could not be loaded")
    stored = client_state.get("run_key", {})
    changed = sorted(k for k in set(stored) | set(run_key) if stored.get(k) != run_key.get(k))
    if changed:
        diffs = "; ".join(f"{k}: checkpoint {stored.get(k)!r} ≠ now {run_key.get(k)!r}" for k in changed)
        raise PkdError(f"--resume {directory}: the checkpoint is of another run ({diffs}); "
                       "resume with the same settings, or start a new --output-dir")
    state = torch.load(rng_file, weights_only=False)
    _set_rng_state(state)
    return int(client_state["step"]), state.get("rank_state", {})


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

