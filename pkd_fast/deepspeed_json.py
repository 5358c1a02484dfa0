"""The DeepSpeed JSON a run is given: read and checked before any data is loaded (one line naming the key
that DeepSpeed would only trip over inside `deepspeed.initialize`), the batch layout against the world size,
what the run fills in (lr, the schedule's length), the layout one CPU rank runs fastest, and the dtype the
forward computes in. Its own module because these are checks and rewrites of a file, which the engines,
the trainer and the benchmarks all read, apart from the process group and the engines (issue #29). Named
for the file rather than `ds_config`, the name the callers give the dict it returns."""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

import torch

from pkd_fast.dist import Dist  # first: it names the CPU accelerator before DeepSpeed is imported
from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS, DtypeEnum, get_torch_autocast_dtype  # noqa: E402,I001

from pkd_fast.errors import PkdError  # noqa: E402

log = logging.getLogger("pkd_fast")


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
