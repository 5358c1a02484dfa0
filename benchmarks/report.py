"""Render a results file: benchmarks/results/<device>.json → <device>.md (tables) and <device>.png (plot).

    python -m benchmarks.report [benchmarks/results/<device>.json ...]   (default: every results file)
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from benchmarks.harness import RESULTS_DIR

CONTENDER_ORDER = ("fused", "eager-bf16", "eager-fp32", "compile", "liger")
IMPL_ORDER = ("triton", "compile", "eager")
IMPL_CONTENDER = {"triton": "fused", "compile": "compile", "eager": "eager-fp32"}  # the same colour in the plot
BASELINE = "eager-fp32"  # speed-ups are against the spec, which is what `--loss-impl eager` runs


def _num(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if v >= 10 ** digits:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}" if v >= 1e-3 else "<0.001"


def _pct(v) -> str:
    return "–" if v is None else f"{v:.1%}"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _not_measured(rows: list[dict], who: str, where) -> list[str]:
    """Skipped and failed rows, one line per (who, reason) with the shapes it applies to."""
    grouped = defaultdict(list)
    for r in rows:
        if "skipped" in r or "error" in r:
            grouped[(r[who], "skipped" if "skipped" in r else "error", r.get("skipped") or r.get("error"))].append(where(r))
    return [f"- {name} {kind} at {', '.join(places)}: {reason}" for (name, kind, reason), places in grouped.items()]


def _header(results: dict) -> list[str]:
    d = results["device"]
    versions = ", ".join(f"{k} {d[k]}" for k in ("torch", "triton", "transformers", "deepspeed", "liger-kernel") if d.get(k))
    lines = [f"# Benchmarks on {d['name']}", "", f"Measured {d['date']} with {versions}."]
    if d["type"] == "cpu":
        lines += [
            "",
            f"CPU run ({d.get('threads')} torch thread(s)): timings are host wall-clock and give ratios only; "
            "peak memory is not measured (no allocator reports a peak). "
            + ("Rows marked † ran under the **Triton CPU interpreter**: their times measure Python, not the kernel. "
               if d.get("triton_interpreter") else "")
            + "The GPU numbers come from the same command on a GPU machine.",
        ]  # fmt: skip
    copy = results.get("copy_bandwidth")
    if copy:
        lines += ["", f"Copy bandwidth (x.copy_(y), {copy['bytes'] / 2**20:.0f} MiB, 2·bytes/time): **{copy['gbps']:.1f} GB/s**."]
    return lines


def target_table(entries: list[dict]) -> list[str]:
    """Targets (`bench_losses.judge` entries) as a markdown table: met, or missed by how much."""
    rows = [
        [t["target"] + (f" ({t['worst_shape']})" if t.get("worst_shape") else ""), t["want"], t["got"] or "–",
         "–" if t["met"] is None else "met" if t["met"] else f"**missed**: {t['missed_by']}"]
        for t in entries
    ]  # fmt: skip
    return md_table(["target", "want", "got", "result"], rows)


def _targets(results: dict) -> list[str]:
    entries = results.get("loss_targets")
    if not entries:
        return []
    return ["", "## Targets (the kernels issue's, set for H100)", "", *target_table(entries)]


def losses_section(results: dict) -> list[str]:
    rows = results.get("losses")
    if not rows:
        return []
    settings = results.get("loss_settings", {})
    cuda = results["device"]["type"] == "cuda"
    lines = ["", "## Loss microbenchmarks (bf16 inputs)", ""]
    lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in settings.items() if k != "families"]
    by_family = defaultdict(list)
    for r in rows:
        by_family[r["family"]].append(r)
    header = ["shape", "contender", "fwd ms", "fwd+bwd ms", *(["wall ms"] if cuda else []), "GB/s", "% of copy BW",
              "peak MB", f"vs {BASELINE}", "check"]  # fmt: skip
    for family, family_rows in by_family.items():
        base = {r["shape"]: r["fwd_bwd"]["ms"] for r in family_rows if r["contender"] == BASELINE and "fwd_bwd" in r}
        table = []
        for r in family_rows:
            if "fwd_bwd" not in r or "error" in r:
                continue
            name = r["contender"] + (" †" if r["interpreter"] else "")
            fb, chk = r["fwd_bwd"], r["check"]
            speedup = base[r["shape"]] / fb["ms"] if r["shape"] in base and not r["interpreter"] else None
            table.append([
                r["shape"], name, _num(r["fwd"]["ms"]), _num(fb["ms"]), *([_num(fb.get("wall_ms"))] if cuda else []),
                _num(fb["gbps"]), _pct(fb["copy_frac"]), _num(fb["peak_extra_mb"]), "–" if speedup is None else f"{speedup:.2f}×",
                "ok" if chk["ok"] else f"differs: loss {chk['loss_rel_err']:.1e}, grad {chk['grad_rel_err']:.1e}",
            ])  # fmt: skip
        lines += ["", f"### {family}: {settings.get('families', {}).get(family, '')}", "", *md_table(header, table)]
        missing = _not_measured(family_rows, "contender", lambda r: r["shape"])
        lines += ["", "Not measured:", *missing] if missing else []
    return lines


def steps_section(results: dict) -> list[str]:
    rows = results.get("step")
    if not rows:
        return []
    settings = results.get("step_settings", {})
    lines = ["", "## End-to-end training step", ""]
    lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in settings.items() if k != "cases"]
    lines += [f"- {k}: {v}" for k, v in settings.get("cases", {}).items()]
    base = {(r["case"], r["micro_batch"]): r["step"]["ms"] for r in rows if r["impl"] == "eager" and "step" in r}
    table = []
    for r in rows:
        if "step" not in r:
            continue
        name = r["impl"] + (" †" if r["interpreter"] else "")
        b = base.get((r["case"], r["micro_batch"]))
        table.append([
            r["case"], str(r["micro_batch"]), name, _num(r["step"]["ms"]), _num(r["samples_per_s"]), _num(r["tokens_per_s"]),
            _num(r["peak_mb"]), _num(r["loss"]["ms"]), _pct(r["loss_share"]),
            f"{b / r['step']['ms']:.2f}×" if b and not r["interpreter"] else "–",
        ])  # fmt: skip
    header = ["case", "micro-batch", "loss impl", "step ms", "samples/s", "tokens/s", "peak MB", "loss fwd+bwd ms", "loss share", "vs eager"]
    missing = _not_measured(rows, "impl", lambda r: f"{r['case']} B={r['micro_batch']}")
    return lines + ["", *md_table(header, table), *(["", "Not measured:", *missing] if missing else [])]


def render_markdown(results: dict) -> str:
    return "\n".join([*_header(results), *_targets(results), *losses_section(results), *steps_section(results)]) + "\n"


def plot(results: dict, path: Path) -> None:
    """One panel per loss family (fwd+bwd ms per contender per shape, log scale) and one of step throughput.
    Rows run under the Triton interpreter are left out: their times are not kernel speed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_family = defaultdict(list)
    for r in results.get("losses", []):
        by_family[r["family"]].append(r)
    panels = [*by_family.items(), *([("training step", results["step"])] if results.get("step") else [])]
    cols = 3
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(6 * cols, 4.2 * -(-len(panels) // cols)), squeeze=False)
    colors = dict(zip(CONTENDER_ORDER, plt.get_cmap("tab10").colors))
    colors.update({impl: colors[contender] for impl, contender in IMPL_CONTENDER.items()})
    for ax, (title, rows) in zip(axes.flat, panels):
        step = title == "training step"
        group = (lambda r: f"{r['case']}\nB={r['micro_batch']}") if step else (lambda r: r["shape"].replace(" ", "\n"))
        series = "impl" if step else "contender"
        value = (lambda r: r["samples_per_s"]) if step else (lambda r: r["fwd_bwd"]["ms"])
        groups = list(dict.fromkeys(group(r) for r in rows))
        measured = [r for r in rows if ("step" in r if step else "fwd_bwd" in r and "error" not in r) and not r["interpreter"]]
        names = [n for n in (IMPL_ORDER if step else CONTENDER_ORDER) if any(r[series] == n for r in measured)]
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            mine = [r for r in measured if r[series] == name]
            xs = [groups.index(group(r)) + (i - (len(names) - 1) / 2) * width for r in mine]
            ax.bar(xs, [value(r) for r in mine], width, label=name, color=colors[name])
        ax.set_xticks(range(len(groups)), groups, fontsize=7)
        ax.set_yscale("linear" if step else "log")
        ax.set_ylabel("samples/s (higher is better)" if step else "fwd+bwd ms (lower is better)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    d = results["device"]
    note = " — Triton contenders ran only under the CPU interpreter: not plotted" if d.get("triton_interpreter") else ""
    fig.suptitle(f"{d['name']} ({d['date'][:10]}){note}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(json_path: Path) -> tuple[Path, Path]:
    results = json.loads(json_path.read_text())
    md, png = json_path.with_suffix(".md"), json_path.with_suffix(".png")
    md.write_text(render_markdown(results))
    plot(results, png)
    return md, png


def _is_suite_results(path: Path) -> bool:
    """A file run_all wrote (results/ also holds other benchmarks' files, e.g. cache_<device>.json)."""
    results = json.loads(path.read_text())
    return "device" in results and ("losses" in results or "step" in results)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="*", type=Path, help="results files (default: every benchmarks/results/*.json)")
    args = p.parse_args(argv)
    paths = args.paths or sorted(p for p in RESULTS_DIR.glob("*.json") if _is_suite_results(p))
    for path in paths:
        print(*render(path))


if __name__ == "__main__":
    main()
