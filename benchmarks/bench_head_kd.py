"""The masked-LM KD term with the decoder fused in (`pkd_fast.head_kd`) against the dense path: peak memory
and time of forward + backward, dense = the logits materialised (student F.linear with autograd, teacher
F.linear without) + `kd_loss_reference`, fused = `head_kd_loss` (the torch chunked path on a CPU, the
Triton kernels on CUDA), both from the same rows, decoders and labels; gradients of hs, W and b.

    python -m benchmarks.bench_head_kd [--device cpu|cuda] [--quick] [--max-dense-gb 10]
        → results/head_kd_<device>.{json,md}

Grid: V ∈ {30522, 128100, 250002} (BERT, DeBERTa-v3, XLM-R), rows ∈ {1024, 4096, 16384} (masked rows a
step), student H ∈ {384, 768}, a base-size teacher (H_t = 768), fp32 on a CPU (bf16 on CUDA), α = 0.7 and
T = 10 (the recipe's defaults), every row labelled. Dense points whose [N, V] tensors would exceed
--max-dense-gb are not run; where two smaller row counts of the same (V, H) were run, the dense peak and
time at the skipped count are extrapolated linearly in N (both are affine in N: the [N, V] tensors and the
N·V·H matmuls, plus the N-free gradient of W) and marked so.

Peak memory on a CPU: the process's resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs before each call) minus the resident set before it, with glibc's mmap threshold
fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_, set by re-executing the script), so every freed tensor goes
back to the system and the mark sees each call's own allocations. On CUDA: torch's max_memory_allocated.
Timing: the harness's CPU protocol, the two contenders taking turns call by call (interleaved), median.

The goal (issue #33): at V = 250002 and 4096 rows, the fused peak ≤ 1/8 of the dense one at ≤ 1.1× its time.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import harness
from pkd_fast.config import Config
from pkd_fast.head_kd import DenseHead, blocks, head_kd_loss
from pkd_fast.losses import kd_loss_reference

VOCABS = (30522, 128100, 250002)
ROWS = (1024, 4096, 16384)
HIDDEN = (384, 768)
TEACHER_HIDDEN = 768
TEMPERATURE = Config.__dataclass_fields__["temperature"].default
ALPHA = Config.__dataclass_fields__["alpha"].default
DENSE_TENSORS = 8  # [N, V] fp32 tensors the dense fwd+bwd holds at its peak (measured: ~6-7), for the skip rule
GOAL = {"vocab": 250002, "rows": 4096, "peak_frac": 1 / 8, "time_ratio": 1.1}
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
# --quick: the goal's shape at both widths (fused); dense at 512 and 1024 rows there, to extrapolate from;
# both contenders measured at 1024 rows (H = 768) and at one BERT-vocabulary point where both fit.
QUICK = [(250002, 4096, h, ("fused",)) for h in HIDDEN] + [(250002, 512, h, ("dense",)) for h in HIDDEN] + [
    (250002, 1024, 384, ("dense",)), (250002, 1024, 768, ("dense", "fused")), (30522, 4096, 768, ("dense", "fused"))]


def _status(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) / 1024  # MiB


class PeakMeter:
    """Peak memory of each call above what was in use before it (MiB)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn):
        peaks = []

        def call():
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                before = torch.cuda.memory_allocated(self.device)
                out = fn()
                torch.cuda.synchronize(self.device)
                peaks.append((torch.cuda.max_memory_allocated(self.device) - before) / 2**20)
                return out
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            before = _status("VmRSS")
            out = fn()
            peaks.append(_status("VmHWM") - before)
            return out

        call.peaks = peaks
        return call


def make_inputs(n_rows: int, vocab: int, hidden: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    hs = rand(n_rows, hidden).requires_grad_()
    W = rand(vocab, hidden, scale=hidden**-0.5).requires_grad_()
    b = rand(vocab, scale=0.1).requires_grad_()
    teacher = DenseHead(rand(n_rows, TEACHER_HIDDEN), rand(vocab, TEACHER_HIDDEN, scale=TEACHER_HIDDEN**-0.5), rand(vocab, scale=0.1))
    labels = torch.randint(0, vocab, (n_rows,), generator=gen, device=device)
    return hs, W, b, teacher, labels


def dense_step(hs, W, b, teacher, labels):
    s = F.linear(hs, W, b)
    with torch.no_grad():
        t = teacher.logits()
    loss = kd_loss_reference(s, t, TEMPERATURE, labels, ALPHA)
    return loss.detach(), torch.autograd.grad(loss, (hs, W, b))


def fused_step(hs, W, b, teacher, labels):
    loss = head_kd_loss(hs, W, b, teacher, TEMPERATURE, labels, ALPHA)
    return loss.detach(), torch.autograd.grad(loss, (hs, W, b))


STEPS = {"dense": dense_step, "fused": fused_step}


def dense_fits(n_rows: int, vocab: int, max_gb: float, itemsize: int = 4) -> bool:
    return DENSE_TENSORS * n_rows * vocab * itemsize <= max_gb * 2**30


def measure(vocab, n_rows, hidden, names, device, dtype, budget, max_dense_gb) -> list[dict]:
    """Both contenders (or `names`) at one point: a value check of the fused against the dense on the same
    inputs where both run, then interleaved timing with each call's peak memory."""
    inputs = make_inputs(n_rows, vocab, hidden, device, dtype)
    rows = {}
    calls = {}
    for name in names:
        row = rows[name] = {"contender": name, "vocab": vocab, "rows": n_rows, "hidden": hidden, "teacher_hidden": TEACHER_HIDDEN,
                            "dtype": str(dtype).removeprefix("torch.")}  # fmt: skip
        if name == "dense" and not dense_fits(n_rows, vocab, max_dense_gb, dtype.itemsize):
            row["skipped"] = f"dense needs about {DENSE_TENSORS}·N·V·{dtype.itemsize} B > {max_dense_gb:g} GB"
            continue
        if name == "fused":
            row["blocks"] = dict(zip(("block_rows", "vocab_chunk"), blocks(n_rows, vocab))) if device.type == "cpu" else "triton"
        calls[name] = PeakMeter(device)(lambda fn=STEPS[name]: fn(*inputs))
    if len(calls) == 2:
        (ld, gd), (lf, gf) = calls["dense"](), calls["fused"]()
        err = max(((a.double() - r.double()).norm() / r.double().norm()).item() for a, r in zip(gf, gd))
        rows["fused"]["check"] = {"loss_rel_err": harness.sig(abs(lf.item() - ld.item()) / abs(ld.item()), 3), "grad_rel_err": harness.sig(err, 3)}
        del ld, gd, lf, gf
    for name, timing in harness.time_calls(calls, device, budget).items():
        if isinstance(timing, Exception):
            rows[name]["error"] = harness.error_text(timing)
            continue
        rows[name]["ms"] = round(timing.ms, 1)
        rows[name]["reps"] = timing.reps
        rows[name]["peak_mib"] = round(max(calls[name].peaks), 1)
        rows[name]["peak_mib_all_calls"] = [round(p, 1) for p in calls[name].peaks]
    for row in rows.values():
        line = f"V={row['vocab']:6} N={row['rows']:5} H={row['hidden']:4} {row['contender']:6}"
        print(line, row.get("skipped") or row.get("error") or f"{row['ms'] / 1e3:8.2f} s  peak {row['peak_mib']:9.1f} MiB"
              f"  {row.get('check', '')}", flush=True)  # fmt: skip
    return list(rows.values())


def measure_goal_interleaved(hidden, device, dtype, budget, small=(512, 1024)) -> dict:
    """The goal's point with its dense extrapolation measured in the same rounds: fused at GOAL rows and dense
    at `small` rows take turns call by call (one decoder pair, the smaller batches its first rows), so a
    shared machine's load falls on the fused point and on the dense points it is compared with alike."""
    n, vocab = GOAL["rows"], GOAL["vocab"]
    hs, W, b, teacher, labels = make_inputs(n, vocab, hidden, device, dtype)
    calls = {"fused": PeakMeter(device)(lambda: fused_step(hs, W, b, teacher, labels))}
    for m in small:
        sub = (hs[:m].detach().requires_grad_(), W, b, DenseHead(teacher.hidden[:m], teacher.weight, teacher.bias), labels[:m])
        calls[f"dense@{m}"] = PeakMeter(device)(lambda sub=sub: dense_step(*sub))
    out = {"vocab": vocab, "rows": n, "hidden": hidden, "dense_rows": list(small)}
    for name, timing in harness.time_calls(calls, device, budget).items():
        out[name] = {"ms": round(timing.ms, 1), "peak_mib": round(max(calls[name].peaks), 1)} if not isinstance(timing, Exception) else {
            "error": harness.error_text(timing)}
    a, c = out[f"dense@{small[0]}"], out[f"dense@{small[1]}"]
    if "ms" in a and "ms" in c and "ms" in out["fused"]:
        est = {k: round(c[k] + (c[k] - a[k]) / (small[1] - small[0]) * (n - small[1]), 1) for k in ("ms", "peak_mib")}
        out["dense_extrapolated"] = est
        out["peak_frac"] = harness.sig(out["fused"]["peak_mib"] / est["peak_mib"], 3)
        out["time_ratio"] = harness.sig(out["fused"]["ms"] / est["ms"], 3)
        out["met"] = out["peak_frac"] <= GOAL["peak_frac"] and out["time_ratio"] <= GOAL["time_ratio"]
    print("goal, interleaved:", out, flush=True)
    return out


def extrapolate(rows: list[dict]) -> list[dict]:
    """Dense rows at skipped or unmeasured row counts, from the two largest measured counts of the same (V, H)."""
    out = []
    wanted = {(r["vocab"], r["hidden"], r["rows"]) for r in rows if r["contender"] == "fused" and "ms" in r}
    for vocab, hidden, n in sorted(wanted):
        if any(r["contender"] == "dense" and (r["vocab"], r["hidden"], r["rows"]) == (vocab, hidden, n) and "ms" in r for r in rows):
            continue
        known = sorted((r["rows"], r) for r in rows if r["contender"] == "dense" and (r["vocab"], r["hidden"]) == (vocab, hidden) and "ms" in r)
        if len(known) < 2:
            continue
        (n0, a), (n1, b) = known[-2], known[-1]

        def line(key):
            slope = (b[key] - a[key]) / (n1 - n0)
            return round(b[key] + slope * (n - n1), 1)

        out.append({"contender": "dense", "vocab": vocab, "rows": n, "hidden": hidden, "teacher_hidden": TEACHER_HIDDEN,
                    "dtype": a["dtype"], "ms": line("ms"), "peak_mib": line("peak_mib"),
                    "extrapolated_from_rows": [n0, n1]})  # fmt: skip
    return out


def goal(rows: list[dict]) -> list[dict]:
    verdicts = []
    for hidden in HIDDEN:
        pick = {r["contender"] + ("~" if "extrapolated_from_rows" in r else ""): r for r in rows
                if (r["vocab"], r["rows"], r["hidden"]) == (GOAL["vocab"], GOAL["rows"], hidden) and "ms" in r}  # fmt: skip
        fused, dense = pick.get("fused"), pick.get("dense") or pick.get("dense~")
        if not fused or not dense:
            continue
        peak_frac, time_ratio = fused["peak_mib"] / dense["peak_mib"], fused["ms"] / dense["ms"]
        verdicts.append({
            "vocab": GOAL["vocab"], "rows": GOAL["rows"], "hidden": hidden, "dense_extrapolated": "dense" not in pick,
            "peak_frac": harness.sig(peak_frac, 3), "time_ratio": harness.sig(time_ratio, 3),
            "met": peak_frac <= GOAL["peak_frac"] and time_ratio <= GOAL["time_ratio"],
        })  # fmt: skip
    return verdicts


def render(result: dict) -> str:
    d = result["device"]
    lines = [
        "# Masked-LM KD with the decoder fused in: dense vs fused, forward + backward",
        "",
        f"`python -m benchmarks.bench_head_kd {' '.join(result['argv'])}`, {result['date']}, {d['name']} "
        f"({d.get('threads', '?')} threads, torch CPU capability {d['cpu_capability']}), torch {d['torch']}.",
        "",
        f"Dense: student logits F.linear (autograd) + teacher logits F.linear (no grad) + `kd_loss_reference`; fused: "
        f"`head_kd_loss` ({result['fused_impl']}). {result['dtype']} rows, decoders and labels, α = {ALPHA}, T = {TEMPERATURE:g}, "
        f"teacher H_t = {TEACHER_HIDDEN}, gradients of hs, W and b. Peak: {result['peak_method']}",
        "",
        f"Timing: median of {result['reps']} interleaved calls per contender (dense and fused take turns call by call). "
        "**This CPU is shared with other workers (2 cores, load average "
        f"{result['load_average'][0]:.1f}–{result['load_average'][1]:.1f} during the run): the times are noisy; the "
        "interleaving spreads the other workers' load over both contenders alike, so the ratios hold better than the times.**",
        "",
        "| V | rows | H | contender | time (s) | peak extra (MiB) | fused ÷ dense peak | fused ÷ dense time | blocks (R, C) | check vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = result["rows"] + result["extrapolated"]
    by = {}
    for r in rows:
        if "ms" in r:
            by.setdefault((r["vocab"], r["rows"], r["hidden"]), {})[r["contender"]] = r
    for r in sorted(rows, key=lambda r: (r["vocab"], r["hidden"], r["rows"], r["contender"])):
        pair = by.get((r["vocab"], r["rows"], r["hidden"]), {})
        extra = " (extrapolated from N = {}, {})".format(*r["extrapolated_from_rows"]) if "extrapolated_from_rows" in r else ""
        if "ms" not in r:
            lines.append(f"| {r['vocab']} | {r['rows']} | {r['hidden']} | {r['contender']} | not run: {r.get('skipped') or r.get('error')} | | | | | |")
            continue
        ratio_p = ratio_t = ""
        if r["contender"] == "fused" and "dense" in pair:
            ratio_p = f"{r['peak_mib'] / pair['dense']['peak_mib']:.3f}"
            ratio_t = f"{r['ms'] / pair['dense']['ms']:.2f}"
        blocks_ = r.get("blocks")
        blocks_ = f"{blocks_['block_rows']}, {blocks_['vocab_chunk']}" if isinstance(blocks_, dict) else (blocks_ or "")
        check = r.get("check")
        check = f"loss {check['loss_rel_err']:.1e}, grad {check['grad_rel_err']:.1e}" if check else ""
        lines.append(f"| {r['vocab']} | {r['rows']} | {r['hidden']} | {r['contender']}{extra} | {r['ms'] / 1e3:.2f} | "
                     f"{r['peak_mib']:.0f} | {ratio_p} | {ratio_t} | {blocks_} | {check} |")  # fmt: skip
    lines += ["", f"**Goal** (issue #33): at V = {GOAL['vocab']} and {GOAL['rows']} rows, fused peak ≤ 1/8 of dense at ≤ {GOAL['time_ratio']}× its time.", ""]
    for v in result["goal"]:
        lines.append(f"- H = {v['hidden']}: peak {v['peak_frac']:.3f} of dense, time {v['time_ratio']:.2f}× dense"
                     f"{' (dense extrapolated, see above)' if v['dense_extrapolated'] else ''}: **{'met' if v['met'] else 'not met'}**.")
    if not result["goal"]:
        lines.append("- not measured in this run.")
    for g in result.get("goal_interleaved", []):
        if "met" not in g:
            continue
        d0, d1 = (g[f"dense@{m}"] for m in g["dense_rows"])
        lines.append(f"- H = {g['hidden']}, **measured interleaved** (`--goal-interleaved`: fused at {g['rows']} rows taking turns with "
                     f"dense at {g['dense_rows'][0]} and {g['dense_rows'][1]} rows in the same rounds, dense extrapolated from those): "
                     f"fused {g['fused']['ms'] / 1e3:.1f} s, {g['fused']['peak_mib']:.0f} MiB; dense {d0['ms'] / 1e3:.1f} s / "
                     f"{d1['ms'] / 1e3:.1f} s, {d0['peak_mib']:.0f} / {d1['peak_mib']:.0f} MiB → {g['dense_extrapolated']['ms'] / 1e3:.1f} s, "
                     f"{g['dense_extrapolated']['peak_mib']:.0f} MiB at {g['rows']}: peak {g['peak_frac']:.3f} of dense, time "
                     f"{g['time_ratio']:.2f}× dense: **{'met' if g['met'] else 'not met'}**.")  # fmt: skip
    lines += ["", *result.get("notes", [])]
    return "\n".join(lines)


def main(argv=None) -> None:
    global TEACHER_HIDDEN
    p = harness.parser(__doc__, quick="the goal's shape and a few points (see QUICK)")
    p.add_argument("--max-dense-gb", type=float, default=10.0, help="skip dense points whose [N, V] tensors would exceed this")
    p.add_argument("--reps", type=int, default=None, help="timed calls per contender (default 2 quick, 3 full)")
    p.add_argument("--points", default=None, help="only these points, V:rows:H[,...] (both contenders)")
    p.add_argument("--goal-interleaved", type=int, action="append", default=[], metavar="H",
                   help="measure the goal's point at student width H with its dense extrapolation interleaved; keeps the previous rows of the results file")
    p.add_argument("--teacher-hidden", type=int, default=768, help="the teacher's H_t (default 768, a base-size teacher)")
    args = p.parse_args(argv)
    device = harness.pick_device(args.device)
    if device.type == "cpu" and any(os.environ.get(k) != v for k, v in MMAP_ENV.items()):
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.bench_head_kd", *(sys.argv[1:] if argv is None else argv)],
                  {**os.environ, **MMAP_ENV})  # fmt: skip
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    reps = args.reps or (2 if args.quick else 3)
    budget = harness.Budget(warmup_ms=0, rep_ms=0, min_reps=reps, warmup_calls=0)
    points = QUICK if args.quick else [(v, n, h, ("dense", "fused")) for v in VOCABS for h in HIDDEN for n in ROWS]
    if args.points:
        points = [(*map(int, p.split(":")), ("dense", "fused")) for p in args.points.split(",")]
    TEACHER_HIDDEN = args.teacher_hidden
    stem = harness.RESULTS_DIR / f"head_kd_{harness.device_slug(device)}"
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "argv": list(sys.argv[1:] if argv is None else argv),
        "device": harness.describe(device), "dtype": str(dtype).removeprefix("torch."), "reps": reps,
        "fused_impl": "the torch chunked path, pkd_fast.head_kd" if device.type == "cpu" else "the Triton kernels, kernels/mlm_head_kd.py",
        "peak_method": ("resident-set high-water mark (VmHWM after clear_refs) minus the resident set before the call, glibc "
                        "mmap threshold 64 KiB; the largest over the timed calls" if device.type == "cpu"
                        else "torch.cuda.max_memory_allocated minus memory_allocated before the call"),
        "rows": [], "extrapolated": [], "goal": [], "load_average": [os.getloadavg()[0]] * 2,
    }  # fmt: skip
    start = time.time()
    if args.goal_interleaved:
        previous = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").is_file() else None
        result = previous or result
        result["goal_interleaved"] = [g for g in result.get("goal_interleaved", []) if g["hidden"] not in args.goal_interleaved]
        for hidden in args.goal_interleaved:
            result["goal_interleaved"].append(measure_goal_interleaved(hidden, device, dtype, budget))
            result.setdefault("runs", []).append({"argv": list(sys.argv[1:] if argv is None else argv),
                                                  "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                                  "load_average_end": os.getloadavg()[0]})  # fmt: skip
            stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
            stem.with_suffix(".md").write_text(render(result) + "\n")
        print(render(result))
        return
    for vocab, n_rows, hidden, names in points:
        result["rows"] += measure(vocab, n_rows, hidden, names, device, dtype, budget, args.max_dense_gb)
        load = os.getloadavg()[0]
        result["load_average"] = [min(result["load_average"][0], load), max(result["load_average"][1], load)]
        result["extrapolated"] = extrapolate(result["rows"])
        result["goal"] = goal(result["rows"] + result["extrapolated"])
        result["wall_s"] = round(time.time() - start)
        stem.parent.mkdir(parents=True, exist_ok=True)  # written after every point: a run cut short keeps what it measured
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        stem.with_suffix(".md").write_text(render(result) + "\n")
    print(render(result))


if __name__ == "__main__":
    main()
