"""Raw text for task-agnostic distillation: files or a `datasets` corpus → documents → token ids → packed
blocks → batches with BERT's masked-LM masking.

Inputs. Local files (`--text-files`, globs): `.txt`/`.text` hold one document per line (blank lines are
skipped); `.jsonl` one JSON object per line whose `--text-column` field (default "text") is the document;
either may be gzipped (`.gz`). Lines split on "\\n" only and must be UTF-8. NUL characters are kept (the tokenizer
drops them; scraped text often carries a few) but counted: a file with any gets one warning with the count,
since many of them mean a file that is not text (UTF-16, say). Or a `datasets` corpus
(`--dataset NAME [--dataset-config C]`), read whole or streamed (`--streaming`).

Packing (as BERT pre-training does). The documents' tokens are concatenated in order with a [SEP] between
consecutive documents, and the stream is cut into blocks of `max_seq_length`: [CLS] + up to L-2 tokens +
[SEP]. A long document continues into the next block (nothing is truncated). A separator never falls on
a block's edge, where the block's own [CLS]/[SEP] already mark the boundary: when only one free slot is
left for it, the block closes one token short. The last, partial block is kept (the collator pads it), so
no token is lost or repeated. Literal "[SEP]"-like text in a document is tokenised as ordinary word
pieces (`split_special_tokens`), so a special id inside a block is always structural.

Masking (BERT's rule, a pure function of (seed, epoch, example index)): every position that is not a
special token ([CLS], [SEP], [PAD], [UNK], [MASK], ...) is selected independently with probability
`mlm_probability`; of the selected, 80% become [MASK], 10% a random non-special token, 10% stay as they
are. `mlm_labels` holds the original id at selected positions and -100 elsewhere. Each example draws from
its own `torch.Generator` seeded by a hash of the three numbers, over its unpadded length, so a resumed
run masks identically and ranks or workers share no RNG state.

Two pipelines with one batch format (input_ids, attention_mask, token_type_ids = 0, mlm_labels,
example_idx; padded per batch to a multiple of 8):

- map-style (`prepare_blocks` → `map_loader`): tokenised once with `datasets.map` and packed, both cached
  on disk under `cache_dir`, keyed by the files (path, size, mtime) or the dataset's fingerprint and by the
  tokenizer; example index = block index; shuffled and sharded by `DistributedSampler`.
- streaming (`stream_documents` → `StreamingBlocks` → `stream_loader`): read lazily, split over ranks with
  `datasets.distributed.split_dataset_by_node`, tokenised and packed on the fly, in corpus order (no
  shuffle buffer: its contents would be lost on resume). A rank's state (`state_dict`) says exactly where
  it stands, so a restart neither skips nor repeats a block. Ranks' streams differ in length: train for a
  fixed number of steps.
"""

from __future__ import annotations

import copy
import gzip
import json
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from glob import glob
from pathlib import Path

import datasets
import torch
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from pkd_fast.data import make_loader
from pkd_fast.errors import PkdError, write_failure
from pkd_fast.hashing import json_sha256, seed64, tokenizer_digest

log = logging.getLogger("pkd_fast")

FORMAT = 1  # bump when tokenisation or packing changes, so older caches are not reused
TEXT_SUFFIXES = (".txt", ".text")
JSONL_SUFFIXES = (".jsonl",)
IGNORE_INDEX = -100
_DOCS_PER_BATCH = 1000  # documents per tokenizer call (map batch, streaming group)
_TOKENS = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
_BLOCKS = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")), "example_idx": datasets.Value("int64")})


# -- inputs ------------------------------------------------------------------------------------------

def _kind(path: Path, flag: str = "--text-files") -> str:
    """'text' or 'jsonl' by suffix (under an optional .gz); `flag` is the one that named the file."""
    suffixes = path.suffixes[-2:] if path.suffix == ".gz" else path.suffixes[-1:]
    inner = suffixes[0] if suffixes else ""
    if inner in TEXT_SUFFIXES:
        return "text"
    if inner in JSONL_SUFFIXES:
        return "jsonl"
    raise PkdError(f"{flag} {path}: unknown format; expected {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} (optionally .gz)")


def resolve_text_files(patterns: Sequence[str], flag: str = "--text-files") -> list[Path]:
    """The files matched by each glob, in sorted order per pattern, each once; a pattern matching no file
    is an error (a typo would otherwise train on less than asked). `flag` (--text-files or
    --validation-files) is the one the errors name."""
    if not patterns:
        raise PkdError(f"{flag}: no file pattern given")
    files: list[Path] = []
    for pattern in patterns:
        matched = sorted(Path(p) for p in glob(os.path.expanduser(pattern), recursive=True) if Path(p).is_file())
        if not matched:
            raise PkdError(f"{flag} {pattern}: matches no file")
        for path in matched:
            _kind(path, flag)
            if path not in files:
                files.append(path)
    return files


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, split on "\\n" only and decoded strictly as UTF-8."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise PkdError(f"{path}:{number}: not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})") from None
                if number == 1:
                    line = line.removeprefix("\ufeff")
                yield number, line.rstrip("\r\n")
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:  # zlib.error: the deflate data itself is corrupt
        raise PkdError(f"{path}: not a readable gzip file ({err})") from None


def read_documents(paths: Sequence[str | os.PathLike], text_column: str = "text") -> Iterator[dict]:
    """{"text": document} for every non-blank document of the files, in order, validated line by line.
    A generator of plain arguments, so `datasets` can shard it by file."""
    for path in map(Path, paths):
        kind = _kind(path)
        nul_chars = nul_documents = 0
        for number, line in _lines(path):
            if not line.strip():
                continue
            text = line if kind == "text" else _jsonl_text(path, number, line, text_column)
            if not text.strip():
                continue
            if "\0" in text:
                nul_chars, nul_documents = nul_chars + text.count("\0"), nul_documents + 1
            yield {"text": text}
        if nul_chars:
            log.warning("%s: %d NUL character(s) in %d document(s), dropped by the tokenizer; text holds none (is the file "
                        "UTF-16 or binary?)", path, nul_chars, nul_documents)


def _jsonl_text(path: Path, number: int, line: str, text_column: str) -> str:
    """The `text_column` field of one .jsonl line."""
    try:
        record = json.loads(line)
    except ValueError as err:
        raise PkdError(f"{path}:{number}: not JSON ({err})") from None
    if not isinstance(record, dict) or text_column not in record:
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise PkdError(f"{path}:{number}: no {text_column!r} field (--text-column); found {found}")
    text = record[text_column]
    if not isinstance(text, str):
        raise PkdError(f"{path}:{number}: field {text_column!r} is {type(text).__name__}, expected a string")
    return text


def _hub_dataset(name: str, config: str | None, text_column: str, split: str, streaming: bool):
    """One split of a `datasets` corpus with its text column renamed to "text"."""
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as err:  # offline, unknown name or config, bad split: one line for the user
        raise PkdError(f"--dataset {name}" + (f" --dataset-config {config}" if config else "") + f": cannot load split {split!r} ({type(err).__name__}: {err})") from None
    columns = ds.column_names
    if columns is not None and text_column not in columns:
        raise PkdError(f"--text-column {text_column}: dataset {name} has columns {columns}")
    ds = ds.select_columns([text_column])
    return ds.rename_column(text_column, "text") if text_column != "text" else ds


# -- tokenising and packing --------------------------------------------------------------------------

def encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each document, without special tokens (packing adds them) or truncation."""
    return tokenizer(
        [t or "" for t in texts], add_special_tokens=False, split_special_tokens=True, verbose=False,
        return_attention_mask=False, return_token_type_ids=False,
    )["input_ids"]


class Packer:
    """Cuts a stream of documents into blocks of `max_seq_length` (see the module docstring). Its whole
    state is the incomplete block's tokens (`carry`), so a stream can be resumed mid-corpus."""

    def __init__(self, max_seq_length: int, cls_id: int, sep_id: int, carry: Sequence[int] = ()):
        self.room, self.cls_id, self.sep_id = max_seq_length - 2, cls_id, sep_id
        self.carry = list(carry)

    def _block(self, tokens: list[int]) -> list[int]:
        return [self.cls_id, *tokens, self.sep_id]

    def add(self, ids: Sequence[int]) -> list[list[int]]:
        """Append one document; the blocks it completes."""
        if not ids:
            return []
        blocks = []
        if self.carry and len(self.carry) == self.room - 1:  # a separator would end the block: close it here
            blocks.append(self._block(self.carry))
            self.carry = []
        buf = self.carry + [self.sep_id] + list(ids) if self.carry else list(ids)
        full = len(buf) // self.room * self.room
        blocks += [self._block(buf[i : i + self.room]) for i in range(0, full, self.room)]
        self.carry = buf[full:]
        return blocks

    def finish(self) -> list[list[int]]:
        """The last, partial block (none when the stream ended on a block edge)."""
        blocks = [self._block(self.carry)] if self.carry else []
        self.carry = []
        return blocks


def _special_id(tokenizer, name: str) -> int:
    token_id = getattr(tokenizer, f"{name}_token_id")
    if token_id is None:
        raise PkdError(f"the tokenizer {tokenizer.name_or_path} has no {name} token; BERT-style packing and masking need [CLS], [SEP], [MASK] and [PAD]")
    return token_id


def _packer(tokenizer, max_seq_length: int, carry: Sequence[int] = ()) -> Packer:
    return Packer(max_seq_length, _special_id(tokenizer, "cls"), _special_id(tokenizer, "sep"), carry)


def _pack_tokens(tokens: datasets.Dataset, tokenizer, max_seq_length: int) -> Iterator[dict]:
    """Blocks of a tokenised corpus in order, numbered from 0 (the block index is the example index)."""
    packer = _packer(tokenizer, max_seq_length)
    index = 0
    for batch in tokens.iter(batch_size=_DOCS_PER_BATCH):
        for ids in batch["input_ids"]:
            for block in packer.add(ids):
                yield {"input_ids": block, "example_idx": index}
                index += 1
    for block in packer.finish():
        yield {"input_ids": block, "example_idx": index}


def _files_identity(files: Sequence[Path]) -> list:
    """What a file's tokens depend on, read without opening it: path, size and modification time."""
    out = []
    for path in files:
        stat = path.stat()
        out.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return out


def _build_once(target: Path, build) -> datasets.Dataset:
    """The dataset saved at `target`, built by `build(scratch_dir)` and saved first when absent. The save
    goes to a sibling temporary directory renamed into place, so an interrupted build leaves nothing that
    loads; scratch files `build` writes are removed with it."""
    if target.is_dir():
        log.info("corpus cache: reusing %s", target)
        return datasets.load_from_disk(str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=target.parent))
    try:
        built = build(tmp / "scratch")
        built.save_to_disk(str(tmp / "saved"))
        del built
        if target.is_dir():  # another process finished first: keep its copy
            log.info("corpus cache: %s appeared meanwhile, reusing it", target)
        else:
            os.replace(tmp / "saved", target)
            log.info("corpus cache: wrote %s", target)
    except (OSError, RuntimeError, datasets.exceptions.DatasetGenerationError) as err:  # a full disk, say
        failure = write_failure(target.parent, err)
        if failure is None:
            raise
        raise failure from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(target))


def _generated(generator, scratch: Path, features, fingerprint: str, empty: str, **gen_kwargs) -> datasets.Dataset:
    """Dataset.from_generator into `scratch`, surfacing the generator's own PkdError (file:line) instead of
    `datasets`' generic wrapper, and PkdError(`empty`) when it yields nothing."""
    yielded = 0

    def counted(**kwargs):
        nonlocal yielded
        for row in generator(**kwargs):
            yielded += 1
            yield row

    try:
        return datasets.Dataset.from_generator(
            counted, features=features, cache_dir=str(scratch), gen_kwargs=gen_kwargs, fingerprint=fingerprint
        )
    except datasets.exceptions.DatasetGenerationError as err:
        if isinstance(err.__cause__, PkdError):
            raise err.__cause__ from None
        raise
    except ValueError:
        if yielded == 0:  # datasets cannot build a dataset of no rows
            raise PkdError(empty) from None
        raise


def tokenize_corpus(
    tokenizer: PreTrainedTokenizerBase,
    cache_dir: str | os.PathLike,
    *,
    text_files: Sequence[str] | None = None,
    dataset: str | None = None,
    dataset_config: str | None = None,
    text_column: str = "text",
    split: str = "train",
    num_proc: int | None = None,
    flag: str = "--text-files",
) -> datasets.Dataset:
    """Every document's token ids (column input_ids), from `text_files` (globs) or the `datasets` corpus
    `dataset`, tokenised once with a batched `datasets.map` and saved under `cache_dir`. The cache key is
    the files' paths, sizes and mtimes (or the dataset's fingerprint), the text column and the tokenizer's
    digest, so a second run with the same inputs loads the saved tokens instead of re-tokenising. `flag` is
    the one errors about `text_files` name (--text-files, or --validation-files for held-out text)."""
    if (text_files is None) == (dataset is None):
        raise PkdError("give exactly one of --text-files and --dataset")
    tok_digest = tokenizer_digest(tokenizer)
    if text_files is not None:
        files = resolve_text_files(text_files, flag)
        source = {"files": _files_identity(files)}
        describe = f"{flag} {' '.join(text_files)}"
    else:
        hub = _hub_dataset(dataset, dataset_config, text_column, split, streaming=False)
        source = {"dataset": dataset, "config": dataset_config, "split": split, "fingerprint": hub._fingerprint}
        describe = f"--dataset {dataset}"
    key = json_sha256({"format": FORMAT, "source": source, "text_column": text_column, "tokenizer": tok_digest})

    def build(scratch: Path) -> datasets.Dataset:
        if text_files is not None:
            docs = _generated(read_documents, scratch, datasets.Features({"text": datasets.Value("string")}), key,
                              f"{describe}: no text (every line is blank)", paths=[str(p) for p in files], text_column=text_column)
        else:
            docs = hub
            if len(docs) == 0:
                raise PkdError(f"{describe}: no documents in split {split!r}")
        return docs.map(
            lambda batch: {"input_ids": encode(tokenizer, batch["text"])},
            batched=True, batch_size=_DOCS_PER_BATCH, remove_columns=docs.column_names, features=_TOKENS,
            cache_file_name=str(scratch / "tokens.arrow"), new_fingerprint=key, num_proc=num_proc, desc="tokenising",
        )

    return _build_once(Path(cache_dir) / f"tokens-{key[:24]}", build)


def pack_corpus(tokens: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_seq_length: int,
                cache_dir: str | os.PathLike) -> datasets.Dataset:
    """The tokenised corpus packed into blocks (columns input_ids, example_idx = block index), saved under
    `cache_dir` keyed by the tokens' fingerprint and `max_seq_length`."""
    key = json_sha256({"format": FORMAT, "tokens": tokens._fingerprint, "max_seq_length": max_seq_length,
                   "tokenizer": tokenizer_digest(tokenizer)})
    return _build_once(
        Path(cache_dir) / f"blocks-{key[:24]}",
        lambda scratch: _generated(_pack_tokens, scratch, _BLOCKS, key, "the corpus has no tokens (every document tokenises to nothing)",
                                   tokens=tokens, tokenizer=tokenizer, max_seq_length=max_seq_length),
    )


def prepare_blocks(tokenizer: PreTrainedTokenizerBase, max_seq_length: int, cache_dir: str | os.PathLike, **source) -> datasets.Dataset:
    """Map-style corpus: `tokenize_corpus(**source)` then `pack_corpus`, both cached. In a distributed run
    call it on the main rank first, then on the others after a barrier (they load the cache)."""
    return pack_corpus(tokenize_corpus(tokenizer, cache_dir, **source), tokenizer, max_seq_length, cache_dir)


# -- masking -----------------------------------------------------------------------------------------

def mask_seed(seed: int, epoch: int, example_idx: int) -> int:
    """A 64-bit generator seed from the three numbers a mask depends on (a hash: nearby triples are
    unrelated streams)."""
    return seed64(f"{seed}:{epoch}:{example_idx}")


class MlmMasker:
    """BERT's 80/10/10 masking of one batch, a pure function of (seed, epoch, example_idx). Call it on a
    padded batch (input_ids, attention_mask, example_idx): it returns the masked input_ids, mlm_labels,
    token_type_ids (zeros) and `epoch` (per row, with example_idx what a masked-LM teacher cache finds the
    batch's teacher outputs by). `set_epoch` moves every example to a fresh mask."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, mlm_probability: float = 0.15, seed: int = 0):
        if not 0.0 < mlm_probability < 1.0:
            raise PkdError(f"--mlm-probability {mlm_probability}: expected a number between 0 and 1")
        self.mlm_probability, self.seed, self.epoch = mlm_probability, seed, 0
        self.mask_id = _special_id(tokenizer, "mask")
        _special_id(tokenizer, "pad")  # the collator pads with it
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)))
        self.replacement_ids = torch.tensor(sorted(set(range(len(tokenizer))) - set(tokenizer.all_special_ids)))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def mask_example(self, input_ids: torch.Tensor, example_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked ids, labels) of one unpadded example at the current epoch."""
        return self.mask_at(self.epoch, input_ids, example_idx)

    def mask_at(self, epoch: int, input_ids: torch.Tensor, example_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked ids, labels) of one unpadded example at `epoch`: what a teacher cache lays out ahead."""
        g = torch.Generator().manual_seed(mask_seed(self.seed, epoch, example_idx))
        n = input_ids.numel()
        selected = (torch.rand(n, generator=g) < self.mlm_probability) & ~torch.isin(input_ids, self.special_ids)
        choice = torch.rand(n, generator=g)
        replacement = self.replacement_ids[torch.randint(len(self.replacement_ids), (n,), generator=g)]
        masked = torch.where(selected & (choice < 0.8), self.mask_id, input_ids)
        masked = torch.where(selected & (choice >= 0.8) & (choice < 0.9), replacement, masked)
        labels = torch.where(selected, input_ids, IGNORE_INDEX)
        return masked, labels

    def __call__(self, batch: dict) -> dict:
        input_ids = batch["input_ids"].clone()
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for row, (length, idx) in enumerate(zip(batch["attention_mask"].sum(1).tolist(), batch["example_idx"].tolist())):
            input_ids[row, :length], labels[row, :length] = self.mask_example(input_ids[row, :length], idx)
        return {"input_ids": input_ids, "mlm_labels": labels, "token_type_ids": torch.zeros_like(input_ids),
                "epoch": torch.full_like(batch["example_idx"], self.epoch)}


def masks_any(blocks: datasets.Dataset, masker: MlmMasker) -> bool:
    """Whether `masker` (at its current epoch) selects at least one token of `blocks`: a held-out set it
    leaves empty has nothing to score. Stops at the first block with one, so a real set costs one block."""
    for row in blocks:
        _, labels = masker.mask_example(torch.tensor(row["input_ids"]), row["example_idx"])
        if (labels != IGNORE_INDEX).any():
            return True
    return False


def mlm_collator(tokenizer: PreTrainedTokenizerBase, masker: MlmMasker, lookup: Callable[[dict], dict] | None = None):
    """Rows (input_ids, example_idx) → a padded (multiple of 8), masked batch: input_ids, attention_mask,
    token_type_ids, mlm_labels, example_idx, and what `lookup` reads for the masked batch (a teacher
    source's rows). `pkd_fast.data.make_loader` composes the same steps."""
    pad = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8, return_tensors="pt")

    def collate(rows: list[dict]) -> dict:
        batch = pad(rows)
        batch.update(_masked_then(masker, lookup)(batch))
        return batch

    return collate


def _masked_then(masker: MlmMasker, lookup: Callable[[dict], dict] | None) -> Callable[[dict], dict]:
    """The batch's masking, then `lookup` of the masked batch (the rows it reads depend on the masks)."""
    if lookup is None:
        return masker

    def read(batch: dict) -> dict:
        masked = masker(batch)
        return {**masked, **lookup({**batch, **masked})}

    return read


# -- streaming ---------------------------------------------------------------------------------------

def stream_documents(
    *,
    text_files: Sequence[str] | None = None,
    dataset: str | None = None,
    dataset_config: str | None = None,
    text_column: str = "text",
    split: str = "train",
    rank: int = 0,
    world_size: int = 1,
) -> datasets.IterableDataset:
    """This rank's share of the documents ({"text": ...}), read lazily: local files (one shard per file,
    validated as in `read_documents`) or a streamed `datasets` corpus, split with `split_dataset_by_node`
    (whole shards when their count is a multiple of the world size, else every world_size-th document)."""
    if (text_files is None) == (dataset is None):
        raise PkdError("give exactly one of --text-files and --dataset")
    if text_files is not None:
        files = [str(p) for p in resolve_text_files(text_files)]
        docs = datasets.IterableDataset.from_generator(read_documents, gen_kwargs={"paths": files, "text_column": text_column})
    else:
        docs = _hub_dataset(dataset, dataset_config, text_column, split, streaming=True)
    return split_dataset_by_node(docs, rank=rank, world_size=world_size) if world_size > 1 else docs


class StreamingBlocks(torch.utils.data.IterableDataset):
    """Packed blocks of a document stream, in order: {"input_ids", "example_idx"}, where example_idx =
    (blocks this rank yielded before, in this epoch) · world_size + rank, unique over ranks.

    Resumable: `state_dict()` after k blocks, given to `load_state_dict` of a fresh instance over the same
    stream, makes it yield block k+1 next (after the last block: nothing, until `set_epoch` starts a pass). The state is the document stream's own `state_dict` at the start
    of the current tokenizer batch, the packer's carry then, and how many blocks that batch has yielded, so
    a resume re-reads one batch of documents, not the whole stream. Use it with num_workers=0 (the state
    lives in this process)."""

    def __init__(self, documents: datasets.IterableDataset, tokenizer: PreTrainedTokenizerBase, max_seq_length: int,
                 *, rank: int = 0, world_size: int = 1, docs_per_batch: int = _DOCS_PER_BATCH):
        self.documents, self.tokenizer, self.max_seq_length = documents, tokenizer, max_seq_length
        self.rank, self.world_size, self.docs_per_batch = rank, world_size, docs_per_batch
        self.epoch = 0
        self._position = self._start()

    @staticmethod
    def _start() -> dict:
        return {"yielded": 0, "source": None, "carry": [], "in_batch": 0}

    def set_epoch(self, epoch: int) -> None:
        """Start a new pass over the stream (a no-op for the epoch already in progress)."""
        if epoch != self.epoch:
            self.epoch, self._position = epoch, self._start()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "rank": self.rank, "world_size": self.world_size, **copy.deepcopy(self._position)}

    def load_state_dict(self, state: dict) -> None:
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise PkdError(f"cannot resume the stream of rank {state['rank']}/{state['world_size']} as rank {self.rank}/{self.world_size}: "
                           "resume with the same number of ranks")
        self.epoch = state["epoch"]
        self._position = {k: state[k] for k in self._start()}

    def __iter__(self) -> Iterator[dict]:
        pos = self._position
        self.documents.load_state_dict(pos["source"])  # None: from the first document
        packer = _packer(self.tokenizer, self.max_seq_length, pos["carry"])
        skip, source = pos["in_batch"], pos["source"]
        texts = iter(self.documents)
        while True:
            carry = list(packer.carry)
            batch = [doc["text"] for _, doc in zip(range(self.docs_per_batch), texts)]
            blocks = [b for ids in encode(self.tokenizer, batch) for b in packer.add(ids)] if batch else packer.finish()
            pos.update(source=source, carry=carry, in_batch=0)
            for block in blocks:
                pos["in_batch"] += 1
                if skip:
                    skip -= 1
                    continue
                pos["yielded"] += 1
                yield {"input_ids": block, "example_idx": (pos["yielded"] - 1) * self.world_size + self.rank}
            if not batch:
                break
            source = self.documents.state_dict()  # just after this batch's last document
        if pos["yielded"] == 0:
            raise PkdError(f"no text in rank {self.rank}'s share of the corpus (world size {self.world_size})")
        # The position stays at the end of the pass until `set_epoch` starts the next one. A DataLoader reads
        # the stream to its end while it fills a short last batch, so a checkpoint of that step saves this
        # state: resetting it here saved "the start of this epoch", and a resumed run replayed the pass.


# -- loaders -----------------------------------------------------------------------------------------

class MlmLoader:
    """Masked batches, map-style or streamed, behind one interface for the training loop: iterate it,
    `set_epoch(e)` before each epoch (new shuffle or a new pass, and new masks), and `state_dict()` /
    `load_state_dict()` to resume a stream at the exact block (a map-style loader resumes by skipping
    batches, as the GLUE loop does, and has a length)."""

    def __init__(self, loader: DataLoader, masker: MlmMasker, stream: StreamingBlocks | None = None):
        self.loader, self.masker, self.stream = loader, masker, stream

    def set_epoch(self, epoch: int) -> None:
        self.masker.set_epoch(epoch)
        (self.stream or self.loader.sampler).set_epoch(epoch)

    def __iter__(self):
        return iter(self.loader)

    @property
    def dataset(self):
        """The blocks (or the block stream) batched, as a DataLoader's `dataset`."""
        return self.loader.dataset

    def __len__(self) -> int:
        if self.stream is not None:
            raise TypeError("a streamed corpus has no length; train for a number of steps")
        return len(self.loader)

    def state_dict(self) -> dict:
        return self.stream.state_dict() if self.stream is not None else {"epoch": self.masker.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.masker.set_epoch(state["epoch"])
        if self.stream is not None:
            self.stream.load_state_dict(state)
        else:
            self.loader.sampler.set_epoch(state["epoch"])


def map_loader(blocks: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, batch_size: int, *, seed: int,
               mlm_probability: float = 0.15, rank: int = 0, world_size: int = 1,
               lookup: Callable[[dict], dict] | None = None) -> MlmLoader:
    """Shuffled, rank-sharded masked batches of a map-style block dataset (`prepare_blocks`), through
    `pkd_fast.data.make_loader` with the masking (then `lookup`, a teacher source's rows) as its per-batch lookup."""
    masker = MlmMasker(tokenizer, mlm_probability, seed)
    loader = make_loader(blocks, tokenizer, batch_size, train=True, seed=seed, rank=rank, world_size=world_size,
                         lookup=_masked_then(masker, lookup))
    return MlmLoader(loader, masker)


def stream_loader(stream: StreamingBlocks, tokenizer: PreTrainedTokenizerBase, batch_size: int, *, seed: int,
                  mlm_probability: float = 0.15, lookup: Callable[[dict], dict] | None = None) -> MlmLoader:
    """Masked batches of a block stream, in stream order (the last batch may be short)."""
    masker = MlmMasker(tokenizer, mlm_probability, seed)
    # Its own generator, as in `make_loader`: each pass makes a new iterator, which draws a seed; from the
    # global RNG that draw would shift the dropout stream of a run resumed mid-pass.
    loader = DataLoader(stream, batch_size=batch_size, collate_fn=mlm_collator(tokenizer, masker, lookup), num_workers=0,
                        generator=torch.Generator().manual_seed(seed))
    return MlmLoader(loader, masker, stream)

