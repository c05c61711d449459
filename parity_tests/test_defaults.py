"""Default arguments agree between the spec and the implementation, and with docs/spec.md.

A default changed on one side only (the two-chunk threshold, say) would pass every test that
passes the argument explicitly. So: every public function of the implementation has a spec
twin of the same name whose parameters have the same names, kinds and defaults;
``DEFAULT_THRESHOLD`` is the value docs/spec.md states (read from the doc, not repeated here);
and a hypothesis test calls the split functions *without* a threshold on both sides, on
batches whose split flips near that threshold.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import pathlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tbo_parity.parity_tests.split_parity import SplitCase, make_forward_batch
from tbo_parity.parity_tests.strategies import cases_for
from tbo_parity.reference import replay_plan as spec_plan
from tbo_parity.reference import split as spec
from tbo_parity.torch_impl import batch_splitter
from tbo_parity.torch_impl import replay_plan as impl_plan
from tbo_parity.torch_impl import two_batch_overlap as impl

SPEC_DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "spec.md"

# (spec module, implementation module): the public functions are matched by name.
MODULE_PAIRS = [pytest.param(spec, impl, id="split"),
                pytest.param(spec_plan, impl_plan, id="replay_plan")]


@functools.cache
def documented_threshold() -> float:
    """The default threshold as docs/spec.md states it ("`threshold` (default 0.48, ...")."""
    found = re.findall(r"`threshold` \(default ([0-9.]+)", SPEC_DOC.read_text())
    assert len(found) == 1, f"docs/spec.md must state the default threshold once, found {found}"
    return float(found[0])


def public_functions(module) -> dict:
    """The functions a module defines itself (not imported ones), by name, without _names."""
    return {name: fn for name, fn in inspect.getmembers(module, inspect.isfunction)
            if fn.__module__ == module.__name__ and not name.startswith("_")}


def parameters(fn) -> list:
    return [(p.name, p.kind.name, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("spec_module,impl_module", MODULE_PAIRS)
def test_every_public_function_has_a_twin_with_the_same_parameters_and_defaults(
        spec_module, impl_module):
    ours, theirs = public_functions(spec_module), public_functions(impl_module)
    assert set(theirs) <= set(ours), f"no spec twin for {sorted(set(theirs) - set(ours))}"
    assert theirs, impl_module.__name__
    for name in theirs:
        assert parameters(theirs[name]) == parameters(ours[name]), name


@pytest.mark.parametrize("spec_module,impl_module", MODULE_PAIRS)
def test_public_constants_of_the_same_name_are_equal(spec_module, impl_module):
    def constants(module):
        return {name: value for name, value in vars(module).items()
                if name.isupper() and not name.startswith("_")}

    ours, theirs = constants(spec_module), constants(impl_module)
    shared = set(ours) & set(theirs)
    assert shared, "no shared constant"
    for name in shared:
        mine, yours = ours[name], theirs[name]
        if isinstance(mine, tuple) and mine and hasattr(mine[0], "name"):  # tuples of modes
            mine, yours = [m.name for m in mine], [m.name for m in yours]
        assert mine == yours, name


def test_default_threshold_is_the_documented_one_everywhere():
    threshold = documented_threshold()
    assert spec.DEFAULT_THRESHOLD == impl.DEFAULT_THRESHOLD == threshold
    for module in (spec, impl):
        for name, fn in public_functions(module).items():
            parameter = inspect.signature(fn).parameters.get("threshold")
            if parameter is not None and parameter.default is not parameter.empty:
                assert parameter.default == threshold, f"{module.__name__}.{name}"
    preparer = {f.name: f for f in dataclasses.fields(batch_splitter.TboForwardBatchPreparer)}
    assert preparer["threshold"].default == threshold


@st.composite
def near_the_default_threshold(draw):
    """EXTEND batches of two sequences whose smaller share of the tokens lies near the default
    threshold (exactly on it included), so that a changed default flips two-chunk mode."""
    near = draw(st.sampled_from(["on", "close", "around"]))
    if near == "on":
        k = draw(st.integers(1, 40_000))
        total, left = 25 * k, 12 * k  # left == total * 0.48 in exact arithmetic
    else:
        total = draw(st.integers(1000, 10_000_000))
        if near == "close":  # within 0.01 of the documented threshold, at a resolution of 1e-6
            share = documented_threshold() + draw(st.integers(-10_000, 10_000)) / 1_000_000
        else:  # anywhere in [0.4, 0.5], not just at its ends
            share = draw(st.integers(400, 500)) / 1000
        left = min(total - 1, max(1, round(total * share)))
    lens = [left, total - left]
    if draw(st.booleans()):
        lens.reverse()
    return SplitCase("EXTEND", tuple(lens), tuple(lens), (0, 0))


def results_with_defaults(side, case: SplitCase, **threshold) -> dict:
    """Every split function that takes a threshold, called without one (or with ``threshold``
    when given)."""
    mode = side.ForwardMode[case.mode]
    tnps = side.token_num_per_seq(mode, case.draft_token_num)
    extend = case.extend_lens if case.mode == "EXTEND" else None
    prefix = case.prefix_lens if case.mode == "EXTEND" else None
    seq = side.compute_split_seq_index(mode, case.num_tokens, extend, tnps, **threshold)
    token = side.compute_split_token_index(seq, mode, extend, tnps, **threshold)
    children = side.derive_children(mode, case.seq_lens, extend, prefix, tnps, **threshold)
    return {"split": (seq, token), "children": [dataclasses.asdict(c) for c in children]}


@settings(max_examples=500)  # the default-threshold question, not the split rules (those run
# 1,000 to 2,000 examples per mode in test_split_parity.py and exhaustively in test_verify.py)
@given(data=st.data())
def test_the_split_functions_agree_when_called_without_a_threshold(data):
    case = data.draw(st.one_of(near_the_default_threshold(), cases_for("EXTEND"),
                               cases_for("DECODE"), cases_for("TARGET_VERIFY"),
                               cases_for("IDLE")), label="case")
    got = results_with_defaults(impl, case)
    assert results_with_defaults(spec, case) == got, repr(case)
    assert got == results_with_defaults(impl, case, threshold=documented_threshold())
    if case.mode == "EXTEND":
        children = batch_splitter.TboForwardBatchPreparer().split_children(
            make_forward_batch(case))
        assert [dataclasses.asdict(c) for c in children] == got["children"], repr(case)
