"""Batching: tokenised rows (each keeping its row number, `example_idx`, so the teacher cache can serve it in
any order) → subsets, length-grouped training order, dynamically padded batches on every rank, evaluation
batches of equal number on every rank, and the small tensor helpers the losses read them with. Where the
rows come from is another module's (`pkd_fast.glue_files`, `pkd_fast.corpus`)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import datasets
import torch
from torch.utils.data import DataLoader, DistributedSampler
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase


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
