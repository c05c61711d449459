"""The test batches, as probes: one call of one split function on both sides. The batches of
`tbo-parity run` (``parity_tests/cases.py``), degenerate and MIXED EXTEND batches, every
replay size, every data-parallel report of up to 3 ranks, and bad input.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import TYPE_CHECKING, Callable, Optional

from tbo_parity.parity_tests.upstream.outcomes import Raised, spec_outcome
from tbo_parity.parity_tests.upstream.stand_ins import SpecInfo

if TYPE_CHECKING:  # split_parity imports torch and JAX: the command's help must not wait
    from tbo_parity.parity_tests.split_parity import SplitCase

@dataclasses.dataclass(frozen=True)
class Probe:
    """One comparison. ``spec(rule)`` is the spec's outcome under an EXTEND rule (for a
    data-parallel report, under the default data-parallel rule; ``dp_spec`` holds it per rule);
    ``values`` the upstream arguments by name (``post`` turns the raw upstream result into the
    spec's form); ``literal`` a pasteable reproducer."""

    role: str
    mode: str
    literal: str
    spec: Callable
    values: dict
    rule_dependent: bool = False
    invalid: bool = False
    threshold: float = 0.48
    post: Optional[Callable] = None
    dp_spec: Optional[dict] = None  # data-parallel rule -> the spec's outcome under it


class SpecSide:
    """The spec's functions, with jitted pure helpers built once per run."""

    def __init__(self):
        import jax

        from tbo_parity.reference import split as spec

        self.spec = spec
        self._balanced = jax.jit(spec.balanced_split_index)
        self._straddling = jax.jit(spec.straddling_seq_index)
        self._two_chunk = jax.jit(spec.is_two_chunk, static_argnames="extend_split")

    @staticmethod
    def _padded(lens):
        import jax.numpy as jnp

        size = 8
        while size < len(lens):
            size *= 2
        return jnp.asarray(list(lens) + [0] * (size - len(lens)), dtype=jnp.int64)

    def _x64(self, function):
        import jax

        def run():
            with jax.enable_x64(True):
                return function()
        return run

    def balanced(self, lens):
        return self._x64(lambda: int(self._balanced(self._padded(lens), len(lens))))

    def straddling(self, lens):
        return self._x64(lambda: int(self._straddling(self._padded(lens))))

    def two_chunk(self, lens, threshold, rule):
        return self._x64(lambda: bool(self._two_chunk(self._padded(lens), len(lens), threshold,
                                                      extend_split=rule)))


def _memo(function):
    """``function(rule)`` computed once per rule (a probe's spec side is called per rule)."""
    results = {}

    def memoized(rule):
        if rule not in results:
            results[rule] = function(rule)
        return results[rule]
    return memoized


def case_probes(side: SpecSide, case: SplitCase) -> list:
    """The probes of one batch: every split function that applies to its mode."""
    spec, probes = side.spec, []
    mode_name = case.mode
    mode = spec.ForwardMode[mode_name]
    extend = case.extend_lens if mode_name in ("EXTEND", "MIXED") else None
    n = sum(extend) if extend is not None else case.num_tokens
    tnps = spec_outcome(lambda: spec.token_num_per_seq(mode, case.draft_token_num))
    tnps_arg = None if isinstance(tnps, Raised) else tnps
    spec_info = SpecInfo(case.draft_token_num) if mode_name == "TARGET_VERIFY" else None
    thr = case.threshold
    common = dict(mode=mode_name, literal=repr(case), threshold=thr)

    seq = _memo(lambda rule: spec_outcome(lambda: spec.compute_split_seq_index(
        mode, n, extend, tnps_arg, thr, extend_split=rule)))

    def seq_or_zero(rule):
        return seq(rule) if isinstance(seq(rule), int) else 0

    token = _memo(lambda rule: spec_outcome(lambda: spec.compute_split_token_index(
        seq_or_zero(rule), mode, extend, tnps_arg, thr, extend_split=rule)))
    upstream_mode = UpstreamMode(mode_name)

    probes.append(Probe("token_num_per_seq", spec=lambda rule: tnps,
                        values={"forward_mode": upstream_mode, "spec_info": spec_info}, **common))
    probes.append(Probe("split_seq_index", spec=seq, rule_dependent=True, values={
        "forward_mode": upstream_mode, "num_tokens": n, "extend_lens": extend,
        "token_num_per_seq": tnps_arg}, **common))
    probes.append(Probe("split_token_index", spec=token, rule_dependent=True, values=Lazy(
        lambda rule: {"split_seq_index": seq_or_zero(rule), "forward_mode": upstream_mode,
                      "extend_seq_lens": extend, "extend_lens": extend,
                      "token_num_per_seq": tnps_arg}), **common))
    if mode_name == "MIXED":
        return probes
    if mode_name == "EXTEND":
        lens = list(extend)
        probes.append(Probe("extend_split", spec=seq, rule_dependent=True,
                            values={"arr": lens, "extend_lens": lens}, **common))
        two_chunk = _memo(lambda rule: side.two_chunk(lens, thr, rule)())
        probes.append(Probe("two_chunk", spec=two_chunk, rule_dependent=True,
                            values={"extend_lens": lens, "arr": lens}, **common))
        balanced = side.balanced(lens)()
        probes.append(Probe("balanced_split", spec=lambda rule: balanced,
                            values={"arr": lens, "extend_lens": lens}, **common))
        straddling = side.straddling(lens)()
        probes.append(Probe("cum_half_split", spec=lambda rule: straddling,
                            values={"arr": lens, "extend_lens": lens}, **common))
    split_token = token(spec.DEFAULT_EXTEND_SPLIT)
    split_token = split_token if isinstance(split_token, int) else 0
    padded = n if case.num_token_non_padded is None else case.num_token_non_padded
    non_padded = spec_outcome(lambda: spec.compute_children_num_token_non_padded(
        split_token, padded))
    probes.append(Probe("children_non_padded", spec=lambda rule: non_padded, values={
        "tbo_split_token_index": split_token, "num_token_non_padded": padded}, **common))
    if mode_name == "TARGET_VERIFY":
        probes += mask_probes(case)
    return probes


class Lazy:
    """Upstream values that depend on the EXTEND rule (the split the spec computed under it)."""

    def __init__(self, function):
        self.function = function


class UpstreamMode(str):
    """A mode name, turned into the release's own ForwardMode member at call time."""


def mask_probes(case: SplitCase) -> list:
    """TARGET_VERIFY mask offsets at a few sequence boundaries (docs/spec.md, "Children")."""
    import numpy as np

    from tbo_parity.parity_tests.split_parity import _mask_range

    d, seq_lens = case.draft_token_num, case.seq_lens
    spec_info = SpecInfo(d, np.asarray(seq_lens, dtype=np.int64))
    probes = []
    for index in sorted({0, 1, len(seq_lens) // 2, len(seq_lens)} & set(range(len(seq_lens) + 1))):
        offset = _mask_range(seq_lens, d, (0, index))[1]
        probes.append(Probe("mask_offset", "TARGET_VERIFY",
                            f"{case!r} (mask offset of sequence {index})",
                            spec=lambda rule, offset=offset: offset,
                            values={"seq_index": index, "spec_info": spec_info}))
    return probes


def replay_probes(side: SpecSide, max_graph_bs: int = 256) -> list:
    """Every graph size 0..max_graph_bs (and twice it) in DECODE, TARGET_VERIFY (d = 1..8) and
    IDLE."""
    spec, probes = side.spec, []
    sizes = list(range(0, max_graph_bs + 1)) + [2 * max_graph_bs]
    for mode_name, draft in [("DECODE", None), ("IDLE", None)] + \
            [("TARGET_VERIFY", d) for d in range(1, 9)]:
        mode = spec.ForwardMode[mode_name]
        tnps = {"DECODE": 1, "IDLE": None}.get(mode_name, draft)
        for bs in sizes:
            tokens = bs * (tnps or 1)
            outcome = spec_outcome(lambda: spec.compute_split_indices_for_cuda_graph_replay(
                mode, tokens, tnps))
            probes.append(Probe(
                "replay_split", mode_name,
                f"compute_split_indices_for_cuda_graph_replay(ForwardMode.{mode_name}, "
                f"{tokens}, {tnps})", spec=lambda rule, outcome=outcome: outcome,
                values={"forward_mode": UpstreamMode(mode_name),
                        "cuda_graph_num_tokens": tokens, "token_num_per_seq": tnps,
                        "spec_info": SpecInfo(draft) if draft else None}))
    return probes


def dp_probes(side: SpecSide) -> list:
    """Every report of 1 to 3 ranks, each (can_run_tbo, mode or None), the spec's outcome under
    every data-parallel rule."""
    spec = side.spec
    reports = [(can, mode) for can in (True, False)
               for mode in (None, "IDLE", "EXTEND", "DECODE", "TARGET_VERIFY")]
    probes = []
    for ranks in itertools.chain.from_iterable(
            itertools.product(reports, repeat=k) for k in (1, 2, 3)):
        per_rank = [(can, None if mode is None else spec.ForwardMode[mode])
                    for can, mode in ranks]
        outcomes = {dp_rule: spec_outcome(
            lambda dp_rule=dp_rule: spec.compute_dp_tbo_decision(per_rank, dp_rule=dp_rule))
            for dp_rule in spec.DP_RULES}
        outcome = outcomes[spec.DEFAULT_DP_RULE]
        can_run = all(can for can, _ in ranks)
        probes.append(Probe(
            "dp_agreement", "DP", f"compute_dp_tbo_decision({list(ranks)!r})",
            spec=lambda rule, outcome=outcome: outcome, dp_spec=outcomes,
            values={"forward_modes": [UpstreamMode(mode or "IDLE") for _, mode in ranks]},
            post=lambda raw, can_run=can_run: _dp_result(raw, can_run)))
    return probes


def _dp_result(raw, can_run: bool):
    """(run_tbo, global mode) from the release's (global mode, modes agree) and the ranks'
    can_run_tbo, as its data-parallel preparer combines them."""
    if isinstance(raw, Raised):
        return raw
    mode, agree = raw
    run = bool(can_run and agree)
    return run, (mode if run else None)


def invalid_probes(side: SpecSide) -> list:
    """Bad input: the spec raises ValueError; upstream asserts, divides by zero or goes on."""
    spec = side.spec
    FM = spec.ForwardMode
    calls = [
        ("split_seq_index", "IDLE", "compute_split_seq_index(IDLE, num_tokens=4)",
         lambda: spec.compute_split_seq_index(FM.IDLE, 4, None, None),
         {"num_tokens": 4, "extend_lens": None, "token_num_per_seq": None}),
        ("split_seq_index", "EXTEND", "compute_split_seq_index(EXTEND, 5, extend_lens=None)",
         lambda: spec.compute_split_seq_index(FM.EXTEND, 5, None, None),
         {"num_tokens": 5, "extend_lens": None, "token_num_per_seq": None}),
        ("split_seq_index", "DECODE", "compute_split_seq_index(DECODE, 5, None, 2)",
         lambda: spec.compute_split_seq_index(FM.DECODE, 5, None, 2),
         {"num_tokens": 5, "extend_lens": None, "token_num_per_seq": 2}),
        ("split_token_index", "IDLE", "compute_split_token_index(1, IDLE, None, None)",
         lambda: spec.compute_split_token_index(1, FM.IDLE, None, None),
         {"split_seq_index": 1, "extend_seq_lens": None, "extend_lens": None,
          "token_num_per_seq": None}),
        ("children_non_padded", "DECODE", "compute_children_num_token_non_padded(-1, 4)",
         lambda: spec.compute_children_num_token_non_padded(-1, 4),
         {"tbo_split_token_index": -1, "num_token_non_padded": 4}),
    ]
    probes = []
    for role, mode, literal, function, values in calls:
        outcome = spec_outcome(function)
        probes.append(Probe(role, mode, literal, spec=lambda rule, outcome=outcome: outcome,
                            values={"forward_mode": UpstreamMode(mode), **values},
                            invalid=True))
    return probes


# Degenerate EXTEND batches (and the golden table's): they tell the rules apart.
DEGENERATE_EXTEND = (
    (1,), (2,), (3,), (1, 1), (1, 2), (2, 1), (1, 1, 1), (2, 3), (1, 1, 1, 1, 1), (1, 5, 1),
    (3, 3, 3, 3), (100, 2000), (4000,), (5, 5, 5, 100), (10, 10, 11), (3, 1, 3), (2, 2),
)


def all_probes(side: SpecSide, cases_per_mode: int, seed: int,
               max_graph_bs: int = 256) -> list:
    """The probes of a run: the batches of `tbo-parity run`, degenerate and MIXED ones,
    replays, data-parallel reports and bad input."""
    from tbo_parity.parity_tests.cases import MODES, random_cases
    from tbo_parity.parity_tests.split_parity import SplitCase

    cases = [case for mode in MODES for case in random_cases(seed, mode, cases_per_mode)]
    for lens in DEGENERATE_EXTEND:
        for threshold in (0.48, 0.5, 0.1):
            cases.append(SplitCase("EXTEND", lens, lens, (0,) * len(lens), threshold=threshold))
    for case in random_cases(seed + 1, "EXTEND", max(1, cases_per_mode // 10)):
        cases.append(dataclasses.replace(case, mode="MIXED"))
    probes = [probe for case in cases for probe in case_probes(side, case)]
    return probes + replay_probes(side, max_graph_bs) + dp_probes(side) + invalid_probes(side)
