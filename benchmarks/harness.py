"""The one harness every benchmark times through: warm-up, median of many repetitions, rotating fresh
inputs, peak memory, copy bandwidth, and the results file.

On CUDA a repetition is timed with device events by `triton.testing.do_bench`, which also flushes the L2
cache before each one; on the CPU with the host clock around each call. Inputs rotate among enough
random sets (never zeros) to exceed the last-level cache, so a repetition never finds the previous
repetition's data cached.
"""

from __future__ import annotations

import argparse

import datetime as dt
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence
from unittest import mock

import torch

from pkd_fast.precision import cpu_model, describe_device

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# The kinds of CPU a run can land on. `avx2` holds oneDNN and ATen to AVX2 on any x86 box, which is what
# most cloud VMs and laptops are: no native bf16, so bf16 matmuls are emulated there.
CPU_KINDS = {"native": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}
MAX_SETS = 64  # tiny shapes would need thousands of sets to exceed the cache; they are latency-bound anyway


@dataclass(frozen=True)
class Budget:
    """How long to warm up and to repeat, per measurement."""

    warmup_ms: float
    rep_ms: float
    min_reps: int
    warmup_calls: int = 1  # at least this many untimed calls (a training step needs 2: optimizer state, compile)


FULL = {"cuda": Budget(warmup_ms=25, rep_ms=100, min_reps=10), "cpu": Budget(warmup_ms=100, rep_ms=600, min_reps=5)}
QUICK = {"cuda": Budget(warmup_ms=10, rep_ms=50, min_reps=5), "cpu": Budget(warmup_ms=50, rep_ms=300, min_reps=3)}


def budget(device: torch.device, quick: bool) -> Budget:
    return (QUICK if quick else FULL)[device.type]


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: the median and the 20th/80th percentiles of `reps` repetitions."""

    ms: float
    p20: float
    p80: float
    reps: int

    def as_dict(self) -> dict:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


# -- the device --------------------------------------------------------------------------------------


def parser(doc: str, quick: str | None = None) -> argparse.ArgumentParser:
    """A device benchmark's command line: its docstring's first paragraph, --device, and --quick when the
    benchmark has a shorter form (`quick` says what it is); each adds the rest."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when there is one")
    if quick is not None:
        p.add_argument("--quick", action="store_true", help=quick)
    return p


def pick_device(name: str | None) -> torch.device:
    """`--device` as given, else CUDA when there is one."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if device.type not in ("cuda", "cpu"):
        raise SystemExit(f"--device {name}: only cuda and cpu are supported")
    return device


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def device_slug(device: torch.device) -> str:
    """The results file's stem: "cpu", or the GPU's name in lower case ("nvidia-h100-80gb-hbm3")."""
    if device.type == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def cache_bytes(device: torch.device) -> int:
    """Size of the last-level cache: the GPU's L2, or the CPU's largest cache level."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    sizes = [_parse_size(_read(p)) for p in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size")]
    return max(sizes, default=32 << 20)


def _read(path) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _parse_size(text: str) -> int:
    match = re.match(r"\s*(\d+)\s*([KMG]?)", text)
    if not match:
        return 0
    return int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2)]


def interpreted(device: torch.device) -> bool:
    """Triton code runs under its CPU interpreter here: its timings are not kernel speed."""
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def describe(device: torch.device) -> dict:
    """What the results were measured on: device (with the CPU's capability and whether the device computes
    bf16 natively, pkd_fast.precision), versions, date."""

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    hardware = describe_device(device)
    info = {
        "name": device_name(device),
        "slug": device_slug(device),
        "type": device.type,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **{dist: version(dist) for dist in ("triton", "transformers", "deepspeed", "liger-kernel")},
        "last_level_cache_mb": round(cache_bytes(device) / 2**20, 1),
        "triton_interpreter": interpreted(device),
        "cpu_capability": hardware["cpu_capability"],
        "bf16_native": hardware["bf16_native"],
    }
    if device.type == "cpu":
        info["threads"] = torch.get_num_threads()
    return info


def cpu_kind_device(kind: str) -> dict:
    """What a process held to CPU `kind` sees (capability, bf16 check, what `--precision auto` runs): the
    variables act only before torch starts, so a child process reads it."""
    code = ("import json, torch; from pkd_fast.precision import describe_device, resolve_precision; "
            "d = describe_device('cpu'); d['auto_precision'] = resolve_precision('auto', torch.device('cpu')).precision; "
            "print(json.dumps(d))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **CPU_KINDS[kind]}, capture_output=True,
                         text=True, check=True)
    return {"cpu_kind": kind, **json.loads(out.stdout.strip().splitlines()[-1])}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- inputs ------------------------------------------------------------------------------------------


def rotating(make: Callable[[torch.Generator], Any], set_bytes: int, device: torch.device, seed: int = 0) -> list:
    """Enough fresh random input sets (2 to MAX_SETS) that cycling through them spans twice the last-level
    cache; `make(generator)` draws one set on `device`."""
    n_sets = max(2, min(MAX_SETS, math.ceil(2 * cache_bytes(device) / max(1, set_bytes))))
    gen = torch.Generator(device=device).manual_seed(seed)
    return [make(gen) for _ in range(n_sets)]


def cycling(fn: Callable, sets: Sequence[tuple]) -> Callable[[], Any]:
    """A no-argument call of `fn` on the next input set, round robin."""
    it = itertools.cycle(sets)
    return lambda: fn(*next(it))


def leaves(x) -> list[torch.Tensor]:
    """The tensors in `x`: a tensor or a (nested) sequence of them."""
    if isinstance(x, torch.Tensor):
        return [x]
    return [t for item in x for t in leaves(item)]


# -- timing ------------------------------------------------------------------------------------------


def time_calls(calls: dict[str, Callable[[], Any]], device: torch.device, b: Budget) -> dict[str, Timing | Exception]:
    """Median time of each no-argument call over at least `b.min_reps` repetitions after warm-up.

    CUDA: one call after another through do_bench (device events, the L2 flushed before each
    repetition). CPU: the calls take turns, one repetition each per round, so a shared machine's load
    drifts onto all of them alike and their ratios hold. A call that raises is dropped and its exception
    returned in its place (without its traceback, whose frames would keep the call's tensors alive), so one
    contender running out of memory does not lose the others' numbers.
    """
    results: dict[str, Timing | Exception] = {}
    live = {}
    for name, call in calls.items():
        try:
            _warm_up(call, device, b)
            live[name] = call
        except Exception as err:  # noqa: BLE001 — handed back to the caller, which records it
            results[name] = err.with_traceback(None)
    if device.type == "cuda":
        for name, call in live.items():
            try:
                results[name] = _do_bench(call, device, b)
            except Exception as err:  # noqa: BLE001
                results[name] = err.with_traceback(None)
        return {name: results[name] for name in calls}
    times: dict[str, list[float]] = {name: [] for name in live}
    while live:
        for name, call in list(live.items()):
            try:
                t0 = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - t0) * 1e3)
            except Exception as err:  # noqa: BLE001
                results[name] = err.with_traceback(None)
                del live[name]
                continue
            if len(times[name]) >= b.min_reps and sum(times[name]) >= b.rep_ms:
                results[name] = _summary(times[name])
                del live[name]
    return {name: results[name] for name in calls}


def _warm_up(call: Callable[[], Any], device: torch.device, b: Budget) -> None:
    for _ in range(b.warmup_calls):
        call()
    if device.type == "cpu":  # do_bench warms up by itself on CUDA
        deadline = time.perf_counter() + b.warmup_ms / 1e3
        while time.perf_counter() < deadline:
            call()
    synchronize(device)


def _do_bench(call: Callable[[], Any], device: torch.device, b: Budget) -> Timing:
    """do_bench for at least max(b.rep_ms, b.min_reps calls), judged from one call timed first."""
    import triton.testing

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    torch.cuda.synchronize(device)
    estimate = max(start.elapsed_time(end), 1e-3)
    return _summary(triton.testing.do_bench(call, warmup=b.warmup_ms, rep=max(b.rep_ms, b.min_reps * estimate), return_mode="all"))


def time_call(call: Callable[[], Any], device: torch.device, b: Budget) -> Timing:
    """`time_calls` of one call; its exception, if it raises, propagates."""
    result = time_calls({"call": call}, device, b)["call"]
    if isinstance(result, Exception):
        raise result
    return result


def wall_time(call: Callable[[], Any], device: torch.device, b: Budget) -> Timing:
    """Host time per call of back-to-back calls, launch overhead included (a GPU kernel's device time
    hides it): batches of calls closed by one synchronisation."""
    call()
    synchronize(device)
    t0 = time.perf_counter()
    call()
    synchronize(device)
    batch = max(1, int(2e-3 / max(time.perf_counter() - t0, 1e-7)))  # about 2 ms of calls per batch
    times = []
    for _ in range(max(b.min_reps, int(b.rep_ms))):
        t0 = time.perf_counter()
        for _ in range(batch):
            call()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3 / batch)
        if len(times) >= b.min_reps and sum(times) * batch > b.rep_ms:
            break
    return _summary(times)


def error_text(err: Exception) -> str:
    """How a failure is recorded in the results."""
    return f"{type(err).__name__}: {err}"[:400]


def _summary(times: list[float]) -> Timing:
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return Timing(*(float(v) for v in q), len(times))


def peak_memory_mb(call: Callable[[], Any], device: torch.device) -> tuple[float, float] | tuple[None, None]:
    """(peak allocated, peak above what was allocated before the call) in MiB during one `call()`;
    None on the CPU, where no allocator reports a peak."""
    if device.type != "cuda":
        return None, None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = call()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return round(peak / 2**20, 2), round((peak - before) / 2**20, 2)


def copy_bandwidth(device: torch.device, b: Budget) -> dict:
    """The device's copy bandwidth, x.copy_(y) of a buffer far larger than the cache: 2·bytes/time."""
    nbytes = max(8 * cache_bytes(device), (1 << 30) if device.type == "cuda" else (256 << 20))
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.rand(nbytes // 4, dtype=torch.float32, device=device, generator=gen)
    timing = time_call(lambda: x.copy_(y), device, b)
    return {"bytes": nbytes, "gbps": gbps(2 * nbytes, timing.ms), "time": timing.as_dict()}


def sig(x: float, digits: int = 4) -> float:
    """`x` to `digits` significant digits, for the results file."""
    return float(f"{x:.{digits}g}")


def gbps(nbytes: int, ms: float) -> float:
    return sig(nbytes / ms / 1e6)


# -- results -----------------------------------------------------------------------------------------


def results_path(device: torch.device) -> Path:
    return RESULTS_DIR / f"{device_slug(device)}.json"


def write_study(stem: Path, result: dict, render: Callable[[dict], str], plot: Callable[[dict, Path], None]) -> str:
    """A study's `result` as <stem>.json, its tables (`render`) as <stem>.md and its chart (`plot`) as
    <stem>.png, the directory made first; returns the tables."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    text = render(result)
    stem.with_suffix(".md").write_text(text + "\n")
    plot(result, stem.with_suffix(".png"))
    return text


def update_results(path: Path, device: torch.device, **sections) -> dict:
    """Write `sections` into the results file, keeping the other sections a previous run wrote there,
    so each benchmark script can run alone and one file collects every number of the device."""
    results = json.loads(path.read_text()) if path.is_file() else {}
    results["device"] = {**results.get("device", {}), **describe(device)}
    results.update(sections)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    return results


# -- the trainer's step ------------------------------------------------------------------------------
# pkd_fast.trainer (deepspeed) and datasets are imported where they are used: they cost the benchmarks of the
# losses alone seconds at import.


def trainer_step(trainer, engine, step_fn: Callable, loader, count_fn: Callable | None = None) -> Callable[[], Any]:
    """The trainer's own micro-batch step as a no-argument call, so a benchmark times what a run does: the
    loader's next batch on the device (with its teacher source's rows and, for a masked-LM recipe, its
    `count_fn` divisors), then `Trainer.train_micro_batch` (the recipe's `step_fn`, the non-finite guard's
    look, `engine.backward`, `engine.step`). Returns the step's `StepOutput`."""
    from pkd_fast.distill import WATCHED
    from pkd_fast.trainer import NonFiniteGuard

    micro_batches = trainer.micro_batches(loader, count_fn)  # endless: the timer decides how many
    guard = NonFiniteGuard(WATCHED, trainer.world.device, trainer.world)

    def step():
        batch, divisors = next(micro_batches)
        return trainer.train_micro_batch(engine, step_fn, batch, divisors, guard, engine.global_steps + 1, False)[0]

    return step


def loss_alone(step: Callable[[], Any], recipe) -> Callable[[], Any]:
    """The loss's forward+backward as a call, on one step's own inputs: runs `step` once while recording the
    `pkd_loss` call that `recipe` (the recipe module whose step it is) makes, then replays that call with the
    student's tensors detached into leaves, returning their gradients. Arguments and flags are the step's
    own, so the loss timed alone is the one the step computed."""
    calls = []

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        return loss(*args, **kwargs)

    loss = recipe.pkd_loss
    with mock.patch.object(recipe, "pkd_loss", record):
        step()
    if len(calls) != 1:
        raise RuntimeError(f"{recipe.__name__}'s step called pkd_loss {len(calls)} times; loss_alone replays one call")
    wrt: list[torch.Tensor] = []

    def leaf(x):
        if isinstance(x, torch.Tensor) and x.requires_grad:
            wrt.append(x.detach().requires_grad_())
            return wrt[-1]
        if isinstance(x, (list, tuple)):
            return type(x)(leaf(item) for item in x)
        return x

    args, kwargs = calls[0]
    args, kwargs = leaf(args), {k: leaf(v) for k, v in kwargs.items()}
    return lambda: torch.autograd.grad(loss(*args, **kwargs).total, wrt)


def token_rows(n: int, seq: int, vocab: int, tokenizer, num_labels: int = 2, seed: int = 0):
    """`n` random full-length GLUE-style rows (token ids in [1000, vocab), [CLS] … [SEP], every token real,
    random labels), the same on every call: a `datasets.Dataset` for a recipe's training loader."""
    import datasets

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (n, seq), generator=g)
    ids[:, 0], ids[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
    return datasets.Dataset.from_dict({
        "input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "token_type_ids": torch.zeros_like(ids).tolist(),
        "labels": torch.randint(0, num_labels, (n,), generator=g).tolist(), "example_idx": list(range(n)),
    })


def text_corpus(path: Path, tokenizer, words: int, seed: int = 0) -> Path:
    """A text file of `words` random whole words of `tokenizer`'s vocabulary (ids from 1000 up), one line of
    100 each: raw text for the masked-LM recipe's corpus, packed by it into full blocks (every token real)."""
    vocab = [t for t in tokenizer.convert_ids_to_tokens(range(1000, tokenizer.vocab_size)) if t.isalpha()]
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(vocab), (words,), generator=g).tolist()
    path.write_text("".join(" ".join(vocab[i] for i in picks[j : j + 100]) + "\n" for j in range(0, words, 100)))
    return path


def mlm_context(workdir: Path, world, tokenizer, ds_config: dict, seq: int, blocks: int, **flags):
    """The masked-LM recipe's context (`recipes.mlm.MlmContext`: its corpus, masking loader, step and loss
    units) over a random text corpus of at least `blocks` full training blocks of `seq` tokens, with `flags`
    (Config fields: loss_impl, kd_positions, beta, ...). The corpus is written and packed under `workdir`
    once; later contexts there read the recipe's own corpus cache."""
    from pkd_fast.config import Config
    from pkd_fast.recipes.mlm import HELD_OUT_MIN, MlmContext

    corpus = workdir / "corpus.txt"
    if not corpus.exists():  # whole words of the vocabulary are one token each: a block per `seq` words, and then some
        text_corpus(corpus, tokenizer, (blocks + 2 * HELD_OUT_MIN) * seq)
    cfg = Config(objective="mlm", text_files=(str(corpus),), max_seq_length=seq, output_dir=str(workdir), **flags)
    return MlmContext(cfg, world, ds_config, tokenizer, workdir)
