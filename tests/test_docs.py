"""The README is a short entrance and the docs hold the rest: every relative link in README.md, docs/*.md,
benchmarks/README.md and studies/README.md reaches an existing file (and, with a #fragment, a heading of
that file), the README stays under 250 lines and keeps the two commands a newcomer runs, and its results
headline quotes the docs' numbers. Read from the files, nothing run."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md",
         REPO / "studies" / "README.md"]
# [text](target) and ![alt](target); the target ends at the first space or ')'
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
# The README's two commands, exactly as a newcomer types them (benchmarks/bench_commands.py times them).
MAIN = ("pip install torch==2.13.0 && pip install -e . && GLUE_DIR=../shared/data/glue deepspeed pkd_fast/train.py "
        "--deepspeed ds_configs/zero2.json --preset quick")
TESTS = ('pip install torch==2.13.0 && pip install -e ".[dev]" && GLUE_DIR=../shared/data/glue python -m pytest -q -n 2 '
         "--dist loadfile")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than - and _ dropped, spaces to -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    found, seen = set(), {}
    for line in text.splitlines():
        if m := re.match(r"^#{1,6}\s+(.*)", line):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans are not links
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # http:, mailto:, ...


def test_the_pages_exist():
    for name in ("usage", "objectives", "cache", "reliability", "multinode", "results", "speed", "layout"):
        assert (REPO / "docs" / f"{name}.md").is_file(), name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    if not page.is_file():
        pytest.skip(f"{page.relative_to(REPO)} not written yet")
    broken = []
    for target in links(page):
        file, _, fragment = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            if dest == REPO / "docs" / "api.md":  # written by another change; linked from the map already
                continue
            broken.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: no heading #{fragment} in {dest.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_the_readme_is_a_short_entrance():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines; move detail into docs/"


def test_the_readme_keeps_the_two_commands():
    text = (REPO / "README.md").read_text()
    assert f"    {MAIN}\n" in text and f"    {TESTS}\n" in text


def test_the_readme_maps_every_docs_page():
    text = (REPO / "README.md").read_text()
    for page in [*sorted((REPO / "docs").glob("*.md")), REPO / "docs" / "api.md"]:
        assert f"](docs/{page.name})" in text, f"README.md's map lacks docs/{page.name}"


def test_the_readmes_results_headline_quotes_the_docs():
    """Every figure in the README's "Results in brief" (a number with a decimal point) is one the docs state."""
    readme = (REPO / "README.md").read_text()
    headline = readme.split("## Results in brief", 1)[1].split("\n## ", 1)[0]
    docs = "".join(p.read_text() for p in (REPO / "docs").glob("*.md"))
    figures = set(re.findall(r"(?<![\d.])\d+\.\d+(?![\d.])", headline))
    assert figures, "no figures found in the headline"
    missing = sorted(f for f in figures if not re.search(rf"(?<![\d.]){re.escape(f)}(?![\d])", docs))
    assert not missing, f"README figures the docs do not state: {missing}"
