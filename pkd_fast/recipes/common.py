"""What every recipe does the same way: join the process group, read the DeepSpeed JSON and settle its
precision, write the resolved config, build the one `Trainer` from the flags, key a run for --resume and
find it finished, batch the inference passes alike on every rank, and write the results files and table.
A recipe's context derives from `RecipeContext`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from pkd_fast import data
from pkd_fast import deepspeed_json, engines
from pkd_fast.config import RESULT_NEUTRAL, Config
from pkd_fast.dist import Dist, init_distributed, require_shared_directory
from pkd_fast.distill import WATCHED, Distiller
from pkd_fast.output_lock import OutputLock
from pkd_fast.families import student_config, width_config
from pkd_fast.models import model_config
from pkd_fast.precision import apply_precision, describe_device, json_precision, probe_run_step, resolve_precision
from pkd_fast.relations import QkvCapture
from pkd_fast.trainer import STOP, FitResult, Stopped, Trainer

log = logging.getLogger("pkd_fast")


# What `start` holds for the run (its output lock, its signal handlers), let go by `end`.
_held = contextlib.ExitStack()


def start(cfg: Config) -> tuple[Dist, Path, dict, dict]:
    """The process group, the output directory (with resolved_config.json, locked against a second run), the
    checked DeepSpeed JSON with --precision applied, and the device record (`resolve_device_precision`) that
    results.json carries; from here SIGTERM/SIGINT stop the run at the next point all ranks agree on."""
    world = init_distributed(cfg.dist_timeout)
    configure_logging(world.is_main)
    _held.callback(STOP.listen())
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    require_shared_directory(out, world, f"--output-dir {out}", _SHARED_OUTPUT)
    lock = OutputLock.take(out, world)
    if lock is not None:
        _held.callback(lock.release)
    ds_config = deepspeed_json.check_batch_layout(deepspeed_json.read_ds_config(cfg.deepspeed), cfg.deepspeed, world.world_size)
    ds_config, device = resolve_device_precision(cfg, world, ds_config)
    ds_config = deepspeed_json.one_cpu_rank_config(ds_config, world)
    if world.is_main:
        cfg.to_json(out / "resolved_config.json", device=device)
        lr = f"--lr {cfg.lr:g}" + (f" (the teacher's: --teacher-lr {cfg.teacher_lr:g})" if cfg.teacher_lr is not None else "")
        replaced = deepspeed_json.replaced_settings(ds_config, lr)
        if replaced:
            log.info("%s: the run replaces the JSON's %s", cfg.deepspeed, "; ".join(replaced))
    return world, out, ds_config, device


def resolve_device_precision(cfg: Config, world: Dist, ds_config: dict) -> tuple[dict, dict]:
    """The JSON with the precision sections of what runs (--precision, pkd_fast.precision), and the device
    record: the precision that runs and why, the GPU or CPU, the CPU's capability and whether the device
    computes bf16 natively. Every rank must run one precision, and each rank's probe is timed on its own, so
    bf16 counts as native only where every rank finds it so. What runs, when it is not what was asked, is
    said in one line."""
    hardware = describe_device(world.device)
    if world.world_size > 1:
        native = [None] * world.world_size
        dist.all_gather_object(native, hardware["bf16_native"])
        hardware["bf16_native"] = all(native)
    if world.device.type == "cpu" and cfg.precision == "auto" and hardware["bf16_native"] and json_precision(ds_config) == "bf16":
        hardware["bf16_run_probe"] = run_probe(cfg, world, ds_config)
    choice = resolve_precision(cfg.precision, world.device, ds_config, hardware=hardware)
    if world.is_main:
        if choice.notice:
            log.warning(choice.notice)
        else:
            log.info("precision: %s (%s)", choice.precision, choice.reason)
    device = {**hardware, "precision": choice.precision, "precision_asked": choice.asked, "precision_reason": choice.reason}
    return apply_precision(ds_config, choice), device


def run_probe(cfg: Config, world: Dist, ds_config: dict) -> dict:
    """The main rank's `precision.probe_run_step` for this run's teacher and student (from their configs, no
    weights loaded) at its micro-batch and sequence length, the same for every rank."""
    found = [None]
    if world.is_main:
        teacher = model_config("--teacher", cfg.teacher)
        k = min(cfg.student_layers or max(1, teacher.num_hidden_layers // 2), teacher.num_hidden_layers)
        student = (width_config(teacher, k, cfg.student_hidden_size) if cfg.init_from == "scratch" and cfg.student_hidden_size
                   else student_config(teacher, range(1, k + 1)))
        seq_len = min(cfg.max_seq_length, getattr(teacher, "max_position_embeddings", cfg.max_seq_length))
        found = [dataclasses.asdict(probe_run_step(teacher, student, ds_config["train_micro_batch_size_per_gpu"], seq_len))]
    if world.world_size > 1:
        dist.broadcast_object_list(found, src=0)
    return found[0]


def end() -> None:
    """Release what `start` took (train.main calls it however the run ended, errors included)."""
    _held.close()


# Why several nodes need one --output-dir: rank 0 alone publishes a checkpoint ('latest') and writes the
# results and model, while every rank writes its own part of each checkpoint.
_SHARED_OUTPUT = ("every rank writes its part of each checkpoint there and rank 0 publishes it, so --resume needs "
                  "all of them in one place: put --output-dir on a filesystem every node mounts (NFS, Lustre, ...)")


def make_trainer(cfg: Config, world: Dist, ds_config: dict) -> Trainer:
    return Trainer(world, ds_config, log_steps=cfg.log_steps, save_steps=cfg.save_steps, warmup_ratio=cfg.warmup_ratio,
                   resume=cfg.resume, on_nonfinite=cfg.on_nonfinite, keep_checkpoints=cfg.keep_checkpoints,
                   gradient_checkpointing=cfg.gradient_checkpointing)


class RecipeContext:
    """What every run of one invocation shares, whatever the objective: flags, process group, DeepSpeed
    JSON, tokenizer and the one training loop."""

    def __init__(self, cfg: Config, world: Dist, ds_config: dict, tokenizer):
        self.cfg, self.world, self.ds_config, self.tokenizer = cfg, world, ds_config, tokenizer
        self.trainer = make_trainer(cfg, world, ds_config)
        self.micro_batch = self.trainer.micro_batch

    def finished(self, name: str, out: Path, key: dict) -> dict | None:
        """Make the run's directory; with --resume, the results of the run `key` that already finished there
        (`Trainer.finished`: one of other settings is refused), else None."""
        out.mkdir(parents=True, exist_ok=True)
        return self.trainer.finished(name, out, key)

    def train(self, model, *, name: str, out: Path, key: dict, lr: float, epochs: int | None,
              distiller: Callable[[], Distiller], loader: Callable[[Distiller], object], summary: Callable[[FitResult, Distiller], dict],
              describe: str = "", checkpoint_key: Callable[[Distiller], dict] | None = None) -> dict:
        """One training run, the same for every objective: with --resume, the results of the run `key` that
        finished in `out` already; else its `distiller` (made only now: a live teacher is loaded there, and
        the hooks it puts on `model` are removed after), the `loader` its collate reads the teacher's rows
        in, the loop, and the saved model and results (`summary`'s fields). `checkpoint_key`: what the
        checkpoints are keyed by once the distiller has settled its spec (--beta-share's β); `key` else."""
        finished = self.finished(name, out, key)
        if finished is not None:
            return finished
        with distiller() as step:
            result = self.trainer.fit(model, loader(step), step, name=name, out=out, lr=lr, epochs=epochs, max_steps=self.cfg.max_steps,
                                      run_key=checkpoint_key(step) if checkpoint_key else key, evaluate=self.evaluate, watch=WATCHED,
                                      describe=describe + step.describe(), count_fn=step.loss_units)
        return self.trainer.finish(result, out, self.tokenizer, summary(result, step), key)

    def evaluate(self, model) -> dict:
        """The objective's held-out metrics of `model` (each recipe's own)."""
        raise NotImplementedError

    def evaluate_only(self, model: torch.nn.Module, row: dict) -> dict:
        """`row` with the held-out metrics of a model that is not trained here (the table's teacher row)."""
        return {**row, "dev": self.evaluate(engines.frozen_teacher(model, self.ds_config, self.world.device))}

    @torch.no_grad()
    def write_teacher_store(self, writer, model: torch.nn.Module, relation_layer: int | None, batches: Iterable, n_batches: int,
                            forward: Callable, write: Callable) -> object:
        """One pass of the frozen teacher `model` over `batches` ((batch, counted) pairs, `n_batches` of them),
        every objective's store alike: `forward(teacher, batch)` runs it (the relation layer's Q, K, V caught by
        hooks in the same forward), `write(batch, outputs, qkv)` stores a counted batch's rows; returns the
        committed store (`writer.commit`)."""
        capture = QkvCapture(model, relation_layer) if relation_layer else None
        teacher = engines.frozen_teacher(model, self.ds_config, self.world.device)
        for batch, counted in teacher_pass(batches, n_batches, self.world, self.cfg.teacher_cache):
            with capture.recording() if capture else contextlib.nullcontext():
                outputs = forward(teacher, batch)
            qkv = torch.stack(capture.take()) if capture else None
            if counted:
                write(batch, outputs, qkv)
        return writer.commit()

    def inference_batches(self, dataset, lookup: Callable[[dict], dict] | None = None) -> tuple[Iterator[tuple[dict, bool]], int]:
        """This rank's in-order slice of `dataset` as (device batch, counted) pairs, and their count: the
        same on every rank (`data.inference_batches`: ZeRO-3 gathers parameters with every rank at each
        forward), whose uncounted filler is run but not used. No gradients: twice the training batch fits."""
        batches, n_batches = data.inference_batches(dataset, self.tokenizer, 2 * self.micro_batch, rank=self.world.rank,
                                                         world_size=self.world.world_size, lookup=lookup)
        return ((data.batch_to_device(batch, self.world.device), counted) for batch, counted in batches), n_batches


def write_results(world: Dist, out: Path, summary: dict, table: str | None) -> None:
    """On the main rank: `summary` as results.json and, where a run trained or scored something, its
    `table` as results.md, printed too."""
    if not world.is_main:
        return
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    if table is not None:
        (out / "results.md").write_text(table + "\n")
        print("\n" + table, flush=True)


def results_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], runs: Sequence[dict]) -> str:
    """The results table of every recipe, in Markdown: `title`, then a row per run of its `columns` cells
    and the run's training seconds."""
    lines = [title, "", "| " + " | ".join([*columns, "train s"]) + " |", "|" + "---|" * (len(columns) + 1)]
    lines += ["| " + " | ".join([*cells, str(run.get("train_seconds", "-"))]) + " |" for cells, run in zip(rows, runs)]
    return "\n".join(lines)


def run_key(cfg: Config, ds_config: dict, **run) -> dict:
    """What a run's results depend on: the flags (less those that only say where or how often to write),
    the run's own hyperparameters and the DeepSpeed JSON's contents. --resume refuses a checkpoint whose
    key differs."""
    flags = {k: v for k, v in json.loads(json.dumps(cfg.flat())).items() if k not in RESULT_NEUTRAL}
    ds_json = {k: v for k, v in ds_config.items() if k not in ("tensorboard", "steps_per_print", "wall_clock_breakdown")}
    return {**flags, **json.loads(json.dumps(run)), "deepspeed_json": ds_json}


def configure_logging(is_main: bool) -> None:
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO if is_main else logging.WARNING)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)


def teacher_pass(batches: Iterable, n_batches: int, world: Dist, directory: str) -> Iterator:
    """The batches of a teacher-cache write, with a progress bar on the main rank; a SIGTERM/SIGINT that all
    ranks agree on stops it between batches (the caller's `Writer` then removes the unpublished store)."""
    progress = tqdm(batches, total=n_batches, desc="teacher cache", disable=not world.is_main, dynamic_ncols=True)
    for i, item in enumerate(progress):
        signalled = STOP.agreed(world)
        if signalled:
            progress.close()  # its line ends before the stop's
            raise Stopped(f"stopped by {signalled} while writing the teacher cache ({i} of {n_batches} batches): "
                          f"nothing of it was published; run the same command again to write {directory}")
        yield item
