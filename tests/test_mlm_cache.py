"""The masked-LM teacher cache (`pkd_fast.mlm_cache`): the store's round trip on synthetic rows, the disk
check, and through the CLI on a tiny word-level vocabulary (so a store of every column, --cache-topk V,
is small): --stage cache, then a student from the store that trains exactly as from the live teacher,
--resume from the store, and every mismatch between the store and the run refused in one line."""

import json
import re
from collections import namedtuple

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

from pkd_fast import cache as teacher_cache
from pkd_fast.dist import Dist
from pkd_fast.errors import PkdError
from pkd_fast.faults import FAULT_ENV
from pkd_fast.mlm_cache import MlmLayout, MlmWriter
from pkd_fast.train import main
from test_config import assert_one_line_error
from test_mlm_train import TINY, write_sentences
from test_train import GLUE_DIR, ds_json, train_log

ONE_RANK = Dist(0, 1, torch.device("cpu"))
FINGERPRINT = {"teacher_weights": "a" * 64, "objective": "mlm", "topk": 4}


# -- the store on synthetic rows ---------------------------------------------------------------------

def synthetic_store(path, epochs=2, blocks=3, width=6, vocab=20, topk=4, layers=(1, 2)):
    """A store of every real token of `blocks` blocks over `epochs` epochs, written in shuffled batches;
    the teacher outputs it was written from, per unit (epoch·blocks + block)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([6, 3, 5])[:blocks]
    offsets = np.concatenate([[0], np.cumsum(np.tile(lengths.numpy(), epochs))])
    layout = MlmLayout(blocks=blocks, epochs=epochs, tokens=int(lengths.sum()), positions=width, kd_rows=int(offsets[-1]), topk=topk,
                       teacher_layers=2, hidden_size=8, layers=layers, dtype="float32", temperature=2.0)
    units = epochs * blocks
    logits = [torch.randn(int(lengths[u % blocks]), vocab, generator=g) for u in range(units)]
    states = [torch.randn(units, width, 8, generator=g) for _ in range(3)]  # hidden_states 0..2
    mask = (torch.arange(width)[None] < lengths.repeat(epochs)[:, None]).long()
    with MlmWriter(path, FINGERPRINT, layout, ONE_RANK, offsets) as writer:
        for batch in torch.randperm(units, generator=g).split(4):
            writer.write(batch.numpy(), mask[batch].sum(1), torch.cat([logits[u] for u in batch]), [h[batch] for h in states], mask[batch])
        store = writer.commit()
    return store, logits, states, mask


def test_store_round_trip_gives_each_kd_row_its_top_k_and_lse_and_every_token_its_states(tmp_path):
    store, logits, states, mask = synthetic_store(tmp_path / "c")
    units = torch.tensor([4, 0, 5])  # epoch 1 block 1, epoch 0 block 0, epoch 1 block 2
    batch = {"epoch": units // 3, "example_idx": units % 3, "attention_mask": F_pad(mask[units], 8), "input_ids": torch.zeros(3, 8)}
    out = store.reader([2], "all", kd_positions="all")(batch)
    rows = torch.cat([logits[u] for u in units])
    values, ids = rows.topk(4)
    assert torch.equal(out["teacher_topk_ids"], ids.int()) and torch.equal(out["teacher_topk_values"], values)
    torch.testing.assert_close(out["teacher_topk_lse"], torch.logsumexp(rows / 2.0, -1))
    assert store.topk_temperature == 2.0
    assert out["teacher_hidden"].shape == (3, 1, 8, 8)  # [B, layers, the batch's width (past the stored 6), H]
    expected = states[2][units] * mask[units][..., None]
    assert torch.equal(out["teacher_hidden"][:, 0, :6], expected) and not out["teacher_hidden"][:, :, 6:].any()
    mean = store.reader([2], "mean", kd_positions="all")(batch)["teacher_hidden"]  # --pt-tokens mean: pooled in the collate
    torch.testing.assert_close(mean[:, 0, 0], expected.sum(1) / mask[units].sum(1, keepdim=True))
    bad = {**batch, "attention_mask": F_pad(mask[units][:, :-1], 8)}  # a batch whose KD rows differ from the store's
    with pytest.raises(PkdError, match="its masks are not this run's"):
        store.reader([2], "all", kd_positions="all")(bad)


def F_pad(mask, width):
    return torch.nn.functional.pad(mask, (0, width - mask.shape[1]))


def test_a_store_larger_than_the_free_disk_is_refused_before_any_file(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(teacher_cache.shutil, "disk_usage", lambda _: usage(1 << 30, 1 << 30, 1000))
    with pytest.raises(PkdError, match=r"the store needs 0\.000 GiB but .* has 0\.000 GiB free; free space") as err:
        synthetic_store(tmp_path / "c")
    assert "\n" not in str(err.value) and list(tmp_path.iterdir()) == []


# -- through the CLI ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """50 SST-2 sentences, a word-level vocabulary of their words, a random 4-layer masked-LM teacher over it."""
    root = tmp_path_factory.mktemp("mlm_cache")
    text = write_sentences(root / "train.txt", 300, 50)
    words = sorted({w for line in open(text) for w in re.findall(r"\w+|[^\w\s]", line.lower())})
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizerFast(str(root / "vocab.txt"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64)
    BertForMaskedLM(config).save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    common = [*TINY, "--deepspeed", ds_json(root, train_micro_batch_size_per_gpu=4), "--teacher", str(root / "teacher"),
              "--text-files", text, "--max-steps", "4", "--save-steps", "2", "--keep-checkpoints", "3"]
    store = root / "store"
    main([*common, "--stage", "cache", "--teacher-cache", str(store), "--cache-topk", str(len(tokenizer)), "--output-dir", str(root / "cache")])
    return {"root": root, "common": common, "store": store, "vocab": len(tokenizer)}


@pytest.fixture(scope="module")
def cached_and_live(tiny):
    """The same student (alternate layers 1,3, PT on layer 1, KL over masked tokens) from the store and live."""
    runs = {}
    for name, extra in (("cached", ["--teacher-cache", str(tiny["store"]), "--cache-topk", str(tiny["vocab"])]), ("live", [])):
        summary = main([*tiny["common"], "--stage", "student", *extra, "--output-dir", str(tiny["root"] / name)])
        runs[name] = (tiny["root"] / name / "students" / "alternate", summary)
    return runs


def assert_same_training(a, b, rel=1e-5, kd_rel=1e-5, kd_abs=0.0):
    """Equal loss logs and trained weights. `kd_rel`, `kd_abs`: the logged KL of a near-uniform teacher is ~1e-5
    per row at T = 10, where the fp32 rounding of a logsumexp (ulp 5e-7 at 5.7) shifts the top-k form's KL by
    ~1e-5 absolute (1-3% of this run's 6e-4 to 1.3e-3: 1.1% on the native kind, 2.7% at step 3 held to AVX2): the
    logged term only, the gradient (softmax(s/T) - p)/T barely moves, as the weights show. A wrong teacher row
    (another epoch's masks, another block) moves it by its own size."""
    for x, y in zip(train_log(a), train_log(b), strict=True):
        for term in ("total", "ce", "kd", "pt"):
            tolerance = {"rel": kd_rel, "abs": kd_abs} if term == "kd" else {"rel": rel}
            assert y[term] == pytest.approx(x[term], **tolerance), (x["step"], term)
    weights = [load_file(d / "model" / "model.safetensors") for d in (a, b)]
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=rel, atol=1e-6)


def test_stage_cache_writes_a_store_that_a_student_trains_from_exactly_as_from_the_live_teacher(tiny, cached_and_live):
    """k = V: the sparse KL over every column is the dense KL, so the store's student is the live one's;
    the steps reach the second epoch, whose masks (and teacher outputs) differ from the first's."""
    manifest = json.loads((tiny["store"] / "manifest.json").read_text())
    assert manifest["layout"]["epochs"] == 2 and manifest["layout"]["layers"] == [1] and manifest["fingerprint"]["kd_positions"] == "masked"
    cached, live = (cached_and_live[k][0] for k in ("cached", "live"))
    assert json.loads((cached / "results.json").read_text())["teacher_source"] == f"cache (top-{tiny['vocab']})"
    assert [r["step"] for r in train_log(cached)] == [1, 2, 3, 4] and all(r["kd"] > 0 and r["pt"] > 0 for r in train_log(cached))
    assert_same_training(live, cached, kd_rel=0.02, kd_abs=3e-5)


def test_resume_from_a_checkpoint_reads_the_store_where_the_run_stopped(tiny, cached_and_live, tmp_path, monkeypatch):
    """Stopped by SIGTERM at step 2 (it saves a checkpoint there), then --resume: the run ends where the
    uninterrupted one did, reading the second epoch's teacher rows from the store."""
    argv = [*tiny["common"], "--stage", "student", "--teacher-cache", str(tiny["store"]), "--cache-topk", str(tiny["vocab"]),
            "--output-dir", str(tmp_path / "run")]
    monkeypatch.setenv(FAULT_ENV, "step@2:SIGTERM")
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    run = tmp_path / "run" / "students" / "alternate"
    assert stopped.value.code == 0 and (run / "checkpoints" / "latest").read_text() == "step2"
    monkeypatch.delenv(FAULT_ENV)
    main([*argv, "--resume"])
    assert_same_training(cached_and_live["cached"][0], run, rel=1e-6)


MISMATCHES = [
    (["--mlm-probability", "0.2", "--cache-topk", "{vocab}"], "was written for a different run (mlm_probability: cache 0.15 ≠ now 0.2); point --teacher-cache elsewhere"),
    (["--cache-topk", "8"], "was written for a different run (topk: cache {vocab} ≠ now 8)"),
    (["--seed", "7", "--cache-topk", "{vocab}"], "was written for a different run (mask_seed: cache 42 ≠ now 7)"),
    # the stored logsumexp is at T: a student at another T is refused at open, not at its first step
    (["--temperature", "4", "--cache-topk", "{vocab}"], "was written for a different run (temperature: cache 10.0 ≠ now 4.0)"),
    (["--max-steps", "12", "--cache-topk", "{vocab}"], "holds the masks of 2 epoch(s), this run trains 4; rewrite it with --stage cache"),
]


@pytest.mark.parametrize("argv, message", MISMATCHES, ids=["probability", "k", "masking seed", "temperature", "epochs"])
def test_a_student_whose_masking_k_or_epochs_differ_from_the_store_is_refused_in_one_line(capsys, tiny, tmp_path, argv, message):
    argv = [a.format(vocab=tiny["vocab"]) for a in argv]
    assert_one_line_error(capsys, [*tiny["common"], "--stage", "student", "--teacher-cache", str(tiny["store"]), *argv,
                                   "--output-dir", str(tmp_path)], message.format(vocab=tiny["vocab"]))


def test_a_streamed_corpus_cannot_use_a_teacher_cache(capsys, tiny, tmp_path):
    assert_one_line_error(capsys, [*tiny["common"], "--streaming", "--validation-files", tiny["common"][tiny["common"].index("--text-files") + 1],
                                   "--teacher-cache", str(tmp_path / "c"), "--output-dir", str(tmp_path)],
                          "--teacher-cache needs a map-style corpus")


pytestmark = pytest.mark.skipif(not (GLUE_DIR / "SST-2").is_dir(), reason=f"no GLUE data at {GLUE_DIR}")
