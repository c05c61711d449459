"""The README's Python API example runs and says what the README says it says."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _api_block() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_api_example_prints_equal_children_on_both_sides():
    block = _api_block()
    assert len(block.strip().splitlines()) == 5  # "five lines"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, str(README), "exec"), {})
    lines = out.getvalue().splitlines()
    assert [line for line in lines if not line.startswith(" ")] == [
        "tbo_parity.reference.split", "tbo_parity.torch_impl.two_batch_overlap"]
    spec_children = [line.split("(", 1)[1] for line in lines[1:3]]
    impl_children = [line.split("(", 1)[1] for line in lines[4:6]]
    assert spec_children == impl_children
    assert "seq_range=(0, 2), token_range=(0, 1050)" in spec_children[0]
    assert "seq_range=(1, 2), token_range=(1050, 2100)" in spec_children[1]
    assert "extend_prefix_lens=(950,)" in spec_children[1]


def _quick_start_lines() -> list:
    section = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```\n(.*?)```", section, re.S)]


def test_ci_runs_the_readme_test_line_verbatim_with_the_coverage_floor():
    """The floor (100% of the traced split and replay-plan files) is on the README's full test
    line, which .ci/run runs verbatim; not in pyproject.toml, so that one test file with --cov
    passes or fails on its own tests."""
    import tomllib

    root = README.parent
    main_job, test_line = _quick_start_lines()
    assert main_job.endswith("tbo-parity run")
    assert test_line.endswith("python -m pytest -q --cov --cov-fail-under=100")
    ci = [line for line in (root / ".ci" / "run").read_text().splitlines()
          if line and not line.startswith("#")]
    assert ci[-1] == test_line
    coverage = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["coverage"]
    assert "fail_under" not in coverage.get("report", {})
    assert "`python -m pytest -q --cov --cov-fail-under=100`" in (
        root / "docs" / "testing.md").read_text()
