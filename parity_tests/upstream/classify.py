"""The comparison and its classification: every probe on both sides, under every EXTEND
rule and data-parallel rule; each difference either expected (the spec's documented choices, a
mode one side lacks) or unexplained; the ``Report`` of the rule the release follows.

This module is the mutation run's scope in the package (docs/testing.md).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

from tbo_parity.parity_tests.upstream.batches import Lazy, Probe, UpstreamMode
from tbo_parity.parity_tests.upstream.lift import ROLES, RULE_ROLES, Release
from tbo_parity.parity_tests.upstream.outcomes import (IDLE_REPLAY_DIVIDES, SPEC_REJECTS,
                                                       MissingMode, Raised, call_release)

DOCUMENTED = 'docs/spec.md, "Where this spec deliberately differs from upstream SGLang"'


def upstream_outcome(release: Release, probe: Probe, rule: str):
    values = probe.values.function(rule) if isinstance(probe.values, Lazy) else probe.values
    resolved = {}
    for name, value in values.items():
        modes = value if isinstance(value, list) else [value]
        missing = [mode for mode in modes if isinstance(mode, UpstreamMode)
                   and mode not in release.forward_mode.__members__]
        if missing:
            return MissingMode(f"KeyError: the release has no ForwardMode.{missing[0]}")
        if isinstance(value, UpstreamMode):
            value = release.forward_mode[value]
        elif isinstance(value, list) and value and isinstance(value[0], UpstreamMode):
            value = [release.forward_mode[v].value for v in value]
        resolved[name] = value
    raw = call_release(release, probe.role, resolved, probe.threshold)
    return probe.post(raw) if probe.post else raw


def classify(release: Release, probe: Probe, ours, theirs) -> Optional[str]:
    """None when the outcomes agree, else why they differ: an expected difference ("expected:
    ...") or "differs"."""
    if ours == theirs:
        return None
    if probe.mode == "MIXED":
        return "expected: MIXED, a mode the spec does not cover"
    if probe.mode == "TARGET_VERIFY" and not release.has_target_verify:
        return "expected: TARGET_VERIFY, a mode this release does not have yet"
    if isinstance(theirs, MissingMode):
        return f"expected: {theirs.error.rsplit('.', 1)[-1]}, a mode this release does not have"
    if probe.role == "replay_split" and probe.mode == "IDLE" and theirs == IDLE_REPLAY_DIVIDES:
        return f"expected: IDLE graph replay ({DOCUMENTED})"
    if probe.invalid and ours == SPEC_REJECTS:
        return f"expected: validation, a ValueError where upstream {_verb(theirs)} ({DOCUMENTED})"
    return "differs"


def _verb(outcome) -> str:
    return f"raises {outcome.error}" if isinstance(outcome, Raised) else "returns a value"


@dataclasses.dataclass
class RoleResult:
    cases: int = 0
    agree: int = 0
    expected: dict = dataclasses.field(default_factory=dict)  # reason -> count
    differ: int = 0
    examples: list = dataclasses.field(default_factory=list)  # (literal, spec, upstream)


@dataclasses.dataclass
class Report:
    release: Release
    rule: Optional[str]  # the EXTEND rule the release matches (None: no rule matches)
    rule_counts: dict  # rule -> disagreements of the EXTEND rule functions under it
    results: dict  # role -> RoleResult, under ``rule`` (or the default when None)
    seconds: float
    # The data-parallel rule the release matches (None: it matches none, compared under the
    # default, or it has no data-parallel agreement), and its disagreements per rule ({}: none).
    dp_rule: Optional[str] = None
    dp_rule_counts: dict = dataclasses.field(default_factory=dict)

    @property
    def unexplained(self) -> int:
        return sum(r.differ for r in self.results.values())

    @property
    def ok(self) -> bool:
        return self.rule is not None and self.unexplained == 0


def compare(release: Release, probes: list, examples: int = 3) -> Report:
    """Every probe on both sides, under every EXTEND rule; the report of the matching one. The
    data-parallel reports are compared under the first data-parallel rule they all agree with
    (the default when none does: their disagreements stay unexplained)."""
    from tbo_parity.reference.split import (DEFAULT_DP_RULE, DEFAULT_EXTEND_SPLIT, DP_RULES,
                                            EXTEND_SPLITS)

    start = time.perf_counter()
    runnable = [p for p in probes if p.role in release.roles
                and not release.roles[p.role].problem]
    fixed = {id(p): upstream_outcome(release, p, DEFAULT_EXTEND_SPLIT) for p in runnable
             if not isinstance(p.values, Lazy)}
    dp = [p for p in runnable if p.dp_spec is not None]
    dp_counts = {dp_rule: sum(classify(release, p, p.dp_spec[dp_rule], fixed[id(p)]) == "differs"
                              for p in dp) for dp_rule in DP_RULES} if dp else {}
    dp_matching = [dp_rule for dp_rule in DP_RULES if dp_counts.get(dp_rule) == 0]
    dp_rule = dp_matching[0] if dp_matching else None
    per_rule, counts = {}, {}
    for rule in EXTEND_SPLITS:
        results = {role.name: RoleResult() for role in ROLES if role.name in release.roles}
        counts[rule] = 0  # the rule is told by EXTEND calls of the rule functions alone
        for probe in runnable:
            ours = probe.spec(rule) if probe.dp_spec is None else \
                probe.dp_spec[dp_rule or DEFAULT_DP_RULE]
            theirs = fixed.get(id(probe))
            if theirs is None and id(probe) not in fixed:
                theirs = upstream_outcome(release, probe, rule)
            verdict = classify(release, probe, ours, theirs)
            result = results[probe.role]
            result.cases += 1
            if verdict is None:
                result.agree += 1
            elif verdict == "differs":
                result.differ += 1
                counts[rule] += probe.mode == "EXTEND" and probe.role in RULE_ROLES
                if len(result.examples) < examples:
                    result.examples.append((probe.literal, ours, theirs))
            else:
                result.expected[verdict] = result.expected.get(verdict, 0) + 1
        per_rule[rule] = results
    matching = [rule for rule in EXTEND_SPLITS if counts[rule] == 0]
    rule = matching[0] if matching else None
    return Report(release, rule, counts, per_rule[rule or DEFAULT_EXTEND_SPLIT],
                  time.perf_counter() - start, dp_rule, dp_counts)
