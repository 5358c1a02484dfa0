"""The masked-LM objective end to end through the real CLI, on GLUE sentences used as raw text: the
headless teacher's head fit, the distilled masked-LM student and its chain into a GLUE PKD run, two
ranks of ZeRO-2 on a stream with kill → --resume ≡ uninterrupted, every bad input as one line, and what
DeepSpeed's ZeRO-2 does on micro-steps that end no optimizer step."""

import csv
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer, BertForMaskedLM

from pkd_fast import checkpoints, deepspeed_json, engines
from pkd_fast.config import default_teacher
from pkd_fast.dist import init_distributed
from pkd_fast.faults import FAULT_ENV
from pkd_fast.models import has_mlm_head, load_classifier
from pkd_fast.precision import cpu_model
from pkd_fast.tasks import get_task
from pkd_fast.train import main
from test_config import assert_one_line_error
from test_train import GLUE_DIR, ds_json, save_teacher, train, train_log, zero3_json

pytestmark = pytest.mark.skipif(not (GLUE_DIR / "SST-2").is_dir(), reason=f"no GLUE data at {GLUE_DIR}")
# eager loss: auto would compile it on a CPU (it pays on vocabulary KD), seconds per process these short runs don't repay
TINY = ["--objective", "mlm", "--max-seq-length", "32", "--log-steps", "1", "--kd-positions", "masked", "--loss-impl", "eager"]


def write_sentences(path: Path, start: int, count: int) -> str:
    """SST-2 training sentences [start, start+count) as a raw text file, one document per line."""
    with open(GLUE_DIR / "SST-2" / "train.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1 + start : 1 + start + count]
    path.write_text("".join(row[0] + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("texts")
    return {"train": write_sentences(root / "train.txt", 0, 300), "small": write_sentences(root / "small.txt", 300, 50),
            "valid": write_sentences(root / "valid.txt", 1000, 60), "ds": ds_json(root, train_micro_batch_size_per_gpu=4)}


BAD = [
    ([], "--objective mlm reads one corpus: give --text-files or --dataset"),
    (["--text-files", "/no/such/*.txt"], "--text-files /no/such/*.txt: matches no file"),
    (["--text-files", "{train}", "--validation-files", "/no/v*.txt"], "--validation-files /no/v*.txt: matches no file"),
    (["--text-files", "{train}", "--task", "mrpc"], "--task: not a flag of --objective mlm"),
    (["--text-files", "{train}", "--strategy", "kd"], "--strategy: not a flag of --objective mlm"),
    (["--text-files", "{train}", "--stage", "cache"], "--stage cache needs --teacher-cache DIR"),
    (["--text-files", "{train}", "--streaming"], "--streaming needs --max-steps"),
    (["--text-files", "{train}", "--streaming", "--max-steps", "3"], "--streaming needs --validation-files"),
    (["--text-files", "{train}", "--max-steps", "3", "--epochs", "1"], "--max-steps replaces --epochs"),
    (["--text-files", "{train}", "--mlm-probability", "1.5"], "--mlm-probability must be between 0 and 1, got 1.5"),
    (["--text-files", "{train}", "--student-layer-choice", "first", "--student-layer-list", "1,2"], "give one"),
    (["--text-files", "{train}", "--dataset-config", "x"], "--dataset-config only applies with --dataset"),
    (["--text-files", "{train}", "--keep-checkpoints", "0"], "--keep-checkpoints must be >= 1, got 0"),
    (["--text-files", "{train}", "--stage", "student", "--teacher-lr", "1e-4"], "--teacher-lr only applies when the teacher's head is fitted"),
    (["--text-files", "{train}", "--stage", "student"], "has no masked-LM head to distil from; fit one first with --stage teacher"),
    (["--text-files", "{train}", "--student-layer-list", "1,9", "--stage", "all", "--max-steps", "1", "--teacher", "{headed}"],
     "--student-layer-list: layer(s) [9] out of range"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_mlm_input_is_one_line(capsys, tmp_path, texts, argv, message):
    if "{headed}" in argv:  # a teacher that has a head: the layer list is checked against its depth
        BertForMaskedLM.from_pretrained(default_teacher()).save_pretrained(tmp_path / "headed")
        AutoTokenizer.from_pretrained(default_teacher()).save_pretrained(tmp_path / "headed")
    argv = [a.format(train=texts["train"], headed=tmp_path / "headed") for a in argv]
    assert_one_line_error(capsys, [*TINY, "--deepspeed", texts["ds"], *argv, "--output-dir", str(tmp_path / "out")], message)


HELD_OUT_FAULTS = [
    ("", "--validation-files {valid}: no text (every line is blank)"),  # was reported as --text-files
    ("\U0001F99C \U0001F99C\n", "--validation-files {valid}: masking (--mlm-probability 0.15) selects no token in its 1 block(s)"),
]


@pytest.mark.parametrize("text, message", HELD_OUT_FAULTS, ids=["empty", "only [UNK], never masked"])
@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
def test_held_out_text_that_cannot_be_scored_is_refused_before_any_training(capsys, tmp_path, monkeypatch, texts, text,
                                                                            message, streaming):
    """A validation file with nothing to score used to fail at the first evaluation, after the head fit."""
    from pkd_fast.recipes import mlm as mlm_recipe

    def no_training(*_):
        raise AssertionError("training started before the held-out text was checked")

    monkeypatch.setattr(mlm_recipe.MlmContext, "fit_head", no_training)
    valid = tmp_path / "valid.txt"
    valid.write_text(text)
    argv = [*TINY, "--deepspeed", texts["ds"], "--text-files", texts["small"], "--validation-files", str(valid),
            "--max-steps", "1", "--output-dir", str(tmp_path / "out"), *(["--streaming"] if streaming else [])]
    assert_one_line_error(capsys, argv, message.format(valid=valid))


def test_glue_refuses_mlm_flags_and_unknown_text_formats(capsys, tmp_path):
    assert_one_line_error(capsys, ["--mlm-probability", "0.2", "--output-dir", str(tmp_path)],
                          "--mlm-probability: not a flag of --objective glue")
    (tmp_path / "corpus.csv").write_text("a,b\n")
    assert_one_line_error(capsys, ["--objective", "mlm", "--text-files", str(tmp_path / "corpus.csv"), "--output-dir", str(tmp_path)],
                          "unknown format; expected .txt, .text, .jsonl")


@pytest.fixture(scope="module")
def staged(tmp_path_factory, texts):
    """--stage all on 1 rank: a head fitted on the headless default teacher, then a 3-layer student."""
    out = tmp_path_factory.mktemp("mlm") / "run"
    summary = main([*TINY, "--deepspeed", texts["ds"], "--text-files", texts["train"], "--max-steps", "10", "--lr", "2e-3",
                    "--output-dir", str(out)])
    return out, summary


def test_headless_teacher_gets_a_fitted_head_and_a_frozen_body(staged):
    out, summary = staged
    fitted = out / "teacher" / "model"
    assert has_mlm_head(str(fitted)) and summary["runs"]["teacher"]["trains"] == "head only (body frozen)"
    body = AutoModel.from_pretrained(default_teacher()).state_dict()
    saved = BertForMaskedLM.from_pretrained(fitted)
    assert all(torch.equal(saved.bert.state_dict()[k], v) for k, v in body.items() if k in saved.bert.state_dict())
    assert saved.cls.predictions.bias.abs().sum() > 0  # the head's bias starts at zero: it trained
    ce = [row["ce"] for row in train_log(out / "teacher")]
    assert sum(ce[-3:]) < sum(ce[:3]), ce


def test_the_run_records_the_device_and_the_precision_that_ran(staged):
    """resolved_config.json and results.json name the device, its bf16 support and the precision that ran (here
    the fp32 the JSON asks for: --precision auto keeps it)."""
    out, summary = staged
    resolved = json.loads((out / "resolved_config.json").read_text())
    assert resolved["precision"] == "auto"
    for device in (resolved["device"], json.loads((out / "results.json").read_text())["device"], summary["device"]):
        assert device["precision"] == device["precision_asked"] == "fp32" and device["kind"] == "cpu"
        assert device["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and device["gpu"] is None
        assert device["name"] == cpu_model() and isinstance(device["bf16_native"], bool)


def test_student_is_a_masked_lm_that_a_glue_run_starts_from(staged, tmp_path):
    out, summary = staged
    result = summary["runs"]["alternate"]
    assert result["layers"] == [1, 3, 5] and result["layer_map"] == [1, 3] and result["student_layers"] == 3
    assert {"mlm_loss", "mlm_accuracy", "masked_tokens"} <= set(result["dev"]) and result["dev"]["masked_tokens"] > 0
    log = train_log(out / "students" / "alternate")
    assert [r["step"] for r in log] == list(range(1, 11))
    assert all(r["tokens_per_s"] > 0 and r["sequences_per_s"] > 0 and {"ce", "kd", "pt"} <= set(r) for r in log)
    student_dir = out / "students" / "alternate" / "model"
    student = BertForMaskedLM.from_pretrained(student_dir)
    assert student.config.num_hidden_layers == 3 and (student_dir / "tokenizer.json").is_file()

    # the student's body is what a GLUE run built from it starts with
    task_init = load_classifier(str(student_dir), get_task("sst2"))
    assert torch.equal(task_init.bert.embeddings.word_embeddings.weight, student.bert.embeddings.word_embeddings.weight)
    assert torch.equal(task_init.bert.encoder.layer[2].output.dense.weight, student.bert.encoder.layer[2].output.dense.weight)
    teacher = save_teacher(tmp_path / "sst2_teacher", "sst2")
    glue = main(["--objective", "glue", "--deepspeed", ds_json(tmp_path, train_micro_batch_size_per_gpu=16), "--stage", "student",
                 "--teacher", teacher, "--init-from", "pretrained", "--base-model", str(student_dir), "--strategy", "skip",
                 "--glue-dir", str(GLUE_DIR), "--max-train-samples", "32", "--max-eval-samples", "16", "--max-seq-length", "32",
                 "--epochs", "1", "--output-dir", str(tmp_path / "glue")])
    assert glue["runs"]["skip"]["student_layers"] == 3 and glue["runs"]["skip"]["layer_map"] == [2, 4]


@pytest.fixture(scope="module")
def stream(tmp_path_factory, staged, texts):
    """Two ranks of ZeRO-2 on a stream shorter than the run (each rank starts a second pass), a checkpoint
    every 2 steps, never stopped: what a killed or signalled run must come back to."""
    out, _ = staged
    common = [*TINY, "--deepspeed", texts["ds"], "--stage", "student", "--teacher", str(out / "teacher" / "model"),
              "--student-layers", "2", "--text-files", texts["small"], "--validation-files", texts["valid"], "--streaming",
              "--max-steps", "6", "--save-steps", "2", "--lr", "1e-3"]
    whole = tmp_path_factory.mktemp("stream") / "whole"
    train([*common, "--output-dir", str(whole)], ranks=2)
    return common, whole / "students" / "alternate"


def assert_resumed_to_the_uninterrupted_run(whole: Path, run: Path) -> None:
    """Loss log, dev metrics and saved student equal the uninterrupted run's."""
    assert json.loads((run / "results.json").read_text())["dev"] == json.loads((whole / "results.json").read_text())["dev"]
    for a, b in zip(train_log(whole), train_log(run), strict=True):
        for term in ("total", "ce", "kd", "pt"):
            assert b[term] == pytest.approx(a[term], rel=1e-6), (a["step"], term)
    weights = [load_file(d / "model" / "model.safetensors") for d in (whole, run)]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_two_ranks_zero2_stream_resume_after_kill_then_sigterm_to_one_rank_matches_the_uninterrupted_run(tmp_path, stream):
    """SIGKILL at step 4's checkpoint (the second pass has begun), then --resume: each rank's stream position,
    masks and dropout RNG come back. That resumed run then gets SIGTERM on rank 1 alone at step 5 (between
    checkpoints, inside the second pass): at that step's boundary both ranks agree, save (each rank's stream
    position too), exit 0 with rank 0's one line; the last --resume ends where the uninterrupted run did (loss
    log and saved student). One chain of 3 two-rank launches instead of a kill and a signal test of 2 each."""
    common, whole = stream
    totals = [r["total"] for r in train_log(whole)]
    assert [r["step"] for r in train_log(whole)] == list(range(1, 7)) and sum(totals[-2:]) < sum(totals[:2]), totals
    out = tmp_path / "stopped"
    ckpt = out / "students" / "alternate" / "checkpoints"
    proc = train([*common, "--output-dir", str(out)], ranks=2, env={FAULT_ENV: "ckpt-published@4"}, check=False)
    assert proc.returncode != 0 and (ckpt / "latest").read_text() == "step4"
    proc = train([*common, "--output-dir", str(out), "--resume"], ranks=2, env={FAULT_ENV: "step@5:rank1:SIGTERM"}, check=False)
    assert "resumed at step 4" in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("stopped by")]
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines == [f"stopped by SIGTERM at step 5 of alternate: saved the checkpoint {ckpt / 'step5'}; run the same "
                     "command with --resume to continue from it"]
    assert (ckpt / "latest").read_text() == "step5"
    assert [r["step"] for r in train_log(ckpt.parent)] == list(range(1, 6))
    for a, b in zip(train_log(whole), train_log(ckpt.parent)):  # step 5: redone after the kill, as uninterrupted
        assert b["total"] == pytest.approx(a["total"], rel=1e-6), a["step"]
    resumed = train([*common, "--output-dir", str(out), "--resume"], ranks=2)
    assert "resumed at step 5" in resumed.stderr
    assert_resumed_to_the_uninterrupted_run(whole, ckpt.parent)


def test_a_stream_pass_ending_in_a_micro_batch_without_masked_tokens_trains_on(tmp_path, staged, texts):
    """14 SST-2 sentences (train.tsv rows 135-148), 32-token blocks, micro-batch 4, seed 7: the first pass
    ends in a micro-batch of 2 blocks (35 real tokens) with no masked token, so --kd-positions masked
    selects [0, V] logits. It adds exactly 0 to CE and KL (the eager batchmean was 0/0 = NaN, which stopped
    the run) and the run trains on into the second pass."""
    out, _ = staged
    run = tmp_path / "run"
    main([*TINY, "--deepspeed", texts["ds"], "--stage", "student", "--teacher", str(out / "teacher" / "model"),
          "--student-layers", "2", "--text-files", write_sentences(tmp_path / "14.txt", 135, 14), "--streaming",
          "--validation-files", texts["valid"], "--seed", "7", "--max-steps", "3", "--output-dir", str(run)])
    log = train_log(run / "students" / "alternate")
    assert [r["step"] for r in log] == [1, 2, 3]
    for r in log:
        assert all(math.isfinite(r[term]) for term in ("total", "ce", "kd", "pt")) and r["pt"] > 0, r
    assert [r["ce"] == r["kd"] == 0.0 for r in log] == [False, True, False]  # step 2 ends the first pass


@pytest.mark.slow
def test_one_and_two_ranks_with_accumulation_take_the_same_masked_lm_steps(tmp_path, staged, texts):
    """Global batch 8 blocks: 1 rank × 8 vs 2 ranks × 2 blocks × 2 accumulated micro-batches, over a
    dropout-free teacher so only the arrangement differs. CE and KL are sums ÷ the step's masked tokens
    across micro-batches and ranks, so the logged losses and the trained student agree to fp32 round-off
    (a mean per micro-batch, averaged by DeepSpeed, weighed short micro-batches more and did not)."""
    out, _ = staged
    teacher = BertForMaskedLM.from_pretrained(out / "teacher" / "model", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    teacher.save_pretrained(tmp_path / "teacher")
    AutoTokenizer.from_pretrained(out / "teacher" / "model").save_pretrained(tmp_path / "teacher")
    common = [*TINY, "--stage", "student", "--teacher", str(tmp_path / "teacher"), "--student-layers", "2",
              "--text-files", texts["small"], "--validation-files", texts["valid"], "--max-steps", "3", "--lr", "1e-3"]
    train([*common, "--deepspeed", ds_json(tmp_path, "one.json", train_micro_batch_size_per_gpu=8),
           "--output-dir", str(tmp_path / "one")])  # a fresh process like the 2 ranks': in pytest's, KD moved 2e-5
    train([*common, "--deepspeed", ds_json(tmp_path, "two.json", train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2),
           "--output-dir", str(tmp_path / "two")], ranks=2)
    runs = [tmp_path / d / "students" / "alternate" for d in ("one", "two")]
    # rel 1e-4: fp32 round-off of a small KL (a sum of p·(log p - log q) that nearly cancels) reached 1.8e-5
    # on an Intel Xeon between batch 8 and batch 2 kernels; the per-micro-batch weighting this test catches
    # moves the terms by percents.
    for a, b in zip(*map(train_log, runs), strict=True):
        for term in ("total", "ce", "kd", "pt"):
            assert b[term] == pytest.approx(a[term], rel=1e-4), (a["step"], term)
    # atol 1e-5: Adam divides each update by the gradient's own scale, so where a gradient is near zero its
    # round-off moves the weight by up to lr·(noise/|g|); seen 5.1e-6 on an Intel Xeon after 3 steps at lr 1e-3.
    # The weighting fault this test is for shows in the logged losses above, by percents.
    weights = [load_file(d / "model" / "model.safetensors") for d in runs]
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-5, atol=1e-5)


def test_a_corpus_smaller_than_one_global_batch_is_refused_before_the_head_fit(capsys, tmp_path, texts):
    """A map-style corpus of fewer blocks than micro-batch × accumulation × ranks would train nothing: one
    line with the block count, the global batch and what to change, before the teacher's head is fitted."""
    out = tmp_path / "out"
    assert_one_line_error(capsys, [*TINY, "--deepspeed", ds_json(tmp_path, train_micro_batch_size_per_gpu=512), "--text-files",
                                   texts["small"], "--validation-files", texts["valid"], "--output-dir", str(out)],
                          "training blocks of 32 tokens make no optimizer step of 512 rows (micro-batch 512 × accumulation 1 × 1 rank(s)): "
                          "give more text or a shorter --max-seq-length")
    assert not (out / "teacher").exists()


@pytest.mark.slow
def test_a_one_block_validation_file_on_two_zero3_ranks_scores_as_on_one(tmp_path, staged, texts):
    """--validation-files holding one block on 2 ranks: rank 1 has no block, yet under ZeRO-3 each forward
    gathers the partitioned weights with every rank, so it runs an uncounted filler batch (before: rank 0
    waited in the gather until --dist-timeout). The teacher's held-out metrics equal one rank's."""
    out, _ = staged
    one_block = tmp_path / "one_block.txt"
    one_block.write_text("a gripping , funny and moving film .\n")
    common = [*TINY, "--deepspeed", zero3_json(tmp_path), "--stage", "teacher", "--teacher", str(out / "teacher" / "model"),
              "--text-files", texts["small"], "--validation-files", str(one_block)]
    train([*common, "--output-dir", str(tmp_path / "one")])
    train([*common, "--output-dir", str(tmp_path / "two"), "--dist-timeout", "60"], ranks=2)
    one, two = (json.loads((tmp_path / d / "results.json").read_text())["runs"]["teacher"]["dev"] for d in ("one", "two"))
    assert one["masked_tokens"] > 0 and two == pytest.approx(one, rel=1e-6)


def test_zero2_reduces_on_every_micro_step():
    """What DeepSpeed 0.19.8 does with gradient accumulation under ZeRO-2 (see pkd_fast/trainer.py):
    gradients are reduced into the partition on every micro-step, boundary or not, and `no_sync` is
    refused, so accumulation saves no communication there."""
    world = init_distributed()
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 2},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine = engines.student_engine(model, config)
    reduced = []
    original = engine.optimizer.reduce_ready_partitions_and_remove_grads

    def counting(param, i):
        reduced.append(engine.is_gradient_accumulation_boundary())
        return original(param, i)

    engine.optimizer.reduce_ready_partitions_and_remove_grads = counting
    for _ in range(2):
        engine.backward(engine(torch.randn(2, 8, device=world.device)).sum())
        engine.step()
    n_params = len(list(model.parameters()))
    assert reduced == [False] * n_params + [True] * n_params  # the non-boundary micro-step reduced every parameter
    with pytest.raises(AssertionError, match="incompatible with gradient partitioning"):
        with engine.no_sync():
            pass


def test_zero1_reduces_only_at_accumulation_boundaries():
    """ds_configs/zero1.json, for large accumulation: ZeRO-1 partitions only the optimizer state, so DeepSpeed
    reduces gradients once per optimizer step, at the boundary, and micro-steps in between communicate nothing."""
    world = init_distributed()
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    config = json.loads((Path(__file__).resolve().parents[1] / "ds_configs" / "zero1.json").read_text())
    config.update({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4, "bf16": {"enabled": False},
                   "tensorboard": {"enabled": False}})
    config.pop("scheduler")
    engine = engines.student_engine(model, deepspeed_json.resolve_ds_config(config, lr=1e-3, total_steps=10, warmup_steps=1, tensorboard_dir=Path(".")))
    reduced = []
    original = engine.optimizer.reduce_gradients

    def counting(*args, **kwargs):
        reduced.append(engine.is_gradient_accumulation_boundary())
        return original(*args, **kwargs)

    engine.optimizer.reduce_gradients = counting
    for _ in range(8):
        engine.backward(engine(torch.randn(2, 8, device=world.device)).sum())
        engine.step()
    assert reduced == [True, True]  # two optimizer steps of four micro-steps: one reduction each


def test_keep_checkpoints_keeps_the_newest_by_step_number(tmp_path):
    for step in (2, 4, 10, 12):
        (tmp_path / f"step{step}").mkdir()
    checkpoints.prune_checkpoints(tmp_path, keep=3)
    assert sorted(d.name for d in tmp_path.iterdir()) == ["step10", "step12", "step4"]
    checkpoints.prune_checkpoints(tmp_path, keep=1)
    assert [d.name for d in tmp_path.iterdir()] == ["step12"]
