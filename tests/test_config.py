"""Every bad flag, path and DeepSpeed JSON value ends in one `error: …` line (exit 2) that names the flag or
file and what was expected: never a traceback, never a silent default."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pkd_fast.config import default_teacher
from pkd_fast.train import main

REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = Path(os.environ.get("GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))


def ds_file(tmp_path, name="bad.json", drop=(), **overrides):
    config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    for key in drop:
        config.pop(key)
    config.update(overrides)
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return str(path)


def assert_one_line_error(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2, argv
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, (argv, err[-2000:])


FLAG_CASES = [
    (["--task", "squad"], "unknown task 'squad'"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--temperature", "inf"], "--temperature must be a finite number, got inf"),
    (["--beta", "inf"], "--beta must be a finite number, got inf"),
    (["--beta", "nan"], "--beta must be a finite number, got nan"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--alpha", "1.5"], "--alpha must be in [0, 1]"),
    (["--beta", "-1"], "--beta must be >= 0"),
    (["--beta-share", "0"], "--beta-share must be a share of the loss in (0, 1), got 0.0"),
    (["--beta-share", "1"], "--beta-share must be a share of the loss in (0, 1), got 1.0"),
    (["--beta-share", "nan"], "--beta-share must be a share of the loss in (0, 1), got nan"),
    (["--beta-share", "-0.1"], "--beta-share must be a share of the loss in (0, 1), got -0.1"),
    (["--objective", "mlm", "--text-files", "x.txt", "--beta-share", "0.2"], "--beta-share: not a flag of --objective mlm"),
    (["--objective", "mlm", "--text-files", "x.txt", "--no-group-by-length"], "--group-by-length: not a flag of --objective mlm"),
    (["--strategy", "ft,kd", "--beta-share", "0.2"], "--beta-share only applies to PKD students (--strategy skip or last)"),
    (["--log-steps", "0"], "--log-steps must be >= 1, got 0"),
    (["--log-steps", "-5"], "--log-steps must be >= 1, got -5"),
    (["--save-steps", "-1"], "--save-steps must be >= 0"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--data-seed", "-3"], "--data-seed must be >= 0, got -3"),
    (["--teacher-epochs", "0"], "--teacher-epochs must be >= 1, got 0"),
    (["--teacher", "/no/such/teacher"], "--teacher /no/such/teacher: no such directory"),
    (["--teacher", "./missing-teacher"], "--teacher ./missing-teacher: no such directory"),
    (["--init-from", "pretrained", "--base-model", "/no/such/base"], "--base-model /no/such/base: no such directory"),
    (["--glue-dir", "/no/such/glue"], "--glue-dir /no/such/glue: no such directory"),
    (["--deepspeed", "/no/such.json"], "--deepspeed /no/such.json: no such DeepSpeed JSON file"),
    (["--stage", "student", "--teacher-cache", "/no/such/cache"], "--teacher-cache /no/such/cache: no teacher cache there"),
    (["--strategy", "ft,kd", "--layer-map", "2,4"], "--layer-map only applies to PKD students"),
    (["--strategy", "skip,last", "--layer-map", "2,4"], "--layer-map with both skip and last"),
    (["--cache-layers", "0,2"], "--cache-layers only applies when a teacher cache is written"),
    (["--base-model", default_teacher()], "--base-model only applies with --init-from pretrained"),
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--teacher-lr=-1e-05"], "--teacher-lr must be > 0, got -1e-05"),
    (["--strategy", "ft", "--teacher-cache", "/tmp/c"], "--teacher-cache only applies when a student reads the teacher"),
    (["--stage", "teacher", "--teacher-cache", "/tmp/c"], "--teacher-cache only applies when a student reads the teacher"),
]


@pytest.mark.parametrize("argv, message", FLAG_CASES, ids=[" ".join(a) for a, _ in FLAG_CASES])
def test_bad_flag_is_one_line(capsys, tmp_path, argv, message):
    assert_one_line_error(capsys, [*argv, "--output-dir", str(tmp_path / "out")], message)


PARSE_CASES = [
    (["--on-nonfinite", "ignore"], "argument --on-nonfinite: invalid choice: 'ignore' (choose from 'stop', 'skip')"),
    (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    (["--layer-map", "2;4"], "argument --layer-map: expected comma-separated integers like 2,4,6, got '2;4'"),
    (["--strategy", "pkd"], "argument --strategy: strategies are a comma-separated subset of"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--teacher"], "argument --teacher: expected one argument"),
]


@pytest.mark.parametrize("argv, message", PARSE_CASES, ids=[" ".join(a) for a, _ in PARSE_CASES])
def test_a_command_line_argparse_cannot_parse_is_one_error_line_too(capsys, argv, message):
    """Not argparse's usage block followed by "pkd_fast/train.py: error: ...": the one line every other bad
    input gets, pointing to --help."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.splitlines() == [f"error: {err[7:].strip()}"], err
    assert message in err and err.rstrip().endswith("(see --help)"), err


def test_a_refused_run_prints_its_error_line_and_nothing_else(tmp_path):
    """A fresh process on a machine without a GPU: no DeepSpeed "Setting accelerator to CPU" warning before
    the error (DS_ACCELERATOR is set to cpu there), and the refused value is in the line."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, str(REPO / "pkd_fast" / "train.py"), "--lr", "0", "--output-dir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", "error: --lr must be > 0, got 0.0\n")


def test_output_dir_that_cannot_be_written(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert_one_line_error(capsys, ["--output-dir", str(blocker / "sub")], f"--output-dir {blocker / 'sub'}: cannot create or write there")


def test_max_seq_length_above_the_teachers_positions(capsys, tmp_path):
    assert_one_line_error(capsys, ["--max-seq-length", "1024", "--output-dir", str(tmp_path)],
                          "--max-seq-length 1024: batches padded to a multiple of 8 (1024) exceed the 512 position embeddings of --teacher")


DS_CASES = [
    ({"drop": ("optimizer",)}, 'no "optimizer" with a "type"'),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be a positive integer, got 0"),
    ({"train_micro_batch_size_per_gpu": 2.5}, "train_micro_batch_size_per_gpu must be a positive integer, got 2.5"),
    ({"train_micro_batch_size_per_gpu": "32"}, 'train_micro_batch_size_per_gpu must be a positive integer, got "32"'),
    ({"train_micro_batch_size_per_gpu": 0}, "train_micro_batch_size_per_gpu must be a positive integer, got 0"),
    ({"train_batch_size": 100}, "train_batch_size 100 ≠ micro-batch 32 × accumulation 1 × 1 rank(s) = 32"),
    ({"train_batch_size": 100, "drop": ("gradient_accumulation_steps",)}, "train_batch_size 100 is not a multiple of micro-batch 32"),
    ({"fp16": {"enabled": True}}, "fp16 and bf16 are both enabled"),
    ({"scheduler": {"type": "OneCycle", "params": {}}}, "scheduler 'OneCycle': the run fills in --lr and --warmup-ratio only for"),
]


@pytest.mark.parametrize("change, message", DS_CASES, ids=[m[:40] for _, m in DS_CASES])
def test_bad_deepspeed_json_is_one_line(capsys, tmp_path, change, message):
    change = dict(change)
    path = ds_file(tmp_path, drop=change.pop("drop", ()), **change)
    assert_one_line_error(capsys, ["--deepspeed", path, "--glue-dir", str(GLUE_DIR), "--output-dir", str(tmp_path)],
                          f"{path}: {message}")


# Values DeepSpeed accepts from the JSON but trips over inside deepspeed.initialize, after the data is loaded
# (a traceback), or silently replaces: checked up front against DeepSpeed's config models and the constructors
# DeepSpeed would call (torch.optim's, DeepSpeed's schedulers).
DS_VALUE_CASES = [
    ("optimizer.params.weight_decay", "0.01", 'optimizer.params.weight_decay must be a number (like 0.01), got "0.01"'),
    ("optimizer.params.betas", [0.9], "optimizer.params.betas must be 2 numbers (like [0.9, 0.999]), got [0.9]"),
    ("optimizer.params.betas", [0.9, 1.5], "optimizer.params: torch.optim.AdamW refuses them (Invalid beta parameter at index 1: 1.5)"),
    ("optimizer.params.eps", -1, "optimizer.params: torch.optim.AdamW refuses them (Invalid epsilon value: -1)"),
    ("optimizer.params.lr_decay", 0.1, "optimizer.params.lr_decay: not an argument of AdamW (it takes lr, betas, eps"),
    ("optimizer.type", "AdamWW", 'optimizer.type "AdamWW" is neither a DeepSpeed optimizer nor one of torch.optim\'s'),
    ("gradient_clipping", "1.0", 'gradient_clipping must be a number >= 0 (0: no clipping), got "1.0"'),
    ("gradient_clipping", -1, "gradient_clipping must be a number >= 0 (0: no clipping), got -1"),
    ("zero_optimization.stage", 4, "zero_optimization.stage: Input should be 0, 1, 2, 3"),
    ("zero_optimization.stage", "two", 'zero_optimization.stage: Input should be 0, 1, 2, 3 or 3, got "two"'),
    ("zero_optimization.overlap_com", True, "zero_optimization.overlap_com: Extra inputs are not permitted"),
    ("zero_optimization.reduce_bucket_size", "5e7", 'zero_optimization.reduce_bucket_size: Input should be a valid integer'),
    ("torch_autocast.dtype", "float8", 'torch_autocast.dtype must be a dtype name DeepSpeed knows ('),
    ("scheduler.params.warmup_type", "cosine", 'scheduler.params.warmup_type must be one of log, linear, got "cosine"'),
    ("scheduler.params.warmup_min_lr", "0", 'scheduler.params.warmup_min_lr must be a number (like 0.0), got "0"'),
]


@pytest.mark.parametrize("key, value, message", DS_VALUE_CASES, ids=[f"{k}={v}" for k, v, _ in DS_VALUE_CASES])
def test_deepspeed_json_value_of_the_wrong_type_or_range_is_one_line(capsys, tmp_path, key, value, message):
    """Refused before any data is loaded, naming the JSON file, the key path and what was expected."""
    config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    *parents, last = key.split(".")
    node = config
    for name in parents:
        node = node.setdefault(name, {})
    node[last] = value
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config))
    assert_one_line_error(capsys, ["--deepspeed", str(path), "--glue-dir", str(GLUE_DIR), "--output-dir", str(tmp_path / "out")],
                          f"{path}: {message}")


def test_invalid_json_names_the_line(capsys, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "train_micro_batch_size_per_gpu": 8,\n  oops\n}')
    assert_one_line_error(capsys, ["--deepspeed", str(path), "--output-dir", str(tmp_path)], f"{path}:3: invalid JSON")


def test_auto_values_in_the_deepspeed_json_are_refused(capsys, tmp_path):
    path = ds_file(tmp_path, train_micro_batch_size_per_gpu="auto")
    assert_one_line_error(capsys, ["--deepspeed", path, "--output-dir", str(tmp_path)],
                          'train_micro_batch_size_per_gpu is "auto"')


def test_global_batch_alone_derives_the_accumulation():
    from pkd_fast.deepspeed_json import check_batch_layout

    config = check_batch_layout({"train_micro_batch_size_per_gpu": 8, "train_batch_size": 64}, "x.json", world_size=2)
    assert config["gradient_accumulation_steps"] == 4


LAYER_CASES = [
    (["--strategy", "skip", "--student-layers", "3", "--layer-map", "4,9"], "--layer-map: layer(s) [9] out of range; the teacher has layers 1..6"),
    (["--strategy", "skip", "--student-layers", "3", "--layer-map", "4,4"], "--layer-map 4,4: layers must ascend without repeats"),
    (["--strategy", "last", "--student-layers", "3", "--layer-map", "5,2"], "--layer-map 5,2: layers must ascend without repeats"),
    (["--student-layers", "9"], "--student-layers 9: must be between 1 and the teacher's depth 6"),
    (["--strategy", "ft,skip", "--student-layers", "4"], "PKD-skip needs the teacher depth (6) to be a multiple of the student depth (4)"),
    (["--init-from", "pretrained", "--base-model", "{base}", "--student-layers", "3"],
     "--student-layers 3: must be between 1 and --base-model {base}'s depth 2"),
]


@pytest.mark.parametrize("argv, message", LAYER_CASES, ids=[m[:40] for _, m in LAYER_CASES])
def test_layer_flags_are_checked_against_the_model_configs_before_any_work(capsys, tmp_path, monkeypatch, argv, message):
    """--stage all used to fine-tune the teacher first and only then find the student's layers impossible."""
    from transformers import BertConfig

    from pkd_fast import glue_files

    base = tmp_path / "base"
    BertConfig(num_hidden_layers=2).save_pretrained(base)  # a config is all the check reads

    def no_work(*_):
        raise AssertionError("data was read before the layer flags were checked")

    monkeypatch.setattr(glue_files, "load_glue", no_work)
    argv = [a.format(base=base) for a in argv]
    assert_one_line_error(capsys, [*argv, "--glue-dir", str(tmp_path), "--output-dir", str(tmp_path / "out")],
                          message.format(base=base))


def test_an_lr_in_the_deepspeed_json_is_replaced_with_one_log_line(tmp_path, caplog):
    from pkd_fast.config import Config
    from pkd_fast.recipes import common

    path = ds_file(tmp_path, optimizer={"type": "AdamW", "params": {"lr": 0.001}})
    cfg = Config(deepspeed=path, lr=3e-5, teacher_lr=1e-4, glue_dir=str(tmp_path), output_dir=str(tmp_path / "out"))
    with caplog.at_level("INFO", logger="pkd_fast"):
        common.start(cfg)
    lines = [r.getMessage() for r in caplog.records if "replaces" in r.getMessage()]
    assert lines == [f"{path}: the run replaces the JSON's optimizer.params.lr 0.001 → --lr 3e-05 (the teacher's: --teacher-lr 0.0001)"]
