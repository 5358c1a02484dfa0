"""The training loop's non-finite guard: a NaN or inf in the teacher's outputs, a cache row or the loss
stops the run with one line naming the step, the value and the rank, and nothing of it is checkpointed
or evaluated; `--on-nonfinite skip` drops those micro-batches instead and counts them."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from pkd_fast import cache as teacher_cache
from pkd_fast.config import default_teacher
from pkd_fast.dist import Dist
from pkd_fast.faults import FAULT_ENV
from pkd_fast.models import load_classifier
from pkd_fast.tasks import get_task
from pkd_fast.train import main
from pkd_fast.trainer import NonFiniteError, NonFiniteGuard
from test_train import train

REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = Path(os.environ.get("GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))
needs_glue = pytest.mark.skipif(not (GLUE_DIR / "SST-2").is_dir(), reason=f"no GLUE data at {GLUE_DIR}")
SMALL = ["--glue-dir", str(GLUE_DIR), "--max-train-samples", "64", "--max-seq-length", "32", "--max-eval-samples", "32",
         "--epochs", "1", "--log-steps", "4", "--stage", "student", "--strategy", "skip"]


def test_the_guard_names_the_first_step_value_and_rank():
    guard = NonFiniteGuard(["student output", "teacher logits", "loss"], torch.device("cpu"), Dist(0, 1, torch.device("cpu")))
    finite = torch.ones(4)
    for step in (1, 2):
        guard.observe(step, {"student output": finite, "teacher logits": finite, "loss": finite.sum()})
    guard.check("at step 2")  # nothing to report
    nan = torch.tensor([1.0, float("nan")])
    guard.observe(3, {"student output": finite, "teacher logits": nan, "loss": nan.sum()})
    guard.observe(4, {"student output": torch.tensor([float("inf")]), "teacher logits": nan, "loss": nan.sum()})
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 3 on rank 0; also teacher logits \(rank 0\), found at the log"):
        guard.check("at the log")


def test_skip_mode_drops_teacher_faults_but_stops_on_a_broken_student():
    guard = NonFiniteGuard(["student output", "teacher logits"], torch.device("cpu"), Dist(0, 1, torch.device("cpu")))
    assert guard.skip(guard.observe(1, {"student output": torch.ones(2), "teacher logits": torch.tensor([float("nan")])}), 1)
    assert guard.skipped == 1 and not guard.first_bad.any()
    assert not guard.skip(guard.observe(2, {"student output": torch.ones(2), "teacher logits": torch.ones(2)}), 2)
    with pytest.raises(NonFiniteError, match="non-finite student output at step 3"):
        guard.skip(guard.observe(3, {"student output": torch.tensor([float("nan")]), "teacher logits": torch.ones(2)}), 3)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """A fine-tuned-looking teacher, one whose classifier outputs NaN, and an fp32 DeepSpeed JSON."""
    root = tmp_path_factory.mktemp("nonfinite")
    tokenizer = AutoTokenizer.from_pretrained(default_teacher())
    for name, bias in (("good", 0.0), ("nan", float("nan"))):
        model = load_classifier(default_teacher(), get_task("sst2"))
        torch.nn.init.constant_(model.classifier.bias, bias)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    config.update({"bf16": {"enabled": False}, "tensorboard": {"enabled": False}, "train_micro_batch_size_per_gpu": 8})
    (root / "fp32.json").write_text(json.dumps(config))
    return root


def run_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    return line


@needs_glue
def test_a_nan_teacher_stops_the_run_before_anything_is_saved(teachers, tmp_path, capsys):
    out = tmp_path / "run"
    line = run_error(capsys, [*SMALL, "--deepspeed", str(teachers / "fp32.json"), "--teacher", str(teachers / "nan"),
                              "--output-dir", str(out)])
    assert "non-finite teacher logits at step 1 on rank 0" in line and "found at the log of step 1" in line  # step 1 is always logged
    run = out / "students" / "skip"
    assert not (run / "results.json").exists() and not (out / "results.json").exists()
    assert not (run / "checkpoints" / "latest").exists()
    assert not (run / "metrics.jsonl").exists() and not (run / "train_log.jsonl").exists()


def poison_cache_row(directory: Path, row: int) -> None:
    """A NaN in one cached logit row, with the manifest's digests redone: a store that passes every file
    check (as one written by a teacher that went non-finite on that row would, were writing not guarded)."""
    logits = np.load(directory / "logits.npy", mmap_mode="r+")
    logits[row, 0] = np.nan
    logits.flush()
    del logits
    manifest = json.loads((directory / "manifest.json").read_text())
    path = directory / "logits.npy"
    size = path.stat().st_size
    manifest["files"]["logits.npy"].update(digest=teacher_cache._digest(path, size), full_digest=teacher_cache._full_digest(path))
    (directory / "manifest.json").write_text(json.dumps(manifest))


@needs_glue
def test_a_nan_cache_row_stops_the_run_or_is_skipped_and_counted(teachers, tmp_path, capsys):
    common = [*SMALL, "--deepspeed", str(teachers / "fp32.json"), "--teacher", str(teachers / "good"),
              "--teacher-cache", str(tmp_path / "cache")]
    main([*common, "--stage", "cache", "--output-dir", str(tmp_path / "c")])
    poison_cache_row(tmp_path / "cache", row=17)
    line = run_error(capsys, [*common, "--output-dir", str(tmp_path / "stop")])
    assert "non-finite teacher logits at step" in line and "on rank 0" in line
    assert not (tmp_path / "stop" / "students" / "skip" / "results.json").exists()

    result = main([*common, "--output-dir", str(tmp_path / "skip"), "--on-nonfinite", "skip", "--epochs", "2"])
    run = result["runs"]["skip"]
    assert run["nonfinite_skipped"] == 2  # row 17 is in one micro-batch per epoch
    assert run["steps"] == 16 and np.isfinite(run["dev"]["accuracy"])
    logged = [json.loads(l) for l in (tmp_path / "skip" / "students" / "skip" / "train_log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["total"]) for r in logged) and logged[-1]["nonfinite_skipped"] == 2


@needs_glue
@pytest.mark.slow
@pytest.mark.parametrize("mode, fault, outcome", [
    ("stop", "nonfinite-student", "non-finite student output at step 2 on rank 1, found at the log of step 4"),
    ("skip", "nonfinite-student", "non-finite student output at step 2 on rank 1, found at step 2 (a non-finite student cannot be skipped)"),
    ("skip", "nonfinite-teacher", None),  # rank 1 drops its own micro-batch; rank 0's trains
])
def test_a_fault_on_one_rank_is_decided_by_every_rank_at_the_same_step(teachers, tmp_path, mode, fault, outcome):
    """Two ranks, the fault on rank 1 alone. Every rank takes the guard's decision from one collective that
    all of them call (before the fix rank 1 alone entered the guard's gather in skip mode while rank 0 went
    on into the backward's reduction: a hang until --dist-timeout, reported as a lost peer)."""
    out = tmp_path / "run"
    proc = train([*SMALL, "--deepspeed", str(teachers / "fp32.json"), "--teacher", str(teachers / "good"), "--output-dir", str(out),
                  "--on-nonfinite", mode, "--dist-timeout", "20"], ranks=2, env={FAULT_ENV: f"{fault}@2:rank1"}, check=False)
    run = out / "students" / "skip"
    if outcome is None:
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads((run / "results.json").read_text())
        assert result["nonfinite_skipped"] == 1 and result["steps"] == 4 and np.isfinite(result["dev"]["accuracy"])
        return
    errors = {line for line in proc.stderr.splitlines() if line.startswith("error: ")}
    assert proc.returncode == 2 and len(errors) == 1 and outcome in errors.pop(), proc.stderr[-3000:]
    assert not (run / "checkpoints" / "latest").exists() and not (run / "results.json").exists()


def test_gradient_checkpointing_reaches_the_model_inside_a_wrapper_and_keeps_the_gradients():
    """--gradient-checkpointing finds the Hugging Face model inside a recipe's wrapper (MaskedLMRows) and
    recomputes activations without changing the gradients."""
    from transformers import BertConfig, BertForMaskedLM

    from pkd_fast.models import MaskedLMRows
    from pkd_fast.trainer import _enable_gradient_checkpointing

    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = MaskedLMRows(BertForMaskedLM(config)).train()
    ids = torch.randint(5, 40, (2, 8))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "row_index": torch.tensor([1, 5, 9])}

    def grads():
        model.zero_grad()
        model(**inputs)[0].logsumexp(-1).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    _enable_gradient_checkpointing(model)
    assert model.model.is_activation_checkpointing
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(b, a)
