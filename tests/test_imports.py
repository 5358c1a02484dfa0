"""The house's import graph: no module of pkd_fast/ or kernels/ imports one that imports it back, directly or
around a circle (imports inside functions count: a lazy import hides a circle, it does not remove it), and
the kernels import nothing of pkd_fast (losses.py imports them, never the reverse). Read from the source
with ast, nothing imported."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# kernels/ is installed as pkd_fast.kernels (pyproject.toml)
ROOTS = {"pkd_fast": REPO / "pkd_fast", "pkd_fast.kernels": REPO / "kernels"}


def modules() -> dict[str, Path]:
    """Every module's dotted name → its file (a package is its __init__.py)."""
    found = {}
    for package, folder in ROOTS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The house's modules that `name` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]  # `from p import m`: m may be a module
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, colouring the modules on the path)."""
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read():
    """The walk sees the imports it must judge (else an empty graph would pass)."""
    edges = graph()
    assert "pkd_fast.kernels" in edges["pkd_fast.losses"]  # the lazy import in losses._fused
    assert "pkd_fast.kernels.kd_loss" in edges["pkd_fast.kernels.topk_kd_loss"]  # a relative import
    assert {"pkd_fast.distill", "pkd_fast.recipes.common"} <= edges["pkd_fast.recipes.glue"]


def test_no_module_imports_in_a_circle():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " → ".join(cycle)


def test_the_kernels_import_nothing_of_pkd_fast():
    for name, imported in graph().items():
        if name.startswith("pkd_fast.kernels"):
            outside = sorted(m for m in imported if not m.startswith("pkd_fast.kernels"))
            assert not outside, f"{name} imports {outside}"


def test_a_circle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_reading_the_flags_imports_no_deepspeed():
    """pkd_fast.config (the flags, their defaults, --help) must stay quick to import: DeepSpeed comes in only with
    the modules that start a process group, read its JSON or build an engine (issue #29)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", "import pkd_fast.config, sys; assert 'deepspeed' not in sys.modules"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
