"""Checkpoints that survive a crash (saved, published, pruned, removed, resumed from the newest intact
one), the run key a checkpoint or a finished run is checked against, and saving the weights a run
evaluated so `from_pretrained` loads them. Its own module because these are the run's files on disk, apart
from the process group and the engines that write them (issue #29)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import pkd_fast.dist  # noqa: F401 (first: it names the CPU accelerator before DeepSpeed is imported)
import deepspeed  # noqa: E402,I001

from pkd_fast.errors import PkdError, write_failure  # noqa: E402
from pkd_fast.faults import fault_point  # noqa: E402

log = logging.getLogger("pkd_fast")
MANIFEST = "manifest.json"  # a checkpoint's run key and the size of each of its files, written last of them


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


_MISSING = object()
