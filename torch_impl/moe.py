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

from torch_impl.config import SCORINGS


def select_experts(router_logits: torch.Tensor, *, top_k: int, scoring: str,
                   num_token_non_padded) -> tuple:
    """Top-k experts per token, weights renormalised; padding rows get ids -1 and weight 0.

    router_logits: [T, E] float32 -> (weights [T, K] float32, ids [T, K] int64), largest
    score first; among equal scores the lower expert id comes first (docs/model.md), as
    ``jax.lax.top_k`` orders them on the spec's side.
    ``num_token_non_padded``: the count of real rows (the rest are CUDA-graph padding), a
    Python int eagerly or a 0-dim device tensor in a graph. A tensor count is always masked on
    the device, so a replay that rewrites the tensor re-masks without recapture; an int that
    covers every row skips the (then all-false) masks: 4 operators fewer per eager call.
    ``scoring`` is one of ``SCORINGS``; anything else is a ValueError naming it (the message of
    ModelConfig's check, and of the JAX spec's ``check_scoring``), before any work.
    """
    if not (isinstance(scoring, str) and scoring in SCORINGS):
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
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
    if not isinstance(num_token_non_padded, torch.Tensor) \
            and num_token_non_padded >= ids.shape[0]:
        return weights, ids  # eager, no padding row: the masks below would change nothing
    padding = torch.arange(ids.shape[0], device=ids.device) >= num_token_non_padded
    ids = ids.masked_fill(padding[:, None], -1)
    weights = weights.masked_fill(padding[:, None], 0.0)
    return weights, ids


def expert_load(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """topk_ids ``[..., T, K]`` -> ``[..., E]``: the number of (token, k) pairs routed to each
    expert (over the last two axes, per leading index, e.g. per layer); ids -1 count for none.

    Shape-static (a scatter-add into E + 1 bins, the last one collecting padding), so it can be
    captured: a boolean selection of the real ids would have a data-dependent shape."""
    # where() first: its output is contiguous, so flattening it copies nothing
    bins = torch.where(topk_ids < 0, num_experts, topk_ids).flatten(-2)  # [..., T*K]
    load = torch.zeros(bins.shape[:-1] + (num_experts + 1,), dtype=torch.int64,
                       device=bins.device)
    return load.scatter_add_(-1, bins, torch.ones_like(bins))[..., :num_experts]


class ExpertLoad:
    """One micro-batch's routing over a step's layers, counted into ``[layers, E]`` at the end.

    Each layer ``add``s its ``topk_ids``; ``total`` counts every layer of every micro-batch
    in one ``expert_load`` (5 operators and the stacking, for the whole step; counting each
    layer as it ran took 5 per layer and micro-batch). Counts are integers: the order in which
    they are summed changes nothing."""

    def __init__(self):
        self.topk_ids = []  # [T, K] per layer
        self.num_experts = None

    def add(self, topk_ids: torch.Tensor, num_experts: int) -> None:
        self.topk_ids.append(topk_ids)
        self.num_experts = num_experts

    @staticmethod
    def total(loads) -> torch.Tensor:
        """``[layers, E]`` int64 over the micro-batches' ``ExpertLoad``s (same layers)."""
        ids = [torch.stack(load.topk_ids) for load in loads]  # [layers, T, K] each
        return expert_load(ids[0] if len(ids) == 1 else torch.cat(ids, dim=1),
                           loads[0].num_experts)


_EXACT_IN_FLOAT32 = (torch.bfloat16, torch.float16, torch.float32)


def float32_operand(x: torch.Tensor) -> torch.Tensor:
    """``x.float()`` as an operand of an elementwise op whose other operand is float32 (or
    wider), without the conversion kernel where it is not needed.

    bfloat16, float16 and float32 convert to float32 exactly, and the op's type promotion
    converts ``x`` inside its own kernel: the op sees the same values and gives the same bits
    as with ``x.float()`` first, one kernel fewer. Any other dtype (float64) is rounded to
    float32 first, as ``x.float()`` does."""
    return x if x.dtype in _EXACT_IN_FLOAT32 else x.float()


def _matmul(x, weight):
    """``einsum("...h,...hi->...i", x, weight)``: x ``[..., H]`` times weight ``[..., H, I]``.

    For one contiguous token matrix ``[T, H]`` and one contiguous weight ``[H, I]`` with
    ``H > 1`` (the shared expert), einsum itself runs exactly the batch-of-one ``bmm`` below,
    after about a dozen permutes and views: calling it directly runs the same kernel on the
    same operands (the same bits) with less host work."""
    if (x.dim() == 2 and weight.dim() == 2 and x.shape[1] > 1 and x.is_contiguous()
            and weight.is_contiguous()):
        return torch.bmm(x[None], weight[None])[0]
    return torch.einsum("...h,...hi->...i", x, weight)


def swiglu(x, gate, up, down):
    """x [..., H] with gate/up [..., H, I], down [..., I, H] -> [..., H].

    The activation runs in float32 and is rounded once, as fused MoE kernels do."""
    g = _matmul(x, gate).float()
    u = float32_operand(_matmul(x, up))
    return _matmul((F.silu(g) * u).to(x.dtype), down)


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
        weighted = float32_operand(expert_out) * dispatched.weight[:, None]
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
