"""--precision: what runs on a GPU with and without bf16, on a CPU that computes bf16 natively or emulates it,
what an explicit flag does, and the DeepSpeed sections each choice writes (pkd_fast.precision)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pkd_fast import deepspeed_json, engines
from pkd_fast import precision
from pkd_fast.dist import init_distributed
from pkd_fast.errors import PkdError
from pkd_fast.precision import CpuBf16Probe, apply_precision, describe_device, resolve_precision
from pkd_fast.train import main

REPO = Path(__file__).resolve().parents[1]
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}  # an AVX-512 box held to an AVX2 one's bf16


def shipped(name: str) -> dict:
    return deepspeed_json.read_ds_config(str(REPO / "ds_configs" / name))


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA device whose bf16 support the test sets: `gpu(True)`."""
    def make(bf16: bool):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "NVIDIA Test GPU")
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    return make


@pytest.fixture
def cpu_probe(monkeypatch):
    """A CPU whose bf16 probe the test sets: `cpu_probe("AVX2", False, None)`."""
    def make(capability: str, mkldnn_bf16: bool, slowdown: float | None):
        monkeypatch.setattr(precision, "probe_cpu_bf16", lambda: CpuBf16Probe(capability, mkldnn_bf16, slowdown))
    return make


def test_gpu_with_bf16_runs_the_jsons_bf16(gpu):
    gpu(True)
    device = describe_device(CUDA)
    assert {k: device[k] for k in ("kind", "name", "gpu", "bf16_native")} == {
        "kind": "cuda", "name": "NVIDIA Test GPU", "gpu": "NVIDIA Test GPU", "bf16_native": True}
    assert device["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    choice = resolve_precision("auto", CUDA, shipped("zero2.json"))
    assert (choice.precision, choice.asked, choice.notice) == ("bf16", "bf16", None)
    assert resolve_precision("auto", CUDA).precision == "bf16"  # nothing asked: the fastest native precision


def test_gpu_without_bf16_runs_fp16_with_dynamic_loss_scaling_and_says_so(gpu):
    gpu(False)
    config = shipped("zero2.json")
    choice = resolve_precision("auto", CUDA, config)
    assert choice.precision == "fp16" and "asks for bf16; running fp16" in choice.notice
    assert "--precision bf16 forces bf16" in choice.notice and "\n" not in choice.notice
    applied = apply_precision(config, choice)
    assert applied["bf16"]["enabled"] is False and applied["fp16"]["enabled"] is True and applied["fp16"]["loss_scale"] == 0
    assert deepspeed_json.train_dtype(applied) == torch.float16  # the live teacher and the cache follow
    assert config["bf16"]["enabled"] is True  # a new dict: the JSON as read is untouched
    # cpu.json's form, fp32 weights under autocast, stays: without ZeRO DeepSpeed gives it a GradScaler
    autocast = apply_precision(shipped("cpu.json"), resolve_precision("auto", CUDA, shipped("cpu.json")))
    assert autocast["torch_autocast"] == {"enabled": True, "dtype": "float16"} and "fp16" not in autocast
    # under ZeRO it would get none: the fp16 section instead
    zero2_autocast = {**shipped("cpu.json"), "zero_optimization": {"stage": 2}}
    applied = apply_precision(zero2_autocast, choice)
    assert applied["torch_autocast"]["enabled"] is False and applied["fp16"]["enabled"] is True


def test_cpu_with_native_bf16_keeps_the_jsons_bf16(cpu_probe):
    cpu_probe("AVX512", True, 0.4)
    assert describe_device(CPU)["bf16_native"] is True
    for name, section in (("cpu.json", "torch_autocast"), ("zero2.json", "bf16")):
        choice = resolve_precision("auto", CPU, shipped(name))
        assert (choice.precision, choice.notice) == ("bf16", None)
        assert apply_precision(shipped(name), choice)[section]["enabled"] is True


@pytest.mark.parametrize("probe", [("AVX2", False, None), ("AVX512", True, 30.0)], ids=["no-onednn-bf16", "flag-lies"])
def test_cpu_that_emulates_bf16_runs_fp32_and_says_so_in_one_line(cpu_probe, probe):
    cpu_probe(*probe)
    config = shipped("cpu.json")
    choice = resolve_precision("auto", CPU, config)
    assert choice.precision == "fp32" and choice.asked == "bf16"
    notice = choice.notice
    assert "\n" not in notice and "asks for bf16; running fp32" in notice and "--precision bf16 forces bf16" in notice
    assert f"ATen capability {probe[0]}" in notice
    applied = apply_precision(config, choice)
    assert applied["torch_autocast"]["enabled"] is False and deepspeed_json.train_dtype(applied) == torch.float32


def test_the_probe_needs_the_matmul_to_be_fast_not_just_the_flag():
    assert CpuBf16Probe("AVX512", True, 0.4).native
    assert not CpuBf16Probe("AVX512", True, precision.BF16_SLOWDOWN_LIMIT * 1.5).native
    assert not CpuBf16Probe("AVX512", False, None).native
    assert precision.probe_cpu_bf16() is precision.probe_cpu_bf16()  # measured once per process


def test_an_explicit_precision_wins(cpu_probe, gpu):
    cpu_probe("AVX512", True, 0.4)
    fp32 = resolve_precision("fp32", CPU, shipped("cpu.json"))
    assert fp32.precision == "fp32" and fp32.notice is None
    assert deepspeed_json.train_dtype(apply_precision(shipped("cpu.json"), fp32)) == torch.float32
    fp32_json = {**shipped("zero2.json"), "bf16": {"enabled": False}}
    bf16 = resolve_precision("bf16", CPU, fp32_json)
    assert apply_precision(fp32_json, bf16)["bf16"]["enabled"] is True and bf16.notice is None
    # emulated bf16 runs only when asked by the flag, and says it is emulated
    cpu_probe("AVX2", False, None)
    forced = resolve_precision("bf16", CPU, shipped("cpu.json"))
    assert forced.precision == "bf16" and "emulates it" in forced.notice and "\n" not in forced.notice
    gpu(True)
    assert resolve_precision("fp16", CUDA, shipped("zero2.json")).precision == "fp16"


def test_fp16_on_a_cpu_without_deepspeed_support_is_refused_or_falls_back(cpu_probe, monkeypatch):
    cpu_probe("AVX512", True, 0.4)
    monkeypatch.setattr(precision, "cpu_fp16_supported", lambda: False)
    with pytest.raises(PkdError, match=r"^--precision fp16: DeepSpeed's CPU accelerator has no fp16"):
        resolve_precision("fp16", CPU, shipped("cpu.json"))
    choice = resolve_precision("auto", CPU, shipped("zero2_fp16.json"))
    assert choice.precision == "fp32" and "fp16 cannot be forced here" in choice.notice


def test_deepspeed_refuses_fp16_on_a_cpu_where_the_probe_says_so():
    """The refusal above mirrors DeepSpeed's own: it raises at initialize where its CPU accelerator has no fp16."""
    if precision.cpu_fp16_supported():
        pytest.skip("this CPU has fp16 in DeepSpeed's CPU accelerator (AVX512-FP16 / AMX-FP16)")
    init_distributed()
    config = {"train_micro_batch_size_per_gpu": 1, "fp16": {"enabled": True},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    with pytest.raises(ValueError, match="fp16 is not supported"):
        engines.student_engine(torch.nn.Linear(2, 2), config)


def test_a_bad_precision_is_one_error_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--precision", "fp8", "--output-dir", str(tmp_path)])
    [line] = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # argparse: usage, then this
    assert exit_info.value.code == 2 and "argument --precision: invalid choice: 'fp8'" in line
    with pytest.raises(PkdError, match="--precision must be one of auto, fp32, bf16, fp16, got 'fp8'"):
        resolve_precision("fp8", CPU)


_RESOLVE = """
import json, torch
from pkd_fast import deepspeed_json
from pkd_fast.precision import resolve_precision
choice = resolve_precision("auto", torch.device("cpu"), deepspeed_json.read_ds_config("ds_configs/cpu.json"))
print(json.dumps({"precision": choice.precision, "notice": choice.notice}))
"""


def _resolve_in_a_fresh_process(env: dict) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in AVX2_ENV}
    proc = subprocess.run([sys.executable, "-c", _RESOLVE], cwd=REPO, env={**clean, **env}, capture_output=True,
                          text=True, timeout=120, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_an_avx2_cpu_really_runs_fp32_and_a_native_one_bf16():
    """The real probe, no monkeypatching: held to AVX2 by the environment, bf16 is emulated and the run is
    fp32 with the notice; without those variables a native CPU keeps bf16."""
    held = _resolve_in_a_fresh_process(AVX2_ENV)
    assert held["precision"] == "fp32"
    assert "asks for bf16; running fp32" in held["notice"] and "--precision bf16 forces bf16" in held["notice"]
    if not precision.probe_cpu_bf16().native:
        pytest.skip(f"this CPU emulates bf16 itself ({precision.probe_cpu_bf16().describe()}): no native half to check")
    assert _resolve_in_a_fresh_process({}) == {"precision": "bf16", "notice": None}


# -- native is not the same as faster: the run's own step decides (issue #33) ------------------------------

@pytest.mark.parametrize("fp32_ms, bf16_ms, runs", [(100.0, 95.0, "fp32"), (100.0, 80.0, "bf16"), (110.0, 100.0, "bf16")])
def test_native_bf16_runs_only_where_the_runs_step_is_at_least_10_percent_faster(cpu_probe, fp32_ms, bf16_ms, runs):
    cpu_probe("AVX512", True, 0.9)
    hardware = {**describe_device(CPU), "bf16_run_probe": {"fp32_ms": fp32_ms, "bf16_ms": bf16_ms}}
    choice = resolve_precision("auto", CPU, shipped("cpu.json"), hardware=hardware)
    assert choice.precision == runs
    times = f"took {bf16_ms:.0f} ms in bf16, {fp32_ms:.0f} ms in fp32"
    if runs == "fp32":  # one line saying both times
        assert "\n" not in choice.notice and times in choice.notice and "natively but not faster" in choice.notice
    else:
        assert choice.notice is None and times in choice.reason
    assert resolve_precision("bf16", CPU, shipped("cpu.json"), hardware=hardware).precision == "bf16"  # a flag still wins


def tiny_bert(layers: int):
    from transformers import BertConfig

    return BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                      max_position_embeddings=64)


def test_the_run_probe_times_a_shape_once_per_machine_and_survives_a_damaged_cache(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PKD_FAST_CACHE", str(tmp_path))
    first = precision.probe_run_step(tiny_bert(4), tiny_bert(2), 4, 16)
    assert first.fp32_ms > 0 and first.bf16_ms > 0
    cache = tmp_path / precision.RUN_PROBE_CACHE
    assert len(json.loads(cache.read_text())) == 1

    def no_clock():
        raise AssertionError("measured again")

    with monkeypatch.context() as m:
        m.setattr(precision.time, "perf_counter", no_clock)
        assert precision.probe_run_step(tiny_bert(4), tiny_bert(2), 4, 16) == first  # read back, not timed
    assert precision.probe_run_step(tiny_bert(4), tiny_bert(2), 8, 16) != first or len(json.loads(cache.read_text())) == 2
    cache.write_text('{"truncated": ')  # a damaged file is measured again and rewritten
    again = precision.probe_run_step(tiny_bert(4), tiny_bert(2), 4, 16)
    assert again.fp32_ms > 0 and len(json.loads(cache.read_text())) == 1
    assert [r.message for r in caplog.records if "unreadable" in r.message and "timing this run's step again" in r.message]
