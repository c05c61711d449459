"""CUDA-graph replay: the capture-size rule and the replay plan agree between the JAX spec
(``reference/replay_plan.py``) and the PyTorch implementation (``torch_impl/replay_plan.py``),
for every ``real_bs`` of every tested capture list, and hold their invariants.

The spec side runs in bulk: ``jax.vmap(replay_plan_arrays)`` over every ``real_bs`` at once,
then each row is compared field by field with the implementation's ``plan_replay`` and with the
spec's own ``plan_replay`` wrapper. Invariants are asserted from their definitions (brute force
over the capture list), not from either side's code.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tbo_parity.reference import replay_plan as spec
from tbo_parity.torch_impl import replay_plan as impl
from tbo_parity.torch_impl.two_batch_overlap import compute_children_num_token_non_padded

SIDES = [pytest.param(spec, id="spec"), pytest.param(impl, id="impl")]
SPEC_DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "spec.md"

# (id, max_bs or None, user batch_sizes or None, which tbo settings the list is tested with)
CAPTURE_CONFIGS = [
    ("default-8", 8, None, (False, True)),
    ("default-13", 13, None, (False, True)),  # odd max: TBO drops 13 (and 1)
    ("default-64", 64, None, (False, True)),
    ("default-160", 160, None, (False, True)),
    ("custom-sparse", None, (4, 16, 18, 32), (False, True)),  # gaps wider than 2x
    ("custom-unsorted", None, (10, 2, 6), (False, True)),
    ("custom-odd", None, (1, 3, 5, 9, 33), (False,)),  # TBO refuses every entry
]

# (id, forward mode name, draft_token_num)
MODES = [("decode", "DECODE", None)] + [
    (f"verify-d{d}", "TARGET_VERIFY", d) for d in (1, 2, 3, 4, 7)]


def _capture_params():
    return [pytest.param(max_bs, batch_sizes, tbo, id=f"{name}-{'tbo' if tbo else 'plain'}")
            for name, max_bs, batch_sizes, tbos in CAPTURE_CONFIGS for tbo in tbos]


def _mode_params():
    return [pytest.param(mode, draft, id=name) for name, mode, draft in MODES]


def _sizes(max_bs, batch_sizes, tbo) -> tuple:
    """The capture list, computed on both sides (they must agree)."""
    kwargs = dict(tbo=tbo, max_bs=max_bs, batch_sizes=batch_sizes)
    sizes = impl.capture_batch_sizes(**kwargs)
    assert spec.capture_batch_sizes(**kwargs) == sizes
    return sizes


_vmapped_plan = jax.jit(jax.vmap(spec.replay_plan_arrays, in_axes=(None, 0, None)))


def _spec_arrays(sizes, token_num_per_seq) -> dict:
    """The spec's plan for every real_bs in [0, max(sizes)], in one vmapped call."""
    with jax.enable_x64(True):
        arrays = _vmapped_plan(jnp.asarray(sizes, jnp.int64),
                               jnp.arange(sizes[-1] + 1, dtype=jnp.int64),
                               jnp.int64(token_num_per_seq))
        return {k: np.asarray(v) for k, v in dataclasses.asdict(jax.device_get(arrays)).items()}


def _impl_plans(mode, sizes, tbo, draft, real_bs_values) -> list:
    return [impl.plan_replay(impl.ForwardMode[mode], real_bs, sizes, tbo=tbo,
                             draft_token_num=draft) for real_bs in real_bs_values]


def plan_mismatches(arrays: dict, plans: list, tbo: bool) -> list:
    """(real_bs, field, spec value, implementation value) wherever an implementation plan
    differs from the spec's vmapped arrays; plans[i] is the plan of real_bs = i."""
    out = []
    for i, plan in enumerate(plans):
        want = {
            "real_bs": i,
            "graph_bs": arrays["graph_bs"][i],
            "num_tokens": arrays["num_tokens"][i],
            "num_token_non_padded": arrays["num_token_non_padded"][i],
            "padding_seq_range": (arrays["padding_seq_start"][i], arrays["padding_seq_end"][i]),
            "padding_token_range": (arrays["padding_token_start"][i],
                                    arrays["padding_token_end"][i]),
            "split_seq_index": arrays["split_seq_index"][i] if tbo else None,
            "split_token_index": arrays["split_token_index"][i] if tbo else None,
            "children_num_token_non_padded": (
                (arrays["child_a_non_padded"][i], arrays["child_b_non_padded"][i])
                if tbo else None),
        }
        for field, value in want.items():
            value = tuple(int(v) for v in value) if isinstance(value, tuple) else (
                None if value is None else int(value))
            if getattr(plan, field) != value:
                out.append((i, field, value, getattr(plan, field)))
    return out


# ---------------------------------------------------------------------------------------------
# Spec vs implementation, every real_bs.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,draft", _mode_params())
@pytest.mark.parametrize("max_bs,batch_sizes,tbo", _capture_params())
def test_spec_and_implementation_plan_every_real_bs_alike(max_bs, batch_sizes, tbo, mode, draft):
    sizes = _sizes(max_bs, batch_sizes, tbo)
    real_bs_values = range(sizes[-1] + 1)
    arrays = _spec_arrays(sizes, draft or 1)
    plans = _impl_plans(mode, sizes, tbo, draft, real_bs_values)
    assert plan_mismatches(arrays, plans, tbo) == []
    for real_bs, plan in zip(real_bs_values, plans):
        wrapped = spec.plan_replay(spec.ForwardMode[mode], real_bs, sizes, tbo=tbo,
                                   draft_token_num=draft)
        assert dataclasses.asdict(wrapped) == dataclasses.asdict(plan), real_bs
        assert plan.token_num_per_seq == (draft or 1)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("max_bs,batch_sizes,tbo", _capture_params())
def test_idle_plan_equals_the_decode_plan_at_real_bs_zero(side, max_bs, batch_sizes, tbo):
    sizes = _sizes(max_bs, batch_sizes, tbo)
    idle = side.plan_replay(side.ForwardMode.IDLE, 0, sizes, tbo=tbo)
    assert idle == side.plan_replay(side.ForwardMode.DECODE, 0, sizes, tbo=tbo)
    assert idle.token_num_per_seq == 1 and idle.graph_bs == sizes[0]
    assert idle.num_token_non_padded == 0
    assert idle.padding_seq_range == (0, sizes[0])  # every slot of the graph is padding


# ---------------------------------------------------------------------------------------------
# Invariants, from their definitions.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,draft", _mode_params())
@pytest.mark.parametrize("max_bs,batch_sizes,tbo", _capture_params())
def test_plan_invariants(max_bs, batch_sizes, tbo, mode, draft):
    sizes = _sizes(max_bs, batch_sizes, tbo)
    tnps = draft or 1
    split_of_graph = {}
    for real_bs, plan in enumerate(_impl_plans(mode, sizes, tbo, draft, range(sizes[-1] + 1))):
        # The smallest captured size that fits.
        assert plan.graph_bs == min(s for s in sizes if s >= real_bs)
        n = real_bs * tnps
        assert (plan.num_tokens, plan.num_token_non_padded) == (plan.graph_bs * tnps, n)
        # Real rows first, padding rows at the back.
        assert plan.padding_seq_range == (real_bs, plan.graph_bs)
        assert plan.padding_token_range == (n, plan.num_tokens)
        if not tbo:
            assert plan.split_seq_index is plan.split_token_index is None
            assert plan.children_num_token_non_padded is None
            continue
        split_seq, split_token = plan.split_seq_index, plan.split_token_index
        a_real, b_real = plan.children_num_token_non_padded
        # Two equal halves of the graph, whatever real_bs is.
        assert 2 * split_seq == plan.graph_bs and split_token == split_seq * tnps
        assert split_of_graph.setdefault(plan.graph_bs, (split_seq, split_token)) == (
            split_seq, split_token), "the split must depend on graph_bs only"
        assert a_real + b_real == n
        assert 0 <= a_real <= split_token and 0 <= b_real <= plan.num_tokens - split_token
        if n >= split_token:  # A is all real: every padding row lies in B
            assert a_real == split_token
            assert plan.num_tokens - split_token - b_real == plan.num_tokens - n
        else:  # B is pure padding, A holds every real token
            assert (a_real, b_real) == (n, 0)
    if tbo:
        assert set(split_of_graph) == set(sizes)  # every graph was replayed at least once


@pytest.mark.parametrize("max_bs", [2, 3, 8, 13, 30, 31, 64, 160, 257])
def test_default_tbo_lists_put_all_padding_in_child_b(max_bs):
    """Each TBO default is at most twice the one before, so a real batch that needs graph g
    has more than g / 2 sequences: child A is all real for every real_bs >= 1."""
    sizes = _sizes(max_bs, None, True)
    for real_bs in range(1, sizes[-1] + 1):
        plan = impl.plan_replay(impl.ForwardMode.DECODE, real_bs, sizes, tbo=True)
        assert plan.children_num_token_non_padded[0] == plan.split_token_index, real_bs


def test_pick_graph_index_is_the_smallest_fitting_size_and_g_beyond_the_largest():
    sizes = (2, 4, 8, 12, 16)
    with jax.enable_x64(True):
        got = jax.vmap(spec.pick_graph_index, in_axes=(None, 0))(
            jnp.asarray(sizes), jnp.arange(18))
    want = [min((i for i, s in enumerate(sizes) if s >= r), default=len(sizes))
            for r in range(18)]
    assert got.tolist() == want


# ---------------------------------------------------------------------------------------------
# A check with teeth: plans that get one rule wrong are caught.
# ---------------------------------------------------------------------------------------------


def _split_from_real_bs(plan):
    """The classic mistake: cutting the real batch instead of the graph."""
    split_seq = plan.real_bs // 2
    split_token = split_seq * plan.token_num_per_seq
    return dataclasses.replace(
        plan, split_seq_index=split_seq, split_token_index=split_token,
        children_num_token_non_padded=compute_children_num_token_non_padded(
            split_token, plan.num_token_non_padded))


def _padding_counted_as_real(plan):
    return dataclasses.replace(plan, children_num_token_non_padded=(
        plan.split_token_index, plan.num_tokens - plan.split_token_index))


def _next_graph_on_exact_fit(plan, sizes):
    """bisect_right instead of bisect_left: a batch that fits a graph exactly takes the next."""
    bigger = [s for s in sizes if s > plan.real_bs]
    graph_bs = bigger[0] if bigger else plan.graph_bs
    return dataclasses.replace(
        plan, graph_bs=graph_bs, num_tokens=graph_bs * plan.token_num_per_seq,
        padding_seq_range=(plan.real_bs, graph_bs),
        padding_token_range=(plan.num_token_non_padded, graph_bs * plan.token_num_per_seq))


@pytest.mark.parametrize("mutant,example", [
    pytest.param(_split_from_real_bs, (5, "split_seq_index", 4, 2), id="split-from-real-bs"),
    pytest.param(_padding_counted_as_real, (0, "children_num_token_non_padded", (0, 0), (1, 1)),
                 id="padding-counted-as-real"),
    pytest.param(_next_graph_on_exact_fit, (2, "graph_bs", 2, 4), id="bisect-right"),
])
def test_the_parity_check_catches_a_wrong_plan(mutant, example):
    """Each mutant gets one rule wrong; the check reports it (example: one of its reports)."""
    sizes, tnps = (2, 4, 8, 12, 16), 1
    plans = _impl_plans("DECODE", sizes, True, None, range(17))
    arrays = _spec_arrays(sizes, tnps)
    assert plan_mismatches(arrays, plans, True) == []
    args = (sizes,) if mutant is _next_graph_on_exact_fit else ()
    bad = plan_mismatches(arrays, [mutant(p, *args) for p in plans], True)
    assert example in bad


# ---------------------------------------------------------------------------------------------
# The capture-size rule.
# ---------------------------------------------------------------------------------------------

DEFAULTS = {  # hand-checked: 1, 2, 4, 8, 12, then steps of 8 from 16, then max_bs itself
    1: (1,),
    2: (1, 2),
    3: (1, 2, 3),
    8: (1, 2, 4, 8),
    12: (1, 2, 4, 8, 12),
    13: (1, 2, 4, 8, 12, 13),
    16: (1, 2, 4, 8, 12, 16),
    17: (1, 2, 4, 8, 12, 16, 17),
    30: (1, 2, 4, 8, 12, 16, 24, 30),
    64: (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64),
    100: (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 100),
    160: (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120, 128,
          136, 144, 152, 160),
}

TBO_DEFAULTS = {  # the defaults TBO can capture: even sizes only
    2: (2,),
    3: (2,),
    13: (2, 4, 8, 12),
    30: (2, 4, 8, 12, 16, 24, 30),
    31: (2, 4, 8, 12, 16, 24),
    64: (2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64),
}


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("max_bs,want", [pytest.param(m, w, id=f"max{m}")
                                         for m, w in DEFAULTS.items()])
def test_default_capture_sizes(side, max_bs, want):
    assert side.default_capture_batch_sizes(max_bs) == want
    assert side.capture_batch_sizes(tbo=False, max_bs=max_bs) == want


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("max_bs,want", [pytest.param(m, w, id=f"max{m}")
                                         for m, w in TBO_DEFAULTS.items()])
def test_tbo_keeps_the_defaults_it_can_capture(side, max_bs, want):
    assert side.capture_batch_sizes(tbo=True, max_bs=max_bs) == want


@pytest.mark.parametrize("side", SIDES)
def test_default_lists_hold_their_invariants_for_every_max_bs(side):
    """Ascending, ending at max_bs (always captured), the head below 16, steps of 8 above it;
    under TBO exactly the even entries."""
    for max_bs in range(1, 300):
        sizes = side.default_capture_batch_sizes(max_bs)
        assert sizes[-1] == max_bs and all(a < b for a, b in zip(sizes, sizes[1:])), max_bs
        assert set(sizes) == ({s for s in (1, 2, 4, 8, 12) if s <= max_bs}
                              | set(range(16, max_bs + 1, 8)) | {max_bs}), max_bs
        if max_bs >= 2:
            assert side.capture_batch_sizes(tbo=True, max_bs=max_bs) == tuple(
                s for s in sizes if s % 2 == 0), max_bs


@pytest.mark.parametrize("side", SIDES)
def test_tbo_capture_refusal_accepts_exactly_the_even_sizes(side):
    for bs in range(-2, 70):
        reason = side.tbo_capture_refusal(bs)
        assert (reason is None) == (bs >= 2 and bs % 2 == 0), bs
        assert reason == impl.tbo_capture_refusal(bs)
    assert "at least one sequence" in side.tbo_capture_refusal(1)
    assert "even" in side.tbo_capture_refusal(7) and "SGLang" in side.tbo_capture_refusal(7)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("tbo,batch_sizes,want", [
    pytest.param(True, [8, 2, 4], (2, 4, 8), id="tbo-sorted"),
    pytest.param(False, (5, 1, 3), (1, 3, 5), id="plain-odd-kept"),
    pytest.param(True, range(2, 9, 2), (2, 4, 6, 8), id="tbo-range"),
])
def test_user_capture_lists_are_sorted_and_kept_whole(side, tbo, batch_sizes, want):
    assert side.capture_batch_sizes(tbo=tbo, batch_sizes=batch_sizes) == want


# (id, kwargs of capture_batch_sizes, the argument the error names, other words it must hold)
BAD_CAPTURE = [
    ("tbo-odd-size", dict(tbo=True, batch_sizes=[2, 3, 4]), "batch_sizes", ("3", "even")),
    ("tbo-size-one", dict(tbo=True, batch_sizes=[1, 2]), "batch_sizes", ("1", "at least one")),
    ("duplicate", dict(tbo=False, batch_sizes=[2, 4, 2]), "batch_sizes", ("2", "more than once")),
    ("zero", dict(tbo=False, batch_sizes=[0, 2]), "batch_sizes", ("0",)),
    ("negative", dict(tbo=False, batch_sizes=[-2]), "batch_sizes", ("-2",)),
    ("bool", dict(tbo=False, batch_sizes=[True, 2]), "batch_sizes", ("True",)),
    ("float", dict(tbo=False, batch_sizes=[2.0]), "batch_sizes", ("2.0",)),
    ("string", dict(tbo=False, batch_sizes="24"), "batch_sizes", ()),
    ("empty", dict(tbo=False, batch_sizes=[]), "batch_sizes", ()),
    ("neither", dict(tbo=False), "max_bs", ("batch_sizes",)),
    ("both", dict(tbo=False, max_bs=8, batch_sizes=[8]), "max_bs", ("batch_sizes",)),
    ("max-zero", dict(tbo=False, max_bs=0), "max_bs", ()),
    ("max-bool", dict(tbo=False, max_bs=True), "max_bs", ()),
    ("max-float", dict(tbo=False, max_bs=8.0), "max_bs", ()),
    ("tbo-max-one", dict(tbo=True, max_bs=1), "max_bs", ("two-batch overlap",)),
    ("tbo-not-bool", dict(tbo=1, max_bs=8), "tbo", ()),
]


def _error(function, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        function(*args, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("kwargs,argument,words", [pytest.param(*c[1:], id=c[0])
                                                   for c in BAD_CAPTURE])
def test_bad_capture_lists_are_rejected_alike(kwargs, argument, words):
    message = _error(impl.capture_batch_sizes, **kwargs)
    assert _error(spec.capture_batch_sizes, **kwargs) == message
    assert argument in message and all(w in message for w in words), message


@pytest.mark.parametrize("side", SIDES)
def test_tbo_capture_refusal_rejects_a_non_int(side):
    with pytest.raises(ValueError, match="bs"):
        side.tbo_capture_refusal(4.0)


# ---------------------------------------------------------------------------------------------
# Bad input of plan_replay.
# ---------------------------------------------------------------------------------------------

SIZES = (2, 4, 8, 12, 16)

# (id, args (mode name or other, real_bs, capture_sizes), kwargs, argument named, other words)
BAD_PLANS = [
    ("extend", ("EXTEND", 4, SIZES), dict(tbo=True), "forward_mode", ("EXTEND",)),
    ("mixed", ("MIXED", 4, SIZES), dict(tbo=False), "forward_mode", ()),
    ("draft-extend", ("DRAFT_EXTEND", 4, SIZES), dict(tbo=False), "forward_mode", ()),
    ("mode-string", ("decode", 4, SIZES), dict(tbo=False), "forward_mode", ()),
    ("real-bs-too-large", ("DECODE", 17, SIZES), dict(tbo=True), "real_bs", ("16",)),
    ("real-bs-negative", ("DECODE", -1, SIZES), dict(tbo=True), "real_bs", ()),
    ("real-bs-float", ("DECODE", 2.0, SIZES), dict(tbo=True), "real_bs", ()),
    ("real-bs-bool", ("DECODE", True, SIZES), dict(tbo=True), "real_bs", ()),
    ("verify-without-draft", ("TARGET_VERIFY", 4, SIZES), dict(tbo=True), "draft_token_num",
     ()),
    ("verify-draft-zero", ("TARGET_VERIFY", 4, SIZES), dict(tbo=True, draft_token_num=0),
     "draft_token_num", ()),
    ("verify-draft-bool", ("TARGET_VERIFY", 4, SIZES), dict(tbo=True, draft_token_num=True),
     "draft_token_num", ()),
    ("draft-in-decode", ("DECODE", 4, SIZES), dict(tbo=True, draft_token_num=2),
     "draft_token_num", ("DECODE",)),
    ("draft-in-idle", ("IDLE", 0, SIZES), dict(tbo=True, draft_token_num=1), "draft_token_num",
     ("IDLE",)),
    ("idle-with-seqs", ("IDLE", 1, SIZES), dict(tbo=True), "real_bs", ("IDLE",)),
    ("sizes-unsorted", ("DECODE", 1, (4, 2, 8)), dict(tbo=True), "capture_sizes", ()),
    ("sizes-duplicate", ("DECODE", 1, (2, 2, 4)), dict(tbo=True), "capture_sizes", ()),
    ("sizes-empty", ("DECODE", 0, ()), dict(tbo=False), "capture_sizes", ()),
    ("sizes-zero", ("DECODE", 0, (0, 2)), dict(tbo=False), "capture_sizes", ()),
    ("sizes-bool", ("DECODE", 1, (True, 2)), dict(tbo=False), "capture_sizes", ()),
    ("sizes-float", ("DECODE", 1, (2.0, 4)), dict(tbo=False), "capture_sizes", ()),
    ("sizes-none", ("DECODE", 1, None), dict(tbo=False), "capture_sizes", ()),
    ("tbo-odd-graph", ("DECODE", 2, (3, 4)), dict(tbo=True), "capture_sizes", ("3", "even")),
    ("tbo-graph-of-one", ("DECODE", 0, (1, 2)), dict(tbo=True), "capture_sizes",
     ("1", "at least one")),
    ("tbo-not-bool", ("DECODE", 1, SIZES), dict(tbo=None), "tbo", ()),
    # counts past the representable range (docs/spec.md, "Representable range"): the graph's
    # token count overflows int32 only once multiplied by the drafts
    ("graph-tokens-past-max-count", ("TARGET_VERIFY", 1, (2**30,)),
     dict(tbo=False, draft_token_num=4), "graph_bs * token_num_per_seq=4294967296",
     ("MAX_COUNT",)),
    ("size-past-max-count", ("DECODE", 1, (2**31,)), dict(tbo=False), "capture_sizes",
     ("MAX_COUNT",)),
]


def _mode_arg(side, name):
    return side.ForwardMode[name] if name in side.ForwardMode.__members__ else name


@pytest.mark.parametrize("args,kwargs,argument,words", [pytest.param(*c[1:], id=c[0])
                                                        for c in BAD_PLANS])
def test_bad_replay_input_is_rejected_alike(args, kwargs, argument, words):
    mode, *rest = args
    message = _error(impl.plan_replay, _mode_arg(impl, mode), *rest, **kwargs)
    assert _error(spec.plan_replay, _mode_arg(spec, mode), *rest, **kwargs) == message
    assert argument in message and all(w in message for w in words), message


@pytest.mark.parametrize("side", SIDES)
def test_a_bool_capture_size_is_refused_after_an_equal_int_tuple_was_accepted(side):
    """(True, 2) == (1, 2) in Python: validation must look at the entries, not equality."""
    side.plan_replay(side.ForwardMode.DECODE, 1, (1, 2), tbo=False)
    with pytest.raises(ValueError, match="capture_sizes"):
        side.plan_replay(side.ForwardMode.DECODE, 1, (True, 2), tbo=False)


# ---------------------------------------------------------------------------------------------
# The worked examples of docs/spec.md.
# ---------------------------------------------------------------------------------------------

REPLAY_ROW = re.compile(r"^\|\s*R\d+\s*\|")


def replay_rows() -> list:
    """The rows of the replay-plan table in docs/spec.md (first cell R1, R2, ...)."""
    rows = []
    for line in SPEC_DOC.read_text().splitlines():
        if not REPLAY_ROW.match(line):
            continue
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        number, mode, captured, tbo, real_bs, graph_bs, num_tokens, non_padded, split, \
            children, pad_seqs, pad_tokens = cells
        mode_name, _, draft = mode.partition(" d=")
        want = dict(graph_bs=int(graph_bs), num_tokens=int(num_tokens),
                    num_token_non_padded=int(non_padded),
                    padding_seq_range=ast.literal_eval(pad_seqs),
                    padding_token_range=ast.literal_eval(pad_tokens))
        split = ast.literal_eval(split) if split != "-" else (None, None)
        want.update(split_seq_index=split[0], split_token_index=split[1],
                    children_num_token_non_padded=(ast.literal_eval(children)
                                                   if children != "-" else None))
        rows.append(pytest.param(mode_name, int(draft) if draft else None,
                                 ast.literal_eval(captured), tbo == "on", int(real_bs), want,
                                 id=f"{number}-{mode_name}"))
    return rows


def test_replay_table_is_present():
    assert len(replay_rows()) >= 6


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("mode,draft,captured,tbo,real_bs,want", replay_rows())
def test_replay_table_row(side, mode, draft, captured, tbo, real_bs, want):
    plan = side.plan_replay(side.ForwardMode[mode], real_bs, captured, tbo=tbo,
                            draft_token_num=draft)
    assert {k: getattr(plan, k) for k in want} == want


@pytest.mark.parametrize("side", SIDES)
def test_capture_sizes_need_not_be_a_list(side):
    """Any sequence or iterable of sizes plans like the tuple of the same sizes: an integer
    array, a range, a generator (a mutation survivor: only lists and tuples were tested)."""
    mode = side.ForwardMode.DECODE
    want = side.plan_replay(mode, 3, (2, 4, 8), tbo=True)
    for sizes in (np.array([2, 4, 8]), range(2, 9, 2), (s for s in (2, 4, 8))):
        got = side.plan_replay(mode, 3, sizes, tbo=True)
        assert got == want, sizes  # (the range adds 6, which 3 sequences do not pick)
    for sizes in ([2, np.int64(4), 8], (np.int32(2), 4, np.int64(8))):  # numpy entries
        got = side.plan_replay(mode, 3, sizes, tbo=True)
        assert got == want and type(got.graph_bs) is int, sizes
