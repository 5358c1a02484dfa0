"""Teacher loading, student construction from the teacher's lower layers, and PKD layer maps.

Layer numbers are 1-based: `hidden_states[i]` is layer i's output and `hidden_states[0]` the embeddings.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from pkd_fast.data import mean_pool, real_token_index
from pkd_fast.errors import PkdError
from pkd_fast.families import attention_kwargs, family_of, model_inputs, student_config, width_config
from pkd_fast.tasks import Task


def is_finetuned(path: str, task: Task) -> bool:
    """True when `path` holds a sequence-classification head for `task`; an error when that head was
    trained for something else: another number of classes, another task, or the classes in another order
    (read from the config's `finetuning_task` and `id2label` where it names them)."""
    config = model_config("--teacher", path)
    if not any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])):
        return False
    if config.num_labels != task.num_labels:
        raise PkdError(
            f"--teacher {path}: its classifier has {config.num_labels} outputs but {task.name} has "
            f"{task.num_labels} label(s); fine-tune a teacher for this task or pass its pretrained base"
        )
    trained_on = (getattr(config, "finetuning_task", None) or "").lower().replace("-", "")
    if trained_on and trained_on != task.name:
        raise PkdError(f"--teacher {path}: fine-tuned on {trained_on} (config finetuning_task), not {task.name}")
    names = [_label_key(config.id2label[i]) for i in range(config.num_labels)]
    if not all(name == f"label_{i}" for i, name in enumerate(names)):  # generic names say nothing
        known = [[_label_key(x) for x in choice] for choice in (task.label_names, task.labels) if choice]
        if not task.regression and names not in known:
            same_set = any(sorted(names) == sorted(k) for k in known)
            why = "the same labels in another order" if same_set else "labels of another task"
            raise PkdError(f"--teacher {path}: its id2label {names} are {why}; {task.name} expects "
                           f"{known[0]} (ids 0..{task.num_labels - 1})")
    return True


def model_config(flag: str, path: str):
    """The config of the model `flag` names, or one line saying why it cannot be loaded or why its family
    is not supported."""
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise PkdError(f"{flag} {path}: cannot load a model config ({_first_line(err)})") from None
    family_of(config, flag, path)
    return config


def check_max_seq_length(max_seq_length: int, flag: str, config) -> None:
    """Batches, padded up to a multiple of 8, must fit the positions of the model `flag` names (its
    `config`; RoBERTa's start after the padding id): one check for both objectives, before any data is read."""
    family = family_of(config, flag, config.name_or_path)
    limit = family.position_limit(config)
    padded = -(-max_seq_length // 8) * 8
    if limit is not None and padded > limit:
        offset = family.position_offset(config)
        whose = (f"the {limit} positions ({config.max_position_embeddings} embeddings less {family.name}'s offset of {offset})"
                 if offset else f"the {limit} position embeddings")
        raise PkdError(f"--max-seq-length {max_seq_length}: batches padded to a multiple of 8 ({padded}) exceed "
                       f"{whose} of {flag} {config.name_or_path}")


_SPECIAL_TOKENS = ("pad", "unk", "cls", "sep", "mask", "bos", "eos")


def tokenizer_traits(tokenizer) -> dict:
    """What two models must agree on to read one token stream: the vocabulary size, the id of each
    special token, and whether text is lower-cased (seen from the ids: a cased tokenizer tells 'A' from 'a')."""
    probe = "Hello World"
    return {"vocabulary size": len(tokenizer),
            **{f"{name} token id": getattr(tokenizer, f"{name}_token_id", None) for name in _SPECIAL_TOKENS},
            "lower-casing": tokenizer(probe)["input_ids"] == tokenizer(probe.lower())["input_ids"]}


def saved_tokenizer(flag: str, path: str):
    """The tokenizer saved beside the weights `flag` names, for `check_same_tokenizer`; one line when there is none."""
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        raise PkdError(f"{flag} {path}: no tokenizer to compare with the teacher's ({_first_line(err)}); save the "
                       "tokenizer beside its weights") from None


def check_same_tokenizer(teacher_tokenizer, tokenizer, named: str = "the student") -> None:
    """A student (`named`: e.g. "--base-model PATH") reads the teacher's token ids, and masked-LM distillation
    compares the two models' vocabulary logits column by column: its tokenizer must be the teacher's, or its
    embeddings index other tokens (or past their end). The one tokenizer check of both objectives; one line
    naming what differs (`tokenizer_traits`)."""
    theirs, mine = tokenizer_traits(teacher_tokenizer), tokenizer_traits(tokenizer)
    differ = [f"{what} {mine[what]} vs the teacher's {theirs[what]}" for what in theirs if mine[what] != theirs[what]]
    if differ:
        raise PkdError(f"{named}: its tokenizer is not the teacher's: " + "; ".join(differ)
                       + " (tokenizers that differ give one text other ids; use the teacher's)")


def _label_key(name) -> str:
    return str(name).strip().lower().replace("-", "_").replace(" ", "_")


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def load_classifier(path: str, task: Task, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A sequence classifier for `task` with its family's attention (SDPA where transformers has it); a
    fresh head when `path` has none. Its config names the task and the classes, so a saved model says what
    it was fine-tuned for."""
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=task.num_labels,
            problem_type="regression" if task.regression else "single_label_classification",
            dtype=dtype,
            **attention_kwargs(model_config("model", path)),
        )
    except (OSError, ValueError) as err:
        raise PkdError(f"cannot load model {path!r}: {_first_line(err)}") from None
    label_task(model.config, task)
    return model


def label_task(config, task: Task) -> None:
    """Record the task and its class names in a classifier's config."""
    config.finetuning_task = task.name
    config.id2label = task.id2label
    config.label2id = {name: i for i, name in task.id2label.items()}


def num_layers(model: PreTrainedModel) -> int:
    return model.config.num_hidden_layers


def build_student(source: PreTrainedModel, k: int, task: Task | None = None) -> PreTrainedModel:
    """Embeddings + the first k encoder layers + pooler of `source`, with a freshly initialised head for
    `task` (None: the head `source`'s config describes, its classes and problem type).

    The paper's initialisation. The student's backbone keys are a subset of the source's (layers < k),
    so copying by key copies exactly the first k layers, whatever the family calls them.
    """
    check_student_depth(k, num_layers(source))
    config = student_config(source.config, range(1, k + 1))
    if task is not None:
        config.num_labels = task.num_labels
        config.problem_type = "regression" if task.regression else "single_label_classification"
        label_task(config, task)
    student = AutoModelForSequenceClassification.from_config(config, **attention_kwargs(config))
    src = source.base_model.state_dict()
    wanted = student.base_model.state_dict().keys()
    missing = [key for key in wanted if key not in src]
    if missing:
        raise PkdError(f"the source model lacks backbone weights the student needs: {missing[:5]}")
    student.base_model.load_state_dict({key: src[key] for key in wanted}, strict=True)
    return student.to(next(source.parameters()).dtype)


def student_from_teacher(teacher: PreTrainedModel, num_layers: int) -> PreTrainedModel:
    """A student for `teacher` (a Hugging Face sequence classifier), as PKD initialises one: its embeddings
    and first `num_layers` layers, and a fresh head for the same classes (`build_student`)."""
    return build_student(teacher, num_layers)


def scratch_student(teacher_config, k: int, hidden_size: int, task: Task) -> PreTrainedModel:
    """A k-layer classifier of width `hidden_size` with random weights, of the teacher's family and
    vocabulary (`families.width_config`): the body `build_student` copies into each strategy's student."""
    check_student_depth(k, teacher_config.num_hidden_layers)
    config = width_config(teacher_config, k, hidden_size)
    config.num_labels = task.num_labels
    config.problem_type = "regression" if task.regression else "single_label_classification"
    label_task(config, task)
    return AutoModelForSequenceClassification.from_config(config, **attention_kwargs(config))


class WidthProjected(torch.nn.Module):
    """A student whose width differs from its teacher's, with TinyBERT's W_h: one learned linear map per
    PT layer from the student's width to the teacher's, so the patient loss compares like with like. The
    maps train with the student and DeepSpeed checkpoints them with it (--resume restores them);
    `save_pretrained` writes the student alone, a plain Hugging Face model."""

    def __init__(self, model: PreTrainedModel, teacher_width: int, layers: int):
        super().__init__()
        self.model = model
        self.projections = torch.nn.ModuleList(torch.nn.Linear(model.config.hidden_size, teacher_width) for _ in range(layers))

    @property
    def config(self):
        return self.model.config

    def save_pretrained(self, *args, **kwargs):
        return self.model.save_pretrained(*args, **kwargs)

    def forward(self, **inputs):
        return self.model(**inputs)


def project_rows(model, rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """The student's PT rows at the teacher's width: through `WidthProjected`'s maps where `model` (or the
    engine around it) has them, as they are otherwise."""
    module = getattr(model, "module", model)
    if not isinstance(module, WidthProjected):
        return rows
    return [proj(row.to(proj.weight.dtype)) for proj, row in zip(module.projections, rows, strict=True)]


def check_student_depth(k: int, teacher_layers: int, whose: str = "the teacher's") -> None:
    """A student keeps k of the source's layers, so 1 <= k <= its depth."""
    if not 1 <= k <= teacher_layers:
        raise PkdError(f"--student-layers {k}: must be between 1 and {whose} depth {teacher_layers}")


def check_teacher_layers(flag: str, layers: Sequence[int], teacher_layers: int) -> None:
    """An explicit list of 1-based teacher layers (--layer-map, --student-layer-list): each in 1..n, in
    ascending order without repeats, as the layers of the student they pair with are."""
    bad = [i for i in layers if not 1 <= i <= teacher_layers]
    if bad or not layers:
        raise PkdError(f"{flag}: layer(s) {bad or 'none'} out of range; the teacher has layers 1..{teacher_layers}")
    if list(layers) != sorted(set(layers)):
        raise PkdError(f"{flag} {','.join(map(str, layers))}: layers must ascend without repeats")


def layer_map(strategy: str, teacher_layers: int, student_layers: int, explicit: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The 1-based teacher layer taught to each student layer 1..k-1 (the top one learns from the KD term).

    skip: every (n/k)-th teacher layer (12→6: 2,4,6,8,10); last: the k-1 layers below the top
    (12→6: 7,8,9,10,11); an explicit map overrides both. ft and kd use no intermediate layers.
    """
    n, k = teacher_layers, student_layers
    if strategy in ("ft", "kd"):
        return ()
    if explicit is not None:
        if len(explicit) != k - 1:
            raise PkdError(f"--layer-map {','.join(map(str, explicit))}: needs k-1 = {k - 1} teacher layers for a {k}-layer student, got {len(explicit)}")
        if explicit:  # a 1-layer student maps none
            check_teacher_layers("--layer-map", explicit, n)
        return tuple(explicit)
    if strategy not in ("skip", "last"):
        raise PkdError(f"unknown strategy {strategy!r}")
    if k > n or n % k:
        raise PkdError(
            f"PKD-{strategy} needs the teacher depth ({n}) to be a multiple of the student depth ({k}); "
            f"pass --layer-map with {k - 1} teacher layers (1..{n}) instead"
        )
    if strategy == "skip":
        return tuple(j * (n // k) for j in range(1, k))
    return tuple(n - k + j for j in range(1, k))


def pt_rows(hidden_states, layers, token_index: torch.Tensor | None = None, pool_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The rows the patient loss reads from `hidden_states[l]` for each l in `layers` (--pt-tokens): the
    [CLS] vector ([B, H], a strided view, no copy); given `token_index` into the flattened [B·S] positions,
    every real token ([tokens, H]); given `pool_mask` (the [B, S] attention mask), each example's mean over
    its real tokens ([B, H], fp32)."""
    if pool_mask is not None:
        return [mean_pool(hidden_states[i], pool_mask) for i in layers]
    if token_index is None:
        return [hidden_states[i][:, 0] for i in layers]
    return [hidden_states[i].flatten(0, 1).index_select(0, token_index) for i in layers]


# -- masked-LM (task-agnostic distillation on raw text) ----------------------------------------------
#
# Each family's masked-LM class (AutoModelForMaskedLM): the body `model.base_model` and a head whose
# modules and call `pkd_fast.families` names (BERT's cls.predictions: transform = dense + activation +
# LayerNorm, then the decoder tied to the word embeddings, plus a bias; RoBERTa's lm_head; ELECTRA's
# generator head; ...). The losses read a few rows per batch (the masked positions, or every real token),
# so the head runs on those rows only: [n, H] → [n, V], never [B, L, V].

# Old TF-converted checkpoints name LayerNorm parameters gamma/beta.
_OLD_NAMES = ((".weight", ".gamma"), (".bias", ".beta"))


def _checkpoint_keys(path: str) -> set[str]:
    """Parameter names stored in a local checkpoint directory, read from file headers (no weights loaded)."""
    folder = Path(path)
    if not folder.is_dir():
        raise PkdError(f"--teacher {path}: not a local directory (save_pretrained a hub model first)")
    index = next((folder / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json") if (folder / n).is_file()), None)
    if index is not None:
        return set(json.loads(index.read_text())["weight_map"])
    if (folder / "model.safetensors").is_file():
        with safe_open(folder / "model.safetensors", "pt") as f:
            return set(f.keys())
    if (folder / "pytorch_model.bin").is_file():
        return set(torch.load(folder / "pytorch_model.bin", map_location="cpu", mmap=True, weights_only=True))
    raise PkdError(f"--teacher {path}: no model.safetensors or pytorch_model.bin")


def _mlm_head_names(config) -> list[set[str]]:
    """The names each masked-LM head parameter of `config`'s family may be stored under: one set per
    parameter, holding every name it is tied to (a tied decoder is the word embeddings, part of the body,
    so it is not asked for). Read from the masked-LM class built on the meta device (no memory)."""
    with torch.device("meta"):
        model = AutoModelForMaskedLM.from_config(config)
    body = {id(p) for p in model.base_model.parameters()}
    names: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in body:
            names.setdefault(id(param), set()).update(
                {name} | {name[: -len(new)] + old for new, old in _OLD_NAMES if name.endswith(new)})
    return list(names.values())


def has_mlm_head(path_or_model: str | torch.nn.Module) -> bool:
    """Whether a checkpoint directory (or a model) holds the weights of its family's masked-LM head
    (BertForMaskedLM's cls.predictions, RobertaForMaskedLM's lm_head, ...). A bare encoder, such as the
    default teacher or an ELECTRA discriminator, has none."""
    if isinstance(path_or_model, torch.nn.Module):
        keys, config = set(path_or_model.state_dict()), path_or_model.config
    else:
        keys, config = _checkpoint_keys(str(path_or_model)), model_config("--teacher", str(path_or_model))
    return all(names & keys for names in _mlm_head_names(config))


def _masked_lm(path: str, dtype: torch.dtype) -> PreTrainedModel:
    config = model_config("--teacher", path)
    try:
        return AutoModelForMaskedLM.from_pretrained(path, dtype=dtype, **attention_kwargs(config))
    except (OSError, ValueError) as err:
        raise PkdError(f"cannot load a masked-LM model from {path!r}: {err}") from None


def load_mlm_teacher(path: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A masked-LM teacher with its trained head (its family's attention), frozen and in eval mode. A
    checkpoint without a head is refused: a random head would teach noise (fit one first, `fresh_mlm_head`)."""
    if not has_mlm_head(path):
        raise PkdError(
            f"--teacher {path}: no masked-LM head; fit one first (a fresh head on this body), "
            "then distil from the saved result"
        )
    model = _masked_lm(path, dtype).eval()
    model.requires_grad_(False)
    return model


def load_encoder(path: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The body of the checkpoint at `path` (its family's bare encoder, any masked-LM head left unread),
    frozen and in eval mode: the teacher of a masked-LM run whose terms read no logits (relations and PT
    alone), which a headless checkpoint serves as it ships."""
    config = model_config("--teacher", path)
    try:
        model = AutoModel.from_pretrained(path, dtype=dtype, **attention_kwargs(config))
    except (OSError, ValueError) as err:
        raise PkdError(f"cannot load an encoder from {path!r}: {_first_line(err)}") from None
    model.eval().requires_grad_(False)
    return model


def fresh_mlm_head(path: str, dtype: torch.dtype = torch.float32, train_body: bool = False) -> PreTrainedModel:
    """The family's masked-LM model over a (headless) checkpoint, its head freshly initialised: the
    decoder is tied to the word embeddings (so only the head's transform, its norm and the output bias are
    new); those train, and the body stays frozen unless `train_body` (the tied decoder then trains too).
    A checkpoint that already has a head is refused rather than silently reused or overwritten."""
    if has_mlm_head(path):
        raise PkdError(f"{path}: already has a masked-LM head; load it with load_mlm_teacher")
    model = _masked_lm(path, dtype)
    if not model.config.tie_word_embeddings:
        raise PkdError(f"{path}: its config unties the word embeddings (tie_word_embeddings=false); a fresh head needs the tied decoder")
    body = {id(p) for p in model.base_model.parameters()}
    model.requires_grad_(train_body)
    for param in model.parameters():
        if id(param) not in body:
            param.requires_grad_(True)
    return model


def mlm_student_layers(strategy: str, teacher_layers: int, k: int | None = None, explicit: Sequence[int] | None = None) -> tuple[int, ...]:
    """The 1-based teacher layers a k-layer masked-LM student is built from, in order.

    first: 1..k. alternate: every other layer, 1,3,5,... (DistilBERT's choice: encoder.layer 0,2,4,...
    of a 12-layer teacher for 6 layers; k defaults to half the teacher's depth, rounded up). An explicit
    list overrides both (k, when given, must be its length); it must ascend without repeats."""
    n = teacher_layers
    if explicit is not None:
        layers = tuple(explicit)
        if k is not None and len(layers) != k:
            raise PkdError(f"--student-layer-list {','.join(map(str, layers))}: {len(layers)} layers for a {k}-layer student")
        check_teacher_layers("--student-layer-list", layers, n)
        return layers
    if strategy == "alternate":
        k = -(-n // 2) if k is None else k
        if not 1 <= k <= -(-n // 2):
            raise PkdError(f"--student-layers {k}: every other layer of a {n}-layer teacher gives at most {-(-n // 2)}")
        return tuple(range(1, 2 * k, 2))
    if strategy == "first":
        if k is None:
            raise PkdError("--student-layer-choice first needs --student-layers k")
        check_student_depth(k, n)
        return tuple(range(1, k + 1))
    raise PkdError(f"unknown student layer choice {strategy!r}; expected first, alternate or an explicit list")


def build_mlm_student(teacher: PreTrainedModel, layers: Sequence[int]) -> PreTrainedModel:
    """A masked-LM student: the teacher's embeddings, its 1-based `layers` (student layer j ← teacher
    layer layers[j]) and its MLM head, each copied by key, so the student starts as that sub-network. A bare
    encoder teacher (`load_encoder`) gives a bare encoder student: no head to train."""
    family = family_of(teacher.config)
    config = student_config(teacher.config, layers)
    student = type(teacher)._from_config(config, **attention_kwargs(config))
    src = teacher.state_dict()
    rename = {family.layer_prefix(j): family.layer_prefix(t - 1) for j, t in enumerate(layers)}

    def source_key(key: str) -> str:
        for own, theirs in rename.items():
            if own in key:
                return key.replace(own, theirs, 1)
        return key

    wanted = {key: source_key(key) for key in student.state_dict()}
    missing = [theirs for theirs in wanted.values() if theirs not in src]
    if missing:
        raise PkdError(f"the teacher lacks weights the student needs: {missing[:5]}")
    student.load_state_dict({key: src[theirs] for key, theirs in wanted.items()}, strict=True)
    return student.to(next(teacher.parameters()).dtype)


def scratch_mlm_student(teacher: PreTrainedModel, k: int, hidden_size: int) -> PreTrainedModel:
    """A k-layer masked-LM student of width `hidden_size` with random weights, of the teacher's family, class
    and vocabulary (`families.width_config`): a bare encoder for a bare-encoder teacher. MiniLMv2's students
    start this way, since relations compare attention distributions, which need no shared width."""
    check_student_depth(k, teacher.config.num_hidden_layers)
    config = width_config(teacher.config, k, hidden_size)
    return type(teacher)._from_config(config, **attention_kwargs(config)).to(next(teacher.parameters()).dtype)


def mlm_row_index(batch: dict, rows: str = "masked") -> torch.Tensor:
    """Flat positions (into [B·L]) whose vocabulary logits the loss reads: the masked positions (those
    with an mlm_label), or every real token (`rows="all"`, for KL over the whole sequence)."""
    if rows == "masked":
        return (batch["mlm_labels"].flatten() != -100).nonzero().squeeze(1)
    if rows == "all":
        return real_token_index(batch["attention_mask"])
    raise ValueError(f"rows must be 'masked' or 'all', got {rows!r}")


def mlm_row_count(batch: dict, rows: str = "masked") -> torch.Tensor:
    """How many rows `mlm_row_index` picks, counted on device (no host sync): the masked-LM loss units
    `pkd_fast.trainer` sums over an optimizer step before its first backward."""
    if rows == "masked":
        return (batch["mlm_labels"] != -100).sum()
    if rows == "all":
        return batch["attention_mask"].sum()
    raise ValueError(f"rows must be 'masked' or 'all', got {rows!r}")


def lm_head_rows(model: PreTrainedModel, hidden: torch.Tensor, row_index: torch.Tensor) -> torch.Tensor:
    """The head's vocabulary logits [n, V] of the rows `row_index` of `hidden` [B, L, H]: gather, then
    the family's head, so the cost is n·H·V, not B·L·H·V."""
    return family_of(model.config).run_mlm_head(model, hidden.flatten(0, 1).index_select(0, row_index))


class MaskedLMRows(torch.nn.Module):
    """A masked-LM model whose forward sends only `row_index`'s rows through the head: the module to
    hand to DeepSpeed (its `model` is what save_pretrained writes). Returns (logits [n, V], hidden_states
    or None); `row_index` None runs no head (logits None), so a headless encoder, read for its states or
    relations alone, can be wrapped too."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def save_pretrained(self, *args, **kwargs):
        """The wrapped model in Hugging Face format (what `pkd_fast.checkpoints.save_pretrained` writes)."""
        return self.model.save_pretrained(*args, **kwargs)

    def forward(self, input_ids, attention_mask, token_type_ids=None, *, row_index, output_hidden_states=False):
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        inputs = model_inputs(self.model, {k: v for k, v in given.items() if v is not None})
        out = self.model.base_model(**inputs, output_hidden_states=output_hidden_states)
        logits = None if row_index is None else lm_head_rows(self.model, out.last_hidden_state, row_index)
        return logits, out.hidden_states


@dataclass
class MlmRows:
    """One model's masked-LM rows of one batch for `pkd_fast.losses.pkd_loss`: its logits [n, V] and the
    labels [n] (-100 at rows that are not masked, so CE reads the masked rows and KL all n), the flat
    `row_index` (for `pt_rows`, and for the teacher source to read the same rows), and the model's hidden
    states when asked for."""

    logits: torch.Tensor | None
    labels: torch.Tensor
    row_index: torch.Tensor
    hidden: tuple[torch.Tensor, ...] | None = None


def mlm_rows(model, batch: dict, rows: str = "masked", output_hidden_states: bool = False, head: bool = True) -> MlmRows:
    """Forward `model` (a `MaskedLMRows`, or a DeepSpeed engine around one) on `batch` and return the gathered
    rows' logits (None without `head`: a run whose terms read no logits). The teacher's side of the same
    rows comes from the run's `teacher.TeacherSource`."""
    row_index = mlm_row_index(batch, rows)
    logits, hidden = model(**model_inputs(model, batch), row_index=row_index if head else None, output_hidden_states=output_hidden_states)
    labels = batch["mlm_labels"].flatten().index_select(0, row_index)
    return MlmRows(logits, labels, row_index, hidden)
