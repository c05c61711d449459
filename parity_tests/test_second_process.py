"""The suite's second process (parity_tests/second_process.py): it runs the files named in
``SECOND``, and its outcome is the session's. A failure there must fail the session and be
printed; a run it is not wanted for (one set only, ``-x``, the switch) stays in one process."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import types

import pytest

from tbo_parity.parity_tests import second_process as sp

ROOT = pathlib.Path(__file__).resolve().parent.parent
A_SECOND_FILE = sorted(sp.SECOND)[0]
A_FIRST_FILE = "test_first.py"  # any name not in SECOND


def _item(file: str):
    return types.SimpleNamespace(path=pathlib.Path("parity_tests") / file, nodeid=f"{file}::t")


def _config(maxfail=0, collectonly=False):
    return types.SimpleNamespace(option=types.SimpleNamespace(maxfail=maxfail,
                                                              collectonly=collectonly))


def test_wanted_only_for_a_selection_in_both_sets_without_maxfail(monkeypatch):
    monkeypatch.delenv(sp.ENV, raising=False)
    monkeypatch.setattr(sp.os, "cpu_count", lambda: 2)
    both = [_item(A_FIRST_FILE), _item(A_SECOND_FILE)]
    assert sp.wanted(_config(), both)
    assert not sp.wanted(_config(), both[:1]) and not sp.wanted(_config(), both[1:])
    assert not sp.wanted(_config(maxfail=1), both)  # -x: the first failure must stop the run
    assert not sp.wanted(_config(collectonly=True), both)
    monkeypatch.setattr(sp.os, "cpu_count", lambda: 1)
    assert not sp.wanted(_config(), both)
    monkeypatch.setattr(sp.os, "cpu_count", lambda: 2)
    monkeypatch.setenv(sp.ENV, "1")
    assert not sp.wanted(_config(), both)


def _session(tmp_path, second_passes: bool, env=None) -> subprocess.CompletedProcess:
    """A pytest session over a folder with this suite's hooks, a passing test in a file of the
    first process and a test in a file of ``SECOND``."""
    (tmp_path / "conftest.py").write_text(
        "from tbo_parity.parity_tests.conftest import (  # noqa: F401\n"
        "    pytest_runtestloop, pytest_sessionfinish, pytest_terminal_summary)\n")
    (tmp_path / A_FIRST_FILE).write_text("def test_here():\n    pass\n")
    (tmp_path / A_SECOND_FILE).write_text(
        f"def test_there():\n    assert {second_passes}, 'the planted failure'\n")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(tmp_path)], capture_output=True, text=True, cwd=tmp_path,
                          env=sp.os.environ | {"PYTHONPATH": str(ROOT), sp.ENV: "0"} | (env or {}),
                          timeout=300)


@pytest.mark.skipif((sp.os.cpu_count() or 1) < 2, reason="one core: no second process")
def test_a_failure_in_the_second_process_fails_the_session_and_is_printed(tmp_path):
    result = _session(tmp_path, second_passes=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "second process" in result.stdout
    assert "the planted failure" in result.stdout and "test_there" in result.stdout
    assert "1 passed" in result.stdout  # the first process's own test ran and passed


@pytest.mark.skipif((sp.os.cpu_count() or 1) < 2, reason="one core: no second process")
def test_a_passing_second_process_is_summarised_and_the_session_passes(tmp_path):
    result = _session(tmp_path, second_passes=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 tests of" in result.stdout and "exit status 0: 1 passed" in result.stdout


def test_the_switch_keeps_every_test_in_one_process(tmp_path):
    result = _session(tmp_path, second_passes=False, env={sp.ENV: "1"})
    assert result.returncode == 1
    assert "second process" not in result.stdout
    assert "1 failed, 1 passed" in result.stdout
