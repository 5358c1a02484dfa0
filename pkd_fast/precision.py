"""The precision a run computes in, chosen from what the hardware really does (`--precision`).

The DeepSpeed JSON asks for a precision through its `bf16`, `fp16` and `torch_autocast` sections. `--precision
auto` keeps that ask where the hardware computes it natively and otherwise runs the nearest precision it does,
so one JSON serves every machine: bf16 on a GPU without bf16 becomes fp16 with dynamic loss scaling, and bf16
on a CPU that only emulates it becomes fp32. Emulated bf16 is not a little slower but tens of times slower: on
an AVX2-only CPU (most cloud VMs) a 2048×384×1536 matmul took 222 ms in bf16 against 37 ms in fp32, and a
bf16 teacher step 20-31 s instead of 0.3 s (issue #19). An explicit `--precision` wins, with a one-line notice where it
asks for emulated bf16; fp16 on a CPU is refused unless DeepSpeed's CPU accelerator supports it.

Whether a CPU computes bf16 natively is asked of oneDNN and then measured, because neither flag can be
trusted alone. Measured on this project's AVX-512 EPYC (2 cores shared with other jobs, load 8-10,
2026-12-02), bf16 time ÷ fp32 time of the probe (one thread, 32×256×512, fastest of 4; timed even where
oneDNN says False, for this table) and of a 256×384×1536 matmul on 2 threads (fastest of 5, lighter load):

    environment                            ATen capability  oneDNN bf16  probe       256×384×1536
    (none)                                 AVX512           True         0.39-0.47   0.23 (0.68 vs 2.9 ms)
    ONEDNN_MAX_CPU_ISA=AVX2                AVX512           False        27-42       -
    ATEN_CPU_CAPABILITY=avx2               AVX2             True         0.42-0.48   -
    both (an AVX2-only CPU's behaviour)    AVX2             False        16-28       34 (123 vs 3.6 ms)

The capability string says AVX512 where bf16 is emulated and AVX2 where it is native: it is recorded, not
trusted. oneDNN's flag was right on this box, but a flag is a claim (an ISA cap can leave it True on a CPU
whose matmuls then emulate), so a flag that says True is confirmed by the timing.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pkd_fast.errors import PkdError

log = logging.getLogger("pkd_fast")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# bf16 counts as native when a bf16 matmul takes at most this multiple of the fp32 one. Native bf16 measured
# 0.23-0.48× and emulated 16-42× (table above): 2 sits 4× above the one and 8× below the other, so a shared
# machine's noise does not flip the call, and bf16 at more than 2× the fp32 time costs more than its halved
# memory traffic can save.
BF16_SLOWDOWN_LIMIT = 2.0
_PROBE_SHAPE = (32, 256, 512)  # one thread: fp32 0.1 ms, native bf16 0.04 ms, emulated bf16 7.6 ms
_PROBE_REPS = 4
# Native is not the same as faster: on an AVX-512 Xeon the probe's bf16 matmul took 0.97-1.001× the fp32 time and
# the README's main command ran faster in fp32 (issue #33). So where bf16 is native on a CPU, --precision auto
# also times the run's own step in both precisions (`probe_run_step`) and keeps bf16 only where it is at least
# this much faster.
BF16_MIN_SPEEDUP = 1.10
_RUN_PROBE_REPS = 2
RUN_PROBE_CACHE = "precision_probe.json"  # under pkd_cache_dir(): one entry per machine and step shape
# Dynamic loss scaling for fp16 where the JSON gives no fp16 section of its own (ds_configs/zero2_fp16.json).
_FP16_DEFAULTS = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                  "hysteresis": 2, "min_loss_scale": 1}


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # what runs: fp32 | bf16 | fp16
    reason: str  # why, in words
    asked: str | None  # what --precision or the DeepSpeed JSON asked for; None: nothing was asked
    notice: str | None = None  # one line for the log where what runs is not what was asked, or is emulated


@dataclass(frozen=True)
class CpuBf16Probe:
    """What this CPU says and does about bf16: the ATen capability, oneDNN's flag, and a timed matmul."""

    capability: str
    mkldnn_bf16: bool
    slowdown: float | None  # bf16 time ÷ fp32 time of the probe matmul; None where oneDNN has no bf16 (not timed)

    @property
    def native(self) -> bool:
        return self.mkldnn_bf16 and self.slowdown is not None and self.slowdown <= BF16_SLOWDOWN_LIMIT

    def describe(self) -> str:
        timed = f"a bf16 matmul took {self.slowdown:.2f}× the fp32 time" if self.slowdown is not None else "not timed"
        return f"ATen capability {self.capability}, oneDNN bf16 {self.mkldnn_bf16}, {timed}"


@functools.cache
def probe_cpu_bf16() -> CpuBf16Probe:
    """Once per process: oneDNN's bf16 flag, confirmed by the fastest of a few bf16 and fp32 matmuls taken in
    turns on one thread (about 10 ms where bf16 is native, 40 ms where it is emulated). One thread, because a
    multi-threaded call waits for its slowest thread: on the shared 2-core box at load 8, the fastest of five
    2-thread fp32 calls was inflated up to 50×, which swung the ratio from 0.013 to 2.2, while one-thread
    minima held (table above). Where oneDNN reports no bf16, torch has only its emulating fallback, so
    nothing is timed."""
    capability = torch.backends.cpu.get_cpu_capability()
    flag = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if not flag:
        return CpuBf16Probe(capability, flag, None)
    m, k, n = _PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    pairs = {torch.float32: (a, b), torch.bfloat16: (a.bfloat16(), b.bfloat16())}
    best = {dtype: float("inf") for dtype in pairs}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for rep in range(_PROBE_REPS + 1):  # the first round warms up (oneDNN builds its kernels): not counted
            for dtype, (x, y) in pairs.items():
                t0 = time.perf_counter()
                torch.mm(x, y)
                if rep:
                    best[dtype] = min(best[dtype], time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return CpuBf16Probe(capability, flag, best[torch.bfloat16] / best[torch.float32])


@dataclass(frozen=True)
class RunProbe:
    """One step of the run's own shapes timed in fp32 and under bf16 (fastest milliseconds): the student's
    forward and backward and the frozen teacher's forward at the run's micro-batch and sequence length."""

    fp32_ms: float
    bf16_ms: float

    @property
    def bf16_faster(self) -> bool:
        return self.fp32_ms >= BF16_MIN_SPEEDUP * self.bf16_ms - 1e-9  # exactly 10% counts (float rounding aside)

    def describe(self) -> str:
        return f"a step of this run's shapes took {self.bf16_ms:.0f} ms in bf16, {self.fp32_ms:.0f} ms in fp32"


def pkd_cache_dir() -> Path:
    """Where pkd_fast keeps what it measured about this machine: $PKD_FAST_CACHE, else ~/.cache/pkd_fast."""
    return Path(os.environ.get("PKD_FAST_CACHE") or Path.home() / ".cache" / "pkd_fast")


def probe_run_step(teacher_config, student_config, micro_batch: int, seq_len: int) -> RunProbe:
    """`RunProbe` for these models (random weights from their configs: only the shapes matter) at
    micro_batch × seq_len, the precisions taking turns after a warm-up round, on the run's threads. Kept per
    machine (CPU model, capability, threads, torch) and shape in `RUN_PROBE_CACHE`, so a machine measures a
    shape once (about a second for the README's main command); an unreadable cache file is measured again."""
    from transformers import AutoModel

    from pkd_fast.families import attention_kwargs

    key = json.dumps([cpu_model(), torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), torch.__version__,
                      _shape(teacher_config), _shape(student_config), micro_batch, seq_len])
    path = pkd_cache_dir() / RUN_PROBE_CACHE
    try:
        known = json.loads(path.read_text())
    except FileNotFoundError:
        known = {}
    except (OSError, ValueError) as err:  # a damaged cache is measured again, and says so
        log.warning("%s: unreadable (%s); timing this run's step again and rewriting it", path, err)
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), dict):
        try:
            return RunProbe(float(known[key]["fp32_ms"]), float(known[key]["bf16_ms"]))
        except (KeyError, TypeError, ValueError):
            pass
    with torch.random.fork_rng():
        torch.manual_seed(0)
        student = AutoModel.from_config(student_config, **attention_kwargs(student_config)).train()
        teachers = {dtype: AutoModel.from_config(teacher_config, **attention_kwargs(teacher_config)).eval().to(dtype)
                    for dtype in (torch.float32, torch.bfloat16)}
        ids = torch.randint(5, min(teacher_config.vocab_size, student_config.vocab_size), (micro_batch, seq_len))
    mask = torch.ones_like(ids)

    def step(dtype: torch.dtype) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            teachers[dtype](input_ids=ids, attention_mask=mask)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = student(input_ids=ids, attention_mask=mask).last_hidden_state.float().square().mean()
        loss.backward()
        student.zero_grad(set_to_none=True)
        return (time.perf_counter() - t0) * 1e3

    times = {torch.float32: [], torch.bfloat16: []}
    for rep in range(_RUN_PROBE_REPS + 1):  # the first round warms up (oneDNN builds its kernels): not counted
        for dtype in times:
            took = step(dtype)
            if rep:
                times[dtype].append(took)
    probe = RunProbe(*(round(min(t), 1) for t in times.values()))  # the fastest: what the step costs without other load
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        known = known if isinstance(known, dict) else {}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**known, key: dataclasses.asdict(probe)}, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # measured again next time
    return probe


def _shape(config) -> list:
    return [config.model_type, config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            getattr(config, "intermediate_size", None), config.vocab_size]


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what the platform says."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    return model.group(1).strip() if model else platform.processor() or "cpu"


def describe_device(device: torch.device | str | None = None) -> dict:
    """The device a run computes on and whether it computes bf16 natively (default device: CUDA where there
    is one). `name` is the GPU's name or the CPU's model; `cpu_capability` is the host's either way."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = {"kind": device.type, "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        # including_emulation=False: before compute capability 8.0 torch only emulates bf16
        return {**info, "name": gpu, "gpu": gpu, "bf16_native": bool(torch.cuda.is_bf16_supported(including_emulation=False))}
    probe = probe_cpu_bf16()
    return {**info, "name": info["cpu"], "gpu": None, "cpu_capability": probe.capability, "bf16_native": probe.native,
            "mkldnn_bf16": probe.mkldnn_bf16,
            "bf16_slowdown": None if probe.slowdown is None else round(probe.slowdown, 3)}


def json_precision(ds_config: dict) -> str:
    """The precision the DeepSpeed JSON asks for, named as --precision names it."""
    from pkd_fast.deepspeed_json import train_dtype  # it imports DeepSpeed: only the callers that pass a JSON need it

    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[train_dtype(ds_config)]


def cpu_fp16_supported() -> bool:
    """Whether DeepSpeed's CPU accelerator trains in fp16 here (it asks oneDNN; on CPUs without AVX512-FP16 or
    AMX-FP16 `deepspeed.initialize` refuses fp16 with "Type fp16 is not supported on your device")."""
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    return bool(CPU_Accelerator().is_fp16_supported())


def resolve_precision(requested: str, device: torch.device, ds_config: dict | None = None, *,
                      hardware: dict | None = None) -> PrecisionChoice:
    """What runs for `--precision requested` on `device` under `ds_config` (None: nothing asked, so auto picks
    the fastest native precision). `hardware` is `describe_device(device)`, or what every rank agrees on."""
    if requested not in PRECISIONS:
        raise PkdError(f"--precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    hardware = hardware or describe_device(device)
    gpu = device.type == "cuda"
    where = f"this GPU ({hardware['name']})" if gpu else f"this CPU ({_cpu_detail(hardware)})"
    no_fp16 = f"DeepSpeed's CPU accelerator has no fp16 on this CPU ({hardware['name']})"
    if requested == "fp16" and not gpu and not cpu_fp16_supported():
        raise PkdError(f"--precision fp16: {no_fp16}; use --precision auto, bf16 or fp32")
    if requested != "auto":
        notice = None
        if requested == "bf16" and not hardware["bf16_native"]:
            notice = (f"precision: --precision bf16 asks for bf16; running bf16 although {where} emulates it, many "
                      "times slower than fp32 (--precision auto would run " + ("fp16" if gpu else "fp32") + ")")
        return PrecisionChoice(requested, f"--precision {requested}", requested, notice)

    asked = json_precision(ds_config) if ds_config is not None else None
    wanted = asked or "bf16"  # nothing asked: the fastest precision that is native here
    runs, why = wanted, f"{where} computes {wanted} natively" if wanted != "fp32" else "the DeepSpeed JSON asks for fp32"
    force = f"--precision {asked} forces {asked}"
    run_probe = hardware.get("bf16_run_probe")
    if wanted == "bf16" and not hardware["bf16_native"]:
        runs = "fp16" if gpu else "fp32"
        why = f"{where} has no native bf16" + (", so fp16 with dynamic loss scaling" if gpu else ", only a slow emulation")
    elif wanted == "bf16" and not gpu and run_probe is not None:
        probe = RunProbe(**run_probe)
        if probe.bf16_faster:
            why = f"{why}, and {probe.describe()}"
        else:
            runs = "fp32"
            why = (f"{where} computes bf16 natively but not faster here: {probe.describe()} (bf16 runs where it saves "
                   f"at least {BF16_MIN_SPEEDUP - 1:.0%})")
    elif wanted == "fp16" and not gpu and not cpu_fp16_supported():
        runs, why, force = "fp32", no_fp16, "fp16 cannot be forced here"
    notice = None
    if asked is not None and runs != asked:
        notice = f"precision: the DeepSpeed JSON asks for {asked}; running {runs}: {why}; {force}"
    return PrecisionChoice(runs, why, asked, notice)


def _cpu_detail(hardware: dict) -> str:
    slowdown = hardware.get("bf16_slowdown")
    timed = f", a bf16 matmul took {slowdown:g}× the fp32 time" if slowdown is not None else ""
    return f"ATen capability {hardware['cpu_capability']}, oneDNN bf16 {hardware.get('mkldnn_bf16')}{timed}"


def apply_precision(ds_config: dict, choice: PrecisionChoice) -> dict:
    """A copy of the JSON whose precision sections run `choice`, in the form the JSON uses: fp32 weights under
    `torch_autocast` where it enables that (ds_configs/cpu.json; on a CPU a step at a plain loop's cost), else
    DeepSpeed's `bf16` / `fp16` sections (16-bit weights with fp32 master copies). fp16 gets dynamic loss
    scaling (unless the JSON's own `fp16` section sets a static loss_scale): DeepSpeed 0.19.8 gives
    torch_autocast a GradScaler only without ZeRO, so under ZeRO fp16 uses the `fp16` section. Sections that
    are not chosen are kept, disabled."""
    config = copy.deepcopy(ds_config)
    stage = int(config.get("zero_optimization", {}).get("stage", 0))
    autocast_form = bool(config.get("torch_autocast", {}).get("enabled"))
    if choice.precision == "fp16" and stage > 0:
        autocast_form = False
    for section in ("bf16", "fp16", "torch_autocast"):
        if isinstance(config.get(section), dict):
            config[section]["enabled"] = False
    if choice.precision == "fp32":
        return config
    if autocast_form:
        config["torch_autocast"].update(enabled=True, dtype="bfloat16" if choice.precision == "bf16" else "float16")
    elif choice.precision == "bf16":
        config.setdefault("bf16", {})["enabled"] = True
    else:
        config["fp16"] = {**_FP16_DEFAULTS, **config.get("fp16", {}), "enabled": True}
    return config
