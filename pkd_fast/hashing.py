"""Every digest pkd_fast takes, in one place: the keys its stores are found by (sha256 of a JSON value, of a
tokenizer, of files, of a dataset's columns), the 16-byte blake2b its teacher stores are checked with, and
the 64-bit seeds a mask is drawn from. Its own module because the teacher caches and the corpus cache each wrote
their own copy of the same helpers (issue #29), and one key hashed two ways would never match."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path


def json_sha256(payload) -> str:
    """sha256 of a JSON value, key order and whitespace not counting."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def sha256_of(chunks: Iterable[bytes]) -> str:
    """sha256 of the bytes `chunks` yields, in order."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> bytes:
    """sha256 of a file's bytes, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


def blake2b_of(chunks: Iterable[bytes]) -> str:
    """16-byte blake2b of the bytes `chunks` yields: a store file's check."""
    digest = hashlib.blake2b(digest_size=16)
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def file_blake2b(path: Path) -> str:
    """`blake2b_of` a whole file, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def seed64(text: str) -> int:
    """A 64-bit seed from `text` (a hash: nearby texts give unrelated seeds)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def tokenizer_digest(tokenizer) -> str:
    """What a tokenizer makes of text (its backend's full spec, or its vocabulary), as one key: two tokenizers
    with one digest give every text the same ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        for per_call in ("truncation", "padding"):  # set by each call, not part of the tokenizer
            spec.pop(per_call, None)
    else:
        spec = sorted(tokenizer.get_vocab().items())
    return json_sha256({"class": type(tokenizer).__name__, "spec": spec})
