"""Teacher output cache: run the frozen teacher once over the training set, then distil any number of
students (any layer map, any depth, any grid point) from the stored outputs, without loading it.

A store is a directory:

    manifest.json   format, fingerprint, layout (shapes, dtype, stored layers), each file's size and digest
    logits.npy      [N, C]           the teacher's logits
    hidden.npy      [N, L', S, H]    hidden_states[l] for each stored layer l (default 0..L; 0 = embeddings);
                                     S = 1 ([CLS] only) or max_seq_length (every token, zero past the row's end)
    qkv.npy         [N, 3, S, H]     with a relation term (--relation-weight): the query, key and value
                                     projections' outputs of one teacher layer, every token (S = max_seq_length,
                                     zero past the row's end); absent otherwise

Row i is the training example with `example_idx == i`, so a batch reads its rows in any order. The arrays
are .npy files read as memory maps (fancy indexing by row reads only those rows) in the training dtype;
bf16, which numpy lacks, is stored as its raw 16-bit pattern (uint16) and reinterpreted by torch.

Safety: the manifest carries a fingerprint of what produced the store (teacher weight files, tokenizer,
task, split, max sequence length, the tokenised rows, dtype); opening refuses a mismatch, a missing or
short file, a digest mismatch, or a layer the run needs that is not stored. Writing is atomic: the store
is built in a sibling `DIR.tmp-*` directory, manifest last, then renamed into place, so a crash leaves no
directory that opens.

Every row is accounted for: each rank records the rows it wrote, and a store is published only when
together they cover every row (`rows_covered` in the manifest; opening refuses one that does not). A
teacher output that is NaN or inf is refused at write time. Besides the sampled digest (milliseconds),
the manifest holds a full checksum of each file that `--verify-cache full` checks.

Data-parallel writing: every rank writes its rows into the same memory maps, so all ranks must see one
filesystem with coherent shared mappings: one node, or a shared filesystem. Ranks that cannot see rank 0's
files (several nodes, each with its own local disk) are detected before any work and refused with a
one-line error; write the cache on one node and copy it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pkd_fast.data import mean_pool
from pkd_fast.dist import require_shared_directory
from pkd_fast.errors import PkdError
from pkd_fast.faults import fault_point
from pkd_fast.hashing import blake2b_of, file_blake2b, file_sha256, json_sha256, sha256_of, tokenizer_digest

log = logging.getLogger("pkd_fast")

FORMAT = 2  # 2: rows_covered and full checksums in the manifest
MANIFEST = "manifest.json"
SPLIT = "train"
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}  # bf16: its bit pattern
# The digest reads at most this many evenly spaced blocks per file (the whole file when smaller).
_BLOCK, _BLOCKS = 1 << 16, 256


# -- fingerprint -------------------------------------------------------------------------------------

def _weights_digest(teacher_path: str) -> str:
    """sha256 over the teacher's weight files (names and bytes), read from disk: no model is loaded."""
    folder = Path(teacher_path)
    if not folder.is_dir():
        raise PkdError(
            f"--teacher {teacher_path}: the teacher cache fingerprints the teacher's weight files, so --teacher "
            "must be a local directory (save_pretrained a hub model first)"
        )
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    if not files:
        raise PkdError(f"--teacher {teacher_path}: no weight files (*.safetensors, *.bin) to fingerprint")
    return sha256_of(path.name.encode() + file_sha256(path) for path in files)


def _dataset_digest(train_set) -> str:
    """sha256 of what the teacher reads, row by row: input_ids and token_type_ids. (datasets' own
    `_fingerprint` is random for in-memory datasets, so it cannot tell two runs' rows apart.)"""
    table = train_set.with_format("arrow")[:]

    def chunks():
        for name in ("input_ids", "token_type_ids"):
            if name in table.column_names:
                column = table[name].combine_chunks()
                yield name.encode()
                yield pc.list_value_length(column).to_numpy().astype(np.int64).tobytes()
                yield column.flatten().to_numpy().astype(np.int64).tobytes()

    return sha256_of(chunks())


def _config_digest(teacher_path: str) -> str:
    """sha256 of the teacher's config.json as parsed JSON (key order and whitespace do not count)."""
    path = Path(teacher_path) / "config.json"
    try:
        return json_sha256(json.loads(path.read_text()))
    except (OSError, ValueError) as err:
        raise PkdError(f"--teacher {teacher_path}: cannot read its config.json to fingerprint it ({err})") from None


def teacher_fingerprint(teacher_path: str, tokenizer, max_seq_length: int, train_set, dtype: torch.dtype) -> dict:
    """What every store's contents depend on, whatever the objective: the teacher (weights, config), the
    tokenizer, the rows the teacher reads (their content, not their file names) and the dtype they are stored in."""
    return {
        "teacher_weights": _weights_digest(teacher_path),
        "teacher_config": _config_digest(teacher_path),
        "tokenizer": tokenizer_digest(tokenizer),
        "max_seq_length": max_seq_length,
        "rows": len(train_set),
        "dataset": _dataset_digest(train_set),
        "dtype": str(dtype).removeprefix("torch."),
    }


def fingerprint(teacher_path: str, tokenizer, task: str, max_seq_length: int, train_set, dtype: torch.dtype) -> dict:
    """What a GLUE store's contents depend on; a store opens only for an equal fingerprint."""
    return {**teacher_fingerprint(teacher_path, tokenizer, max_seq_length, train_set, dtype), "task": task, "split": SPLIT}


def _differences(stored: dict, wanted: dict) -> list[str]:
    def short(v):
        return v[:12] + "…" if isinstance(v, str) and len(v) == 64 else v

    return [f"{k}: cache {short(stored.get(k))} ≠ now {short(wanted.get(k))}"
            for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]


# -- layout ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    rows: int
    num_labels: int
    teacher_layers: int
    hidden_size: int
    layers: tuple[int, ...]  # the stored hidden_states indices, ascending (0 = embeddings)
    positions: int  # 1: one row per example (`pooled`); max_seq_length: every token
    dtype: str
    pooled: str = "cls"  # with positions 1, what the row is: the [CLS] state, or the mean over real tokens (--pt-tokens mean)
    relation_layer: int = 0  # the 1-based teacher layer whose Q, K, V are stored (0: none)
    relation_positions: int = 0  # their tokens per row (max_seq_length)

    @classmethod
    def from_json(cls, fields: dict) -> Layout:
        return cls(**{**fields, "layers": tuple(fields["layers"])})

    @property
    def arrays(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Each stored file's shape and numpy dtype (the store's whole contents)."""
        numpy_dtype = np.dtype(NUMPY_DTYPES[self.dtype])
        arrays = {
            "logits": ((self.rows, self.num_labels), numpy_dtype),
            "hidden": ((self.rows, len(self.layers), self.positions, self.hidden_size), numpy_dtype),
        }
        if self.relation_layer:
            arrays["qkv"] = ((self.rows, 3, self.relation_positions, self.hidden_size), numpy_dtype)
        return arrays

    def check(self) -> None:
        """Refuse layers the teacher does not have (a store of no layer serves no GLUE student's PT)."""
        check_stored_layers(self.layers, self.teacher_layers, allow_none=False)

    def describe(self) -> str:
        what = "every token" if self.positions > 1 else "[CLS]" if self.pooled == "cls" else "the real tokens' mean"
        return f"{self.dtype}, {what} of layers {list(self.layers)}{relations_stored(self)}: {describe_arrays(self.arrays)}"


def relations_stored(layout) -> str:
    return f", Q/K/V of layer {layout.relation_layer}" if layout.relation_layer else ""


def require_relation_layer(directory, layout, relation_layer: int | None) -> None:
    """Refuse a run whose relation term reads a teacher layer's Q, K, V that the store lacks."""
    if relation_layer and relation_layer != layout.relation_layer:
        held = f"layer {layout.relation_layer}'s" if layout.relation_layer else "no"
        raise PkdError(f"--teacher-cache {directory}: holds {held} Q/K/V, the relation term reads teacher layer {relation_layer}'s; "
                       "rewrite it with --stage cache and this --relation-weight/--relation-layers")


def check_stored_layers(layers: Sequence[int], teacher_layers: int, allow_none: bool) -> None:
    bad = [l for l in layers if not 0 <= l <= teacher_layers]
    if bad or not (layers or allow_none):
        raise PkdError(f"--cache-layers: {bad or 'none'}: the teacher has hidden states 0..{teacher_layers} (0 = embeddings)")


def store_bytes(arrays: dict[str, tuple[tuple[int, ...], np.dtype]]) -> int:
    return int(sum(np.prod(shape, dtype=np.int64) * dtype.itemsize for shape, dtype in arrays.values()))


def describe_arrays(arrays: dict[str, tuple[tuple[int, ...], np.dtype]]) -> str:
    parts = ", ".join(f"{name} {list(shape)} {gib(store_bytes({name: (shape, dtype)}))}" for name, (shape, dtype) in arrays.items())
    return f"{parts}; {gib(store_bytes(arrays))} in all"


def gib(nbytes) -> str:
    return f"{nbytes / 2**30:.3f} GiB"


def _full_digest(path: Path) -> str:
    """blake2b of every byte: `--verify-cache full` (reads the whole store once)."""
    return file_blake2b(path)


def stored_fingerprint(directory: str | os.PathLike) -> dict | None:
    """The fingerprint a complete store at `directory` was written with (None: no readable manifest)."""
    try:
        return json.loads((Path(directory) / MANIFEST).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _digest(path: Path, size: int) -> str:
    """blake2b of `_BLOCKS` evenly spaced blocks of `_BLOCK` bytes (the whole file when ≤ 16 MiB): a check
    that costs milliseconds whatever the store's size. With the exact byte size it catches truncation, a
    damaged header and damage over any sampled block, not a stray flipped byte between blocks."""
    with open(path, "rb") as f:
        if size <= _BLOCK * _BLOCKS:
            return blake2b_of([f.read()])

        def blocks():
            for offset in np.linspace(0, size - _BLOCK, _BLOCKS, dtype=np.int64):
                f.seek(int(offset))
                yield f.read(_BLOCK)

        return blake2b_of(blocks())


# -- reading -----------------------------------------------------------------------------------------

class TeacherCache:
    """An opened, verified store: memory maps of its arrays and the per-batch row reader. Subclasses
    (the masked-LM store, `pkd_fast.mlm_cache`) bring their own `LAYOUT` and reader and share the rest."""

    LAYOUT = Layout
    topk_temperature = None  # dense logits: no top-k form (`teacher.CachedTeacher` reads this)

    def __init__(self, directory: Path, layout):
        self.directory, self.layout = directory, layout
        self.arrays = {}
        for name, (shape, dtype) in layout.arrays.items():
            array = np.load(directory / f"{name}.npy", mmap_mode="r")
            if array.shape != shape or array.dtype != dtype:
                raise PkdError(f"{directory}/{name}.npy: holds {array.dtype}{list(array.shape)}, the manifest says {dtype}{list(shape)}")
            self.arrays[name] = array

    @classmethod
    def open(cls, directory: str | os.PathLike, expected: dict, verify: str = "sampled") -> TeacherCache:
        """Verify the store (files, digests, fingerprint, every row written) and open it; PkdError says what
        is wrong. verify="full" checks every byte against the manifest's full checksum."""
        directory = Path(directory)
        manifest_path = directory / MANIFEST
        if not manifest_path.is_file():
            raise PkdError(f"--teacher-cache {directory}: no {MANIFEST}, so no complete cache there; write one with --stage cache")
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("format") != FORMAT:
                raise PkdError(f"{manifest_path}: cache format {manifest.get('format')}, this pkd_fast reads {FORMAT}; rewrite it with --stage cache")
            layout = cls.LAYOUT.from_json(manifest["layout"])
            files = {f"{name}.npy": manifest["files"][f"{name}.npy"] for name in layout.arrays}
            stored = manifest["fingerprint"]
            covered = manifest["rows_covered"]
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise PkdError(f"{manifest_path}: unreadable manifest ({type(err).__name__}: {err})") from None
        if covered != layout.rows:
            raise PkdError(f"--teacher-cache {directory}: only {covered} of {layout.rows} rows were written; rewrite it with --stage cache")
        diff = _differences(stored, expected)
        if diff:
            raise PkdError(f"--teacher-cache {directory} was written for a different run ({'; '.join(diff)}); "
                           "point --teacher-cache elsewhere, or replace it with --stage cache --overwrite-cache")
        for name, meta in files.items():
            path = directory / name
            if not path.is_file():
                raise PkdError(f"{path}: missing (the manifest lists it); rewrite the cache with --stage cache")
            size = path.stat().st_size
            if size != meta["bytes"]:
                raise PkdError(f"{path}: {size} bytes, the manifest says {meta['bytes']} (truncated or replaced); rewrite the cache with --stage cache")
            if _digest(path, size) != meta["digest"] or (verify == "full" and _full_digest(path) != meta["full_digest"]):
                check = "full checksum" if verify == "full" else "digest"
                raise PkdError(f"{path}: contents do not match the manifest's {check} (corrupt); rewrite the cache with --stage cache")
        return cls(directory, layout)

    def require(self, layers: Iterable[int], pt_tokens: str, relation_layer: int | None = None) -> None:
        """Refuse a run that needs a layer, or rows (--pt-tokens), or a relation layer's Q/K/V the store lacks.
        A store of every token serves all three kinds of rows; a one-row store only the kind it pooled."""
        require_relation_layer(self.directory, self.layout, relation_layer)
        missing = sorted(set(layers) - set(self.layout.layers))
        if missing:
            raise PkdError(f"--teacher-cache {self.directory}: teacher layer(s) {missing} not stored (it holds {list(self.layout.layers)}); "
                           "rewrite it with --stage cache and --cache-layers including them")
        if self.layout.positions == 1 and pt_tokens != self.layout.pooled:
            held = "[CLS] states only" if self.layout.pooled == "cls" else "mean-pooled states only"
            raise PkdError(f"--teacher-cache {self.directory}: holds {held} but --pt-tokens {pt_tokens} needs "
                           f"{'every token' if pt_tokens != 'cls' else 'the [CLS] state'}; rewrite it with --stage cache "
                           f"--pt-tokens {pt_tokens} (or all, which serves every kind)")

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(array))
        return t.view(torch.bfloat16) if self.layout.dtype == "bfloat16" else t

    def reader(self, layers: Sequence[int], pt_tokens: str, pin: bool = False, relation_layer: int | None = None) -> Callable[[dict], dict]:
        """The collate-time lookup of one run: `teacher_logits` [B, C] and, for a layer map, `teacher_hidden`
        [B, len(layers), S, H] in map order: S = the batch's padded length for --pt-tokens all, else 1 (the
        [CLS] state, or the mean over the batch's real tokens, pooled here from a store of every token); for a
        relation term, `teacher_qkv` [B, 3, S, H] over the batch's padded length."""
        self.require(layers, pt_tokens, relation_layer)
        index = np.array([self.layout.layers.index(l) for l in layers], dtype=np.int64)
        pool = pt_tokens == "mean" and self.layout.positions > 1

        def read(batch: dict) -> dict:
            rows = batch["example_idx"].numpy()
            out = {"teacher_logits": self._tensor(self.arrays["logits"][rows])}
            if len(index):
                width = batch["input_ids"].shape[1] if pt_tokens == "all" or pool else 1
                states = self.states(rows, index, width)
                out["teacher_hidden"] = pooled_states(states, batch["attention_mask"]) if pool else states
            if relation_layer:
                out["teacher_qkv"] = self.states(rows, np.arange(3), batch["input_ids"].shape[1], "qkv")
            return pinned(out) if pin else out

        return read

    def states(self, rows: np.ndarray, index: np.ndarray, width: int, array: str = "hidden") -> torch.Tensor:
        """`hidden`'s rows [B, len(index), width, H] (or `qkv`'s): a batch padded (to a multiple of 8) past the
        stored positions gets zeros there, as the store holds past each row's end."""
        states = self._tensor(self.arrays[array][rows[:, None], index, :width])
        return F.pad(states, (0, 0, 0, width - states.shape[2])) if states.shape[2] < width else states


def pooled_states(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """--pt-tokens mean from a store of every token: [B, L, S, H] → each example's mean over its real tokens
    [B, L, 1, H] (fp32, `data.mean_pool`), pooled in the collate so the step reads one row per example."""
    return torch.stack([mean_pool(states[:, i], attention_mask) for i in range(states.shape[1])], 1)[:, :, None]


def pinned(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A collate's tensors in page-locked memory, so the step's copy to the GPU overlaps compute."""
    return {k: v.pin_memory() for k, v in out.items()}


def open_or_write(cache_class: type[TeacherCache], directory: str, fingerprint: dict, *, verify: str, reading_only: bool,
                  overwrite: bool, require: Callable[[TeacherCache], None], write: Callable[[], TeacherCache]) -> TeacherCache:
    """The store at `directory` for this fingerprint, whatever the objective. Reading only (--stage student):
    open it, any mismatch an error. Else reuse a matching store that passes `require`, or `write()` one where
    there is none, or where the store there is of this fingerprint but damaged or short of what `require`
    asks; a store of another fingerprint is replaced only with `overwrite` (--overwrite-cache)."""
    try:
        cache = cache_class.open(directory, fingerprint, verify=verify)
        if not reading_only:
            require(cache)
        log.info("teacher cache %s: matches this run, reusing it", directory)
        return cache
    except PkdError as why:
        if reading_only:
            raise
        stored = stored_fingerprint(directory)
        if stored is not None and stored != fingerprint and not overwrite:
            raise  # a store of another teacher or data set: its message names --overwrite-cache
        log.info("teacher cache: writing it (%s)", why)
    return write()


# -- writing -----------------------------------------------------------------------------------------

def _on_main(world, fn):
    """fn() on rank 0; its result, or its PkdError raised, on every rank."""
    box = [None]
    if world.is_main:
        try:
            box[0] = (fn(), None)
        except (PkdError, OSError) as err:  # the other ranks wait for the verdict: never leave them hanging
            box[0] = (None, str(err))
    if world.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error:
        raise PkdError(error)
    return result


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_sibling_dir(target: Path) -> Path:
    """An empty directory next to `target` under a fresh name (`<name>.tmp-<hex>`), made with the umask's
    mode: it is renamed into place as the store, and mkdtemp's 0700 would publish a store that the other
    users of a shared filesystem cannot read."""
    while True:
        path = target.with_name(f"{target.name}.tmp-{secrets.token_hex(6)}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


class Writer:
    """Builds a store collectively: every rank constructs one, `write`s the rows of its batches and calls
    `commit`. Rank 0 preallocates the files in a temporary sibling directory (after checking they fit the
    free disk) and, once every rank has flushed, writes the manifest last and renames the directory into
    place (replacing an older store). Leaving the `with` block by an exception removes the temporary
    directory. `write` is the GLUE store's; the masked-LM writer (`pkd_fast.mlm_cache`) brings its own and
    shares allocation, accounting, checks and publishing."""

    CACHE = TeacherCache

    def __init__(self, directory: str | os.PathLike, fingerprint: dict, layout, world):
        self.directory, self.fingerprint, self.layout, self.world = Path(directory), fingerprint, layout, world
        self.tmp = Path(_on_main(world, self._allocate))
        self._require_shared_directory()
        self.arrays = {name: np.load(self.tmp / f"{name}.npy", mmap_mode="r+") for name in layout.arrays}
        self.written = np.zeros(layout.rows, dtype=np.uint8)  # the rows this rank wrote
        self.batches = 0

    def _require_shared_directory(self) -> None:
        """Every rank writes into rank 0's files, so every rank must see them: caching across nodes without
        a shared filesystem is refused here, before any work, naming the ranks and hosts that cannot."""
        try:
            require_shared_directory(self.tmp, self.world, f"--teacher-cache {self.directory}", "put it on a shared filesystem, or "
                                     "write the cache on one node (--stage cache) and copy it to each node")
        except PkdError:
            if self.world.is_main:
                shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def _allocate(self) -> str:
        target = self.directory
        if target.exists() and not (target / MANIFEST).is_file() and (not target.is_dir() or any(target.iterdir())):
            raise PkdError(f"--teacher-cache {target}: exists and is not a teacher cache (no {MANIFEST}); refusing to replace it")
        self.layout.check()
        log.info("teacher cache %s: %d rows, %s", target, self.layout.rows, self.layout.describe())
        leftovers = sorted(str(p) for p in target.parent.glob(f"{target.name}.tmp-*"))
        if leftovers:
            log.warning("teacher cache: %s left by interrupted writes; delete them once no write is running", ", ".join(leftovers))
        target.parent.mkdir(parents=True, exist_ok=True)
        self._require_free_disk(target)
        tmp = _new_sibling_dir(target)
        initial = self.initial_contents()
        try:
            for name, (shape, dtype) in self.layout.arrays.items():
                path = tmp / f"{name}.npy"
                array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)  # header + size
                if name in initial:
                    array[:] = initial[name]
                array.flush()
                del array
                with open(path, "r+b") as f:  # reserve the blocks now: a full disk is an error here, not a SIGBUS later
                    os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise PkdError(f"--teacher-cache {target}: cannot allocate {self.layout.describe()} ({err.strerror or err})") from None
        return str(tmp)

    def _require_free_disk(self, target: Path) -> None:
        """Refuse, before any file is made, a store larger than the free space where it goes (an old store
        there is replaced only after the new one is complete, so it does not count as free)."""
        need, free = store_bytes(self.layout.arrays), shutil.disk_usage(target.parent).free
        if need > free:
            raise PkdError(f"--teacher-cache {target}: the store needs {gib(need)} but {target.parent} has {gib(free)} free; "
                           "free space, point --teacher-cache at a larger disk, or store less (--cache-layers, --cache-topk)")

    def initial_contents(self) -> dict[str, np.ndarray]:
        """Arrays rank 0 writes whole at allocation (an index known before any teacher runs); none here."""
        return {}

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.arrays.clear()
        if exc_type is not None and self.world.is_main:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _numpy(self, t: torch.Tensor) -> np.ndarray:
        t = t.detach().to("cpu", getattr(torch, self.layout.dtype))
        return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy()

    def write(self, example_idx: torch.Tensor, logits: torch.Tensor, hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor,
              qkv: torch.Tensor | None = None) -> None:
        """Store one batch's teacher outputs at rows `example_idx` (a row written twice gets the same values);
        `qkv` [3, B, S, H]: the relation layer's, where the layout stores them."""
        rows = example_idx.cpu().numpy()
        self.refuse_nonfinite(rows, [logits, *(hidden_states[l] for l in self.layout.layers), *([qkv] if qkv is not None else [])])
        if self.layout.relation_layer:
            self.write_qkv(rows, qkv, attention_mask)
        self.arrays["logits"][rows] = self._numpy(logits)
        if self.layout.positions == 1 and self.layout.pooled == "mean":
            states = pooled_states(torch.stack([hidden_states[l] for l in self.layout.layers], 1), attention_mask)
            self.arrays["hidden"][rows] = self._numpy(states)
        else:
            self.write_states(rows, hidden_states, attention_mask)
        self.mark_written(rows)

    def refuse_nonfinite(self, rows: np.ndarray, outputs: Sequence[torch.Tensor]) -> None:
        if not all(torch.isfinite(t).all() for t in outputs):
            raise PkdError(f"teacher cache: the teacher's outputs for training rows {rows.tolist()[:8]} are not finite "
                           "(NaN or inf); a cache must not store them. Check the teacher's weights and --deepspeed precision")

    def write_states(self, rows: np.ndarray, hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor) -> None:
        """The stored layers' states of the batch's first `positions` tokens into `hidden` [rows, L', S, H],
        zero past each row's end: the padding's values depend on the batch, and no loss reads them."""
        width = self.layout.positions
        states = torch.stack([hidden_states[l][:, :width] for l in self.layout.layers], 1)  # [B, L', ≤S, H]
        if width > 1:
            states = states * attention_mask[:, None, :width, None].to(states.dtype)
        self.arrays["hidden"][rows, :, : states.shape[2]] = self._numpy(states)

    def write_qkv(self, rows: np.ndarray, qkv: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """The relation layer's q, k, v [3, B, ≤S, H] into `qkv` [rows, 3, S, H], zero past each row's end."""
        qkv = qkv.transpose(0, 1)[:, :, : self.arrays["qkv"].shape[2]]
        qkv = qkv * attention_mask[:, None, : qkv.shape[2], None].to(qkv.dtype)
        self.arrays["qkv"][rows, :, : qkv.shape[2]] = self._numpy(qkv)

    def mark_written(self, rows: np.ndarray) -> None:
        """Account for the rows one batch wrote (`commit` publishes only when every row is)."""
        self.written[rows] = 1
        self.batches += 1
        fault_point("cache-rows", self.batches)

    def commit(self) -> TeacherCache:
        """Flush every rank's rows, publish the store atomically, and open it on every rank."""
        for array in self.arrays.values():
            array.flush()
        self.arrays.clear()
        written = torch.from_numpy(self.written)
        if self.world.world_size > 1:
            dist.all_reduce(written, op=dist.ReduceOp.MAX)  # also the barrier: every rank has flushed
        self.rows_covered = int(written.sum())
        _on_main(self.world, self._publish)
        return self.CACHE.open(self.directory, self.fingerprint)

    def _publish(self) -> None:
        if self.rows_covered != self.layout.rows:
            raise PkdError(f"teacher cache: {self.layout.rows - self.rows_covered} of {self.layout.rows} rows were written "
                           "by no rank; the store is not published")
        files = {}
        for name in self.layout.arrays:
            path = self.tmp / f"{name}.npy"
            _fsync(path)
            size = path.stat().st_size
            files[path.name] = {"bytes": size, "digest": _digest(path, size), "full_digest": _full_digest(path)}
        manifest = {"format": FORMAT, "fingerprint": self.fingerprint, "layout": asdict(self.layout),
                    "rows_covered": self.rows_covered, "files": files}
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _fsync(self.tmp / MANIFEST)
        _fsync(self.tmp)
        fault_point("cache-manifest", 1)
        old = None
        if self.directory.exists():  # a directory cannot be renamed over a non-empty one: move the old aside
            old = self.directory.with_name(f"{self.tmp.name}.old")
            os.replace(self.directory, old)
        os.replace(self.tmp, self.directory)
        _fsync(self.directory.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        log.info("teacher cache %s: written", self.directory)
