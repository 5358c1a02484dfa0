"""Teacher loading, student construction from the teacher's lower layers, and PKD layer maps.

Layer numbers are 1-based: `hidden_states[i]` is layer i's output and `hidden_states[0]` the embeddings.
"""

from __future__ import annotations

import copy

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel

from pkd_fast.errors import PkdError
from pkd_fast.tasks import Task


def is_finetuned(path: str, task: Task) -> bool:
    """True when `path` holds a sequence-classification head for `task`; an error when that head was
    trained for something else: another number of classes, another task, or the classes in another order
    (read from the config's `finetuning_task` and `id2label` where it names them)."""
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise PkdError(f"--teacher {path}: cannot load a model config ({_first_line(err)})") from None
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


def _label_key(name) -> str:
    return str(name).strip().lower().replace("-", "_").replace(" ", "_")


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def load_classifier(path: str, task: Task, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A sequence classifier for `task` with SDPA attention; a fresh head when `path` has none. Its config
    names the task and the classes, so a saved model says what it was fine-tuned for."""
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=task.num_labels,
            problem_type="regression" if task.regression else "single_label_classification",
            attn_implementation="sdpa",
            dtype=dtype,
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


def build_student(source: PreTrainedModel, k: int, task: Task) -> PreTrainedModel:
    """Embeddings + the first k encoder layers + pooler of `source`, with a freshly initialised head.

    The paper's initialisation. The student's backbone keys are a subset of the source's (layers < k),
    so copying by key copies exactly the first k layers, whatever the BERT variant calls them.
    """
    n = num_layers(source)
    if not 1 <= k <= n:
        raise PkdError(f"--student-layers {k}: must be between 1 and the teacher's depth {n}")
    config = copy.deepcopy(source.config)
    config.num_hidden_layers = k
    config.num_labels = task.num_labels
    config.problem_type = "regression" if task.regression else "single_label_classification"
    config.architectures = None
    label_task(config, task)
    student = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
    src = source.base_model.state_dict()
    wanted = student.base_model.state_dict().keys()
    missing = [key for key in wanted if key not in src]
    if missing:
        raise PkdError(f"the source model lacks backbone weights the student needs: {missing[:5]}")
    student.base_model.load_state_dict({key: src[key] for key in wanted}, strict=True)
    return student.to(next(source.parameters()).dtype)


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
        bad = [i for i in explicit if not 1 <= i <= n]
        if bad:
            raise PkdError(f"--layer-map: layer(s) {bad} out of range; the teacher has layers 1..{n}")
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


def pt_rows(hidden_states, layers, token_index: torch.Tensor | None) -> list[torch.Tensor]:
    """The rows the patient loss reads from `hidden_states[l]` for each l in `layers`: the [CLS] vector
    ([B, H], a strided view, no copy) or, given `token_index` into the flattened [B·S] positions, every
    real token ([tokens, H])."""
    if token_index is None:
        return [hidden_states[i][:, 0] for i in layers]
    return [hidden_states[i].flatten(0, 1).index_select(0, token_index) for i in layers]
