"""Data-parallel agreement: both sides decide alike, and the decision obeys the rule."""

from __future__ import annotations

import itertools

import pytest

from reference import split as spec
from torch_impl import two_batch_overlap as impl

REPORTS = [None, "IDLE", "EXTEND", "DECODE", "TARGET_VERIFY", "MIXED"]


def _all_rank_reports(num_ranks):
    for combo in itertools.product([True, False], REPORTS, repeat=num_ranks):
        ranks = list(zip(combo[::2], combo[1::2]))
        if any(can and mode == "MIXED" for can, mode in ranks):
            continue  # a rank that can run TBO never reports MIXED (that is rejected)
        yield ranks


def _on(side, ranks):
    return [(can, None if m is None else side.ForwardMode[m]) for can, m in ranks]


@pytest.mark.parametrize("num_ranks", [1, 2, 3])
def test_both_sides_decide_alike_for_every_report_combination(num_ranks):
    for ranks in _all_rank_reports(num_ranks):
        run_s, mode_s = spec.compute_dp_tbo_decision(_on(spec, ranks))
        run_i, mode_i = impl.compute_dp_tbo_decision(_on(impl, ranks))
        assert (run_s, None if mode_s is None else mode_s.name) == (
            run_i, None if mode_i is None else mode_i.name), ranks


@pytest.mark.parametrize("num_ranks", [1, 2, 3])
def test_decision_runs_tbo_exactly_when_all_can_and_busy_ranks_agree(num_ranks):
    for ranks in _all_rank_reports(num_ranks):
        busy = {m for _, m in ranks if m not in (None, "IDLE")}
        expected = all(can for can, _ in ranks) and len(busy) == 1
        run, mode = impl.compute_dp_tbo_decision(_on(impl, ranks))
        assert run == expected, ranks
        assert (mode.name if run else mode) == (busy.pop() if expected else None), ranks
