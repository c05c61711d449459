"""Routing, dispatch/combine and experts of the reference MoE block (docs/model.md, "MoE").

The JAX twin of ``torch_impl/moe.py``: pure, shape-static functions. Padding rows (``t >=
num_token_non_padded``) are routed nowhere, and experts are picked by gather/argsort, never by
boolean indexing. This module imports nothing from the rest of ``reference`` but the config,
so the model (``reference.model``) and its overlapped execution (``reference.operations``)
can both build on it.

Shape letters (docs/spec.md, "Shape letters"): ``T`` tokens, ``H`` hidden, ``E`` routed
experts, ``K`` top-k, ``I`` expert intermediate size, ``X`` shared experts, ``T*K`` (token,
expert) pairs; for group-limited routing ``G`` expert groups (``n_group``) of ``E/G`` experts
each, of which ``topk_group`` are kept per token.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from tbo_parity.reference.weights import (CORRECTION_BIAS, ROUTINGS, SCORINGS, ModelConfig,
                                          check_group_limited)


def check_scoring(scoring) -> str:
    """One of SCORINGS, else a ValueError naming ``scoring`` (the message of ModelConfig's
    check; ``torch_impl/moe.py`` raises the same)."""
    if not (isinstance(scoring, str) and scoring in SCORINGS):
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    return scoring


def check_routing(routing) -> str:
    """One of ROUTINGS, else a ValueError naming ``routing`` (ModelConfig's message)."""
    if not (isinstance(routing, str) and routing in ROUTINGS):
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    return routing


def router_scores(router_logits, *, scoring: str):
    """``[T, E]``: softmax over the experts, or an independent sigmoid per expert. Any other
    ``scoring`` is a ValueError naming it, raised before anything is computed."""
    if check_scoring(scoring) == "softmax":
        return jax.nn.softmax(router_logits, axis=-1)
    return jax.nn.sigmoid(router_logits)


def top_k_lower_id_first(scores, k: int):
    """``(values [T, K], ids [T, K] int32)``: the ``k`` largest scores of each row, largest
    first; among equal scores the lower expert id comes first (and is kept at the k-th place).

    ``jax.lax.top_k`` documents exactly this order: "If two elements are equal, the
    lower-index element appears first" (its docstring, jax/_src/lax/lax.py, and
    https://docs.jax.dev/en/latest/_autosummary/jax.lax.top_k.html).
    ``parity_tests/test_expert_ties.py`` pins it against a stable NumPy sort.
    """
    values, ids = jax.lax.top_k(scores, k)
    return values, ids.astype(jnp.int32)


def check_correction_bias(correction_bias, num_experts: int) -> None:
    """ValueError naming ``e_score_correction_bias`` unless it has shape ``[E]``."""
    shape = tuple(getattr(correction_bias, "shape", ()))
    if correction_bias is None or shape != (num_experts,):
        got = "None" if correction_bias is None else shape
        raise ValueError(f"{CORRECTION_BIAS} must have shape ({num_experts},) (one per "
                         f"expert), got {got}")


def group_limited_ids(corrected, *, top_k: int, n_group: int, topk_group: int):
    """``ids [T, K]`` int32 of DeepSeek-V3's group-limited selection on ``corrected [T, E]``.

    The E experts form G contiguous groups of E/G (group g holds experts ``g*E/G ..
    (g+1)*E/G - 1``); a group's score is the sum of its two largest entries; the
    ``topk_group`` best groups are kept (equal group scores: the lower group id first, also at
    the ``topk_group``-th place); the K largest entries of
    the kept groups' experts are chosen, largest first (equal entries: the lower expert id
    first). Experts outside the kept groups are masked to -inf, so none is ever chosen
    (``check_group_limited`` ensures the kept groups hold K experts).
    """
    num_tokens, num_experts = corrected.shape
    grouped = corrected.reshape(num_tokens, n_group, num_experts // n_group)  # [T, G, E/G]
    best_two, _ = jax.lax.top_k(grouped, 2)  # [T, G, 2]
    group_scores = best_two[..., 0] + best_two[..., 1]  # [T, G]
    _, kept_groups = top_k_lower_id_first(group_scores, topk_group)  # [T, topk_group]
    kept = jnp.any(kept_groups[:, :, None] == jnp.arange(n_group), axis=1)  # [T, G]
    kept_experts = jnp.repeat(kept, num_experts // n_group, axis=1)  # [T, E]
    _, ids = top_k_lower_id_first(jnp.where(kept_experts, corrected, -jnp.inf), top_k)
    return ids


def select_experts_group_limited(router_logits, correction_bias, *, top_k: int, n_group: int,
                                 topk_group: int, routed_scaling_factor):
    """``(topk_w [T, K], topk_ids [T, K] int32)``: DeepSeek-V3's routing of ``router_logits
    [T, E]`` with the per-expert ``correction_bias [E]`` (float32), no padding mask.

    Scores are ``sigmoid(logits)``; the bias is added for the *selection* only
    (``group_limited_ids`` on ``scores + bias``); the weights are the chosen experts'
    *uncorrected* scores, renormalised to sum to 1 over the K and multiplied by
    ``routed_scaling_factor``. Bad arguments are a ValueError naming the first
    (``check_group_limited``, then ``e_score_correction_bias``'s shape), before any work.
    """
    num_experts = router_logits.shape[-1]
    check_group_limited(num_experts, top_k, n_group, topk_group, routed_scaling_factor)
    check_correction_bias(correction_bias, num_experts)
    scores = jax.nn.sigmoid(router_logits)  # [T, E]
    corrected = scores + jnp.asarray(correction_bias, jnp.float32)  # [T, E], selection only
    topk_ids = group_limited_ids(corrected, top_k=top_k, n_group=n_group,
                                 topk_group=topk_group)  # [T, K]
    topk_w = jnp.take_along_axis(scores, topk_ids, axis=-1)  # [T, K], uncorrected
    topk_w = topk_w / jnp.sum(topk_w, axis=-1, keepdims=True)
    return topk_w * routed_scaling_factor, topk_ids


def max_ranks_reached(num_experts: int, num_ranks: int, n_group: int, topk_group: int,
                      top_k: int) -> int:
    """The most expert-parallel ranks one token's K experts can lie on under group-limited
    routing, when rank r holds experts ``r*L .. r*L + L-1`` (``L = num_experts / num_ranks``).

    Group g (of ``G = n_group`` groups) spans the ranks ``g*E/G // L .. ((g+1)*E/G - 1) // L``:
    an interval, and the intervals of groups 0, 1, ... move right, never back. A token's
    experts lie in ``topk_group`` kept groups, so it reaches at most the ranks of the best
    ``topk_group`` intervals' union, and at most K ranks (one per expert). The union of chosen
    intervals, taken in group order, is the first one's length plus, for each next, its ranks
    past the previous one's end; the best choice is a small dynamic programme over (groups
    chosen, last group). The bound is reached: any ``topk_group`` groups can win, and K experts
    can then sit on distinct ranks of their union. ValueError naming ``num_ranks`` if
    it is not an int >= 1 dividing ``num_experts``, else as ``check_group_limited``.
    Pure Python (no arrays): ``torch_impl/moe.py`` has the same function.
    """
    check_group_limited(num_experts, top_k, n_group, topk_group, 1.0)
    if (isinstance(num_ranks, bool) or not isinstance(num_ranks, int) or num_ranks < 1
            or num_experts % num_ranks):
        raise ValueError(f"num_ranks must be an int >= 1 dividing num_experts ({num_experts}), "
                         f"got {num_ranks!r}")
    size, per_rank = num_experts // n_group, num_experts // num_ranks
    first = [g * size // per_rank for g in range(n_group)]
    last = [(g * size + size - 1) // per_rank for g in range(n_group)]
    # union[g]: the most ranks `chosen` groups can span when g is the last of them
    union = {g: last[g] - first[g] + 1 for g in range(n_group)}
    for chosen in range(2, topk_group + 1):
        union = {g: max(union[prev] + last[g] - max(last[prev], first[g] - 1)
                        for prev in range(chosen - 2, g))
                 for g in range(chosen - 1, n_group)}
    return min(top_k, max(union.values()))


def select_experts(router_logits, num_token_non_padded, *, cfg: ModelConfig,
                   correction_bias=None):
    """``(topk_w [T, K], topk_ids [T, K] int32)``; rows ``t >= num_token_non_padded`` get 0, -1.

    ``cfg.routing`` "top_k": the weights are the top-k scores renormalised to sum to 1; ties go
    to the lower expert id. "group_limited": ``select_experts_group_limited`` with the layer's
    ``correction_bias [E]`` (``e_score_correction_bias``) and ``cfg``'s group fields. An unknown
    ``cfg.scoring`` or ``cfg.routing``, a bias given to routing "top_k" or missing for
    "group_limited", or bad group fields are a ValueError naming them, before any work.
    """
    check_scoring(cfg.scoring)
    if check_routing(cfg.routing) == "group_limited":
        if cfg.scoring != "sigmoid":
            raise ValueError(f"scoring must be 'sigmoid' with routing 'group_limited', "
                             f"got {cfg.scoring!r}")
        topk_w, topk_ids = select_experts_group_limited(
            router_logits, correction_bias, top_k=cfg.top_k, n_group=cfg.n_group,
            topk_group=cfg.topk_group, routed_scaling_factor=cfg.routed_scaling_factor)
    else:
        if correction_bias is not None:
            raise ValueError(f"{CORRECTION_BIAS} is used by routing 'group_limited' only; "
                             f"routing 'top_k' takes none")
        topk_w, topk_ids = top_k_lower_id_first(
            router_scores(router_logits, scoring=cfg.scoring), cfg.top_k)  # [T, K]
        topk_w = topk_w / jnp.sum(topk_w, axis=-1, keepdims=True)
    real = (jnp.arange(router_logits.shape[0]) < num_token_non_padded)[:, None]  # [T, 1]
    return jnp.where(real, topk_w, 0), jnp.where(real, topk_ids, -1)


def expert_load(topk_ids, *, num_experts):
    """``[E]`` int32: how many (token, k) pairs go to each expert; id -1 counts nowhere."""
    return jnp.sum(topk_ids.reshape(-1)[:, None] == jnp.arange(num_experts), axis=0,
                   dtype=jnp.int32)


@functools.partial(jax.tree_util.register_dataclass, meta_fields=[],
                   data_fields=["tokens", "expert_ids", "pair_index"])
@dataclasses.dataclass(frozen=True)
class Dispatched:
    """The expert-major buffer: pair ``p`` of it is the flat (token, k) pair ``pair_index[p]``."""

    tokens: jax.Array  # [T*K, H]  hidden state of each pair's token
    expert_ids: jax.Array  # [T*K]  non-decreasing, -1 (padding) pairs last
    pair_index: jax.Array  # [T*K]  flat index t*K + k of each pair


def dispatch(h, topk_ids, *, num_experts) -> Dispatched:
    """Order the ``T*K`` pairs by expert id, stably (token order within an expert).

    Id -1 sorts as ``num_experts`` so padding pairs go last; a stable argsort is a fixed-size
    permutation, so nothing here depends on the data's shape.
    """
    flat_ids = topk_ids.reshape(-1)  # [T*K]
    order = jnp.argsort(jnp.where(flat_ids < 0, num_experts, flat_ids), stable=True)  # [T*K]
    top_k = topk_ids.shape[1]
    return Dispatched(tokens=h[order // top_k], expert_ids=flat_ids[order], pair_index=order)


def swiglu(x, gate, up, down):
    """``(silu(x @ gate) * (x @ up)) @ down``; works per pair with batched weights too."""
    return jnp.einsum("...i,...ih->...h",
                      jax.nn.silu(jnp.einsum("...h,...hi->...i", x, gate))
                      * jnp.einsum("...h,...hi->...i", x, up), down)


def routed_experts(buffer: Dispatched, gate, up, down):
    """``[T*K, H]``: each pair through its expert (weights gathered per pair); -1 pairs give 0."""
    valid = buffer.expert_ids >= 0  # [T*K]
    e = jnp.where(valid, buffer.expert_ids, 0)
    out = swiglu(buffer.tokens, gate[e], up[e], down[e])  # [T*K, H] from [T*K, H, I] weights
    return jnp.where(valid[:, None], out, 0)


def combine(expert_out, pair_index, topk_w):
    """Scatter each pair's weighted output back to its token and sum: ``[T, H]``."""
    num_tokens, top_k = topk_w.shape
    weighted = expert_out * topk_w.reshape(-1)[pair_index][:, None]  # [T*K, H]
    return jnp.zeros((num_tokens, expert_out.shape[1]), expert_out.dtype).at[
        pair_index // top_k].add(weighted)


def shared_experts(h, gate, up, down):
    """Sum of the shared SwiGLU experts ``[X, ...]`` over ``X`` (zeros when ``X == 0``)."""
    return sum((swiglu(h, gate[j], up[j], down[j]) for j in range(gate.shape[0])),
               jnp.zeros_like(h))
