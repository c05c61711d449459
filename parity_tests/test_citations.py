"""Everything the code and the docs cite is in the repository: no file outside it is named,
and every "docs/spec.md, <section>" citation names a section docs/spec.md has."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = [p for folder in ("reference", "torch_impl", "parity_tests", "benchmarks", "docs")
           for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md")] + [ROOT / "README.md"]
OUTSIDE = ("TBO_SEMANTICS", "STYLE.md", "../shared")


def test_nothing_cites_a_file_outside_the_repository():
    this = pathlib.Path(__file__).resolve()
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in SOURCES if p.resolve() != this
            for n, line in enumerate(p.read_text().splitlines(), 1)
            if any(name in line for name in OUTSIDE)]
    assert hits == []


def test_cited_spec_sections_exist():
    sections = {line[3:].strip() for line in (ROOT / "docs/spec.md").read_text().splitlines()
                if line.startswith("## ")}
    cited = set()
    for path in SOURCES:
        text = " ".join(path.read_text().split())  # citations may wrap across lines
        cited |= set(re.findall(r'docs/spec\.md, "([^"]+)"', text))
    assert cited and cited <= sections, cited - sections
