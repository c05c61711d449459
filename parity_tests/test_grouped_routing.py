"""Group-limited routing (DeepSeek-V3): the PyTorch side equals the JAX spec, and both equal
the definition (docs/model.md, "Group-limited routing (DeepSeek-V3)").

The definition, per token: ``scores = sigmoid(logits)`` ``[E]``; ``corrected = scores + bias``;
the E experts form G contiguous groups of S; a group's score is the sum of its 2 largest
corrected scores; the M best groups are kept (equal group scores: lower group id first); the K
largest corrected scores among the kept groups' experts are chosen, largest first (equal
scores: lower expert id first); the weights are the chosen experts' *uncorrected* scores,
renormalised over the K and multiplied by ``routed_scaling_factor``.

What is proven here:

- random logits and biases (hypothesis): both sides choose the same ids and weights, and the
  choice satisfies the definition (within float tolerance: no group outranked by M others
  holds a chosen expert, no unchosen expert of a chosen expert's group scores higher, at most
  M groups used, weights from the uncorrected scores);
- exact ties: tie-heavy inputs whose distinct values are far apart (a guard asserts it), so
  the definition has one exact answer, computed by ``oracle_ids`` with Python sorts; both sides
  equal it, id for id, on grids of corrected scores and through the sigmoid;
- a small example worked by hand; the bias moving the choice but never the weights; padding;
- the ValueErrors, alike on both sides, before any work; the weights' new bias entry;
- a negative test: mutants of the PyTorch side (higher id first on group ties or expert ties,
  the corrected score as the weight) fail the very property tests above;
- DeepSeek-V3's shape (256 experts, top-8, 8 groups, 4 kept): a token's experts span at most 4
  groups, and ``max_ranks_reached`` bounds the expert-parallel ranks it reaches, tight against
  brute force on every small shape;
- a whole-model forward with group-limited routing: PyTorch plain and TBO equal the spec.

The spec runs jitted over a few fixed shapes (each new shape compiles once, ~0.5 s), and the
hypothesis tests keep to those shapes and to 60 examples of 8 tokens each (not the profile's
2,000: the file must stay well under 30 s on 2 cores, and the exact-tie grids, the hand-made
ties and the brute force carry the exhaustive part).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from tbo_parity.parity_tests.model_parity import (CASES, build_world, fast_compile, make_models,
                                                  run_jax, run_torch)
from tbo_parity.reference import moe as ref_moe
from tbo_parity.reference import weights as ref_weights
from tbo_parity.torch_impl import config as torch_config
from tbo_parity.torch_impl import moe as torch_moe
from tbo_parity.torch_impl.model import MoEModel

WEIGHT_TOL = dict(rtol=2e-6, atol=1e-7)  # both sides' float32 sigmoid, sum and division
SELECTION_TOL = 1e-5  # float32 scores vs the float64 definition, for the property checks
EXAMPLES = 60  # per hypothesis test: the shapes are few and fixed, the values vary
NUM_TOKENS = 8
cuda = pytest.param("cuda", marks=[
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])
DEVICES = ["cpu", cuda]


@dataclasses.dataclass(frozen=True)
class Shape:
    """One routing shape: E experts in G groups, M groups kept, K experts chosen."""

    num_experts: int
    n_group: int
    topk_group: int
    top_k: int
    routed_scaling_factor: float = 2.5

    @property
    def group_size(self) -> int:
        return self.num_experts // self.n_group

    def args(self) -> dict:
        return dict(top_k=self.top_k, n_group=self.n_group, topk_group=self.topk_group,
                    routed_scaling_factor=self.routed_scaling_factor)


SHAPES = (
    Shape(8, 4, 2, 3),  # the hand-worked example's shape
    Shape(12, 3, 2, 4),  # groups of 4
    Shape(8, 2, 1, 4, 1.0),  # K fills the one kept group
    Shape(6, 3, 3, 2),  # every group kept: no limit
    Shape(8, 1, 1, 2),  # one group
    Shape(16, 4, 3, 1, 0.5),  # a single expert from 3 of 4 groups
)
SHAPE_IDS = [f"E{s.num_experts}-G{s.n_group}-M{s.topk_group}-K{s.top_k}" for s in SHAPES]


# --- the two sides --------------------------------------------------------------------------


@functools.cache
def _spec_jitted(name: str):
    return jax.jit(getattr(ref_moe, name), compiler_options=fast_compile(),
                   static_argnames=("top_k", "n_group", "topk_group", "routed_scaling_factor"))


def spec_select(logits, bias, shape: Shape) -> tuple:
    """The spec's ``(weights [T, K], ids [T, K])`` as numpy."""
    w, ids = _spec_jitted("select_experts_group_limited")(
        jnp.asarray(logits), jnp.asarray(bias), **shape.args())
    return np.asarray(w), np.asarray(ids)


def impl_select(logits, bias, shape: Shape, device="cpu") -> tuple:
    """The PyTorch side's ``(weights [T, K], ids [T, K])`` as numpy. The module attribute is
    looked up at each call, so a test can put a mutant in its place."""
    w, ids = torch_moe.select_experts_group_limited(
        torch.tensor(logits, device=device), torch.tensor(bias, device=device), **shape.args())
    return w.cpu().numpy(), ids.cpu().numpy()


# --- the definition, independently --------------------------------------------------------


def sigmoid64(logits) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))


def oracle_ids(corrected, shape: Shape) -> np.ndarray:
    """``[T, K]`` ids by the definition, with Python sorts on ``(-value, id)`` keys."""
    size = shape.group_size
    rows = []
    for row in np.asarray(corrected, np.float64).tolist():
        top_two = [sorted(row[g * size:(g + 1) * size], reverse=True)[:2]
                   for g in range(shape.n_group)]
        group_score = [a + b for a, b in top_two]
        kept = sorted(range(shape.n_group), key=lambda g: (-group_score[g], g))
        kept = kept[:shape.topk_group]
        candidates = [e for e in range(shape.num_experts) if e // size in kept]
        rows.append(sorted(candidates, key=lambda e: (-row[e], e))[:shape.top_k])
    return np.asarray(rows, np.int64).reshape(len(rows), shape.top_k)


def oracle_weights(logits, ids, shape: Shape) -> np.ndarray:
    """The chosen experts' uncorrected scores, renormalised and scaled (float64)."""
    picked = np.take_along_axis(sigmoid64(logits), np.asarray(ids, np.int64), axis=-1)
    return picked / picked.sum(axis=-1, keepdims=True) * shape.routed_scaling_factor


def assert_ties_are_exact(values: np.ndarray) -> None:
    """Guard of the tie tests: any two of ``values`` (float64) are equal or at least 1e-3
    apart, so float32 rounding cannot reorder them and the oracle's ties are the sides'."""
    distinct = np.unique(np.asarray(values, np.float64))
    assert distinct.size < 2 or np.diff(distinct).min() > 1e-3, distinct


def tie_guard(corrected, shape: Shape) -> None:
    """The guard over every value the definition compares: corrected scores and group scores
    (sums of each group's top 2)."""
    corrected = np.asarray(corrected, np.float64)
    grouped = np.sort(corrected.reshape(len(corrected), shape.n_group, -1), axis=-1)
    assert_ties_are_exact(corrected)
    assert_ties_are_exact(grouped[..., -1] + grouped[..., -2])


def assert_satisfies_definition(logits, bias, ids, weights, shape: Shape) -> None:
    """The definition's properties, within ``SELECTION_TOL`` (float64 against float32)."""
    corrected = sigmoid64(logits) + np.asarray(bias, np.float64)
    size = shape.group_size
    grouped = np.sort(corrected.reshape(len(corrected), shape.n_group, size), axis=-1)
    group_score = grouped[..., -1] + grouped[..., -2]  # [T, G]
    for t, row in enumerate(ids):
        assert len(set(row.tolist())) == shape.top_k, row
        groups = set((row // size).tolist())
        assert len(groups) <= shape.topk_group, f"token {t} spans groups {groups}"
        for g in groups:  # no chosen expert's group is outranked by M others
            assert (group_score[t] > group_score[t, g] + SELECTION_TOL).sum() < shape.topk_group
        unchosen = [e for e in range(shape.num_experts) if e // size in groups and e not in row]
        if unchosen:  # the K best of their groups, largest first
            assert corrected[t, row].min() >= corrected[t, unchosen].max() - SELECTION_TOL
        assert (np.diff(corrected[t, row]) <= SELECTION_TOL).all(), row
    np.testing.assert_allclose(weights, oracle_weights(logits, ids, shape), rtol=1e-5,
                               atol=1e-6)


# --- random logits and biases --------------------------------------------------------------


@st.composite
def random_cases(draw):
    """(shape, logits [8, E] float32, bias [E] float32): normal logits, a bias of one of four
    scales (none, small, as large as the scores' spread, dominating)."""
    shape = draw(st.sampled_from(SHAPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.0, 0.05, 0.3, 2.0]))
    logits = (rng.normal(size=(NUM_TOKENS, shape.num_experts)) * 2).astype(np.float32)
    bias = (rng.normal(size=shape.num_experts) * scale).astype(np.float32)
    return shape, logits, bias


def random_property(case) -> None:
    shape, logits, bias = case
    spec_w, spec_ids = spec_select(logits, bias, shape)
    impl_w, impl_ids = impl_select(logits, bias, shape)
    np.testing.assert_array_equal(impl_ids, spec_ids)
    np.testing.assert_allclose(impl_w, spec_w, **WEIGHT_TOL)
    assert_satisfies_definition(logits, bias, spec_ids, spec_w, shape)


@settings(max_examples=EXAMPLES)
@given(random_cases())
def test_random_logits_and_biases_agree_and_satisfy_the_definition(case):
    random_property(case)


# --- exact ties ------------------------------------------------------------------------------


@st.composite
def tied_corrected(draw):
    """(shape, corrected [8, E] float32): corrected scores on a grid of eighths in [-1, 2], from
    a few values only, so equal scores and equal group scores abound. Sums of eighths are exact
    in float32: the ties are exact on both sides and in the oracle."""
    shape = draw(st.sampled_from(SHAPES))
    palette = draw(st.lists(st.integers(-8, 16), min_size=1, max_size=3))
    cells = draw(st.lists(st.sampled_from(palette), min_size=NUM_TOKENS * shape.num_experts,
                          max_size=NUM_TOKENS * shape.num_experts))
    corrected = np.asarray(cells, np.float32).reshape(NUM_TOKENS, shape.num_experts) / 8
    return shape, corrected


def tied_corrected_property(case) -> None:
    shape, corrected = case
    ids_args = dict(top_k=shape.top_k, n_group=shape.n_group, topk_group=shape.topk_group)
    spec_ids = np.asarray(_spec_jitted_ids()(jnp.asarray(corrected), **ids_args))
    impl_ids = torch_moe.group_limited_ids(torch.tensor(corrected), **ids_args).numpy()
    want = oracle_ids(corrected, shape)
    np.testing.assert_array_equal(spec_ids, want, err_msg="spec")
    np.testing.assert_array_equal(impl_ids, want, err_msg="impl")


@functools.cache
def _spec_jitted_ids():
    return jax.jit(ref_moe.group_limited_ids, compiler_options=fast_compile(),
                   static_argnames=("top_k", "n_group", "topk_group"))


@settings(max_examples=EXAMPLES)
@given(tied_corrected())
def test_tied_corrected_scores_choose_the_lower_ids_on_both_sides(case):
    """Equal group scores keep the lower group id, equal corrected scores the lower expert id,
    at the M-th and K-th places too: both sides equal the oracle exactly."""
    tied_corrected_property(case)


@st.composite
def tied_logits(draw):
    """(shape, logits [8, E], bias [E]): integer logits 0..3 and one bias per *group* from {0,
    1/4}. The values compared are then a corrected score ``sigmoid(a) + b`` or a group score
    ``sigmoid(a) + sigmoid(c) + 2b`` (one bias per group); distinct ones are >= 9e-3 apart
    (``test_the_tie_grids_are_exact``; ``tie_guard`` checks each case): every tie is exact on
    both sides, and no other two values are near one. (A bias per expert would not do: the
    same scores and biases paired differently give equal group scores in exact arithmetic,
    which float32 may round apart, one side differently from the other.)"""
    shape = draw(st.sampled_from(SHAPES))
    cells = draw(st.lists(st.integers(0, 3), min_size=NUM_TOKENS * shape.num_experts,
                          max_size=NUM_TOKENS * shape.num_experts))
    group_bias = draw(st.lists(st.sampled_from([0.0, 0.25]), min_size=shape.n_group,
                               max_size=shape.n_group))
    logits = np.asarray(cells, np.float32).reshape(NUM_TOKENS, shape.num_experts)
    return shape, logits, np.repeat(np.asarray(group_bias, np.float32), shape.group_size)


def tied_logits_property(case, device="cpu") -> None:
    shape, logits, bias = case
    corrected = sigmoid64(logits) + bias
    tie_guard(corrected, shape)
    want = oracle_ids(corrected, shape)
    spec_w, spec_ids = spec_select(logits, bias, shape)
    impl_w, impl_ids = impl_select(logits, bias, shape, device)
    np.testing.assert_array_equal(spec_ids, want, err_msg="spec")
    np.testing.assert_array_equal(impl_ids, want, err_msg="impl")
    np.testing.assert_allclose(impl_w, spec_w, **WEIGHT_TOL)
    np.testing.assert_allclose(spec_w, oracle_weights(logits, want, shape), rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_tied_logits_choose_the_lower_ids_on_both_sides(device):
    """Through the sigmoid and the bias: both sides equal the oracle on tie-heavy logits."""
    @settings(max_examples=EXAMPLES)
    @given(tied_logits())
    def check(case):
        tied_logits_property(case, device)

    check()


@pytest.mark.parametrize("device", DEVICES)
def test_equal_groups_and_equal_experts_keep_the_lower_ids(device):
    """Hand-made ties, E=8 in 4 groups of 2, keep 2 groups, choose 3:
    row 0, all logits 0: every group scores 1, groups 0 and 1 kept, experts 0, 1, 2 (all
        scores equal);
    row 1, groups 1 and 3 equal ([2, 1] and [1, 2]) and best, group 0 and 2 lower: groups 1 and
        3 kept; scores 2 at experts 2 and 7, then 1 at 3 and 6: ids 2, 7, 3;
    row 2, group 2 best ([3, 3]); groups 0, 1, 3 equal ([2, 0], [0, 2], [2, 0]): group 0 joins
        group 2 (lower id), ids 4, 5, 0; expert 3 and 6 (also logit 2) lose with their groups.
    """
    logits = np.asarray([[0, 0, 0, 0, 0, 0, 0, 0],
                         [0, 0, 2, 1, 0, 0, 1, 2],
                         [2, 0, 0, 2, 3, 3, 2, 0]], np.float32)
    bias = np.zeros(8, np.float32)
    shape = SHAPES[0]
    want = np.asarray([[0, 1, 2], [2, 7, 3], [4, 5, 0]])
    tie_guard(sigmoid64(logits), shape)
    np.testing.assert_array_equal(oracle_ids(sigmoid64(logits), shape), want)
    for name, (_, ids) in (("spec", spec_select(logits, bias, shape)),
                           ("impl", impl_select(logits, bias, shape, device))):
        np.testing.assert_array_equal(ids, want, err_msg=name)


def test_the_tie_grids_are_exact():
    """The premise of ``tied_logits``: every corrected score and every group score it can
    produce, distinct ones at least 9e-3 apart."""
    corrected = [sigmoid64(a) + b for a in range(4) for b in (0.0, 0.25)]
    group_scores = [sigmoid64(a) + sigmoid64(c) + 2 * b
                    for a, c in itertools.combinations_with_replacement(range(4), 2)
                    for b in (0.0, 0.25)]
    for values in (corrected, group_scores):
        assert np.diff(np.unique(values)).min() > 9e-3


# --- worked by hand -------------------------------------------------------------------------


def test_hand_worked_example():
    """E=8 in G=4 groups of 2 (group g: experts 2g, 2g+1), keep M=2 groups, choose K=3, scale
    2.5. Logits and their sigmoids (4 decimals):
        expert   0       1       2       3       4       5       6       7
        logit    2      -1      -1       2       3       1       0       0.5
        score    0.8808  0.2689  0.2689  0.8808  0.9526  0.7311  0.5     0.6225
        bias     0       0       0       0      -0.5    -0.5     0.25    0.25
        corr.    0.8808  0.2689  0.2689  0.8808  0.4526  0.2311  0.75    0.8725
    Group scores (top 2 of the corrected): g0 = 0.8808 + 0.2689 = 1.1497, g1 = the same two
    values = 1.1497 (an exact tie), g2 = 0.4526 + 0.2311 = 0.6837, g3 = 0.8725 + 0.75 = 1.6225.
    Kept: g3, then g0 (tied with g1, lower id). Candidates 0, 1, 6, 7 by corrected score:
    0 (0.8808), 7 (0.8725), 6 (0.75), 1: ids [0, 7, 6]. Expert 3 scores as 0 but its group
    lost the tie; expert 4 has the highest raw score but the bias pulls its group last.
    Weights from the raw scores: 0.8808, 0.6225, 0.5 over their sum 2.0033, times 2.5:
    1.0992, 0.7768, 0.6240.
    Without the bias the groups score g0 = g1 = 1.1497, g2 = 1.6837, g3 = 1.1225: kept g2, g0;
    candidates 4 (0.9526), 0 (0.8808), 5 (0.7311), 1: ids [4, 0, 5].
    """
    logits = np.asarray([[2, -1, -1, 2, 3, 1, 0, 0.5]], np.float32)
    bias = np.asarray([0, 0, 0, 0, -0.5, -0.5, 0.25, 0.25], np.float32)
    shape = SHAPES[0]
    for name, select in (("spec", spec_select), ("impl", impl_select)):
        weights, ids = select(logits, bias, shape)
        np.testing.assert_array_equal(ids, [[0, 7, 6]], err_msg=name)
        np.testing.assert_allclose(weights, [[1.0992, 0.7768, 0.6240]], atol=1e-4,
                                   err_msg=name)
        _, unbiased_ids = select(logits, np.zeros(8, np.float32), shape)
        np.testing.assert_array_equal(unbiased_ids, [[4, 0, 5]], err_msg=name)


# --- the bias: selection only ---------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_the_bias_moves_the_choice_but_never_the_weights(shape):
    """A bias that favours the experts a token did not choose changes its choice; the weights
    are always the chosen experts' raw scores (renormalised and scaled), so two biases that
    choose alike give bit-identical weights, whatever the corrected scores were."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(NUM_TOKENS, shape.num_experts)).astype(np.float32)
    bias = (rng.normal(size=shape.num_experts) * 0.1).astype(np.float32)
    for select in (spec_select, impl_select):
        weights, ids = select(logits, bias, shape)
        shifted_w, shifted_ids = select(logits, bias + np.float32(0.5), shape)  # same order
        np.testing.assert_array_equal(shifted_ids, ids)
        np.testing.assert_array_equal(shifted_w, weights)
        favour = np.ones(shape.num_experts, np.float32) * 4  # the unchosen of token 0 win
        favour[ids[0]] = -4
        _, moved = select(logits, favour, shape)
        if shape.top_k < shape.num_experts // 2:
            assert not set(moved[0]) & set(ids[0]), (moved[0], ids[0])
        np.testing.assert_allclose(weights, oracle_weights(logits, ids, shape), rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_padding_rows_get_no_expert_on_both_sides(device):
    """Through select_experts with a config: rows past num_token_non_padded get -1 and 0, with
    a Python count and with a device count (the CUDA-graph form), as in top-k routing."""
    fields = dict(num_experts=8, top_k=3, scoring="sigmoid", routing="group_limited",
                  n_group=4, topk_group=2, routed_scaling_factor=2.5)
    ref_cfg, torch_cfg = ref_weights.ModelConfig(**fields), torch_config.ModelConfig(**fields)
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(5, 8)).astype(np.float32)
    bias = (rng.normal(size=8) * 0.2).astype(np.float32)
    spec_w, spec_ids = jax.jit(ref_moe.select_experts, static_argnames=("cfg",),
                               compiler_options=fast_compile())(
        jnp.asarray(logits), 3, cfg=ref_cfg, correction_bias=jnp.asarray(bias))
    assert (np.asarray(spec_ids)[3:] == -1).all() and (np.asarray(spec_w)[3:] == 0).all()
    routing = torch_moe.group_limited_routing(
        torch_cfg, {"layers.0.e_score_correction_bias": bias}, 0, device=device)
    assert routing.correction_bias.dtype == torch.float32
    for count, real in ((3, 3), (torch.tensor(3, device=device), 3), (5, 5)):
        w, ids = torch_moe.select_experts(torch.tensor(logits, device=device), top_k=3,
                                          scoring="sigmoid", num_token_non_padded=count,
                                          group_limited=routing)
        w, ids = w.cpu().numpy(), ids.cpu().numpy()
        np.testing.assert_array_equal(ids[:3], np.asarray(spec_ids)[:3])
        np.testing.assert_allclose(w[:3], np.asarray(spec_w)[:3], **WEIGHT_TOL)
        assert (ids[real:] == -1).all() and (w[real:] == 0).all() and (ids[:real] >= 0).all()
    assert torch_moe.group_limited_routing(torch_config.ModelConfig(), {}, 0,
                                           device=device) is None


# --- bad input, alike, before any work ----------------------------------------------------

E8 = dict(top_k=3, n_group=4, topk_group=2, routed_scaling_factor=2.5)
BAD_ARGS = [
    pytest.param(dict(n_group=3), "n_group (3) must divide num_experts (8)", id="n_group-3"),
    pytest.param(dict(n_group=0), "n_group must be an int >= 1, got 0", id="n_group-0"),
    pytest.param(dict(n_group=2.0), "n_group must be an int", id="n_group-float"),
    pytest.param(dict(n_group=8, topk_group=4), "n_group (8) leaves groups of 1", id="size-1"),
    pytest.param(dict(topk_group=0), "topk_group must be an int >= 1", id="topk_group-0"),
    pytest.param(dict(topk_group=5), "topk_group (5) must be <= n_group (4)", id="topk_group-5"),
    pytest.param(dict(top_k=5), "top_k (5) must be <= the experts of topk_group groups "
                                "(2 * 2 = 4)", id="top_k-5"),
    pytest.param(dict(top_k=0), "top_k must be an int >= 1", id="top_k-0"),
    pytest.param(dict(routed_scaling_factor=0), "routed_scaling_factor must be a finite "
                                                "number > 0, got 0", id="scale-0"),
    pytest.param(dict(routed_scaling_factor=-2.5), "routed_scaling_factor", id="scale-neg"),
    pytest.param(dict(routed_scaling_factor=float("nan")), "routed_scaling_factor", id="nan"),
    pytest.param(dict(routed_scaling_factor=float("inf")), "routed_scaling_factor", id="inf"),
    pytest.param(dict(routed_scaling_factor=True), "routed_scaling_factor", id="scale-bool"),
    pytest.param(dict(routed_scaling_factor="2.5"), "routed_scaling_factor", id="scale-str"),
]
BAD_BIASES = [pytest.param((7,), "(7,)", id="short"), pytest.param((1, 8), "(1, 8)", id="2d"),
              pytest.param(None, "None", id="none")]


def _rejections(calls: dict) -> dict:
    messages = {}
    for name, call in calls.items():
        with pytest.raises(ValueError) as info:
            call()
        messages[name] = str(info.value)
    return messages


def _stand_in_logits():
    """Only a shape: any computation on it fails with another error than ValueError, so a
    ValueError proves the check came first."""
    return types.SimpleNamespace(shape=(3, 8))


@pytest.mark.parametrize("overrides,words", BAD_ARGS)
def test_bad_group_arguments_are_rejected_alike_before_any_work(overrides, words):
    args = {**E8, **overrides}
    bias = np.zeros(8, np.float32)
    messages = _rejections({
        "spec": lambda: ref_moe.select_experts_group_limited(_stand_in_logits(), bias, **args),
        "impl": lambda: torch_moe.select_experts_group_limited(_stand_in_logits(), bias,
                                                               **args)})
    assert messages["spec"] == messages["impl"], messages
    assert words in messages["spec"], messages
    name = next(iter(overrides))
    assert messages["spec"].startswith(name), messages  # the argument is named first


@pytest.mark.parametrize("shape,words", BAD_BIASES)
def test_a_misshapen_or_missing_bias_is_rejected_alike_before_any_work(shape, words):
    bias = None if shape is None else np.zeros(shape, np.float32)
    messages = _rejections({
        "spec": lambda: ref_moe.select_experts_group_limited(_stand_in_logits(), bias, **E8),
        "impl": lambda: torch_moe.select_experts_group_limited(_stand_in_logits(), bias,
                                                               **E8)})
    assert messages["spec"] == messages["impl"], messages
    assert messages["spec"] == f"e_score_correction_bias must have shape (8,) (one per " \
                               f"expert), got {words}"


CONFIG_ERRORS = [
    pytest.param(dict(routing="grouped"), "routing must be one of", id="routing"),
    pytest.param(dict(routing=None), "routing must be one of", id="routing-none"),
    pytest.param(dict(routing="group_limited", n_group=4, topk_group=2),
                 "scoring must be 'sigmoid' with routing 'group_limited', got 'softmax'",
                 id="softmax"),
    pytest.param(dict(n_group=4), "n_group applies to routing 'group_limited' only",
                 id="top_k-n_group"),
    pytest.param(dict(topk_group=2), "topk_group applies to", id="top_k-topk_group"),
    pytest.param(dict(routed_scaling_factor=2.5), "routed_scaling_factor applies to",
                 id="top_k-scale"),
    pytest.param(dict(routed_scaling_factor=True), "routed_scaling_factor applies to",
                 id="top_k-scale-bool"),
] + [pytest.param(dict(routing="group_limited", scoring="sigmoid", **{**E8, **p.values[0]}),
                  p.values[1], id="config-" + p.id) for p in BAD_ARGS
     if "top_k" not in p.values[0] or p.values[0]["top_k"] <= 8]


@pytest.mark.parametrize("fields,words", CONFIG_ERRORS)
def test_bad_routing_configs_are_rejected_alike(fields, words):
    messages = _rejections({"spec": lambda: ref_weights.ModelConfig(**fields),
                            "impl": lambda: torch_config.ModelConfig(**fields)})
    assert messages["spec"] == messages["impl"], messages
    assert words in messages["spec"], messages


def test_select_experts_names_what_its_routing_lacks_or_cannot_use():
    """Stand-in configs reach select_experts' own checks (a real ModelConfig refuses these
    already): an unknown routing, group-limited routing with softmax, a bias missing for it or
    given to top-k routing; the PyTorch select_experts refuses softmax with the spec's words."""
    logits = jnp.zeros((2, 8))
    cfg = types.SimpleNamespace(scoring="sigmoid", routing="group_limited", num_experts=8,
                                **E8)
    messages = _rejections({
        "routing": lambda: ref_moe.select_experts(
            logits, 2, cfg=types.SimpleNamespace(scoring="sigmoid", routing="topk")),
        "softmax": lambda: ref_moe.select_experts(
            logits, 2, cfg=types.SimpleNamespace(**{**vars(cfg), "scoring": "softmax"})),
        "missing": lambda: ref_moe.select_experts(logits, 2, cfg=cfg),
        "unused": lambda: ref_moe.select_experts(logits, 2, cfg=ref_weights.ModelConfig(),
                                                 correction_bias=jnp.zeros(8)),
        "impl softmax": lambda: torch_moe.select_experts(
            torch.zeros(2, 8), top_k=3, scoring="softmax", num_token_non_padded=2,
            group_limited=torch_moe.GroupLimited(4, 2, 2.5, torch.zeros(8)))})
    assert messages["routing"] == ("routing must be one of ('top_k', 'group_limited'), "
                                   "got 'topk'")
    assert messages["softmax"] == messages["impl softmax"] == (
        "scoring must be 'sigmoid' with routing 'group_limited', got 'softmax'")
    assert messages["missing"].startswith("e_score_correction_bias must have shape (8,)")
    assert messages["unused"].startswith("e_score_correction_bias is used by routing "
                                         "'group_limited' only")


# --- the weights: the bias only where the routing reads it ---------------------------------


GROUPED = dict(num_experts=8, top_k=3, scoring="sigmoid", routing="group_limited", n_group=4,
               topk_group=2, routed_scaling_factor=2.5, num_layers=2)


def test_the_bias_is_a_weight_of_each_layer_only_under_group_limited_routing():
    for fields in ({}, GROUPED):
        ref_cfg = ref_weights.ModelConfig(**fields)
        shapes = ref_weights.weight_shapes(ref_cfg)
        assert shapes == torch_config.weight_shapes(torch_config.ModelConfig(**fields))
        biases = {k: v for k, v in shapes.items() if k.endswith("e_score_correction_bias")}
        want = {f"layers.{l}.e_score_correction_bias": (8,) for l in range(2)} if fields else {}
        assert biases == want
    weights = ref_weights.init_weights(ref_weights.ModelConfig(**GROUPED), 0)
    bias = weights["layers.0.e_score_correction_bias"]
    assert bias.dtype == np.float32 and abs(bias.mean()) < 0.2 and bias.std() > 0
    # the other configs draw exactly what they drew before the bias existed
    plain = ref_weights.init_weights(ref_weights.ModelConfig(), 0)
    assert list(plain) == list(ref_weights.weight_shapes(ref_weights.ModelConfig()))


def test_the_model_refuses_a_missing_misshapen_or_unused_bias():
    ref_cfg, torch_cfg, weights, _ = make_models(seed=0, **GROUPED)
    name = "layers.1.e_score_correction_bias"
    cases = {"missing": ({k: v for k, v in weights.items() if k != name}, torch_cfg,
                         f"weights is missing {name!r}"),
             "misshapen": ({**weights, name: np.zeros(7, np.float32)}, torch_cfg,
                           f"weights[{name!r}] has shape (7,), expected (8,)"),
             "unused": (ref_weights.init_weights(ref_weights.ModelConfig(), 0) | {
                 "layers.0.e_score_correction_bias": np.zeros(8, np.float32)},
                 torch_config.ModelConfig(),
                 "weights has 'layers.0.e_score_correction_bias', a correction bias this "
                 "config does not use (routing 'top_k', 2 layers)")}
    for what, (w, cfg, message) in cases.items():
        with pytest.raises(ValueError) as info:
            MoEModel(cfg, w)
        assert str(info.value) == message, what


# --- negative test: mutants of the PyTorch side fail the property tests --------------------


def mutant_ids(corrected, *, top_k, n_group, topk_group, group_ties="lower",
               expert_ties="lower"):
    """Group-limited selection written apart from torch_impl, with switchable faults:
    ``group_ties`` / ``expert_ties`` "higher" puts the higher id first among equals."""
    num_tokens, num_experts = corrected.shape

    def best(values, k, ties):  # ids of the k largest per row, ties broken per `ties`
        if ties == "higher":  # reverse the columns, take lower-first there, map back
            return values.shape[-1] - 1 - best(values.flip(-1), k, "lower")
        return torch.sort(values, dim=-1, descending=True, stable=True).indices[:, :k]

    grouped = corrected.reshape(num_tokens, n_group, -1).sort(dim=-1, descending=True).values
    kept = best(grouped[..., 0] + grouped[..., 1], topk_group, group_ties)  # [T, M]
    group_of = torch.arange(num_experts) // (num_experts // n_group)  # [E]
    in_kept = (group_of[None, None, :] == kept[:, :, None]).any(dim=1)  # [T, E]
    return best(corrected.masked_fill(~in_kept, -math.inf), top_k, expert_ties)


def mutant_select(router_logits, correction_bias, *, top_k, n_group, topk_group,
                  routed_scaling_factor, weights_from="scores", **ties):
    """The whole routing around ``mutant_ids``; ``weights_from`` "corrected" lets the bias leak
    into the weights. All defaults: correct."""
    scores = torch.sigmoid(router_logits)
    corrected = scores + correction_bias
    ids = mutant_ids(corrected, top_k=top_k, n_group=n_group, topk_group=topk_group, **ties)
    weights = (corrected if weights_from == "corrected" else scores).gather(1, ids)
    return weights / weights.sum(dim=-1, keepdim=True) * routed_scaling_factor, ids


MUTANTS = {
    "correct": ({}, None),
    "higher group id on ties": (dict(group_ties="higher"), tied_corrected),
    "higher expert id on ties": (dict(expert_ties="higher"), tied_corrected),
    "corrected score as weight": (dict(weights_from="corrected"), random_cases),
}
PROPERTIES = {tied_corrected: tied_corrected_property, random_cases: random_property,
              tied_logits: tied_logits_property}


def _fails(strategy, monkeypatch, faults) -> bool:
    """Whether the property test of ``strategy`` fails with the mutant in torch_impl's place
    (the same property function and strategy; generation only, no shrinking)."""
    ties = {k: v for k, v in faults.items() if k.endswith("_ties")}
    monkeypatch.setattr(torch_moe, "select_experts_group_limited",
                        functools.partial(mutant_select, **faults))
    monkeypatch.setattr(torch_moe, "group_limited_ids", functools.partial(mutant_ids, **ties))

    @settings(max_examples=EXAMPLES, phases=[Phase.generate], database=None,
              report_multiple_bugs=False)
    @given(strategy())
    def run(case):
        PROPERTIES[strategy](case)

    try:
        run()
    except AssertionError:
        return True
    return False


@pytest.mark.parametrize("mutant", MUTANTS, ids=list(MUTANTS))
def test_mutants_fail_the_property_tests(mutant, monkeypatch):
    """Each fault is caught by a property test of this file, run unchanged against the
    mutant; the mutant without faults passes every one (so a failure is the fault's)."""
    faults, catching = MUTANTS[mutant]
    if catching is None:
        for strategy in PROPERTIES:
            assert not _fails(strategy, monkeypatch, faults), strategy.__name__
    else:
        assert _fails(catching, monkeypatch, faults)


# --- DeepSeek-V3's shape and the expert-parallel ranks it reaches ---------------------------

DEEPSEEK_V3 = Shape(256, 8, 4, 8, 2.5)  # 256 routed experts, top-8, 8 groups, 4 kept


def test_deepseek_v3_shape_spans_at_most_topk_group_groups_and_the_rank_bound():
    """DeepSeek-V3's routing keeps a token within 4 of 8 groups; with one group per node (8
    nodes of 32 experts) that is at most 4 nodes, which its dispatch relies on. Both sides agree
    on 64 random tokens, each within 4 groups, and within ``max_ranks_reached`` ranks for every
    contiguous layout."""
    rng = np.random.default_rng(3)
    logits = (rng.normal(size=(64, 256)) * 2).astype(np.float32)
    bias = (rng.normal(size=256) * 0.3).astype(np.float32)
    spec_w, spec_ids = spec_select(logits, bias, DEEPSEEK_V3)
    impl_w, impl_ids = impl_select(logits, bias, DEEPSEEK_V3)
    np.testing.assert_array_equal(impl_ids, spec_ids)
    np.testing.assert_allclose(impl_w, spec_w, **WEIGHT_TOL)
    spans = [len(set((row // 32).tolist())) for row in spec_ids]
    assert max(spans) <= 4 and min(spans) >= 1
    bounds = {}
    for num_ranks in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        per_rank = 256 // num_ranks
        bound = ref_moe.max_ranks_reached(256, num_ranks, 8, 4, 8)
        assert bound == torch_moe.max_ranks_reached(256, num_ranks, 8, 4, 8)
        assert max(len(set((row // per_rank).tolist())) for row in spec_ids) <= bound
        bounds[num_ranks] = bound
    assert bounds == {1: 1, 2: 2, 4: 4, 8: 4, 16: 8, 32: 8, 64: 8, 128: 8, 256: 8}
    for cfg in (ref_weights.ModelConfig, torch_config.ModelConfig):  # the published config
        cfg(num_experts=256, top_k=8, num_shared_experts=1, scoring="sigmoid",
            routing="group_limited", n_group=8, topk_group=4, routed_scaling_factor=2.5)


def brute_force_max_ranks(num_experts, num_ranks, n_group) -> dict:
    """``{(topk_group, top_k): most ranks}`` by enumerating every set of experts: a token can
    choose any K experts spanning at most M groups (any M groups can be the best, and any K of
    their experts the largest), so the most ranks is the best such set's count."""
    size, per_rank = num_experts // n_group, num_experts // num_ranks
    best = {}
    for k in range(1, num_experts + 1):
        for chosen in itertools.combinations(range(num_experts), k):
            groups = len({e // size for e in chosen})
            ranks = len({e // per_rank for e in chosen})
            best[groups, k] = max(best.get((groups, k), 0), ranks)
    return {(m, k): max(v for (g, kk), v in best.items() if kk == k and g <= m)
            for m in range(1, n_group + 1) for k in range(1, m * size + 1)}


def small_layouts():
    for num_experts in range(2, 11):
        for num_ranks in range(1, num_experts + 1):
            for n_group in range(1, num_experts // 2 + 1):
                if num_experts % num_ranks == 0 and num_experts % n_group == 0:
                    yield num_experts, num_ranks, n_group


def test_max_ranks_reached_equals_brute_force_on_small_shapes():
    """Every layout of up to 10 experts (groups of >= 2, any dividing rank count), every M and
    K: both sides' bound equals the most ranks any allowed choice of experts reaches."""
    checked = 0
    for num_experts, num_ranks, n_group in small_layouts():
        for (m, k), want in brute_force_max_ranks(num_experts, num_ranks, n_group).items():
            args = (num_experts, num_ranks, n_group, m, k)
            assert ref_moe.max_ranks_reached(*args) == want, args
            assert torch_moe.max_ranks_reached(*args) == want, args
            checked += 1
    assert checked > 500


@pytest.mark.parametrize("layout", [(8, 4, 4, 2, 3), (12, 4, 6, 2, 4), (12, 3, 4, 3, 3),
                                    (10, 5, 5, 2, 2), (12, 6, 2, 1, 6)])
def test_routing_reaches_the_rank_bound(layout):
    """The bound is reached by the routing itself, on both sides: logits 6 on the brute force's
    best experts, 0 on the rest of their groups, -6 elsewhere."""
    num_experts, num_ranks, n_group, m, k = layout
    size, per_rank = num_experts // n_group, num_experts // num_ranks
    bound = ref_moe.max_ranks_reached(*layout)
    best = max((c for c in itertools.combinations(range(num_experts), k)
                if len({e // size for e in c}) <= m),
               key=lambda c: len({e // per_rank for e in c}))
    logits = np.full((1, num_experts), -6, np.float32)
    for e in range(num_experts):
        if e // size in {c // size for c in best}:
            logits[0, e] = 0
    logits[0, list(best)] = 6
    shape = Shape(num_experts, n_group, m, k)
    for select in (spec_select, impl_select):
        _, ids = select(logits, np.zeros(num_experts, np.float32), shape)
        assert len({e // per_rank for e in ids[0].tolist()}) == bound


def test_max_ranks_reached_rejects_a_bad_rank_count_alike():
    for bad in (0, 3, 2.0, True):
        messages = _rejections({
            "spec": lambda: ref_moe.max_ranks_reached(8, bad, 4, 2, 3),
            "impl": lambda: torch_moe.max_ranks_reached(8, bad, 4, 2, 3)})
        assert messages["spec"] == messages["impl"]
        assert messages["spec"].startswith("num_ranks must be an int >= 1 dividing")
    messages = _rejections({"spec": lambda: ref_moe.max_ranks_reached(8, 2, 3, 2, 3),
                            "impl": lambda: torch_moe.max_ranks_reached(8, 2, 3, 2, 3)})
    assert messages["spec"] == messages["impl"] == "n_group (3) must divide num_experts (8)"


# --- a whole model routed group-limited ------------------------------------------------------

F32_BOUND = 1e-5  # test_model_parity.py's float32 bound


def test_whole_model_with_group_limited_routing_matches_the_spec():
    """A 2-layer model with 8 experts in 4 groups (2 kept, top-3, scale 2.5) and drawn biases:
    PyTorch plain and TBO equal the JAX spec on a two-chunk prefill (hidden states, logits, KV
    cache, expert loads). Zeroing the biases changes the expert loads on both sides alike:
    the bias is wired through each model's routing."""
    ref_cfg, torch_cfg, weights, model = make_models(seed=0, **GROUPED)
    world = build_world(CASES["extend-two-chunk-prefixed"], ref_cfg)
    spec = run_jax(world, ref_cfg, weights)
    for tbo in (False, True):
        got = run_torch(world, model, tbo=tbo)
        np.testing.assert_array_equal(got["expert_load"], spec["expert_load"])
        for name in ("hidden", "logits", "k_pool", "v_pool"):
            scale = np.abs(spec[name]).max()
            assert np.abs(got[name] - spec[name]).max() <= F32_BOUND * scale, (tbo, name)
    unbiased = {k: np.zeros_like(v) if k.endswith("e_score_correction_bias") else v
                for k, v in weights.items()}
    spec_unbiased = run_jax(world, ref_cfg, unbiased)
    torch_unbiased = run_torch(world, MoEModel(torch_cfg, unbiased), tbo=False)
    np.testing.assert_array_equal(torch_unbiased["expert_load"], spec_unbiased["expert_load"])
    assert (spec_unbiased["expert_load"] != spec["expert_load"]).any()
