"""Bad input is rejected up front, identically on both sides: a ValueError naming the argument."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parity_tests.split_parity import SplitCase, side_results
from reference import split as spec
from torch_impl import two_batch_overlap as impl

E, D, TV, I = "EXTEND", "DECODE", "TARGET_VERIFY", "IDLE"

# (id, function, args as (mode name, ...), the argument the error must name)
BAD_CALLS = [
    ("extend-without-lens", "compute_split_seq_index", (E, 4, None, None), "extend_lens"),
    ("extend-empty-lens", "compute_split_seq_index", (E, 0, [], None), "extend_lens"),
    ("extend-zero-len", "compute_split_seq_index", (E, 3, [3, 0], None), "extend_lens"),
    ("extend-negative-len", "compute_split_seq_index", (E, 3, [4, -1], None), "extend_lens"),
    ("extend-token-sum", "compute_split_seq_index", (E, 5, [3, 3], None), "num_tokens"),
    ("extend-with-tnps", "compute_split_seq_index", (E, 6, [3, 3], 1), "token_num_per_seq"),
    ("idle-with-tokens", "compute_split_seq_index", (I, 2, None, 0), "num_tokens"),
    ("decode-not-multiple", "compute_split_seq_index", (TV, 7, None, 2), "num_tokens"),
    ("decode-zero-tnps", "compute_split_seq_index", (D, 4, None, 0), "token_num_per_seq"),
    ("verify-negative-tnps", "compute_split_seq_index", (TV, 4, None, -2), "token_num_per_seq"),
    ("decode-with-extend-lens", "compute_split_seq_index", (D, 2, [1, 1], 1), "extend_lens"),
    ("negative-num-tokens", "compute_split_seq_index", (D, -2, None, 1), "num_tokens"),
    ("threshold-zero", "compute_split_seq_index", (E, 6, [3, 3], None, 0.0), "threshold"),
    ("threshold-above-half", "compute_split_seq_index", (E, 6, [3, 3], None, 0.51), "threshold"),
    ("threshold-not-number", "compute_split_seq_index", (E, 6, [3, 3], None, "0.4"),
     "threshold"),
    ("mixed-mode", "compute_split_seq_index", ("MIXED", 2, None, 1), "forward_mode"),
    ("draft-extend-mode", "compute_split_seq_index", ("DRAFT_EXTEND", 2, None, 1),
     "forward_mode"),
    ("token-index-negative-seq", "compute_split_token_index", (-1, D, None, 1),
     "split_seq_index"),
    ("token-index-beyond-batch", "compute_split_token_index", (3, E, [1, 1], None),
     "split_seq_index"),
    ("token-index-idle-nonzero", "compute_split_token_index", (1, I, None, 0), "split_seq_index"),
    ("token-index-zero-len", "compute_split_token_index", (1, E, [2, 0], None), "extend_lens"),
    ("token-index-bad-threshold", "compute_split_token_index", (1, D, None, 1, 0.9),
     "threshold"),
    ("replay-extend", "compute_split_indices_for_cuda_graph_replay", (E, 8, None),
     "forward_mode"),
    ("replay-not-multiple", "compute_split_indices_for_cuda_graph_replay", (TV, 10, 4),
     "cuda_graph_num_tokens"),
    ("replay-negative", "compute_split_indices_for_cuda_graph_replay", (D, -1, 1),
     "cuda_graph_num_tokens"),
    ("replay-zero-tnps", "compute_split_indices_for_cuda_graph_replay", (D, 4, 0),
     "token_num_per_seq"),
    ("non-padded-negative", "compute_children_num_token_non_padded", (4, -1),
     "num_token_non_padded"),
    ("non-padded-negative-split", "compute_children_num_token_non_padded", (-4, 1),
     "split_token_index"),
    ("verify-needs-draft", "token_num_per_seq", (TV,), "draft_token_num"),
    ("draft-non-positive", "token_num_per_seq", (TV, 0), "draft_token_num"),
    ("children-extend-without-lens", "derive_children", (E, [3, 3]), "extend_lens"),
    ("children-zero-extend", "derive_children", (E, [3, 3], [3, 0]), "extend_lens"),
    ("children-zero-seq-len", "derive_children", (D, [3, 0], None, None, 1), "seq_lens"),
    ("children-lens-disagree", "derive_children", (E, [5, 3], [3, 3], [1, 0]), "seq_lens"),
    ("children-negative-prefix", "derive_children", (E, [3, 3], [3, 3], [-1, 0]),
     "extend_prefix_lens"),
    ("children-prefix-count", "derive_children", (E, [3, 3], [3, 3], [0]), "extend_prefix_lens"),
    ("children-seq-len-short", "derive_children", (E, [2, 3], [3, 3]), "seq_lens"),
    ("children-idle-with-seqs", "derive_children", (I, [4]), "seq_lens"),
    ("children-decode-prefix", "derive_children", (D, [4], None, [0], 1), "extend_prefix_lens"),
    ("children-bad-threshold", "derive_children", (D, [4], None, None, 1, -0.1), "threshold"),
    ("children-not-a-mode", "derive_children", ("decode-string", [4]), "forward_mode"),
]


def _resolve(side, args):
    """Turn a mode name in the args into the side's own ForwardMode (a plain string stays)."""
    return tuple(side.ForwardMode[a] if isinstance(a, str) and a in side.ForwardMode.__members__
                 else a for a in args)


@pytest.mark.parametrize("side", [spec, impl], ids=["spec", "impl"])
@pytest.mark.parametrize("function,args,argument",
                         [pytest.param(*c[1:], id=c[0]) for c in BAD_CALLS])
def test_bad_input_raises_value_error_naming_the_argument(side, function, args, argument):
    with pytest.raises(ValueError, match=argument):
        getattr(side, function)(*_resolve(side, args))


@pytest.mark.parametrize("side", [spec, impl], ids=["spec", "impl"])
@pytest.mark.parametrize("per_rank", [
    pytest.param([], id="no-ranks"),
    pytest.param([(1, "DECODE")], id="can-run-not-bool"),
    pytest.param([(True, "decode")], id="mode-not-enum"),
    pytest.param([(True, "MIXED")], id="can-run-with-unsupported-mode"),
])
def test_bad_dp_reports_raise_value_error_naming_per_rank(side, per_rank):
    ranks = [(can, side.ForwardMode[m] if m in side.ForwardMode.__members__ else m)
             for can, m in per_rank]
    with pytest.raises(ValueError, match="per_rank"):
        side.compute_dp_tbo_decision(ranks)


@st.composite
def broken_cases(draw):
    """Valid-looking batches with one thing wrong, drawn at random."""
    lens = draw(st.lists(st.integers(-2, 40), min_size=0, max_size=12))
    mode = draw(st.sampled_from([E, D, TV, I]))
    draft = draw(st.none() | st.integers(-1, 5))
    threshold = draw(st.sampled_from([0.48, 0.0, 0.5, 0.6, -0.2, 1e-9]))
    padded = draw(st.none() | st.integers(-3, 50))
    seq_lens = tuple(draw(st.lists(st.integers(-1, 50), min_size=len(lens),
                                   max_size=len(lens))))
    return SplitCase(mode, seq_lens, tuple(lens) if mode == E else None,
                     tuple(max(0, s - n) for s, n in zip(seq_lens, lens)) if mode == E else None,
                     draft, threshold, padded)


@settings(max_examples=1000)
@given(broken_cases())
def test_both_sides_reject_the_same_inputs(case):
    """Over random, often invalid, batches the two sides accept and reject the same calls."""
    def num_tokens(c):
        try:
            return c.num_tokens
        except TypeError:
            return None

    if num_tokens(case) is None:
        return
    assert side_results(spec, case) == side_results(impl, case), repr(case)
