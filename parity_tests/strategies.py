"""Hypothesis strategies for batches of every mode, skewed and degenerate ones included."""

from __future__ import annotations

from hypothesis import strategies as st

from tbo_parity.parity_tests.split_parity import SplitCase

thresholds = st.one_of(st.just(0.48), st.just(0.5), st.floats(0.01, 0.5))


@st.composite
def extend_lens(draw):
    shape = draw(st.sampled_from(["one", "skewed", "ones", "any"]))
    if shape == "one":
        return [draw(st.integers(1, 100_000))]
    if shape == "skewed":  # one huge request among tiny ones
        tiny = draw(st.lists(st.integers(1, 8), min_size=1, max_size=30))
        where = draw(st.integers(0, len(tiny)))
        return tiny[:where] + [draw(st.integers(200, 100_000))] + tiny[where:]
    if shape == "ones":
        return [1] * draw(st.integers(1, 64))
    return draw(st.lists(st.integers(1, 5000), min_size=1, max_size=64))


@st.composite
def extend_cases(draw):
    lens = draw(extend_lens())
    prefix = draw(st.one_of(
        st.just([0] * len(lens)),
        st.lists(st.integers(0, 4096), min_size=len(lens), max_size=len(lens))))
    return SplitCase("EXTEND", tuple(p + n for p, n in zip(prefix, lens)), tuple(lens),
                     tuple(prefix), threshold=draw(thresholds),
                     num_token_non_padded=draw(st.none() | st.integers(0, sum(lens))))


@st.composite
def uniform_cases(draw, mode):
    # TARGET_VERIFY batches carry a (seq_len + d) * d mask per sequence: keep them smaller.
    longest = 512 if mode == "TARGET_VERIFY" else 4096
    seq_lens = draw(st.one_of(
        st.lists(st.integers(1, longest), min_size=0, max_size=3),
        st.lists(st.integers(1, longest), min_size=0, max_size=256)))
    draft = draw(st.integers(1, 8)) if mode == "TARGET_VERIFY" else None
    case = SplitCase(mode, tuple(seq_lens), draft_token_num=draft, threshold=draw(thresholds))
    padded = draw(st.none() | st.integers(0, case.num_tokens))
    return SplitCase(**{**case.__dict__, "num_token_non_padded": padded})


@st.composite
def idle_cases(draw):
    return SplitCase("IDLE", (), threshold=draw(thresholds),
                     num_token_non_padded=draw(st.none() | st.just(0)))


def cases_for(mode: str):
    if mode == "EXTEND":
        return extend_cases()
    if mode == "IDLE":
        return idle_cases()
    return uniform_cases(mode)
