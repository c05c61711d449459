"""The crossover policy: spec and implementation agree, at the boundary and everywhere, and the
defaults are the crossover the benchmark recorded (docs/overlap-benchmark.json)."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import tbo_policy as spec
from reference.split import ForwardMode as SpecMode
from torch_impl import tbo_policy as impl
from torch_impl.forward_mode import ForwardMode as ImplMode

MODES = ("EXTEND", "DECODE", "TARGET_VERIFY", "IDLE")
MAX_COUNT = 2**31 - 1
RECORD = pathlib.Path(__file__).resolve().parent.parent / "docs" / "overlap-benchmark.json"


def both(mode, tokens, **thresholds):
    a = bool(spec.tbo_enabled(SpecMode[mode], tokens, **thresholds))
    b = impl.tbo_enabled(ImplMode[mode], tokens, **thresholds)
    assert isinstance(b, bool)
    return a, b


thresholds = st.one_of(st.none(), st.integers(1, MAX_COUNT))


@settings(max_examples=300)
@given(mode=st.sampled_from(MODES), tokens=st.integers(0, MAX_COUNT), decode=thresholds,
       prefill=thresholds)
def test_spec_and_implementation_agree(mode, tokens, decode, prefill):
    a, b = both(mode, tokens, min_decode_tokens=decode, min_prefill_tokens=prefill)
    assert a == b
    threshold = {"EXTEND": prefill, "DECODE": decode, "TARGET_VERIFY": decode,
                 "IDLE": None}[mode]
    assert a == (threshold is not None and tokens >= threshold)


@pytest.mark.parametrize("mode", ["EXTEND", "DECODE", "TARGET_VERIFY"])
@pytest.mark.parametrize("threshold", [1, 2, 32, 1024, MAX_COUNT])
def test_threshold_is_inclusive_on_both_sides(mode, threshold):
    key = "min_prefill_tokens" if mode == "EXTEND" else "min_decode_tokens"
    assert both(mode, threshold - 1, **{key: threshold}) == (False, False)
    assert both(mode, threshold, **{key: threshold}) == (True, True)


@pytest.mark.parametrize("tokens", [0, 1, 1024, MAX_COUNT])
def test_idle_and_none_never_overlap(tokens):
    assert both("IDLE", tokens, min_decode_tokens=1, min_prefill_tokens=1) == (False, False)
    assert both("DECODE", tokens, min_decode_tokens=None) == (False, False)
    assert both("EXTEND", tokens, min_prefill_tokens=None) == (False, False)


def test_defaults_are_the_recorded_crossover():
    """The decode default is the smallest token count from which the best transport's TBO
    step beat the plain one at every larger measured count; prefill stays off unless TBO won
    at some measured prefill size."""
    assert spec.DECODE_MIN_TOKENS == impl.DECODE_MIN_TOKENS
    assert spec.PREFILL_MIN_TOKENS == impl.PREFILL_MIN_TOKENS
    record = json.loads(RECORD.read_text())
    crossovers = [t for t in record["crossover"].values() if t is not None]
    assert spec.DECODE_MIN_TOKENS == min(crossovers)
    prefill_wins = sorted(r["tokens"] for r in record["prefill"]
                          if r["transport"] != "none" and r["speedup"] > 1.0)
    assert spec.PREFILL_MIN_TOKENS == (prefill_wins[0] if prefill_wins else None)
    # the defaults are what a call without thresholds uses
    assert both("DECODE", spec.DECODE_MIN_TOKENS) == (True, True)
    assert both("DECODE", spec.DECODE_MIN_TOKENS - 1) == (False, False)


def test_spec_vmaps_over_token_counts():
    tokens = jnp.asarray([0, 31, 32, 1023, 1024, 5000], dtype=jnp.int32)
    got = jax.vmap(lambda t: spec.tbo_enabled(SpecMode.DECODE, t, min_decode_tokens=32))(tokens)
    assert np.asarray(got).tolist() == [False, False, True, True, True, True]
    assert got.dtype == jnp.bool_
    idle = jax.vmap(lambda t: spec.tbo_enabled(SpecMode.IDLE, t))(tokens)  # never, as bools
    assert idle.dtype == jnp.bool_ and idle.shape == tokens.shape and not idle.any()
    jitted = jax.jit(lambda t: spec.tbo_enabled(SpecMode.EXTEND, t, min_prefill_tokens=1024))
    assert np.asarray(jax.vmap(jitted)(tokens)).tolist() == [False] * 4 + [True] * 2


@pytest.mark.parametrize("kwargs,name", [
    ({"num_tokens": -1}, "num_tokens"), ({"num_tokens": 1.5}, "num_tokens"),
    ({"num_tokens": True}, "num_tokens"), ({"num_tokens": MAX_COUNT + 1}, "num_tokens"),
    ({"num_tokens": 8, "min_decode_tokens": 0}, "min_decode_tokens"),
    ({"num_tokens": 8, "min_decode_tokens": 2.0}, "min_decode_tokens"),
    ({"num_tokens": 8, "min_prefill_tokens": -3}, "min_prefill_tokens"),
])
def test_bad_input_rejected_alike(kwargs, name):
    tokens = kwargs.pop("num_tokens")
    for side, mode in ((spec, SpecMode.DECODE), (impl, ImplMode.DECODE)):
        with pytest.raises(ValueError, match=rf"^{name}\b"):  # the message starts with it
            side.tbo_enabled(mode, tokens, **kwargs)


def test_a_mode_that_is_not_a_forward_mode_is_refused_by_name():
    for side in (spec, impl):
        with pytest.raises(ValueError, match=r"^forward_mode must be a ForwardMode"):
            side.tbo_enabled("DECODE", 8)


def test_unsupported_mode_rejected_alike():
    for side, mode in ((spec, SpecMode.MIXED), (impl, ImplMode.MIXED)):
        with pytest.raises(ValueError, match="MIXED"):
            side.tbo_enabled(mode, 8)


def _spec_table():
    text = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "spec.md").read_text()
    section = text.split("## When to overlap", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| mode")]
    return [[cell.strip() for cell in row] for row in rows]


def test_the_worked_table_in_the_spec_holds_on_both_sides():
    rows = _spec_table()
    assert len(rows) == 6
    for mode, tokens, decode, prefill, expected in rows:
        counts = [0, 1, 1024, MAX_COUNT] if tokens == "any" else [int(tokens)]
        thresholds = [(None, None), (1, 1)] if decode == "any" else [
            (None if decode == "None" else int(decode), None if prefill == "None" else int(prefill))]
        for count in counts:
            for d, p in thresholds:
                want = expected == "yes"
                assert both(mode, count, min_decode_tokens=d, min_prefill_tokens=p) == (want, want)
