"""The JAX spec and the PyTorch implementation split every batch identically.

Hypothesis draws 2,000 EXTEND batches (default profile), 1,000 per uniform mode and 300 IDLE
ones (each test says why fewer: the exhaustive check of test_verify.py covers every size they
draw), skewed, single-request and batch size 0/1 included. Each batch is split once by each
side and checked for every property: every split function of both sides returns the same value
(or both reject the input); the spec's children partition the batch; a graph of the batch's
size splits where the live batch does; TboForwardBatchPreparer builds, field by field, the
children the spec derives. The spec is also checked in bulk through ``jax.vmap`` over padded
batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tbo_parity.parity_tests.cases import random_cases
from tbo_parity.parity_tests.split_parity import (SplitCase, preparer_mismatches, result_mismatches,
                                                  side_results)
from tbo_parity.parity_tests.strategies import cases_for
from tbo_parity.reference import split as spec
from tbo_parity.torch_impl import two_batch_overlap as impl


def assert_children_partition_the_batch(case, results):
    """Token ranges tile [0, num_tokens); sequence ranges cover every sequence, overlapping in
    exactly one sequence iff the split is two-chunk; new tokens add up."""
    assert results["children"] != ("ValueError",), case
    a, b = results["children"]
    n, bs = case.num_tokens, len(case.seq_lens)
    assert a["token_range"] == (0, results["split_token_index"])
    assert b["token_range"] == (results["split_token_index"], n)
    assert a["seq_range"][0] == 0 and b["seq_range"] == (results["split_seq_index"], bs)
    overlap = a["seq_range"][1] - b["seq_range"][0]
    assert overlap in (0, 1)
    if case.mode == "EXTEND":
        assert a["extend_num_tokens"] + b["extend_num_tokens"] == n
        assert a["extend_num_tokens"] == results["split_token_index"]
        for child in (a, b):
            assert list(child["seq_lens"]) == [
                p + e for p, e in zip(child["extend_prefix_lens"], child["extend_seq_lens"])]
            assert list(child["extend_start_loc"]) == list(
                np.cumsum((0,) + child["extend_seq_lens"])[:-1])
        if overlap:  # the straddling sequence is cut in two, B continuing where A stopped
            s = b["seq_range"][0]
            assert a["extend_seq_lens"][-1] + b["extend_seq_lens"][0] == case.extend_lens[s]
            assert b["extend_prefix_lens"][0] == (case.prefix_lens[s]
                                                  + a["extend_seq_lens"][-1])
            assert b["seq_lens"][0] == case.seq_lens[s]
    else:
        assert overlap == 0
        assert a["seq_lens"] + b["seq_lens"] == case.seq_lens


def check_every_split_property(case):
    """Every property of one batch, each side splitting it once."""
    ours, theirs = side_results(spec, case), side_results(impl, case)
    assert result_mismatches(ours, theirs) == [], f"spec and implementation differ: {case!r}"
    assert_children_partition_the_batch(case, ours)
    if case.mode != "EXTEND":  # a graph of exactly the batch's size splits as the live batch
        assert theirs["cuda_graph_replay"] == (theirs["split_seq_index"],
                                               theirs["split_token_index"]), repr(case)
    assert preparer_mismatches(case, spec_results=ours) == [], (
        f"TboForwardBatchPreparer's children differ from the spec's: {case!r}")


@given(data=st.data())
def test_every_split_property_holds_on_generated_extend_batches(data):
    check_every_split_property(data.draw(cases_for("EXTEND"), label="case"))


# Fewer examples than the default (1,000 per mode, not 2,000): the split of a DECODE or
# TARGET_VERIFY batch depends only on its batch size and draft count, and the exhaustive check
# (test_verify.py, CI subset; `tbo-parity verify`) compares both sides and the invariants on
# *every* batch size 0..256, draft count 1..8 and graph replay pair up to 256 - all the sizes
# drawn here. What the random batches add is narrower: arbitrary sequence lengths carried into
# the children and the preparer's fields (the TARGET_VERIFY mask offsets among them), arbitrary
# non-padded counts, and thresholds the uniform modes must validate but not use.
@pytest.mark.parametrize("mode", ["DECODE", "TARGET_VERIFY"])
@settings(max_examples=1000)
@given(data=st.data())
def test_every_split_property_holds_on_generated_uniform_batches(mode, data):
    check_every_split_property(data.draw(cases_for(mode), label="case"))


# Fewer examples than the default: an IDLE batch is a single point (no sequence, no token) but
# for the threshold, which IDLE never uses, and a non-padded count of None or 0; 300 examples
# vary both far more than enough (tbo-parity verify checks the IDLE batch and every IDLE replay
# exhaustively).
@settings(max_examples=300)
@given(data=st.data())
def test_every_split_property_holds_on_idle_batches(data):
    check_every_split_property(data.draw(cases_for("IDLE"), label="case"))


def test_idle_graph_replay_splits_as_decode():
    assert impl.compute_split_indices_for_cuda_graph_replay(impl.ForwardMode.IDLE, 8, 0) == (4, 4)
    assert spec.compute_split_indices_for_cuda_graph_replay(spec.ForwardMode.IDLE, 8, 0) == (4, 4)


def test_non_padded_counts_add_up_and_respect_the_split():
    for split in range(0, 12):
        for real in range(0, 12):
            a, b = spec.compute_children_num_token_non_padded(split, real)
            assert (a, b) == impl.compute_children_num_token_non_padded(split, real)
            assert a + b == real and 0 <= a <= split


@pytest.mark.parametrize("mode", ["EXTEND", "DECODE", "TARGET_VERIFY"])
def test_vmapped_spec_matches_implementation_in_bulk(mode):
    """The pure spec functions, vmapped over 1,000 padded batches at once, give what the
    implementation gives case by case."""
    cases = random_cases(seed=7, mode=mode, count=1000)
    width = max(1, max(len(c.seq_lens) for c in cases))

    def padded(rows):
        return jnp.asarray([list(r) + [0] * (width - len(r)) for r in rows], jnp.int64)

    with jax.enable_x64(True):
        seq_lens = padded([c.seq_lens for c in cases])
        num_seqs = jnp.asarray([len(c.seq_lens) for c in cases], jnp.int64)
        if mode == "EXTEND":
            lens, prefix = padded([c.extend_lens for c in cases]), padded(
                [c.prefix_lens for c in cases])
            thresholds = jnp.asarray([c.threshold for c in cases], jnp.float64)
            a, b = jax.jit(jax.vmap(spec.derive_extend_children))(
                seq_lens, lens, prefix, num_seqs, thresholds)
        else:
            tnps = jnp.asarray([c.draft_token_num or 1 for c in cases], jnp.int64)
            a, b = jax.jit(jax.vmap(spec.derive_uniform_children))(seq_lens, num_seqs, tnps)
        a, b = jax.device_get((a, b))
    for i, case in enumerate(cases):
        want = side_results(impl, case)["children"]
        for child, arrays in zip(want, (a, b)):
            start, end = child["seq_range"]
            assert (int(arrays.seq_start[i]), int(arrays.seq_end[i])) == (start, end), case
            assert (int(arrays.token_start[i]), int(arrays.token_end[i])) == child[
                "token_range"], case
            n = end - start
            assert tuple(arrays.seq_lens[i][:n].tolist()) == child["seq_lens"], case
            assert not arrays.seq_lens[i][n:].any(), "padded slots must hold 0"
            if mode == "EXTEND":
                assert tuple(arrays.extend_seq_lens[i][:n].tolist()) == child["extend_seq_lens"]
                assert tuple(arrays.extend_prefix_lens[i][:n].tolist()) == child[
                    "extend_prefix_lens"]
                assert tuple(arrays.extend_start_loc[i][:n].tolist()) == child[
                    "extend_start_loc"]


def test_padded_slots_do_not_change_the_spec():
    """Growing the padding of a batch changes no index (the spec is shape-static)."""
    indices = jax.jit(spec.extend_split_indices)  # a compilation per width, not per primitive
    with jax.enable_x64(True):
        lens = [5, 1, 1, 90, 3]
        results = {
            width: tuple(int(x) for x in indices(
                jnp.asarray(lens + [0] * (width - len(lens)), jnp.int64), len(lens), 0.48))
            for width in (5, 8, 64)}
    assert len(set(results.values())) == 1, results


def test_mismatch_report_is_a_pasteable_literal():
    case = SplitCase("EXTEND", (100, 2000), (100, 2000), (0, 0))
    assert eval(repr(case), {"SplitCase": SplitCase}) == case
