"""The EXTEND split rules (docs/spec.md, "EXTEND split rules"): "balanced", "two_chunk" (the
default) and "guarded_two_chunk", on both sides.

Both sides agree under every rule on generated batches; the worked examples of the spec hold
under each rule; the pure JAX functions take the rule as a static argument under jit and vmap;
and a bad rule name is a ValueError naming ``extend_split``, the same on both sides.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tbo_parity.parity_tests.split_parity import SplitCase
from tbo_parity.parity_tests.strategies import cases_for
from tbo_parity.reference import split as spec
from tbo_parity.torch_impl import two_batch_overlap as impl

RULES = ("balanced", "two_chunk", "guarded_two_chunk")


def test_the_rules_and_the_default_are_the_documented_ones():
    assert spec.EXTEND_SPLITS == impl.EXTEND_SPLITS == RULES
    assert spec.DEFAULT_EXTEND_SPLIT == impl.DEFAULT_EXTEND_SPLIT == "two_chunk"


def results(side, case: SplitCase, rule=None) -> dict:
    """Split indices and children of ``case`` under ``rule`` (None: the default, not passed)."""
    option = {} if rule is None else {"extend_split": rule}
    mode = side.ForwardMode[case.mode]
    tnps = side.token_num_per_seq(mode, case.draft_token_num)
    extend = case.extend_lens if case.mode == "EXTEND" else None
    prefix = case.prefix_lens if case.mode == "EXTEND" else None
    seq = side.compute_split_seq_index(mode, case.num_tokens, extend, tnps, case.threshold,
                                       **option)
    token = side.compute_split_token_index(seq, mode, extend, tnps, case.threshold, **option)
    children = side.derive_children(mode, case.seq_lens, extend, prefix, tnps, case.threshold,
                                    **option)
    return {"split": (seq, token), "children": [dataclasses.asdict(c) for c in children]}


@settings(max_examples=300)
@given(case=st.one_of(cases_for("EXTEND"), cases_for("EXTEND"), cases_for("DECODE"),
                      cases_for("TARGET_VERIFY"), cases_for("IDLE")),
       rule=st.sampled_from(RULES))
def test_both_sides_agree_under_every_rule(case, rule):
    ours = results(spec, case, rule)
    assert ours == results(impl, case, rule), (repr(case), rule)
    if rule == "two_chunk":  # the default rule is the one applied without the argument
        assert ours == results(spec, case)
    if case.mode != "EXTEND":  # the rules differ only in EXTEND
        assert ours == results(spec, case, "balanced")


# (extend_lens, rule) -> (split seq, split token, A's seqs, A's extend lens, B's extend lens),
# threshold 0.48. Hand-checked from the rules of docs/spec.md.
WORKED = [
    # [1, 2]: balanced 1 (left 1 < 1.44); two-chunk cuts at 3 // 2 = 1 in sequence 1, leaving A
    # an empty piece of it; the guard refuses that (A: 2 sequences > 1 token).
    ((1, 2), "balanced", (1, 1, (0, 1), (1,), (2,))),
    ((1, 2), "two_chunk", (1, 1, (0, 2), (1, 0), (2,))),
    ((1, 2), "guarded_two_chunk", (1, 1, (0, 1), (1,), (2,))),
    # [1]: one token; two-chunk would give A the sequence with 0 tokens; guarded refuses.
    ((1,), "balanced", (0, 0, (0, 0), (), (1,))),
    ((1,), "two_chunk", (0, 0, (0, 1), (0,), (1,))),
    ((1,), "guarded_two_chunk", (0, 0, (0, 0), (), (1,))),
    # [1, 1, 1]: balanced 2 (left 2 > 1.56); the straddler is sequence 1, A 2 seqs > 1 token.
    ((1, 1, 1), "balanced", (2, 2, (0, 2), (1, 1), (1,))),
    ((1, 1, 1), "two_chunk", (1, 1, (0, 2), (1, 0), (1, 1))),
    ((1, 1, 1), "guarded_two_chunk", (2, 2, (0, 2), (1, 1), (1,))),
    # [100, 2000]: lopsided; A holds 2 sequences and 1050 tokens, so the guard allows it.
    ((100, 2000), "balanced", (1, 100, (0, 1), (100,), (2000,))),
    ((100, 2000), "two_chunk", (1, 1050, (0, 2), (100, 950), (1050,))),
    ((100, 2000), "guarded_two_chunk", (1, 1050, (0, 2), (100, 950), (1050,))),
    # [4000]: one request: balanced leaves A empty; two-chunk cuts it in half.
    ((4000,), "balanced", (0, 0, (0, 0), (), (4000,))),
    ((4000,), "guarded_two_chunk", (0, 2000, (0, 1), (2000,), (2000,))),
    # [3, 3, 3, 3]: balanced and not lopsided: every rule agrees.
    ((3, 3, 3, 3), "guarded_two_chunk", (2, 6, (0, 2), (3, 3), (3, 3))),
]


@pytest.mark.parametrize("side", [spec, impl], ids=["spec", "impl"])
@pytest.mark.parametrize("lens,rule,want", WORKED)
def test_worked_examples_under_each_rule(side, lens, rule, want):
    case = SplitCase("EXTEND", lens, lens, (0,) * len(lens))
    got = results(side, case, rule)
    a, b = got["children"]
    assert (*got["split"], a["seq_range"], a["extend_seq_lens"], b["extend_seq_lens"]) == want


@pytest.mark.parametrize("rule", RULES)
def test_the_pure_functions_take_the_rule_as_a_static_argument_under_jit_and_vmap(rule):
    batches = [(1, 2), (1,), (1, 1, 1), (100, 2000), (4000,), (5, 5, 5, 100)]
    padded = jnp.asarray([list(b) + [0] * (8 - len(b)) for b in batches], dtype=jnp.int32)
    counts = jnp.asarray([len(b) for b in batches])
    indices = jax.jit(jax.vmap(spec.extend_split_indices, in_axes=(0, 0, None, None)),
                      static_argnums=3)(padded, counts, 0.48, rule)
    children = jax.jit(jax.vmap(spec.derive_extend_children, in_axes=(0, 0, 0, 0, None, None)),
                       static_argnums=5)(padded, padded, jnp.zeros_like(padded), counts, 0.48,
                                         rule)
    for row, lens in enumerate(batches):
        mode = impl.ForwardMode.EXTEND
        seq = impl.compute_split_seq_index(mode, sum(lens), lens, None, extend_split=rule)
        token = impl.compute_split_token_index(seq, mode, lens, None, extend_split=rule)
        assert (int(indices[0][row]), int(indices[1][row])) == (seq, token), lens
        a, _ = impl.derive_children(mode, lens, lens, extend_split=rule)
        assert int(children[0].seq_end[row]) == a.seq_range[1], lens


BAD_RULES = ["Balanced", "two-chunk", "", None, 1, True, ("balanced",)]


@pytest.mark.parametrize("bad", BAD_RULES, ids=repr)
def test_a_bad_rule_is_a_value_error_naming_extend_split_on_both_sides(bad):
    calls = {
        "compute_split_seq_index": lambda side: side.compute_split_seq_index(
            side.ForwardMode.EXTEND, 3, [1, 2], None, extend_split=bad),
        "compute_split_token_index": lambda side: side.compute_split_token_index(
            1, side.ForwardMode.EXTEND, [1, 2], None, extend_split=bad),
        "derive_children": lambda side: side.derive_children(
            side.ForwardMode.DECODE, [5, 6], None, None, 1, extend_split=bad),
    }
    for name, call in calls.items():
        messages = []
        for side in (spec, impl):
            with pytest.raises(ValueError, match="^extend_split must be one of") as error:
                call(side)
            messages.append(str(error.value))
        assert messages[0] == messages[1], name
    with pytest.raises(ValueError, match="^extend_split must be one of"):
        spec.is_two_chunk(jnp.asarray([1, 2, 0]), 2, 0.48, bad)  # the pure function checks it
