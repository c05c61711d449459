"""Exhaustive verification (`tbo-parity verify`): every batch within bounds agrees, and the
check has teeth.

CI runs a subset of the default bounds: every default except ``max_seqs=4`` instead of 5, so
the 248,832 EXTEND batches of five sequences (per threshold and prefix pattern) are left to
``tbo-parity verify``, which runs the full default bounds (docs/spec.md, "Verified
exhaustively"). The subset still holds every family, every threshold, every draft count and
every replay pair up to 256.
"""

from __future__ import annotations

import pathlib
import pickle
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from tbo_parity.parity_tests import background
from tbo_parity.parity_tests import exhaustive as ex
from tbo_parity.parity_tests.split_parity import split_mismatches
from tbo_parity.reference import split as spec
from tbo_parity.torch_impl import two_batch_overlap as impl

CI_BOUNDS = ex.Bounds(max_seqs=4)


def _extend_count(max_seqs: int, max_len: int) -> int:
    return sum(max_len ** n for n in range(1, max_seqs + 1))


@background.job("verify-ci-bounds",
                background.reads(__name__, "test_every_batch_within_the_ci_bounds_agrees"))
def _verify_ci_bounds() -> list:
    """``ex.verify(CI_BOUNDS, workers=2)``'s reports, computed in a process of its own: a
    background job (parity_tests/background.py), 11 s on 2 cores. Two worker processes, as
    `tbo-parity verify` runs on a 2-core machine; the implementation's batch-by-batch loop runs
    outside the coverage tracer of `pytest --cov` (in the test process it ran 4x slower, 19 s
    of 25 on a 2-core machine). Its lines are covered in the test process by the other tests;
    the test needs its verdict."""
    with tempfile.TemporaryDirectory() as folder:
        out = pathlib.Path(folder) / "reports.pickle"
        code = ("import pickle, sys\n"
                "from parity_tests import exhaustive as ex\n"
                f"reports = ex.verify(ex.{CI_BOUNDS!r}, workers=2)\n"
                "with open(sys.argv[1], 'wb') as f:\n"
                "    pickle.dump(reports, f)\n")
        result = background.command([sys.executable, "-c", code, str(out)])
        if result.returncode != 0:
            raise RuntimeError(f"ex.verify exited with {result.returncode}:\n{result.stderr}")
        return pickle.loads(out.read_bytes())


def test_every_batch_within_the_ci_bounds_agrees():
    reports = {r.name: r for r in background.result("verify-ci-bounds")}
    runs = len(CI_BOUNDS.thresholds) + len(CI_BOUNDS.prefixes)
    assert reports["EXTEND"].batches == _extend_count(4, 12) * runs
    assert reports["DECODE, TARGET_VERIFY"].batches == 257 * (1 + 8)
    pairs = sum(g + 1 for g in range(1, 257))
    assert reports["graph replay"].batches == pairs * (1 + 8) + 256  # + IDLE at real_bs 0
    for report in reports.values():
        assert (report.disagreements, report.invariant_failures, report.first) == (0, 0, None)


def _first_minimiser(lens: list) -> int:
    """A plausible bug: the balanced split taking the *first* minimiser of |left - right|."""
    total, left, best, best_diff = sum(lens), 0, 0, None
    for i in range(1, len(lens)):
        left += lens[i - 1]
        diff = abs(2 * left - total)
        if best_diff is None or diff < best_diff:
            best, best_diff = i, diff
    return best


def test_a_planted_tie_bug_is_found_with_a_pasteable_counterexample(monkeypatch):
    monkeypatch.setattr(impl, "_balanced_split", _first_minimiser)
    report = ex.check_extend(ex.Bounds(max_seqs=3, max_len=4), ex.ImplRunner(1))
    assert report.disagreements > 0
    case, wrong = report.first
    assert case.mode == "EXTEND" and wrong == split_mismatches(case) != []
    lens = list(case.extend_lens)  # the counterexample really is a tie of two boundaries
    diffs = [abs(2 * sum(lens[:i]) - sum(lens)) for i in range(1, len(lens))]
    assert diffs.count(min(diffs)) == 2


def test_a_planted_replay_bug_is_found(monkeypatch):
    """The children's counts computed from the real batch instead of with padding in B."""
    monkeypatch.setattr(impl, "compute_children_num_token_non_padded",
                        lambda split, n: (split, n - split))
    report = ex.check_replay(ex.Bounds(max_graph_bs=6, max_draft=2), ex.ImplRunner(1))
    assert report.disagreements > 0
    case, wrong = report.first
    assert case.num_token_non_padded < case.num_tokens  # a padded replay
    assert any("children_num_token_non_padded" in line for line in wrong)


@pytest.mark.parametrize("field,row_change", [
    ("balanced", 1), ("split_token", 1), ("two_chunk", None), ("b_extend_seq_lens", 1),
    ("a_extend_prefix_lens", 1)])
def test_each_extend_invariant_catches_a_broken_spec_result(field, row_change):
    """Corrupt one batch's spec result: the invariants must flag exactly that batch."""
    lens, num_seqs = ex.extend_batches(3, 5)
    prefix = ex.prefix_array((2, 0, 1), num_seqs, 3)
    out = ex.spec_extend(lens, num_seqs, prefix, spec.DEFAULT_THRESHOLD)
    assert not any(mask.any() for mask in
                   ex.extend_invariants(lens, num_seqs, prefix, spec.DEFAULT_THRESHOLD,
                                        out).values())
    row = int(np.flatnonzero(num_seqs == 3)[7])
    broken = {name: value.copy() for name, value in out.items()}
    if row_change is None:
        broken[field][row] = ~broken[field][row]
    elif broken[field].ndim == 2:
        broken[field][row, 0] += row_change
    else:
        broken[field][row] += row_change
    flagged = np.zeros(len(lens), bool)
    for mask in ex.extend_invariants(lens, num_seqs, prefix, spec.DEFAULT_THRESHOLD,
                                     broken).values():
        flagged |= mask
    assert np.flatnonzero(flagged).tolist() == [row]


def test_replay_invariants_catch_a_split_that_follows_the_real_batch():
    graph_bs, real_bs = ex.replay_pairs(8)
    out = ex.spec_replay(graph_bs, real_bs, 2)
    wrong = dict(out, split_seq=real_bs // 2, split_token=(real_bs // 2) * 2)
    broken = ex.replay_invariants(graph_bs, real_bs, 2, wrong,
                                  ex.unpadded_splits(graph_bs, real_bs, wrong))
    assert broken["replay splits depend only on the captured size"].any()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tbo_parity.cli", *args],
                          capture_output=True, text=True)


@background.job("cli-verify",
                background.reads(__name__, "test_verify_command_prints_counts_and_exits_zero"))
def _verify_command() -> subprocess.CompletedProcess:
    """A background job (parity_tests/background.py): 5 s on 2 cores, mostly imports. One
    worker: these bounds take a moment in-process, and the worker pool runs in
    test_every_batch_within_the_ci_bounds_agrees."""
    return background.command([sys.executable, "-m", "tbo_parity.cli", "verify",
                               "--max_seqs=2", "--max_len=4", "--max_bs=8", "--max_draft=2",
                               "--max_graph_bs=8", "--workers=1"])


def test_verify_command_prints_counts_and_exits_zero():
    result = background.result("cli-verify")
    assert result.returncode == 0, result.stdout + result.stderr
    for family in ("EXTEND", "DECODE, TARGET_VERIFY", "graph replay", "IDLE"):
        assert family in result.stdout
    assert "0 disagreements" in result.stdout


def test_a_flag_of_the_other_command_is_refused():
    result = _cli("run", "--max_seqs=3", "--nomodel", "--cases_per_mode=1")
    assert result.returncode != 0 and "--max_seqs" in result.stdout + result.stderr
