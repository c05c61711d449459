"""Routing, dispatch/combine and experts of the MoE block.

Dispatch and combine are each split into a *launch* half and a *wait* half, so that the other
micro-batch's compute can sit between them. ``LocalDispatcher`` does them on one device as
local permutations; an all-to-all dispatcher across GPUs has the same four methods.

Shape letters: ``T`` tokens, ``H`` hidden, ``E`` experts, ``K`` top-k, ``I`` intermediate,
``P = T*K`` (token, expert) pairs.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


def select_experts(router_logits: torch.Tensor, *, top_k: int, scoring: str,
                   num_token_non_padded) -> tuple:
    """Top-k experts per token, weights renormalised; padding rows get ids -1 and weight 0.

    router_logits: [T, E] float32 -> (weights [T, K] float32, ids [T, K] int64), largest
    score first; among equal scores the lower expert id comes first (docs/model.md), as
    ``jax.lax.top_k`` orders them on the spec's side.
    ``num_token_non_padded``: the count of real rows (the rest are CUDA-graph padding), a
    Python int eagerly or a 0-dim device tensor in a graph; the padding mask is computed on
    the device either way, so a replay that rewrites the tensor re-masks without recapture.
    """
    if scoring == "softmax":
        scores = torch.softmax(router_logits, dim=-1)
    else:
        scores = torch.sigmoid(router_logits)
    # torch.topk leaves the order of equal values unspecified (on CPU all-equal scores give
    # ids 6, 5, ...). A stable sort keeps equal scores in expert-id order, so the first K are
    # the spec's. It is a fixed-shape device op over E (small) entries: no host read, and it
    # captures in a CUDA graph.
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    weights, ids = sorted_scores[:, :top_k], order[:, :top_k]
    weights = weights / weights.sum(dim=-1, keepdim=True)
    padding = torch.arange(ids.shape[0], device=ids.device) >= num_token_non_padded
    ids = ids.masked_fill(padding[:, None], -1)
    weights = weights.masked_fill(padding[:, None], 0.0)
    return weights, ids


def expert_load(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] number of (token, k) pairs routed to each expert; ids -1 count for none.

    Shape-static (a scatter-add into E + 1 bins, the last one collecting padding), so it can be
    captured: a boolean selection of the real ids would have a data-dependent shape."""
    ids = topk_ids.flatten()
    bins = torch.where(ids < 0, num_experts, ids)
    load = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    return load.scatter_add_(0, bins, torch.ones_like(bins))[:num_experts]


def swiglu(x, gate, up, down):
    """x [..., H] with gate/up [..., H, I], down [..., I, H] -> [..., H].

    The activation runs in float32 and is rounded once, as fused MoE kernels do."""
    g = torch.einsum("...h,...hi->...i", x, gate).float()
    u = torch.einsum("...h,...hi->...i", x, up).float()
    return torch.einsum("...i,...ih->...h", (F.silu(g) * u).to(x.dtype), down)


@dataclasses.dataclass
class Dispatched:
    """Pairs in expert-major order: pair p of the buffer is (token ``token[p]``, expert
    ``expert[p]``); ``order`` maps buffer rows back to the token-major pair index."""

    hidden: torch.Tensor  # [P, H]
    expert: torch.Tensor  # [P] int64, -1 for padding pairs (sorted last)
    weight: torch.Tensor  # [P] routing weight of each pair
    order: torch.Tensor  # [P] token-major pair index of each buffer row
    num_tokens: int


class LocalDispatcher:
    """Dispatch and combine on one device: a stable sort of the pairs by expert id.

    The launch halves do the work (on one device there is nothing to wait for); the wait halves
    hand back the result. Across GPUs the launches start all-to-alls and the waits wait on them.
    """

    world_size = 1  # no expert parallelism: every expert is here

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    @staticmethod
    def experts_of(weight):
        """The experts this device holds: all of them."""
        return weight

    def dispatch_launch(self, hidden, topk_weights, topk_ids, *, micro_batch: int = 0,
                        capacity=None) -> Dispatched:
        """``micro_batch`` and ``capacity`` matter only across ranks; one device ignores
        them."""
        num_tokens, top_k = topk_ids.shape
        flat_ids = topk_ids.flatten()
        sort_key = torch.where(flat_ids < 0, self.num_experts, flat_ids)  # padding last
        order = torch.argsort(sort_key, stable=True)  # [P]
        token = order // top_k
        return Dispatched(hidden[token], flat_ids[order], topk_weights.flatten()[order], order,
                          num_tokens)

    def dispatch_wait(self, handle: Dispatched) -> Dispatched:
        return handle

    @staticmethod
    def experts(dispatched: Dispatched, gate, up, down) -> torch.Tensor:
        return routed_experts(dispatched, gate, up, down)

    def combine_launch(self, expert_out: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        """expert_out [P, H] (buffer order) -> routed [T, H] float32: the weighted sum over each
        token's K pairs, accumulated in float32."""
        weighted = expert_out.float() * dispatched.weight[:, None]
        token_major = torch.empty_like(weighted)
        token_major[dispatched.order] = weighted
        return token_major.view(dispatched.num_tokens, -1, weighted.shape[-1]).sum(dim=1)

    def combine_wait(self, handle: torch.Tensor) -> torch.Tensor:
        return handle


def routed_experts(dispatched: Dispatched, gate, up, down) -> torch.Tensor:
    """Each buffer row through its expert's SwiGLU: [P, H]. Padding pairs compute nothing
    that is kept (their weight is 0) and are counted in no expert's load."""
    expert = dispatched.expert.clamp(min=0)
    out = swiglu(dispatched.hidden, gate[expert], up[expert], down[expert])
    return out.masked_fill((dispatched.expert < 0)[:, None], 0.0)
