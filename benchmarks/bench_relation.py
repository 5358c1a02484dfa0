"""MiniLMv2 relation loss: the fused Triton kernel against the eager spec and torch.compile, forward +
backward time and peak memory, through the harness; each contender's value checked against the spec.

    python -m benchmarks.bench_relation [--device cuda|cpu] [--quick]

Grid (issue #22): B ∈ {32, 256}, T ∈ {128, 512}, R ∈ {12, 48}, H ∈ {384, 768} (student and teacher alike),
bf16 on CUDA, with the goal at B = 256, T = 512: peak memory ≤ 1/10 of eager's and time ≤ eager's. The
eager spec saves about 2.5 fp32 [B, R, T, T] tensors per relation type for backward (measured: 10 bytes
per [B, R, T, T] entry for the three types together) and holds more at its peak, so at B = 256, T = 512, R = 48 it saves
~100 GB: a row that runs out of memory records its error. On this CPU the grid is scaled down to B = 8,
T = 128, R = 12 for eager and compile (eager takes over a second a call there on 2 shared cores), and the
fused kernel runs only at one tiny shape under the Triton interpreter (marked: correctness, not speed).
`saved_mb`, measured on every device, is what autograd keeps between forward and backward
(saved_tensors_hooks): the O(T²) the kernel avoids.
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass

import torch

from benchmarks import harness
from pkd_fast.losses import relation_loss, relation_loss_reference

IMPLS = ("eager", "compile", "triton")
GOAL_SHAPE = (256, 512)  # (B, T) where the goal is judged
LOSS_TOL, GRAD_TOL = 1e-3, 2e-2  # vs the fp32 spec: bf16 inputs round the gradient once

CUDA_GRID = [dict(batch=b, seq_len=t, n_heads=r, hidden=h) for b, t, r, h in itertools.product((32, 256), (128, 512), (12, 48), (384, 768))]
CUDA_QUICK = [dict(batch=32, seq_len=128, n_heads=12, hidden=384), dict(batch=256, seq_len=512, n_heads=12, hidden=768)]
CPU_GRID = [dict(batch=8, seq_len=128, n_heads=12, hidden=h) for h in (384, 768)]
CPU_INTERPRETER = dict(batch=2, seq_len=32, n_heads=2, hidden=32)  # the interpreter runs programs serially
CPU_NOTES = [
    "CPU notes: a shared 2-core machine with other jobs running, so times are noisy (the contenders take",
    "turns per repetition, so their ratio holds better than their absolute values). The issue's grid is",
    "scaled down to B=8, T=128, R=12 for time (eager takes over a second a call here); its top, B=256,",
    "T=512, R=48, would have eager save ~100 GB (10 bytes per [B, R, T, T] entry, measured as `saved`). The",
    "fused row runs under the Triton interpreter at a tiny shape, for its value check and saved memory only.",
]


@dataclass(frozen=True)
class Case:
    batch: int
    seq_len: int
    n_heads: int
    hidden: int
    dtype: torch.dtype
    impls: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"B={self.batch} T={self.seq_len} R={self.n_heads} H={self.hidden}"

    @property
    def set_bytes(self) -> int:
        return 2 * 3 * self.batch * self.seq_len * self.hidden * self.dtype.itemsize

    def draw(self, device: torch.device):
        """One fresh (student, teacher, mask) set: [3, B, T, H] stacks, sequences of random real lengths."""

        def one_set(gen):
            shape = (3, self.batch, self.seq_len, self.hidden)
            s = torch.randn(shape, generator=gen, device=device).to(self.dtype).requires_grad_()
            t = torch.randn(shape, generator=gen, device=device).to(self.dtype)
            lengths = torch.randint(self.seq_len // 2, self.seq_len + 1, (self.batch,), generator=gen, device=device)
            mask = (torch.arange(self.seq_len, device=device)[None, :] < lengths[:, None]).long()
            return s, t, mask

        return one_set


def grid(device: torch.device, quick: bool) -> list[Case]:
    if device.type == "cuda":
        return [Case(**shape, dtype=torch.bfloat16, impls=IMPLS) for shape in (CUDA_QUICK if quick else CUDA_GRID)]
    impls = ("eager", "compile")
    return [Case(**shape, dtype=torch.bfloat16, impls=impls) for shape in CPU_GRID] + [
        Case(**CPU_INTERPRETER, dtype=torch.bfloat16, impls=("eager", "triton"))
    ]


def forward_backward(impl: str, n_heads: int):
    def call(s, t, mask):
        s.grad = None
        loss = relation_loss(s, t, mask, n_heads, impl=impl)
        loss.backward()
        return loss

    return call


def saved_mb(impl: str, args: tuple, n_heads: int) -> float:
    """MiB of tensors autograd keeps from forward for backward (storage counted once)."""
    storages = {}

    def pack(x):
        storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        relation_loss(*args, n_heads, impl=impl)
    return round(sum(storages.values()) / 2**20, 2)


def check(impl: str, args: tuple, n_heads: int) -> dict:
    """Loss and gradient against the spec on fp32 copies."""
    s, t, mask = args
    out = []
    for fn, x, y in ((lambda *a: relation_loss(*a, impl=impl), s, t), (relation_loss_reference, s.float(), t.float())):
        leaf = x.detach().clone().requires_grad_()
        loss = fn(leaf, y, mask, n_heads)
        loss.backward()
        out.append((loss.detach().float(), leaf.grad.float()))
    (loss, grad), (loss_ref, grad_ref) = out
    loss_err = ((loss - loss_ref).abs() / loss_ref.abs().clamp_min(1e-30)).item()
    grad_err = ((grad - grad_ref).norm() / grad_ref.norm().clamp_min(1e-30)).item()
    return {"loss_rel_err": harness.sig(loss_err), "grad_rel_err": harness.sig(grad_err), "ok": loss_err <= LOSS_TOL and grad_err <= GRAD_TOL}


def measure(case: Case, device: torch.device, b: harness.Budget) -> list[dict]:
    sets = harness.rotating(case.draw(device), case.set_bytes, device)
    calls = {impl: harness.cycling(forward_backward(impl, case.n_heads), sets) for impl in case.impls}
    timings = harness.time_calls(calls, device, b)
    rows = []
    for impl in case.impls:
        row = {"shape": case.label, "dtype": str(case.dtype).removeprefix("torch."), "impl": impl}
        row.update(batch=case.batch, seq_len=case.seq_len, n_heads=case.n_heads, hidden=case.hidden)
        timing = timings[impl]
        if isinstance(timing, Exception):
            row["error"] = harness.error_text(timing)
        else:
            row["time"] = timing.as_dict()
            row["peak_mb"], row["peak_extra_mb"] = harness.peak_memory_mb(calls[impl], device)
            if impl != "compile":  # hooks around a compiled graph measure the hooks, not the graph
                row["saved_mb"] = saved_mb(impl, sets[0], case.n_heads)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            try:
                row["check"] = check(impl, sets[0], case.n_heads)
            except torch.OutOfMemoryError:  # the fp32 spec needs what eager needs: at the top of the grid, too much
                row["check"] = {"ok": None, "skipped": "the fp32 spec ran out of memory"}
        row["interpreter"] = impl == "triton" and harness.interpreted(device)
        print(_line(row), flush=True)
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _line(row: dict) -> str:
    if "error" in row:
        return f"{row['shape']:32} {row['impl']:8} {row['error'][:80]}"
    extra = f" peak {row['peak_extra_mb']} MiB" if row.get("peak_extra_mb") is not None else ""
    saved = f" saved {row['saved_mb']} MiB" if "saved_mb" in row else ""
    mark = " (interpreter)" if row["interpreter"] else ""
    return f"{row['shape']:32} {row['impl']:8} {row['time']['ms']:10.3f} ms{extra}{saved} check {_verdict(row['check'])}{mark}"


def targets(rows: list[dict]) -> list[dict]:
    """The goal at B = 256, T = 512, per (R, H): fused peak ≤ eager / 10 and fused time ≤ eager's. An eager
    that ran out of memory meets both by definition of the comparison: it has no number to beat."""
    out = []
    by = {(r["shape"], r["impl"]): r for r in rows}
    for r in rows:
        if (r["batch"], r["seq_len"]) != GOAL_SHAPE or r["impl"] != "triton" or "error" in r:
            continue
        eager = by.get((r["shape"], "eager"))
        if eager is None or "error" in eager:
            out.append({"shape": r["shape"], "eager": eager["error"][:120] if eager else "not run", "ok": True})
            continue
        mem_ok = r["peak_extra_mb"] <= eager["peak_extra_mb"] / 10
        time_ok = r["time"]["ms"] <= eager["time"]["ms"]
        out.append({"shape": r["shape"], "peak_ratio": harness.sig(r["peak_extra_mb"] / eager["peak_extra_mb"]),
                    "speedup": harness.sig(eager["time"]["ms"] / r["time"]["ms"]), "ok": mem_ok and time_ok})  # fmt: skip
    return out


def _verdict(check: dict) -> str:
    return {True: "ok", False: "FAIL", None: "not checked (spec out of memory)"}[check["ok"]]


def render(results: dict) -> str:
    device = results["device"]
    lines = [
        f"# Relation loss (MiniLMv2) on {device.get('name', '?')} ({device.get('date', '')})",
        "",
        "Forward + backward of Q-Q, K-K, V-V relation KL, bf16 inputs, median ms per call. `saved` = MiB autograd",
        "keeps between forward and backward; `peak` = CUDA peak above the inputs (none on a CPU).",
        "",
        "| shape | impl | ms | p20–p80 | peak MiB | saved MiB | check |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["relation"]:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['impl']} | {r['error'][:60]} | | | | |")
            continue
        t = r["time"]
        mark = " (interpreter: not kernel speed)" if r["interpreter"] else ""
        lines.append(
            f"| {r['shape']} | {r['impl']}{mark} | {t['ms']:.3f} | {t['p20']:.3f}–{t['p80']:.3f} | "
            f"{r.get('peak_extra_mb') or '—'} | {r.get('saved_mb', '—')} | {_verdict(r['check'])} |"
        )
    if results.get("relation_targets"):
        lines += ["", "Goal at B=256, T=512 (peak ≤ 1/10 eager, time ≤ eager):", ""]
        lines += [f"- {t['shape']}: {'met' if t['ok'] else 'NOT met'} {t}" for t in results["relation_targets"]]
    lines += ["", *results.get("relation_notes", [])]
    return "\n".join(lines) + "\n"


def run(device: torch.device, quick: bool) -> dict:
    stem = "relation_cpu" if device.type == "cpu" else f"relation_{harness.device_slug(device)}"
    path = harness.RESULTS_DIR / f"{stem}.json"
    b = harness.budget(device, quick)
    rows: list[dict] = []
    for case in grid(device, quick):
        rows += measure(case, device, b)
    notes = CPU_NOTES if device.type == "cpu" else []
    results = harness.update_results(
        path, device, relation=rows, relation_targets=targets(rows) if device.type == "cuda" else None, relation_notes=notes
    )
    path.with_suffix(".md").write_text(render(results))
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when there is one")
    p.add_argument("--quick", action="store_true", help="two shapes on CUDA, shorter timing")
    args = p.parse_args(argv)
    results = run(harness.pick_device(args.device), args.quick)
    bad = [f"{r['shape']} {r['impl']}" for r in results["relation"] if "check" in r and r["check"]["ok"] is False]
    if bad:
        raise SystemExit("value check failed: " + ", ".join(bad))


if __name__ == "__main__":
    main()
