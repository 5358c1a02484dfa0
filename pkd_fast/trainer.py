"""One training loop for every objective: the DeepSpeed engine, accumulation boundaries, the loss terms a
recipe computes, logging, the non-finite guard, crash-safe checkpoints, exact resume, and the save-and-exit
on SIGTERM/SIGINT.

A recipe hands `Trainer.fit` a model, a loader and its step, a `pkd_fast.distill.Distiller` (any
`step_fn(engine, batch, return_terms, divisors)` will do) that returns the step's `DistillOutput`: the loss
terms and the tensors whose finiteness the guard watches (student
and teacher outputs, cache rows, loss). The loop never asks where the teacher's outputs came from.

Loss units. A recipe whose loss is a sum over units that micro-batches hold in unequal numbers (the
masked-LM objective: masked tokens for CE, KL rows for KD) also hands a `count_fn(batch)`, a device vector
of the batch's units. Before an optimizer step's first backward the loop reads ahead that step's
`accumulation` micro-batches, counts their units on device and all-reduces the counts once per step
(every rank, even with none), and passes each micro-batch `divisors` = step count ÷ (ranks × accumulation),
clamped so an empty step divides 0 by a positive number. DeepSpeed 0.19.8 then undoes that factor:
`engine.backward` divides the loss by gradient_accumulation_steps (its `scale_wrt_gas=True` default) and
the gradient reduction averages over the data-parallel ranks (ZeRO-1/2 `average_tensor`, ZeRO-0's
allreduce), so the step's gradient is that of the sum over all its units divided by their number: every
unit weighs the same, whatever micro-batch or rank holds it, and a micro-batch without units adds zero.
Without a `count_fn` (GLUE) `divisors` is None and each micro-batch's loss is its own mean. The logged
terms are summed over the step's micro-batches and ranks and divided by ranks × accumulation, so they are
the step's objective either way: the per-unit mean, or the mean of the micro-batch means.

Loaders. A map-style loader (a DataLoader, or anything with a length, `set_epoch` or a sampler's) runs
epochs and resumes by skipping the micro-batches a checkpoint already consumed. A loader without a length
is a stream (`pkd_fast.corpus.MlmLoader`): it trains for `max_steps`, starting a new pass (`set_epoch`)
whenever its stream ends, and resumes from the position (`state_dict`) each rank saved in the checkpoint.

Gradient accumulation under DeepSpeed 0.19.8: micro-steps that end no optimizer step still communicate
under ZeRO-2/3. `engine.allreduce_gradients` calls the partitioned optimizer's reduce epilogue on every
micro-step (its own comment: "ZeRO stage >= 2 communicates during non gradient accumulation boundaries as
well"), because ZeRO-2 keeps only its partition of the gradients and so must reduce-scatter each
micro-batch's gradients into it; `engine.no_sync()` asserts under ZeRO-2/3. Only ZeRO-0/1 reduce at the
boundary alone. So with ZeRO-2 accumulation saves memory per micro-batch, not communication
(tests/test_mlm_train.py::test_zero2_reduces_on_every_micro_step checks this).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from pkd_fast import checkpoints, deepspeed_json, engines, faults
from pkd_fast import data
from pkd_fast.config import ADDED_FLAGS
from pkd_fast.distill import STUDENT, DistillOutput
from pkd_fast.dist import Dist
from pkd_fast.errors import PkdError
from pkd_fast.losses import LossTerms

log = logging.getLogger("pkd_fast")
RUN_KEY_FILE = "run_key.json"  # beside a finished run's results.json: what they depend on


class NonFiniteError(PkdError):
    """A NaN or inf reached the loss: the run stops before anything of it is saved or evaluated."""


class NonFiniteGuard:
    """Watches named tensors for NaN/inf without a host sync per step: each micro-step folds, on device,
    the first step at which each name went non-finite into one small tensor, read at `check` (log steps,
    before every save and evaluation). In skip mode `skip` decides on every micro-step instead, with one
    small all-reduce that every rank calls whatever it saw (one sync per micro-batch), so the loop can drop
    a bad micro-batch's gradient and count it while the ranks stay in step."""

    def __init__(self, names: Iterable[str], device: torch.device, world: Dist):
        self.names = list(names)
        self.world = world
        self.first_bad = torch.zeros(len(self.names), dtype=torch.long, device=device)  # 0: finite so far
        self.skipped = 0

    def observe(self, step: int, watched: dict[str, torch.Tensor | list[torch.Tensor]]) -> torch.Tensor:
        """Fold this micro-step in, on device; returns which watched names are non-finite now."""
        bad = torch.stack([_non_finite(watched.get(name), self.first_bad.device) for name in self.names])
        self.first_bad = torch.where(bad & (self.first_bad == 0), step, self.first_bad)
        return bad

    def skip(self, bad: torch.Tensor, step: int) -> bool:
        """Skip mode, on every rank at every micro-step: whether to drop this rank's micro-batch. Every rank
        learns what every rank saw (one all-reduce), so all take their decision at the same micro-step:
        a rank whose teacher, cache rows or loss went non-finite drops its own micro-batch (the others'
        are sound and still train); a non-finite student output on any rank cannot be skipped past (its
        weights or activations are already broken) and stops every rank, naming the rank."""
        seen = self._all_ranks(bad.long() * step)
        if seen[:, self.names.index(STUDENT)].any():
            self._stop(seen, f"at step {step} (a non-finite student cannot be skipped)")
        if not seen[self.world.rank].any():
            return False
        self.first_bad.zero_()
        self.skipped += 1
        return True

    def check(self, where: str) -> None:
        """Stop every rank together (so none waits in a collective) when any rank saw a non-finite value."""
        self._stop(self._all_ranks(self.first_bad), where)

    def _all_ranks(self, row: torch.Tensor) -> torch.Tensor:
        """Every rank's `row` (a step per watched name; 0: finite) as one [ranks, names] host tensor."""
        table = torch.zeros(self.world.world_size, len(self.names), dtype=torch.long, device=row.device)
        table[self.world.rank] = row
        if self.world.world_size > 1:
            dist.all_reduce(table)
        return table.cpu()

    def _stop(self, seen: torch.Tensor, where: str) -> None:
        hits = [(int(step), rank, self.names[i]) for rank, row in enumerate(seen) for i, step in enumerate(row) if step > 0]
        if hits:
            step, rank, name = min(hits)
            others = sorted({f"{n} (rank {r})" for s, r, n in hits if s == step and (r, n) != (rank, name)})
            also = f"; also {', '.join(others)}" if others else ""
            raise NonFiniteError(
                f"non-finite {name} at step {step} on rank {rank}{also}, found {where}; nothing after the last "
                "checkpoint was saved or evaluated. Resume with --resume (add --on-nonfinite skip to drop such batches)"
            )

    def skipped_total(self) -> int:
        count = torch.tensor([self.skipped], dtype=torch.long)
        if self.world.world_size > 1:
            dist.all_reduce(count)
        return int(count)


class Stopped(Exception):
    """The run stopped on SIGTERM/SIGINT at a point every rank agreed on; the message is its one line."""


class StopRequest:
    """SIGTERM (what a scheduler sends before it kills a job) and SIGINT (Ctrl-C) only set a flag here; the
    run acts on it at points every rank reaches together (optimizer-step boundaries, after an evaluation,
    between teacher-cache batches), where `agreed` tells all ranks whether any was signalled: a scheduler
    may signal every rank at different instants, or only some. A second signal, while the checkpoint is
    being saved, finds the flag already set and changes nothing."""

    def __init__(self):
        self.signum = 0  # the first signal's number; 0: none yet
        self.group = None  # a CPU (gloo) group: the agreement never waits for the accelerator's queue

    def listen(self) -> Callable[[], None]:
        """Catch the signals for this run; returns what undoes it."""
        self.signum = 0
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return lambda: [signal.signal(sig, handler) for sig, handler in previous.items()]

    def _handle(self, signum: int, frame) -> None:
        self.signum = self.signum or signum

    def agreed(self, world: Dist) -> str | None:
        """The name of a signal some rank received so far, or None (one tiny all-reduce across ranks)."""
        signum = torch.tensor([self.signum], dtype=torch.long)
        if world.world_size > 1:
            if self.group is None and dist.get_backend() != "gloo":  # made by every rank at its first agreement
                self.group = dist.new_group(backend="gloo")
            dist.all_reduce(signum, op=dist.ReduceOp.MAX, group=self.group)
        return signal.Signals(int(signum)).name if signum.item() else None


STOP = StopRequest()


@dataclass
class FitResult:
    engine: object
    dev: dict  # the final evaluation
    steps: int
    train_seconds: float
    nonfinite_skipped: int  # micro-batches dropped by --on-nonfinite skip (all ranks)
    overflow_skipped: int  # steps DeepSpeed skipped for non-finite gradients (fp16 loss-scale overflows: normal)


class Trainer:
    """What every run of one invocation shares: process group, DeepSpeed JSON and the loop's settings."""

    def __init__(self, world: Dist, ds_config: dict, *, log_steps: int, save_steps: int, warmup_ratio: float,
                 resume: bool, on_nonfinite: str, keep_checkpoints: int = 1, gradient_checkpointing: bool = False):
        self.world, self.ds_config = world, ds_config
        self.micro_batch = ds_config["train_micro_batch_size_per_gpu"]
        self.accum = ds_config["gradient_accumulation_steps"]
        self.log_steps, self.save_steps, self.warmup_ratio = log_steps, save_steps, warmup_ratio
        self.resume, self.on_nonfinite = resume, on_nonfinite
        self.keep_checkpoints, self.gradient_checkpointing = keep_checkpoints, gradient_checkpointing

    def require_full_step(self, rows: int, what: str, more: str) -> None:
        """Refuse a training set that fills no optimizer step: each rank's sampler drops the rows that do not
        fill its micro-batches, so fewer rows than one global batch would train nothing at all."""
        ranks = self.world.world_size
        global_batch = self.micro_batch * self.accum * ranks
        if rows < global_batch:
            raise PkdError(
                f"{rows} {what} make no optimizer step of {global_batch} rows (micro-batch {self.micro_batch} × "
                f"accumulation {self.accum} × {ranks} rank(s)): {more}, or lower train_micro_batch_size_per_gpu or "
                "gradient_accumulation_steps in --deepspeed, or run on fewer ranks"
            )

    def fit(
        self,
        model: torch.nn.Module,
        loader,
        step_fn: Callable[[object, dict, bool, torch.Tensor | None], DistillOutput],
        *,
        name: str,
        out: Path,
        lr: float,
        epochs: int | None,
        run_key: dict,
        evaluate: Callable[[object], dict],
        watch: Iterable[str],
        describe: str = "",
        max_steps: int | None = None,
        count_fn: Callable[[dict], torch.Tensor] | None = None,
    ) -> FitResult:
        """Train `model` over `loader` for `epochs`, or `max_steps` optimizer steps, evaluating after each
        epoch (a stream: at the end); resumes from `out`/checkpoints when asked, refusing a checkpoint whose
        `run_key` differs. `count_fn`: the loss units of a micro-batch (see the module docstring)."""
        world = self.world
        signalled = STOP.agreed(world)
        if signalled:  # between two runs of one invocation: the next one has not begun
            raise Stopped(f"stopped by {signalled} before {name} began training: nothing of it to save; run the same "
                          "command with --resume to continue")
        streaming = not _has_length(loader)
        steps_per_epoch = None if streaming else len(loader) // self.accum
        if streaming and max_steps is None:
            raise PkdError("a streamed corpus has no length: give the number of steps with --max-steps")
        if steps_per_epoch == 0:  # the recipes check before any work; this keeps the loop from training 0 steps
            self.require_full_step(len(loader.dataset), "training rows", "give more training data")
        total_steps = max_steps or steps_per_epoch * epochs
        engine = self.engine(model, lr, total_steps, out)
        run_key = self._full_key(run_key)
        ckpt_dir = out / "checkpoints"
        if not self.resume and world.is_main:  # another run's checkpoints would outlive this one's in pruning
            checkpoints.remove_checkpoints(ckpt_dir)
        dist.barrier()
        start, rank_state = checkpoints.load_checkpoint(engine, ckpt_dir, world.rank, run_key, ADDED_FLAGS) if self.resume else (0, {})
        if streaming and "loader" in rank_state:
            loader.load_state_dict(rank_state["loader"])
        metrics_file, log_file = out / "metrics.jsonl", out / "train_log.jsonl"
        if world.is_main:
            for path in (metrics_file, log_file):
                _keep_lines_until(path, start)
            length = "a stream" if streaming else f"{steps_per_epoch} steps per epoch"
            log.info("%s: %d steps (%s), %d rows × %d ranks per step%s%s", name, total_steps, length,
                     self.micro_batch * self.accum, world.world_size, describe, f", resumed at step {start}" if start else "")
        guard = NonFiniteGuard(watch, world.device, world)
        t0 = time.time()
        throughput = Throughput(world)
        bar = tqdm(total=total_steps, initial=start, desc=name, disable=not world.is_main, dynamic_ncols=True)
        dev = None
        try:  # the bar ends its line before an error is printed under it
            for epoch, batches in self._passes(loader, start, steps_per_epoch, total_steps):
                engine.train()
                step_terms = None  # the log step's terms, summed over its micro-batches
                for batch, divisors in self._counted_steps(batches, count_fn):
                    throughput.add(batch["attention_mask"])
                    boundary = engine.is_gradient_accumulation_boundary()  # this micro-batch ends an optimizer step
                    step = engine.global_steps + 1
                    # step 1 too: the terms at the initial weights (the share β·PT starts from, glue_table reads it)
                    log_now = step == 1 or step % self.log_steps == 0
                    output, dropped = self.train_micro_batch(engine, step_fn, batch, divisors, guard, step, log_now)
                    if log_now:
                        step_terms = _add_terms(step_terms, output.terms, dropped)
                    if not boundary:
                        continue
                    bar.update(1)
                    faults.fault_point("step", step)
                    if log_now:
                        guard.check(f"at the log of step {step}")
                        self._log_terms(engine, step_terms, log_file, step, bar, guard, throughput)
                        step_terms = None
                    pass_end = (steps_per_epoch is not None and step % steps_per_epoch == 0) or step == total_steps
                    # at the end of a pass a stop waits for its evaluation: a resumed run would not redo it
                    signalled = None if pass_end else STOP.agreed(world)
                    if pass_end or signalled or (self.save_steps and step % self.save_steps == 0):
                        guard.check(f"before the checkpoint of step {step}")
                        checkpoints.save_checkpoint(engine, ckpt_dir, step, world.rank, run_key, keep=self.keep_checkpoints,
                                                    rank_state={"loader": loader.state_dict()} if streaming else None)
                    if signalled:
                        raise Stopped(_stopped_line(signalled, f"at step {step} of {name}", ckpt_dir, step))
                where = "the end" if epoch is None else f"epoch {epoch + 1}"
                guard.check(f"before the evaluation of {where}")
                dev = evaluate(engine)
                if world.is_main:
                    with metrics_file.open("a") as f:
                        f.write(json.dumps({"step": engine.global_steps, **({} if epoch is None else {"epoch": epoch + 1}), **dev}) + "\n")
                    log.info("%s %s: %s", name, where, _fmt(dev))
                signalled = STOP.agreed(world)  # during the evaluation: its pass's checkpoint is saved
                if signalled:
                    raise Stopped(_stopped_line(signalled, f"after the evaluation of {where} of {name}", ckpt_dir,
                                                engine.global_steps))
        finally:
            bar.close()
        if dev is None:  # resumed after the last step: the final evaluation is still owed
            dev = evaluate(engine)
        return FitResult(engine, dev, total_steps, round(time.time() - t0, 1), guard.skipped_total(),
                         int(getattr(engine, "skipped_steps", 0)))

    def engine(self, model: torch.nn.Module, lr: float, total_steps: int, out: Path):
        """The student's DeepSpeed engine for a run of `total_steps` at `lr` (warm-up, TensorBoard under `out`)."""
        config = deepspeed_json.resolve_ds_config(
            self.ds_config, lr=lr, total_steps=total_steps, warmup_steps=int(self.warmup_ratio * total_steps),
            tensorboard_dir=out / "tensorboard",
        )
        if self.gradient_checkpointing:
            _enable_gradient_checkpointing(model)
        return engines.student_engine(model, config)

    def train_micro_batch(self, engine, step_fn: Callable, batch: dict, divisors: torch.Tensor | None, guard: NonFiniteGuard,
                          step: int, return_terms: bool) -> tuple[DistillOutput, bool]:
        """One micro-batch as `fit` trains it (and the benchmarks time it): the recipe's `step_fn`, the guard's
        look at what it watches, backward and step. Returns the step's output and whether --on-nonfinite skip
        dropped it (its gradient is then exactly zero)."""
        output = step_fn(engine, batch, return_terms, divisors)
        _inject_nonfinite(output, step)
        bad = guard.observe(step, output.watched)
        dropped = self.on_nonfinite == "skip" and guard.skip(bad, step)
        engine.backward(_no_gradient(output) if dropped else output.terms.total)
        engine.step()
        return output, dropped

    def micro_batches(self, loader, count_fn: Callable[[dict], torch.Tensor] | None = None):
        """(micro-batch on device, divisors) of `loader`, epoch after epoch without end, as `fit` reads them
        (for the benchmarks, which time as many steps as they need)."""
        return self._counted_steps((batch for _ in itertools.count() for batch in loader), count_fn)

    def _full_key(self, run_key: dict) -> dict:
        """A recipe's run key plus the batch layout, which the results depend on too."""
        return {**run_key, "world_size": self.world.world_size, "micro_batch": self.micro_batch, "accumulation": self.accum}

    def finished(self, name: str, out: Path, run_key: dict) -> dict | None:
        """With --resume, the results of the run that already finished under `out` (None when none did), after
        checking that it was this run: reusing results of other settings would be silent, since
        resolved_config.json shows the new ones."""
        done = out / "results.json"
        if not (self.resume and done.is_file()):
            return None
        stored = out / RUN_KEY_FILE
        if not stored.is_file():
            raise PkdError(f"--resume {out}: {name} finished earlier, but without its {RUN_KEY_FILE} its settings cannot be "
                           "checked against these; run without --resume to train it again, or in a new --output-dir")
        checkpoints.require_same_run(json.loads(stored.read_text()), self._full_key(run_key), "finished",
                                     f"--resume {out}: {name} finished earlier with other settings",
                                     "run without --resume to train it again, or in a new --output-dir", ADDED_FLAGS)
        log.info("%s: finished earlier, reusing %s", name, done)
        return json.loads(done.read_text())

    def finish(self, result: FitResult, out: Path, tokenizer, summary: dict, run_key: dict) -> dict:
        """Save the trained model (HF format), the run key (`finished` checks it) and results.json, then drop
        the run's checkpoints."""
        checkpoints.save_pretrained(result.engine, out / "model", tokenizer, self.world.rank)
        summary = {**summary, "steps": result.steps, "train_seconds": result.train_seconds,
                   "nonfinite_skipped": result.nonfinite_skipped, "overflow_skipped_steps": result.overflow_skipped,
                   "dev": result.dev}
        if self.world.is_main:
            (out / RUN_KEY_FILE).write_text(json.dumps(self._full_key(run_key), indent=2) + "\n")
            (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
            checkpoints.remove_checkpoints(out / "checkpoints")  # the run finished: the saved model replaces them
        dist.barrier()
        return summary

    def _passes(self, loader, start: int, steps_per_epoch: int | None, total_steps: int):
        """(epoch, micro-batches) of what is left to train after `start` steps: map-style, each epoch's
        batches (skipping those already consumed, stopping at `total_steps`); a stream, one run of its
        remaining micro-batches over as many passes as it takes (epoch None: evaluated once, at the end)."""
        if start >= total_steps:
            return
        if steps_per_epoch is None:
            yield None, itertools.islice(_endless(loader), (total_steps - start) * self.accum)
            return
        for epoch in range(start // steps_per_epoch, -(-total_steps // steps_per_epoch)):
            (loader.set_epoch if hasattr(loader, "set_epoch") else loader.sampler.set_epoch)(epoch)
            skip = max(0, start - epoch * steps_per_epoch) * self.accum
            yield epoch, itertools.islice(loader, skip, min(steps_per_epoch, total_steps - epoch * steps_per_epoch) * self.accum)

    def _counted_steps(self, batches: Iterable[dict], count_fn: Callable[[dict], torch.Tensor] | None):
        """(micro-batch on device, the step's divisors or None), read ahead one optimizer step at a time:
        its `accumulation` micro-batches are counted before the first of them trains (module docstring).
        Only that step is read, so a stream's position at the step's end, where checkpoints save it, is
        the same as without read-ahead. Every rank gets the same number of steps, so each all-reduces the
        same number of times."""
        micro_batches = iter(batches)
        while group := [data.batch_to_device(b, self.world.device) for b in itertools.islice(micro_batches, self.accum)]:
            divisors = None
            if count_fn is not None:
                counts = torch.stack([count_fn(b) for b in group]).sum(0)
                dist.all_reduce(counts)
                divisors = counts.clamp(min=1).float() / (self.world.world_size * self.accum)
            for batch in group:
                yield batch, divisors

    def _log_terms(self, engine, terms: LossTerms, log_file: Path, step: int, bar, guard: NonFiniteGuard,
                   throughput: "Throughput") -> None:
        """The step's loss terms (summed over its micro-batches) summed over ranks and divided by ranks ×
        accumulation, so they are the objective of the global batch (module docstring), and the global
        tokens/s and sequences/s since the last log, to the progress bar, train_log.jsonl and TensorBoard.
        With the guard's check, the loop's only host sync."""
        names = [f.name for f in dataclasses.fields(LossTerms) if getattr(terms, f.name) is not None]
        vec = torch.cat([torch.stack([getattr(terms, n).detach().float() for n in names]), throughput.counts()])
        dist.all_reduce(vec)
        values = dict(zip(names, (vec[: len(names)] / (self.world.world_size * self.accum)).tolist()))
        values.update(throughput.rates(*vec[len(names):].tolist()))
        values["lr"] = engine.get_lr()[0]
        skipped = guard.skipped_total()
        if skipped:
            values["nonfinite_skipped"] = skipped
        if getattr(engine, "skipped_steps", 0):
            values["overflow_skipped_steps"] = int(engine.skipped_steps)
        bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()})
        if self.world.is_main:
            with log_file.open("a") as f:
                # wall and CPU time: s/step between two lines (benchmarks/bench_peer reads them)
                f.write(json.dumps({"step": step, **values, "time": round(time.time(), 3),
                                    "cpu_time": round(time.process_time(), 3)}) + "\n")
            if engine.monitor.enabled:
                engine.monitor.write_events([(f"train/{k}", v, step) for k, v in values.items()])


class Throughput:
    """Real tokens and sequences this rank trained on since the last log, counted on device (no sync)."""

    def __init__(self, world: Dist):
        self.tokens = torch.zeros((), dtype=torch.float32, device=world.device)
        self.sequences = 0
        self.since = time.perf_counter()

    def add(self, attention_mask: torch.Tensor) -> None:
        self.tokens += attention_mask.sum()
        self.sequences += attention_mask.shape[0]

    def counts(self) -> torch.Tensor:
        return torch.stack([self.tokens, torch.tensor(float(self.sequences), device=self.tokens.device)])

    def rates(self, tokens: float, sequences: float) -> dict:
        """Global rates from the counts summed over ranks; starts the next interval."""
        now = time.perf_counter()
        elapsed = max(now - self.since, 1e-9)
        self.tokens.zero_()
        self.sequences, self.since = 0, now
        return {"tokens_per_s": round(tokens / elapsed, 1), "sequences_per_s": round(sequences / elapsed, 2)}


def _has_length(loader) -> bool:
    try:
        len(loader)
    except TypeError:
        return False
    return True


def _endless(loader):
    """A stream's micro-batches, pass after pass: each ends when this rank's share of the corpus does."""
    while True:
        yield from loader
        loader.set_epoch(loader.state_dict()["epoch"] + 1)


def _enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Activation recomputation in the backward of the Hugging Face model inside `model` (a recipe's
    wrapper included); non-reentrant, so frozen inputs and RNG replay (dropout) behave as without it."""
    hf = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if hf is None or not hf.supports_gradient_checkpointing:
        raise PkdError(f"--gradient-checkpointing: {type(model).__name__} does not support it")
    hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def _non_finite(value: torch.Tensor | list[torch.Tensor] | None, device: torch.device) -> torch.Tensor:
    """A device bool: whether a watched tensor (or any of a list, e.g. one per layer, read where they lie
    rather than stacked into a copy) holds a NaN or inf."""
    if value is None:
        return torch.zeros((), dtype=torch.bool, device=device)
    tensors = [value] if isinstance(value, torch.Tensor) else value
    return torch.stack([~torch.isfinite(t).all() for t in tensors]).any()


def _inject_nonfinite(output: DistillOutput, step: int) -> None:
    """Tests of the guard only: PKD_FAST_FAULT "nonfinite-student@N" (or "nonfinite-teacher@N", narrowed to
    one rank by ":rankR") makes that watched value NaN at step N, as a broken forward would."""
    for phase, name in (("nonfinite-student", STUDENT), ("nonfinite-teacher", "teacher logits")):
        if name in output.watched and faults.fault_here(phase, step):
            output.watched[name] = torch.full_like(output.watched[name], float("nan"))


def _stopped_line(signalled: str, where: str, ckpt_dir: Path, step: int) -> str:
    return (f"stopped by {signalled} {where}: saved the checkpoint {ckpt_dir / f'step{step}'}; run the same command "
            "with --resume to continue from it")


def _no_gradient(output: DistillOutput) -> torch.Tensor:
    """A loss whose gradient is exactly zero, through the student's own output: the dropped micro-batch still
    runs a backward, so every rank's DeepSpeed hooks and accumulation count stay in step."""
    student = output.watched[STUDENT]
    return (torch.nan_to_num(student, nan=0.0, posinf=0.0, neginf=0.0) * 0.0).sum()


def _add_terms(total: LossTerms | None, terms: LossTerms, dropped: bool) -> LossTerms:
    """`total` + this micro-batch's `terms`, detached, name by name; a dropped micro-batch adds zeros (its
    terms may be NaN), so a log step's mean counts it as 0 rather than losing the whole line."""
    def add(name):
        value = getattr(terms, name)
        if value is None:
            return None
        value = torch.zeros_like(value) if dropped else value.detach()
        return value if total is None else getattr(total, name) + value
    return LossTerms(**{f.name: add(f.name) for f in dataclasses.fields(LossTerms)})


def _keep_lines_until(path: Path, step: int) -> None:
    """Drop log lines past `step`: on resume, what the interrupted run logged after its last checkpoint
    (and on a fresh start, everything)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))


def _fmt(metrics: dict) -> str:
    first = next(iter(metrics.values()))
    flat = {f"{s}/{k}": v for s, m in metrics.items() for k, v in m.items()} if isinstance(first, dict) else metrics
    return ", ".join(f"{k} {v:.2f}" for k, v in flat.items())
