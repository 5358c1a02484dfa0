"""DeepSpeed plumbing: process group, the resolved JSON config, the student engine, the frozen teacher,
checkpoints that survive a crash, and saving a model that `from_pretrained` loads."""

from __future__ import annotations

import contextlib
import inspect
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

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

# Without a GPU DeepSpeed picks the CPU itself, but first logs "Setting accelerator to CPU. If you have GPU
# ... we were unable to detect it." on every import, the first line of every run (real_accelerator.py).
# Naming the CPU, as its own check would find it, says the same in silence; its other warnings stay.
if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"

import deepspeed  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402
from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS, DtypeEnum, get_torch_autocast_dtype  # noqa: E402
from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: E402

from pkd_fast.errors import PkdError, write_failure  # noqa: E402

log = logging.getLogger("pkd_fast")
# --dist-timeout's default, in seconds: DeepSpeed's own for the world group, now for every group (torch gives
# the groups DeepSpeed makes later 30 minutes); it outlasts any collective of a healthy run.
DEFAULT_DIST_TIMEOUT_S = 600.0


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
        _unlink_own_shm_buffer()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    accel = get_accelerator()
    device = torch.device(accel.device_name(local_rank) if accel.device_name() != "cpu" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if device.type == "cpu":
        _share_cores()
    return Dist(dist.get_rank(), dist.get_world_size(), device)


SHM_DIR = Path("/dev/shm")


def shm_buffer(rank: int) -> Path:
    """The shared-memory segment DeepSpeed's CPU all-reduce makes for `rank` of this run
    (deepspeed/ops/csrc/cpu/comm/shm.cpp: <SHM_BUFFER_NAME>_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>)."""
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_{rank}"


def _unlink_own_shm_buffer() -> None:
    """DeepSpeed 0.19's CPU all-reduce gives each rank of a one-node group a 66 MB segment in RAM-backed
    /dev/shm (`shm_buffer`) and never unlinks it: every multi-rank CPU run, finished or killed, left 66 MB a
    rank behind (185 of them held 12 GB on one machine, and a later run was killed for memory). Each rank
    maps every peer's segment inside `deepspeed.init_distributed`; once a barrier shows all ranks are past
    it, each unlinks its own name. The mappings live on until the processes exit, so the all-reduce is
    unchanged, and nothing is left behind even after SIGKILL."""
    if get_accelerator().device_name() != "cpu":
        return
    if dist.get_world_size() > 1:  # (DeepSpeed makes the segments when LOCAL_SIZE == WORLD_SIZE, one rank included)
        dist.barrier()
    shm_buffer(dist.get_rank()).unlink(missing_ok=True)


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
# What `resolve_ds_config` writes over, and from what: a value the JSON sets there is replaced (and logged).
FILLED_BY_RUN = {
    ("optimizer", "lr"): "lr",
    ("scheduler", "warmup_max_lr"): "lr",
    ("scheduler", "warmup_num_steps"): "--warmup-ratio × the run's steps",
    ("scheduler", "total_num_steps"): "the run's steps",
}


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
    _check_values(config, path)
    return config


# Keys of optimizer.params that DeepSpeed reads itself and does not hand to the optimizer's constructor.
_DEEPSPEED_OPTIMIZER_KEYS = ("torch_adam", "adam_w_mode", "fp32_optimizer_states")
# What the run fills into a scheduler's params (resolve_ds_config): placeholders while the JSON is checked.
_RUN_FILLS_IN = {"warmup_num_steps": 10, "warmup_max_lr": 1e-3, "total_num_steps": 20}


def _check_values(config: dict, path: str) -> None:
    """Refuse, before any data is loaded, the values DeepSpeed would only trip over inside
    `deepspeed.initialize` (a traceback after minutes of work): the optimizer's name and params, checked against
    the constructor DeepSpeed would call, the scheduler's params likewise, the clipping norm, the autocast dtype,
    and every section DeepSpeed's own config parser validates (ZeRO's pydantic model among them), so keys that
    DeepSpeed learns later are checked too. Each message is one line: the file, the key path, what was expected."""
    clip = config.get("gradient_clipping", 0.0)
    if not _is_number(clip) or clip < 0:
        raise PkdError(f"{path}: gradient_clipping must be a number >= 0 (0: no clipping), got {json.dumps(clip)}")
    autocast = config.get("torch_autocast", {})
    if isinstance(autocast, dict) and "dtype" in autocast:
        names = [name for name in DtypeEnum._value2member_map_ if isinstance(name, str)]
        if autocast["dtype"] not in names:
            raise PkdError(f"{path}: torch_autocast.dtype must be a dtype name DeepSpeed knows ({', '.join(names)}), "
                           f"got {json.dumps(autocast['dtype'])}")
    optimizer = config["optimizer"]
    params = optimizer.get("params", {})
    if not isinstance(params, dict):
        raise PkdError(f"{path}: optimizer.params must be an object of the optimizer's arguments, got {json.dumps(params)}")
    constructor = _torch_optimizer(optimizer["type"], params, path)
    if constructor is not None:
        kwargs = {k: v for k, v in params.items() if k not in _DEEPSPEED_OPTIMIZER_KEYS}
        _check_arguments(constructor, kwargs, "optimizer.params", path)
        try:
            torch_optimizer = constructor([torch.nn.Parameter(torch.zeros(1))], **{"lr": 1e-3, **kwargs})
        except (TypeError, ValueError, RuntimeError, IndexError) as err:
            raise PkdError(f"{path}: optimizer.params: torch.optim.{constructor.__name__} refuses them ({err})") from None
        if config.get("scheduler"):
            _check_scheduler(config["scheduler"], torch_optimizer, path)
    _check_with_deepspeed(config, path)


def _torch_optimizer(name, params: dict, path: str):
    """The torch.optim class DeepSpeed builds for optimizer.type `name`, or None for DeepSpeed's own fused
    optimizers (FusedAdam, Lamb, Lion, mu-P, Muon: built from compiled ops, so not built here to check)."""
    lower = str(name).lower()
    if lower in ("adam", "adamw"):
        if not params.get("torch_adam"):
            return None
        adam_w = lower == "adamw" or params.get("adam_w_mode", True)
        return torch.optim.AdamW if adam_w else torch.optim.Adam
    if lower == "adagrad":
        return torch.optim.Adagrad
    if lower in DEEPSPEED_OPTIMIZERS:
        return None
    found = getattr(torch.optim, str(name), None)
    if not (isinstance(found, type) and issubclass(found, torch.optim.Optimizer)):
        known = sorted({"Adam", "AdamW", "Adagrad", "Lamb", "Lion"} | {
            n for n, c in vars(torch.optim).items() if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)
            and c is not torch.optim.Optimizer})
        raise PkdError(f"{path}: optimizer.type {json.dumps(name)} is neither a DeepSpeed optimizer nor one of torch.optim's "
                       f"({', '.join(known)})")
    return found


def _check_scheduler(scheduler: dict, optimizer: torch.optim.Optimizer, path: str) -> None:
    """The scheduler's params against its constructor, built on a throwaway optimizer with the values the run
    fills in; an unknown warmup_type, which DeepSpeed would replace by "log" with only a log line, is refused."""
    from deepspeed.runtime import lr_schedules

    params = scheduler.get("params", {})
    if not isinstance(params, dict):
        raise PkdError(f"{path}: scheduler.params must be an object of the scheduler's arguments, got {json.dumps(params)}")
    constructor = getattr(lr_schedules, scheduler["type"])
    _check_arguments(constructor, params, "scheduler.params", path)
    warmup_types = (lr_schedules.WARMUP_LOG_RATE, lr_schedules.WARMUP_LINEAR_RATE)
    if params.get("warmup_type", warmup_types[0]) not in warmup_types:
        raise PkdError(f"{path}: scheduler.params.warmup_type must be one of {', '.join(warmup_types)}, "
                       f"got {json.dumps(params['warmup_type'])}")
    filled = {k: v for k, v in _RUN_FILLS_IN.items() if k in inspect.signature(constructor).parameters}
    try:
        constructor(optimizer, **{**params, **filled})
    except (TypeError, ValueError, RuntimeError) as err:
        raise PkdError(f"{path}: scheduler.params: DeepSpeed's {scheduler['type']} refuses them ({err})") from None


def _check_arguments(constructor, given: dict, where: str, path: str) -> None:
    """Each of `given` against `constructor`'s signature: a name it takes, of the kind its default (or
    annotation) is: a number, true/false, a string, or a list as long as the default tuple."""
    parameters = inspect.signature(constructor).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    named = [n for n, p in parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD or p.kind is p.KEYWORD_ONLY]
    for key, value in given.items():
        if key not in parameters:
            if takes_any:
                continue
            raise PkdError(f"{path}: {where}.{key}: not an argument of {constructor.__name__} "
                           f"(it takes {', '.join(named[1:])})")
        default = parameters[key].default
        kind = parameters[key].annotation if default in (None, inspect.Parameter.empty) else type(default)
        if kind is bool:
            ok, expected = isinstance(value, bool), "true or false"
        elif kind in (int, float):
            ok, expected = _is_number(value), f"a number (like {json.dumps(default)})"
        elif kind is str:
            ok, expected = isinstance(value, str), "a string"
        elif kind is tuple:
            ok = isinstance(value, list) and len(value) == len(default) and all(map(_is_number, value))
            expected = f"{len(default)} numbers (like {json.dumps(list(default))})"
        else:
            continue
        if not ok:
            raise PkdError(f"{path}: {where}.{key} must be {expected}, got {json.dumps(value)}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_with_deepspeed(config: dict, path: str) -> None:
    """DeepSpeed's own config parser over the JSON (the batch layout left to `check_batch_layout`): its
    pydantic sections (zero_optimization, monitors, ...) refuse wrong types, unknown keys and values out of
    range. Its error becomes one line naming the key path; the path is found in the JSON by the failing
    key and value, since a section's model does not know its own name."""
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig({k: v for k, v in config.items() if k != "train_batch_size"})
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        where = _key_path(config, first["loc"], first.get("input")) or f"{err.title}.{'.'.join(map(str, first['loc']))}"
        got = f", got {json.dumps(first['input'], default=str)}" if "input" in first and first["type"] != "extra_forbidden" else ""
        raise PkdError(f"{path}: {where}: {first['msg']}{got}") from None
    except (ValueError, TypeError, AssertionError, KeyError) as err:
        raise PkdError(f"{path}: DeepSpeed refuses the config: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def _key_path(node, loc: tuple, value, prefix: str = "") -> str | None:
    """The dotted path in `node` that ends in the keys `loc` and holds `value` (the first found)."""
    if not isinstance(node, dict):
        return None
    here = node
    for key in loc:
        here = here.get(key, _MISSING) if isinstance(here, dict) else _MISSING
    if here is not _MISSING and here == value:
        return prefix + ".".join(map(str, loc))
    for key, child in node.items():
        found = _key_path(child, loc, value, f"{prefix}{key}.")
        if found:
            return found
    return None


_MISSING = object()


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


def replaced_settings(config: dict, lr: str) -> list[str]:
    """"key value → source" for each value of the JSON that `resolve_ds_config` writes over; `lr` says
    which flags set the learning rate."""
    out = []
    for (section, key), source in FILLED_BY_RUN.items():
        params = (config.get(section) or {}).get("params") or {}
        if key in params:
            out.append(f"{section}.params.{key} {json.dumps(params[key])} → {lr if source == 'lr' else source}")
    return out


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


def one_cpu_rank_config(config: dict, world: Dist) -> dict:
    """The JSON as one CPU rank runs it fastest with the same results (up to round-off), said in one log
    line: ZeRO-1/2 on fp32 weights become stage 0, and torch's AdamW is asked to be `fused` where the JSON
    leaves that open. The optimizer, scheduler, clipping and precision stay the JSON's; the run key holds
    what runs, so --resume refuses a checkpoint of the JSON's own stage rather than load it into another layout.

    Why: ZeRO-1/2 on one rank partition nothing, yet DeepSpeed still copies every gradient into its flat
    partition buffers and back each step, and torch's AdamW on CPU tensors makes a pass over memory per
    operation unless `fused` is given (its foreach/fused default is for CUDA tensors only). On a 2-core
    Intel Xeon shared with other jobs (2026-12-06), one thread, batch 32 × 64, the 3-layer MiniLM student's
    step as an AVX2 CPU runs zero2.json (fp32) took 1.36× the stage-0 fused step (1046 against 769 ms); in
    bf16, ZeRO-2's step took 1.19× the same with fused AdamW (interleaved runs, not committed as a result;
    benchmarks/results/cpu_step.md has the older per-setting table).
    16-bit weights keep their ZeRO stage: at stage 0 DeepSpeed 0.19.8 wraps them in FP16_UnfusedOptimizer,
    whose zero-gradient Adam step at start shifts Adam's bias correction (the first update 0.74× ZeRO's)
    and decays the weights once. Stage 3 (it decides how the teacher is held), offload (it names its own
    optimizer) and every multi-rank or GPU run keep the JSON as written."""
    zero = config.get("zero_optimization", {})
    offload = any((zero.get(key) or {}).get("device", "none") != "none" for key in ("offload_optimizer", "offload_param"))
    if world.world_size != 1 or world.device.type != "cpu" or zero_stage(config) == 3 or offload:
        return config
    config, changes = json.loads(json.dumps(config)), []
    sixteen_bit_weights = any((config.get(section) or {}).get("enabled") for section in ("bf16", "fp16"))
    if zero_stage(config) != 0 and not sixteen_bit_weights:
        changes.append(f"ZeRO stage {zero_stage(config)} → 0 (one rank has nothing to partition)")
        config["zero_optimization"] = {"stage": 0}
    optimizer = config["optimizer"]
    params = optimizer.setdefault("params", {})
    if str(optimizer["type"]).lower() in ("adam", "adamw") and params.get("torch_adam") and not {"fused", "foreach"} & set(params):
        changes.append("torch's AdamW fused (one pass over memory; unfused, one per operation)")
        params["fused"] = True
    if changes:
        log.info("one CPU rank: running %s; optimizer, scheduler, clipping and precision as the JSON says", ", ".join(changes))
    return config


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
MANIFEST = "manifest.json"  # a checkpoint's run key and the size of each of its files, written last of them


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
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(engine, directory: Path, step: int, rank: int, run_key: dict, *, rank_state: dict | None = None,
                    keep: int = 1) -> None:
    """Model, optimizer, scheduler (DeepSpeed's own format) plus each rank's RNG and `rank_state` (what
    else that rank needs to continue exactly, such as a streaming loader's position), so a resumed run
    draws the same dropout masks and data as an uninterrupted one. Per-rank state goes in a file of each
    rank's own: DeepSpeed's `client_state` is written by rank 0 only. Crash-safe: the step's files are all
    written first, then rank 0 writes the manifest (`run_key`, what the run's results depend on, and every
    file's size, so --resume finds a missing or truncated file and another run's checkpoint without loading
    anything) and publishes the checkpoint by replacing `latest` atomically, so a kill at any instant leaves
    the previous checkpoint resumable. Only then are checkpoints beyond the newest `keep` removed. A write
    that fails on any rank (a full disk) stops every rank with one line, the unpublished step removed."""
    tag = f"step{step}"
    step_dir = directory / tag
    failure = None
    try:
        engine.save_checkpoint(str(directory), tag=tag, client_state={"step": step}, save_latest=False)
        fault_point("ckpt-engine-saved", step)
        buffer = io.BytesIO()
        torch.save({**_rng_state(), "rank_state": rank_state or {}}, buffer)
        _write_atomic(step_dir / f"rng_rank{rank}.pt", buffer.getvalue())
    except (OSError, RuntimeError) as err:
        failure = _write_failure(step_dir, err)
    _stop_if_any_rank_failed(failure, step_dir, rank)  # every rank's files exist before the manifest lists them
    if rank == 0:
        try:
            # Not the manifest itself: a step saved again over a killed save's leftover would list the old
            # manifest's size, and --resume would then take this intact checkpoint for a damaged one.
            files = {str(f.relative_to(step_dir)): f.stat().st_size for f in sorted(step_dir.rglob("*"))
                     if f.is_file() and f.relative_to(step_dir) != Path(MANIFEST)}
            _write_atomic(step_dir / MANIFEST, json.dumps({"step": step, "run_key": run_key, "files": files}).encode())
        except OSError as err:
            failure = _write_failure(step_dir, err)
    fault_point("ckpt-files-written", step)
    if rank == 0 and failure is None:
        try:
            _write_atomic(directory / "latest", tag.encode())
        except OSError as err:
            failure = _write_failure(directory / "latest", err)
    _stop_if_any_rank_failed(failure, step_dir, rank)
    fault_point("ckpt-published", step)
    if rank == 0:
        prune_checkpoints(directory, keep)


def _write_failure(path: Path, err: BaseException) -> PkdError:
    """`err` as one line when it is a failed write (a full disk); re-raised as it is otherwise."""
    failure = write_failure(path, err)
    if failure is None:
        raise err
    return failure


def _stop_if_any_rank_failed(failure: PkdError | None, step_dir: Path, rank: int) -> None:
    """A barrier that also tells every rank whether any rank's write failed: then all stop with the first
    failure's line, and rank 0 removes the unpublished step so nothing half-written is left to resume from."""
    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, None if failure is None else str(failure))
    first = next((f for f in failures if f), None)
    if first:
        if rank == 0:
            shutil.rmtree(step_dir, ignore_errors=True)
        raise PkdError(f"{first}; the checkpoint {step_dir.name} was not saved (an earlier one, if any, is kept)")


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Remove all but the newest `keep` step checkpoints (by step number)."""
    steps = _step_dirs(directory)
    for old in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def _step_dirs(directory: Path) -> list[Path]:
    """The step checkpoints under `directory`, oldest first."""
    return sorted((d for d in directory.glob("step*") if d.name[4:].isdigit()), key=lambda d: int(d.name[4:]))


def remove_checkpoints(directory: Path) -> None:
    """Drop a finished run's checkpoints: unpublish first, so a kill mid-removal leaves nothing to resume."""
    (directory / "latest").unlink(missing_ok=True)
    shutil.rmtree(directory, ignore_errors=True)


def load_checkpoint(engine, directory: Path, rank: int, run_key: dict, added: dict | None = None) -> tuple[int, dict]:
    """Restore the newest intact checkpoint under `directory`: the optimizer step it was taken at and this
    rank's `rank_state`. That is the one `latest` names; when that one is damaged (a file deleted or cut short,
    `latest` unreadable) the newest whose files all match its manifest, said in one line; (0, {}) with a
    warning line when there is no checkpoint at all. A checkpoint of a run that differs from this one in
    anything its results depend on is refused by its manifest, before DeepSpeed loads a model that may not
    even have this one's shape (`added`: as `require_same_run`'s). Every rank reads the same files (one shared
    filesystem), so all pick the same."""
    tag = _intact_checkpoint(directory, rank)
    if tag is None:
        return 0, {}
    manifest = json.loads((directory / tag / MANIFEST).read_text())
    require_same_run(manifest["run_key"], run_key, "checkpoint", f"--resume {directory}: the checkpoint is of another run",
                     "resume with the same settings, or start a new --output-dir", added)
    path, client_state = engine.load_checkpoint(str(directory), tag=tag)
    if path is None:
        raise PkdError(f"{directory}/{tag}: DeepSpeed could not load the checkpoint; start a new --output-dir")
    state = torch.load(directory / tag / f"rng_rank{rank}.pt", weights_only=False)
    _set_rng_state(state)
    return int(client_state["step"]), state.get("rank_state", {})


def _intact_checkpoint(directory: Path, rank: int) -> str | None:
    """The tag to resume from (see `load_checkpoint`), None when there is no checkpoint; a damaged one with
    no intact one to fall back to is refused."""
    latest = directory / "latest"
    try:
        published = latest.read_bytes().decode("utf-8").strip()
        problem = _damage(directory / published) if published else "'latest' is empty"
    except FileNotFoundError:
        published, problem = None, "no checkpoint was published ('latest' is missing)"
    except (OSError, UnicodeDecodeError) as err:
        published, problem = None, f"'latest' is unreadable ({type(err).__name__})"
    if problem is None:
        return published
    candidates = [d for d in reversed(_step_dirs(directory)) if d.name != published]
    intact = next((d.name for d in candidates if _damage(d) is None), None)
    if intact is not None:
        if rank == 0:
            log.warning("--resume %s: %s; resuming from %s, the newest intact checkpoint", directory, problem, intact)
        return intact
    unfinished = f" ({', '.join(d.name for d in candidates)} unfinished or damaged)" if candidates else ""
    if not latest.exists():  # nothing was ever published: the first save, if any, did not finish
        if rank == 0:
            log.warning("--resume: no checkpoint under %s%s: starting at step 0", directory, unfinished)
        return None
    raise PkdError(f"--resume {directory}: {problem}, and no intact checkpoint to fall back to{unfinished}; "
                   "run without --resume to start again, or in a new --output-dir")


def _damage(step_dir: Path) -> str | None:
    """What is wrong with a step checkpoint by its manifest (a file missing or of another size than written),
    None when nothing is; reads no checkpoint file."""
    try:
        files = json.loads((step_dir / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        what = "is missing" if not step_dir.is_dir() else f"has no {MANIFEST} (a save that did not finish)"
        return f"{step_dir.name} {what}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{step_dir.name}/{MANIFEST} is damaged"
    for name, size in files.items():
        file = step_dir / name
        if not file.is_file():
            return f"{step_dir.name}/{name} is missing"
        if file.stat().st_size != size:
            return f"{step_dir.name}/{name} is {file.stat().st_size} bytes, not the {size} written"
    return None


def require_same_run(stored: dict, now: dict, stored_as: str, what: str, advice: str, added: dict | None = None) -> None:
    """Refuse when `stored` (a checkpoint's or a finished run's key) differs from this run's `now`, naming each
    differing key by its path (deepspeed_json.zero_optimization.stage, not the whole JSON). `added`: keys newer
    than some stored runs (config.ADDED_FLAGS), each with the values a stored key lacking it matches."""
    old, new = _flatten(stored), _flatten(now)
    for key, values in (added or {}).items():
        if key not in old and new.get(key, _MISSING) in values:
            old[key] = new[key]
    changed = sorted(k for k in set(old) | set(new) if old.get(k, _MISSING) != new.get(k, _MISSING))
    if changed:
        diffs = "; ".join(f"{k}: {stored_as} {old.get(k, '(none)')!r} ≠ now {new.get(k, '(none)')!r}" for k in changed)
        raise PkdError(f"{what} ({diffs}); {advice}")


def _flatten(key: dict, prefix: str = "") -> dict:
    flat = {}
    for name, value in key.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


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

