"""Routing, dispatch/combine and experts of the reference MoE block (docs/model.md, "MoE").

The JAX twin of ``torch_impl/moe.py``: pure, shape-static functions. Padding rows (``t >=
num_token_non_padded``) are routed nowhere, and experts are picked by gather/argsort, never by
boolean indexing. This module imports nothing from the rest of ``reference`` but the config,
so the model (``reference.model``) and its overlapped execution (``reference.operations``)
can both build on it.

Shape letters: ``T`` tokens, ``H`` hidden, ``E`` routed experts, ``K`` top-k, ``I`` expert
intermediate size, ``X`` shared experts, ``TK`` = ``T * K`` (token, expert) pairs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from reference.weights import SCORINGS, ModelConfig


def check_scoring(scoring) -> str:
    """One of SCORINGS, else a ValueError naming ``scoring`` (the message of ModelConfig's
    check; ``torch_impl/moe.py`` raises the same)."""
    if not (isinstance(scoring, str) and scoring in SCORINGS):
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    return scoring


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


def select_experts(router_logits, num_token_non_padded, *, cfg: ModelConfig):
    """``(topk_w [T, K], topk_ids [T, K] int32)``; rows ``t >= num_token_non_padded`` get 0, -1.

    Weights are the top-k scores renormalised to sum to 1; ties go to the lower expert id.
    An unknown ``cfg.scoring`` is a ValueError naming ``scoring``, before any work.
    """
    check_scoring(cfg.scoring)
    topk_w, topk_ids = top_k_lower_id_first(router_scores(router_logits, scoring=cfg.scoring),
                                            cfg.top_k)  # [T, K]
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

    tokens: jax.Array  # [TK, H]  hidden state of each pair's token
    expert_ids: jax.Array  # [TK]  non-decreasing, -1 (padding) pairs last
    pair_index: jax.Array  # [TK]  flat index t*K + k of each pair


def dispatch(h, topk_ids, *, num_experts) -> Dispatched:
    """Order the ``T*K`` pairs by expert id, stably (token order within an expert).

    Id -1 sorts as ``num_experts`` so padding pairs go last; a stable argsort is a fixed-size
    permutation, so nothing here depends on the data's shape.
    """
    flat_ids = topk_ids.reshape(-1)  # [TK]
    order = jnp.argsort(jnp.where(flat_ids < 0, num_experts, flat_ids), stable=True)  # [TK]
    top_k = topk_ids.shape[1]
    return Dispatched(tokens=h[order // top_k], expert_ids=flat_ids[order], pair_index=order)


def swiglu(x, gate, up, down):
    """``(silu(x @ gate) * (x @ up)) @ down``; works per pair with batched weights too."""
    return jnp.einsum("...i,...ih->...h",
                      jax.nn.silu(jnp.einsum("...h,...hi->...i", x, gate))
                      * jnp.einsum("...h,...hi->...i", x, up), down)


def routed_experts(buffer: Dispatched, gate, up, down):
    """``[TK, H]``: each pair through its expert (weights gathered per pair); -1 pairs give 0."""
    valid = buffer.expert_ids >= 0  # [TK]
    e = jnp.where(valid, buffer.expert_ids, 0)
    out = swiglu(buffer.tokens, gate[e], up[e], down[e])  # [TK, H] from [TK, H, I] weights
    return jnp.where(valid[:, None], out, 0)


def combine(expert_out, pair_index, topk_w):
    """Scatter each pair's weighted output back to its token and sum: ``[T, H]``."""
    num_tokens, top_k = topk_w.shape
    weighted = expert_out * topk_w.reshape(-1)[pair_index][:, None]  # [TK, H]
    return jnp.zeros((num_tokens, expert_out.shape[1]), expert_out.dtype).at[
        pair_index // top_k].add(weighted)


def shared_experts(h, gate, up, down):
    """Sum of the shared SwiGLU experts ``[X, ...]`` over ``X`` (zeros when ``X == 0``)."""
    return sum((swiglu(h, gate[j], up[j], down[j]) for j in range(gate.shape[0])),
               jnp.zeros_like(h))
