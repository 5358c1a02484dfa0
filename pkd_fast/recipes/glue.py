"""The GLUE recipe (--objective glue): fine-tune a BERT teacher on a GLUE task, distil it into shallower
students (FT, KD, PKD-Skip, PKD-Last), evaluate on dev and print the comparison.

Read `run` top to bottom: data → teacher → teacher cache → students → table.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from transformers import AutoTokenizer, PreTrainedModel, set_seed

from pkd_fast import cache as teacher_cache
from pkd_fast import data, deepspeed_json, glue_files
from pkd_fast.cache import TeacherCache
from pkd_fast.config import PKD_STRATEGIES, PRESETS, STRATEGIES, Config, Need, Objective, int_list, need_model_path, register, strategies
from pkd_fast.dist import Dist
from pkd_fast.distill import Distiller, DistillSpec, with_projection
from pkd_fast.errors import PkdError
from pkd_fast.families import model_inputs, width_config
from pkd_fast.metrics import glue_metrics_with_halves
from pkd_fast.models import (build_student, check_max_seq_length, check_same_tokenizer, check_student_depth, is_finetuned,
                             layer_map, load_classifier, model_config, num_layers, saved_tokenizer, scratch_student)
from pkd_fast.recipes import common
from pkd_fast.relations import RelationPlan, relation_plan
from pkd_fast.tasks import TASKS, Task, get_task

log = logging.getLogger("pkd_fast")


@dataclass
class Run:
    """One training run: the teacher's fine-tuning or one student's distillation."""

    name: str  # "teacher" or the strategy
    strategy: str  # ft | kd | skip | last
    layer_map: tuple[int, ...]  # 1-based teacher layers for student layers 1..k-1
    alpha: float
    beta: float
    lr: float
    epochs: int | None  # None: --max-steps
    out: Path
    gamma: float = 0.0  # the relation term's weight (distilled students only)


def run(cfg: Config) -> dict:
    task = get_task(cfg.options.task)

    # -- every flag against the models' configs (no weights loaded), before any work (nothing started yet) --
    configs = {flag: model_config(flag, path) for flag, path in (("--teacher", cfg.teacher), ("--base-model", cfg.options.base_model)) if path}
    for flag, config in configs.items():
        check_max_seq_length(cfg.max_seq_length, flag, config)
    n = configs["--teacher"].num_hidden_layers  # fine-tuning and caching keep the depth
    k = cfg.student_layers or max(1, n // 2)
    if cfg.stage in ("all", "student"):
        for flag, config in configs.items():  # the --base-model's layers initialise the student with --init-from pretrained
            check_student_depth(k, config.num_hidden_layers, "the teacher's" if flag == "--teacher" else f"--base-model {cfg.options.base_model}'s")
        maps = {strategy: layer_map(strategy, n, k, cfg.options.layer_map) for strategy in cfg.options.strategy}
        if cfg.init_from == "scratch":  # the width is checked against the teacher's heads
            width_config(configs["--teacher"], k, cfg.student_hidden_size or configs["--teacher"].hidden_size)
    relations = None
    if cfg.relation_weight and cfg.stage != "teacher":  # the relation layers and heads against both models
        student_width = (cfg.student_hidden_size if cfg.init_from == "scratch" else None) or \
            configs.get("--base-model" if cfg.init_from == "pretrained" else "--teacher", configs["--teacher"]).hidden_size
        relations = relation_plan(cfg.relation_layers, cfg.relation_heads, configs["--teacher"], k, student_width)

    # -- setup ---------------------------------------------------------------------------------------
    world, out, ds_config, device = common.start(cfg)
    log.info("PT term: %s reduction (%s)", cfg.pt_reduction, _PT_SCALES[cfg.pt_reduction])
    tokenizer = AutoTokenizer.from_pretrained(cfg.teacher)
    if "--base-model" in configs and cfg.stage in ("all", "student"):
        check_same_tokenizer(tokenizer, saved_tokenizer("--base-model", cfg.options.base_model), f"--base-model {cfg.options.base_model}")

    # -- data ----------------------------------------------------------------------------------------
    raw = glue_files.load_glue(task, cfg.options.glue_dir)
    full_train_rows = len(raw["train"])
    train_set = data.tokenize(
        data.subsample(raw["train"], cfg.options.max_train_samples, cfg.options.data_seed), tokenizer, cfg.max_seq_length
    )
    dev_sets = {
        split: data.tokenize(data.subsample_head(raw[split], cfg.options.max_eval_samples), tokenizer, cfg.max_seq_length)
        for split in task.dev_splits
    }
    ctx = Context(cfg, task, world, ds_config, tokenizer, train_set, dev_sets, relations)

    # -- teacher -------------------------------------------------------------------------------------
    teacher_path, results = cfg.teacher, {}
    finetuned = is_finetuned(cfg.teacher, task)
    if cfg.stage in ("all", "student") or (not finetuned and cfg.stage == "teacher"):  # something trains: checked before it does
        subset = cfg.options.max_train_samples is not None and cfg.options.max_train_samples < full_train_rows
        ctx.trainer.require_full_step(len(train_set), f"{task.name} training rows",
                                      "raise --max-train-samples" if subset else "give more training rows")
    if not finetuned and cfg.stage in ("all", "teacher"):
        teacher_run = Run("teacher", "ft", (), 0.0, 0.0, cfg.teacher_lr or cfg.lr, cfg.teacher_epochs or cfg.epochs, out / "teacher")
        set_seed(cfg.seed)
        results["teacher"] = ctx.fit(load_classifier(cfg.teacher, task), teacher_run)
        teacher_path = str(teacher_run.out / "model")
    elif not finetuned and (cfg.options.distilled or cfg.stage == "cache"):
        raise PkdError(f"--stage {cfg.stage} needs a teacher fine-tuned on {task.name}; --teacher {cfg.teacher} has no classifier head")
    elif finetuned and cfg.stage in ("all", "teacher"):  # the stages whose table has a teacher row
        results["teacher"] = ctx.evaluate_only(load_classifier(teacher_path, task), "teacher")

    # -- teacher cache: run the teacher once over the training set (or reuse a matching store) ---------
    ctx.teacher_path = teacher_path
    if cfg.teacher_cache and (cfg.stage in ("all", "cache") or (cfg.stage == "student" and cfg.options.distilled)):
        ctx.cache = ctx.ensure_cache(teacher_path)

    # -- students ------------------------------------------------------------------------------------
    if cfg.stage in ("all", "student"):
        if ctx.cache is not None:
            ctx.cache.require({layer for lmap in maps.values() for layer in lmap}, cfg.pt_tokens, ctx.relation_layer)
        # Only the first k layers are kept to initialise the students: the teacher runs may cast and move
        # their teacher, and with a cache nothing else of it is loaded.
        init_source = _student_source(cfg, teacher_path, configs["--teacher"], k, task)
        teacher_width = configs["--teacher"].hidden_size
        for strategy, lmap in maps.items():
            alpha = 0.0 if strategy == "ft" else cfg.alpha
            beta = cfg.beta if lmap else 0.0
            gamma = 0.0 if strategy == "ft" else cfg.relation_weight
            student_run = Run(strategy, strategy, lmap, alpha, beta, cfg.lr, cfg.epochs, out / "students" / strategy, gamma)
            set_seed(cfg.seed)  # the same fresh head for every strategy
            student = with_projection(build_student(init_source, k, task), teacher_width, len(lmap))
            results[strategy] = ctx.fit(student, student_run)

    # -- table ---------------------------------------------------------------------------------------
    summary = {
        "task": task.name,
        "teacher": cfg.teacher,
        "train_rows": len(train_set),
        "train_rows_available": full_train_rows,
        "dev_rows": {split: len(dev) for split, dev in dev_sets.items()},
        "preset": cfg.options.preset,
        "device": device,
        "runs": results,
    }
    common.write_results(world, out, summary, render_table(summary, task) if results else None)  # --stage cache: no table
    return summary


@dataclass
class GlueOptions:
    """The flags only --objective glue reads (`cfg.options`); None where not given (`OBJECTIVE.defaults`)."""

    task: str | None = None  # default sst2
    glue_dir: str | None = None  # default $GLUE_DIR, else the hub
    max_train_samples: int | None = None
    data_seed: int | None = None  # default 42: picks the --max-train-samples subset, apart from --seed
    max_eval_samples: int | None = None
    group_by_length: bool | None = None  # default True: each optimizer step's rows of like length (data.LengthGroupedSampler)
    strategy: tuple[str, ...] | None = None  # default ft,kd,skip
    layer_map: tuple[int, ...] | None = None
    beta_share: float | None = None  # β set at step 0 so that β·PT is this share of the loss (replaces --beta)
    base_model: str | None = None  # pretrained weights for --init-from pretrained; default: the teacher's own base
    preset: str | None = None

    @property
    def distilled(self) -> tuple[str, ...]:
        """The strategies that read a teacher (all but ft)."""
        return tuple(s for s in self.strategy or () if s != "ft")


def _add_flags(p) -> None:
    g = p.add_argument_group("glue (--objective glue)")
    g.add_argument("--task", default=None, help=f"GLUE task: {', '.join(TASKS)} (default sst2)")
    g.add_argument("--glue-dir", default=None, help="classic glue_data/ folder (default $GLUE_DIR; else the hub)")
    g.add_argument("--max-train-samples", type=int, default=None, help="a fixed random subset of the training set")
    g.add_argument("--data-seed", type=int, default=None,
                   help="seed of that subset (independent of --seed, so runs over seeds train on the same rows; default 42)")
    g.add_argument("--max-eval-samples", type=int, default=None, help="the first N dev rows")
    g.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=None,
                   help="shuffled optimizer steps whose rows have like lengths, so batches are barely padded (SST-2: 1.05× the real "
                        "tokens instead of 3×); --no-group-by-length: plain shuffled batches (default: on)")
    g.add_argument("--base-model", default=None, help="pretrained weights for --init-from pretrained (default: the model the teacher was fine-tuned from)")
    g.add_argument("--strategy", type=strategies, default=None, help=f"comma-separated subset of {STRATEGIES} (default ft,kd,skip)")
    g.add_argument("--layer-map", type=int_list, default=None, help="1-based teacher layers for student layers 1..k-1 (overrides skip/last)")
    g.add_argument("--beta-share", type=float, default=None, metavar="S",
                   help="set β at step 0 so that β·PT is this share (0-1) of the loss on the first batch, the "
                        "same on every rank and on --resume (replaces --beta; the chosen β is in results.json)")


def _resolve_flags(cfg: Config) -> None:
    if cfg.options.glue_dir is None:
        cfg.options.glue_dir = os.environ.get("GLUE_DIR") or None


def _validate_flags(cfg: Config, need: Need) -> None:
    o = cfg.options
    need(o.task in TASKS, f"unknown task {o.task!r}; expected one of: {', '.join(TASKS)}")
    need(o.beta_share is None or (math.isfinite(o.beta_share) and 0.0 < o.beta_share < 1.0),
         f"--beta-share must be a share of the loss in (0, 1), got {o.beta_share}")
    need(o.data_seed is None or o.data_seed >= 0, f"--data-seed must be >= 0, got {o.data_seed}")
    for name in ("max_train_samples", "max_eval_samples"):
        value = getattr(o, name)
        need(value is None or value >= 1, f"--{name.replace('_', '-')} must be >= 1, got {value}")
    need(not cfg.relation_weight or bool(o.distilled),
         "--relation-weight only applies to students that learn from the teacher (--strategy kd, skip or last)")


def _validate_use(cfg: Config, need: Need) -> None:
    """GLUE's paths, and its flags that would do nothing in this run (refused, not ignored)."""
    o = cfg.options
    need(o.glue_dir is None or Path(o.glue_dir).is_dir(), f"--glue-dir {o.glue_dir}: no such directory")
    need_model_path(need, "--base-model", o.base_model)
    pkd = [s for s in o.strategy or () if s in PKD_STRATEGIES]
    trains_students = cfg.stage in ("all", "student")
    if o.layer_map is not None:
        need(trains_students and bool(pkd), "--layer-map only applies to PKD students (--strategy skip or last)")
        need(len(pkd) == 1, "--layer-map with both skip and last would train the same map twice; pass one of them")
    if o.beta_share is not None:
        need(trains_students and bool(pkd), "--beta-share only applies to PKD students (--strategy skip or last)")
    if o.base_model is not None:
        need(cfg.init_from == "pretrained" and trains_students, "--base-model only applies with --init-from pretrained")


OBJECTIVE = register(Objective(
    "glue", run, "distil on a GLUE task", stages=("all", "teacher", "cache", "student"), options=GlueOptions, add_flags=_add_flags,
    defaults={"task": "sst2", "data_seed": 42, "group_by_length": True, "strategy": ("ft", "kd", "skip"), "init_from": "teacher",
              "pt_tokens": "cls"},
    resolve=_resolve_flags, validate=_validate_flags, validate_use=_validate_use, output_name=lambda cfg: cfg.options.task,
    default=True, reads_teacher=lambda cfg: bool(cfg.options.distilled), teacher_flags="--strategy kd, skip or last",
))


_PT_SCALES = {
    "elementwise_mean": "the authors' code: mean over batch × layers × hidden; β grid 10–1000",
    "mean": "sum over layers of the batch-mean squared distance",
    "sum": "the paper's form: sum over batch and layers of squared distances",
}


def _student_source(cfg: Config, teacher_path: str, teacher_config, k: int, task: Task) -> PreTrainedModel:
    """The k-layer model every strategy's student copies its body from: the first k layers of the teacher or
    of the pretrained base, or random weights at --student-hidden-size (the teacher's width by default)."""
    if cfg.init_from == "scratch":
        set_seed(cfg.seed)
        return scratch_student(teacher_config, k, cfg.student_hidden_size or teacher_config.hidden_size, task)
    init_path = teacher_path if cfg.init_from == "teacher" else _base_model(cfg, teacher_path)
    return build_student(load_classifier(init_path, task), k, task)


def _base_model(cfg: Config, teacher_path: str) -> str:
    if cfg.options.base_model:
        return cfg.options.base_model
    if teacher_path != cfg.teacher:  # we fine-tuned it, so --teacher is the pretrained base
        return cfg.teacher
    raise PkdError("--init-from pretrained with an already fine-tuned --teacher needs --base-model (its pretrained base)")


class Context(common.RecipeContext):
    """What every run of one invocation shares: config, task, data, process group, tokenizer, training loop."""

    def __init__(self, cfg: Config, task: Task, world: Dist, ds_config: dict, tokenizer, train_set, dev_sets,
                 relations: RelationPlan | None = None):
        super().__init__(cfg, world, ds_config, tokenizer)
        self.task, self.train_set, self.dev_sets = task, train_set, dev_sets
        self.teacher_path = cfg.teacher  # the fine-tuned teacher, once there is one (`run`)
        self.cache: TeacherCache | None = None  # the teacher cache, when the students read it (`run`)
        self.relations = relations  # the relation term's layers and heads (--relation-weight; `relations.relation_plan`)

    @property
    def relation_layer(self) -> int | None:
        """The teacher layer whose Q, K, V the relation term reads (and a cache stores); None without one."""
        return self.relations.teacher_layer if self.relations else None

    # -- one training run ----------------------------------------------------------------------------
    def distiller(self, model, spec: Run) -> Distiller:
        """`spec`'s step on `model`: from the cache's rows where there is one, else from a fresh live teacher
        (loaded only if the spec reads one: the Distiller casts, moves or partitions it)."""
        cfg = self.cfg
        step = DistillSpec(alpha=spec.alpha, beta=spec.beta, gamma=spec.gamma, temperature=cfg.temperature, layer_map=spec.layer_map,
                           pt_tokens=cfg.pt_tokens, pt_reduction=cfg.pt_reduction, relations=self.relations if spec.gamma else None,
                           loss_impl=cfg.loss_impl, regression=self.task.regression)
        teacher = self.cache if self.cache is not None else (lambda: load_classifier(self.teacher_path, self.task))
        return Distiller(teacher, model, step, ds_config=self.ds_config, device=self.world.device)

    def train_loader(self, distiller: Distiller):
        """The run's shuffled, rank-sharded batches (grouped by length unless --no-group-by-length); the collate
        adds what the distiller reads there (`Distiller.lookup`), so the step finds it without a sync."""
        return data.make_loader(self.train_set, self.tokenizer, self.micro_batch, train=True, seed=self.cfg.seed,
                                rank=self.world.rank, world_size=self.world.world_size, lookup=distiller.lookup(),
                                group_by_length=self.cfg.options.group_by_length, accumulation=self.trainer.accum)

    def fit(self, model, spec: Run) -> dict:
        """Train `model` on `spec` (`common.RecipeContext.train`), its β set by --beta-share where given."""
        cfg = self.cfg

        def distiller() -> Distiller:
            step = self.distiller(model, spec)
            if cfg.options.beta_share is not None and spec.layer_map:
                step = step.replace(beta=self.calibrate_beta(model, step, self.train_loader(step), spec.name))
            return step

        def summary(result, step: Distiller) -> dict:
            return {"task": self.task.name, "strategy": spec.strategy, "layer_map": list(spec.layer_map),
                    "student_layers": result.engine.module.config.num_hidden_layers,
                    "alpha": spec.alpha, "beta": step.spec.beta, "beta_share": cfg.options.beta_share if spec.layer_map else None,
                    "gamma": spec.gamma, "temperature": cfg.temperature, "lr": spec.lr,
                    "epochs": spec.epochs, "seed": cfg.seed, "pt_tokens": cfg.pt_tokens, "pt_reduction": cfg.pt_reduction,
                    "train_rows": len(self.train_set)}

        # keyed before --beta-share picks β (that β is a function of this key); the checkpoints hold the β picked
        return self.train(model, name=spec.name, out=spec.out, key=self._run_key(spec), lr=spec.lr, epochs=spec.epochs,
                          distiller=distiller, loader=self.train_loader, summary=summary,
                          checkpoint_key=lambda step: self._run_key(dataclasses.replace(spec, beta=step.spec.beta)))

    @torch.no_grad()
    def calibrate_beta(self, model, distiller: Distiller, loader, name: str) -> float:
        """--beta-share s: the β that makes β·PT the share s of the loss on the run's first batch at its
        initial weights, β = s/(1-s)·((1-α)·CE + α·KD)/PT, so a β grid means the same across --pt-tokens
        kinds and teachers whose PT differs by orders of magnitude. The terms are averaged over ranks (one β
        everywhere) and depend only on the run's flags and data, so --resume finds the same β. Dropout is off
        and the RNG state is restored: the run's dropout stream is the one it has without the flag."""
        world, dtype, spec = self.world, deepspeed_json.train_dtype(self.ds_config), distiller.spec
        (loader.set_epoch if hasattr(loader, "set_epoch") else loader.sampler.set_epoch)(0)
        with torch.random.fork_rng(devices=[world.device] if world.device.type == "cuda" else []):
            batch = data.batch_to_device(next(iter(loader)), world.device)
            was_training = model.training
            model.to(world.device).eval()
            with torch.autocast(world.device.type, dtype=dtype, enabled=dtype != torch.float32):
                terms = distiller.replace(beta=1.0)(model, batch, True).terms
            model.train(was_training)
        rest = (1 - spec.alpha) * terms.ce + (spec.alpha * terms.kd if terms.kd is not None else 0.0)
        rest = rest + (spec.gamma * terms.rel if terms.rel is not None else 0.0)
        values = torch.stack([rest, terms.pt]).float()
        dist.all_reduce(values)
        rest, pt = (values / world.world_size).tolist()
        if not pt > 0:
            raise PkdError(f"--beta-share {self.cfg.options.beta_share}: the patient loss is {pt:g} on the first batch (the student's "
                           f"layers equal the teacher layers {list(spec.layer_map)} they learn from), so no β scales it; give --beta")
        beta = self.cfg.options.beta_share / (1 - self.cfg.options.beta_share) * rest / pt
        log.info("%s: --beta-share %g → β = %.6g ((1-α)·CE + α·KD %.4g, PT %.4g on the first batch)",
                 name, self.cfg.options.beta_share, beta, rest, pt)
        return beta

    def _run_key(self, spec: Run) -> dict:
        return common.run_key(self.cfg, self.ds_config, run=spec.name, layer_map=spec.layer_map, alpha=spec.alpha,
                              beta=spec.beta, lr=spec.lr, epochs=spec.epochs)

    # -- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """Dev metrics of every dev split, and of its two fixed halves (metrics.dev_halves), each rank scoring
        its slice; all ranks get the same dict."""
        was_training = model.training
        model.eval()
        results = {}
        for split, dev in self.dev_sets.items():
            batches, _ = self.inference_batches(dev)
            rows = []
            for batch, counted in batches:
                logits = model(**model_inputs(model, batch)).logits.float()
                if counted:
                    rows.append((batch["example_idx"].cpu(), logits.cpu(), batch["labels"].cpu()))
            gathered = [None] * self.world.world_size
            dist.all_gather_object(gathered, rows)
            idx, logits, labels = (torch.cat([r[i] for part in gathered for r in part]) for i in range(3))
            order = np.argsort(idx.numpy())  # each row once, in dev order (the halves are row positions)
            results[split] = glue_metrics_with_halves(logits.numpy()[order], labels.numpy()[order], self.task)
        model.train(was_training)
        return results if len(results) > 1 else next(iter(results.values()))

    # -- teacher cache -------------------------------------------------------------------------------
    def ensure_cache(self, teacher_path: str) -> TeacherCache:
        """The store under --teacher-cache for this teacher and training set. --stage student only opens
        it (any mismatch is an error); --stage cache and all reuse a matching one, or write it where there
        is none, or where the store there is of this teacher and data but damaged or lacks layers. A store
        of another teacher or data set is replaced only with --overwrite-cache."""
        cfg = self.cfg
        fingerprint = teacher_cache.fingerprint(
            teacher_path, self.tokenizer, self.task.name, cfg.max_seq_length, self.train_set, deepspeed_json.train_dtype(self.ds_config)
        )
        return teacher_cache.open_or_write(
            TeacherCache, cfg.teacher_cache, fingerprint, verify=cfg.verify_cache, reading_only=cfg.stage == "student",
            overwrite=cfg.overwrite_cache, write=lambda: self.write_cache(teacher_path, fingerprint),
            require=lambda cache: cache.require(cfg.cache_layers or range(cache.layout.teacher_layers + 1), cfg.pt_tokens,
                                                self.relation_layer))

    @torch.no_grad()
    def write_cache(self, teacher_path: str, fingerprint: dict) -> TeacherCache:
        """One pass of the frozen teacher over the training set, each rank over its slice, into the store (with
        a relation term, its relation layer's Q, K, V, caught by hooks in the same forward)."""
        model = load_classifier(teacher_path, self.task)
        n = num_layers(model)
        layout = teacher_cache.Layout(
            rows=len(self.train_set), num_labels=self.task.num_labels, teacher_layers=n, hidden_size=model.config.hidden_size,
            layers=tuple(sorted(set(self.cfg.cache_layers or range(n + 1)))),
            positions=self.cfg.max_seq_length if self.cfg.pt_tokens == "all" else 1, dtype=fingerprint["dtype"],
            pooled="mean" if self.cfg.pt_tokens == "mean" else "cls",
            relation_layer=self.relation_layer or 0, relation_positions=self.cfg.max_seq_length if self.relation_layer else 0,
        )
        with teacher_cache.Writer(self.cfg.teacher_cache, fingerprint, layout, self.world) as writer:
            batches, n_batches = self.inference_batches(self.train_set)
            return self.write_teacher_store(
                writer, model, self.relation_layer, batches, n_batches,
                forward=lambda teacher, batch: teacher(**model_inputs(teacher, batch), output_hidden_states=True),
                write=lambda batch, out, qkv: writer.write(batch["example_idx"], out.logits, out.hidden_states, batch["attention_mask"], qkv))

    def evaluate_only(self, model, name: str) -> dict:
        """Dev metrics of an already fine-tuned model (the teacher row of the table)."""
        return super().evaluate_only(model, {"strategy": name, "layers": num_layers(model)})


def render_table(summary: dict, task: Task) -> str:
    """Markdown: one row per model, the task's metrics in percent."""
    runs = summary["runs"]
    note = f"{summary['train_rows']:,} of {summary['train_rows_available']:,} training rows"
    if summary["preset"]:
        note += f" (--preset {summary['preset']}: {PRESETS[summary['preset']]})"
    names = {"teacher": "Teacher", "ft": "FT", "kd": "KD", "skip": "PKD-Skip", "last": "PKD-Last"}
    metric_cols = _metric_columns(task)
    rows = [[names.get(name, name), str(r.get("student_layers") or r.get("layers") or "-"),
             ",".join(map(str, r.get("layer_map") or [])) or "-", *(_metric_value(r["dev"], col) for col in metric_cols)]
            for name, r in runs.items()]
    return common.results_table(f"**{task.name}** dev, {note}", ["model", "layers", "layer map", *metric_cols], rows, list(runs.values()))


def _metric_columns(task: Task) -> list[str]:
    if len(task.dev_splits) == 1:
        return list(task.metrics)
    return [f"{split}/{m}" for split in task.dev_splits for m in task.metrics]


def _metric_value(dev: dict, col: str) -> str:
    if "/" in col:
        split, metric = col.split("/")
        return f"{dev[split][metric]:.2f}"
    return f"{dev[col]:.2f}"

