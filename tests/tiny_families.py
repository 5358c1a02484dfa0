"""Tiny random-init encoders of every supported family, built from a config (no weights to download) with
a character-level WordPiece tokenizer built here, saved as a local checkpoint. The tokenizer's vocabulary
of ~100 keeps the vocabulary-sized KD terms (and the Triton interpreter running them) cheap."""

import string
from pathlib import Path

import torch
from transformers import CONFIG_MAPPING, AutoModel, AutoModelForMaskedLM, BertTokenizer

WIDTH, LAYERS, POSITIONS = 32, 4, 66  # RoBERTa keeps 65 of 66: its positions start after the padding id (0)

# model_type → config arguments beyond the shared ones (the names DistilBERT gives them differ)
SHAPES = {
    "bert": {},
    "roberta": {"type_vocab_size": 1},
    "xlm-roberta": {"type_vocab_size": 1},
    "electra": {"embedding_size": 16},
    "deberta-v2": {"type_vocab_size": 0, "relative_attention": True, "position_biased_input": False,
                   "pos_att_type": ["p2c", "c2p"], "position_buckets": 16, "norm_rel_ebd": "layer_norm", "share_att_key": True},
    "modernbert": {"global_attn_every_n_layers": 2, "local_attention": 16},
    "distilbert": {"dim": WIDTH, "n_layers": LAYERS, "n_heads": 2, "hidden_dim": 2 * WIDTH},
}


def char_tokenizer(lower_case: bool = True, extra: tuple[str, ...] = ()) -> BertTokenizer:
    """BERT's tokenizer over single characters (and '##'-continuations): every word splits into known pieces."""
    chars = string.ascii_lowercase + string.digits + string.punctuation
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars), *extra]
    return BertTokenizer(vocab={piece: i for i, piece in enumerate(pieces)}, do_lower_case=lower_case)


def tiny_config(model_type: str, tokenizer, **overrides):
    specials = {"pad_token_id": tokenizer.pad_token_id}
    if model_type == "modernbert":  # its defaults are ModernBERT's own tokenizer's ids
        specials.update(bos_token_id=tokenizer.cls_token_id, cls_token_id=tokenizer.cls_token_id,
                        eos_token_id=tokenizer.sep_token_id, sep_token_id=tokenizer.sep_token_id)
    shared = {"vocab_size": len(tokenizer), "max_position_embeddings": POSITIONS}
    if model_type != "distilbert":
        shared.update(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=2 * WIDTH)
    return CONFIG_MAPPING[model_type](**{**shared, **specials, **SHAPES[model_type], **overrides})


def save_tiny(path: Path, model_type: str, head: bool = False, seed: int = 0, **overrides) -> str:
    """A random-init `model_type` encoder (with a masked-LM head when `head`) and `char_tokenizer()`."""
    tokenizer = char_tokenizer()
    torch.manual_seed(seed)
    config = tiny_config(model_type, tokenizer, **overrides)
    model = (AutoModelForMaskedLM if head else AutoModel).from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
