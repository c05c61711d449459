"""Routing, dispatch/combine and experts of the MoE block.

Dispatch and combine are each split into a *launch* half and a *wait* half, so that the other
micro-batch's compute can sit between them. ``LocalDispatcher`` does them on one device as
local permutations; an all-to-all dispatcher across GPUs has the same four methods.

Shape letters (docs/spec.md, "Shape letters"): ``T`` tokens, ``H`` hidden, ``E`` experts,
``K`` top-k, ``I`` intermediate, ``T*K`` (token, expert) pairs; for group-limited routing ``G``
expert groups (``n_group``) of ``E/G`` experts each, of which ``topk_group`` are kept per
token.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from tbo_parity.torch_impl.config import CORRECTION_BIAS, SCORINGS, ModelConfig, check_group_limited


def top_k_lower_id_first(scores: torch.Tensor, k: int) -> tuple:
    """``(values [T, k], ids [T, k] int64)``: each row's ``k`` largest scores, largest first;
    among equal scores the lower id first (also at the k-th place), as ``jax.lax.top_k``
    orders them on the spec's side.

    torch.topk leaves the order of equal values unspecified (on CPU all-equal scores give ids
    6, 5, ...). A stable sort keeps equal scores in id order, so the first k are the spec's. It
    is a fixed-shape device op over the row (small): no host read, and it captures in a CUDA
    graph."""
    values, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[:, :k], order[:, :k]


@dataclasses.dataclass(frozen=True)
class GroupLimited:
    """One layer's group-limited routing (DeepSeek-V3): the config's group fields and the
    layer's correction bias."""

    n_group: int
    topk_group: int
    routed_scaling_factor: float
    correction_bias: torch.Tensor  # [E] float32, on the model's device


def group_limited_routing(cfg: ModelConfig, weights: dict, layer: int, *,
                          device) -> Optional[GroupLimited]:
    """Layer ``layer``'s ``GroupLimited`` from ``cfg`` and the weights' float32
    ``layers.{layer}.e_score_correction_bias``; None under routing "top_k"."""
    if cfg.routing != "group_limited":
        return None
    bias = torch.as_tensor(weights[f"layers.{layer}.{CORRECTION_BIAS}"])
    return GroupLimited(cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor,
                        bias.to(device=device, dtype=torch.float32))


def check_correction_bias(correction_bias, num_experts: int) -> None:
    """ValueError naming ``e_score_correction_bias`` unless it has shape ``[E]``."""
    shape = tuple(getattr(correction_bias, "shape", ()))
    if correction_bias is None or shape != (num_experts,):
        got = "None" if correction_bias is None else shape
        raise ValueError(f"{CORRECTION_BIAS} must have shape ({num_experts},) (one per "
                         f"expert), got {got}")


def group_limited_ids(corrected: torch.Tensor, *, top_k: int, n_group: int,
                      topk_group: int) -> torch.Tensor:
    """``ids [T, K]`` int64 of DeepSeek-V3's group-limited selection on ``corrected [T, E]``:
    G contiguous groups of E/G experts, each scored by the sum of its two largest entries; the
    ``topk_group`` best groups kept (lower group id first among equals); the K largest
    entries of their experts, largest first (lower expert id first among equals); the other
    groups' experts masked to -inf. The spec's ``group_limited_ids``, with the same order."""
    num_tokens, num_experts = corrected.shape
    size = num_experts // n_group
    grouped = corrected.reshape(num_tokens, n_group, size)  # [T, G, E/G]
    best_two = torch.topk(grouped, 2, dim=-1).values  # [T, G, 2]; only values are read
    group_scores = best_two[..., 0] + best_two[..., 1]  # [T, G]
    _, kept_groups = top_k_lower_id_first(group_scores, topk_group)  # [T, topk_group]
    kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)
    kept_experts = kept[:, :, None].expand(num_tokens, n_group, size).reshape(
        num_tokens, num_experts)  # [T, E]
    _, ids = top_k_lower_id_first(corrected.masked_fill(~kept_experts, float("-inf")), top_k)
    return ids


def select_experts_group_limited(router_logits: torch.Tensor, correction_bias, *, top_k: int,
                                 n_group: int, topk_group: int,
                                 routed_scaling_factor) -> tuple:
    """``(weights [T, K] float32, ids [T, K] int64)``: DeepSeek-V3's routing of
    ``router_logits [T, E]`` float32 with ``correction_bias [E]`` (float32), no padding mask.

    ``sigmoid`` scores; the bias is added for the selection only; the weights are the chosen
    experts' uncorrected scores renormalised over the K, times ``routed_scaling_factor``. Bad
    arguments are a ValueError naming the first, before any work, as on the spec's side."""
    num_experts = router_logits.shape[-1]
    check_group_limited(num_experts, top_k, n_group, topk_group, routed_scaling_factor)
    check_correction_bias(correction_bias, num_experts)
    scores = torch.sigmoid(router_logits)  # [T, E]
    ids = group_limited_ids(scores + correction_bias.float(), top_k=top_k, n_group=n_group,
                            topk_group=topk_group)  # selection on the corrected scores
    weights = scores.gather(1, ids)  # [T, K], uncorrected
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * routed_scaling_factor, ids


def max_ranks_reached(num_experts: int, num_ranks: int, n_group: int, topk_group: int,
                      top_k: int) -> int:
    """The most expert-parallel ranks one token's K experts can lie on under group-limited
    routing with experts laid out contiguously (rank r holds experts ``r*L .. r*L + L-1``): the
    spec's function (``reference/moe.py`` explains the bound and the dynamic programme).
    Group g's ranks are the interval ``[g*E/G // L, ((g+1)*E/G - 1) // L]``; a token reaches at
    most the union of ``topk_group`` such intervals, and at most K ranks."""
    check_group_limited(num_experts, top_k, n_group, topk_group, 1.0)
    if (isinstance(num_ranks, bool) or not isinstance(num_ranks, int) or num_ranks < 1
            or num_experts % num_ranks):
        raise ValueError(f"num_ranks must be an int >= 1 dividing num_experts ({num_experts}), "
                         f"got {num_ranks!r}")
    size, per_rank = num_experts // n_group, num_experts // num_ranks
    spans = [(g * size // per_rank, (g * size + size - 1) // per_rank) for g in range(n_group)]
    # best[g]: the most ranks the groups chosen so far span, g the last (highest) of them
    best = {g: hi - lo + 1 for g, (lo, hi) in enumerate(spans)}
    for chosen in range(2, topk_group + 1):
        best = {g: max(best[prev] + hi - max(spans[prev][1], lo - 1)
                       for prev in range(chosen - 2, g))
                for g, (lo, hi) in enumerate(spans) if g >= chosen - 1}
    return min(top_k, max(best.values()))


def select_experts(router_logits: torch.Tensor, *, top_k: int, scoring: str,
                   num_token_non_padded, group_limited: Optional[GroupLimited] = None) -> tuple:
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
    ``group_limited``: None for the top-k over all experts (routing "top_k"); a layer's
    ``GroupLimited`` for DeepSeek-V3's routing (``select_experts_group_limited``, sigmoid
    scoring only).
    """
    if not (isinstance(scoring, str) and scoring in SCORINGS):
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if group_limited is not None:
        if scoring != "sigmoid":
            raise ValueError(f"scoring must be 'sigmoid' with routing 'group_limited', "
                             f"got {scoring!r}")
        weights, ids = select_experts_group_limited(
            router_logits, group_limited.correction_bias, top_k=top_k,
            n_group=group_limited.n_group, topk_group=group_limited.topk_group,
            routed_scaling_factor=group_limited.routed_scaling_factor)
    else:
        if scoring == "softmax":
            scores = torch.softmax(router_logits, dim=-1)
        else:
            scores = torch.sigmoid(router_logits)
        weights, ids = top_k_lower_id_first(scores, top_k)
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

    hidden: torch.Tensor  # [T*K, H]
    expert: torch.Tensor  # [T*K] int64, -1 for padding pairs (sorted last)
    weight: torch.Tensor  # [T*K] routing weight of each pair
    order: torch.Tensor  # [T*K] token-major pair index of each buffer row
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
        order = torch.argsort(sort_key, stable=True)  # [T*K]
        token = order // top_k
        return Dispatched(hidden[token], flat_ids[order], topk_weights.flatten()[order], order,
                          num_tokens)

    def dispatch_wait(self, handle: Dispatched) -> Dispatched:
        return handle

    @staticmethod
    def experts(dispatched: Dispatched, gate, up, down) -> torch.Tensor:
        return routed_experts(dispatched, gate, up, down)

    def combine_launch(self, expert_out: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        """expert_out [T*K, H] (buffer order) -> routed [T, H] float32: the weighted sum over each
        token's K pairs, accumulated in float32."""
        weighted = float32_operand(expert_out) * dispatched.weight[:, None]
        token_major = torch.empty_like(weighted)
        token_major[dispatched.order] = weighted
        return token_major.view(dispatched.num_tokens, -1, weighted.shape[-1]).sum(dim=1)

    def combine_wait(self, handle: torch.Tensor) -> torch.Tensor:
        return handle


def routed_experts(dispatched: Dispatched, gate, up, down) -> torch.Tensor:
    """Each buffer row through its expert's SwiGLU: [T*K, H]. Padding pairs compute nothing
    that is kept (their weight is 0) and are counted in no expert's load."""
    expert = dispatched.expert.clamp(min=0)
    out = swiglu(dispatched.hidden, gate[expert], up[expert], down[expert])
    return out.masked_fill((dispatched.expert < 0)[:, None], 0.0)
