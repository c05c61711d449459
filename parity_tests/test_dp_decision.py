"""Data-parallel agreement: both sides decide alike, and the decision obeys the rule, under
each of the rules ("idle_left_out", the default, and "idle_as_decode", SGLang 0.4.7 to
0.4.9.post3's); a bad rule name is a ValueError naming ``dp_rule``, the same on both sides."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import pytest

from tbo_parity.reference import split as spec
from tbo_parity.torch_impl import two_batch_overlap as impl

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


# ---------------------------------------------------------------------------------------------
# The rules (docs/spec.md, "Data-parallel agreement"): "idle_left_out" (the default) and
# "idle_as_decode" (SGLang 0.4.7 to 0.4.9.post3: an idle rank counts as DECODE).
# ---------------------------------------------------------------------------------------------

RULES = ("idle_left_out", "idle_as_decode")


def _name(decision):
    run, mode = decision
    return run, None if mode is None else mode.name


def _old_rule(ranks):
    """SGLang 0.4.7's TboDPAttentionPreparer, on names: every rank's mode (an idle one sent as
    IDLE) with IDLE turned into DECODE; TBO iff every rank can run it and all modes are equal."""
    modes = ["DECODE" if m in (None, "IDLE") else m for _, m in ranks]
    agree = all(m == modes[0] for m in modes)
    run = all(can for can, _ in ranks) and agree
    return run, (modes[0] if run else None)


def test_the_rules_and_the_default_are_the_documented_ones():
    assert spec.DP_RULES == impl.DP_RULES == RULES
    assert spec.DEFAULT_DP_RULE == impl.DEFAULT_DP_RULE == "idle_left_out"


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("num_ranks", [1, 2, 3])
def test_both_sides_decide_alike_under_every_rule(num_ranks, rule):
    for ranks in _all_rank_reports(num_ranks):
        ours = _name(spec.compute_dp_tbo_decision(_on(spec, ranks), dp_rule=rule))
        assert ours == _name(impl.compute_dp_tbo_decision(_on(impl, ranks), rule)), ranks
        if rule == "idle_left_out":  # the default is the rule applied without the argument
            assert ours == _name(spec.compute_dp_tbo_decision(_on(spec, ranks))), ranks


@pytest.mark.parametrize("num_ranks", [1, 2, 3])
def test_idle_as_decode_is_the_old_rule_and_differs_exactly_where_an_idle_rank_matters(
        num_ranks):
    """Under "idle_as_decode" both sides give 0.4.7's decision on every report. The rules
    differ only on reports with an idle rank and where every rank can run TBO: every rank idle
    (the old rule runs DECODE), or idle ranks beside busy ranks not in DECODE (the old rule
    refuses); everywhere else they agree."""
    differ = agree_with_idle = 0
    for ranks in _all_rank_reports(num_ranks):
        old = _name(impl.compute_dp_tbo_decision(_on(impl, ranks), "idle_as_decode"))
        assert old == _old_rule(ranks), ranks
        new = _name(impl.compute_dp_tbo_decision(_on(impl, ranks), "idle_left_out"))
        idle = any(m in (None, "IDLE") for _, m in ranks)
        busy = {m for _, m in ranks if m not in (None, "IDLE")}
        all_can = all(can for can, _ in ranks)
        expect_differ = idle and all_can and (not busy or busy != {"DECODE"}) and len(busy) <= 1
        assert (old != new) == expect_differ, ranks
        differ += old != new
        agree_with_idle += idle and old == new
    assert differ > 0 and agree_with_idle > 0


@pytest.mark.parametrize("side", [spec, impl], ids=["spec", "impl"])
@pytest.mark.parametrize("ranks, default, old", [
    # Every rank idle: the default does not run TBO; the old rule runs it as DECODE.
    ([(True, None)], (False, None), (True, "DECODE")),
    ([(True, "IDLE"), (True, None)], (False, None), (True, "DECODE")),
    # An idle rank beside EXTEND (or TARGET_VERIFY): the default runs it; the old rule refuses.
    ([(True, None), (True, "EXTEND")], (True, "EXTEND"), (False, None)),
    ([(True, "TARGET_VERIFY"), (True, "IDLE")], (True, "TARGET_VERIFY"), (False, None)),
    # Where they agree: an idle rank beside DECODE, no idle rank, a rank that cannot run TBO.
    ([(True, None), (True, "DECODE")], (True, "DECODE"), (True, "DECODE")),
    ([(True, "EXTEND"), (True, "EXTEND")], (True, "EXTEND"), (True, "EXTEND")),
    ([(False, None)], (False, None), (False, None)),
    ([(True, None), (False, "EXTEND")], (False, None), (False, None)),
])
def test_worked_examples_under_each_rule(side, ranks, default, old):
    assert _name(side.compute_dp_tbo_decision(_on(side, ranks))) == default
    assert _name(side.compute_dp_tbo_decision(_on(side, ranks), "idle_left_out")) == default
    assert _name(side.compute_dp_tbo_decision(_on(side, ranks), "idle_as_decode")) == old


@pytest.mark.parametrize("rule", RULES)
def test_the_pure_function_takes_the_rule_as_a_static_argument_under_jit_and_vmap(rule):
    reports = list(_all_rank_reports(2))
    index = {mode: i for i, mode in enumerate(spec.ForwardMode)}
    codes = jnp.asarray([[-1 if m in (None, "IDLE") else index[spec.ForwardMode[m]]
                          for _, m in ranks] for ranks in reports])
    can_run = jnp.asarray([[can for can, _ in ranks] for ranks in reports])
    run, code = jax.jit(jax.vmap(spec.dp_tbo_decision, in_axes=(0, 0, None)),
                        static_argnums=2)(can_run, codes, rule)
    for row, ranks in enumerate(reports):
        want = _name(impl.compute_dp_tbo_decision(_on(impl, ranks), rule))
        got = bool(run[row]), (list(spec.ForwardMode)[int(code[row])].name
                               if bool(run[row]) else None)
        assert got == want, ranks


BAD_RULES = ["current", "idle-as-decode", "", None, 1, True, ("idle_left_out",)]


@pytest.mark.parametrize("bad", BAD_RULES, ids=repr)
def test_a_bad_rule_is_a_value_error_naming_dp_rule_on_both_sides(bad):
    messages = []
    for side in (spec, impl):
        with pytest.raises(ValueError, match="^dp_rule must be one of") as error:
            side.compute_dp_tbo_decision([(True, side.ForwardMode.DECODE)], dp_rule=bad)
        messages.append(str(error.value))
    assert messages[0] == messages[1]
    with pytest.raises(ValueError, match="^dp_rule must be one of"):
        spec.dp_tbo_decision(jnp.asarray([True]), jnp.asarray([1]), bad)  # the pure one too
