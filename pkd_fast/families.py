"""One adapter per encoder family: what pkd_fast needs to know about an architecture that the Hugging Face
classes do not say in a common way.

Every model the trainer builds or loads goes through `family_of(config)`. The adapter names, for its family:

* where the pieces live: the embeddings and the layer list (relative to the base model, `model.base_model`),
  the pooler and classifier of the sequence classifier, and the masked-LM head's modules;
* which inputs the body takes: token_type_ids only where the family has them and its config gives more
  than one type (RoBERTa's type vocabulary of 1 and DeBERTa-v3's of 0 read none, and a BERT tokenizer's
  pair segment ids would index past them);
* the attention implementation: SDPA where transformers has one (`_supports_sdpa`), eager otherwise;
* the layer prefix, so a student built from chosen layers copies `<layers>.<t>.` of the teacher into
  `<layers>.<j>.`, and the config lists that run per layer (ModernBERT's `layer_types`), which must follow
  the layers chosen;
* how to run the masked-LM head on gathered rows [n, H] → [n, V] (ModernBERT's `sparse_prediction` does the
  same inside its forward; the other families' heads are position-wise, so they are called on the rows);
* where each layer's query/key/value projections are (ModernBERT fuses them in one `Wqkv`);
* how far positions reach: RoBERTa's position ids start after the padding id (an offset of pad+1 = 2 for
  the released checkpoints), so max_position_embeddings - 2 tokens fit.

ALBERT shares one layer among all depths, so a student cannot take a subset of its layers: it, and every
family not listed here, is refused by name.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from pkd_fast.errors import PkdError


def _bert_head(model, rows):
    return model.cls(rows)


def _roberta_head(model, rows):
    return model.lm_head(rows)


def _electra_head(model, rows):
    return model.generator_lm_head(model.generator_predictions(rows))


def _deberta_head(model, rows):
    if model.legacy:  # BERT's layout (cls.predictions), what the released v2/v3 checkpoints use
        return model.cls(rows)
    return model.lm_predictions(rows, model.deberta.embeddings.word_embeddings)


def _modernbert_head(model, rows):
    return model.decoder(model.head(rows))


def _distilbert_head(model, rows):
    return model.vocab_projector(model.vocab_layer_norm(model.activation(model.vocab_transform(rows))))


def _no_offset(config) -> int:
    return 0


def _padding_offset(config) -> int:
    """RoBERTa numbers positions from padding_idx + 1 (create_position_ids_from_input_ids)."""
    return (config.pad_token_id or 0) + 1


@dataclass(frozen=True)
class Family:
    """What pkd_fast reads of one architecture (see the module docstring). Module paths are dotted
    attribute paths: `layers` and `embeddings` from the base model, `pooler`/`classifier` from the
    sequence classifier, `mlm_head` from the masked-LM model, `qkv` from one layer."""

    name: str
    model_types: tuple[str, ...]
    embeddings: str
    layers: str
    pooler: str | None
    classifier: tuple[str, ...]
    mlm_head: tuple[str, ...]
    qkv: tuple[str, ...]
    token_types: bool
    attention: str
    run_mlm_head: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    position_offset: Callable[[object], int] = _no_offset
    per_layer_config: tuple[str, ...] = ()
    ffn_size: str = "intermediate_size"  # the config's feed-forward width

    def takes_token_types(self, config) -> bool:
        """Whether token_type_ids mean anything to this model (more than one type embedding)."""
        return self.token_types and (getattr(config, "type_vocab_size", 0) or 0) > 1

    def position_limit(self, config) -> int | None:
        """How many tokens one sequence may hold, from the position embeddings; None where unbounded."""
        positions = getattr(config, "max_position_embeddings", None)
        return None if positions is None else positions - self.position_offset(config)

    def layer_prefix(self, index: int) -> str:
        """The state-dict infix of 0-based layer `index` ('.encoder.layer.3.'), under any model prefix."""
        return f".{self.layers}.{index}."

    def layer_modules(self, model) -> torch.nn.ModuleList:
        return module_at(_hf_model(model).base_model, self.layers)

    def attention_projections(self, model) -> list[tuple[torch.nn.Module, ...]]:
        """Each layer's (query, key, value) projections, or (Wqkv,) where the family fuses them."""
        return [tuple(module_at(layer, path) for path in self.qkv) for layer in self.layer_modules(model)]


_BERT_LIKE = dict(embeddings="embeddings", layers="encoder.layer",
                  qkv=("attention.self.query", "attention.self.key", "attention.self.value"), token_types=True,
                  attention="sdpa")

FAMILIES = (
    Family("BERT", ("bert",), pooler="bert.pooler", classifier=("classifier",), mlm_head=("cls",),
           run_mlm_head=_bert_head, **_BERT_LIKE),
    Family("RoBERTa", ("roberta", "xlm-roberta"), pooler=None, classifier=("classifier",), mlm_head=("lm_head",),
           run_mlm_head=_roberta_head, position_offset=_padding_offset, **_BERT_LIKE),
    Family("ELECTRA", ("electra",), pooler=None, classifier=("classifier",),
           mlm_head=("generator_predictions", "generator_lm_head"), run_mlm_head=_electra_head, **_BERT_LIKE),
    Family("DeBERTa-v2", ("deberta-v2",), embeddings="embeddings", layers="encoder.layer", pooler="pooler",
           classifier=("classifier",), mlm_head=("cls", "lm_predictions"), run_mlm_head=_deberta_head,
           qkv=("attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj"),
           token_types=True, attention="eager"),  # transformers has no SDPA for its disentangled attention
    Family("ModernBERT", ("modernbert",), embeddings="embeddings", layers="layers", pooler="head",
           classifier=("classifier",), mlm_head=("head", "decoder"), run_mlm_head=_modernbert_head, qkv=("attn.Wqkv",),
           token_types=False, attention="sdpa", per_layer_config=("layer_types",)),
    Family("DistilBERT", ("distilbert",), embeddings="embeddings", layers="transformer.layer", pooler="pre_classifier",
           classifier=("classifier",), mlm_head=("vocab_transform", "vocab_layer_norm", "vocab_projector"),
           run_mlm_head=_distilbert_head, qkv=("attention.q_lin", "attention.k_lin", "attention.v_lin"),
           token_types=False, attention="sdpa", ffn_size="hidden_dim"),
)
_BY_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}
SUPPORTED = ", ".join(f.name + (" (and XLM-R)" if "xlm-roberta" in f.model_types else "") for f in FAMILIES)


def family_of(config, flag: str = "the model", path: str | None = None) -> Family:
    """The adapter of `config`'s architecture, or one line naming the supported families."""
    family = _BY_TYPE.get(getattr(config, "model_type", None))
    if family is None:
        where = f"{flag} {path}" if path else flag
        why = " (its layers are shared, so a student cannot keep a subset)" if config.model_type == "albert" else ""
        raise PkdError(f"{where}: a {config.model_type!r} model{why}; pkd_fast supports {SUPPORTED}")
    return family


def _hf_model(model) -> torch.nn.Module:
    """The Hugging Face model inside a DeepSpeed engine (`.module`) or a `models.MaskedLMRows` (`.model`)."""
    while not isinstance(model, PreTrainedModel):  # an engine's own `config` is its JSON: not the one asked for
        model = model.module if hasattr(model, "module") else model.model
    return model


def layer_projections(model, layer: int) -> tuple[torch.nn.Module, ...]:
    """The query, key and value projections (or the fused Wqkv) of 1-based `layer` of `model` (a Hugging Face
    model, or a wrapper or engine around one)."""
    hf = _hf_model(model)
    return family_of(hf.config).attention_projections(hf)[layer - 1]


def module_at(root, path: str) -> torch.nn.Module:
    """The submodule at a dotted attribute path (a `Family` field) under `root`."""
    for name in path.split("."):
        root = getattr(root, name)
    return root


def model_inputs(model, batch: dict) -> dict:
    """The batch's columns `model` (or the engine or wrapper around it) takes: input_ids, attention_mask and
    token_type_ids (not labels, example_idx or a teacher cache's rows), token_type_ids only where its family
    and config read them."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    config = _hf_model(model).config
    if not family_of(config).takes_token_types(config):
        inputs.pop("token_type_ids", None)
    return inputs


def student_config(config, layers) -> object:
    """`config` for a student of the 1-based teacher `layers`: their number, and each per-layer list
    (ModernBERT's layer_types: which layers attend globally) taken at those layers, so every copied layer
    keeps the attention it was trained with."""
    family = family_of(config)
    student = copy.deepcopy(config)
    student.num_hidden_layers = len(layers)
    for name in family.per_layer_config:
        values = getattr(config, name, None)
        if values is not None:
            setattr(student, name, [values[t - 1] for t in layers])
    student.architectures = None
    return student


def width_config(config, layers: int, hidden_size: int, flag: str = "--student-hidden-size"):
    """`config` for a `layers`-deep student of width `hidden_size` (initialised from scratch): its heads keep
    the teacher's head size, its feed-forward the teacher's ratio to the width, and what else is sized by
    the width (DeBERTa's pooler) follows."""
    head_size = config.hidden_size // config.num_attention_heads
    if hidden_size % head_size:
        raise PkdError(f"{flag} {hidden_size}: must be a multiple of the teacher's attention head size {head_size}")
    family = family_of(config)
    student = student_config(config, range(1, layers + 1))
    ffn = getattr(config, family.ffn_size) * hidden_size // config.hidden_size
    student.hidden_size, student.num_attention_heads = hidden_size, hidden_size // head_size
    setattr(student, family.ffn_size, ffn)
    if getattr(student, "pooler_hidden_size", None) is not None:
        student.pooler_hidden_size = hidden_size
    return student


def attention_kwargs(config) -> dict:
    """from_pretrained/from_config keyword arguments for the family's attention implementation."""
    return {"attn_implementation": family_of(config).attention}
