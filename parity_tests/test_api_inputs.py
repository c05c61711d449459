"""What the public functions of both sides accept, and where their range ends (docs/spec.md,
"Representable range" and "Bad input").

- A count may be any integral scalar (an int, a numpy integer, a 0-dim integer array: numpy on
  both sides, torch on the PyTorch side, jax on the JAX side) and a list of lengths any
  sequence, iterator or 1-D integer array; the results are those of plain ints, as Python ints.
- A ForwardMode of the other package is taken by name.
- Every count, length and sum of token counts must be <= MAX_COUNT = 2**31 - 1: accepted at
  the boundary, rejected past it, with the same message on both sides; and within it the pure
  JAX functions in int32 agree with the implementation.
- Any malformed argument is a ValueError with the same message on both sides, never a
  TypeError or an OverflowError.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tbo_parity.parity_tests import strategies
from tbo_parity.parity_tests.split_parity import (CHILDREN, DP, PADDED, REPLAY, SEQ, TNPS, TOKEN, D,
                                                  E, I, TV, rejection, resolve_modes)
from tbo_parity.reference import replay_plan as spec_plan
from tbo_parity.reference import split as spec
from tbo_parity.torch_impl import replay_plan as impl_plan
from tbo_parity.torch_impl import two_batch_overlap as impl

MAX = 2**31 - 1


def plain(value):
    """A result in plain Python values: dataclasses as dicts, enum members as their names."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(plain(v) for v in value)
    return value


def ints_are_python_ints(value) -> bool:
    """Every integer in a result is a Python int (not a numpy or torch scalar)."""
    if isinstance(value, dict):
        return all(ints_are_python_ints(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return all(ints_are_python_ints(v) for v in value)
    return value is None or isinstance(value, (str, bool, float)) or type(value) is int


def rejected(result) -> bool:
    return isinstance(result, tuple) and len(result) == 2 and result[0] == "ValueError"


def outcome(side, function, args, kwargs=None, modes=None):
    """plain(result), or ('ValueError', message); any other exception propagates (fails)."""
    try:
        result = getattr(side, function)(*resolve_modes(modes or side, args), **(kwargs or {}))
    except ValueError as error:
        return ("ValueError", str(error))
    return plain(result)


# ---------------------------------------------------------------------------------------------
# Integral scalars and integer arrays are accepted and give what plain ints give.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Count:
    value: int


@dataclasses.dataclass(frozen=True)
class Lens:
    values: tuple


def materialize(args, count_form, lens_form) -> tuple:
    return tuple(count_form(a.value) if isinstance(a, Count) else
                 lens_form(a.values) if isinstance(a, Lens) else a for a in args)


# (function, args): counts and lists of lengths marked, to be given in every form.
CALLS = [
    (TNPS, (TV, Count(3))),
    (SEQ, (E, Count(2100), Lens((100, 2000)), None)),
    (SEQ, (E, Count(12), Lens((3, 3, 3, 3)), None)),
    (SEQ, (E, Count(19), Lens((1,) * 9 + (10,)), None)),  # more sequences than 8 slots
    (SEQ, (D, Count(3), None, Count(1))),
    (SEQ, (D, Count(3), None, None)),  # DECODE: token_num_per_seq left out is 1
    (SEQ, (TV, Count(12), None, Count(3))),
    (SEQ, (I, Count(0), None, Count(0))),
    (TOKEN, (Count(1), E, Lens((100, 2000)), None)),
    (TOKEN, (Count(2), TV, None, Count(3))),
    (TOKEN, (Count(0), I, None, Count(0))),
    (REPLAY, (TV, Count(12), Count(4))),
    (REPLAY, (I, Count(8), Count(1))),
    (PADDED, (Count(4), Count(3))),
    (CHILDREN, (E, Lens((100, 2096)), Lens((100, 2000)), Lens((0, 96)))),
    (CHILDREN, (E, Lens((100, 2096)), Lens((100, 2000)))),  # prefix derived from seq_lens
    (CHILDREN, (TV, Lens((10, 20, 30)), None, None, Count(3))),
    (CHILDREN, (D, Lens((7,)), None, None, Count(1))),
    (CHILDREN, (D, Lens((5, 6, 7)))),
    (REPLAY, (D, Count(8), None)),
    (CHILDREN, (I, Lens(()), None, None, Count(0))),
]

BOTH = (spec, impl)
# (id, count form, lens form, the sides that take it)
FORMS = [
    ("int-list", int, list, BOTH),
    ("int-tuple", int, tuple, BOTH),
    ("int-iterator", int, iter, BOTH),
    ("numpy-int64", np.int64, lambda v: np.array(v, np.int64), BOTH),
    ("numpy-int32", np.int32, lambda v: np.array(v, np.int32), BOTH),
    ("numpy-uint16", np.uint16, lambda v: np.array(v, np.uint16), BOTH),
    ("numpy-0d-and-list-of-numpy", lambda v: np.array(v), lambda v: [np.int64(x) for x in v],
     BOTH),
    ("torch-int64", lambda v: torch.tensor(v), lambda v: torch.tensor(v, dtype=torch.int64),
     (impl,)),
    ("torch-int32", lambda v: torch.tensor(v, dtype=torch.int32),
     lambda v: torch.tensor(v, dtype=torch.int32), (impl,)),
    ("jax-int32", lambda v: jnp.asarray(v, jnp.int32), lambda v: jnp.asarray(v, jnp.int32),
     (spec,)),
]


@pytest.mark.parametrize("count_form,lens_form,sides", [
    pytest.param(*f[1:], id=f[0]) for f in FORMS])
@pytest.mark.parametrize("function,args", [
    pytest.param(f, a, id=f"{f}-{i}") for i, (f, a) in enumerate(CALLS)])
def test_integer_forms_give_what_plain_ints_give(function, args, count_form, lens_form, sides):
    want = outcome(impl, function, materialize(args, int, list))
    assert want == outcome(spec, function, materialize(args, int, list))
    assert not rejected(want), want
    for side in sides:
        got = getattr(side, function)(*resolve_modes(side, materialize(args, count_form,
                                                                         lens_form)))
        assert plain(got) == want, side.__name__
        assert ints_are_python_ints(plain(got)), got


def test_the_issue_example_is_accepted():
    """extend_lens=np.array([3, 4]) used to be rejected as 'must be an int >= 1, got
    np.int64(3)'."""
    for side in BOTH:
        assert side.compute_split_seq_index(side.ForwardMode.EXTEND, 7, np.array([3, 4]),
                                            None) == 1


@pytest.mark.parametrize("side", BOTH, ids=["spec", "impl"])
def test_every_integer_dtype_is_accepted_and_bool_and_float_are_not(side):
    mode = side.ForwardMode.DECODE
    for dtype in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
                  np.uint64):
        assert side.compute_split_seq_index(mode, dtype(3), None, dtype(1)) == 1
        assert side.derive_children(mode, np.array([4, 5], dtype), None, None, 1)[1].seq_lens \
            == (5,)
    for dtype in (np.bool_, np.float16, np.float32, np.float64, np.complex64):
        with pytest.raises(ValueError, match="num_tokens.*" + np.dtype(dtype).name):
            side.compute_split_seq_index(mode, np.array(6, dtype), None, 1)
        with pytest.raises(ValueError, match="seq_lens.*" + np.dtype(dtype).name):
            side.derive_children(mode, np.array([4, 5], dtype), None, None, 1)


@pytest.mark.parametrize("threshold,sides", [
    pytest.param(np.float64(0.25), BOTH, id="numpy-float64"),
    pytest.param(np.float32(0.25), BOTH, id="numpy-float32"),
    pytest.param(np.array(0.25), BOTH, id="numpy-0d"),
    pytest.param(np.float16(0.25), BOTH, id="numpy-float16"),
    pytest.param(torch.tensor(0.25), (impl,), id="torch-0d"),
    pytest.param(torch.tensor(0.25, dtype=torch.bfloat16), (impl,), id="torch-bfloat16"),
    pytest.param(jnp.asarray(0.25), (spec,), id="jax-0d"),
])
def test_a_real_scalar_threshold_is_taken_as_its_float(threshold, sides):
    lens = [10, 29]  # left share 10/39 = 0.256: two-chunk at threshold 0.3, not at 0.25
    for side in sides:
        mode = side.ForwardMode.EXTEND
        assert side.compute_split_seq_index(mode, 39, lens, None, threshold) == \
            side.compute_split_seq_index(mode, 39, lens, None, 0.25) == 1
        assert side.compute_split_seq_index(mode, 39, lens, None, 0.3) == 1
        assert side.compute_split_token_index(1, mode, lens, None, threshold) == 10
        assert side.compute_split_token_index(1, mode, lens, None, 0.3) == 19


def test_framework_arrays_of_the_wrong_kind_are_rejected_naming_what_was_given():
    mode = impl.ForwardMode.DECODE
    for value, words in [(torch.tensor(4.0), ("Tensor", "torch.float32", "shape ()")),
                         (torch.tensor(True), ("torch.bool",)),
                         (torch.tensor([4]), ("Tensor", "(1,)", "torch.int64"))]:
        with pytest.raises(ValueError, match="num_tokens") as info:
            impl.compute_split_seq_index(mode, value, None, 1)
        assert all(w in str(info.value) for w in words), info.value
    for value, words in [(torch.tensor([[4, 5]]), ("(1, 2)",)),
                         (torch.tensor([4.0, 5.0]), ("torch.float32",)),
                         (torch.tensor([True]), ("torch.bool",))]:
        with pytest.raises(ValueError, match="seq_lens") as info:
            impl.derive_children(mode, value, None, None, 1)
        assert all(w in str(info.value) for w in words), info.value
    mode = spec.ForwardMode.DECODE
    for value, words in [(jnp.asarray(4.0), ("float32", "shape ()")),
                         (jnp.asarray(True), ("bool",)), (jnp.asarray([4]), ("(1,)", "int32"))]:
        with pytest.raises(ValueError, match="num_tokens") as info:
            spec.compute_split_seq_index(mode, value, None, 1)
        assert all(w in str(info.value) for w in words), info.value
    with pytest.raises(ValueError, match=r"seq_lens.*\(1, 2\)"):
        spec.derive_children(mode, jnp.asarray([[4, 5]]), None, None, 1)


# ---------------------------------------------------------------------------------------------
# A ForwardMode of the other package is taken by name.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("function,args", [
    pytest.param(f, a, id=f"{f}-{i}") for i, (f, a) in enumerate(CALLS)])
def test_a_forward_mode_of_the_other_package_is_taken_by_name(function, args):
    args = materialize(args, int, list)
    for side, other in ((spec, impl), (impl, spec)):
        assert outcome(side, function, args, modes=other) == outcome(side, function, args)


@pytest.mark.parametrize("mode", ["MIXED", "DRAFT_EXTEND"])
def test_an_unsupported_mode_of_the_other_package_is_rejected_as_ours(mode):
    for side, other in ((spec, impl), (impl, spec)):
        own = rejection(side, SEQ, (mode, 2, None, 1))
        assert rejection(side, SEQ, (other.ForwardMode[mode], 2, None, 1)) == own
        plan = rejection(side_plan(side), "plan_replay", (other.ForwardMode[mode], 1, (2,)),
                         dict(tbo=False))
        assert plan == rejection(side_plan(side), "plan_replay", (side.ForwardMode[mode], 1,
                                                                  (2,)), dict(tbo=False))


def side_plan(side):
    return spec_plan if side is spec else impl_plan


def test_dp_decision_takes_the_other_packages_modes_and_answers_in_its_own():
    for side, other in ((spec, impl), (impl, spec)):
        run, mode = side.compute_dp_tbo_decision([(True, other.ForwardMode.DECODE),
                                                  (True, other.ForwardMode.IDLE), (True, None)])
        assert run and mode is side.ForwardMode.DECODE
        assert side.compute_dp_tbo_decision([(True, other.ForwardMode.DECODE),
                                             (True, side.ForwardMode.EXTEND)]) == (False, None)


@pytest.mark.parametrize("mode,draft", [("DECODE", None), ("TARGET_VERIFY", 3), ("IDLE", None)])
def test_replay_plan_takes_the_other_packages_modes_and_integer_forms(mode, draft):
    want = plain(impl_plan.plan_replay(impl.ForwardMode[mode], 0 if mode == I else 5,
                                       (2, 4, 8, 12), tbo=True, draft_token_num=draft))
    real = 0 if mode == I else 5
    for side, other in ((spec, impl), (impl, spec)):
        for modes in (side, other):
            for real_bs, sizes, d in [
                    (real, (2, 4, 8, 12), draft),
                    (np.int64(real), np.array([2, 4, 8, 12]),
                     None if draft is None else np.int32(draft)),
                    (np.array(real), [np.int64(s) for s in (2, 4, 8, 12)], draft),
                    (real, iter([2, 4, 8, 12]), draft)]:
                got = plain(side_plan(side).plan_replay(modes.ForwardMode[mode], real_bs, sizes,
                                                        tbo=True, draft_token_num=d))
                assert got == want and ints_are_python_ints(got)


def test_capture_lists_take_integer_forms():
    for module in (spec_plan, impl_plan):
        assert module.capture_batch_sizes(tbo=True, batch_sizes=np.array([8, 2, 4])) == (2, 4, 8)
        assert module.capture_batch_sizes(tbo=False, max_bs=np.int64(3)) == (1, 2, 3)
        assert module.default_capture_batch_sizes(np.array(2)) == (1, 2)
        assert module.tbo_capture_refusal(np.uint8(4)) is None
        assert all(type(s) is int for s in module.capture_batch_sizes(
            tbo=False, batch_sizes=[np.int32(2), 1]))


# (id, function, args, kwargs, argument, words): replay-plan inputs newly validated.
BAD_PLAN_INPUTS = [
    ("sizes-2d", "plan_replay", (D, 1, np.array([[2, 4]])), dict(tbo=False), "capture_sizes",
     ("(1, 2)",)),
    ("sizes-float-array", "plan_replay", (D, 1, np.array([2.0, 4.0])), dict(tbo=False),
     "capture_sizes", ("float64",)),
    ("sizes-numpy-bool", "plan_replay", (D, 1, [np.True_, 2]), dict(tbo=False),
     "capture_sizes", ()),
    ("sizes-not-iterable", "plan_replay", (D, 1, 8), dict(tbo=False), "capture_sizes",
     ("8 of type int",)),
    ("sizes-string", "plan_replay", (D, 1, "24"), dict(tbo=False), "capture_sizes", ("str",)),
    ("sizes-descending-numpy", "plan_replay", (D, 1, np.array([4, 2])), dict(tbo=False),
     "capture_sizes", ()),
    ("sizes-numpy-float-entry", "plan_replay", (D, 1, (2, np.float64(4))), dict(tbo=False),
     "capture_sizes", ()),
    ("real-bs-array", "plan_replay", (D, np.array([1]), (2, 4)), dict(tbo=False), "real_bs",
     ("(1,)",)),
    ("real-bs-numpy-float", "plan_replay", (D, np.float32(1), (2, 4)), dict(tbo=False),
     "real_bs", ("float32",)),
    ("draft-numpy-float", "plan_replay", (TV, 1, (2, 4)), dict(tbo=False,
                                                                draft_token_num=np.float64(2)),
     "draft_token_num", ("float64",)),
    ("mode-other-package-unknown", "plan_replay",
     (enum.Enum("ForwardMode", ["PREFILL"]).PREFILL, 1, (2, 4)), dict(tbo=False),
     "forward_mode", ("PREFILL",)),
    ("batch-sizes-2d", "capture_batch_sizes", (), dict(tbo=False, batch_sizes=np.ones((2, 2),
                                                                                       int)),
     "batch_sizes", ("(2, 2)",)),
    ("batch-sizes-not-iterable", "capture_batch_sizes", (), dict(tbo=False, batch_sizes=4),
     "batch_sizes", ("4 of type int",)),
    ("batch-sizes-numpy-bool", "capture_batch_sizes", (), dict(tbo=False,
                                                               batch_sizes=[np.True_, 2]),
     "batch_sizes", ("bool",)),
    ("batch-sizes-numpy-zero", "capture_batch_sizes", (), dict(tbo=False,
                                                               batch_sizes=np.array([0, 2])),
     "batch_sizes", ("0 is not",)),
    ("max-bs-numpy-float", "capture_batch_sizes", (), dict(tbo=False, max_bs=np.float64(8)),
     "max_bs", ("float64",)),
    ("refusal-float", "tbo_capture_refusal", (4.0,), {}, "bs", ("float",)),
    ("refusal-array", "tbo_capture_refusal", (np.array([4]),), {}, "bs", ("(1,)",)),
]


@pytest.mark.parametrize("function,args,kwargs,argument,words", [
    pytest.param(*c[1:], id=c[0]) for c in BAD_PLAN_INPUTS])
def test_bad_replay_plan_inputs_are_rejected_alike(function, args, kwargs, argument, words):
    message = rejection(impl_plan, function, args, kwargs)
    assert rejection(spec_plan, function, args, kwargs) == message
    assert argument in message and all(w in message for w in words), message


# ---------------------------------------------------------------------------------------------
# The representable range: every count, length and sum of token counts <= MAX_COUNT.
# ---------------------------------------------------------------------------------------------


def test_max_count_is_int32_max_on_both_sides():
    assert spec.MAX_COUNT == impl.MAX_COUNT == MAX == np.iinfo(np.int32).max


# (id, module pair, function, args, kwargs, expected result or None): accepted at the top.
AT_THE_TOP = [
    ("decode-num-tokens", SEQ, (D, MAX, None, 1), {}, MAX // 2),
    ("verify-tnps", SEQ, (TV, MAX, None, MAX), {}, 0),
    ("extend-one-len", SEQ, (E, MAX, [MAX], None), {}, 0),
    ("extend-sum-fits", SEQ, (E, MAX, [2**30, 2**30 - 1], None), {}, 1),
    ("extend-lopsided", SEQ, (E, MAX, [1, MAX - 1], None), {}, 1),
    ("extend-three", SEQ, (E, MAX, [MAX - 2, 1, 1], None), {}, 0),
    ("token-extend", TOKEN, (0, E, [MAX], None), {}, MAX // 2),
    ("token-extend-sum", TOKEN, (1, E, [2**30, 2**30 - 1], None), {}, 2**30),
    ("token-verify", TOKEN, (1, TV, None, MAX), {}, MAX),
    ("token-index-at-top", TOKEN, (MAX, D, None, 1), {}, MAX),
    ("replay", REPLAY, (D, MAX, 1), {}, (MAX // 2, MAX // 2)),
    ("replay-verify", REPLAY, (TV, MAX - 1, (MAX - 1) // 2), {}, (1, (MAX - 1) // 2)),
    ("non-padded", PADDED, (MAX, MAX), {}, (MAX, 0)),
    ("non-padded-split-past-real", PADDED, (MAX, 0), {}, (0, 0)),
    ("draft", TNPS, (TV, MAX), {}, MAX),
    ("children-extend-one", CHILDREN, (E, [MAX], [MAX], [0]), {}, None),
    ("children-extend-prefix", CHILDREN, (E, [MAX], [1], [MAX - 1]), {}, None),
    ("children-extend-two", CHILDREN, (E, [MAX, MAX], [2**30, 2**30 - 1], [2**30 - 1, 2**30]),
     {}, None),
    ("children-extend-lopsided", CHILDREN, (E, [MAX, MAX], [1, MAX - 1]), {}, None),
    ("children-decode-lens", CHILDREN, (D, [MAX, MAX, MAX], None, None, 1), {}, None),
    ("children-verify-tokens", CHILDREN, (TV, [5], None, None, MAX), {}, None),
]


@pytest.mark.parametrize("function,args,kwargs,want", [
    pytest.param(*c[1:], id=c[0]) for c in AT_THE_TOP])
def test_the_top_of_the_range_is_accepted_alike(function, args, kwargs, want):
    got = outcome(impl, function, args, kwargs)
    assert outcome(spec, function, args, kwargs) == got
    assert not rejected(got), got
    if want is not None:
        assert got == want
    if function == CHILDREN:
        a, b = got
        assert a["token_range"][0] == 0 and b["token_range"][1] <= MAX


def test_replay_plans_at_the_top_of_the_range_agree():
    for args, kwargs in [((D, MAX, (MAX,)), dict(tbo=False)),
                         ((D, 3, (4, MAX - 1)), dict(tbo=True)),
                         ((TV, 1, (1,)), dict(tbo=False, draft_token_num=MAX)),
                         ((TV, 2, (2,)), dict(tbo=True, draft_token_num=MAX // 2))]:
        got = outcome(impl_plan, "plan_replay", args, kwargs, modes=impl)
        assert outcome(spec_plan, "plan_replay", args, kwargs, modes=spec) == got
        assert not rejected(got), got
    for module in (spec_plan, impl_plan):
        assert module.capture_batch_sizes(tbo=False, batch_sizes=[MAX, 1]) == (1, MAX)
        assert "odd" in module.tbo_capture_refusal(MAX)


# (id, function, args, kwargs, the argument or quantity the message names): past the top.
PAST_THE_TOP = [
    ("num-tokens", SEQ, (D, MAX + 1, None, 1), "num_tokens"),
    ("num-tokens-2**63", SEQ, (D, 2**63, None, 1), "num_tokens"),
    ("num-tokens-2**70", SEQ, (D, 2**70, None, 1), "num_tokens"),
    ("num-tokens-numpy-uint64", SEQ, (D, np.uint64(2**64 - 1), None, 1), "num_tokens"),
    ("num-tokens-numpy-int64", SEQ, (D, np.int64(MAX + 1), None, 1), "num_tokens"),
    ("tnps", SEQ, (TV, 0, None, MAX + 1), "token_num_per_seq"),
    ("extend-len", SEQ, (E, 0, [MAX + 1], None), "extend_lens[0]"),
    ("extend-sum", SEQ, (E, 0, [MAX, 1], None), "sum(extend_lens)"),
    ("extend-sum-of-many", SEQ, (E, 0, [2**30] * 4, None), "sum(extend_lens)"),
    ("extend-sum-int32-array", SEQ, (E, 0, np.array([MAX, 1], np.int32), None),
     "sum(extend_lens)"),
    ("extend-sum-2**64", SEQ, (E, 0, [MAX] * 9, None), "sum(extend_lens)"),
    ("token-split-seq", TOKEN, (MAX + 1, D, None, 1), "split_seq_index"),
    ("token-extend-sum", TOKEN, (0, E, [MAX, 1], None), "sum(extend_lens)"),
    ("token-product", TOKEN, (2, TV, None, 2**30), "split_seq_index * token_num_per_seq"),
    ("token-product-huge", TOKEN, (MAX, TV, None, MAX), "split_seq_index * token_num_per_seq"),
    ("replay-tokens", REPLAY, (D, MAX + 1, 1), "cuda_graph_num_tokens"),
    ("replay-tnps", REPLAY, (TV, 0, MAX + 1), "token_num_per_seq"),
    ("non-padded", PADDED, (0, MAX + 1), "num_token_non_padded"),
    ("non-padded-split", PADDED, (MAX + 1, 0), "split_token_index"),
    ("draft", TNPS, (TV, MAX + 1), "draft_token_num"),
    ("children-seq-len", CHILDREN, (D, [1, MAX + 1], None, None, 1), "seq_lens[1]"),
    ("children-extend-len", CHILDREN, (E, [MAX + 1], [MAX + 1], [0]), "seq_lens[0]"),
    ("children-extend-sum", CHILDREN, (E, [MAX, 1], [MAX, 1], [0, 0]), "sum(extend_lens)"),
    ("children-prefix", CHILDREN, (E, [MAX], [MAX], [MAX + 1]), "extend_prefix_lens[0]"),
    ("children-tokens", CHILDREN, (TV, [1, 1], None, None, 2**30),
     "len(seq_lens) * token_num_per_seq"),
    ("children-verify-tnps", CHILDREN, (TV, [1], None, None, MAX + 1), "token_num_per_seq"),
]


@pytest.mark.parametrize("function,args,argument", [
    pytest.param(c[1], c[2], c[3], id=c[0]) for c in PAST_THE_TOP])
def test_past_the_top_of_the_range_is_rejected_alike(function, args, argument):
    message = rejection(impl, function, args)
    assert rejection(spec, function, args) == message
    assert message.startswith(argument) and f"MAX_COUNT={MAX}" in message, message


PLANS_PAST_THE_TOP = [
    ("capture-size", "plan_replay", (D, 1, (2, MAX + 1)), dict(tbo=False), "capture_sizes"),
    ("real-bs", "plan_replay", (D, MAX + 1, (2,)), dict(tbo=False), "real_bs"),
    ("draft", "plan_replay", (TV, 1, (2,)), dict(tbo=False, draft_token_num=MAX + 1),
     "draft_token_num"),
    ("graph-tokens", "plan_replay", (TV, 1, (2,)), dict(tbo=False, draft_token_num=2**30),
     "graph_bs * token_num_per_seq"),
    ("graph-tokens-tbo", "plan_replay", (TV, 1, (2, 4)), dict(tbo=True, draft_token_num=2**30),
     "graph_bs * token_num_per_seq"),
    ("batch-size", "capture_batch_sizes", (), dict(tbo=False, batch_sizes=[2, MAX + 1]),
     "batch_sizes"),
    ("max-bs", "capture_batch_sizes", (), dict(tbo=False, max_bs=MAX + 1), "max_bs"),
    ("refusal", "tbo_capture_refusal", (MAX + 1,), {}, "bs"),
]


@pytest.mark.parametrize("function,args,kwargs,argument", [
    pytest.param(*c[1:], id=c[0]) for c in PLANS_PAST_THE_TOP])
def test_replay_plans_past_the_top_of_the_range_are_rejected_alike(function, args, kwargs,
                                                                   argument):
    message = rejection(impl_plan, function, resolve_modes(impl, args), kwargs)
    assert rejection(spec_plan, function, resolve_modes(spec, args), kwargs) == message
    assert message.startswith(argument) and f"MAX_COUNT={MAX}" in message, message


def test_the_pure_functions_in_int32_agree_at_the_top_of_the_range():
    """Within MAX_COUNT the pure JAX functions give the implementation's answers in int32 too
    (2 * left - total may wrap in int32, but the result fits, and XLA wraps)."""
    cases = [[2**30, 2**30 - 1], [1, MAX - 1], [MAX - 2, 1, 1], [MAX], [MAX // 3] * 3,
             [2**28] * 4 + [2**30 - 1]]
    with jax.enable_x64(False):
        for lens in cases:
            width = 8
            padded = jnp.asarray(lens + [0] * (width - len(lens)), jnp.int32)
            prefix = jnp.zeros(width, jnp.int32)
            split_seq, split_token, _ = spec.extend_split_indices(padded, len(lens), 0.48)
            a, b = spec.derive_extend_children(padded, padded, prefix, len(lens), 0.48)
            assert split_seq.dtype == jnp.int32 and a.seq_lens.dtype == jnp.int32
            want_a, want_b = impl.derive_children(impl.ForwardMode.EXTEND, lens, lens, None)
            assert (int(split_seq), int(split_token)) == (
                impl.compute_split_seq_index(impl.ForwardMode.EXTEND, sum(lens), lens, None),
                want_a.token_range[1]), lens
            for child, want in ((a, want_a), (b, want_b)):
                n = want.seq_range[1] - want.seq_range[0]
                assert (int(child.token_start), int(child.token_end)) == want.token_range
                assert tuple(child.extend_seq_lens[:n].tolist()) == want.extend_seq_lens
                assert tuple(child.extend_prefix_lens[:n].tolist()) == want.extend_prefix_lens
                assert tuple(child.extend_start_loc[:n].tolist()) == want.extend_start_loc
        for bs, tnps in [(1, MAX), (2, MAX // 2), (3, MAX // 3)]:
            seq_lens = jnp.asarray([MAX] * bs + [0] * (8 - bs), jnp.int32)
            a, b = spec.derive_uniform_children(seq_lens, jnp.int32(bs), jnp.int32(tnps))
            assert b.token_end.dtype == jnp.int32
            want_a, want_b = impl.derive_children(impl.ForwardMode.TARGET_VERIFY, [MAX] * bs,
                                                  None, None, tnps)
            assert (int(b.token_start), int(b.token_end)) == want_b.token_range
            assert spec.uniform_split_indices(jnp.int32(bs * tnps), tnps)[1] == \
                want_a.token_range[1]


# ---------------------------------------------------------------------------------------------
# Malformed arguments anywhere: a ValueError with the same message on both sides, never a
# TypeError or an OverflowError.
# ---------------------------------------------------------------------------------------------

class Shapeless:
    """Array-like attributes that are not: a ``shape`` that is no tuple of ints."""

    shape, dtype = 5, "int64"

    def __repr__(self):
        return "Shapeless()"


WEIRD = [object(), Shapeless(), None, 1.5, float("inf"), float("nan"), 1 + 2j, "x", b"x", True,
         np.True_, -1, 0, 2**70, -(2**70), np.float32(2), np.array([[1]]), np.array([1.5]),
         np.array(["a"]), np.array(3), [None], [object()], [[1]], [2**70], {}, {1}, {"a": 1},
         (1, 2, 3), enum.Enum("ForwardMode", ["PREFILL"]).PREFILL]

# (module of the spec, module of the implementation, function, valid args, valid kwargs)
VALID_CALLS = [
    (spec, impl, TNPS, (TV, 3), {}),
    (spec, impl, SEQ, (E, 7, [3, 4], None, 0.48), {}),
    (spec, impl, SEQ, (D, 4, None, 1, 0.48), {}),
    (spec, impl, SEQ, (I, 0, None, 0, 0.48), {}),
    (spec, impl, TOKEN, (1, E, [3, 4], None, 0.48), {}),
    (spec, impl, TOKEN, (2, TV, None, 3, 0.48), {}),
    (spec, impl, REPLAY, (TV, 12, 4), {}),
    (spec, impl, REPLAY, (I, 8, 1), {}),
    (spec, impl, PADDED, (4, 6), {}),
    (spec, impl, CHILDREN, (E, [3, 5], [3, 4], [0, 1], None, 0.48), {}),
    (spec, impl, CHILDREN, (TV, [5, 6], None, None, 2, 0.48), {}),
    (spec, impl, CHILDREN, (I, [], None, None, 0, 0.48), {}),
    (spec, impl, DP, ([(True, D), (True, None)],), {}),
    (spec_plan, impl_plan, "plan_replay", (TV, 3, [2, 4, 8]),
     dict(tbo=True, draft_token_num=2)),
    (spec_plan, impl_plan, "capture_batch_sizes", (), dict(tbo=True, batch_sizes=[4, 2])),
    (spec_plan, impl_plan, "capture_batch_sizes", (), dict(tbo=False, max_bs=9)),
    (spec_plan, impl_plan, "default_capture_batch_sizes", (9,), {}),
    (spec_plan, impl_plan, "tbo_capture_refusal", (4,), {}),
]


def _variants(args, kwargs):
    """Each argument (positional, keyword, a DP rank, a list entry) replaced by each weird
    value in turn."""
    for (i, arg), weird in itertools.product(enumerate(args), WEIRD):
        yield args[:i] + (weird,) + args[i + 1:], kwargs
        if isinstance(arg, list) and arg:
            yield args[:i] + ([weird] + arg[1:],) + args[i + 1:], kwargs
    for key, weird in itertools.product(kwargs, WEIRD):
        yield args, {**kwargs, key: weird}
        if isinstance(kwargs[key], list):
            yield args, {**kwargs, key: kwargs[key][:1] + [weird]}


@pytest.mark.parametrize("spec_module,impl_module,function,args,kwargs", [
    pytest.param(*c, id=f"{c[2]}-{i}") for i, c in enumerate(VALID_CALLS)])
def test_malformed_arguments_are_rejected_alike_never_with_another_error(
        spec_module, impl_module, function, args, kwargs):
    assert not rejected(outcome(impl_module, function, args, kwargs, modes=impl))
    rejections = 0
    for bad_args, bad_kwargs in _variants(args, kwargs):
        got = outcome(impl_module, function, bad_args, bad_kwargs, modes=impl)
        want = outcome(spec_module, function, bad_args, bad_kwargs, modes=spec)
        assert got == want, (bad_args, bad_kwargs)
        rejections += rejected(got)
    assert rejections, "no variant was rejected"


# ---------------------------------------------------------------------------------------------
# DECODE brings one token per sequence: token_num_per_seq may be left out (it is 1), and 1 in
# any integer form is the only value given that is accepted (others: test_bad_input.py).
# ---------------------------------------------------------------------------------------------

# Each DECODE call with token_num_per_seq at the end of its args (the argument under test).
_DECODE_CALLS = {
    SEQ: lambda n, lens, tnps: (D, n, None, tnps),
    TOKEN: lambda n, lens, tnps: (len(lens) // 2, D, None, tnps),
    REPLAY: lambda n, lens, tnps: (D, n, tnps),
    CHILDREN: lambda n, lens, tnps: (D, lens, None, None, tnps),
}


def test_the_issue_examples_in_decode():
    """derive_children(DECODE, [5, 6, 7]) used to be refused ('token_num_per_seq must be an
    integer ..., got None'); token_num_per_seq=4 in DECODE and token_num_per_seq(DECODE, 3)
    used to be accepted."""
    for side in BOTH:
        omitted = side.derive_children(side.ForwardMode.DECODE, [5, 6, 7])
        given = side.derive_children(side.ForwardMode.DECODE, [5, 6, 7], None, None, 1)
        assert omitted == given
    assert outcome(impl, CHILDREN, (D, [5, 6, 7])) == outcome(spec, CHILDREN, (D, [5, 6, 7]))
    for function, args in ((SEQ, (D, 8, None, 4)), (TNPS, (D, 3))):
        message = outcome(impl, function, args)
        assert rejected(message) and "token_num_per_seq" in message[1], message
        assert outcome(spec, function, args) == message


@settings(max_examples=200)  # a handful of calls per example on both sides; cheap rules
@given(case=strategies.uniform_cases("DECODE"),
       form=st.sampled_from([int, np.int64, np.int32, np.array]))
def test_decode_without_token_num_per_seq_is_decode_with_one(case, form):
    n, lens = case.num_tokens, list(case.seq_lens)
    for function, make in _DECODE_CALLS.items():
        want = outcome(impl, function, make(n, lens, 1))
        assert not rejected(want), (function, want)
        assert outcome(spec, function, make(n, lens, 1)) == want, function
        for tnps in (None, form(1)):
            for side in BOTH:
                assert outcome(side, function, make(n, lens, tnps)) == want, (side, tnps)
    for side in BOTH:  # draft_token_num: DECODE's count is 1 whether 1 is given or not
        assert side.token_num_per_seq(side.ForwardMode.DECODE) == 1
        assert side.token_num_per_seq(side.ForwardMode.DECODE, form(1)) == 1


# ---------------------------------------------------------------------------------------------
# The spec's Child and the implementation's TboChild: one comparable form, as_tuple().
# ---------------------------------------------------------------------------------------------

_CHILD_FIELDS = ("seq_range", "token_range", "seq_lens", "extend_seq_lens",
                 "extend_prefix_lens", "extend_start_loc", "extend_num_tokens")


def _children(side, case):
    extend = case.mode == "EXTEND"
    return side.derive_children(
        side.ForwardMode[case.mode], case.seq_lens, case.extend_lens if extend else None,
        case.prefix_lens if extend else None,
        side.token_num_per_seq(side.ForwardMode[case.mode], case.draft_token_num),
        case.threshold)


def _other(name, value):
    """A value of the child's field ``name`` that differs from ``value``."""
    if value is None:
        return 0 if name == "extend_num_tokens" else (0,)
    if isinstance(value, int):
        return value + 1
    return (value[0] + 1,) + value[1:] if value else (1,)


_any_case = st.sampled_from(["EXTEND", "DECODE", "TARGET_VERIFY", "IDLE"]).flatmap(
    strategies.cases_for)


@settings(max_examples=300)  # two splits per example on both sides (the JAX one jitted)
@given(case=_any_case, other=_any_case)
def test_child_and_tbo_child_compare_through_as_tuple(case, other):
    spec_children, impl_children = _children(spec, case), _children(impl, case)
    other_children = _children(spec, other)
    for spec_child, impl_child in zip(spec_children, impl_children):
        form = impl_child.as_tuple()
        assert spec_child.as_tuple() == form
        assert spec_child != impl_child  # different classes: == never holds, as documented
        # the form holds every field, in the order of the dataclass, as plain Python values
        assert [f.name for f in dataclasses.fields(spec_child)] == list(_CHILD_FIELDS)
        assert [f.name for f in dataclasses.fields(impl_child)] == list(_CHILD_FIELDS)
        assert form == tuple(plain(getattr(impl_child, name)) for name in _CHILD_FIELDS)
        assert type(form) is tuple and ints_are_python_ints(form), form
        assert all(value is None or type(value) in (int, tuple) for value in form), form
        hash(form)
        # a split that differs gives a different form: any field changed, on either side
        for name in _CHILD_FIELDS:
            for child in (spec_child, impl_child):
                changed = dataclasses.replace(child, **{name: _other(name, getattr(child, name))})
                assert changed.as_tuple() != form, name
        # ... and other splits (child B, another batch's children) equal it exactly when
        # their fields are equal
        for candidate in (*spec_children, *other_children):
            same = dataclasses.astuple(candidate) == dataclasses.astuple(impl_child)
            assert (candidate.as_tuple() == form) == same
