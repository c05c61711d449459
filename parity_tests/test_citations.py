"""Everything the code and the docs cite is in the repository: no file outside it is named,
and every "docs/spec.md, <section>" citation names a section docs/spec.md has."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = [p for folder in ("reference", "torch_impl", "parity_tests", "benchmarks", "docs")
           for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md")] + [ROOT / "README.md"]
MARKDOWN = re.compile(r"[\w./-]*\b[A-Za-z_][\w-]*\.md\b")


def _repository_markdown() -> set:
    return {p.name for p in ROOT.rglob("*.md") if ".venv" not in p.parts}


def test_every_cited_markdown_file_is_in_the_repository():
    """A Markdown file named in the code or the docs exists in the repository, and no path
    reaches outside it (no ``../``): the project stands alone."""
    present = _repository_markdown()
    missing = [f"{p.relative_to(ROOT)}:{n}: {name}" for p in SOURCES
               for n, line in enumerate(p.read_text().splitlines(), 1)
               for name in MARKDOWN.findall(line)
               if name.startswith("../") or pathlib.PurePath(name).name not in present]
    assert missing == []


def test_cited_spec_sections_exist():
    sections = {line[3:].strip() for line in (ROOT / "docs/spec.md").read_text().splitlines()
                if line.startswith("## ")}
    cited = set()
    for path in SOURCES:
        text = " ".join(path.read_text().split())  # citations may wrap across lines
        cited |= set(re.findall(r'docs/spec\.md, "([^"]+)"', text))
    assert cited and cited <= sections, cited - sections
