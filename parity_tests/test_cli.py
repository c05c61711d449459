"""The main job reports agreement, and on a planted bug fails with a pasteable case."""

from __future__ import annotations

import subprocess
import sys

from parity_tests import cli
from parity_tests.split_parity import SplitCase
from torch_impl import two_batch_overlap as impl


def test_run_prints_the_table_and_exits_zero():
    result = subprocess.run([sys.executable, "-m", "parity_tests.cli", "run",
                             "--cases_per_mode=20"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for mode in ("EXTEND", "DECODE", "TARGET_VERIFY", "IDLE"):
        assert f"split {mode}" in result.stdout
    assert "OK" in result.stdout
    # CUDA-graph rows need a GPU: on a CPU the run says in one line that it skipped them.
    skipped = [line for line in result.stdout.splitlines() if "graph replay parity" in line]
    assert len(skipped) == 1 and "skipped" in skipped[0], result.stdout


def test_run_fails_on_a_planted_bug_and_prints_the_case(monkeypatch, capsys):
    # Plant a bug: every split token index of the implementation is off by one.
    original = impl.compute_split_token_index
    monkeypatch.setattr(impl, "compute_split_token_index",
                        lambda *args, **kw: original(*args, **kw) + 1)
    assert cli.run_parity(count=20, seed=0) == 1
    out = capsys.readouterr().out
    literal = out.split("first mismatch")[1].splitlines()[1].strip()
    case = eval(literal, {"SplitCase": SplitCase})
    assert isinstance(case, SplitCase)
    assert "split_token_index" in out and "FAIL" in out


def test_unknown_command_is_a_usage_error():
    result = subprocess.run([sys.executable, "-m", "parity_tests.cli", "walk"],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "usage: tbo-parity" in result.stdout + result.stderr
