"""The teacher cache (pkd_fast.cache): a store reads back exactly what was written, in any row and layer
order; a student trained from it matches one trained with the live teacher; truncated, corrupt,
mismatched or incomplete stores are refused; a crash mid-write leaves the old store; 2 ranks write what
1 rank writes."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from pkd_fast import cache as teacher_cache
from pkd_fast import data, engines, glue_files
from pkd_fast.cache import Layout, TeacherCache, Writer
from pkd_fast.config import default_teacher
from pkd_fast.dist import Dist, _free_port
from pkd_fast.errors import PkdError
from pkd_fast.faults import FAULT_ENV
from pkd_fast.models import load_classifier, pt_rows
from pkd_fast.tasks import get_task
from pkd_fast.train import main

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "pkd_fast" / "train.py"
GLUE_DIR = Path(os.environ.get("GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))
needs_glue = pytest.mark.skipif(not (GLUE_DIR / "SST-2").is_dir(), reason=f"no GLUE data at {GLUE_DIR}")
ONE_RANK = Dist(0, 1, torch.device("cpu"))
SMALL = ["--glue-dir", str(GLUE_DIR), "--max-train-samples", "64", "--max-seq-length", "32", "--max-eval-samples", "32",
         "--epochs", "1", "--log-steps", "1"]


# -- the store on synthetic rows ---------------------------------------------------------------------

def synthetic(rows=10, layers=(0, 2, 4), positions=1, dtype="float32", seed=0):
    """A layout and teacher-like outputs: logits [N, 3] and hidden_states[0..4] of [N, S, 8]."""
    g = torch.Generator().manual_seed(seed)
    width = max(positions, 4)
    logits = torch.randn(rows, 3, generator=g).to(getattr(torch, dtype))
    states = [torch.randn(rows, width, 8, generator=g).to(getattr(torch, dtype)) for _ in range(5)]
    layout = Layout(rows=rows, num_labels=3, teacher_layers=4, hidden_size=8, layers=layers, positions=positions, dtype=dtype)
    return layout, logits, states


FINGERPRINT = {"teacher_weights": "a" * 64, "task": "sst2", "split": "train", "max_seq_length": 32, "dtype": "float32"}


def write_store(path, layout, logits, states, mask=None, fingerprint=FINGERPRINT, batch=4):
    """Write the rows in a shuffled order, in batches, as the data-parallel writer does."""
    mask = torch.ones(logits.shape[0], states[0].shape[1], dtype=torch.long) if mask is None else mask
    order = torch.randperm(logits.shape[0], generator=torch.Generator().manual_seed(1))
    with Writer(path, fingerprint, layout, ONE_RANK) as writer:
        for rows in order.split(batch):
            writer.write(rows, logits[rows], [h[rows] for h in states], mask[rows])
        return writer.commit()


def batch_of(rows, width):
    return {"example_idx": torch.tensor(rows), "input_ids": torch.zeros(len(rows), width, dtype=torch.long)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rows_read_back_bit_exact_in_any_row_and_layer_order(tmp_path, dtype):
    layout, logits, states = synthetic(dtype=dtype)
    store = write_store(tmp_path / "c", layout, logits, states)
    rows = [7, 0, 3, 3]
    out = store.reader([4, 2], "cls")(batch_of(rows, 8))
    assert out["teacher_logits"].dtype == getattr(torch, dtype)
    assert torch.equal(out["teacher_logits"], logits[rows])
    expected = torch.stack([states[4][rows, :1], states[2][rows, :1]], 1)  # [B, 2 layers, 1 position, H]
    assert torch.equal(out["teacher_hidden"], expected)
    assert "teacher_hidden" not in store.reader([], "cls")(batch_of(rows, 8))  # KD: logits only


def test_token_store_zeroes_padding_and_pads_to_the_batch_width(tmp_path):
    layout, logits, states = synthetic(positions=12, layers=(1, 3))
    lengths = torch.tensor([12, 5, 9, 1, 12, 3, 7, 2, 11, 4])
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    store = write_store(tmp_path / "c", layout, logits, states, mask=mask)
    rows = [1, 8, 4]
    hidden = store.reader([3], "all")(batch_of(rows, 16))["teacher_hidden"]  # width 16 > max_seq_length 12
    assert hidden.shape == (3, 1, 16, 8)
    for i, row in enumerate(rows):
        n = int(lengths[row])
        assert torch.equal(hidden[i, 0, :n], states[3][row, :n])
        assert not hidden[i, 0, n:].any()
    assert store.reader([1], "cls")(batch_of(rows, 16))["teacher_hidden"].shape == (3, 1, 1, 8)  # [CLS] of a token store


def test_mean_rows_are_the_real_tokens_mean_whether_pooled_at_write_or_from_a_token_store(tmp_path):
    """--pt-tokens mean: a one-row store pooled when written, and a store of every token pooled when read,
    give each example's mean over its real tokens (padding excluded), the same as models.pt_rows pools the
    live teacher's states."""
    layout, logits, states = synthetic(positions=12, layers=(1, 3))
    lengths = torch.tensor([12, 5, 9, 1, 12, 3, 7, 2, 11, 4])
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    tokens = write_store(tmp_path / "tokens", layout, logits, states, mask=mask)
    pooled_layout = Layout(**{**vars(layout), "positions": 1, "pooled": "mean"})
    pooled = write_store(tmp_path / "pooled", pooled_layout, logits, states, mask=mask)
    rows = [1, 8, 4, 3]
    batch = {**batch_of(rows, 16), "attention_mask": torch.nn.functional.pad(mask[rows], (0, 4))}  # padded past 12
    expected = torch.stack([torch.stack([states[l][r, : int(lengths[r])].mean(0) for r in rows]) for l in (3, 1)], 1)[:, :, None]
    for store in (tokens, pooled):
        hidden = store.reader([3, 1], "mean")(batch)["teacher_hidden"]
        assert hidden.shape == (4, 2, 1, 8)
        torch.testing.assert_close(hidden, expected, rtol=1e-6, atol=1e-6)
    live = pt_rows([None, *(states[l][rows] for l in (1, 2, 3))], (3, 1), pool_mask=mask[rows])
    torch.testing.assert_close(torch.stack(live, 1)[:, :, None], expected, rtol=1e-6, atol=1e-6)
    # A one-row store serves only the rows it holds.
    with pytest.raises(PkdError, match=r"mean-pooled states only but --pt-tokens cls"):
        pooled.require([1], "cls")
    with pytest.raises(PkdError, match=r"mean-pooled states only but --pt-tokens all"):
        pooled.reader([1], "all")


@pytest.fixture
def store_dir(tmp_path):
    layout, logits, states = synthetic()
    write_store(tmp_path / "c", layout, logits, states)
    return tmp_path / "c"


def truncate(path: Path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)


def flip_a_byte(path: Path):
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size - 5)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("damage, message", [
    (lambda d: truncate(d / "hidden.npy"), r"hidden\.npy: \d+ bytes, the manifest says \d+ \(truncated"),
    (lambda d: (d / "logits.npy").unlink(), r"logits\.npy: missing"),
    (lambda d: flip_a_byte(d / "hidden.npy"), r"hidden\.npy: contents do not match the manifest's digest"),
    (lambda d: (d / "manifest.json").unlink(), r"no manifest\.json"),
    (lambda d: (d / "manifest.json").write_text("{"), r"unreadable manifest"),
])
def test_a_damaged_store_is_refused_with_what_is_wrong(store_dir, damage, message):
    damage(store_dir)
    with pytest.raises(PkdError, match=message):
        TeacherCache.open(store_dir, FINGERPRINT)


def test_a_fingerprint_mismatch_names_every_field_that_differs(store_dir):
    wanted = {**FINGERPRINT, "max_seq_length": 64, "teacher_weights": "b" * 64}
    with pytest.raises(PkdError, match="different run") as err:
        TeacherCache.open(store_dir, wanted)
    assert "max_seq_length: cache 32 ≠ now 64" in str(err.value)
    assert "teacher_weights: cache aaaaaaaaaaaa… ≠ now bbbbbbbbbbbb…" in str(err.value)
    assert "task" not in str(err.value)


def test_a_layer_or_token_states_the_store_lacks_are_refused(store_dir):
    store = TeacherCache.open(store_dir, FINGERPRINT)  # layers 0, 2, 4; [CLS] only
    with pytest.raises(PkdError, match=r"teacher layer\(s\) \[1, 3\] not stored \(it holds \[0, 2, 4\]\)"):
        store.reader([1, 2, 3], "cls")
    with pytest.raises(PkdError, match=r"\[CLS\] states only but --pt-tokens all"):
        store.require([2], "all")
    with pytest.raises(PkdError, match=r"\[CLS\] states only but --pt-tokens mean"):
        store.reader([2], "mean")


def test_a_crash_mid_write_leaves_the_old_store_and_no_temporary(store_dir):
    layout, logits, states = synthetic(seed=5)
    with pytest.raises(RuntimeError, match="crash"), Writer(store_dir, {**FINGERPRINT, "dtype": "new"}, layout, ONE_RANK) as writer:
        writer.write(torch.arange(4), logits[:4], [h[:4] for h in states], torch.ones(4, 4))
        raise RuntimeError("crash")
    TeacherCache.open(store_dir, FINGERPRINT)  # still the old, complete store
    assert sorted(p.name for p in store_dir.parent.iterdir()) == ["c"]


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)], ids=["umask022", "umask027"])
def test_a_published_store_has_the_modes_the_umask_gives(tmp_path, umask, dir_mode, file_mode):
    """Not mkdtemp's 0700: other users of a shared filesystem read a published store as the umask allows."""
    layout, logits, states = synthetic()
    previous = os.umask(umask)
    try:
        write_store(tmp_path / "c", layout, logits, states)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "c").stat().st_mode) == dir_mode
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "c").iterdir()} == dict.fromkeys(
        ("manifest.json", "logits.npy", "hidden.npy"), file_mode)


def test_a_directory_that_is_not_a_store_is_not_replaced(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    layout, _, _ = synthetic()
    with pytest.raises(PkdError, match="is not a teacher cache"):
        Writer(tmp_path / "c", FINGERPRINT, layout, ONE_RANK)
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"


# -- end to end on real SST-2 rows -------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 'fine-tuned' teacher (the offline MiniLM with a confident random head), an fp32 DeepSpeed JSON
    (so cached and live outputs agree to rounding), and a 1-rank cache of 64 SST-2 rows."""
    root = tmp_path_factory.mktemp("cache_e2e")
    torch.manual_seed(0)
    model = load_classifier(default_teacher(), get_task("sst2"))
    torch.nn.init.normal_(model.classifier.weight, std=1.0)  # logits of a few units: KD terms far from 0
    model.save_pretrained(root / "teacher")
    AutoTokenizer.from_pretrained(default_teacher()).save_pretrained(root / "teacher")
    config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    config.update({"bf16": {"enabled": False}, "tensorboard": {"enabled": False}, "train_micro_batch_size_per_gpu": 8})
    (root / "fp32.json").write_text(json.dumps(config))
    common = ["--deepspeed", str(root / "fp32.json"), "--teacher", str(root / "teacher"), *SMALL]
    main(["--stage", "cache", "--teacher-cache", str(root / "cache"), "--output-dir", str(root / "out_cache"), *common])
    return root, common


def losses(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


@needs_glue
def test_a_student_from_the_cache_matches_one_taught_live(setup, monkeypatch):
    """Same seed, data order, dropout masks and student init; the teacher is in eval mode either way.
    The cache ran the teacher in batches of 16, training runs it in batches of 8 with other padding
    widths, so the teacher's outputs (and the losses) agree to fp32 rounding, not bit for bit. T=1: at
    T=10 the T²-scaled KD term is a difference of O(1) parts and fp32 cancellation alone moves it ~1e-5."""
    root, common = setup
    args = ["--stage", "student", "--strategy", "skip", "--temperature", "1", *common]
    main([*args, "--output-dir", str(root / "live")])

    def no_teacher(*_):
        raise AssertionError("a run from the cache put a teacher on the device")

    monkeypatch.setattr(engines, "frozen_teacher", no_teacher)  # what every live teacher and teacher row goes through
    cached = main([*args, "--teacher-cache", str(root / "cache"), "--output-dir", str(root / "cached")])
    assert "teacher" not in cached["runs"]  # no teacher loaded, so no teacher row either
    live_log, cached_log = losses(root / "live" / "students" / "skip"), losses(root / "cached" / "students" / "skip")
    assert [r["step"] for r in cached_log] == [r["step"] for r in live_log] == list(range(1, 9))
    for a, b in zip(live_log, cached_log):
        assert a["kd"] > 1e-3 and a["pt"] > 1e-5  # terms that would show a wrong row or layer
        for term in ("total", "ce", "kd", "pt"):
            assert b[term] == pytest.approx(a[term], rel=1e-5, abs=1e-9), (a["step"], term)
    live_dev = json.loads((root / "live" / "students" / "skip" / "results.json").read_text())["dev"]
    assert cached["runs"]["skip"]["dev"] == pytest.approx(live_dev)


@needs_glue
def test_cached_rows_match_a_live_forward_for_any_layer_map(setup):
    """Rows by example index, any order, any layers (here a custom map for a 3-layer student)."""
    root, _ = setup
    task = get_task("sst2")
    tokenizer = AutoTokenizer.from_pretrained(root / "teacher")
    train_set = data.tokenize(data.subsample(glue_files.load_glue(task, GLUE_DIR)["train"], 64, 42), tokenizer, 32)
    fingerprint = teacher_cache.fingerprint(str(root / "teacher"), tokenizer, "sst2", 32, train_set, torch.float32)
    store = TeacherCache.open(root / "cache", fingerprint)
    rows = [41, 3, 17, 63]
    batch = data.make_loader(train_set.select(rows), tokenizer, len(rows), train=False, seed=0).collate_fn(
        [train_set[i] for i in rows]
    )
    cached = store.reader([1, 6, 3], "cls")(batch)
    teacher = load_classifier(str(root / "teacher"), task).eval()
    with torch.no_grad():
        out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      token_type_ids=batch["token_type_ids"], output_hidden_states=True)
    torch.testing.assert_close(cached["teacher_logits"], out.logits, rtol=1e-5, atol=1e-5)
    live = torch.stack([out.hidden_states[layer][:, :1] for layer in (1, 6, 3)], 1)
    torch.testing.assert_close(cached["teacher_hidden"], live, rtol=1e-5, atol=1e-5)


@needs_glue
def test_cli_reuses_a_matching_cache_and_refuses_a_mismatched_one(setup, capsys):
    root, common = setup
    manifest = root / "cache" / "manifest.json"
    before = manifest.stat().st_mtime_ns
    main(["--stage", "cache", "--teacher-cache", str(root / "cache"), "--output-dir", str(root / "again"), *common])
    assert manifest.stat().st_mtime_ns == before  # reused, not rewritten

    with pytest.raises(SystemExit) as exit_info:
        main(["--stage", "student", "--strategy", "skip", "--teacher-cache", str(root / "cache"),
              "--output-dir", str(root / "mismatch"), *common, "--max-seq-length", "48"])
    assert exit_info.value.code == 2
    [err] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]  # one line
    assert err.startswith("error: --teacher-cache") and "different run" in err
    assert "max_seq_length: cache 32 ≠ now 48" in err and "dataset: cache" in err


@needs_glue
@pytest.mark.slow
def test_two_ranks_write_the_store_one_rank_writes(setup):
    """Each rank runs the teacher on its rows (rank::2) into the same files. The arrays agree with the
    1-rank store to fp32 rounding, not bit for bit: a row's batch-mates differ, so its padded width and
    the matmul shapes differ, which moves the last bits. Fingerprint and layout are identical."""
    root, common = setup
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), str(TRAIN), "--stage", "cache",
           "--teacher-cache", str(root / "cache2"), "--output-dir", str(root / "out_cache2"), *common]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = (json.loads((root / name / "manifest.json").read_text()) for name in ("cache", "cache2"))
    assert one["fingerprint"] == two["fingerprint"] and one["layout"] == two["layout"]
    for name in ("logits", "hidden"):
        a, b = np.load(root / "cache" / f"{name}.npy"), np.load(root / "cache2" / f"{name}.npy")
        assert a.shape == b.shape and a.any(axis=tuple(range(1, a.ndim))).all()  # every row written
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


# -- every row accounted for, full checksums, no silent overwrite, crashes mid-write ----------------------

def test_a_store_with_rows_no_rank_wrote_is_not_published(tmp_path):
    layout, logits, states = synthetic()
    with pytest.raises(PkdError, match=r"3 of 10 rows were written by no rank"), Writer(tmp_path / "c", FINGERPRINT, layout, ONE_RANK) as w:
        w.write(torch.arange(7), logits[:7], [h[:7] for h in states], torch.ones(7, 4))
        w.commit()
    assert not (tmp_path / "c").exists()


def test_a_manifest_that_covers_too_few_rows_is_refused(store_dir):
    manifest = json.loads((store_dir / "manifest.json").read_text())
    manifest["rows_covered"] = 9
    (store_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PkdError, match=r"only 9 of 10 rows were written"):
        TeacherCache.open(store_dir, FINGERPRINT)


def test_non_finite_teacher_outputs_are_never_stored(tmp_path):
    layout, logits, states = synthetic()
    logits[3, 1] = float("nan")
    with pytest.raises(PkdError, match=r"outputs for training rows \[.*3.*\] are not finite"):
        write_store(tmp_path / "c", layout, logits, states)
    assert not (tmp_path / "c").exists()


def test_a_flipped_byte_between_sampled_blocks_is_caught_by_the_full_checksum(tmp_path):
    """The sampled digest reads 256 blocks of 64 KiB: in a file over 16 MiB, a byte between two blocks
    escapes it (its documented limit); --verify-cache full reads every byte and catches it."""
    rows, g = 4800, torch.Generator().manual_seed(3)
    layout = Layout(rows=rows, num_labels=3, teacher_layers=4, hidden_size=1000, layers=(1,), positions=1, dtype="float32")
    logits, states = torch.randn(rows, 3, generator=g), [torch.randn(rows, 1, 1000, generator=g) for _ in range(5)]
    write_store(tmp_path / "c", layout, logits, states, mask=torch.ones(rows, 1, dtype=torch.long), batch=1200)
    path = tmp_path / "c" / "hidden.npy"
    size = path.stat().st_size
    assert size > 16 * 2**20
    starts = np.linspace(0, size - 2**16, 256, dtype=np.int64)
    middle = len(starts) // 2
    gap = (int(starts[middle]) + 2**16 + int(starts[middle + 1])) // 2  # between two sampled blocks
    assert starts[middle] + 2**16 < gap < starts[middle + 1]
    with open(path, "r+b") as f:
        f.seek(gap)
        byte = f.read(1)
        f.seek(gap)
        f.write(bytes([byte[0] ^ 0x01]))
    TeacherCache.open(tmp_path / "c", FINGERPRINT)  # the sampled check cannot see it
    with pytest.raises(PkdError, match=r"hidden\.npy: contents do not match the manifest's full checksum"):
        TeacherCache.open(tmp_path / "c", FINGERPRINT, verify="full")


def test_ranks_that_cannot_see_the_store_directory_are_refused(tmp_path, monkeypatch):
    """Several nodes, each with its own disk: rank 1 cannot see the files rank 0 made. Refused before any
    work, naming the rank and its host; rank 0's temporary directory is removed."""
    monkeypatch.setattr(teacher_cache.dist, "barrier", lambda: None)
    monkeypatch.setattr(teacher_cache.dist, "broadcast_object_list", lambda box, src: None)

    def gather(out, mine):
        out[:] = [mine, (False, "node-b")]

    monkeypatch.setattr(teacher_cache.dist, "all_gather_object", gather)
    layout, _, _ = synthetic()
    with pytest.raises(PkdError, match=r"not on a filesystem shared by all ranks \(rank 1 on node-b cannot see"):
        Writer(tmp_path / "c", FINGERPRINT, layout, Dist(0, 2, torch.device("cpu")))
    assert list(tmp_path.iterdir()) == []


@needs_glue
def test_a_cache_of_another_run_is_not_overwritten_without_asking(setup, capsys):
    root, common = setup
    manifest = root / "cache" / "manifest.json"
    before = manifest.read_text()
    with pytest.raises(SystemExit):
        main(["--stage", "cache", "--teacher-cache", str(root / "cache"), "--output-dir", str(root / "other"), *common,
              "--max-seq-length", "48"])
    [err] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "max_seq_length: cache 32 ≠ now 48" in err and "--overwrite-cache" in err
    assert manifest.read_text() == before
    copy = root / "cache_copy"
    main(["--stage", "cache", "--teacher-cache", str(copy), "--output-dir", str(root / "other"), *common])
    main(["--stage", "cache", "--teacher-cache", str(copy), "--output-dir", str(root / "other"), *common,
          "--max-seq-length", "48", "--overwrite-cache", "--verify-cache", "full"])
    assert json.loads((copy / "manifest.json").read_text())["fingerprint"]["max_seq_length"] == 48


@needs_glue
@pytest.mark.slow
@pytest.mark.parametrize("phase", ["cache-rows@2", "cache-manifest@1"])
def test_a_kill_while_writing_the_cache_publishes_nothing(setup, tmp_path, caplog, phase):
    """SIGKILL after two batches of rows, or after the manifest but before the rename: nothing opens at
    --teacher-cache, and the next run (in this process) writes a complete store (warning about the leftover)."""
    root, common = setup
    target = tmp_path / "cache"
    argv = ["--stage", "cache", "--teacher-cache", str(target), "--output-dir", str(tmp_path / "o"), *common]
    proc = subprocess.run([sys.executable, str(TRAIN), *argv], capture_output=True, text=True, timeout=600, env={**os.environ, FAULT_ENV: phase})
    assert proc.returncode == -9 and not target.exists()
    assert [p.name.split(".tmp-")[0] for p in tmp_path.glob("cache.tmp-*")] == ["cache"]
    with caplog.at_level("WARNING", logger="pkd_fast"):
        main(argv)
    assert any("left by interrupted writes" in r.getMessage() for r in caplog.records)
    one, two = (json.loads((d / "manifest.json").read_text()) for d in (root / "cache", target))
    assert one["fingerprint"] == two["fingerprint"] and two["rows_covered"] == 64


@needs_glue
@pytest.mark.slow
def test_sigterm_while_writing_the_cache_publishes_nothing_and_ends_in_one_line(setup, tmp_path):
    """SIGTERM after two of four batches: every rank stops at the next batch, the unpublished store is
    removed, and the run ends with one line and exit 0 (no traceback)."""
    root, common = setup
    target = tmp_path / "cache"
    cmd = [sys.executable, str(TRAIN), "--stage", "cache", "--teacher-cache", str(target), "--output-dir", str(tmp_path / "o"), *common]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, FAULT_ENV: "cache-rows@2:SIGTERM"})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith("stopped")] == [(f"stopped by SIGTERM while writing the teacher cache (2 of 4 batches): nothing of it "
                                            f"was published; run the same command again to write {target}")]
    assert not target.exists() and not list(tmp_path.glob("cache.tmp-*"))
