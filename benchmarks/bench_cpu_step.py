"""Where a CPU FT step's time goes: the student engine built from each DeepSpeed setting, one change at a
time, against plain PyTorch loops of the same model, all in one process taking turns step by step.

    python -m benchmarks.bench_cpu_step [--reps 8]        (OMP_NUM_THREADS=1 on a shared machine)

The model is the trainer's 3-layer MiniLM student (17.4M parameters, 11.7M of them the word embeddings,
whose gradient is dense), batch 32 × length 64, random tokens. A step is forward (HF's CE loss), backward,
optimizer step; the DeepSpeed variants go through pkd_fast.engines.student_engine, as the trainer does.
Time is the process's CPU seconds per step (on one thread, the step's cost even while other processes share
the cores), the median of --reps rounds after 2 warm-up steps. Results: benchmarks/results/cpu_step.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks import harness
from pkd_fast import deepspeed_json, engines
from pkd_fast.config import REPO_ROOT, default_teacher
from pkd_fast.dist import init_distributed
from pkd_fast.models import build_student, load_classifier
from pkd_fast.tasks import get_task

BATCH, SEQ, LAYERS = 32, 64, 3


def ds_variant(name: str, **change) -> dict:
    """A shipped config with `change` applied: fused AdamW, ZeRO stage, autocast off, self-reduce back on."""
    config = deepspeed_json.read_ds_config(str(REPO_ROOT / "ds_configs" / name))
    config.pop("scheduler")
    config["tensorboard"] = {"enabled": False}
    if change.get("fused") is not None:
        config["optimizer"]["params"]["fused"] = change["fused"]
    return {"config": deepspeed_json.resolve_ds_config(config, lr=1e-4, total_steps=100, warmup_steps=0, tensorboard_dir=Path("unused")),
            "self_reduce": change.get("self_reduce", False)}


VARIANTS = {
    "zero2.json: bf16 ZeRO-2, torch AdamW (single-tensor)": ds_variant("zero2.json"),
    "zero2.json + fused AdamW": ds_variant("zero2.json", fused=True),
    "ZeRO-0, fp32 weights, bf16 autocast, torch AdamW (single-tensor)": ds_variant("cpu.json", fused=False),
    "+ fused AdamW (DeepSpeed's self-all-reduce still on)": ds_variant("cpu.json", self_reduce=True),
    "cpu.json: + no self-all-reduce on one rank": ds_variant("cpu.json"),
    "plain loop: fp32 weights, bf16 autocast, fused AdamW, clip": {"plain": "autocast"},
    "plain loop: bf16 weights, fused AdamW, clip": {"plain": "bf16"},
    "plain loop: fp32, fused AdamW, clip": {"plain": "fp32"},
}


def batches(n: int = 4) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1000, 30000, (BATCH, SEQ), generator=gen), "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
             "labels": torch.randint(0, 2, (BATCH,), generator=gen)} for _ in range(n)]


def make_step(variant: dict, student: torch.nn.Module, data: list[dict]):
    model = copy.deepcopy(student)
    it = iter(range(1 << 62))
    if "plain" in variant:
        if variant["plain"] == "bf16":
            model = model.to(torch.bfloat16)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
        amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant["plain"] == "autocast")

        def plain_step():
            with amp:
                loss = model(**data[next(it) % len(data)]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return plain_step

    engine = engines.student_engine(model, variant["config"])
    if variant["self_reduce"]:
        engine.enable_backward_allreduce = True  # DeepSpeed's own default, which student_engine turns off

    def engine_step():
        loss = engine(**data[next(it) % len(data)]).loss
        engine.backward(loss)
        engine.step()
    return engine_step


def run(reps: int) -> dict:
    init_distributed()
    task = get_task("sst2")
    torch.manual_seed(0)
    student = build_student(load_classifier(default_teacher(), task), LAYERS, task)
    data = batches()
    steps = {name: make_step(v, student, data) for name, v in VARIANTS.items()}
    for step in steps.values():
        step(), step()
    cpu = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            t0 = time.process_time()
            step()
            cpu[name].append(time.process_time() - t0)
    ms = {name: round(1e3 * statistics.median(v), 1) for name, v in cpu.items()}
    plain = ms["plain loop: fp32 weights, bf16 autocast, fused AdamW, clip"]
    return {"device": harness.describe(torch.device("cpu")), "batch": BATCH, "seq": SEQ, "student_layers": LAYERS,
            "parameters": sum(p.numel() for p in student.parameters()), "reps": reps,
            "rows": {name: {"cpu_ms": v, "vs_plain_autocast": round(v / plain, 2)} for name, v in ms.items()}}


def render(results: dict) -> str:
    d = results["device"]
    lines = [f"# A CPU FT step, setting by setting ({d['name']}, {d['date'][:10]}, {d.get('threads')} thread(s))", "",
             f"{results['student_layers']}-layer MiniLM student ({results['parameters'] / 1e6:.1f}M parameters), batch "
             f"{results['batch']} × length {results['seq']}; CPU ms per step, median of {results['reps']} interleaved rounds.", "",
             "| step | CPU ms | × plain autocast loop |", "|---|---|---|"]
    lines += [f"| {name} | {r['cpu_ms']:.1f} | {r['vs_plain_autocast']:.2f} |" for name, r in results["rows"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=8)
    results = run(p.parse_args(argv).reps)
    stem = harness.RESULTS_DIR / "cpu_step"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    stem.with_suffix(".md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
