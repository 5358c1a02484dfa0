"""End to end through the real CLI on small slices of real GLUE data: files written, saved students that
reload and reproduce their dev metric, 2 ranks ≡ 1 rank, and kill → --resume ≡ uninterrupted."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pkd_fast import data, glue_files
from pkd_fast.config import default_teacher
from pkd_fast.dist import SHM_DIR, _free_port
from pkd_fast.faults import FAULT_ENV
from pkd_fast.metrics import glue_metrics
from pkd_fast.models import load_classifier
from pkd_fast.tasks import get_task
from pkd_fast.train import main
from test_config import assert_one_line_error

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "pkd_fast" / "train.py"
GLUE_DIR = Path(os.environ.get("GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))
pytestmark = pytest.mark.skipif(not (GLUE_DIR / "SST-2").is_dir(), reason=f"no GLUE data at {GLUE_DIR}")

SMALL = ["--glue-dir", str(GLUE_DIR), "--max-seq-length", "32", "--max-eval-samples", "48", "--log-steps", "1"]


def ds_json(tmp_path, name="fp32.json", **overrides):
    """A DeepSpeed config derived from the shipped zero2.json (fp32 by default, for tight comparisons)."""
    config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    config.update({"bf16": {"enabled": False}, "tensorboard": {"enabled": False}})
    config.update(overrides)
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return str(path)


def zero3_json(tmp_path, name="z3.json", **overrides) -> str:
    """The shipped zero3.json in fp32 without TensorBoard."""
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config.update({"bf16": {"enabled": False}, "tensorboard": {"enabled": False}, **overrides})
    (tmp_path / name).write_text(json.dumps(config))
    return str(tmp_path / name)


# What train.main run in this process (by a test, before it starts a run in a fresh one) leaves in os.environ
# of its one-process group: a child that inherited them would try to join that group.
PROCESS_GROUP_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def train(args, *, ranks=1, env=None, check=True):
    """Run the CLI in a fresh process (1 rank: plain python; more: the deepspeed launcher)."""
    port = str(_free_port())
    cmd = [sys.executable, str(TRAIN)] if ranks == 1 else ["deepspeed", "--num_gpus", str(ranks), "--master_port", port, str(TRAIN)]
    inherited = {k: v for k, v in os.environ.items() if k not in PROCESS_GROUP_ENV}
    proc = subprocess.run(cmd + list(args), capture_output=True, text=True, env={**inherited, **(env or {})}, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    # DeepSpeed's CPU all-reduce segments (dist._unlink_own_shm_buffer): none may outlive a run, failed or not
    assert not list(SHM_DIR.glob(f"deepspeed_allreduce_buffer_*_{port}_*")), f"/dev/shm segments of port {port} left behind"
    return proc


def train_log(run_dir):
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def save_teacher(path: Path, task: str, dropout: float | None = None) -> str:
    """The offline MiniLM with a fresh head for `task`, saved as a 'fine-tuned' teacher."""
    model = load_classifier(default_teacher(), get_task(task))
    if dropout is not None:
        model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = dropout
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(default_teacher()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def teacher_without_dropout(tmp_path_factory):
    """Dropout off, so that runs that differ only in how the batch is split over ranks must agree."""
    return save_teacher(tmp_path_factory.mktemp("teacher_nodrop"), "sst2", dropout=0.0)


@pytest.fixture(scope="module")
def teacher_with_dropout(tmp_path_factory):
    """Dropout on (the student inherits it), so a resumed run must restore the RNG to match."""
    return save_teacher(tmp_path_factory.mktemp("teacher_drop"), "sst2")


def dev_metric_of_saved_model(model_dir: Path, task_name: str, micro_batch: int, max_eval: int, dtype) -> dict:
    """Reload a saved student with plain transformers and score the same dev rows."""
    task = get_task(task_name)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    dev = data.tokenize(data.subsample_head(glue_files.load_glue(task, GLUE_DIR)["dev"], max_eval), tok, 32)
    logits, labels = [], []
    with torch.no_grad():
        for batch in data.make_loader(dev, tok, 2 * micro_batch, train=False, seed=0):
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
            logits.append(model(**inputs).logits.float())
            labels.append(batch["labels"])
    return glue_metrics(torch.cat(logits).numpy(), torch.cat(labels).numpy(), task)


@pytest.mark.slow
def test_sst2_all_stages_writes_outputs_and_the_student_reloads(tmp_path):
    """The product's default path (bf16 ZeRO-2 JSON): teacher fine-tune → KD and PKD-Skip → table. --precision
    bf16 keeps it bf16 on a CPU that only emulates bf16 (auto would run fp32 there)."""
    out = tmp_path / "run"
    proc = train(["--deepspeed", str(REPO / "ds_configs" / "zero2.json"), "--precision", "bf16", "--task", "sst2",
                  "--max-train-samples", "32", "--epochs", "1", "--strategy", "kd,skip", "--output-dir", str(out), *SMALL,
                  "--max-eval-samples", "16"])  # one step and one batch of 16 dev rows a run: bf16 is emulated on AVX2 CPUs
    assert "| PKD-Skip | 3 | 2,4 |" in proc.stdout and "| Teacher | 6 |" in proc.stdout
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["runs"]) == {"teacher", "kd", "skip"} and summary["train_rows"] == 32
    assert summary["device"]["precision"] == "bf16" and summary["device"]["precision_reason"] == "--precision bf16"
    assert json.loads((out / "resolved_config.json").read_text())["strategy"] == ["kd", "skip"]
    skip = out / "students" / "skip"
    result = json.loads((skip / "results.json").read_text())
    assert result["layer_map"] == [2, 4] and result["strategy"] == "skip" and result["student_layers"] == 3
    evals = [json.loads(line) for line in (skip / "metrics.jsonl").read_text().splitlines()]
    assert len(evals) == 1 and evals[0]["accuracy"] == result["dev"]["accuracy"]
    assert {"total", "ce", "kd", "pt"} <= set(train_log(skip)[0])
    assert not (skip / "checkpoints").exists()  # a finished run keeps its model, not its checkpoints
    reloaded = dev_metric_of_saved_model(skip / "model", "sst2", 32, 16, torch.bfloat16)
    assert reloaded["accuracy"] == pytest.approx(result["dev"]["accuracy"], abs=1e-9)


@pytest.mark.slow
def test_mrpc_student_stage_from_a_finetuned_teacher(tmp_path):
    teacher = save_teacher(tmp_path / "teacher", "mrpc")
    out = tmp_path / "run"
    main(["--deepspeed", ds_json(tmp_path, train_micro_batch_size_per_gpu=16), "--task", "mrpc", "--stage", "student",
          "--teacher", teacher, "--strategy", "last", "--max-train-samples", "64", "--epochs", "1",
          "--output-dir", str(out), *SMALL])
    result = json.loads((out / "students" / "last" / "results.json").read_text())
    # the whole split's metrics, and each fixed half's (metrics.dev_halves: one picks, one reports)
    assert result["layer_map"] == [4, 5] and set(result["dev"]) == {f"{h}{m}" for h in ("", "select/", "report/") for m in ("f1", "accuracy")}
    reloaded = dev_metric_of_saved_model(out / "students" / "last" / "model", "mrpc", 16, 48, torch.float32)
    assert reloaded == pytest.approx({m: result["dev"][m] for m in ("f1", "accuracy")}, abs=1e-9)


@pytest.mark.slow
def test_two_ranks_zero2_follow_the_one_rank_loss_curve(tmp_path, teacher_without_dropout):
    """Same global batch of 16: 2 ranks × 8 vs 1 rank × 16. Only padding widths and reduction order
    differ, so the logged (rank-averaged) losses agree to 1e-4 relative over 8 steps. T=1: at T=10 the
    KD term of a fresh student is ~1e-4 made of O(1) parts, and fp32 cancellation alone moves it ~1%."""
    common = ["--stage", "student", "--teacher", teacher_without_dropout, "--strategy", "skip", "--max-train-samples", "128",
              "--epochs", "1", "--temperature", "1", *SMALL]
    one, two = tmp_path / "one", tmp_path / "two"
    train(["--deepspeed", ds_json(tmp_path, "m16.json", train_micro_batch_size_per_gpu=16), "--output-dir", str(one), *common])
    train(["--deepspeed", ds_json(tmp_path, "m8.json", train_micro_batch_size_per_gpu=8), "--output-dir", str(two), *common], ranks=2)
    log1, log2 = train_log(one / "students" / "skip"), train_log(two / "students" / "skip")
    assert [r["step"] for r in log1] == [r["step"] for r in log2] == list(range(1, 9))
    for a, b in zip(log1, log2):
        for term in ("total", "ce", "kd", "pt"):
            # abs: the T=1 KD term here is ~3e-5, a difference of O(1) log-probabilities, so fp32
            # rounding alone leaves ~1e-8 of it (seen: 7e-9); 5e-8 is still 0.2% of the term.
            assert b[term] == pytest.approx(a[term], rel=1e-4, abs=5e-8), (a["step"], term)


@pytest.mark.slow
def test_zero3_partitions_student_and_teacher_and_saves_full_weights(tmp_path, teacher_without_dropout):
    """ZeRO-3 on 2 ranks: the student is partitioned, the teacher runs in its own ZeRO-3 inference
    engine, and the saved model holds the gathered weights (it reloads and reproduces its metric). With the
    relation term on: the hooks catch Q, K, V of both partitioned models (the term is logged, finite, > 0)."""
    out = tmp_path / "run"
    train(["--deepspeed", zero3_json(tmp_path, train_micro_batch_size_per_gpu=8), "--stage", "student", "--teacher",
           teacher_without_dropout, "--strategy", "skip", "--max-train-samples", "64", "--epochs", "1", "--relation-weight", "10",
           "--output-dir", str(out), *SMALL], ranks=2)
    assert all(0 < r["rel"] < math.inf for r in train_log(out / "students" / "skip"))
    result = json.loads((out / "students" / "skip" / "results.json").read_text())
    reloaded = dev_metric_of_saved_model(out / "students" / "skip" / "model", "sst2", 8, 48, torch.float32)
    assert reloaded["accuracy"] == pytest.approx(result["dev"]["accuracy"], abs=1e-9)


def test_a_training_set_smaller_than_one_global_batch_is_refused_before_the_teacher_trains(capsys, tmp_path):
    """8 rows against a global batch of 16 would train nothing: one line naming both and what to change,
    before the teacher's fine-tuning starts (no teacher directory)."""
    out = tmp_path / "run"
    assert_one_line_error(capsys, ["--deepspeed", ds_json(tmp_path, train_micro_batch_size_per_gpu=16), "--task", "sst2",
                                   "--max-train-samples", "8", "--output-dir", str(out), *SMALL],
                          "8 sst2 training rows make no optimizer step of 16 rows (micro-batch 16 × accumulation 1 × 1 rank(s)): "
                          "raise --max-train-samples")
    assert not (out / "teacher").exists()


@pytest.mark.slow
def test_a_one_row_dev_set_on_two_zero3_ranks_scores_as_on_one(tmp_path, teacher_without_dropout):
    """--max-eval-samples 1 on 2 ranks: rank 1 has no dev row, yet under ZeRO-3 each forward gathers the
    partitioned weights with every rank, so it runs an uncounted filler batch (before: rank 0 waited in the
    gather until --dist-timeout). The teacher's row (its own ZeRO-3 engine) and the FT student's (the
    training engine) score the one row exactly as one rank does."""
    common = ["--teacher", teacher_without_dropout, "--strategy", "ft", "--max-train-samples", "8", "--max-steps", "1",
              *SMALL, "--max-eval-samples", "1"]
    train([*common, "--deepspeed", zero3_json(tmp_path, "m8.json", train_micro_batch_size_per_gpu=8),
           "--output-dir", str(tmp_path / "one")])
    train([*common, "--deepspeed", zero3_json(tmp_path, "m4.json", train_micro_batch_size_per_gpu=4),
           "--output-dir", str(tmp_path / "two"), "--dist-timeout", "60"], ranks=2)
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert one["dev_rows"] == two["dev_rows"] == {"dev": 1}
    for run in ("teacher", "ft"):
        assert set(two["runs"][run]["dev"]) == {"accuracy", "report/accuracy"}
        assert two["runs"][run]["dev"] == one["runs"][run]["dev"], run


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, teacher_with_dropout):
    """A 16-step run that checkpoints every 3 steps, never stopped: what every killed run must come back to.
    With the relation term on (γ > 0), so its hooks and term come back exactly too."""
    tmp = tmp_path_factory.mktemp("resume")
    common = ["--deepspeed", ds_json(tmp, train_micro_batch_size_per_gpu=8), "--stage", "student", "--teacher",
              teacher_with_dropout, "--strategy", "skip", "--max-train-samples", "64", "--epochs", "2", "--save-steps", "3",
              "--relation-weight", "10", *SMALL]
    train([*common, "--output-dir", str(tmp / "whole")])
    return common, tmp / "whole" / "students" / "skip"


def assert_log_so_far_is_the_uninterrupted_one(whole: Path, run: Path, steps: int) -> None:
    """A stopped or killed run's loss log up to where it stopped: steps 1..`steps`, each equal to the
    uninterrupted run's (the steps a resumed run redid included)."""
    a, b = train_log(whole), train_log(run)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b):
        assert rb["total"] == pytest.approx(ra["total"], rel=1e-6), ra["step"]
        assert rb["rel"] == pytest.approx(ra["rel"], rel=1e-6) and ra["rel"] > 0, ra["step"]


# The phases of a checkpoint save, killed in turn (phase, the save's step, the checkpoint left published).
# A step saved again over a killed save's leftover is covered in tests/test_engine.py.
KILL_PHASES = [
    ("ckpt-engine-saved", 6, 3),  # DeepSpeed wrote step 6's files, no RNG file, not published: step 3 stays latest
    ("ckpt-published", 6, 6),  # published, the old checkpoint not yet removed
    ("ckpt-files-written", 9, 8),  # every file of step 9 written, not yet published: step 8 (epoch 1's end) stays latest
]


@pytest.mark.slow
def test_a_kill_at_any_phase_of_a_save_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted, capsys):
    """SIGKILL inside a checkpoint save, then --resume: model, optimizer, schedule, data order and dropout
    RNG all come back from the newest published checkpoint, so the loss curve and the final metric match a
    run never stopped. One chain of runs: each --resume is killed at the next phase (its redone steps
    checked against the uninterrupted log), and the last one runs to the end; 4 processes, not 6.
    After the kill that published step 6, a copy of the run is resumed with another run's settings: refused."""
    common, whole = uninterrupted
    killed = tmp_path / "killed"
    run = killed / "students" / "skip"
    resumed_from = None
    for phase, step, published in KILL_PHASES:
        again = ["--resume"] if resumed_from else []
        proc = train([*common, "--output-dir", str(killed), *again], env={FAULT_ENV: f"{phase}@{step}"}, check=False)
        assert proc.returncode == -9 and (run / "checkpoints" / "latest").read_text() == f"step{published}", phase
        assert not resumed_from or f"resumed at step {resumed_from}" in proc.stderr, phase
        assert_log_so_far_is_the_uninterrupted_one(whole, run, step)
        resumed_from = published
        if phase == "ckpt-published":
            assert_a_checkpoint_of_another_run_is_refused(capsys, common, killed)
    resumed = train([*common, "--output-dir", str(killed), "--resume"])
    assert f"resumed at step {resumed_from}" in resumed.stderr
    assert_log_so_far_is_the_uninterrupted_one(whole, run, 16)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (whole, run))
    assert rb["dev"] == ra["dev"]


@pytest.mark.slow
def test_a_signal_saves_exits_0_and_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted):
    """SIGTERM (a scheduler's notice) or SIGINT (Ctrl-C) mid-training: the run saves a checkpoint at the next
    step boundary, prints one line and exits 0 without a traceback; --resume then gives the uninterrupted
    run's loss log, evaluations and weights. One chain: SIGTERM, then SIGINT to the resumed run, then the
    resume that ends it."""
    common, whole = uninterrupted
    stopped = tmp_path / "stopped"
    run = stopped / "students" / "skip"
    ckpt = run / "checkpoints"
    resumed_from = None
    for fault, stopped_at, where in (
        # inside the step-6 save: it completes, and step 7 (between checkpoints, every 3 steps) saves one for the stop
        ("ckpt-engine-saved@6:SIGTERM", 7, "at step 7 of skip"),
        ("step@8:SIGINT", 8, "after the evaluation of epoch 1 of skip"),  # an epoch's end: the stop waits for its evaluation
    ):
        again = ["--resume"] if resumed_from else []
        proc = train([*common, "--output-dir", str(stopped), *again], env={FAULT_ENV: fault}, check=False)
        signame = fault.rsplit(":", 1)[1]
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert [line for line in proc.stderr.splitlines() if line.startswith("stopped")] == [
            f"stopped by {signame} {where}: saved the checkpoint {ckpt / f'step{stopped_at}'}; run the same command with --resume "
            "to continue from it"]
        assert (ckpt / "latest").read_text() == f"step{stopped_at}" and not (stopped / "results.json").exists()
        assert not resumed_from or f"resumed at step {resumed_from}" in proc.stderr, fault
        assert_log_so_far_is_the_uninterrupted_one(whole, run, stopped_at)
        resumed_from = stopped_at
    resumed = train([*common, "--output-dir", str(stopped), "--resume"])
    assert f"resumed at step {resumed_from}" in resumed.stderr
    assert_log_so_far_is_the_uninterrupted_one(whole, run, 16)
    assert [json.loads(l)["accuracy"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [
        json.loads(l)["accuracy"] for l in (whole / "metrics.jsonl").read_text().splitlines()]
    weights = [load_file(d / "model" / "model.safetensors") for d in (whole, run)]
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-6, atol=1e-7)


def assert_a_checkpoint_of_another_run_is_refused(capsys, common: list[str], killed: Path) -> None:
    """--resume with a flag that changes results (β) or another batch layout names what differs (in this
    process, on a copy of the killed run: a refusal trains nothing)."""
    out = killed.with_name("another")
    shutil.copytree(killed, out)
    for argv, message in (
        (["--beta", "10"], "beta: checkpoint 100.0 ≠ now 10.0"),
        (["--deepspeed", ds_json(out, "m16.json", train_micro_batch_size_per_gpu=16)], "micro_batch: checkpoint 8 ≠ now 16"),
        # a student of another shape or ZeRO stage: DeepSpeed's load failed (a traceback) before the key was
        # compared (another ZeRO stage or objective: tests/test_engine.py)
        (["--student-layers", "2"], "student_layers: checkpoint None ≠ now 2"),
    ):
        assert_one_line_error(capsys, [*common, "--output-dir", str(out), "--resume", *argv], message)


@pytest.mark.slow
def test_resume_of_a_finished_run_with_other_settings_is_refused(tmp_path, uninterrupted, capsys):
    """A finished run's results are reused by --resume only for the settings they were trained with: with another
    β they were returned as they were, while resolved_config.json showed the new β."""
    common, whole = uninterrupted
    out = tmp_path / "done"
    shutil.copytree(whole.parent.parent, out)
    assert_one_line_error(capsys, [*common, "--output-dir", str(out), "--resume", "--beta", "10"],
                          f"--resume {out / 'students' / 'skip'}: skip finished earlier with other settings (beta: finished 100.0 ≠ now 10.0); ")
    main([*common, "--output-dir", str(out), "--resume"])  # the same settings: reused as they are
    assert (out / "students" / "skip" / "results.json").read_text() == (whole / "results.json").read_text()


@pytest.mark.slow
def test_beta_share_sets_the_patient_terms_share_at_step_1_and_leaves_the_run_otherwise_unchanged(tmp_path, teacher_with_dropout):
    """--beta-share 0.25 picks β on the first batch at the initial weights; the logged step 1 (dropout on)
    carries about that share. That β, given as --beta, reproduces the run exactly: choosing it draws no random
    number, so the dropout stream (and the pairing with the other strategies of a seed) is untouched. A kill
    after the step-3 checkpoint resumes with the same β (the checkpoint's run key would refuse another)."""
    common = ["--deepspeed", ds_json(tmp_path, train_micro_batch_size_per_gpu=8), "--stage", "student", "--teacher",
              teacher_with_dropout, "--strategy", "skip", "--max-train-samples", "48", "--epochs", "1", "--save-steps", "3", *SMALL]
    train([*common, "--beta-share", "0.25", "--output-dir", str(tmp_path / "share")])
    run = tmp_path / "share" / "students" / "skip"
    beta = json.loads((run / "results.json").read_text())["beta"]
    log = train_log(run)
    assert log[0]["step"] == 1 and beta * log[0]["pt"] / log[0]["total"] == pytest.approx(0.25, abs=0.03)
    train([*common, "--beta", repr(beta), "--output-dir", str(tmp_path / "given")])
    assert [r["total"] for r in train_log(tmp_path / "given" / "students" / "skip")] == [r["total"] for r in log]
    killed = tmp_path / "killed"
    proc = train([*common, "--beta-share", "0.25", "--output-dir", str(killed)], env={FAULT_ENV: "ckpt-published@3"}, check=False)
    assert proc.returncode == -9
    train([*common, "--beta-share", "0.25", "--output-dir", str(killed), "--resume"])
    assert [r["total"] for r in train_log(killed / "students" / "skip")] == pytest.approx([r["total"] for r in log], rel=1e-6)


@pytest.mark.slow
def test_mean_pooled_pt_from_the_cache_equals_the_live_teachers(tmp_path, teacher_without_dropout):
    """--pt-tokens mean: the cache's pooled rows (fp32 store) give the live teacher's loss curve. T=1: the
    cache pass pads its batches differently, and at T=10 the KD term of a fresh student (~1e-4 made of O(1)
    parts) moves ~1% with that alone (as in the two-rank test above)."""
    common = ["--deepspeed", ds_json(tmp_path, train_micro_batch_size_per_gpu=8), "--teacher", teacher_without_dropout,
              "--strategy", "skip", "--pt-tokens", "mean", "--max-train-samples", "32", "--epochs", "1", "--temperature", "1", *SMALL]
    main([*common, "--stage", "student", "--output-dir", str(tmp_path / "live")])
    main([*common, "--stage", "all", "--teacher-cache", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "cached")])
    live, cached = (train_log(tmp_path / d / "students" / "skip") for d in ("live", "cached"))
    assert len(live) == 4 and all(r["pt"] > 0 for r in live)
    for a, b in zip(live, cached):
        for term, rel in (("total", 1e-4), ("pt", 1e-4), ("kd", 1e-3)):  # kd: seen 3e-5 here, ~1e-4 of O(1) parts
            assert b[term] == pytest.approx(a[term], rel=rel, abs=5e-8), (a["step"], term)
