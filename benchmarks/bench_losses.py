"""Loss microbenchmarks: every contender of the KD and patient losses at the issue's shapes, forward and
forward+backward, through the harness; GB/s against the minimum bytes and as a fraction of the device's
copy bandwidth measured in the same run; each contender's value checked against the spec first.

    python -m benchmarks.bench_losses [--device cuda|cpu] [--quick] [--family kd-vocab ...]

Minimum bytes, one convention for every contender (E = elements of one input, elt = its element size):
forward reads student and teacher once, 2·E·elt; forward+backward also writes the student's gradient,
3·E·elt. The fused kernels already write that gradient in the forward (their backward only scales it),
so their forward time holds work the others do in backward, and their forward GB/s understates traffic.
Forward is timed with autograd recording, as in training.
"""

from __future__ import annotations

import argparse
import functools
import importlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from benchmarks import harness
from pkd_fast.config import Config
from pkd_fast.losses import kd_loss, patient_loss

TEMPERATURE = Config.__dataclass_fields__["temperature"].default  # the recipe's default T
PT_REDUCTION = "mean"  # the kernel API's default: Σ over layers of the batch-mean squared distance
PT_LAYERS = 5  # a 6-layer student's k-1 mapped pairs
VOCAB = 30522  # bert-base-uncased
INTERPRET_MAX_ROWS = 32  # the Triton interpreter takes ~20 ms a row: beyond this it only measures Python
LOSS_TOL, GRAD_TOL = 1e-3, 1e-2  # relative error vs the fp32 spec: fp32 math, bf16 gradient rounding
MODES = ("fwd", "fwd_bwd")

FAMILIES = {
    "kd-cls": f"KD term T²·KL (T={TEMPERATURE:g}, batchmean) on classification logits [N, V]",
    "kd-vocab": f"KD term T²·KL (T={TEMPERATURE:g}, batchmean) on MLM logits [N = B·S, V = {VOCAB}]",
    "pt-cls": f"patient loss ({PT_REDUCTION}) on [CLS]: {{layers}} layer pairs of [B, H]",
    "pt-tokens": f"patient loss ({PT_REDUCTION}) on every token: {{layers}} layer pairs of [B·S, H]",
}

# family → (rows, cols) per grid; rows are N (KD) or rows per layer (patient), cols V or H.
GRIDS = {
    "cuda": {
        "kd-cls": ((32, 128, 512, 2048, 4096), (2, 3)),
        "kd-vocab": ((2048, 4096, 8192, 16384, 32768), (VOCAB,)),
        "pt-cls": ((32, 128, 512, 1024), (768, 1024)),
        "pt-tokens": ((4096, 16384, 65536), (768, 1024)),
    },
    "cuda-quick": {
        "kd-cls": ((32, 4096), (2,)),
        "kd-vocab": ((8192,), (VOCAB,)),
        "pt-cls": ((32, 1024), (768,)),
        "pt-tokens": ((16384,), (768,)),
    },
    # The CPU grid: a tiny shape per family where the interpreter can run the Triton contenders, and one
    # realistic shape for the eager and compiled contenders; all of it finishes in minutes on 2 cores.
    "cpu": {
        "kd-cls": ((32, 512), (2, 3)),
        "kd-vocab": ((16, 1024), (VOCAB,)),
        "pt-cls": ((32, 256), (768,)),
        "pt-tokens": ((4096,), (768,)),
    },
    "cpu-quick": {
        "kd-cls": ((32,), (2,)),
        "kd-vocab": ((16,), (VOCAB,)),
        "pt-cls": ((32,), (768,)),
        "pt-tokens": ((4096,), (768,)),
    },
}


@dataclass(frozen=True)
class Case:
    """One shape of one family: bf16 inputs, the student's requiring grad."""

    family: str
    rows: int
    cols: int
    dtype: torch.dtype = torch.bfloat16
    pt_layers: int = PT_LAYERS  # patient families: layer pairs

    @property
    def kd(self) -> bool:
        return self.family.startswith("kd")

    @property
    def layers(self) -> int:
        return 1 if self.kd else self.pt_layers

    @property
    def label(self) -> str:
        if self.kd:
            return f"N={self.rows} V={self.cols}"
        return f"rows={self.rows} H={self.cols}" + (f" layers={self.layers}" if self.layers != PT_LAYERS else "")

    @property
    def description(self) -> str:
        return FAMILIES[self.family].format(layers=self.layers)

    @property
    def elements(self) -> int:
        return self.layers * self.rows * self.cols

    @property
    def set_bytes(self) -> int:
        """One input set: student and teacher."""
        return 2 * self.elements * self.dtype.itemsize

    def min_bytes(self, mode: str) -> int:
        return (2 if mode == "fwd" else 3) * self.elements * self.dtype.itemsize

    def draw(self, device: torch.device) -> Callable[[torch.Generator], tuple]:
        """A function of a generator giving one fresh (student, teacher) input set."""

        def rand(gen):
            return torch.randn(self.rows, self.cols, generator=gen, device=device).to(self.dtype)

        def one_set(gen):
            if self.kd:
                return rand(gen).requires_grad_(), rand(gen)
            return [rand(gen).requires_grad_() for _ in range(self.layers)], [rand(gen) for _ in range(self.layers)]

        return one_set


def grid(device: torch.device, quick: bool, families=None) -> list[Case]:
    table = GRIDS[device.type + ("-quick" if quick else "")]
    return [
        Case(family, rows, cols)
        for family, (all_rows, all_cols) in table.items()
        if not families or family in families
        for cols in all_cols
        for rows in all_rows
    ]


# -- contenders --------------------------------------------------------------------------------------


@functools.cache
def _liger_kl():
    from liger_kernel.transformers import LigerKLDIVLoss

    return LigerKLDIVLoss(reduction="batchmean")


def kd_eager_bf16(s, t):
    """KD as commonly written in torch, computed in the inputs' dtype (no upcast)."""
    T = TEMPERATURE
    return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean", log_target=True) * T**2


def kd_liger(s, t):
    """Liger-Kernel's KL path: torch log_softmax / softmax with fp32 outputs, then Liger's KL kernel, ×T²."""
    T = TEMPERATURE
    log_p_s = torch.log_softmax(s / T, -1, dtype=torch.float32)
    return _liger_kl()(log_p_s, torch.softmax(t / T, -1, dtype=torch.float32)) * T**2


def pt_eager_bf16(hs, ht):
    """The patient loss as commonly written in torch, computed in the inputs' dtype (no upcast)."""
    return sum(
        F.mse_loss(F.normalize(a, dim=-1), F.normalize(b, dim=-1), reduction="sum") / a.shape[0] for a, b in zip(hs, ht)
    )


@dataclass(frozen=True)
class Contender:
    name: str
    fn: Callable  # (student, teacher) -> scalar loss
    triton: bool = False  # runs Triton code: the interpreter on the CPU
    spec: bool = True  # computes in fp32 as the spec does, so it must match the spec
    needs: tuple[str, str] | None = None  # (module, attribute) whose import it needs


def contenders(case: Case) -> list[Contender]:
    """Fused kernel, eager bf16, eager fp32 (the spec), torch.compile of the spec, and the public kernel."""
    if case.kd:
        T = TEMPERATURE
        return [
            Contender("fused", lambda s, t: kd_loss(s, t, T, impl="triton"), True, needs=("pkd_fast.kernels", "fused_kd_loss")),
            Contender("eager-bf16", kd_eager_bf16, spec=False),
            Contender("eager-fp32", lambda s, t: kd_loss(s, t, T, impl="eager")),
            Contender("compile", lambda s, t: kd_loss(s, t, T, impl="compile")),
            Contender("liger", kd_liger, True, needs=("liger_kernel.transformers", "LigerKLDIVLoss")),
        ]
    r = PT_REDUCTION
    return [  # no public fused kernel exists for the patient loss
        Contender("fused", lambda s, t: patient_loss(s, t, reduction=r, impl="triton"), True, needs=("pkd_fast.kernels", "fused_patient_loss")),
        Contender("eager-bf16", pt_eager_bf16, spec=False),
        Contender("eager-fp32", lambda s, t: patient_loss(s, t, reduction=r, impl="eager")),
        Contender("compile", lambda s, t: patient_loss(s, t, reduction=r, impl="compile")),
    ]


def spec(case: Case) -> Callable:
    return next(c.fn for c in contenders(case) if c.name == "eager-fp32")


def skip_reason(case: Case, c: Contender, device: torch.device) -> str | None:
    """Why `c` does not run at `case` on this machine, or None."""
    if c.needs:
        module, attr = c.needs
        try:
            getattr(importlib.import_module(module), attr)
        except Exception as err:  # noqa: BLE001 — a third-party import can fail in any way (a transformers it does not know)
            return f"{module}.{attr} not importable ({type(err).__name__}: {err})"
    if c.triton and harness.interpreted(device) and case.rows > INTERPRET_MAX_ROWS:
        return f"Triton interpreter (no GPU): run only up to {INTERPRET_MAX_ROWS} rows"
    return None


# -- one measurement ---------------------------------------------------------------------------------


def forward(fn: Callable) -> Callable:
    """The loss alone, autograd recording as in training (the student requires grad)."""
    return fn


def forward_backward(fn: Callable) -> Callable:
    """The loss and its gradient w.r.t. the student: the gradient written fresh, never accumulated."""

    def step(student, teacher):
        loss = fn(student, teacher)
        return loss, torch.autograd.grad(loss, harness.leaves(student))

    return step


MODE_FNS = {"fwd": forward, "fwd_bwd": forward_backward}


def _upcast(x):
    if isinstance(x, torch.Tensor):
        return x.detach().float().requires_grad_(x.requires_grad)
    return [_upcast(t) for t in x]


def reference(case: Case, inputs: tuple) -> tuple:
    """The spec's loss and gradient on fp32 copies of one input set."""
    return forward_backward(spec(case))(*(_upcast(x) for x in inputs))


def check(c: Contender, inputs: tuple, ref: tuple) -> dict:
    """Relative error of `c`'s loss and gradient against the spec's: |Δloss|/|loss|, ‖Δgrad‖/‖grad‖."""
    loss, grads = forward_backward(c.fn)(*inputs)
    ref_loss, ref_grads = ref
    g = torch.cat([x.float().flatten() for x in grads])
    g_ref = torch.cat([x.flatten() for x in ref_grads])
    loss_err = (abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())) if ref_loss.item() else abs(loss.item())
    grad_err = ((g - g_ref).norm() / g_ref.norm()).item()
    ok = loss_err <= LOSS_TOL and grad_err <= GRAD_TOL
    return {"loss_rel_err": harness.sig(loss_err, 3), "grad_rel_err": harness.sig(grad_err, 3), "ok": ok}


def measure(case: Case, sets: list, device: torch.device, b: harness.Budget, copy_gbps: float, names=None) -> list[dict]:
    """Every contender (or those in `names`) at one shape: value check, then each mode's timing (contenders
    taking turns on the CPU), bandwidth, and on CUDA peak memory and wall time. Failures are recorded, not
    raised: out of memory, or a kernel that cannot run here."""
    ref = reference(case, sets[0])
    rows, ready = {}, {}
    for c in contenders(case):
        if names is not None and c.name not in names:
            continue
        row = rows[c.name] = {
            "family": case.family, "shape": case.label, "rows": case.rows, "cols": case.cols, "layers": case.layers,
            "dtype": str(case.dtype).removeprefix("torch."), "contender": c.name,
            "interpreter": c.triton and harness.interpreted(device), "spec_precision": c.spec,
        }  # fmt: skip
        reason = skip_reason(case, c, device)
        if reason:
            row["skipped"] = reason
            continue
        try:
            row["check"] = check(c, sets[0], ref)
            ready[c.name] = c
        except Exception as err:  # noqa: BLE001
            row["error"] = harness.error_text(err)
    for mode in MODES:
        calls = {name: harness.cycling(MODE_FNS[mode](c.fn), sets) for name, c in ready.items() if "error" not in rows[name]}
        for name, timing in harness.time_calls(calls, device, b).items():
            if isinstance(timing, Exception):
                rows[name]["error"] = harness.error_text(timing)
                continue
            rate = harness.gbps(case.min_bytes(mode), timing.ms)
            rows[name][mode] = {**timing.as_dict(), "min_bytes": case.min_bytes(mode), "gbps": rate, "copy_frac": harness.sig(rate / copy_gbps)}
    for name, c in ready.items():
        if "fwd_bwd" in rows[name]:
            call = harness.cycling(forward_backward(c.fn), sets)
            rows[name]["fwd_bwd"]["peak_extra_mb"] = harness.peak_memory_mb(call, device)[1]
            if device.type == "cuda":  # the CPU's timings are already wall-clock
                rows[name]["fwd_bwd"]["wall_ms"] = round(harness.wall_time(call, device, b).ms, 6)
    return list(rows.values())


def _line(row: dict) -> str:
    head = f"{row['family']:9} {row['shape']:18} {row['contender']:10}"
    if "fwd_bwd" not in row:
        return f"{head} {row.get('skipped') or row.get('error')}"
    fb = row["fwd_bwd"]
    chk = "ok" if row["check"]["ok"] else f"MISMATCH loss {row['check']['loss_rel_err']:.2g} grad {row['check']['grad_rel_err']:.2g}"
    return (
        f"{head} fwd {row['fwd']['ms']:9.4f} ms  fwd+bwd {fb['ms']:9.4f} ms  {fb['gbps']:8.3g} GB/s "
        f"({fb['copy_frac']:.1%} of copy)  check {chk}"
    )


# -- targets (the kernels issue's, on H100) ----------------------------------------------------------

TARGET_SHAPE = ("kd-vocab", 8192, VOCAB)
SMALL_FAMILIES = ("kd-cls", "pt-cls")


def judge(name: str, got: float | None, bound: float, unit: str, higher_is_better: bool) -> dict:
    """One target: `got` against `bound` (None: not measured), met or missed by how much."""
    want = f"{'≥' if higher_is_better else '≤'} {bound:g}{unit}"
    if got is None:
        return {"target": name, "want": want, "got": None, "met": None, "note": "not measured in this run"}
    met = got >= bound if higher_is_better else got <= bound
    entry = {"target": name, "want": want, "got": f"{got:.4g}{unit}", "met": met}
    if not met:
        entry["missed_by"] = f"{(1 - got / bound) * 100:.1f}% short" if higher_is_better else f"{(got / bound - 1) * 100:.1f}% over"
    return entry


def targets(rows: list[dict], target_shape: tuple[str, int, int] = TARGET_SHAPE, small_shapes: bool = True) -> list[dict]:
    """The H100 targets, each met or missed by how much; the KD ones at `target_shape` (family, N, V), the
    small-shape one only if `small_shapes` (a run measuring none would report it as not measured)."""

    def fb(family, n, v, contender, key="ms"):
        for r in rows:
            if (r["family"], r["rows"], r["cols"], r["contender"]) == (family, n, v, contender) and "fwd_bwd" in r:
                return r["fwd_bwd"][key]
        return None

    fused = fb(*target_shape, "fused")
    frac = fb(*target_shape, "fused", "copy_frac")

    def speedup(other):
        ms = fb(*target_shape, other)
        return ms / fused if ms and fused else None

    shape = f"KD N={target_shape[1]} V={target_shape[2]} bf16 fwd+bwd"
    small = [
        (r["fwd_bwd"]["wall_ms"], f"{r['family']} {r['shape']}")
        for r in rows
        if r["family"] in SMALL_FAMILIES and r["contender"] == "fused" and "wall_ms" in r.get("fwd_bwd", {})
    ]
    worst_ms, worst_shape = max(small, default=(None, None))
    small_target = judge("small shapes (kd-cls, pt-cls) fused fwd+bwd wall, worst", worst_ms and worst_ms * 1e3, 25, " µs", False)
    if worst_shape:
        small_target["worst_shape"] = worst_shape
    return [
        judge(f"{shape}: fused time", fused, 0.65, " ms", False),
        judge(f"{shape}: fused share of copy bandwidth", frac and frac * 100, 77, " %", True),
        judge(f"{shape}: fused speed-up vs eager (fp32 spec)", speedup("eager-fp32"), 5, "×", True),
        judge(f"{shape}: fused speed-up vs torch.compile", speedup("compile"), 1.3, "×", True),
        judge(f"{shape}: fused speed-up vs the Liger path", speedup("liger"), 3, "×", True),
        *([small_target] if small_shapes else []),
    ]


# -- the run -----------------------------------------------------------------------------------------


def settings() -> dict:
    return {
        "families": {family: text.format(layers=PT_LAYERS) for family, text in FAMILIES.items()},
        "temperature": TEMPERATURE,
        "pt_reduction": PT_REDUCTION,
        "min_bytes": "fwd: read student + teacher (2·E·elt); fwd_bwd: + write the student's gradient (3·E·elt)",
        "fused_forward": "the fused kernels write the gradient in the forward; their backward only scales it",
        "timing": "CUDA: triton.testing.do_bench events, L2 flushed before each repetition, median; "
        "CPU: host clock per call, contenders taking turns, median. Inputs rotate among random sets spanning 2× the last-level cache.",
        "wall_ms": "CUDA only: host time per call of back-to-back calls, launch overhead included",
        "peak_extra_mb": "CUDA only: max_memory_allocated during one fwd+bwd minus what was allocated before it",
        "check": f"vs the eager fp32 spec on fp32 copies: loss rel err ≤ {LOSS_TOL:g}, grad rel (norm) err ≤ {GRAD_TOL:g}",
        "interpreter": "rows marked interpreter ran under the Triton CPU interpreter: their times are not kernel speed",
    }


def measure_cases(cases: list[Case], device: torch.device, b: harness.Budget, copy_gbps: float, names=None) -> Iterator[list[dict]]:
    """`measure` shape after shape, each on its own rotating input sets (freed before the next shape),
    yielding each shape's rows and printing them, so a caller can save a run cut short."""
    for case in cases:
        sets = harness.rotating(case.draw(device), case.set_bytes, device)
        rows = measure(case, sets, device, b, copy_gbps, names)
        for row in rows:
            print(_line(row), flush=True)
        del sets
        if device.type == "cuda":
            torch.cuda.empty_cache()
        yield rows


def run(device: torch.device, quick: bool = False, families=None, path=None) -> dict:
    path = path or harness.results_path(device)
    b = harness.budget(device, quick)
    copy = harness.copy_bandwidth(device, b)
    print(f"copy bandwidth: {copy['gbps']:.1f} GB/s ({harness.device_name(device)})", flush=True)
    rows: list[dict] = []
    for shape_rows in measure_cases(grid(device, quick, families), device, b, copy["gbps"]):
        rows += shape_rows
        # written after every shape, so a run cut short still leaves what it measured
        harness.update_results(path, device, copy_bandwidth=copy, loss_settings=settings(), losses=rows)
    return harness.update_results(
        path, device, copy_bandwidth=copy, loss_settings=settings(), losses=rows,
        loss_targets=targets(rows) if device.type == "cuda" else None,
    )  # fmt: skip


def failed_checks(results: dict) -> list[str]:
    """Contenders meant to compute the spec's value that did not."""
    return [
        f"{r['family']} {r['shape']} {r['contender']}: {r['check']}"
        for r in results.get("losses", [])
        if r.get("spec_precision") and "check" in r and not r["check"]["ok"]
    ]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when there is one")
    p.add_argument("--quick", action="store_true", help="a few shapes per family, shorter timing")
    p.add_argument("--family", action="append", choices=sorted(FAMILIES), help="only these families (repeatable)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    results = run(harness.pick_device(args.device), args.quick, args.family)
    bad = failed_checks(results)
    if bad:
        raise SystemExit("value check failed:\n" + "\n".join(bad))


if __name__ == "__main__":
    main()
