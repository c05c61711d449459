"""The upstream checker's classification (parity_tests/upstream/: ``classify``, ``compare``,
``Report`` in classify.py, ``format_report`` in report.py, ``main`` in cli.py), offline.

What this file proves:

- each expected difference the classifier knows (MIXED, a TARGET_VERIFY the release does not
  have yet, IDLE graph replay, validation) is given its own reason, and the neighbouring
  difference that is *not* that one (the same outcome in EXTEND, in a release that has
  TARGET_VERIFY, in IDLE outside graph replay, on input the spec accepts) is unexplained;
- the EXTEND rule a release follows is named from the rule functions alone: a change in a
  function outside the rules (the data-parallel agreement) leaves the rule detected;
- the data-parallel rule a release follows is named too (``reference.split.DP_RULES``): the
  old agreement of 0.4.7 to 0.4.9.post3 ("idle_as_decode") passes with exit status 0, while a
  data-parallel bug that fits neither rule is reported as unexplained disagreements, with exit
  status 1;
- each of ``reference.split.EXTEND_SPLITS`` is named for a module that follows it, and a module
  that follows none is reported as matching no rule;
- ``Report`` counts only unexplained disagreements, and is ok only under a rule.

The EXTEND rule is told from EXTEND calls of the rule functions alone: an IDLE (or other
non-EXTEND) bug inside a rule function leaves the release's rule named and the bug reported
(this file found that it once counted against every rule and hid the rule).

The modules are those of parity_tests/test_upstream.py (written from docs/spec.md in the shape
of an SGLang split module), each changed here in one place. Nothing needs the network.
"""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

from tbo_parity.parity_tests.split_parity import SplitCase  # also for eval of reported literals
from parity_tests.test_upstream import BALANCED_ONLY, FAITHFUL
from tbo_parity.parity_tests.upstream import batches, classify, fetch, lift, outcomes
from tbo_parity.parity_tests.upstream import cli as upstream_cli
from tbo_parity.parity_tests.upstream.report import format_report
from tbo_parity.reference.split import DEFAULT_EXTEND_SPLIT, EXTEND_SPLITS

# The reasons, as the spec and docs/upstream.md name the expected differences.
CITATION = 'docs/spec.md, "Where this spec deliberately differs from upstream SGLang"'
SECTION = CITATION.split('"')[1]
MIXED = "expected: MIXED, a mode the spec does not cover"
NO_TARGET_VERIFY = "expected: TARGET_VERIFY, a mode this release does not have yet"
IDLE_REPLAY = f"expected: IDLE graph replay ({CITATION})"
UNEXPLAINED = "differs"


def validation(upstream_did: str) -> str:
    return f"expected: validation, a ValueError where upstream {upstream_did} ({CITATION})"


def changed(text: str, old: str, new: str) -> str:
    """``text`` with its one occurrence of ``old`` replaced (the fixture must really change)."""
    assert text.count(old) == 1, old
    return text.replace(old, new)


# 0.4.9 and later: IDLE graph replay divides by IDLE's token_num_per_seq of 0.
IDLE_REPLAY_DIVIDES = changed(
    FAITHFUL, "        forward_mode, per_seq = ForwardMode.DECODE, 1\n",
    "        per_seq = cuda_graph_num_tokens // get_token_num_per_seq(forward_mode, spec_info)\n")
# The same division by 0, in the IDLE split of a real batch (not a graph replay): a bug.
IDLE_SPLIT_DIVIDES = changed(
    FAITHFUL, "        assert num_tokens == 0\n        return 0\n",
    "        return num_tokens // token_num_per_seq // 2\n")
# IDLE left out of the per-sequence token table (a function outside the EXTEND rule).
IDLE_TOKENS_MISSING = changed(
    FAITHFUL, "    return {ForwardMode.DECODE: 1, ForwardMode.IDLE: 0}.get(forward_mode)\n",
    "    return {ForwardMode.DECODE: 1}.get(forward_mode)\n")
# Wrong TARGET_VERIFY mask offsets (a TARGET_VERIFY-only function outside the EXTEND rule).
WRONG_MASK = changed(FAITHFUL, "    d = spec_info.draft_token_num\n",
                     "    d = spec_info.draft_token_num + 1\n")
# The rule "guarded_two_chunk": two-chunk refused when child A would hold more sequences than
# total // 2 tokens (docs/spec.md, "EXTEND split rules").
GUARDED = changed(
    FAITHFUL, "    return not (total * share <= left <= total * (1 - share))\n",
    "    lopsided = not (total * share <= left <= total * (1 - share))\n"
    "    return lopsided and _split_array_by_cum_less_than_half(extend_lens) + 1 <= total // 2\n")
# No rule: a balanced split exactly at the threshold counts as lopsided (strict bounds).
NO_RULE = changed(
    FAITHFUL, "    return not (total * share <= left <= total * (1 - share))\n",
    "    return not (total * share < left < total * (1 - share))\n")
# The data-parallel agreement of 0.4.7 to 0.4.9.post3 (docs/upstream.md): an idle rank counts
# as DECODE, the rule "idle_as_decode". Outside the EXTEND rule functions.
DP_CLASS = FAITHFUL[FAITHFUL.index("class TboDPAttentionPreparer:"):]
IDLE_AS_DECODE = (
    "        busy = [mode for mode in forward_modes if mode != ForwardMode.IDLE.value]\n",
    "        busy = [ForwardMode.DECODE.value if mode == ForwardMode.IDLE.value else mode\n"
    "                for mode in forward_modes]\n")
# A data-parallel bug that fits neither rule: an idle rank counts as EXTEND.
IDLE_AS_EXTEND = (
    IDLE_AS_DECODE[0],
    "        busy = [ForwardMode.EXTEND.value if mode == ForwardMode.IDLE.value else mode\n"
    "                for mode in forward_modes]\n")
BALANCED_WITH_DP = BALANCED_ONLY + "\n\n" + DP_CLASS
# BALANCED_ONLY with its own ForwardMode, which has no TARGET_VERIFY member.
OWN_MODES_WITHOUT_TARGET_VERIFY = '''
from enum import IntEnum, auto


class ForwardMode(IntEnum):
    EXTEND = auto()
    DECODE = auto()
    MIXED = auto()
    IDLE = auto()

    def is_extend(self):
        return self in (ForwardMode.EXTEND, ForwardMode.MIXED)

    def is_decode(self):
        return self == ForwardMode.DECODE

    def is_idle(self):
        return self == ForwardMode.IDLE
''' + BALANCED_ONLY


@pytest.fixture(scope="module")
def probes():
    """A small run's probes: one generated batch per mode, MIXED, the degenerate EXTEND
    batches that tell the rules apart, replays up to 8 slots, every data-parallel report of up
    to 3 ranks, bad input."""
    return batches.all_probes(batches.SpecSide(), cases_per_mode=1, seed=0, max_graph_bs=8)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """``release(text)``: the module ``text`` loaded as a release (one file per call)."""
    def load(text):
        path = tmp_path_factory.mktemp("release") / "two_batch_overlap.py"
        path.write_text(text)
        return lift.load_release(fetch.read_source(path))
    return load


def one(probes, role, mode=None, literal=None, invalid=False):
    """The probe of ``role`` (in ``mode``, whose literal is ``literal``)."""
    found = [p for p in probes if p.role == role and p.invalid == invalid
             and mode in (None, p.mode) and literal in (None, p.literal)]
    assert found, (role, mode, literal)
    return found[0]


def has_idle_rank(probe) -> bool:
    return "IDLE" in probe.values["forward_modes"]  # an idle rank (mode None) is sent as IDLE


# ---------------------------------------------------------------------------------------------
# classify: each expected difference, and its neighbour that is not one.
# ---------------------------------------------------------------------------------------------


def test_outcomes_that_agree_are_no_difference_in_any_mode(release, probes):
    """Equal outcomes are agreement (None), even where a difference would be excused; the
    same probes with unequal outcomes are not."""
    without_tv = release(BALANCED_ONLY)
    assert not without_tv.has_target_verify
    excusable = [one(probes, "split_seq_index", "MIXED"),
                 one(probes, "split_seq_index", "TARGET_VERIFY"),
                 one(probes, "replay_split", "IDLE"),
                 one(probes, "split_seq_index", invalid=True)]
    for probe in excusable:
        ours = probe.spec(DEFAULT_EXTEND_SPLIT)
        assert classify.classify(without_tv, probe, ours, ours) is None, probe.literal
        assert classify.classify(without_tv, probe, ours, outcomes.Raised("ZeroDivisionError")) \
            is not None, probe.literal


def test_an_idle_replay_difference_is_excused_and_no_other_idle_or_replay_one(release, probes):
    """IDLE graph replay (upstream divides by IDLE's 0 tokens per sequence) is the documented
    difference; the same division in IDLE outside graph replay (the split of a real batch, a
    data-parallel report of idle ranks) and a DECODE replay difference are unexplained."""
    faithful = release(FAITHFUL)
    divides = outcomes.Raised("ZeroDivisionError")
    idle_replays = [p for p in probes if p.role == "replay_split" and p.mode == "IDLE"]
    assert len(idle_replays) == 8 + 2  # graph sizes 0..8, and twice the largest
    for probe in idle_replays:
        assert classify.classify(faithful, probe, probe.spec(DEFAULT_EXTEND_SPLIT), divides) \
            == IDLE_REPLAY
    decode_replay = one(probes, "replay_split", "DECODE")
    assert classify.classify(faithful, decode_replay, decode_replay.spec(DEFAULT_EXTEND_SPLIT),
                             divides) == UNEXPLAINED
    idle_batch = [p for p in probes if p.mode == "IDLE" and p.role != "replay_split"
                  and not p.invalid]
    assert {p.role for p in idle_batch} >= {"token_num_per_seq", "split_seq_index",
                                            "split_token_index"}
    for probe in idle_batch:
        assert classify.classify(faithful, probe, probe.spec(DEFAULT_EXTEND_SPLIT), divides) \
            == UNEXPLAINED, probe.role
    all_idle = one(probes, "dp_agreement", literal="compute_dp_tbo_decision([(True, None)])")
    assert classify.classify(faithful, all_idle, all_idle.spec(DEFAULT_EXTEND_SPLIT),
                             (True, "DECODE")) == UNEXPLAINED
    # The reason cites a section the spec really has.
    spec_text = (pathlib.Path(__file__).parents[1] / "docs" / "spec.md").read_text()
    assert f"## {SECTION}\n" in spec_text and "**IDLE graph replay.**" in spec_text


def test_only_the_documented_idle_replay_difference_is_excused(release, probes):
    """The excuse is the division by zero of 0.4.9 on (docs/upstream.md); an IDLE replay that
    returns a wrong split instead (an 8-slot graph cut at (3, 3), where the spec gives (4, 4))
    is unexplained."""
    faithful = release(FAITHFUL)
    eight = [p for p in probes if p.role == "replay_split" and p.mode == "IDLE"
             and p.spec(DEFAULT_EXTEND_SPLIT) == (4, 4)]
    assert eight
    for probe in eight:
        ours = probe.spec(DEFAULT_EXTEND_SPLIT)
        assert classify.classify(faithful, probe, ours, (3, 3)) == UNEXPLAINED
        assert classify.classify(faithful, probe, ours, outcomes.Raised("ZeroDivisionError")) \
            == IDLE_REPLAY


def test_a_dp_report_naming_a_mode_the_release_lacks_is_an_outcome_not_a_crash(release,
                                                                              probes):
    """A data-parallel report with a TARGET_VERIFY rank, against a release whose ForwardMode
    has no TARGET_VERIFY: the outcome "no such mode", excused as a mode the release lacks;
    a report of modes it has still runs and agrees."""
    old = release(OWN_MODES_WITHOUT_TARGET_VERIFY + "\n\n" + DP_CLASS)
    dp = [p for p in probes if p.role == "dp_agreement"]
    naming = [p for p in dp if "TARGET_VERIFY" in p.values["forward_modes"]]
    others = [p for p in dp if "TARGET_VERIFY" not in p.values["forward_modes"]]
    assert naming and others
    for probe in naming:
        theirs = classify.upstream_outcome(old, probe, DEFAULT_EXTEND_SPLIT)
        assert isinstance(theirs, outcomes.MissingMode), (probe.literal, theirs)
        assert classify.classify(old, probe, probe.spec(DEFAULT_EXTEND_SPLIT), theirs) == \
            "expected: TARGET_VERIFY, a mode this release does not have"
    for probe in others:
        theirs = classify.upstream_outcome(old, probe, DEFAULT_EXTEND_SPLIT)
        assert theirs == probe.spec(DEFAULT_EXTEND_SPLIT), probe.literal
    report = classify.compare(old, dp)
    assert report.results["dp_agreement"].differ == 0


def test_a_validation_difference_is_excused_only_on_bad_input_the_spec_rejects(release, probes):
    """Bad input: a ValueError where upstream asserts (or returns a value) is expected, named
    by what upstream did; upstream's own ValueError is agreement. The same outcomes on a probe
    not marked bad input, or where the spec does not reject, are unexplained."""
    faithful = release(FAITHFUL)
    bad = [p for p in probes if p.invalid]
    assert len(bad) == 5
    asserts = outcomes.Raised("AssertionError")
    for probe in bad:
        ours = probe.spec(DEFAULT_EXTEND_SPLIT)
        assert ours == outcomes.SPEC_REJECTS, probe.literal  # docs/spec.md, "Bad input"
        assert classify.classify(faithful, probe, ours, asserts) == \
            validation("raises AssertionError")
        assert classify.classify(faithful, probe, ours, 1) == validation("returns a value")
        assert classify.classify(faithful, probe, ours, outcomes.Raised("ValueError")) is None
        accepted = dataclasses.replace(probe, invalid=False)
        assert classify.classify(faithful, accepted, ours, asserts) == UNEXPLAINED
        assert classify.classify(faithful, probe, 0, asserts) == UNEXPLAINED  # spec accepts
        assert classify.classify(faithful, probe, 0, 1) == UNEXPLAINED


def test_a_mixed_difference_is_excused_and_the_same_extend_difference_is_not(release, probes):
    """MIXED is a mode the spec does not cover: any difference there is expected; the same
    probe and outcomes in EXTEND are unexplained."""
    faithful = release(FAITHFUL)
    mixed = [p for p in probes if p.mode == "MIXED"]
    assert {p.role for p in mixed} == {"token_num_per_seq", "split_seq_index",
                                       "split_token_index"}
    raises = outcomes.Raised("NotImplementedError")
    for probe in mixed:
        ours = probe.spec(DEFAULT_EXTEND_SPLIT)
        assert classify.classify(faithful, probe, ours, raises) == MIXED
        assert classify.classify(faithful, dataclasses.replace(probe, mode="EXTEND"), ours,
                                 raises) == UNEXPLAINED


def test_target_verify_is_excused_only_in_a_release_without_it(release, probes):
    """A TARGET_VERIFY difference is expected in a release that has no TARGET_VERIFY yet, and
    unexplained in one that has it; a DECODE difference is unexplained in either."""
    without_tv, with_tv = release(BALANCED_ONLY), release(FAITHFUL)
    assert (without_tv.has_target_verify, with_tv.has_target_verify) == (False, True)
    verify = [p for p in probes if p.mode == "TARGET_VERIFY" and not p.invalid]
    assert {p.role for p in verify} >= {"split_seq_index", "replay_split", "mask_offset"}
    asserts = outcomes.Raised("AssertionError")
    for probe in verify:
        ours = probe.spec(DEFAULT_EXTEND_SPLIT)
        assert classify.classify(without_tv, probe, ours, asserts) == NO_TARGET_VERIFY
        assert classify.classify(with_tv, probe, ours, asserts) == UNEXPLAINED
    decode = [p for p in probes if p.mode == "DECODE" and not p.invalid]
    assert decode
    for probe in decode:
        ours = probe.spec(DEFAULT_EXTEND_SPLIT)
        assert classify.classify(without_tv, probe, ours, asserts) == UNEXPLAINED


def test_a_mode_the_release_enum_lacks_is_an_outcome_that_is_excused(release, probes):
    """A release whose own ForwardMode has no TARGET_VERIFY: a TARGET_VERIFY call is the outcome
    "no such mode" (not a crash), excused as a mode the release lacks; an EXTEND call runs."""
    old = release(OWN_MODES_WITHOUT_TARGET_VERIFY)
    assert old.forward_mode_origin != "stand-in"
    assert "TARGET_VERIFY" not in old.forward_mode.__members__
    verify = one(probes, "split_seq_index", "TARGET_VERIFY")
    theirs = classify.upstream_outcome(old, verify, DEFAULT_EXTEND_SPLIT)
    assert theirs == outcomes.MissingMode(
        "KeyError: the release has no ForwardMode.TARGET_VERIFY")
    assert classify.classify(old, verify, verify.spec(DEFAULT_EXTEND_SPLIT), theirs) == \
        NO_TARGET_VERIFY
    extend = one(probes, "split_seq_index", literal=repr(SplitCase(
        "EXTEND", (100, 2000), (100, 2000), (0, 0))))  # a degenerate batch: balanced at 1
    assert classify.upstream_outcome(old, extend, "balanced") == extend.spec("balanced") == 1


# ---------------------------------------------------------------------------------------------
# compare: expected differences of whole modules, and the EXTEND rule.
# ---------------------------------------------------------------------------------------------


def test_idle_replay_dividing_by_zero_is_expected_and_the_release_agrees(release, probes):
    """A module whose IDLE replay divides by 0 agrees, every IDLE replay counted as the
    expected IDLE difference; the module that replays IDLE as DECODE needs no excuse."""
    idle_replays = sum(p.role == "replay_split" and p.mode == "IDLE" for p in probes)
    report = classify.compare(release(IDLE_REPLAY_DIVIDES), probes)
    replay = report.results["replay_split"]
    assert replay.expected == {IDLE_REPLAY: idle_replays} and replay.differ == 0
    assert report.rule == DEFAULT_EXTEND_SPLIT and report.ok
    text = format_report(report)
    assert f"  replay_split: {idle_replays} x {IDLE_REPLAY}" in text
    assert "verdict: AGREES" in text

    faithful = classify.compare(release(FAITHFUL), probes).results["replay_split"]
    assert faithful.expected == {} and faithful.agree == faithful.cases


def test_an_idle_difference_outside_graph_replay_is_unexplained(release, probes):
    """IDLE left out of the per-sequence token table: every IDLE call of that function is an
    unexplained disagreement, none excused as IDLE replay, and the release fails under the
    rule it still follows."""
    idle_calls = sum(p.role == "token_num_per_seq" and p.mode == "IDLE" for p in probes)
    assert idle_calls
    report = classify.compare(release(IDLE_TOKENS_MISSING), probes)
    result = report.results["token_num_per_seq"]
    assert result.differ == idle_calls == report.unexplained
    assert not any("IDLE" in reason for r in report.results.values() for reason in r.expected)
    assert report.rule == DEFAULT_EXTEND_SPLIT and not report.ok
    literal, ours, theirs = result.examples[0]
    assert eval(literal).mode == "IDLE" and (ours, theirs) == (0, None)


def test_an_idle_division_by_zero_outside_graph_replay_is_unexplained(release, probes):
    """The division by IDLE's 0 that is excused in graph replay, made in the split of a real
    IDLE batch: every such call is unexplained, none excused, the release fails."""
    idle_splits = sum(p.role == "split_seq_index" and p.mode == "IDLE" and not p.invalid
                      for p in probes)
    assert idle_splits
    report = classify.compare(release(IDLE_SPLIT_DIVIDES), probes)
    result = report.results["split_seq_index"]
    assert result.differ == idle_splits == report.unexplained
    assert not any("IDLE" in reason for r in report.results.values() for reason in r.expected)
    assert not report.ok
    literal, ours, theirs = result.examples[0]
    assert eval(literal).mode == "IDLE" and (ours, theirs) == (
        0, outcomes.Raised("ZeroDivisionError"))


def test_a_non_extend_bug_in_a_rule_function_leaves_the_extend_rule_detected(release, probes):
    """The EXTEND rule is told from EXTEND calls: an IDLE bug in compute_split_seq_index
    leaves the module's rule named, the bug reported as unexplained."""
    report = classify.compare(release(IDLE_SPLIT_DIVIDES), probes)
    assert report.rule == DEFAULT_EXTEND_SPLIT, report.rule_counts
    assert report.unexplained > 0 and not report.ok


def test_target_verify_differences_are_unexplained_once_the_release_has_it(release, probes):
    """A release without TARGET_VERIFY agrees, its TARGET_VERIFY calls expected; in a release
    with TARGET_VERIFY, wrong mask offsets are unexplained, and the same module taken as a
    release without TARGET_VERIFY has them expected."""
    without_tv = classify.compare(release(BALANCED_ONLY), probes)
    seq = without_tv.results["split_seq_index"]
    assert seq.expected.get(NO_TARGET_VERIFY, 0) > 0 and seq.differ == 0
    assert without_tv.rule == "balanced" and without_tv.ok

    wrong = release(WRONG_MASK)
    assert wrong.has_target_verify
    report = classify.compare(wrong, probes)
    mask = report.results["mask_offset"]
    assert mask.differ > 0 and mask.expected == {} and report.unexplained == mask.differ
    assert all(eval(literal.split(" (mask")[0]).mode == "TARGET_VERIFY"
               for literal, _, _ in mask.examples)
    assert report.rule == DEFAULT_EXTEND_SPLIT and not report.ok

    older = classify.compare(dataclasses.replace(wrong, has_target_verify=False), probes)
    assert older.results["mask_offset"].expected == {NO_TARGET_VERIFY: mask.differ}
    assert older.results["mask_offset"].differ == 0 and older.ok


@pytest.mark.parametrize("text, rule", [(BALANCED_ONLY, "balanced"), (FAITHFUL, "two_chunk"),
                                        (GUARDED, "guarded_two_chunk"), (NO_RULE, None)],
                         ids=["balanced", "two_chunk", "guarded_two_chunk", "no_rule"])
def test_the_extend_rule_a_module_follows_is_named_and_none_when_it_follows_none(
        release, probes, text, rule):
    """Each EXTEND rule is named for the module that follows it (no disagreement under it,
    some under each other rule); a module that follows none is named none and fails."""
    report = classify.compare(release(text), probes)
    assert report.rule == rule, format_report(report)
    assert set(report.rule_counts) == set(EXTEND_SPLITS)
    for other in EXTEND_SPLITS:
        assert (report.rule_counts[other] == 0) == (other == rule), report.rule_counts
    text = format_report(report)
    if rule is None:
        assert not report.ok
        assert "EXTEND rule: matches NO rule" in text and "verdict: matches no EXTEND rule" in text
    else:
        assert report.ok and report.unexplained == 0
        assert f"EXTEND rule: {rule}  (" in text and "verdict: AGREES" in text


# ---------------------------------------------------------------------------------------------
# The data-parallel rule: named like the EXTEND rule; a bug that fits neither rule is reported.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, rule", [(FAITHFUL, "two_chunk"), (BALANCED_WITH_DP, "balanced"),
                                        (GUARDED, "guarded_two_chunk")],
                         ids=["two_chunk", "balanced", "guarded_two_chunk"])
def test_the_old_dp_rule_is_named_and_the_extend_rule_still_detected(
        release, probes, text, rule):
    """An idle rank counted as DECODE (the agreement of 0.4.7 to 0.4.9.post3): the release is
    named "idle_as_decode", its data-parallel reports all agree under it, and it passes; the
    EXTEND rule is named as without it, with the same per-rule counts. The same module with
    the current agreement is named "idle_left_out"."""
    good = classify.compare(release(text), probes)
    assert good.rule == rule and good.ok and good.results["dp_agreement"].agree > 0
    assert good.dp_rule == "idle_left_out"
    assert good.dp_rule_counts["idle_left_out"] == 0 < good.dp_rule_counts["idle_as_decode"]
    assert f"DP rule:     idle_left_out  (" in format_report(good)

    old = classify.compare(release(changed(text, *IDLE_AS_DECODE)), probes)
    assert old.rule == rule and old.rule_counts == good.rule_counts
    assert old.dp_rule == "idle_as_decode" and old.ok and old.unexplained == 0
    dp = old.results["dp_agreement"]
    assert dp.cases == dp.agree > 0 and dp.expected == {} and dp.examples == []
    text_out = format_report(old)
    assert "DP rule:     idle_as_decode  (" in text_out and "verdict: AGREES" in text_out

    # Which reports the rules tell apart: some with an idle rank, none without one; as many as
    # the default rule counts against the release.
    dp_probes = [p for p in probes if p.role == "dp_agreement"]
    apart = [p for p in dp_probes if p.dp_spec["idle_left_out"] != p.dp_spec["idle_as_decode"]]
    assert apart and all(has_idle_rank(p) for p in apart)
    assert old.dp_rule_counts == {"idle_left_out": len(apart), "idle_as_decode": 0}
    assert good.dp_rule_counts == {"idle_left_out": 0, "idle_as_decode": len(apart)}
    # docs/spec.md, "Data-parallel agreement": every rank idle runs DECODE under the old rule
    # (not at all under the default); an idle rank beside EXTEND refuses it (the default runs
    # EXTEND). Under the default rule, each is an unexplained difference.
    for ranks, current, idle_as_decode in [
            ("[(True, None)]", (False, None), (True, "DECODE")),
            ("[(True, None), (True, 'EXTEND')]", (True, "EXTEND"), (False, None))]:
        probe = one(dp_probes, "dp_agreement", literal=f"compute_dp_tbo_decision({ranks})")
        theirs = classify.upstream_outcome(old.release, probe, rule)
        assert probe.dp_spec == {"idle_left_out": current, "idle_as_decode": idle_as_decode}
        assert theirs == idle_as_decode and probe.spec(rule) == current
        assert classify.classify(old.release, probe, current, theirs) == UNEXPLAINED


@pytest.mark.parametrize("text, rule", [(FAITHFUL, "two_chunk"), (BALANCED_WITH_DP, "balanced")],
                         ids=["two_chunk", "balanced"])
def test_a_dp_bug_that_fits_neither_rule_is_reported_and_the_extend_rule_still_detected(
        release, probes, text, rule):
    """An idle rank counted as EXTEND fits neither data-parallel rule: no rule is named, the
    reports are compared under the default and their disagreements are unexplained (those
    with an idle rank, and only those); the EXTEND rule is still named; the release fails."""
    good = classify.compare(release(text), probes)
    bad = classify.compare(release(changed(text, *IDLE_AS_EXTEND)), probes)
    assert bad.rule == rule and bad.rule_counts == good.rule_counts
    assert bad.dp_rule is None and min(bad.dp_rule_counts.values()) > 0
    dp = bad.results["dp_agreement"]
    assert dp.differ == bad.dp_rule_counts["idle_left_out"]  # compared under the default
    assert dp.expected == {} and bad.unexplained == dp.differ and not bad.ok
    text_out = format_report(bad)
    assert "DP rule:     matches NO rule; compared under the default  (" in text_out
    assert f"verdict: {dp.differ} unexplained disagreement(s)" in text_out
    dp_probes = [p for p in probes if p.role == "dp_agreement"]
    for probe in dp_probes:
        if not has_idle_rank(probe):
            assert probe.spec(rule) == classify.upstream_outcome(bad.release, probe, rule), \
                probe.literal
    assert 0 < dp.differ < sum(has_idle_rank(p) for p in dp_probes)
    all_idle = one(dp_probes, "dp_agreement", literal="compute_dp_tbo_decision([(True, None)])")
    assert classify.upstream_outcome(bad.release, all_idle, rule) == (True, "EXTEND")


def test_a_release_without_the_dp_agreement_names_no_dp_rule_and_prints_none(release, probes):
    """No data-parallel agreement in the module: nothing to name, no DP line, and it passes."""
    report = classify.compare(release(BALANCED_ONLY), probes)
    assert "dp_agreement" not in report.release.roles
    assert report.ok and report.dp_rule is None and report.dp_rule_counts == {}
    assert "DP rule:" not in format_report(report)


def test_the_cli_exits_0_on_the_old_dp_rule_naming_it_and_1_on_a_dp_bug_of_neither_rule(
        tmp_path, capsys, monkeypatch, probes):
    """`upstream --sglang_source=`: the old agreement exits 0 with both rules named; a
    data-parallel bug that fits neither rule exits 1, the EXTEND rule still named and the
    disagreement printed; the current agreement exits 0. (The run's probes are this file's
    small set: building the command's own is test_upstream.py's business.)"""
    monkeypatch.setattr(upstream_cli, "all_probes", lambda *args, **kwargs: probes)
    good, old, bad = tmp_path / "good.py", tmp_path / "old.py", tmp_path / "bad.py"
    good.write_text(FAITHFUL)
    old.write_text(changed(FAITHFUL, *IDLE_AS_DECODE))
    bad.write_text(changed(FAITHFUL, *IDLE_AS_EXTEND))
    flags = ["--cases_per_mode=1", "--examples=1"]
    assert upstream_cli.main(["upstream", f"--sglang_source={old}", *flags]) == 0
    out = capsys.readouterr().out
    assert "EXTEND rule: two_chunk  (" in out and "DP rule:     idle_as_decode  (" in out
    assert "verdict: AGREES" in out and "first disagreements:" not in out
    assert upstream_cli.main(["upstream", f"--sglang_source={bad}", *flags]) == 1
    out = capsys.readouterr().out
    assert "EXTEND rule: two_chunk  (" in out and "DP rule:     matches NO rule" in out
    assert "  dp_agreement: compute_dp_tbo_decision(" in out
    assert "unexplained disagreement(s)" in out and "verdict: AGREES" not in out
    assert upstream_cli.main(["upstream", f"--sglang_source={good}", *flags]) == 0
    out = capsys.readouterr().out
    assert "EXTEND rule: two_chunk  (" in out and "DP rule:     idle_left_out  (" in out
    assert "verdict: AGREES" in out and "first disagreements:" not in out
    # Both releases together: the worst status.
    assert upstream_cli.main(["upstream", f"--sglang_source={old}", f"--sglang_source={bad}",
                          *flags]) == 1


# ---------------------------------------------------------------------------------------------
# Report and compare's bookkeeping.
# ---------------------------------------------------------------------------------------------


def test_a_report_counts_only_unexplained_differences_and_is_ok_only_under_a_rule(release):
    """``unexplained`` sums the disagreements of every function, not the expected ones; ``ok``
    needs a rule and no unexplained disagreement."""
    loaded = release(BALANCED_ONLY)

    def report(rule, differ):
        results = {role: classify.RoleResult(cases=20, agree=10 - n, expected={MIXED: 10},
                                             differ=n) for role, n in zip(loaded.roles, differ)}
        return classify.Report(loaded, rule, {r: 0 for r in EXTEND_SPLITS}, results, 0.0)

    assert len(loaded.roles) == 3
    clean = report("balanced", (0, 0, 0))
    assert clean.unexplained == 0 and clean.ok
    one_off = report("balanced", (0, 1, 0))
    assert one_off.unexplained == 1 and not one_off.ok
    several = report("balanced", (2, 0, 3))
    assert several.unexplained == 5 and not several.ok
    assert not report(None, (0, 0, 0)).ok
    text = format_report(several)
    assert "verdict: 5 unexplained disagreement(s)" in text
    assert f"  split_seq_index: 10 x {MIXED}" in text


@pytest.mark.parametrize("examples", [0, 2])
def test_compare_counts_every_probe_once_and_keeps_at_most_the_examples_asked(
        release, probes, examples):
    """Per function, cases = agree + expected + differ over the probes run; at most
    ``examples`` disagreements are kept, every disagreement still counted."""
    report = classify.compare(release(changed(FAITHFUL, *IDLE_AS_EXTEND)), probes, examples)
    for role, result in report.results.items():
        run = sum(p.role == role for p in probes)
        assert result.cases == run == result.agree + sum(result.expected.values()) + \
            result.differ, role
        assert len(result.examples) == min(examples, result.differ), role
    assert report.results["dp_agreement"].differ > examples


def test_compare_keeps_three_examples_by_default_and_times_itself(release, probes):
    """The command's default of 3 examples per function, and the report's seconds: the
    duration of the comparison itself, within the wall time around the call (not a speed
    assertion: any duration passes that lies in that window)."""
    import time

    start = time.perf_counter()
    report = classify.compare(release(changed(FAITHFUL, *IDLE_AS_EXTEND)), probes)
    elapsed = time.perf_counter() - start
    dp = report.results["dp_agreement"]
    assert dp.differ > 3 and len(dp.examples) == 3
    assert 0 <= report.seconds <= elapsed
