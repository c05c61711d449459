"""Ties in expert selection: among equal router scores the lower expert id wins, on both sides.

docs/model.md: ``topk_w, topk_ids = top_k(scores, K)  # ties: lower id first``. The JAX spec
gets this order from ``jax.lax.top_k`` (documented: "If two elements are equal, the
lower-index element appears first"); the PyTorch side from a stable descending sort
(``torch.topk`` leaves the order of equal values unspecified, and on CPU it does pick other
experts: all-equal scores of 8 experts give ids [6, 5]).

The router logits below hold exact ties (small integers, so equal logits give bit-identical
scores on each side and distinct ones never round together). The expected ids come straight
from the logits: softmax and sigmoid are increasing, so the ranking of the scores is the
ranking of the logits, and a stable sort of ``-logits`` puts the lower id first among equals.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tbo_parity.parity_tests.model_parity import CASES, build_world, make_models, run_jax, run_torch
from tbo_parity.reference import moe as ref_moe
from tbo_parity.reference.weights import ModelConfig
from tbo_parity.torch_impl import moe as torch_moe
from tbo_parity.torch_impl.model import MoEModel

NUM_EXPERTS = 8
WEIGHT_TOL = dict(rtol=1e-6, atol=1e-7)  # both sides' float32 softmax/sigmoid and a division
cuda = pytest.param("cuda", marks=[
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])
DEVICES = ["cpu", cuda]
SCORINGS = ("softmax", "sigmoid")
TOP_KS = (1, 2, 3, NUM_EXPERTS)
TIE_CASES = ("several_equal_top_scores", "tie_at_the_kth_place", "all_equal",
             "ties_at_the_highest_ids", "random_small_integers")


def tied_logits(name: str) -> np.ndarray:
    """``[T, 8]`` float32 router logits of one tie pattern."""
    if name == "several_equal_top_scores":  # the best score held by 3, 4 or 8 experts
        rows = [[0, 3, 3, 3, 1, 0, 2, 0], [5, 5, 1, 5, 5, 0, 0, 2], [2, 2, 2, 2, 2, 2, 2, 2]]
    elif name == "tie_at_the_kth_place":  # a clear best, then equal runners-up
        rows = [[0, 1, 1, 4, 1, 0, 1, 0], [7, 0, 3, 3, 3, 3, 0, 0], [1, 6, 5, 5, 0, 5, 5, 4]]
    elif name == "all_equal":
        rows = [[0.0] * NUM_EXPERTS, [-3.0] * NUM_EXPERTS, [0.75] * NUM_EXPERTS]
    elif name == "ties_at_the_highest_ids":  # equal best scores at the end of the row
        rows = [[0, 0, 0, 0, 0, 0, 2, 2], [1, 0, 0, 0, 3, 3, 3, 3], [0, 0, 0, 0, 0, 1, 1, 1]]
    elif name == "random_small_integers":  # many rows, ties everywhere
        rows = np.random.default_rng(0).integers(-2, 3, size=(64, NUM_EXPERTS))
    else:
        raise KeyError(name)
    return np.asarray(rows, np.float32)


def lower_id_first(logits: np.ndarray, k: int) -> np.ndarray:
    """``[T, k]`` ids of the spec: largest score first, the lower id first among equals."""
    return np.argsort(-logits, axis=-1, kind="stable")[:, :k]


def jax_select(logits, k, scoring, num_token_non_padded):
    cfg = ModelConfig(num_experts=NUM_EXPERTS, top_k=k, scoring=scoring)
    weights, ids = ref_moe.select_experts(jnp.asarray(logits), num_token_non_padded, cfg=cfg)
    return np.asarray(weights), np.asarray(ids)


def torch_select(logits, k, scoring, num_token_non_padded, device):
    weights, ids = torch_moe.select_experts(torch.tensor(logits, device=device), top_k=k,
                                            scoring=scoring,
                                            num_token_non_padded=num_token_non_padded)
    return weights.cpu().numpy(), ids.cpu().numpy()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("k", TOP_KS)
@pytest.mark.parametrize("case", TIE_CASES)
def test_tied_scores_go_to_the_lower_expert_id_on_both_sides(device, scoring, k, case):
    """Torch ids == JAX ids == the stable ranking of the logits, exactly; weights agree."""
    logits = tied_logits(case)
    num_tokens = logits.shape[0]
    want = lower_id_first(logits, k)
    jax_w, jax_ids = jax_select(logits, k, scoring, num_tokens)
    torch_w, torch_ids = torch_select(logits, k, scoring, num_tokens, device)
    np.testing.assert_array_equal(jax_ids, want, err_msg="JAX ids")
    np.testing.assert_array_equal(torch_ids, want, err_msg=f"torch ids on {device}")
    np.testing.assert_allclose(torch_w, jax_w, **WEIGHT_TOL)
    np.testing.assert_allclose(torch_w.sum(axis=-1), 1.0, **WEIGHT_TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scoring", SCORINGS)
def test_tied_padding_rows_get_no_expert_with_a_host_or_device_count(device, scoring):
    """Padding rows get id -1 and weight 0 whether the real-row count is a Python int or a
    0-dim device tensor (as in a CUDA graph); real rows still break ties by the lower id."""
    logits, k, real = tied_logits("tie_at_the_kth_place"), 2, 2
    want = np.concatenate([lower_id_first(logits[:real], k), np.full((1, k), -1)])
    _, jax_ids = jax_select(logits, k, scoring, real)
    np.testing.assert_array_equal(jax_ids, want)
    for count in (real, torch.tensor(real, device=device)):
        weights, ids = torch_select(logits, k, scoring, count, device)
        np.testing.assert_array_equal(ids, want)
        np.testing.assert_array_equal(weights[real:], 0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scoring", SCORINGS)
def test_tie_breaking_select_experts_is_capturable_and_never_syncs(scoring):
    """The PyTorch selection runs inside a CUDA graph: captured once, replayed with new tied
    logits and a new real-row count written into the graph's tensors, it gives the eager
    (and the spec's) ids; eagerly it makes no host synchronisation."""
    device, k = "cuda", 3
    logits = torch.tensor(tied_logits("random_small_integers"), device=device)
    count = torch.tensor(logits.shape[0], device=device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch_moe.select_experts(logits, top_k=k, scoring=scoring, num_token_non_padded=count)
        torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = _capture_select(logits, count, k, scoring)
    new_logits = tied_logits("random_small_integers")[::-1].copy()
    logits.copy_(torch.tensor(new_logits))
    count.fill_(40)
    graph.replay()
    want = np.concatenate([lower_id_first(new_logits[:40], k), np.full((24, k), -1)])
    np.testing.assert_array_equal(graph.outputs[1].cpu().numpy(), want)


@dataclasses.dataclass
class _CapturedSelect:
    graph: torch.cuda.CUDAGraph
    outputs: tuple

    def replay(self):
        self.graph.replay()
        torch.cuda.synchronize()


def _capture_select(logits, count, k, scoring) -> _CapturedSelect:
    def run():
        return torch_moe.select_experts(logits, top_k=k, scoring=scoring,
                                        num_token_non_padded=count)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up outside the graph, as capture requires
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = run()
    return _CapturedSelect(graph, outputs)


# ---------------------------------------------------------------------------------------------
# End to end: a model whose router ties every expert.
# ---------------------------------------------------------------------------------------------


def tied_router_models(scoring, top_k, device):
    """(JAX config, weights, torch model) with layer 0's router zeroed: every token's scores
    tie across all experts there, so it must go to experts 0 .. top_k-1."""
    ref_cfg, torch_cfg, weights, _ = make_models(seed=0, scoring=scoring, top_k=top_k)
    weights = dict(weights)
    weights["layers.0.router"] = np.zeros_like(weights["layers.0.router"])
    return ref_cfg, weights, MoEModel(torch_cfg, weights, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scoring,top_k", [("softmax", 2), ("sigmoid", 3)])
@pytest.mark.parametrize("case", ["decode", "extend-two-chunk-prefixed", "target-verify-tree"])
def test_all_tied_router_routes_to_the_lowest_ids_in_every_path(device, scoring, top_k, case):
    """Torch plain, torch TBO, JAX plain and JAX TBO give equal expert loads, and layer 0 (all
    scores tied) sends every token to experts 0 .. top_k-1; outputs agree as usual."""
    ref_cfg, weights, model = tied_router_models(scoring, top_k, device)
    world = build_world(CASES[case], ref_cfg)
    runs = {"jax plain": run_jax(world, ref_cfg, weights),
            "jax TBO": run_jax(world, ref_cfg, weights, tbo=True),
            "torch plain": run_torch(world, model, tbo=False),
            "torch TBO": run_torch(world, model, tbo=True)}
    tied_layer = np.zeros(ref_cfg.num_experts, np.int64)
    tied_layer[:top_k] = world.num_token_non_padded
    for name, out in runs.items():
        np.testing.assert_array_equal(out["expert_load"][0], tied_layer, err_msg=name)
        np.testing.assert_array_equal(out["expert_load"], runs["jax plain"]["expert_load"],
                                      err_msg=name)
        scale = np.abs(runs["jax plain"]["hidden"]).max()
        assert np.abs(out["hidden"] - runs["jax plain"]["hidden"]).max() <= 1e-5 * scale, name
