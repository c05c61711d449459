"""Bad input is rejected up front, identically on both sides: a ValueError naming the argument,
with the same message word for word (docs/spec.md, "Bad input").

Every class of bad input that the validation of either side rejects has a row here (inputs
past the representable range, replay-plan inputs and a sweep of malformed arguments through
every function are in ``test_api_inputs.py``), so a check dropped on one side only fails a
test. Also here: an unknown MoE ``scoring`` (both sides), and the PyTorch side's
``TboForwardBatchPreparer``, which refuses a batch that is split already and names the
ForwardBatch field a bad value came from (the JAX spec has no preparer).
"""

from __future__ import annotations

import dataclasses
import enum
import re
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from tbo_parity.parity_tests.split_parity import (CHILDREN, PADDED, REPLAY, SEQ, TNPS, TOKEN, D, E,
                                                  I, TV, SplitCase, make_forward_batch, rejection,
                                                  side_results)
from tbo_parity.reference import moe as ref_moe
from tbo_parity.reference import split as spec
from tbo_parity.reference import weights as ref_weights
from tbo_parity.torch_impl import config as torch_config
from tbo_parity.torch_impl import moe as torch_moe
from tbo_parity.torch_impl import two_batch_overlap as impl
from tbo_parity.torch_impl.batch_splitter import TboForwardBatchPreparer


# Another package's ForwardMode with a mode neither side has: accepted by class name, then
# rejected by member name.
OtherForwardMode = enum.Enum("ForwardMode", {"PREFILL": "prefill"})



def bad(case_id, function, args, argument, *words):
    """A bad call: the message must name ``argument`` and hold every one of ``words`` (what
    was given: its value, type, shape, dtype)."""
    return pytest.param(function, args, argument, words, id=case_id)


# Args are (mode name, ...): a ForwardMode name is turned into each side's own ForwardMode.
BAD_CALLS = [
    # --- forward_mode and threshold ---
    bad("mixed-mode", SEQ, ("MIXED", 2, None, 1), "forward_mode", "MIXED"),
    bad("draft-extend-mode", SEQ, ("DRAFT_EXTEND", 2, None, 1), "forward_mode", "DRAFT_EXTEND"),
    bad("mode-string", SEQ, ("decode", 2, None, 1), "forward_mode", "'decode'", "str"),
    bad("mode-none", SEQ, (None, 0, None, 1), "forward_mode", "None"),
    bad("mode-other-package-unknown-name", SEQ, (OtherForwardMode.PREFILL, 2, None, 1),
        "forward_mode", "PREFILL"),
    bad("children-not-a-mode", CHILDREN, ("decode-string", [4]), "forward_mode"),
    bad("threshold-zero", SEQ, (E, 6, [3, 3], None, 0.0), "threshold", "0.0"),
    bad("threshold-above-half", SEQ, (E, 6, [3, 3], None, 0.51), "threshold", "0.51"),
    bad("threshold-nan", SEQ, (E, 6, [3, 3], None, float("nan")), "threshold", "nan"),
    bad("threshold-not-number", SEQ, (E, 6, [3, 3], None, "0.4"), "threshold", "'0.4'"),
    bad("threshold-bool", SEQ, (E, 6, [3, 3], None, True), "threshold", "bool"),
    bad("threshold-array", SEQ, (E, 6, [3, 3], None, np.array([0.4])), "threshold", "(1,)"),
    bad("token-index-bad-threshold", TOKEN, (1, D, None, 1, 0.9), "threshold"),
    bad("children-bad-threshold", CHILDREN, (D, [4], None, None, 1, -0.1), "threshold"),
    # --- a count that is not an integral scalar ---
    bad("num-tokens-float", SEQ, (D, 4.0, None, 1), "num_tokens", "4.0", "float"),
    bad("num-tokens-bool", SEQ, (D, True, None, 1), "num_tokens", "True", "bool"),
    bad("num-tokens-numpy-bool", SEQ, (D, np.True_, None, 1), "num_tokens", "dtype bool"),
    bad("num-tokens-numpy-float", SEQ, (D, np.float64(4), None, 1), "num_tokens", "float64"),
    bad("num-tokens-0d-float-array", SEQ, (D, np.array(4.0), None, 1), "num_tokens",
        "ndarray", "shape ()", "float64"),
    bad("num-tokens-1d-array", SEQ, (D, np.array([4]), None, 1), "num_tokens", "ndarray",
        "(1,)", "int64"),
    bad("num-tokens-none", SEQ, (D, None, None, 1), "num_tokens", "None"),
    bad("num-tokens-string", SEQ, (D, "4", None, 1), "num_tokens", "'4'", "str"),
    bad("tnps-float", SEQ, (D, 4, None, 1.0), "token_num_per_seq", "1.0", "float"),
    bad("tnps-bool", SEQ, (TV, 4, None, True), "token_num_per_seq", "True", "bool"),
    bad("token-index-seq-float", TOKEN, (1.0, D, None, 1), "split_seq_index", "float"),
    bad("replay-count-float", REPLAY, (D, 4.0, 1), "cuda_graph_num_tokens", "float"),
    bad("replay-tnps-bool", REPLAY, (D, 4, True), "token_num_per_seq", "bool"),
    bad("replay-tnps-none", REPLAY, (TV, 4, None), "token_num_per_seq", "None"),
    bad("non-padded-float", PADDED, (4, 1.5), "num_token_non_padded", "1.5"),
    bad("non-padded-split-array", PADDED, (np.array([4]), 1), "split_token_index", "(1,)"),
    bad("draft-float", TNPS, (TV, 2.0), "draft_token_num", "2.0", "float"),
    bad("draft-bool", TNPS, (TV, True), "draft_token_num", "bool"),
    bad("draft-numpy-bool", TNPS, (D, np.False_), "draft_token_num", "bool"),
    # --- a list of lengths that is not a sequence of integral scalars or a 1-D integer array ---
    bad("extend-without-lens", SEQ, (E, 4, None, None), "extend_lens", "required"),
    bad("extend-lens-not-iterable", SEQ, (E, 4, 4, None), "extend_lens", "4 of type int"),
    bad("extend-lens-string", SEQ, (E, 2, "11", None), "extend_lens", "'11'", "str"),
    bad("extend-lens-set", SEQ, (E, 3, {1, 2}, None), "extend_lens", "set"),
    bad("extend-lens-dict", SEQ, (E, 3, {1: 2}, None), "extend_lens", "dict"),
    bad("extend-lens-2d-array", SEQ, (E, 6, np.array([[3], [3]]), None), "extend_lens",
        "ndarray", "(2, 1)", "int64"),
    bad("extend-lens-0d-array", SEQ, (E, 3, np.array(3), None), "extend_lens", "shape ()"),
    bad("extend-lens-float-array", SEQ, (E, 6, np.array([3.0, 3.0]), None), "extend_lens",
        "(2,)", "float64"),
    bad("extend-lens-bool-array", SEQ, (E, 2, np.array([True, True]), None), "extend_lens",
        "(2,)", "dtype bool"),
    bad("extend-lens-float-entry", SEQ, (E, 6, [3, 3.0], None), "extend_lens[1]", "3.0",
        "float"),
    bad("extend-lens-bool-entry", SEQ, (E, 2, [1, True], None), "extend_lens[1]", "bool"),
    bad("extend-lens-numpy-float-entry", SEQ, (E, 6, (3, np.float32(3)), None),
        "extend_lens[1]", "float32"),
    bad("token-index-lens-not-iterable", TOKEN, (0, E, 3, None), "extend_lens", "int"),
    bad("children-seq-lens-none", CHILDREN, (D, None, None, None, 1), "seq_lens", "required"),
    bad("children-seq-lens-not-iterable", CHILDREN, (D, 3, None, None, 1), "seq_lens", "int"),
    bad("children-seq-lens-2d", CHILDREN, (D, np.ones((2, 2), np.int64), None, None, 1),
        "seq_lens", "(2, 2)"),
    bad("children-seq-len-float", CHILDREN, (D, [4, 2.5], None, None, 1), "seq_lens[1]", "2.5"),
    bad("children-prefix-float", CHILDREN, (E, [3, 3], [3, 3], [0, 0.0]),
        "extend_prefix_lens[1]", "float"),
    bad("children-prefix-not-iterable", CHILDREN, (E, [3], [3], 0), "extend_prefix_lens",
        "int"),
    # --- lengths and counts out of their domain ---
    bad("extend-empty-lens", SEQ, (E, 0, [], None), "extend_lens", "at least one"),
    bad("extend-zero-len", SEQ, (E, 3, [3, 0], None), "extend_lens[1]", ">= 1", "got 0"),
    bad("extend-negative-len", SEQ, (E, 3, [4, -1], None), "extend_lens[1]", "got -1"),
    bad("extend-numpy-zero-len", SEQ, (E, 3, np.array([3, 0]), None), "extend_lens[1]",
        "got 0"),
    bad("negative-num-tokens", SEQ, (D, -2, None, 1), "num_tokens", ">= 0", "got -2"),
    bad("negative-numpy-num-tokens", SEQ, (D, np.int32(-2), None, 1), "num_tokens", "got -2"),
    bad("decode-zero-tnps", SEQ, (D, 4, None, 0), "token_num_per_seq", "DECODE", "got 0"),
    bad("verify-zero-tnps", SEQ, (TV, 4, None, 0), "token_num_per_seq", ">= 1"),
    bad("verify-negative-tnps", SEQ, (TV, 4, None, -2), "token_num_per_seq", "-2"),
    bad("token-index-negative-seq", TOKEN, (-1, D, None, 1), "split_seq_index"),
    bad("replay-negative", REPLAY, (D, -1, 1), "cuda_graph_num_tokens"),
    bad("replay-zero-tnps", REPLAY, (D, 4, 0), "token_num_per_seq"),
    bad("non-padded-negative", PADDED, (4, -1), "num_token_non_padded"),
    bad("non-padded-negative-split", PADDED, (-4, 1), "split_token_index"),
    bad("draft-non-positive", TNPS, (TV, 0), "draft_token_num"),
    bad("token-index-zero-len", TOKEN, (1, E, [2, 0], None), "extend_lens[1]"),
    bad("children-zero-extend", CHILDREN, (E, [3, 3], [3, 0]), "extend_lens[1]"),
    bad("children-zero-seq-len", CHILDREN, (D, [3, 0], None, None, 1), "seq_lens[1]"),
    bad("children-negative-prefix", CHILDREN, (E, [3, 3], [3, 3], [-1, 0]),
        "extend_prefix_lens[0]"),
    # --- arguments that do not fit the mode or each other ---
    bad("extend-token-sum", SEQ, (E, 5, [3, 3], None), "num_tokens", "5", "6"),
    bad("extend-with-tnps", SEQ, (E, 6, [3, 3], 1), "token_num_per_seq", "EXTEND"),
    bad("idle-with-tokens", SEQ, (I, 2, None, 0), "num_tokens", "IDLE"),
    bad("idle-with-extend-lens", SEQ, (I, 0, [1], None), "extend_lens", "IDLE"),
    bad("idle-with-tnps-one", SEQ, (I, 0, None, 1), "token_num_per_seq", "IDLE", "got 1"),
    bad("idle-with-tnps-float", SEQ, (I, 0, None, 0.0), "token_num_per_seq", "float"),
    bad("idle-with-tnps-bool", SEQ, (I, 0, None, False), "token_num_per_seq", "bool"),
    bad("decode-not-multiple", SEQ, (TV, 7, None, 2), "num_tokens", "7", "2"),
    bad("decode-with-extend-lens", SEQ, (D, 2, [1, 1], 1), "extend_lens", "DECODE"),
    bad("verify-without-tnps", SEQ, (TV, 4, None, None), "token_num_per_seq", "None"),
    bad("token-index-beyond-batch", TOKEN, (3, E, [1, 1], None), "split_seq_index", "3", "2"),
    bad("token-index-idle-nonzero", TOKEN, (1, I, None, 0), "split_seq_index", "IDLE"),
    bad("token-index-idle-tnps", TOKEN, (0, I, None, 3), "token_num_per_seq", "IDLE"),
    bad("token-index-extend-tnps", TOKEN, (1, E, [2, 2], 1), "token_num_per_seq", "EXTEND"),
    bad("token-index-decode-lens", TOKEN, (1, D, [1, 1], 1), "extend_lens", "DECODE"),
    bad("replay-extend", REPLAY, (E, 8, None), "forward_mode", "EXTEND"),
    bad("replay-not-multiple", REPLAY, (TV, 10, 4), "cuda_graph_num_tokens", "10", "4"),
    bad("replay-idle-tnps-two", REPLAY, (I, 8, 2), "token_num_per_seq", "IDLE"),
    bad("verify-needs-draft", TNPS, (TV,), "draft_token_num", "TARGET_VERIFY"),
    bad("children-extend-without-lens", CHILDREN, (E, [3, 3]), "extend_lens", "required"),
    bad("children-extend-tnps", CHILDREN, (E, [3], [3], None, 1), "token_num_per_seq"),
    bad("children-seq-extend-count", CHILDREN, (E, [3, 3, 3], [3, 3]), "seq_lens",
        "3 entries", "extend_lens 2"),
    bad("children-prefix-count", CHILDREN, (E, [3, 3], [3, 3], [0]), "extend_prefix_lens",
        "1 entries", "extend_lens 2"),
    bad("children-lens-disagree", CHILDREN, (E, [5, 3], [3, 3], [1, 0]), "seq_lens[0]",
        "extend_prefix_lens[0]=1", "extend_lens[0]=3"),
    bad("children-seq-len-short", CHILDREN, (E, [2, 3], [3, 3]), "seq_lens[0]=2",
        "extend_lens[0]=3"),
    bad("children-idle-with-seqs", CHILDREN, (I, [4]), "seq_lens", "IDLE"),
    bad("children-idle-extend-lens", CHILDREN, (I, [], [1]), "extend_lens", "IDLE"),
    bad("children-idle-tnps", CHILDREN, (I, [], None, None, 2), "token_num_per_seq", "IDLE"),
    bad("children-decode-prefix", CHILDREN, (D, [4], None, [0], 1), "extend_prefix_lens",
        "DECODE"),
    bad("children-decode-lens", CHILDREN, (D, [4], [1], None, 1), "extend_lens", "DECODE"),
    bad("children-verify-no-tnps", CHILDREN, (TV, [4]), "token_num_per_seq", "None"),
    # --- DECODE brings one token per sequence: token_num_per_seq is 1 or not given ---
    bad("decode-tnps-four", SEQ, (D, 8, None, 4), "token_num_per_seq", "DECODE", "got 4"),
    bad("decode-tnps-two-numpy", SEQ, (D, 8, None, np.int64(2)), "token_num_per_seq",
        "DECODE", "got 2"),
    bad("decode-tnps-negative", SEQ, (D, 8, None, -1), "token_num_per_seq", "got -1"),
    bad("token-index-decode-tnps-four", TOKEN, (1, D, None, 4), "token_num_per_seq",
        "DECODE", "got 4"),
    bad("children-decode-tnps-four", CHILDREN, (D, [5, 6, 7], None, None, 4),
        "token_num_per_seq", "DECODE", "got 4"),
    bad("replay-decode-tnps-two", REPLAY, (D, 8, 2), "token_num_per_seq", "DECODE", "got 2"),
    bad("replay-decode-tnps-float", REPLAY, (D, 8, 1.0), "token_num_per_seq", "float"),
    bad("decode-draft-three", TNPS, (D, 3), "draft_token_num", "token_num_per_seq", "DECODE",
        "got 3"),
    bad("decode-draft-numpy-two", TNPS, (D, np.int32(2)), "draft_token_num",
        "token_num_per_seq", "got 2"),
]


@pytest.mark.parametrize("function,args,argument,words", BAD_CALLS)
def test_bad_input_is_rejected_alike_naming_the_argument(function, args, argument, words):
    message = rejection(impl, function, args)
    assert rejection(spec, function, args) == message
    assert argument in message and all(word in message for word in words), message


# A malformed data-parallel report; mode names become each side's ForwardMode.
BAD_RANKS = [
    pytest.param([], ("at least one",), id="no-ranks"),
    pytest.param(5, ("5 of type int",), id="not-iterable"),
    pytest.param(None, ("None",), id="none"),
    pytest.param("ab", ("'ab'", "str"), id="string"),
    pytest.param({True: "DECODE"}, ("dict",), id="dict"),
    pytest.param([5], ("per_rank[0]", "pair", "5 of type int"), id="rank-not-iterable"),
    pytest.param([None], ("per_rank[0]", "pair"), id="rank-none"),
    pytest.param([(True,)], ("per_rank[0]", "pair"), id="rank-of-one"),
    pytest.param([(True, "DECODE", 1)], ("per_rank[0]", "pair"), id="rank-of-three"),
    pytest.param([(True, "DECODE"), "xy"], ("per_rank[1]", "pair", "'xy'"), id="rank-string"),
    pytest.param([(1, "DECODE")], ("per_rank[0]", "can_run_tbo", "int"), id="can-run-int"),
    pytest.param([(np.True_, "DECODE")], ("can_run_tbo", "bool"), id="can-run-numpy-bool"),
    pytest.param([(True, "decode")], ("per_rank[0]", "mode", "'decode'"), id="mode-not-enum"),
    pytest.param([(True, None), (False, OtherForwardMode.PREFILL)], ("per_rank[1]", "PREFILL"),
                 id="mode-other-package-unknown-name"),
    pytest.param([(True, "MIXED")], ("MIXED",), id="can-run-with-unsupported-mode"),
]


@pytest.mark.parametrize("per_rank,words", BAD_RANKS)
def test_bad_dp_reports_are_rejected_alike_naming_per_rank(per_rank, words):
    def on(side):
        if not isinstance(per_rank, list):
            return per_rank
        return [rank if not isinstance(rank, tuple) else
                tuple(side.ForwardMode[m] if isinstance(m, str) and m in
                      side.ForwardMode.__members__ else m for m in rank) for rank in per_rank]

    message = rejection(impl, "compute_dp_tbo_decision", (on(impl),))
    assert rejection(spec, "compute_dp_tbo_decision", (on(spec),)) == message
    assert "per_rank" in message and all(word in message for word in words), message


# Lengths and counts: small ones (often invalid: zero, negative) and some at and past the top
# of the representable range.
_HUGE = st.sampled_from([2**30, 2**31 - 1, 2**31, 2**63])
_small_or_huge = st.integers(-2, 40) | _HUGE


@st.composite
def broken_cases(draw):
    """Valid-looking batches with one thing wrong, drawn at random."""
    lens = draw(st.lists(_small_or_huge, min_size=0, max_size=12))
    mode = draw(st.sampled_from([E, D, TV, I]))
    draft = draw(st.none() | st.integers(-1, 5) | _HUGE)
    threshold = draw(st.sampled_from([0.48, 0.0, 0.5, 0.6, -0.2, 1e-9]))
    padded = draw(st.none() | st.integers(-3, 50) | _HUGE)
    seq_lens = tuple(draw(st.lists(st.integers(-1, 50) | _HUGE, min_size=len(lens),
                                   max_size=len(lens))))
    return SplitCase(mode, seq_lens, tuple(lens) if mode == E else None,
                     tuple(max(0, s - n) for s, n in zip(seq_lens, lens)) if mode == E else None,
                     draft, threshold, padded)


@settings(max_examples=1000)
@given(broken_cases())
def test_both_sides_reject_the_same_inputs(case):
    """Over random, often invalid, batches the two sides accept and reject the same calls
    (every example is compared: there is no early return)."""
    results = side_results(spec, case)
    rejected = sorted(name for name, value in results.items() if value == ("ValueError",))
    event(f"{case.mode}: {len(rejected)} of {len(results)} calls rejected")
    assert results == side_results(impl, case), repr(case)


# ---------------------------------------------------------------------------------------------
# MoE routing: an unknown scoring is refused by select_experts on both sides, before any work.
# ---------------------------------------------------------------------------------------------

BAD_SCORINGS = [
    pytest.param("sofmax", ("'sofmax'",), id="typo"),
    pytest.param("Softmax", ("'Softmax'",), id="case"),
    pytest.param("", ("''",), id="empty"),
    pytest.param(None, ("None",), id="none"),
    pytest.param(0, ("0",), id="int"),
]


def _scoring_rejections(scoring, logits):
    """The messages of both sides' select_experts (and the spec's router_scores) for
    ``scoring`` on ``logits`` (None: nothing to compute with, so only a check made before any
    work can answer with a ValueError)."""
    # The spec reads scoring from its config, whose constructor refuses a bad value already:
    # a stand-in config carries it to select_experts itself.
    cfg = types.SimpleNamespace(scoring=scoring, top_k=2, num_experts=4)
    messages = {}
    for name, call in [
            ("impl", lambda: torch_moe.select_experts(logits, top_k=2, scoring=scoring,
                                                      num_token_non_padded=1)),
            ("spec", lambda: ref_moe.select_experts(logits, 1, cfg=cfg)),
            ("spec router_scores", lambda: ref_moe.router_scores(logits, scoring=scoring))]:
        with pytest.raises(ValueError) as info:
            call()
        messages[name] = str(info.value)
    return messages


@pytest.mark.parametrize("scoring,words", BAD_SCORINGS)
def test_an_unknown_scoring_is_rejected_alike_before_any_work(scoring, words):
    for logits in (None, np.zeros((3, 4), np.float32)):
        messages = _scoring_rejections(
            scoring, None if logits is None else torch.from_numpy(logits))
        spec_messages = _scoring_rejections(
            scoring, None if logits is None else jnp.asarray(logits))
        message = messages["impl"]
        assert spec_messages["spec"] == spec_messages["spec router_scores"] == message
        assert message.startswith("scoring ") and all(w in message for w in words), message
        assert all(repr(allowed) in message for allowed in ref_weights.SCORINGS), message
        assert ref_weights.SCORINGS == torch_config.SCORINGS


def test_the_allowed_scorings_are_accepted_alike():
    logits = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    for scoring in ref_weights.SCORINGS:
        cfg = ref_weights.ModelConfig(num_experts=4, top_k=2, scoring=scoring)
        spec_w, spec_ids = ref_moe.select_experts(jnp.asarray(logits), 3, cfg=cfg)
        impl_w, impl_ids = torch_moe.select_experts(torch.from_numpy(logits), top_k=2,
                                                    scoring=scoring, num_token_non_padded=3)
        np.testing.assert_array_equal(np.asarray(spec_ids), impl_ids.numpy())
        np.testing.assert_allclose(np.asarray(spec_w), impl_w.numpy(), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# TboForwardBatchPreparer (PyTorch only: the JAX spec has no preparer and no ForwardBatch; it
# is given the lengths themselves, which its errors name).
# ---------------------------------------------------------------------------------------------


def _batch(case):
    return make_forward_batch(case, seed=1)


def test_the_preparer_refuses_a_batch_that_is_split_already():
    for case in (SplitCase("DECODE", (5, 6, 7)), SplitCase("EXTEND", (5, 6), (3, 4), (2, 2)),
                 SplitCase("TARGET_VERIFY", (5, 6), draft_token_num=2)):
        preparer = TboForwardBatchPreparer()
        prepared = preparer.prepare(_batch(case))
        assert prepared.tbo_children is not None
        with pytest.raises(ValueError) as info:
            preparer.prepare(prepared)
        assert str(info.value).startswith("tbo_children "), info.value
        # any tbo_children set is refused, whatever it holds
        with pytest.raises(ValueError, match="^tbo_children "):
            preparer.prepare(dataclasses.replace(_batch(case), tbo_children=()))


# (id, case, the fields to set on its batch, the field the message must name and then the
# argument of two_batch_overlap that must not appear, with the words the message holds)
_EXTEND = SplitCase("EXTEND", (5, 6), (3, 4), (2, 2))
BAD_FIELDS = [
    pytest.param(_EXTEND, dict(extend_seq_lens_cpu=None), "extend_seq_lens_cpu", "extend_lens",
                 ("required",), id="extend-lens-missing"),
    pytest.param(_EXTEND, dict(extend_seq_lens_cpu=torch.tensor([3, 0])),
                 "extend_seq_lens_cpu[1]", "extend_lens", (">= 1", "got 0"),
                 id="extend-len-zero"),
    pytest.param(_EXTEND, dict(extend_seq_lens_cpu=torch.tensor([3.0, 4.0])),
                 "extend_seq_lens_cpu[0]", "extend_lens", ("float",), id="extend-lens-float"),
    pytest.param(_EXTEND, dict(extend_prefix_lens_cpu=torch.tensor([2])),
                 "extend_prefix_lens_cpu", "extend_prefix_lens", ("1 entries",),
                 id="prefix-count"),
    pytest.param(_EXTEND, dict(extend_prefix_lens_cpu=torch.tensor([-1, 2])),
                 "extend_prefix_lens_cpu[0]", "extend_prefix_lens", ("got -1",),
                 id="prefix-negative"),
    pytest.param(_EXTEND, dict(seq_lens_cpu=torch.tensor([1, 6])), "seq_lens_cpu[0]=1",
                 "seq_lens", ("extend_prefix_lens_cpu[0]=2", "extend_seq_lens_cpu[0]=3"),
                 id="lens-disagree"),
    pytest.param(_EXTEND, dict(seq_lens_cpu=torch.tensor([0, 6])), "seq_lens_cpu[0]",
                 "seq_lens", (">= 1",), id="seq-len-zero"),
    pytest.param(SplitCase("DECODE", (5, 6)), dict(extend_seq_lens_cpu=torch.tensor([1, 1])),
                 "extend_seq_lens_cpu", "extend_lens", ("DECODE",), id="decode-extend-lens"),
    pytest.param(SplitCase("DECODE", (5, 6)),
                 dict(extend_prefix_lens_cpu=torch.tensor([1, 1])),
                 "extend_prefix_lens_cpu", "extend_prefix_lens", ("DECODE",),
                 id="decode-prefix-lens"),
    pytest.param(SplitCase("TARGET_VERIFY", (5, 6), draft_token_num=2), dict(spec_info=None),
                 "spec_info.draft_token_num", "draft_token_num", ("required",),
                 id="verify-without-spec-info"),
]


@pytest.mark.parametrize("case,fields,field,argument,words", BAD_FIELDS)
def test_the_preparer_names_the_field_the_user_set(case, fields, field, argument, words):
    """A bad ForwardBatch field is reported under the field's name (extend_seq_lens_cpu), not
    under the name of the argument of two_batch_overlap it is passed as (extend_lens)."""
    with pytest.raises(ValueError) as info:
        TboForwardBatchPreparer().prepare(dataclasses.replace(_batch(case), **fields))
    message = str(info.value)
    assert message.startswith(field) and all(word in message for word in words), message
    # the argument's name appears only inside a field's name
    for found in re.finditer(re.escape(argument), message):
        start, end = found.span()
        assert message[end:end + 1] in ("_",) or message[start - 1:start] in ("_", "."), \
            message
