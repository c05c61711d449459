"""One table of shape letters for the whole project (docs/spec.md, "Shape letters"): no letter
is defined twice, and every shape written in the docs and in the docstrings and comments of
``reference/`` and ``torch_impl/`` uses only letters of that table.

A *shape* is a bracketed, comma-separated tuple whose entries are sizes: uppercase letters,
digits and ``* + - / ( )`` (``[T, H]``, ``[N, L, C, H]``, ``[N*S + 1, H]``, ``[D/2]``, ``[E]``),
``...``, and a lowercase label in parentheses after a letter (``[N(source), S, H]``). A tuple
with any other lowercase word (``[num_layers, P, Q, D]``, ``[T, topk_group]``, ``x[..., :D/2]``)
names a field or indexes an array and is not checked. Every run of uppercase letters in a
shape must be one letter of the table: ``[TK, H]`` is reported (``T*K`` is the product).
The records (docs/gpu-results.md, the generated benchmark tables, docs/layouts-1xH200/ and
other subfolders of docs/) keep the words they were written with and are not read.
"""

from __future__ import annotations

import ast
import io
import pathlib
import re
import tokenize

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPEC_DOC = ROOT / "docs" / "spec.md"
DOCS = sorted(p for p in (ROOT / "docs").glob("*.md")
              if p.name != "gpu-results.md" and "benchmark" not in p.name)
SOURCES = sorted([*(ROOT / "reference").glob("*.py"), *(ROOT / "torch_impl").glob("*.py")])

SECTION = "## Shape letters"
ROW = re.compile(r"^\|\s*`([A-Za-z])`\s*\|\s*([^|]*?)\s*\|\s*([^|]*?)\s*\|\s*$")
BRACKET = re.compile(r"\[([^\[\]\n]*)\]")
LABEL = re.compile(r"\([a-z][a-z ]*\)")  # N(source), N(expert rank): a label, not a size
ENTRY = re.compile(r"^(?:\.\.\.|[A-Z0-9 *+\-/()]+)$")
RUN = re.compile(r"[A-Z]+")


def table_rows(text: str) -> list:
    """``(letter, meaning, where)`` of every row of the "Shape letters" table of a spec text."""
    if SECTION not in text:
        return []
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return [m.groups() for m in map(ROW.match, section.splitlines()) if m]


def duplicate_letters(text: str) -> list:
    """Letters with more than one row in the table, in table order."""
    seen, twice = set(), []
    for letter, _, _ in table_rows(text):
        if letter in seen and letter not in twice:
            twice.append(letter)
        seen.add(letter)
    return twice


def shapes(text: str) -> list:
    """``(offset, shape, letters)`` of every shape in ``text``: its bracketed text and its runs
    of uppercase letters (a run longer than one letter is kept whole, to be reported)."""
    found = []
    for m in BRACKET.finditer(text):
        entries = [LABEL.sub("", e).strip() for e in m.group(1).split(",")]
        if all(ENTRY.match(e) for e in entries) and RUN.search(m.group(1)):
            found.append((m.start(), m.group(0), RUN.findall(LABEL.sub("", m.group(1)))))
    return found


def unknown_letters(text: str, letters) -> list:
    """``(offset, shape, run)`` for every run of uppercase letters in a shape of ``text`` that
    is not one letter of ``letters``."""
    return [(offset, shape, run) for offset, shape, runs in shapes(text) for run in runs
            if run not in letters]


def prose_of_python(path: pathlib.Path) -> list:
    """``(line, text)`` of every docstring (any string statement) and comment of a module."""
    source = path.read_text()
    pieces = [(node.lineno, node.value.value) for node in ast.walk(ast.parse(source))
              if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
              and isinstance(node.value.value, str)]
    pieces += [(tok.start[0], tok.string)
               for tok in tokenize.generate_tokens(io.StringIO(source).readline)
               if tok.type == tokenize.COMMENT]
    return pieces


def _letters() -> set:
    return {row[0] for row in table_rows(SPEC_DOC.read_text())}


def _where(path: pathlib.Path, line: int, text: str, offset: int) -> str:
    return f"{path.relative_to(ROOT)}:{line + text.count(chr(10), 0, offset)}"


HINT = ("use a letter of docs/spec.md, \"Shape letters\" (or a product such as T*K), or name a "
        "constant with a lowercase or underscored name")


# --- the table ---------------------------------------------------------------------------------


def test_the_table_is_in_the_spec_with_a_meaning_and_a_place_for_every_letter():
    rows = table_rows(SPEC_DOC.read_text())
    letters = [row[0] for row in rows]
    # The expert-parallel letters, and the ones that used to mean two things.
    assert {"T", "H", "E", "K", "N", "L", "C", "M", "S", "Q", "W", "B"} <= set(letters)
    assert all(meaning and where for _, meaning, where in rows), rows


def test_no_letter_is_defined_twice():
    assert duplicate_letters(SPEC_DOC.read_text()) == []


# --- the shapes --------------------------------------------------------------------------------


def test_every_shape_in_the_docs_uses_letters_of_the_table():
    letters = _letters()
    bad = [f"{_where(p, 1, p.read_text(), o)}: {shape} has {run}" for p in DOCS
           for o, shape, run in unknown_letters(p.read_text(), letters)]
    assert bad == [], HINT


def test_every_shape_in_docstrings_and_comments_uses_letters_of_the_table():
    letters = _letters()
    bad = [f"{_where(p, line, text, o)}: {shape} has {run}" for p in SOURCES
           for line, text in prose_of_python(p)
           for o, shape, run in unknown_letters(text, letters)]
    assert bad == [], HINT


def test_the_scan_reads_real_shapes():
    """Not vacuous: the docs and the modules hold many shapes, and they use the letters that
    used to collide (heads, table columns, ranks, local experts) under their one meaning."""
    doc_shapes = [s for p in DOCS for s in shapes(p.read_text())]
    code_shapes = [s for p in SOURCES for _, text in prose_of_python(p) for s in shapes(text)]
    assert len(doc_shapes) > 50 and len(code_shapes) > 200
    used = {run for _, _, runs in doc_shapes + code_shapes for run in runs}
    assert {"Q", "W", "N", "L", "B", "S", "T", "H"} <= used


# --- the checker catches what it must ----------------------------------------------------------

SYNTHETIC_TABLE = """# Spec

## Shape letters

| letter | meaning | where it first matters |
|---|---|---|
| `T` | tokens | here |
| `H` | hidden | here |
| `N` | ranks | here |
| `N` | attention heads | there |

## Next section

| `Z` | not in the table: another section | - |
"""


def test_a_letter_defined_twice_is_reported():
    assert [row[0] for row in table_rows(SYNTHETIC_TABLE)] == ["T", "H", "N", "N"]
    assert duplicate_letters(SYNTHETIC_TABLE) == ["N"]
    fixed = SYNTHETIC_TABLE.replace("| `N` | attention heads", "| `Q` | attention heads")
    assert duplicate_letters(fixed) == []


def test_a_letter_not_in_the_table_is_reported():
    letters = {"T", "H", "N", "S", "D"}
    text = ("x ``[T, H]``, ``[N*S + 1, H]``, ``[D/2]``, ``[..., N, D]``, ``[N(source), S, H]``; "
            "bad: ``[T, Z, D]`` and ``[TK, H]``; not shapes: ``[num_layers, P, Q, D]``, "
            "``x[..., :D/2]``, ``[3, 1, 3]``, ``[-1, E)``")
    assert [(shape, run) for _, shape, run in unknown_letters(text, letters)] == [
        ("[T, Z, D]", "Z"), ("[TK, H]", "TK")]
    assert [shape for _, shape, _ in shapes(text)] == [
        "[T, H]", "[N*S + 1, H]", "[D/2]", "[..., N, D]", "[N(source), S, H]", "[T, Z, D]",
        "[TK, H]"]


def test_python_prose_is_docstrings_and_comments_not_code(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('"""Doc: ``[T, Z]``."""\n\nx = y["[Q, Z]"]  # [Z]\n\n\n'
                      'def f():\n    """``[Z, H]``."""\n')
    assert [text for _, text in prose_of_python(module)] == [
        "Doc: ``[T, Z]``.", "``[Z, H]``.", "# [Z]"]
    assert [run for _, text in prose_of_python(module)
            for _, _, run in unknown_letters(text, {"T", "H"})] == ["Z", "Z", "Z"]
