"""The README's two commands, timed as a newcomer runs them, on each kind of CPU (issue #19):

    python -m benchmarks.bench_commands [--kinds native,avx2] [--commands main,tests]

  main   the main job on its default: `deepspeed pkd_fast/train.py --deepspeed ds_configs/zero2.json
         --preset quick` (teacher fine-tune, FT/KD/PKD-Skip students, evaluation), into a fresh
         --output-dir; the pip steps are left out (they are a download, not pkd_fast)
  tests  the test command's `python -m pytest -q -n 2 --dist loadfile` (two workers, a file each at a time)

CPU kinds. `native` is the machine as it is. `avx2` holds oneDNN and ATen to AVX2
(`ONEDNN_MAX_CPU_ISA=AVX2`, `ATEN_CPU_CAPABILITY=avx2`), which is what most cloud VMs and laptops are:
bf16 is then emulated (a 2048×384×1536 matmul ~30-100× slower than fp32) while fp32 keeps AVX2 speed.
On a box that is AVX2-only already, both kinds are the same machine. Each child reports the capability
and the bf16 check it saw, so the table says what really ran.

Results: benchmarks/results/commands_cpu.{json,md}, one row per kind × command, written after each row.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import harness

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {
    "main": ["deepspeed", "pkd_fast/train.py", "--deepspeed", "ds_configs/zero2.json", "--preset", "quick"],
    "tests": [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadfile", "-p", "no:cacheprovider"],
}
SEEN = ("cpu_capability", "bf16_native", "bf16_slowdown", "auto_precision")  # what each row says of its CPU


def child_env(kind: str, glue_dir: str) -> dict:
    return {**os.environ, **harness.CPU_KINDS[kind], "GLUE_DIR": glue_dir, "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def run_command(name: str, env: dict, log: Path) -> dict:
    """Wall seconds of one command, its exit code and what it said at the end (pytest's count line, or
    the students' table and training seconds of the main job)."""
    cmd = list(COMMANDS[name])
    with tempfile.TemporaryDirectory(prefix="bench_commands_") as out:
        if name == "main":
            cmd += ["--output-dir", out]
        start = time.perf_counter()
        with log.open("w") as f:
            rc = subprocess.run(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
        row = {"command": " ".join(COMMANDS[name]), "exit_code": rc, "wall_s": round(time.perf_counter() - start, 1)}
        if name == "main" and (Path(out) / "results.json").is_file():
            results = json.loads((Path(out) / "results.json").read_text())
            row["train_s"] = round(sum(r.get("train_seconds", 0.0) for r in results["runs"].values()), 1)
            row["precision"] = results["device"]["precision"]
    text = log.read_text(errors="replace")
    if name == "tests":
        counts = re.findall(r"^=*\s*(\d+ passed.*?) in [\d.]+s", text, re.M)
        row["pytest"] = counts[-1] if counts else None
    return row


def render(results: dict) -> str:
    dev = results["device"]
    lines = [f"# The README's commands on each CPU kind ({dev['name']}, {dev['date'][:10]})", "",
             "| CPU kind | capability | bf16 native | auto precision | command | minutes | exit | detail |",
             "|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        detail = row.get("pytest") or (f"students+teacher train {row['train_s']} s, ran {row.get('precision')}"
                                       if "train_s" in row else "")
        lines.append(f"| {row['kind']} | {row['cpu_capability']} | {row['bf16_native']} | {row['auto_precision']} | "
                     f"{row['name']} | {row['wall_s'] / 60:.1f} | {row['exit_code']} | {detail} |")
    lines += ["", f"Threads: {dev.get('threads')}. Commands: " + "; ".join(f"`{k}`: `{' '.join(v if k == 'main' else v[1:])}`"
                                                                          for k, v in COMMANDS.items()), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", default="native,avx2", help=f"comma-separated subset of {sorted(harness.CPU_KINDS)}")
    p.add_argument("--commands", default="main,tests", help=f"comma-separated subset of {sorted(COMMANDS)}")
    p.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR"), help="classic glue_data/ folder (default $GLUE_DIR)")
    p.add_argument("--out", default=str(harness.RESULTS_DIR / "commands_cpu"), help="results stem (.json/.md added)")
    p.add_argument("--logs", default=str(REPO / "outputs" / "bench_commands"), help="each command's output")
    args = p.parse_args(argv)
    kinds, names = args.kinds.split(","), args.commands.split(",")
    bad = [k for k in kinds if k not in harness.CPU_KINDS] + [n for n in names if n not in COMMANDS]
    if bad or not args.glue_dir:
        raise SystemExit(f"error: unknown kind or command {bad}" if bad else "error: --glue-dir (or GLUE_DIR) is required")
    stem = Path(args.out)
    logs = Path(args.logs)
    for folder in (stem.parent, logs):
        folder.mkdir(parents=True, exist_ok=True)
    results = {"device": harness.describe(torch.device("cpu")), "rows": []}
    for kind in kinds:
        env = child_env(kind, str(Path(args.glue_dir).resolve()))
        seen = {k: v for k, v in harness.cpu_kind_device(kind).items() if k in SEEN}
        for name in names:
            print(f"{kind} / {name} ...", flush=True)
            row = {"kind": kind, "name": name, **seen, **run_command(name, env, logs / f"{kind}_{name}.log")}
            results["rows"].append(row)
            print(f"  {row['wall_s'] / 60:.1f} min, exit {row['exit_code']}", flush=True)
            stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
            stem.with_suffix(".md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
