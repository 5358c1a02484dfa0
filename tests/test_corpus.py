"""Raw-text corpus: reading (txt, jsonl, gz) with file:line errors, BERT-style packing, the on-disk
token cache, 80/10/10 masking as a pure function of (seed, epoch, example), and the streaming pipeline
against the map-style one, including an exact resume."""

import csv
import errno
import gzip
import json
import os
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoTokenizer, BertConfig

from pkd_fast import corpus, models
from pkd_fast.config import default_teacher
from pkd_fast.errors import PkdError

GLUE_DIR = Path(os.environ.get("GLUE_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(default_teacher())


def sentences(n: int) -> list[str]:
    """n real sentences: SST-2's training text when GLUE is present, else generated ones of varied length."""
    path = GLUE_DIR / "SST-2" / "train.tsv"
    if path.is_file():
        with open(path, encoding="utf-8", newline="") as f:
            rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            next(rows)
            return [row[0] for _, row in zip(range(n), rows)]
    g = torch.Generator().manual_seed(0)
    words = "the cat sat on a mat while distillation of patient students reads every layer".split()
    return [" ".join(words[j] for j in torch.randint(len(words), (int(torch.randint(1, 40, (1,), generator=g)),), generator=g))
            for _ in range(n)]


def write_text(path: Path, docs: list[str]) -> Path:
    data = "".join(d + "\n" for d in docs).encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    data = "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def content(blocks, tok) -> list[int]:
    """The document tokens of a block sequence: every id that is not [CLS]/[SEP]."""
    return [i for b in blocks for i in b if i not in (tok.cls_token_id, tok.sep_token_id)]


# -- packing -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_len", [3, 4, 5, 8, 32])
def test_packing_keeps_every_token_once_with_cls_sep_at_the_edges(max_len):
    cls, sep = 1, 2
    g = torch.Generator().manual_seed(max_len)
    docs = [list(range(100 + 1000 * d, 100 + 1000 * d + int(n))) for d, n in enumerate(torch.randint(0, 3 * max_len, (200,), generator=g))]
    packer = corpus.Packer(max_len, cls, sep)
    blocks = [b for d in docs for b in packer.add(d)] + packer.finish()

    for b in blocks:
        assert b[0] == cls and b[-1] == sep and cls not in b[1:] and 3 <= len(b) <= max_len
        assert b[1] != sep and b[-2] != sep  # a document separator never sits on a block's edge
    assert all(len(b) >= max_len - 1 for b in blocks[:-1])  # only the last block may be much shorter
    assert content(blocks, type("T", (), {"cls_token_id": cls, "sep_token_id": sep})) == [i for d in docs for i in d]
    # inside a block, a separator stands exactly where one document ends and the next begins
    for b in blocks:
        inner = b[1:-1]
        for x, y, z in zip(inner, inner[1:], inner[2:]):
            if y == sep:
                assert x // 1000 != z // 1000
        for x, y in zip(inner, inner[1:]):
            if sep not in (x, y):
                assert x // 1000 == y // 1000

def test_packing_of_real_text_matches_the_tokenizer(tok, tmp_path):
    docs = sentences(400)
    write_text(tmp_path / "a.txt", docs)
    blocks = corpus.prepare_blocks(tok, 64, tmp_path / "cache", text_files=[str(tmp_path / "a.txt")])
    ids = blocks["input_ids"]
    assert blocks["example_idx"] == list(range(len(ids)))
    assert all(len(b) in (63, 64) for b in ids[:-1]) and len(ids[-1]) <= 64
    assert content(ids, tok) == [i for d in corpus.encode(tok, docs) for i in d]
    assert sum(len(b) >= 63 for b in ids) >= len(ids) - 1


# -- inputs and their errors -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["b.txt.gz", "b.jsonl", "b.jsonl.gz", "b.text"])
def test_gz_and_jsonl_inputs_read_the_same_documents(tok, tmp_path, name):
    docs = sentences(50)
    write_text(tmp_path / "a.txt", docs[:25] + [" ", ""] + docs[25:])  # blank lines are skipped
    other = tmp_path / name
    (write_jsonl if ".jsonl" in name else write_text)(other, docs)
    assert [d["text"] for d in corpus.read_documents([other])] == docs == [d["text"] for d in corpus.read_documents([tmp_path / "a.txt"])]
    a = corpus.tokenize_corpus(tok, tmp_path / "cache", text_files=[str(tmp_path / "a.txt")])
    b = corpus.tokenize_corpus(tok, tmp_path / "cache", text_files=[str(other)])
    assert a["input_ids"] == b["input_ids"]


def test_jsonl_text_column(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ["one", "two"], field="body")
    assert [d["text"] for d in corpus.read_documents([path], text_column="body")] == ["one", "two"]


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(PkdError) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_bad_inputs_fail_with_one_line_naming_file_and_line(tok, tmp_path):
    cache = tmp_path / "cache"
    assert "matches no file" in one_line_error(corpus.prepare_blocks, tok, 32, cache, text_files=[str(tmp_path / "none*.txt")])
    assert "unknown format" in one_line_error(corpus.resolve_text_files, [str(write_text(tmp_path / "a.csv", ["x"]))])

    blank = write_text(tmp_path / "blank.txt", ["", "  ", "\t"])
    assert "no text" in one_line_error(corpus.prepare_blocks, tok, 32, cache, text_files=[str(blank)])

    bad_utf8 = tmp_path / "latin1.txt"
    bad_utf8.write_bytes("fine\nalso fine\ncaf\xe9\n".encode("latin-1"))
    assert f"{bad_utf8}:3: not UTF-8 (byte 0xe9" in one_line_error(corpus.prepare_blocks, tok, 32, cache, text_files=[str(bad_utf8)])

    not_json = tmp_path / "broken.jsonl"
    not_json.write_text('{"text": "ok"}\n\n{"text": "unterminated\n')
    assert f"{not_json}:3: not JSON" in one_line_error(corpus.prepare_blocks, tok, 32, cache, text_files=[str(not_json)])

    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"text": "ok"}\n{"body": "where is text"}\n')
    message = one_line_error(corpus.prepare_blocks, tok, 32, cache, text_files=[str(no_field)])
    assert f"{no_field}:2: no 'text' field" in message and "body" in message
    gz = tmp_path / "bad.txt.gz"
    gz.write_bytes(b"not gzip at all")
    assert f"{gz}: not a readable gzip file" in one_line_error(corpus.prepare_blocks, tok, 32, cache, text_files=[str(gz)])
    # the streaming path reads through the same validation
    assert f"{not_json}:3: not JSON" in one_line_error(list, corpus.stream_documents(text_files=[str(not_json)]))


def test_a_gz_file_whose_deflate_data_is_corrupt_names_the_file(tok, tmp_path):
    """A valid gzip header over damaged compressed data raises zlib.error mid-read, not BadGzipFile."""
    gz = tmp_path / "damaged.txt.gz"
    data = bytearray(gzip.compress(b"".join(b"line %d of some text\n" % i for i in range(2000))))
    data[40:60] = bytes(b ^ 0xFF for b in data[40:60])
    gz.write_bytes(bytes(data))
    message = one_line_error(corpus.prepare_blocks, tok, 32, tmp_path / "cache", text_files=[str(gz)])
    assert message.startswith(f"{gz}: not a readable gzip file (Error -3 while decompressing data")


@pytest.mark.parametrize("name", ["nul.txt", "nul.jsonl"])
def test_nul_characters_are_counted_in_one_warning_per_file(tmp_path, caplog, name):
    """The tokenizer drops NUL characters; the reader keeps the documents but says how many there were."""
    docs = ["clean text", "a\0b\0c", "\0tail"]
    path = write_text(tmp_path / name, docs) if name.endswith(".txt") else write_jsonl(tmp_path / name, docs)
    with caplog.at_level("WARNING", logger="pkd_fast"):
        assert [d["text"] for d in corpus.read_documents([path])] == docs
    warnings = [r.getMessage() for r in caplog.records if "NUL" in r.getMessage()]
    assert warnings == [f"{path}: 3 NUL character(s) in 2 document(s), dropped by the tokenizer; text holds none "
                        "(is the file UTF-16 or binary?)"]


def test_max_seq_length_must_fit_the_position_embeddings():
    config = BertConfig(max_position_embeddings=512, name_or_path="/m")
    models.check_max_seq_length(512, "--teacher", config)
    assert "(520) exceed the 512 position embeddings of --teacher /m" in one_line_error(models.check_max_seq_length, 513, "--teacher", config)
    config.max_position_embeddings = 514
    assert "(520)" in one_line_error(models.check_max_seq_length, 514, "--teacher", config)  # padded to a multiple of 8


def test_teacher_and_student_tokenizers_must_match(tok):
    models.check_same_tokenizer(tok, AutoTokenizer.from_pretrained(default_teacher()))
    other = AutoTokenizer.from_pretrained(default_teacher())
    other.add_tokens(["distillationword"])
    assert "differ" in one_line_error(models.check_same_tokenizer, tok, other)


# -- the on-disk cache -------------------------------------------------------------------------------

def test_second_run_reuses_the_tokenised_cache(tok, tmp_path, monkeypatch):
    path = write_text(tmp_path / "a.txt", sentences(100))
    calls = []
    real = corpus.encode
    monkeypatch.setattr(corpus, "encode", lambda t, texts: calls.append(len(texts)) or real(t, texts))
    first = corpus.prepare_blocks(tok, 32, tmp_path / "cache", text_files=[str(path)])
    assert sum(calls) == 100
    calls.clear()
    again = corpus.prepare_blocks(tok, 32, tmp_path / "cache", text_files=[str(path)])
    other_length = corpus.prepare_blocks(tok, 48, tmp_path / "cache", text_files=[str(path)])  # packs the cached tokens
    assert calls == [] and again["input_ids"] == first["input_ids"]
    assert content(other_length["input_ids"], tok) == content(first["input_ids"], tok)
    assert not list((tmp_path / "cache").glob("*.tmp-*"))  # scratch files removed

    write_text(path, sentences(101))  # a changed file is tokenised again
    corpus.prepare_blocks(tok, 32, tmp_path / "cache", text_files=[str(path)])
    assert sum(calls) == 101


@pytest.mark.parametrize("owner, method", [(datasets.arrow_writer.ArrowWriter, "finalize"), (datasets.Dataset, "save_to_disk")],
                         ids=["generating", "saving"])
def test_a_full_disk_while_writing_the_corpus_cache_is_one_line(tok, tmp_path, monkeypatch, owner, method):
    """ENOSPC inside `datasets`' generation (wrapped in its DatasetGenerationError) or while saving: one line
    naming the cache directory and the space left there, and nothing half-written that a rerun would load."""
    path = write_text(tmp_path / "a.txt", sentences(20))

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(owner, method, disk_full)
    message = one_line_error(corpus.prepare_blocks, tok, 32, tmp_path / "cache", text_files=[str(path)])
    assert message.startswith(f"{tmp_path / 'cache'}: cannot write (No space left on device); ") and " MiB free" in message
    assert list((tmp_path / "cache").iterdir()) == []


# -- masking -----------------------------------------------------------------------------------------

def random_batch(tok, rows: int, length: int, seed: int = 0) -> dict:
    """Blocks of random non-special ids with [CLS]/[SEP], varied lengths, padded to `length`."""
    g = torch.Generator().manual_seed(seed)
    masker = corpus.MlmMasker(tok)
    pool = masker.replacement_ids
    lengths = torch.randint(length // 2, length + 1, (rows,), generator=g)
    input_ids = torch.full((rows, length), tok.pad_token_id)
    attention_mask = torch.zeros(rows, length, dtype=torch.long)
    for r, n in enumerate(lengths.tolist()):
        input_ids[r, :n] = pool[torch.randint(len(pool), (n,), generator=g)]
        input_ids[r, 0], input_ids[r, n - 1] = tok.cls_token_id, tok.sep_token_id
        attention_mask[r, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "example_idx": torch.arange(rows)}


@pytest.mark.parametrize("p", [0.15, 0.4])
def test_masking_follows_bert_80_10_10_and_never_selects_special_tokens(tok, p):
    batch = random_batch(tok, 300, 128)
    out = corpus.MlmMasker(tok, mlm_probability=p, seed=3)(batch)
    original, masked, labels = batch["input_ids"], out["input_ids"], out["mlm_labels"]
    special = torch.isin(original, torch.tensor(tok.all_special_ids))
    selected = labels != -100
    assert not (selected & special).any()
    assert torch.equal(masked[special], original[special])  # [CLS], [SEP], [PAD] untouched
    assert torch.equal(labels[selected], original[selected])
    assert torch.equal(masked[~selected], original[~selected])
    eligible = (~special).sum().item()
    assert abs(selected.sum().item() / eligible - p) < 0.01
    n = selected.sum().item()
    to_mask = (masked[selected] == tok.mask_token_id).sum().item() / n
    to_random = ((masked[selected] != original[selected]) & (masked[selected] != tok.mask_token_id)).sum().item() / n
    kept = (masked[selected] == original[selected]).sum().item() / n
    assert abs(to_mask - 0.8) < 0.03 and abs(to_random - 0.1) < 0.025 and abs(kept - 0.1) < 0.025
    replaced = masked[selected & (masked != original) & (masked != tok.mask_token_id)]
    assert not torch.isin(replaced, torch.tensor(tok.all_special_ids)).any()
    assert torch.equal(out["token_type_ids"], torch.zeros_like(original))


def test_mask_is_a_pure_function_of_seed_epoch_and_example(tok):
    batch = random_batch(tok, 8, 64)
    masker = corpus.MlmMasker(tok, seed=7)
    first = masker(batch)
    # the same examples in another order, padded wider, by a fresh masker: the same masks
    order = torch.tensor([5, 2, 7, 0, 1, 3, 6, 4])
    wide = {"input_ids": torch.nn.functional.pad(batch["input_ids"][order], (0, 16), value=tok.pad_token_id),
            "attention_mask": torch.nn.functional.pad(batch["attention_mask"][order], (0, 16)),
            "example_idx": batch["example_idx"][order]}
    again = corpus.MlmMasker(tok, seed=7)(wide)
    assert torch.equal(again["mlm_labels"][:, :64], first["mlm_labels"][order])
    assert torch.equal(again["input_ids"][:, :64], first["input_ids"][order])

    masker.set_epoch(1)
    next_epoch = masker(batch)
    other_seed = corpus.MlmMasker(tok, seed=8)(batch)
    for other in (next_epoch, other_seed):
        assert not torch.equal(other["mlm_labels"], first["mlm_labels"])
    masker.set_epoch(0)
    assert torch.equal(masker(batch)["mlm_labels"], first["mlm_labels"])


def test_map_loader_batches(tok, tmp_path):
    blocks = corpus.prepare_blocks(tok, 30, tmp_path / "cache", text_files=[str(write_text(tmp_path / "a.txt", sentences(200)))])
    loader = corpus.map_loader(blocks, tok, 4, seed=1, rank=1, world_size=2)
    assert len(loader) == len(blocks) // 2 // 4
    loader.set_epoch(0)
    first = list(loader)
    batch = first[0]
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "mlm_labels", "example_idx", "epoch"}
    assert (batch["epoch"] == 0).all()  # with example_idx, where a masked-LM teacher cache finds the batch's rows
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["input_ids"].shape[1] >= 30
    seen = torch.cat([b["example_idx"] for b in first])
    assert len(set(seen.tolist())) == len(seen)
    # the stored block, masked by its example index, is what the batch holds
    row = batch["example_idx"][0].item()
    stored = torch.tensor(blocks[row]["input_ids"])
    masked, labels = loader.masker.mask_example(stored, row)
    assert torch.equal(batch["input_ids"][0, : len(stored)], masked) and torch.equal(batch["mlm_labels"][0, : len(stored)], labels)
    loader.set_epoch(1)
    assert not torch.equal(torch.cat([b["example_idx"] for b in loader]), seen)  # reshuffled


# -- streaming ---------------------------------------------------------------------------------------

def test_stream_equals_map_style_and_resumes_at_the_exact_block(tok, tmp_path):
    docs = sentences(300)
    files = [str(write_text(tmp_path / "a.txt", docs[:170])), str(write_jsonl(tmp_path / "b.jsonl.gz", docs[170:]))]
    blocks = corpus.prepare_blocks(tok, 40, tmp_path / "cache", text_files=files)

    def stream():
        return corpus.StreamingBlocks(corpus.stream_documents(text_files=files), tok, 40, docs_per_batch=16)

    streamed = list(stream())
    assert streamed == blocks.to_list()

    for stop in (1, 37, len(streamed) - 1):  # inside the first tokenizer batch, later, just before the end
        partial = stream()
        for _, _ in zip(range(stop), partial):
            pass
        state = partial.state_dict()
        resumed = stream()
        resumed.load_state_dict(json.loads(json.dumps(state)))  # a checkpoint survives serialisation
        assert list(resumed) == streamed[stop:]

    # batches: the stream's masks equal the map-style masks of the same example
    loader = corpus.stream_loader(stream(), tok, 8, seed=5)
    loader.set_epoch(2)
    batch = next(iter(loader))
    masker = corpus.MlmMasker(tok, seed=5)
    masker.set_epoch(2)
    for r, idx in enumerate(batch["example_idx"].tolist()):
        ids = torch.tensor(blocks[idx]["input_ids"])
        masked, labels = masker.mask_example(ids, idx)
        assert torch.equal(batch["input_ids"][r, : len(ids)], masked) and torch.equal(batch["mlm_labels"][r, : len(ids)], labels)
    state = loader.state_dict()
    assert state["yielded"] == 8 and state["epoch"] == 2
    rest = corpus.stream_loader(stream(), tok, 8, seed=5)
    rest.load_state_dict(state)
    assert torch.equal(next(iter(rest))["example_idx"], torch.arange(8, 16))


def test_a_stream_saved_after_its_short_last_batch_resumes_into_the_next_pass(tok, tmp_path):
    """A DataLoader reads the stream to its end to fill a short last batch, so a checkpoint at that step saves
    the stream's state after the pass: resumed, it yields nothing more of that pass and then the next pass, as
    the uninterrupted loader does (before: the state read "start of the epoch" and the pass was replayed)."""
    files = [str(write_text(tmp_path / "a.txt", sentences(60)))]

    def loader():
        return corpus.stream_loader(corpus.StreamingBlocks(corpus.stream_documents(text_files=files), tok, 32), tok, 4, seed=7)

    whole = loader()
    first_pass = [b["example_idx"] for b in whole]
    assert len(first_pass[-1]) < 4  # the pass ends in a short batch
    state = json.loads(json.dumps(whole.state_dict()))
    whole.set_epoch(1)
    second_pass = [b["input_ids"] for b in whole]

    resumed = loader()
    resumed.load_state_dict(state)
    assert list(resumed) == []
    resumed.set_epoch(state["epoch"] + 1)
    assert all(torch.equal(a, b) for a, b in zip([b["input_ids"] for b in resumed], second_pass, strict=True))


@pytest.mark.parametrize("n_files", [4, 3])  # whole files per rank; every other document when files ∤ ranks
def test_stream_is_split_over_ranks_and_each_rank_resumes(tok, tmp_path, n_files):
    docs = sentences(120)
    files = [str(write_text(tmp_path / f"{i}.txt", docs[i::n_files])) for i in range(n_files)]

    def stream(rank):
        documents = corpus.stream_documents(text_files=files, rank=rank, world_size=2)
        return corpus.StreamingBlocks(documents, tok, 24, rank=rank, world_size=2, docs_per_batch=5)

    shares = [list(stream(r)) for r in range(2)]
    assert all(shares)
    indices = [b["example_idx"] for s in shares for b in s]
    assert len(indices) == len(set(indices)) and {b["example_idx"] % 2 for b in shares[1]} == {1}
    words = sorted(content([b["input_ids"] for s in shares for b in s], tok))
    assert words == sorted(i for d in corpus.encode(tok, docs) for i in d)  # together they read everything once

    partial = stream(1)
    for _, _ in zip(range(7), partial):
        pass
    resumed = stream(1)
    resumed.load_state_dict(partial.state_dict())
    assert list(resumed) == shares[1][7:]
    with pytest.raises(PkdError, match="same number of ranks"):
        stream(0).load_state_dict(partial.state_dict())

def test_a_datasets_corpus_reads_like_the_files(tok, tmp_path, monkeypatch):
    """--dataset through `datasets.load_dataset` (here a local folder, which needs no network), whole and
    streamed, with a renamed text column: the same blocks as the files."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    docs = sentences(120)
    folder = tmp_path / "hub_like"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", docs, field="body")
    files = [str(write_text(tmp_path / "a.txt", docs))]
    expected = corpus.prepare_blocks(tok, 32, tmp_path / "cache", text_files=files)["input_ids"]

    whole = corpus.prepare_blocks(tok, 32, tmp_path / "cache", dataset=str(folder), text_column="body")
    assert whole["input_ids"] == expected
    with monkeypatch.context() as m:  # a second run loads the cached tokens: the dataset's fingerprint is stable
        m.setattr(corpus, "encode", None)
        assert corpus.prepare_blocks(tok, 32, tmp_path / "cache", dataset=str(folder), text_column="body")["input_ids"] == expected
    streamed = corpus.StreamingBlocks(corpus.stream_documents(dataset=str(folder), text_column="body"), tok, 32)
    assert [b["input_ids"] for b in streamed] == expected
    assert "has columns" in one_line_error(corpus.prepare_blocks, tok, 32, tmp_path / "cache", dataset=str(folder), text_column="text")
    assert "cannot load" in one_line_error(corpus.prepare_blocks, tok, 32, tmp_path / "cache", dataset=str(tmp_path / "nowhere"))
    assert "exactly one of" in one_line_error(corpus.tokenize_corpus, tok, tmp_path / "cache", text_files=files, dataset=str(folder))
