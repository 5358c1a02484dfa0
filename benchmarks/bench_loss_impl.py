"""Which loss implementation should `--loss-impl auto` pick on this device? The whole `pkd_loss` call as the
trainer makes it, forward + backward, per implementation, at the shapes a run meets; and what torch.compile
costs once (its first call, compiling), so the steps it needs to pay that back.

    python -m benchmarks.bench_loss_impl [--device cpu|cuda]

Shapes: the GLUE step (B=32 two-class logits, 2 mapped [CLS] pairs of a 3-layer MiniLM student, H=384), the
same with --pt-tokens all (every real token of B=32 × ~47, 1,500 rows), and vocabulary-sized KD (MLM logits,
N=1024, V=30522). bf16 inputs, the training dtype; T=10, α=0.7, β=100. Steady times take turns
(harness.time_calls); the compile cost is a cold first call: caches reset, on-disk caches bypassed.
Results: benchmarks/results/loss_impl_<device>.{json,md}.
"""

from __future__ import annotations

import json
import time

import torch

from benchmarks import harness
from pkd_fast import losses

SHAPES = {  # name: (logit rows, logit width, PT rows per layer, hidden, mapped layers)
    "glue-cls": (32, 2, 32, 384, 2),
    "glue-tokens": (32, 2, 1500, 384, 2),
    "vocab-kd": (1024, 30522, 0, 384, 0),
}


def inputs(shape: tuple, device: torch.device, gen: torch.Generator) -> tuple:
    n, v, rows, hidden, layers = shape

    def rand(*size):
        return torch.randn(*size, generator=gen, device=device).to(torch.bfloat16)

    return (rand(n, v).requires_grad_(), rand(n, v), torch.randint(0, v, (n,), generator=gen, device=device),
            [rand(rows, hidden).requires_grad_() for _ in range(layers)], [rand(rows, hidden) for _ in range(layers)])


def step(impl: str):
    def call(s, t, y, hs, ht):
        terms = losses.pkd_loss(s, t, y, hs, ht, temperature=10.0, alpha=0.7, beta=100.0 if hs else 0.0, impl=impl)
        terms.total.backward()
    return call


def first_call_seconds(impl: str, args: tuple, device: torch.device) -> float:
    """A first run's cost: torch.compile's in-memory caches reset and its on-disk caches bypassed (a later
    run of the same shapes would find them warm and compile in a fraction of this)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    losses._compiled.cache_clear()
    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        t0 = time.perf_counter()
        step(impl)(*args)
        harness.synchronize(device)
        return time.perf_counter() - t0


def run(device: torch.device) -> dict:
    impls = ["eager", "compile"] + (["triton"] if device.type == "cuda" else [])
    b = harness.budget(device, quick=False)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = {}
    for name, shape in SHAPES.items():
        sets = [inputs(shape, device, gen) for _ in range(4)]
        compile_s = first_call_seconds("compile", sets[0], device)
        timed = harness.time_calls({impl: harness.cycling(step(impl), sets) for impl in impls}, device, b)
        ms = {impl: round(t.ms, 4) for impl, t in timed.items()}
        saved = ms["eager"] - ms["compile"]
        rows[name] = {"shape": dict(zip(("logit_rows", "logit_width", "pt_rows", "hidden", "layers"), shape)), "ms": ms,
                      "compile_first_call_s": round(compile_s, 2),
                      "compile_break_even_steps": round(1e3 * compile_s / saved) if saved > 0 else None}
        print(name, rows[name], flush=True)
    return {"device": harness.describe(device), "auto_picks": losses.resolve_impl("auto", device), "rows": rows}


def render(results: dict) -> str:
    d = results["device"]
    lines = [f"# `--loss-impl` on {d['name']} ({d['date'][:10]}, {d.get('threads', '-')} threads)", "",
             "pkd_loss forward + backward as the trainer calls it, bf16 inputs; median ms per call.", "",
             "| shape | " + " | ".join(next(iter(results["rows"].values()))["ms"]) + " | compile's first call (s) | steps until compile pays |",
             "|---|" + "---|" * (len(next(iter(results["rows"].values()))["ms"]) + 2)]
    for name, r in results["rows"].items():
        even = r["compile_break_even_steps"]
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in r["ms"].values())
                     + f" | {r['compile_first_call_s']:.1f} | {even if even is not None else 'never'} |")
    lines += ["", f"`--loss-impl auto` picks **{results['auto_picks']}** here."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = harness.parser(__doc__)
    device = harness.pick_device(p.parse_args(argv).device)
    results = run(device)
    stem = harness.RESULTS_DIR / f"loss_impl_{harness.device_slug(device)}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    stem.with_suffix(".md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
