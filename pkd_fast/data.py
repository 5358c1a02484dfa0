"""GLUE data: the classic `glue_data/` TSV folder (or the hub) → `datasets.Dataset` → tokenised → batches
with dynamic padding. Every example keeps its row number (`example_idx`) so the teacher cache can serve
it in any order."""

from __future__ import annotations

import csv
import io
import itertools
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader, DistributedSampler
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from pkd_fast.errors import PkdError
from pkd_fast.tasks import Task

log = logging.getLogger("pkd_fast")

HUB_DATASET = "nyu-mll/glue"
# Text columns of the hub's GLUE configs, where they differ from sentence1/sentence2.
_HUB_TEXT = {
    "sst2": ("sentence", None), "cola": ("sentence", None), "qqp": ("question1", "question2"),
    "mnli": ("premise", "hypothesis"), "qnli": ("question", "sentence"),
}


def _parse_label(task: Task, raw: str, where: str) -> int | float:
    if task.regression:
        try:
            value = float(raw)
        except ValueError:
            raise PkdError(f"{where}: label {raw!r} is not a number (column {task.label!r})") from None
        low, high = task.label_range
        if not low <= value <= high:  # also refuses nan and inf, which no comparison admits
            raise PkdError(f"{where}: label {raw!r} outside [{low:g}, {high:g}] (column {task.label!r})")
        return value
    try:
        return task.labels.index(raw)
    except ValueError:
        raise PkdError(f"{where}: label {raw!r} not in {list(task.labels)} (column {task.label!r})") from None


def _utf8_lines(path: Path):
    """The file's text, refusing bytes that are not UTF-8 with the line they are on."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise PkdError(f"{path}:{line}: not UTF-8 text ({err.reason} at byte {err.start}); GLUE files are UTF-8") from None


def read_glue_tsv(path: Path, task: Task) -> dict[str, list]:
    """Rows of one GLUE TSV file as columns text_a, text_b, label, validated line by line.

    GLUE files are raw: quotes are text, not CSV quoting, and some start with a byte-order mark. A row
    with another number of fields than the header (too few, or more: a stray tab in a sentence, which
    would otherwise be cut off there) or an unparsable label is an error naming its line, except in tasks
    whose published files hold such rows (QQP's train.tsv): the standard GLUE processors skip them, and so
    does this reader, counting them and saying so.
    """
    if not path.is_file():
        raise PkdError(f"{path}: missing; expected the classic glue_data layout <glue-dir>/{task.tsv_dir}/<split>.tsv")
    rows = csv.reader(io.StringIO(_utf8_lines(path), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = list(task.header) if task.header else next(rows, None)
    if header is None:
        raise PkdError(f"{path}: empty file")
    wanted = [task.text_a, task.label] + ([task.text_b] if task.text_b else [])
    missing = [c for c in wanted if c not in header]
    if missing:
        raise PkdError(f"{path}:1: header lacks column(s) {missing}; found {header}")
    col = {c: header.index(c) for c in wanted}
    out: dict[str, list] = {"text_a": [], "text_b": [], "label": []}
    skipped: list[int] = []
    first_line = 1 if task.header else 2
    for line, row in enumerate(rows, start=first_line):
        where = f"{path}:{line}"
        try:
            if len(row) != len(header):  # more fields: a tab inside the text, which would shift or cut it
                raise PkdError(f"{where}: {len(row)} tab-separated fields, expected {len(header)} ({header})"
                               + ("; a tab inside the text?" if len(row) > len(header) else ""))
            label = _parse_label(task, row[col[task.label]].strip(), where)
        except PkdError:
            if not task.skip_malformed_rows:
                raise
            skipped.append(line)
            continue
        out["text_a"].append(row[col[task.text_a]])
        out["text_b"].append(row[col[task.text_b]] if task.text_b else None)
        out["label"].append(label)
    if not out["label"]:  # header only (or every row skipped): nothing to train on or score
        raise PkdError(f"{path}: no data rows" + (f" (all {len(skipped)} malformed)" if skipped else "") + "; expected one example per line")
    if skipped:
        log.warning("%s: skipped %d malformed row(s) (lines %s), as the GLUE processors do", path, len(skipped),
                    ", ".join(map(str, skipped[:5])) + (", …" if len(skipped) > 5 else ""))
    if not task.text_b:
        del out["text_b"]
    return out


def _from_glue_dir(task: Task, glue_dir: Path) -> datasets.DatasetDict:
    if not glue_dir.is_dir():
        raise PkdError(f"--glue-dir {glue_dir}: not a directory")
    folder = glue_dir / task.tsv_dir
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_dict(read_glue_tsv(folder / f"{split}.tsv", task))
         for split in ("train", *task.dev_splits)}
    )


def _from_hub(task: Task) -> datasets.DatasetDict:
    try:
        raw = datasets.load_dataset(HUB_DATASET, task.name)
    except Exception as err:  # offline, hub down, auth: all end the same way for the user
        raise PkdError(
            f"no GLUE data for {task.name}: the hub ({HUB_DATASET}) is unreachable ({type(err).__name__}). "
            f"Provide the classic glue_data folder with --glue-dir DIR or GLUE_DIR=DIR "
            f"(DIR/{task.tsv_dir}/train.tsv and {', '.join(s + '.tsv' for s in task.dev_splits)}; "
            "the GLUE download script writes this layout)"
        ) from None
    a, b = _HUB_TEXT.get(task.name, ("sentence1", "sentence2"))
    out = {}
    for split in ("train", *task.dev_splits):
        ds = raw[split.replace("dev", "validation")]
        columns = {"text_a": ds[a], "label": ds["label"]}
        if b:
            columns["text_b"] = ds[b]
        out[split] = datasets.Dataset.from_dict(columns)
    return datasets.DatasetDict(out)


def load_glue(task: Task, glue_dir: str | os.PathLike | None) -> datasets.DatasetDict:
    """Train and dev splits of `task`, from the TSV folder when given, else from the hub."""
    return _from_glue_dir(task, Path(glue_dir)) if glue_dir else _from_hub(task)


def subsample(ds: datasets.Dataset, n: int | None, seed: int) -> datasets.Dataset:
    """A fixed random subset of n rows (all rows when n is None or larger)."""
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n)).flatten_indices()


def subsample_head(ds: datasets.Dataset, n: int | None) -> datasets.Dataset:
    """The first n rows (dev sets are scored in order, so a prefix keeps runs comparable)."""
    return ds if n is None or n >= len(ds) else ds.select(range(n)).flatten_indices()


def tokenize(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_seq_length: int) -> datasets.Dataset:
    """input_ids/attention_mask/token_type_ids without padding (the collator pads per batch), labels,
    and example_idx = the row's position in `ds`."""
    pair = "text_b" in ds.column_names

    def encode(batch, idx):
        enc = tokenizer(batch["text_a"], batch["text_b"] if pair else None, truncation=True, max_length=max_seq_length)
        enc["labels"] = batch["label"]
        enc["example_idx"] = idx
        return enc

    return ds.map(encode, batched=True, with_indices=True, remove_columns=ds.column_names, desc="tokenising")


# Steps sorted together by `LengthGroupedSampler`: enough that most steps find rows of their own length
# (SST-2, 8,000 rows, 32 a step: 1.05× the real tokens padded, against 3.0× for plain shuffled batches),
# few enough that the order stays well mixed (Hugging Face's group_by_length sorts 50 batches too).
LENGTH_GROUP_STEPS = 50


class LengthGroupedSampler(DistributedSampler):
    """DistributedSampler's rows (the same shuffle by (seed, epoch), the same rows dropped so every rank has
    an equal share) in an order that pads little: the shuffled rows are cut into megabatches of
    LENGTH_GROUP_STEPS optimizer steps, each megabatch is sorted by length and cut into steps, and the
    steps are shuffled. A step is micro-batch × ranks × accumulation rows whatever its split, so 1 rank
    and 2, or accumulation and none, train on the same rows in each step (the tests compare such runs);
    rank r takes micro-batch r of each accumulation slot. A last, shorter step is split evenly over ranks."""

    def __init__(self, ds, lengths: list[int], micro_batch: int, accumulation: int, *, num_replicas: int, rank: int, seed: int):
        super().__init__(ds, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.lengths, self.micro_batch, self.accumulation = lengths, micro_batch, accumulation

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)  # DistributedSampler's shuffle
        rows = torch.randperm(len(self.dataset), generator=generator).tolist()[: self.total_size]
        step_rows = self.micro_batch * self.num_replicas * self.accumulation
        megabatch = step_rows * LENGTH_GROUP_STEPS
        ordered = [row for start in range(0, len(rows), megabatch)
                   for row in sorted(rows[start : start + megabatch], key=lambda row: -self.lengths[row])]
        n_full = len(ordered) // step_rows
        steps = [ordered[i * step_rows : (i + 1) * step_rows] for i in torch.randperm(n_full, generator=generator).tolist()]
        mine = [row for step in steps for slot in range(self.accumulation)
                for row in step[(slot * self.num_replicas + self.rank) * self.micro_batch :][: self.micro_batch]]
        rest = ordered[n_full * step_rows :]
        share = len(rest) // self.num_replicas
        return iter(mine + rest[self.rank * share : (self.rank + 1) * share])


def make_loader(
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    *,
    train: bool,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    lookup: Callable[[dict], dict] | None = None,
    group_by_length: bool = False,
    accumulation: int = 1,
) -> DataLoader:
    """Batches padded to their own longest row (a multiple of 8, for tensor cores). Training batches are
    shuffled by (seed, epoch) and sharded over ranks (with `group_by_length`, each optimizer step of
    `accumulation` micro-batches on every rank holds rows of like length: `LengthGroupedSampler`); evaluation rows are sharded without padding rows, so
    each rank scores a disjoint slice, and batched longest first, so rows of like length share a batch:
    SST-2's dev set in file order was 54% padding at 64 rows a batch, sorted 17%. Its scores are put back
    in row order by example_idx. `lookup(batch)` adds columns found by the batch's example_idx (the teacher
    cache's rows), read in the collate rather than in the training step."""
    pad = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8, return_tensors="pt")

    def collator(rows):
        batch = pad(rows)
        if lookup is not None:
            batch.update(lookup(batch))
        return batch

    lengths = [len(ids) for ids in ds["input_ids"]] if len(ds) and (group_by_length or not train) else []
    if train and group_by_length:
        sampler = LengthGroupedSampler(ds, lengths, batch_size, accumulation, num_replicas=world_size, rank=rank, seed=seed)
    elif train:
        sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    else:
        sampler = sorted(range(rank, len(ds), world_size), key=lambda row: -lengths[row])  # stable: ties in order
    # Its own generator: a DataLoader draws a seed per iterator, and drawing it from the global RNG would
    # shift the dropout stream of a resumed run (whose iterator starts after the RNG is restored).
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collator, drop_last=train, generator=generator)


def inference_batches(
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    *,
    rank: int,
    world_size: int,
    lookup: Callable[[dict], dict] | None = None,
) -> tuple[Iterator[tuple[dict, bool]], int]:
    """(batch, counted) pairs of this rank's slice of `ds` (`make_loader`'s evaluation sharding and order),
    and their number, which is the same on every rank: under ZeRO-3 each forward gathers parameters with
    every rank, so a rank with fewer batches (or none: fewer rows than ranks) pads its share with filler
    batches of the first row, marked not counted, which its caller runs but scores and stores nothing of."""
    loader = make_loader(ds, tokenizer, batch_size, train=False, seed=0, rank=rank, world_size=world_size, lookup=lookup)
    n_batches = -(-len(ds) // (world_size * batch_size))  # the first rank's, the longest slice

    def pairs():
        yield from ((batch, True) for batch in loader)
        if len(loader) < n_batches:
            filler = loader.collate_fn([ds[0]])
            yield from itertools.repeat((filler, False), n_batches - len(loader))

    return pairs(), n_batches


def model_inputs(batch: dict) -> dict:
    """The batch's columns a BERT forward takes (not labels, example_idx or the cache's rows)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


def real_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of the real tokens in the flattened [B·S] batch: the index models.pt_rows takes."""
    return attention_mask.flatten().nonzero().squeeze(1)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each example's mean over its real tokens, [B, S, H] → [B, H] in fp32 (--pt-tokens mean): the
    sentence embedding a mean-pooling teacher such as all-MiniLM-L6-v2 was trained to produce. Summed in
    fp32: a bf16 sum over a long sentence loses the last bits that the normalised distance compares."""
    mask = attention_mask[:, : hidden.shape[1], None].float()
    return (hidden.float() * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def batch_to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
