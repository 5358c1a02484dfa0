"""The PKD recipe: fine-tune a BERT teacher on a GLUE task, distil it into shallower students (FT, KD,
PKD-Skip, PKD-Last), evaluate on dev and print the comparison.

    deepspeed pkd_fast/train.py --deepspeed ds_configs/zero2.json [flags]      (or plain `python`)

Read top to bottom: parse → data → teacher → teacher cache → students → table. Components live beside
this file.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, set_seed
from transformers.utils import logging as hf_logging

from pkd_fast import cache as teacher_cache
from pkd_fast import data as glue_data
from pkd_fast import engine as ds
from pkd_fast.cache import TeacherCache
from pkd_fast.config import PRESETS, Config, parse_config
from pkd_fast.errors import PkdError
from pkd_fast.losses import pkd_loss, resolve_impl
from pkd_fast.metrics import glue_metrics
from pkd_fast.models import build_student, is_finetuned, layer_map, load_classifier, num_layers, pt_rows
from pkd_fast.tasks import Task, get_task

log = logging.getLogger("pkd_fast")
KILL_AT_STEP_ENV = "PKD_FAST_KILL_AT_STEP"  # fault injection for the resume test: SIGKILL after that step's checkpoint


@dataclass
class Run:
    """One training run: the teacher's fine-tuning or one student's distillation."""

    name: str  # "teacher" or the strategy
    strategy: str  # ft | kd | skip | last
    layer_map: tuple[int, ...]  # 1-based teacher layers for student layers 1..k-1
    alpha: float
    beta: float
    lr: float
    epochs: int
    out: Path


def main(argv: list[str] | None = None) -> dict:
    try:
        return run(parse_config(argv))
    except PkdError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def run(cfg: Config) -> dict:
    # -- setup ---------------------------------------------------------------------------------------
    world = ds.init_distributed()
    _configure_logging(world.is_main)
    task = get_task(cfg.task)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds_config = ds.read_ds_config(cfg.deepspeed)
    if world.is_main:
        cfg.to_json(out / "resolved_config.json")
    log.info("PT term: %s reduction (%s)", cfg.pt_reduction, _PT_SCALES[cfg.pt_reduction])

    # -- data ----------------------------------------------------------------------------------------
    tokenizer = AutoTokenizer.from_pretrained(cfg.teacher)
    raw = glue_data.load_glue(task, cfg.glue_dir)
    full_train_rows = len(raw["train"])
    train_set = glue_data.tokenize(
        glue_data.subsample(raw["train"], cfg.max_train_samples, cfg.data_seed), tokenizer, cfg.max_seq_length
    )
    dev_sets = {
        split: glue_data.tokenize(glue_data.subsample_head(raw[split], cfg.max_eval_samples), tokenizer, cfg.max_seq_length)
        for split in task.dev_splits
    }
    ctx = Context(cfg, task, world, ds_config, tokenizer, train_set, dev_sets)

    # -- teacher -------------------------------------------------------------------------------------
    teacher_path, results = cfg.teacher, {}
    finetuned = is_finetuned(cfg.teacher, task)
    if not finetuned and cfg.stage in ("all", "teacher"):
        teacher_run = Run("teacher", "ft", (), 0.0, 0.0, cfg.teacher_lr or cfg.lr, cfg.teacher_epochs or cfg.epochs, out / "teacher")
        set_seed(cfg.seed)
        results["teacher"] = ctx.fit(load_classifier(cfg.teacher, task), None, teacher_run)
        teacher_path = str(teacher_run.out / "model")
    elif not finetuned and (cfg.distilled or cfg.stage == "cache"):
        raise PkdError(f"--stage {cfg.stage} needs a teacher fine-tuned on {task.name}; --teacher {cfg.teacher} has no classifier head")
    elif finetuned and cfg.stage in ("all", "teacher"):  # the stages whose table has a teacher row
        results["teacher"] = ctx.evaluate_only(load_classifier(teacher_path, task), "teacher")

    # -- teacher cache: run the teacher once over the training set (or reuse a matching store) ---------
    cache = None
    if cfg.teacher_cache and (cfg.stage in ("all", "cache") or (cfg.stage == "student" and cfg.distilled)):
        cache = ctx.ensure_cache(teacher_path)

    # -- students ------------------------------------------------------------------------------------
    if cfg.stage in ("all", "student"):
        n = cache.layout.teacher_layers if cache is not None else AutoConfig.from_pretrained(teacher_path).num_hidden_layers
        k = cfg.student_layers or max(1, n // 2)
        maps = {strategy: layer_map(strategy, n, k, cfg.layer_map) for strategy in cfg.strategy}
        if cache is not None:
            cache.require({layer for lmap in maps.values() for layer in lmap}, tokens=cfg.pt_tokens == "all")
        # Only the first k layers are kept to initialise the students: the teacher runs may cast and move
        # their teacher, and with a cache nothing else of it is loaded.
        init_path = teacher_path if cfg.init_from == "teacher" else _base_model(cfg, teacher_path)
        init_source = build_student(load_classifier(init_path, task), k, task)
        for strategy, lmap in maps.items():
            alpha = 0.0 if strategy == "ft" else cfg.alpha
            beta = cfg.beta if lmap else 0.0
            student_run = Run(strategy, strategy, lmap, alpha, beta, cfg.lr, cfg.epochs, out / "students" / strategy)
            set_seed(cfg.seed)  # the same fresh head for every strategy
            student = build_student(init_source, k, task)
            # What the student learns from: the cache, or a fresh live teacher (frozen_teacher casts, moves or
            # partitions the module it is given, so one run's teacher is never handed to the next).
            teacher = None if strategy == "ft" else cache if cache is not None else load_classifier(teacher_path, task)
            results[strategy] = ctx.fit(student, teacher, student_run)

    # -- table ---------------------------------------------------------------------------------------
    summary = {
        "task": task.name,
        "teacher": cfg.teacher,
        "train_rows": len(train_set),
        "train_rows_available": full_train_rows,
        "preset": cfg.preset,
        "runs": results,
    }
    if world.is_main:
        (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    if world.is_main and results:  # --stage cache trains and scores nothing: no table
        table = render_table(summary, task)
        (out / "results.md").write_text(table + "\n")
        print("\n" + table, flush=True)
    return summary


_PT_SCALES = {
    "elementwise_mean": "the authors' code: mean over batch × layers × hidden; β grid 10–1000",
    "mean": "sum over layers of the batch-mean squared distance",
    "sum": "the paper's form: sum over batch and layers of squared distances",
}


def _base_model(cfg: Config, teacher_path: str) -> str:
    if cfg.base_model:
        return cfg.base_model
    if teacher_path != cfg.teacher:  # we fine-tuned it, so --teacher is the pretrained base
        return cfg.teacher
    raise PkdError("--init-from pretrained with an already fine-tuned --teacher needs --base-model (its pretrained base)")


def _configure_logging(is_main: bool) -> None:
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO if is_main else logging.WARNING)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)


class Context:
    """What every run of one invocation shares: config, data, process group, tokenizer."""

    def __init__(self, cfg: Config, task: Task, world: ds.Dist, ds_config: dict, tokenizer, train_set, dev_sets):
        self.cfg, self.task, self.world, self.ds_config = cfg, task, world, ds_config
        self.tokenizer, self.train_set, self.dev_sets = tokenizer, train_set, dev_sets
        self.micro_batch = ds_config["train_micro_batch_size_per_gpu"]
        self.accum = ds_config.get("gradient_accumulation_steps", 1)

    # -- one training run ----------------------------------------------------------------------------
    def fit(self, model, teacher: PreTrainedModel | TeacherCache | None, spec: Run) -> dict:
        """Train `model` on `spec`, distilling from a live teacher, from the cache's rows, or (FT) neither."""
        cfg, world, task = self.cfg, self.world, self.task
        spec.out.mkdir(parents=True, exist_ok=True)
        done = spec.out / "results.json"
        if cfg.resume and done.is_file():
            log.info("%s: finished earlier, reusing %s", spec.name, done)
            return json.loads(done.read_text())

        lookup = None
        if isinstance(teacher, TeacherCache):  # the loader reads the teacher's rows; no teacher runs
            lookup = teacher.reader(spec.layer_map, tokens=cfg.pt_tokens == "all", pin=world.device.type == "cuda")
            teacher = None
        loader = glue_data.make_loader(
            self.train_set, self.tokenizer, self.micro_batch, train=True, seed=cfg.seed, rank=world.rank,
            world_size=world.world_size, lookup=lookup,
        )
        steps_per_epoch = len(loader) // self.accum
        if steps_per_epoch == 0:
            raise PkdError(
                f"{len(self.train_set)} training rows make no full step of {self.micro_batch}×{self.accum}×{world.world_size} rows"
            )
        total_steps = steps_per_epoch * spec.epochs
        config = ds.resolve_ds_config(
            self.ds_config, lr=spec.lr, total_steps=total_steps, warmup_steps=int(cfg.warmup_ratio * total_steps),
            tensorboard_dir=spec.out / "tensorboard",
        )
        engine = ds.student_engine(model, config)
        live_teacher = ds.frozen_teacher(teacher, config, world.device) if teacher is not None else None
        impl = resolve_impl(cfg.loss_impl, world.device)
        ckpt_dir = spec.out / "checkpoints"
        start = ds.load_checkpoint(engine, ckpt_dir, world.rank) if cfg.resume else 0
        metrics_file = spec.out / "metrics.jsonl"
        if world.is_main:
            for log_file in (metrics_file, spec.out / "train_log.jsonl"):
                _keep_lines_until(log_file, start)
            log.info(
                "%s: %d steps (%d epochs × %d), %d rows × %d ranks per step, layer map %s, α=%g β=%g T=%g, loss impl %s%s",
                spec.name, total_steps, spec.epochs, steps_per_epoch, self.micro_batch * self.accum, world.world_size,
                list(spec.layer_map) or "-", spec.alpha, spec.beta, cfg.temperature, impl,
                f", resumed at step {start}" if start else "",
            )
            if lookup:
                log.info("%s: teacher outputs read from %s", spec.name, cfg.teacher_cache)

        tokens_index = cfg.pt_tokens == "all" and bool(spec.layer_map)
        t0 = time.time()
        bar = tqdm(total=total_steps, initial=start, desc=spec.name, disable=not world.is_main, dynamic_ncols=True)
        eval_metrics = None
        for epoch in range(start // steps_per_epoch, spec.epochs):
            engine.train()
            loader.sampler.set_epoch(epoch)
            skip = (start - epoch * steps_per_epoch) * self.accum if start > epoch * steps_per_epoch else 0
            batches = itertools.islice(loader, skip, steps_per_epoch * self.accum)
            for batch in batches:
                if tokens_index:  # positions of real tokens, found on the host before the copy: no sync later
                    batch["token_index"] = glue_data.real_token_index(batch["attention_mask"])
                batch = glue_data.batch_to_device(batch, world.device)
                boundary = engine.is_gradient_accumulation_boundary()  # this micro-batch ends an optimizer step
                step = engine.global_steps + 1
                log_now = boundary and step % cfg.log_steps == 0
                terms = self._loss(engine, live_teacher, batch, spec, impl, log_now)
                engine.backward(terms.total)
                engine.step()
                if not boundary:
                    continue
                bar.update(1)
                if log_now:
                    self._log_terms(engine, terms, spec, step, bar)
                if step % steps_per_epoch == 0 or (cfg.save_steps and step % cfg.save_steps == 0):
                    ds.save_checkpoint(engine, ckpt_dir, step, world.rank)
                    _maybe_kill(step)
            eval_metrics = self.evaluate(engine)
            if world.is_main:
                with metrics_file.open("a") as f:
                    f.write(json.dumps({"step": engine.global_steps, "epoch": epoch + 1, **eval_metrics}) + "\n")
                log.info("%s epoch %d: %s", spec.name, epoch + 1, _fmt(eval_metrics))
        bar.close()
        if eval_metrics is None:  # resumed after the last step: the final evaluation is still owed
            eval_metrics = self.evaluate(engine)

        ds.save_pretrained(engine, spec.out / "model", self.tokenizer, world.rank)
        result = {
            "task": task.name, "strategy": spec.strategy, "layer_map": list(spec.layer_map),
            "student_layers": engine.module.config.num_hidden_layers,
            "alpha": spec.alpha, "beta": spec.beta, "temperature": cfg.temperature, "lr": spec.lr,
            "epochs": spec.epochs, "seed": cfg.seed, "pt_tokens": cfg.pt_tokens, "pt_reduction": cfg.pt_reduction,
            "train_rows": len(self.train_set), "steps": total_steps,
            "train_seconds": round(time.time() - t0, 1), "dev": eval_metrics,
        }
        if world.is_main:
            done.write_text(json.dumps(result, indent=2) + "\n")
            shutil.rmtree(ckpt_dir, ignore_errors=True)  # the run finished: the saved model replaces them
        dist.barrier()
        return result

    def _loss(self, engine, teacher, batch, spec: Run, impl: str, return_terms: bool):
        """One forward of the student (and the live teacher) → the PKD loss terms. Without a live teacher
        the batch may carry the cache's rows: `teacher_logits` and `teacher_hidden` (the mapped layers)."""
        inputs = glue_data.model_inputs(batch)
        need_hidden = bool(spec.layer_map)
        student = engine(**inputs, output_hidden_states=need_hidden)
        if teacher is not None:
            with torch.no_grad():
                t_out = teacher(**inputs, output_hidden_states=need_hidden)
            t_logits, t_states, t_layers = t_out.logits, t_out.hidden_states, spec.layer_map
        else:
            t_logits = batch.get("teacher_logits")
            t_states = batch["teacher_hidden"].unbind(1) if need_hidden else ()
            t_layers = range(len(t_states))
        s_rows, t_rows = [], []
        if need_hidden:
            token_index = batch.get("token_index")
            s_rows = pt_rows(student.hidden_states, range(1, len(spec.layer_map) + 1), token_index)
            t_rows = pt_rows(t_states, t_layers, token_index)
        return pkd_loss(
            student.logits, t_logits, batch["labels"], s_rows, t_rows,
            temperature=self.cfg.temperature, alpha=spec.alpha, beta=spec.beta, regression=self.task.regression,
            pt_reduction=self.cfg.pt_reduction, impl=impl, return_terms=return_terms,
        )

    def _log_terms(self, engine, terms, spec: Run, step: int, bar) -> None:
        """The step's loss terms averaged over ranks (so they describe the global batch), to the progress
        bar, train_log.jsonl and TensorBoard. The only host sync of the loop, every log_steps steps."""
        names = [name for name in ("total", "ce", "kd", "pt") if getattr(terms, name) is not None]
        vec = torch.stack([getattr(terms, name).detach().float() for name in names])
        dist.all_reduce(vec)
        values = dict(zip(names, (vec / self.world.world_size).tolist()))
        values["lr"] = engine.get_lr()[0]
        bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()})
        if self.world.is_main:
            with (spec.out / "train_log.jsonl").open("a") as f:
                f.write(json.dumps({"step": step, **values, "time": round(time.time(), 3), "cpu_time": round(time.process_time(), 3)}) + "\n")  # s/step between lines
            if engine.monitor.enabled:
                engine.monitor.write_events([(f"train/{k}", v, step) for k, v in values.items()])

    # -- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """Dev metrics of every dev split, each rank scoring its slice; all ranks get the same dict."""
        was_training = model.training
        model.eval()
        results = {}
        for split, dev in self.dev_sets.items():
            batches, _ = self._inference_batches(dev)
            rows = []
            for batch in batches:
                logits = model(**glue_data.model_inputs(batch)).logits.float()
                rows.append((batch["example_idx"].cpu(), logits.cpu(), batch["labels"].cpu()))
            gathered = [None] * self.world.world_size
            dist.all_gather_object(gathered, rows)
            idx, logits, labels = (torch.cat([r[i] for part in gathered for r in part]) for i in range(3))
            _, first = np.unique(idx.numpy(), return_index=True)
            results[split] = glue_metrics(logits.numpy()[first], labels.numpy()[first], self.task)
        model.train(was_training)
        return results if len(results) > 1 else next(iter(results.values()))

    def _inference_batches(self, dataset):
        """This rank's in-order slice of `dataset` as device batches, and their count. Under ZeRO-3 every
        rank must run the same number of forwards, so a short slice is padded with repeats of a batch."""
        batch_size = 2 * self.micro_batch  # no gradients: twice the training batch fits
        loader = glue_data.make_loader(
            dataset, self.tokenizer, batch_size, train=False, seed=0, rank=self.world.rank, world_size=self.world.world_size
        )
        n_batches = -(-len(dataset) // (self.world.world_size * batch_size))
        batches = itertools.islice(itertools.cycle(loader), n_batches) if len(loader) else []
        return (glue_data.batch_to_device(batch, self.world.device) for batch in batches), n_batches

    # -- teacher cache -------------------------------------------------------------------------------
    def ensure_cache(self, teacher_path: str) -> TeacherCache:
        """The store under --teacher-cache for this teacher and training set. --stage student only opens
        it (any mismatch is an error); --stage cache and all reuse a matching one or (re)write it."""
        cfg = self.cfg
        fingerprint = teacher_cache.fingerprint(
            teacher_path, self.tokenizer, self.task.name, cfg.max_seq_length, self.train_set, ds.train_dtype(self.ds_config)
        )
        try:
            cache = TeacherCache.open(cfg.teacher_cache, fingerprint)
            if cfg.stage != "student":
                cache.require(cfg.cache_layers or range(cache.layout.teacher_layers + 1), tokens=cfg.pt_tokens == "all")
            log.info("teacher cache %s: matches this run, reusing it", cfg.teacher_cache)
            return cache
        except PkdError as why:
            if cfg.stage == "student":
                raise
            log.info("teacher cache: writing it (%s)", why)
        return self.write_cache(teacher_path, fingerprint)

    @torch.no_grad()
    def write_cache(self, teacher_path: str, fingerprint: dict) -> TeacherCache:
        """One pass of the frozen teacher over the training set, each rank over its slice, into the store."""
        model = load_classifier(teacher_path, self.task)
        n = num_layers(model)
        layout = teacher_cache.Layout(
            rows=len(self.train_set), num_labels=self.task.num_labels, teacher_layers=n, hidden_size=model.config.hidden_size,
            layers=tuple(sorted(set(self.cfg.cache_layers or range(n + 1)))),
            positions=self.cfg.max_seq_length if self.cfg.pt_tokens == "all" else 1, dtype=fingerprint["dtype"],
        )
        with teacher_cache.Writer(self.cfg.teacher_cache, fingerprint, layout, self.world) as writer:
            teacher = ds.frozen_teacher(model, self.ds_config, self.world.device)
            batches, n_batches = self._inference_batches(self.train_set)
            for batch in tqdm(batches, total=n_batches, desc="teacher cache", disable=not self.world.is_main, dynamic_ncols=True):
                out = teacher(**glue_data.model_inputs(batch), output_hidden_states=True)
                writer.write(batch["example_idx"], out.logits, out.hidden_states, batch["attention_mask"])
            return writer.commit()

    def evaluate_only(self, model, name: str) -> dict:
        """Dev metrics of an already fine-tuned model (the teacher row of the table)."""
        layers = num_layers(model)
        metrics = self.evaluate(ds.frozen_teacher(model, self.ds_config, self.world.device))
        return {"strategy": name, "layers": layers, "dev": metrics}


def _keep_lines_until(path: Path, step: int) -> None:
    """Drop log lines past `step`: on resume, what the interrupted run logged after its last checkpoint
    (and on a fresh start, everything)."""
    if not path.exists():
        return
    lines = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
    path.write_text("".join(l + "\n" for l in lines))


def _maybe_kill(step: int) -> None:
    if os.environ.get(KILL_AT_STEP_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def _fmt(metrics: dict) -> str:
    flat = {f"{s}/{k}": v for s, m in metrics.items() for k, v in m.items()} if isinstance(next(iter(metrics.values())), dict) else metrics
    return ", ".join(f"{k} {v:.2f}" for k, v in flat.items())


def render_table(summary: dict, task: Task) -> str:
    """Markdown: one row per model, the task's metrics in percent."""
    rows = summary["runs"]
    note = f"{summary['train_rows']:,} of {summary['train_rows_available']:,} training rows"
    if summary["preset"]:
        note += f" (--preset {summary['preset']}: {PRESETS[summary['preset']]})"
    names = {"teacher": "Teacher", "ft": "FT", "kd": "KD", "skip": "PKD-Skip", "last": "PKD-Last"}
    metric_cols = _metric_columns(task)
    lines = [
        f"**{task.name}** dev, {note}",
        "",
        "| model | layers | layer map | " + " | ".join(metric_cols) + " | train s |",
        "|---|---|---|" + "---|" * len(metric_cols) + "---|",
    ]
    for name, r in rows.items():
        dev = r["dev"]
        values = [_metric_value(dev, col) for col in metric_cols]
        layers = r.get("student_layers") or r.get("layers") or "-"
        lmap = ",".join(map(str, r.get("layer_map") or [])) or "-"
        lines.append(f"| {names.get(name, name)} | {layers} | {lmap} | " + " | ".join(values) + f" | {r.get('train_seconds', '-')} |")
    return "\n".join(lines)


def _metric_columns(task: Task) -> list[str]:
    if len(task.dev_splits) == 1:
        return list(task.metrics)
    return [f"{split}/{m}" for split in task.dev_splits for m in task.metrics]


def _metric_value(dev: dict, col: str) -> str:
    if "/" in col:
        split, metric = col.split("/")
        return f"{dev[split][metric]:.2f}"
    return f"{dev[col]:.2f}"


if __name__ == "__main__":
    main()
