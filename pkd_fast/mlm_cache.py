"""Masked-LM teacher cache: the teacher's outputs on every epoch's masked blocks, stored once, so any
number of masked-LM students (depths, layer choices, α/β) distil without running or holding the teacher.

Why it can be stored at all: a block's masks are a pure function of (masking seed, epoch, block index)
(`corpus.MlmMasker`), so the teacher's input for block b in epoch e is the same for every student with the
same corpus, --seed, --mlm-probability and --max-seq-length; the store holds `epochs` such passes.
Why compressed: a row of vocabulary logits is 30,522 values. Each KD row (--kd-positions: every real
token, or only the masked ones, as the student will read them) keeps the teacher's top-k logits (ids as
int32, values in the training dtype) and the logsumexp of the full row at --temperature in fp32: what
`losses.topk_kd_loss_reference` needs, the rest of the teacher's mass in one bucket. The states of the
stored layers are kept for every real token (the PT term's rows), in the training dtype.

A store is a directory (the GLUE store's guarantees and code, `pkd_fast.cache`):

    manifest.json     format, fingerprint, layout, each file's size, sampled digest and full checksum
    row_offsets.npy   [E·B + 1] int64  unit u = epoch·B + block holds KD rows [offsets[u], offsets[u+1]),
                                       in the order `models.mlm_row_index` gathers them (position order)
    topk_ids.npy      [R, k] int32     the top-k vocabulary ids of each KD row
    topk_values.npy   [R, k]           the teacher's raw logits at those ids (training dtype)
    lse.npy           [R] float32      logsumexp(logits / T) over the full row
    hidden.npy        [E·B, L', S, H]  the stored layers' states, every real token (zero past the block's end);
                                       absent when no layer is stored (a KD-only store)
    qkv.npy           [E·B, 3, S, H]   with a relation term: one teacher layer's query, key and value
                                       projections' outputs, every real token (zero past the block's end)

A headless teacher (read for its states or relations alone, MiniLMv2's general objective) has no logits to
keep: its store has no top-k arrays (`logits` false in the layout).

The offsets are known before the teacher runs (the masks are), so every rank writes its units in place
and the store's size is printed, and checked against the free disk, before anything is written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import torch

from pkd_fast.cache import (NUMPY_DTYPES, TeacherCache, Writer, check_stored_layers, describe_arrays, pinned, pooled_states,
                            relations_stored, require_relation_layer, store_bytes, teacher_fingerprint)
from pkd_fast.corpus import IGNORE_INDEX, MlmMasker
from pkd_fast.errors import PkdError

log = logging.getLogger("pkd_fast")


def fingerprint(teacher_path: str, tokenizer, blocks, max_seq_length: int, dtype: torch.dtype, *, mask_seed: int,
                mlm_probability: float, kd_positions: str, topk: int, temperature: float) -> dict:
    """What a masked-LM store's contents depend on: the teacher, tokenizer and packed training blocks
    (`cache.teacher_fingerprint`), the masking (seed and probability: with the block and epoch they fix
    every input), which rows are KD rows, k, and T (the stored logsumexp is at T). The number of epochs
    stored is in the layout: a student reading fewer epochs is served, one needing more is refused."""
    return {**teacher_fingerprint(teacher_path, tokenizer, max_seq_length, blocks, dtype), "objective": "mlm",
            "mask_seed": mask_seed, "mlm_probability": mlm_probability, "kd_positions": kd_positions, "topk": topk,
            "temperature": temperature}


@dataclass(frozen=True)
class MlmLayout:
    blocks: int
    epochs: int
    tokens: int  # the blocks' real tokens (one pass): what the bytes per token are per
    positions: int  # max_seq_length: states of every token
    kd_rows: int  # R, over all epochs and blocks
    topk: int
    teacher_layers: int
    hidden_size: int
    layers: tuple[int, ...]  # the stored hidden_states indices, ascending (0 = embeddings; none: KD only)
    dtype: str
    temperature: float  # the T of the stored logsumexp
    objective: str = "mlm"
    relation_layer: int = 0  # the 1-based teacher layer whose Q, K, V are stored (0: none)
    logits: bool = True  # false: a headless teacher's store, no top-k arrays

    @classmethod
    def from_json(cls, fields: dict) -> MlmLayout:
        if fields.get("objective") != "mlm":
            raise PkdError("the store there is a GLUE teacher cache, not a masked-LM one; point --teacher-cache elsewhere")
        return cls(**{**fields, "layers": tuple(fields["layers"])})

    @property
    def rows(self) -> int:
        """The units accounted for (each rank's written units must together cover them): epoch × block."""
        return self.epochs * self.blocks

    @property
    def arrays(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        values = np.dtype(NUMPY_DTYPES[self.dtype])
        arrays = {"row_offsets": ((self.rows + 1,), np.dtype(np.int64))}
        if self.logits:
            arrays.update({"topk_ids": ((self.kd_rows, self.topk), np.dtype(np.int32)), "topk_values": ((self.kd_rows, self.topk), values),
                           "lse": ((self.kd_rows,), np.dtype(np.float32))})
        if self.layers:
            arrays["hidden"] = ((self.rows, len(self.layers), self.positions, self.hidden_size), values)
        if self.relation_layer:
            arrays["qkv"] = ((self.rows, 3, self.positions, self.hidden_size), values)
        return arrays

    def check(self) -> None:
        check_stored_layers(self.layers, self.teacher_layers, allow_none=True)

    @property
    def bytes_per_token(self) -> float:
        """The store's bytes per real training token and epoch: what a corpus of N tokens read for E epochs costs, ×N·E."""
        return store_bytes(self.arrays) / max(1, self.epochs * self.tokens)

    def describe(self) -> str:
        kd = f"{self.kd_rows} KD rows of top-{self.topk}" if self.logits else "no logits (a headless teacher)"
        return (f"{self.epochs} epoch(s) × {self.blocks} blocks, {kd}, {self.dtype} states of layers {list(self.layers)}"
                f"{relations_stored(self)}: {describe_arrays(self.arrays)}, {self.bytes_per_token:.0f} bytes per token")


def block_lengths(blocks) -> np.ndarray:
    """Each packed block's real tokens."""
    return pc.list_value_length(blocks.with_format("arrow")[:]["input_ids"].combine_chunks()).to_numpy().astype(np.int64)


def kd_row_offsets(blocks, masker: MlmMasker, epochs: int, kd_positions: str) -> np.ndarray:
    """The store's `row_offsets` [epochs·B + 1]: how many KD rows each (epoch, block) has, cumulated. With
    --kd-positions all that is the block's length (every real token); with masked, the number its mask at
    that epoch selects (computed by the masker itself, so it is the count the student's batch will have)."""
    lengths = block_lengths(blocks)
    counts = []
    for epoch in range(epochs):
        if kd_positions == "all":
            counts.append(lengths)
            continue
        per_block = [int((masker.mask_at(epoch, torch.tensor(block), idx)[1] != IGNORE_INDEX).sum())
                     for chunk in blocks.iter(batch_size=1024) for block, idx in zip(chunk["input_ids"], chunk["example_idx"])]
        counts.append(np.array(per_block, dtype=np.int64))
    return np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)


def unit_rows(offsets: np.ndarray, units: np.ndarray, counts: torch.Tensor) -> np.ndarray | None:
    """The store rows of a batch's KD rows in its gather order (each unit's [offsets[u], offsets[u+1]) in
    turn), or None when a unit's count differs from the batch's (`counts` [B]): masks other than the store's."""
    starts, ends = offsets[units], offsets[units + 1]
    if not np.array_equal(ends - starts, counts.cpu().numpy()):
        return None
    return np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) if len(units) else np.zeros(0, np.int64)


def batch_units(batch: dict, blocks: int) -> np.ndarray:
    """Each row's store unit, epoch·B + block: masked batches carry both (`corpus.MlmMasker`)."""
    return (batch["epoch"] * blocks + batch["example_idx"]).numpy()


def batch_kd_counts(batch: dict, kd_positions: str) -> torch.Tensor:
    """Each row's number of KD rows in a masked batch ([B]): what `models.mlm_row_index` gathers per row."""
    return (batch["mlm_labels"] != IGNORE_INDEX).sum(1) if kd_positions == "masked" else batch["attention_mask"].sum(1)


class MlmTeacherCache(TeacherCache):
    """An opened, verified masked-LM store and its collate-time reader."""

    LAYOUT = MlmLayout

    @property
    def topk_temperature(self) -> float:
        """The T its logsumexp is at (the top-k logits' `losses.topk_kd_loss` contract)."""
        return self.layout.temperature

    def require(self, layers: Sequence[int], epochs: int, relation_layer: int | None = None, logits: bool = False) -> None:
        """Refuse a student that needs a layer's states, an epoch's masks, a relation layer's Q/K/V or logits
        the store lacks."""
        require_relation_layer(self.directory, self.layout, relation_layer)
        if logits and not self.layout.logits:
            raise PkdError(f"--teacher-cache {self.directory}: holds no logits (written from a headless teacher); a run that "
                           "reads them (--alpha > 0) needs a store of a teacher with its masked-LM head")
        missing = sorted(set(layers) - set(self.layout.layers))
        if missing:
            raise PkdError(f"--teacher-cache {self.directory}: teacher layer(s) {missing} not stored (it holds {list(self.layout.layers)}); "
                           "rewrite it with --stage cache and --cache-layers including them")
        if epochs > self.layout.epochs:
            raise PkdError(f"--teacher-cache {self.directory}: holds the masks of {self.layout.epochs} epoch(s), this run trains "
                           f"{epochs}; rewrite it with --stage cache for {epochs} epochs (or train fewer)")

    def reader(self, layers: Sequence[int], pt_tokens: str, pin: bool = False, relation_layer: int | None = None, *,
               kd_positions: str) -> Callable[[dict], dict]:
        """The collate-time lookup of one student run, on a masked batch (with `epoch` and `example_idx`):
        `teacher_topk_ids` [n, k] int32, `teacher_topk_values` [n, k], `teacher_topk_lse` [n] fp32 for the n
        KD rows in `models.mlm_row_index` order, and for a PT map `teacher_hidden` [B, len(layers), S, H] in
        map order: S the batch's padded length, or 1 for --pt-tokens mean (pooled here, as the GLUE store's
        reader does), the layout `recipes.mlm.MlmContext.loss` reads; for a relation term `teacher_qkv`
        [B, 3, S, H]. A store without logits adds no top-k columns."""
        index = np.array([self.layout.layers.index(l) for l in layers], dtype=np.int64)

        def read(batch: dict) -> dict:
            units = batch_units(batch, self.layout.blocks)
            if units.size and (batch["epoch"].max() >= self.layout.epochs):
                raise PkdError(f"--teacher-cache {self.directory}: epoch {int(batch['epoch'].max())} is past the {self.layout.epochs} stored")
            counts = batch_kd_counts(batch, kd_positions)
            rows = unit_rows(self.arrays["row_offsets"], units, counts)
            if rows is None:  # a check the fingerprint makes redundant, unless the masking code itself changed
                raise PkdError(f"--teacher-cache {self.directory}: the batch's KD rows per block {counts.tolist()} differ from the "
                               "store's: its masks are not this run's; rewrite it with --stage cache")
            out = {}
            if self.layout.logits:
                out.update({"teacher_topk_ids": torch.from_numpy(self.arrays["topk_ids"][rows]),
                            "teacher_topk_values": self._tensor(self.arrays["topk_values"][rows]),
                            "teacher_topk_lse": torch.from_numpy(self.arrays["lse"][rows])})
            if relation_layer:
                out["teacher_qkv"] = self.states(units, np.arange(3), batch["input_ids"].shape[1], "qkv")
            if len(index):
                states = self.states(units, index, batch["input_ids"].shape[1])
                out["teacher_hidden"] = pooled_states(states, batch["attention_mask"]) if pt_tokens == "mean" else states
            return pinned(out) if pin else out

        return read


class MlmWriter(Writer):
    """Writes a masked-LM store collectively (`cache.Writer`): rank 0 lays out `row_offsets` at allocation;
    each rank then `write`s the units of its batches."""

    CACHE = MlmTeacherCache

    def __init__(self, directory, fingerprint: dict, layout: MlmLayout, world, offsets: np.ndarray):
        self.offsets = offsets
        super().__init__(directory, fingerprint, layout, world)

    def initial_contents(self) -> dict[str, np.ndarray]:
        return {"row_offsets": self.offsets}

    def write(self, units: np.ndarray, counts: torch.Tensor, logits: torch.Tensor | None, hidden_states: Sequence[torch.Tensor] | None,
              attention_mask: torch.Tensor, qkv: torch.Tensor | None = None) -> None:
        """Store one batch: `logits` [n, V] are its KD rows in gather order (`counts` [B] per row; None for a
        store without logits), `units` [B] its rows' epoch·B + block, `qkv` [3, B, S, H] the relation layer's."""
        states = [hidden_states[l] for l in self.layout.layers] if self.layout.layers else []
        kept = [qkv] if self.layout.relation_layer else []
        if self.layout.logits:
            values, ids = logits.topk(self.layout.topk, dim=-1)
            lse = torch.logsumexp(logits.float() / self.layout.temperature, dim=-1)
            kept += [values, lse]
        self.refuse_nonfinite(units, [*kept, *states])
        rows = unit_rows(self.offsets, units, counts)
        if rows is None:
            raise PkdError(f"teacher cache: KD rows per block {counts.tolist()} differ from the layout's (the masks changed while writing)")
        if self.layout.logits:
            self.arrays["topk_ids"][rows] = ids.to("cpu", torch.int32).numpy()
            self.arrays["topk_values"][rows] = self._numpy(values)
            self.arrays["lse"][rows] = lse.cpu().numpy()
        if states:
            self.write_states(units, hidden_states, attention_mask)
        if self.layout.relation_layer:
            self.write_qkv(units, qkv, attention_mask)
        self.mark_written(units)
