"""The masked-LM recipe (--objective mlm): task-agnostic PKD on raw text.

teacher   An encoder with its family's masked-LM head (pkd_fast.families) is used as is. A headless one
          (the default all-MiniLM-L6-v2) first gets a head fitted on the corpus (--stage teacher, or all): the decoder is tied to the word
          embeddings, so only the transform, its LayerNorm and the output bias are new and train; the body
          stays frozen unless --teacher-lr is given (then all of it trains, at that lr). Saved as the
          family's masked-LM model (+ tokenizer) under <output-dir>/teacher/model.
student   The teacher's embeddings, the chosen layers (--student-layer-choice / --student-layer-list) and
          its MLM head, trained with
              (1-α)·CE(masked tokens) + α·T²·KL(--kd-positions rows) + β·PT
          where PT pairs student layer j (j < k) with the teacher layer it was copied from, over every real
          token or [CLS] (--pt-tokens); the top layer learns through the head's terms. Only the gathered
          rows go through either LM head (`models.MaskedLMRows`); the teacher runs under no_grad. Saved as its
          masked-LM model (+ tokenizer) under <output-dir>/students/<choice>/model, which
          `--objective glue --init-from pretrained --base-model DIR` starts a task distillation from.
cache     With --teacher-cache DIR, --stage cache (or all) runs the teacher once over every epoch's masked
          blocks and stores its top-k logits and mapped states (`pkd_fast.mlm_cache`); students then read
          their rows in the collate and learn a sparse KL (`losses.topk_kd_loss`); no teacher is loaded.
relations With --relation-weight γ, MiniLMv2's Q-Q, K-K, V-V relations of one teacher layer and one student
          layer (--relation-layers T:S) join the loss, the Q, K, V caught by hooks during the two forwards
          (`pkd_fast.relations`). With --alpha 0 --mlm-ce-weight 0 no term reads logits (MiniLMv2's general
          objective, with --beta 0): a headless teacher is then used as it ships, no head is fitted, and the
          student is a bare encoder (its held-out score: the relation loss to the teacher).
held out  Masked-LM loss and accuracy on --validation-files, or else on the corpus's last 1% of blocks
          (at least 8; never trained on), masked once with a fixed seed so every evaluation scores the same tokens.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoTokenizer, set_seed

from pkd_fast import cache as teacher_cache
from pkd_fast import corpus
from pkd_fast import data
from pkd_fast import deepspeed_json
from pkd_fast import mlm_cache
from pkd_fast.config import Config, Need, Objective, int_list, register
from pkd_fast.dist import Dist
from pkd_fast.distill import Distiller, DistillSpec
from pkd_fast.errors import PkdError
from pkd_fast.families import model_inputs, width_config
from pkd_fast.losses import relation_loss_reference
from pkd_fast.mlm_cache import MlmTeacherCache
from pkd_fast.models import (MaskedLMRows, build_mlm_student, check_max_seq_length, fresh_mlm_head, has_mlm_head, load_encoder,
                             load_mlm_teacher, mlm_row_index, mlm_rows, mlm_student_layers, model_config,
                             scratch_mlm_student)
from pkd_fast.recipes import common
from pkd_fast.relations import RelationPlan, relation_plan
from pkd_fast.teacher import Rows, TeacherSource

log = logging.getLogger("pkd_fast")
# Without --validation-files: the corpus's last 1% of blocks, at least HELD_OUT_MIN (one block, often the
# short last one, may hold no masked token at all).
HELD_OUT_SHARE, HELD_OUT_MIN = 0.01, 8


@dataclass
class MlmRun:
    """One training run: the teacher's head fit or the student's distillation."""

    name: str  # "teacher" or the student's layer choice
    lr: float
    epochs: int | None  # None: --max-steps
    out: Path
    layers: tuple[int, ...] = ()  # the student's teacher layers (1-based)
    pt_map: tuple[int, ...] = ()  # teacher layers the student's layers 1..k-1 learn from
    alpha: float = 0.0
    beta: float = 0.0
    gamma: float = 0.0  # the relation term's weight
    ce_weight: float = 1.0  # the masked-LM CE's weight w: w·(1-α)·CE


def run(cfg: Config) -> dict:
    # every flag against the teacher's config (no weights loaded), before any work (nothing started yet)
    teacher_config = model_config("--teacher", cfg.teacher)
    check_max_seq_length(cfg.max_seq_length, "--teacher", teacher_config)
    headless = not has_mlm_head(cfg.teacher)
    if reads_logits(cfg) and headless and cfg.stage in ("student", "cache"):
        raise PkdError(f"--teacher {cfg.teacher} has no masked-LM head to {'distil from' if cfg.stage == 'student' else 'cache'}; "
                       f"fit one first with --stage teacher (or --stage all), then pass --teacher {Path(cfg.output_dir) / 'teacher' / 'model'}")
    relations = None
    if cfg.stage != "teacher":  # a bad layer choice or relation term fails before any work (a fitted head keeps the depth)
        layers = mlm_student_layers(cfg.options.student_layer_choice, teacher_config.num_hidden_layers, cfg.student_layers, cfg.options.student_layer_list)
        if cfg.relation_weight:
            relations = relation_plan(cfg.relation_layers, cfg.relation_heads, teacher_config, len(layers),
                                      cfg.student_hidden_size or teacher_config.hidden_size)
        if cfg.init_from == "scratch" and cfg.stage in ("all", "student"):  # the width against the teacher's heads
            width_config(teacher_config, len(layers), cfg.student_hidden_size or teacher_config.hidden_size)
    world, out, ds_config, device = common.start(cfg)
    if not reads_logits(cfg):
        log.info("no term reads logits (--alpha 0, --mlm-ce-weight 0): the teacher is used as its encoder, no masked-LM head "
                 "is fitted or trained")
    ctx = MlmContext(cfg, world, ds_config, AutoTokenizer.from_pretrained(cfg.teacher), out, relations)
    fits_head = headless and reads_logits(cfg)
    if not cfg.options.streaming and (fits_head or cfg.stage != "teacher"):  # something trains on the blocks: checked before it does
        ctx.trainer.require_full_step(ctx.train_blocks, f"training blocks of {cfg.max_seq_length} tokens",
                                      "give more text or a shorter --max-seq-length")

    results, teacher_path = {}, cfg.teacher
    if cfg.stage in ("all", "teacher") and reads_logits(cfg):
        if headless:
            results["teacher"] = ctx.fit_head()
            teacher_path = str(out / "teacher" / "model")
        else:
            log.info("--teacher %s has a masked-LM head: used as is", cfg.teacher)
            results["teacher"] = ctx.evaluate_only(teacher_path)
    cache = None
    if cfg.teacher_cache and (cfg.stage in ("all", "cache") or (cfg.stage == "student" and cfg.reads_teacher)):
        cache = ctx.ensure_cache(teacher_path)
    if cfg.stage in ("all", "student"):
        name, result = ctx.distil(teacher_path, cache)
        results[name] = result

    summary = {"objective": "mlm", "teacher": cfg.teacher, "train_blocks": ctx.train_blocks, "device": device, "runs": results}
    common.write_results(world, out, summary, render_table(summary) if results else None)  # --stage cache: no table
    return summary


def reads_logits(cfg: Config) -> bool:
    """Whether the student's loss reads logits (CE or KL): only then do teacher and student need an MLM head."""
    return cfg.alpha > 0 or cfg.options.mlm_ce_weight > 0


def _resolve_flags(cfg: Config) -> None:
    if cfg.options.student_layer_choice is None and cfg.options.student_layer_list is None:
        # a scratch student copies no layer, only its depth counts: "first" allows any --student-layers up to
        # the teacher's, "alternate" gives half the teacher's depth without it
        cfg.options.student_layer_choice = "first" if cfg.init_from == "scratch" and cfg.student_layers else "alternate"


def _validate_flags(cfg: Config, need: Need) -> None:
    need((cfg.options.text_files is None) != (cfg.options.dataset is None), "--objective mlm reads one corpus: give --text-files or --dataset")
    need(cfg.options.dataset_config is None or cfg.options.dataset is not None, "--dataset-config only applies with --dataset")
    need(0.0 < cfg.options.mlm_probability < 1.0, f"--mlm-probability must be between 0 and 1, got {cfg.options.mlm_probability}")
    need(cfg.options.kd_positions in KD_POSITIONS, f"--kd-positions must be one of {KD_POSITIONS}, got {cfg.options.kd_positions!r}")
    need(cfg.options.student_layer_choice is None or cfg.options.student_layer_list is None,
         "--student-layer-choice and --student-layer-list both pick the student's layers; give one")
    need(cfg.options.student_layer_choice is None or cfg.options.student_layer_choice in STUDENT_LAYER_CHOICES,
         f"--student-layer-choice must be one of {STUDENT_LAYER_CHOICES}, got {cfg.options.student_layer_choice!r}")
    need(cfg.options.student_layer_list is None or bool(cfg.options.student_layer_list), "--student-layer-list: no layers given")
    need(cfg.options.cache_topk >= 1, f"--cache-topk must be >= 1, got {cfg.options.cache_topk}")
    need(math.isfinite(cfg.options.mlm_ce_weight) and cfg.options.mlm_ce_weight >= 0, f"--mlm-ce-weight must be >= 0, got {cfg.options.mlm_ce_weight}")
    need(reads_logits(cfg) or cfg.relation_weight > 0,
         "--alpha 0 --mlm-ce-weight 0 leave no term on the logits: the run needs --relation-weight > 0 (the student, a bare "
         "encoder then, is scored by its relations to the teacher)")
    if cfg.options.streaming:
        need(cfg.teacher_cache is None, "--teacher-cache needs a map-style corpus: a stream's blocks have no fixed index to "
                                        "store the teacher's outputs by; drop --streaming or --teacher-cache")
        need(cfg.max_steps is not None, "--streaming needs --max-steps (a stream has no length to count epochs by)")
        need(cfg.options.validation_files is not None,
             "--streaming needs --validation-files (a stream has no held-out tail to evaluate on)")
    for flag, globs in (("--text-files", cfg.options.text_files), ("--validation-files", cfg.options.validation_files)):
        if globs is not None:
            corpus.resolve_text_files(globs, flag)  # each glob must match a file of a known format
    need(cfg.init_from in (None, "teacher", "scratch"),
         f"--init-from {cfg.init_from}: --objective mlm starts the student from the teacher's layers (teacher, the default) "
         "or from random weights (scratch)")
    if cfg.init_from == "scratch":
        need(cfg.beta == 0, "--init-from scratch with --beta > 0: under --objective mlm a scratch student's hidden states are "
                            "not the teacher's layers' (and may differ in width); use --beta 0 (KD, CE and relations need no PT)")
    if cfg.teacher_lr is not None:
        need(cfg.stage in ("all", "teacher"), "--teacher-lr only applies when the teacher's head is fitted (--stage teacher or all)")


KD_POSITIONS = ("masked", "all")
STUDENT_LAYER_CHOICES = ("first", "alternate")


@dataclass
class MlmOptions:
    """The flags only --objective mlm reads (`cfg.options`); None where not given (`OBJECTIVE.defaults`)."""

    text_files: tuple[str, ...] | None = None  # globs
    validation_files: tuple[str, ...] | None = None  # globs; default: the last 1% of the training blocks
    dataset: str | None = None  # a `datasets` corpus instead of --text-files
    dataset_config: str | None = None
    text_column: str | None = None  # default text
    streaming: bool = False
    mlm_probability: float | None = None  # default 0.15
    kd_positions: str | None = None  # default all: KL over every real token (masked: only the masked ones)
    student_layer_choice: str | None = None  # default alternate (unless --student-layer-list)
    student_layer_list: tuple[int, ...] | None = None
    cache_topk: int | None = None  # default 64: the teacher's top-k logits a masked-LM cache keeps per KD row
    mlm_ce_weight: float | None = None  # default 1: the masked-LM CE's weight w, so w·(1-α)·CE


def _globs(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _add_flags(p) -> None:
    g = p.add_argument_group("mlm (--objective mlm)")
    g.add_argument("--text-files", type=_globs, default=None, metavar="GLOB[,GLOB]",
                   help=".txt/.text (a document per line) or .jsonl (--text-column field), optionally .gz")
    g.add_argument("--dataset", default=None, metavar="NAME", help="a `datasets` corpus instead of --text-files")
    g.add_argument("--dataset-config", default=None, metavar="C", help="its configuration name")
    g.add_argument("--text-column", default=None, help="the text field of .jsonl lines or --dataset rows (default text)")
    g.add_argument("--validation-files", type=_globs, default=None, metavar="GLOB[,GLOB]",
                   help="held-out text for the masked-LM loss/accuracy (default: the last 1%% of the training blocks)")
    g.add_argument("--streaming", action="store_true",
                   help="read the corpus lazily (no cache; needs --max-steps and --validation-files)")
    g.add_argument("--mlm-probability", type=float, default=None, help="share of tokens masked, 80/10/10 (default 0.15)")
    g.add_argument("--student-layer-choice", choices=STUDENT_LAYER_CHOICES, default=None,
                   help="the teacher layers the student is built from: first k, or alternate 1,3,5,... (default alternate)")
    g.add_argument("--student-layer-list", type=int_list, default=None, metavar="1,3,5",
                   help="those layers explicitly (1-based); student layer j learns from the teacher layer it was copied from")
    g.add_argument("--mlm-ce-weight", type=float, default=None, metavar="W",
                   help="the masked-LM CE's weight, W·(1-α)·CE (default 1); 0 with --alpha 0 --beta 0 --relation-weight γ "
                        "is MiniLMv2's relations-only objective, which needs no MLM head")
    g.add_argument("--kd-positions", choices=KD_POSITIONS, default=None,
                   help="rows of the soft-label KL, the masked tokens or every real token (default all)")
    g.add_argument("--cache-topk", type=int, default=None,
                   help="the teacher's top-k logits kept per KD row (default 64), with the full row's logsumexp at --temperature; "
                        "students then learn a sparse KL (the rest of the teacher's mass in one bucket)")


OBJECTIVE = register(Objective(
    "mlm", run, "masked-LM distillation on raw text (--text-files or --dataset)", stages=("all", "teacher", "cache", "student"),
    options=MlmOptions, add_flags=_add_flags,
    defaults={"text_column": "text", "mlm_probability": 0.15, "kd_positions": "all", "pt_tokens": "all", "cache_topk": 64,
              "mlm_ce_weight": 1.0},
    resolve=_resolve_flags, validate=_validate_flags,
    reads_teacher=lambda cfg: cfg.alpha > 0 or cfg.beta > 0 or cfg.relation_weight > 0,
    teacher_flags="--alpha, --beta or --relation-weight > 0",
))


class MlmContext(common.RecipeContext):
    """What the runs of one invocation share: config, process group, tokenizer, corpus, training loop."""

    def __init__(self, cfg: Config, world: Dist, ds_config: dict, tokenizer, out: Path, relations: RelationPlan | None = None):
        super().__init__(cfg, world, ds_config, tokenizer)
        self.relations = relations  # the relation term's layers and heads (--relation-weight; `relations.relation_plan`)
        self.training: Distiller | None = None  # the training student's step: its relation hooks (`distil`, `evaluate_relations`)
        self.held_out_teacher: TeacherSource | None = None  # a headless student's scorer (`distil`, `evaluate_relations`)
        source = {"text_files": cfg.options.text_files, "dataset": cfg.options.dataset, "dataset_config": cfg.options.dataset_config,
                  "text_column": cfg.options.text_column}
        self.cache_dir = out / "corpus_cache"
        if cfg.options.streaming:
            self.source, self.train_set, self.train_blocks = source, None, None
        else:
            blocks = self._blocks(**source)
            if cfg.options.validation_files is not None:
                self.train_set = blocks
            else:
                n_held = max(HELD_OUT_MIN, int(len(blocks) * HELD_OUT_SHARE))
                if len(blocks) < 2 * n_held:
                    raise PkdError(f"the corpus packs into {len(blocks)} block(s) of {cfg.max_seq_length} tokens: too few to "
                                   f"hold out {n_held} for evaluation; give more text or --validation-files")
                self.train_set = blocks.select(range(len(blocks) - n_held))
                self.held_out = blocks.select(range(len(blocks) - n_held, len(blocks)))
            self.train_blocks = len(self.train_set)
        if cfg.options.validation_files is not None:
            self.held_out = self._blocks(text_files=cfg.options.validation_files, text_column=cfg.options.text_column, flag="--validation-files")
        # Every evaluation masks the held-out blocks alike (epoch 0), so a set that masking leaves empty is
        # known now, before the head or the student is trained, not at the first evaluation.
        self.held_out_masker = corpus.MlmMasker(tokenizer, cfg.options.mlm_probability, seed=cfg.seed)
        if not corpus.masks_any(self.held_out, self.held_out_masker):
            where = f"--validation-files {','.join(cfg.options.validation_files)}" if cfg.options.validation_files else "the corpus's held-out tail"
            raise PkdError(f"{where}: masking (--mlm-probability {cfg.options.mlm_probability:g}) selects no token in its "
                           f"{len(self.held_out)} block(s), so there is nothing to score; give more held-out text")
        log.info("corpus: %s training blocks of %d tokens, %d held-out blocks",
                 "streamed" if cfg.options.streaming else f"{self.train_blocks:,}", cfg.max_seq_length, len(self.held_out))

    def _blocks(self, **source) -> datasets.Dataset:
        """Packed blocks of a map-style corpus: built (and cached) by the main rank, then loaded by the others."""
        if not self.world.is_main:
            dist.barrier()
        blocks = corpus.prepare_blocks(self.tokenizer, self.cfg.max_seq_length, self.cache_dir, **source)
        if self.world.is_main:
            dist.barrier()
        return blocks

    def train_loader(self, distiller: Distiller | None = None) -> corpus.MlmLoader:
        """A fresh loader for one run (a stream starts from its beginning); its collate masks each batch, then
        adds what the distiller reads there (`Distiller.lookup`: a cache's rows)."""
        lookup = distiller.lookup() if distiller is not None else None
        cfg, world = self.cfg, self.world
        if cfg.options.streaming:
            docs = corpus.stream_documents(**self.source, rank=world.rank, world_size=world.world_size)
            stream = corpus.StreamingBlocks(docs, self.tokenizer, cfg.max_seq_length, rank=world.rank, world_size=world.world_size)
            return corpus.stream_loader(stream, self.tokenizer, self.micro_batch, seed=cfg.seed, mlm_probability=cfg.options.mlm_probability,
                                        lookup=lookup)
        return corpus.map_loader(self.train_set, self.tokenizer, self.micro_batch, seed=cfg.seed, mlm_probability=cfg.options.mlm_probability,
                                 rank=world.rank, world_size=world.world_size, lookup=lookup)

    def student_plan(self, teacher_layers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The student's teacher layers (1-based) and the PT map its layers 1..k-1 learn from (none without β)."""
        cfg = self.cfg
        layers = mlm_student_layers(cfg.options.student_layer_choice, teacher_layers, cfg.student_layers, cfg.options.student_layer_list)
        return layers, layers[:-1] if cfg.beta else ()

    def epochs_needed(self) -> int:
        """The passes a student of this run makes: --epochs, or the epochs --max-steps reaches (whose masks a
        teacher cache must hold)."""
        if self.cfg.epochs is not None:
            return self.cfg.epochs
        steps_per_epoch = len(self.train_loader()) // self.trainer.accum
        return -(-self.cfg.max_steps // steps_per_epoch)

    # -- the two runs --------------------------------------------------------------------------------
    def fit_head(self) -> dict:
        """Fit a fresh MLM head (and, with --teacher-lr, the body) on the corpus: plain masked-LM CE."""
        cfg = self.cfg
        spec = MlmRun("teacher", cfg.teacher_lr or cfg.lr, cfg.teacher_epochs or cfg.epochs, self._out("teacher"))
        set_seed(cfg.seed)
        model = MaskedLMRows(fresh_mlm_head(cfg.teacher, train_body=cfg.teacher_lr is not None))
        trains = "head and body" if cfg.teacher_lr is not None else "head only (body frozen)"
        return self._fit(model, spec, None, f", fitting a masked-LM head on {cfg.teacher}: {trains}", {"trains": trains})

    def distil(self, teacher_path: str, cache: MlmTeacherCache | None = None) -> tuple[str, dict]:
        """Distil a student from the teacher at `teacher_path`, or from `cache`'s rows (then the teacher's
        weights only initialise the student, and nothing of it runs or stays in memory)."""
        cfg = self.cfg
        teacher = load_mlm_teacher(teacher_path) if reads_logits(cfg) else load_encoder(teacher_path)
        n = teacher.config.num_hidden_layers
        layers, pt_map = self.student_plan(n)
        name = cfg.options.student_layer_choice or "layers_" + "_".join(map(str, layers))
        scratch_width = (cfg.student_hidden_size or teacher.config.hidden_size) if cfg.init_from == "scratch" else None
        if scratch_width:
            name = f"scratch_{len(layers)}x{scratch_width}"
        spec = MlmRun(name, cfg.lr, cfg.epochs, self._out("students", name), layers, pt_map, cfg.alpha, cfg.beta,
                      cfg.relation_weight, cfg.options.mlm_ce_weight)
        set_seed(cfg.seed)
        student = MaskedLMRows(scratch_mlm_student(teacher, len(layers), scratch_width) if scratch_width else build_mlm_student(teacher, layers))
        cached = cache is not None and bool(spec.alpha or spec.pt_map or spec.gamma)
        if cached:
            cache.require(spec.pt_map, self.epochs_needed(), self.relations.teacher_layer if spec.gamma else None, logits=spec.alpha > 0)
        source = cache if cached else teacher  # a live teacher is cast and moved by the Distiller, after the student is built
        del teacher  # a live source holds what it runs; a cached one needs nothing of it
        init = f"random weights, {len(layers)} layers of width {scratch_width}" if scratch_width else f"teacher layers {list(layers)} of {n}"
        # A cached teacher's top-k KL is another loss than a live teacher's: its runs are keyed apart.
        return name, self._fit(student, spec, source, f", {init}, KL over {cfg.options.kd_positions} rows", {
            "teacher": teacher_path, "layers": list(layers), "layer_map": list(spec.pt_map), "alpha": spec.alpha,
            "beta": spec.beta, "gamma": spec.gamma, "mlm_ce_weight": spec.ce_weight, "temperature": cfg.temperature,
            "kd_positions": cfg.options.kd_positions, "pt_tokens": cfg.pt_tokens, "pt_reduction": cfg.pt_reduction,
            "teacher_source": f"cache (top-{cfg.options.cache_topk})" if cached else "live",
        }, {"teacher_source": "cache"} if cached else {}, held_out_teacher=teacher_path if cached else None)

    def step_spec(self, spec: MlmRun) -> DistillSpec:
        """The distillation step of `spec` on the masked-LM rows (KL over --kd-positions)."""
        cfg = self.cfg
        return DistillSpec(alpha=spec.alpha, beta=spec.beta, gamma=spec.gamma, temperature=cfg.temperature, layer_map=spec.pt_map,
                           pt_tokens=cfg.pt_tokens, pt_reduction=cfg.pt_reduction, relations=self.relations if spec.gamma else None,
                           loss_impl=cfg.loss_impl, ce_weight=spec.ce_weight, logit_rows=cfg.options.kd_positions, student_head=reads_logits(cfg))

    def _out(self, *parts: str) -> Path:
        return Path(self.cfg.output_dir, *parts)

    def _fit(self, model: MaskedLMRows, spec: MlmRun, teacher, describe: str, summary: dict, key: dict | None = None,
             held_out_teacher: str | None = None) -> dict:
        """Train `model` on `spec` from `teacher` (a module, a store or None: `Distiller`); `key`: what else the
        run's results depend on (its run key). A student scored by its relations alone is scored against the
        live teacher, the training one or, when that is a store, the encoder at `held_out_teacher`."""
        cfg = self.cfg
        run_key = common.run_key(cfg, self.ds_config, run=spec.name, layers=spec.layers, layer_map=spec.pt_map,
                                 alpha=spec.alpha, beta=spec.beta, lr=spec.lr, epochs=spec.epochs, **(key or {}))
        step_spec = self.step_spec(spec)

        def distiller() -> Distiller:
            self.training = Distiller(teacher, model, step_spec, ds_config=self.ds_config, device=self.world.device)
            if not reads_logits(cfg):  # no store has the held-out blocks' relations
                self.held_out_teacher = (self.training.teacher if held_out_teacher is None else
                                         Distiller.teacher_source(load_encoder(held_out_teacher), step_spec, self.ds_config,
                                                                  self.world.device))
            return self.training

        return self.train(model, name=spec.name, out=spec.out, key=run_key, lr=spec.lr, epochs=spec.epochs, distiller=distiller,
                          loader=self.train_loader, describe=describe, summary=lambda result, step: {
                              "objective": "mlm", "run": spec.name, **summary,
                              "student_layers": result.engine.module.model.config.num_hidden_layers, "lr": spec.lr,
                              "epochs": spec.epochs, "max_steps": cfg.max_steps, "mlm_probability": cfg.options.mlm_probability,
                              "seed": cfg.seed, "train_blocks": self.train_blocks})

    # -- teacher cache -------------------------------------------------------------------------------
    def ensure_cache(self, teacher_path: str) -> MlmTeacherCache:
        """The masked-LM store under --teacher-cache for this teacher, corpus, masking, k and T: opened
        (--stage student), or reused or written (--stage cache, all) as `cache.open_or_write` rules."""
        cfg = self.cfg
        fingerprint = mlm_cache.fingerprint(
            teacher_path, self.tokenizer, self.train_set, cfg.max_seq_length, deepspeed_json.train_dtype(self.ds_config), mask_seed=cfg.seed,
            mlm_probability=cfg.options.mlm_probability, kd_positions=cfg.options.kd_positions, topk=cfg.options.cache_topk, temperature=cfg.temperature)
        return teacher_cache.open_or_write(
            MlmTeacherCache, cfg.teacher_cache, fingerprint, verify=cfg.verify_cache, reading_only=cfg.stage == "student",
            overwrite=cfg.overwrite_cache, write=lambda: self.write_cache(teacher_path, fingerprint),
            require=lambda cache: cache.require(self.cache_layers(cache.layout.teacher_layers), self.epochs_needed(),
                                                self.relations.teacher_layer if self.relations else None, logits=self.cfg.alpha > 0))

    def cache_layers(self, teacher_layers: int) -> tuple[int, ...]:
        """The layers a store keeps states of: --cache-layers, else the PT map of the student these flags describe."""
        if self.cfg.cache_layers is not None:
            return tuple(sorted(set(self.cfg.cache_layers)))
        return tuple(sorted(self.student_plan(teacher_layers)[1]))

    @torch.no_grad()
    def write_cache(self, teacher_path: str, fingerprint: dict) -> MlmTeacherCache:
        """One pass of the frozen teacher per epoch over that epoch's masked blocks, each rank over its
        slice, into the store: the top-k of each KD row (none from a headless teacher), the stored layers' states
        and, with a relation term, its teacher layer's Q, K, V (caught by hooks in the same forward)."""
        cfg, world = self.cfg, self.world
        logits = has_mlm_head(teacher_path)
        model = load_mlm_teacher(teacher_path) if logits else load_encoder(teacher_path)
        n, vocab = model.config.num_hidden_layers, model.config.vocab_size
        if logits and cfg.options.cache_topk > vocab:
            raise PkdError(f"--cache-topk {cfg.options.cache_topk}: the teacher's vocabulary has {vocab} entries")
        layers, epochs = self.cache_layers(n), self.epochs_needed()
        masker = corpus.MlmMasker(self.tokenizer, cfg.options.mlm_probability, seed=cfg.seed)
        offsets = mlm_cache.kd_row_offsets(self.train_set, masker, epochs, cfg.options.kd_positions)
        layout = mlm_cache.MlmLayout(
            blocks=self.train_blocks, epochs=epochs, tokens=int(mlm_cache.block_lengths(self.train_set).sum()),
            positions=cfg.max_seq_length, kd_rows=int(offsets[-1]), topk=cfg.options.cache_topk, teacher_layers=n,
            hidden_size=model.config.hidden_size, layers=layers, dtype=fingerprint["dtype"], temperature=cfg.temperature,
            relation_layer=self.relations.teacher_layer if self.relations else 0, logits=logits)
        with mlm_cache.MlmWriter(cfg.teacher_cache, fingerprint, layout, world, offsets) as writer:
            per_epoch = data.inference_batches(self.train_set, self.tokenizer, 2 * self.micro_batch, rank=world.rank,
                                                    world_size=world.world_size, lookup=masker)[1]

            def batches():
                for epoch in range(epochs):
                    masker.set_epoch(epoch)  # the collate masks as each epoch's batches are drawn
                    yield from data.inference_batches(self.train_set, self.tokenizer, 2 * self.micro_batch, rank=world.rank,
                                                           world_size=world.world_size, lookup=masker)[0]

            def forward(teacher, batch):
                units, counts = mlm_cache.batch_units(batch, layout.blocks), mlm_cache.batch_kd_counts(batch, cfg.options.kd_positions)
                batch = data.batch_to_device(batch, world.device)
                kd_logits, hidden = teacher(**model_inputs(teacher, batch), output_hidden_states=bool(layers),
                                            row_index=mlm_row_index(batch, cfg.options.kd_positions) if logits else None)
                return units, counts, kd_logits, hidden, batch["attention_mask"]

            return self.write_teacher_store(writer, MaskedLMRows(model), layout.relation_layer, batches(), epochs * per_epoch,
                                            forward=forward, write=lambda batch, out, qkv: writer.write(*out, qkv))

    # -- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """Masked-LM loss and accuracy (%) over the held-out blocks' masked tokens, each rank scoring its
        slice; all ranks get the same dict. Every rank runs the same number of forwards (ZeRO-3 needs it):
        a rank with a short slice, or none, runs filler batches without counting them (`data.inference_batches`).
        A student without a head (no term reads logits) gets `evaluate_relations` instead."""
        if not reads_logits(self.cfg):
            return self.evaluate_relations(model)
        was_training = model.training
        model.eval()
        batches, _ = self.inference_batches(self.held_out, lookup=self.held_out_masker)
        sums = torch.zeros(3, dtype=torch.float64, device=self.world.device)  # CE sum, correct, masked tokens
        for batch, counted in batches:
            rows = mlm_rows(model, batch, rows="masked")
            if counted:
                logits = rows.logits.float()
                correct = (logits.argmax(-1) == rows.labels).sum()
                sums += torch.stack([F.cross_entropy(logits, rows.labels, reduction="sum").double(), correct.double(),
                                     correct.new_tensor(rows.labels.numel(), dtype=torch.float64)])
        dist.all_reduce(sums)
        model.train(was_training)
        loss, correct, count = sums.tolist()
        return {"mlm_loss": loss / count, "mlm_accuracy": 100.0 * correct / count, "masked_tokens": int(count)}

    @torch.no_grad()
    def evaluate_relations(self, model) -> dict:
        """The held-out relation loss of a headless student to the teacher (the training term, as a mean per
        real token over the blocks), on the same masked inputs and ranks as `evaluate`."""
        was_training = model.training
        model.eval()
        batches, _ = self.inference_batches(self.held_out, lookup=self.held_out_masker)
        sums = torch.zeros(2, dtype=torch.float64, device=self.world.device)  # loss × real tokens, real tokens
        for batch, counted in batches:
            capture = self.training.capture
            with capture.recording():
                mlm_rows(model, batch, head=False)
            student_qkv = torch.stack(capture.take())
            t = self.held_out_teacher(batch, Rows(logits=mlm_row_index(batch)))
            if counted:
                tokens = batch["attention_mask"].sum().double()
                loss = relation_loss_reference(student_qkv, t.qkv, batch["attention_mask"], self.relations.heads).double()
                sums += torch.stack([loss * tokens, tokens])
        dist.all_reduce(sums)
        model.train(was_training)
        loss, tokens = sums.tolist()
        return {"relation_loss": loss / tokens, "tokens": int(tokens)}

    def evaluate_only(self, path: str) -> dict:
        """Held-out metrics of a teacher that already has its head (the teacher row of the table)."""
        teacher = load_mlm_teacher(path)
        return super().evaluate_only(MaskedLMRows(teacher), {"run": "teacher", "student_layers": teacher.config.num_hidden_layers})


def render_table(summary: dict) -> str:
    """Markdown: one row per model, held-out masked-LM loss and accuracy."""
    blocks, runs = summary["train_blocks"], summary["runs"]
    def score(dev: dict, name: str, digits: int) -> str:
        return f"{dev[name]:.{digits}f}" if name in dev else "-"

    relations = any("relation_loss" in r["dev"] for r in runs.values())  # a headless student's score (relations only)
    rows = [[name, ",".join(map(str, r["layers"])) if r.get("layers") else str(r["student_layers"]),
             score(r["dev"], "mlm_loss", 4), score(r["dev"], "mlm_accuracy", 2), *([score(r["dev"], "relation_loss", 4)] if relations else [])]
            for name, r in runs.items()]
    title = f"**masked LM**, {'a streamed corpus' if blocks is None else f'{blocks:,} training blocks'}, held-out masked tokens"
    columns = ["model", "layers", "MLM loss", "MLM accuracy", *(["relation loss"] if relations else [])]
    return common.results_table(title, columns, rows, list(runs.values()))
