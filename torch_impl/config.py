"""Hyper-parameters of the PyTorch MoE model: the fields and defaults of docs/model.md.

(The JAX spec has its own twin in reference/weights.py; parity tests build both from one dict.)
"""

from __future__ import annotations

import dataclasses
import math

SCORINGS = ("softmax", "sigmoid")
# "top_k": the K best scores over all experts. "group_limited": DeepSeek-V3's routing (experts in
# n_group groups, the K best bias-corrected scores within the topk_group best groups).
ROUTINGS = ("top_k", "group_limited")
# The group-limited fields and the values routing "top_k" takes (it uses none of them).
GROUP_LIMITED_DEFAULTS = (("n_group", 1), ("topk_group", 1), ("routed_scaling_factor", 1.0))
CORRECTION_BIAS = "e_score_correction_bias"  # the per-layer weight [E] of group-limited routing


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 64  # H
    num_heads: int = 4  # Q
    head_dim: int = 16  # D
    num_experts: int = 8  # E
    top_k: int = 2  # K
    num_shared_experts: int = 1  # X
    intermediate_size: int = 32  # I
    vocab_size: int = 128  # V
    scoring: str = "softmax"
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    routing: str = "top_k"
    n_group: int = 1  # G, expert groups (group-limited routing only)
    topk_group: int = 1  # groups kept per token (group-limited routing only)
    routed_scaling_factor: float = 1.0  # routed weights' scale (group-limited routing only)

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_heads", "head_dim", "num_experts",
                     "top_k", "intermediate_size", "vocab_size", "num_shared_experts"):
            value = getattr(self, name)
            minimum = 0 if name == "num_shared_experts" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (rotary halves), got {self.head_dim}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        for name in ("rope_theta", "rms_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        self._check_routing()

    def _check_routing(self) -> None:
        """``routing`` one of ROUTINGS; "top_k" keeps the group fields at their defaults;
        "group_limited" takes sigmoid scoring and valid group fields (the spec's messages)."""
        if not (isinstance(self.routing, str) and self.routing in ROUTINGS):
            raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.routing == "group_limited":
            if self.scoring != "sigmoid":
                raise ValueError(f"scoring must be 'sigmoid' with routing 'group_limited', "
                                 f"got {self.scoring!r}")
            check_group_limited(self.num_experts, self.top_k, self.n_group, self.topk_group,
                                self.routed_scaling_factor)
            return
        for name, default in GROUP_LIMITED_DEFAULTS:
            value = getattr(self, name)
            if isinstance(value, bool) or value != default:
                raise ValueError(f"{name} applies to routing 'group_limited' only; routing "
                                 f"'top_k' takes {name}={default!r}, got {value!r}")


def _int_at_least(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_group_limited(num_experts, top_k, n_group, topk_group, routed_scaling_factor) -> None:
    """ValueError naming the first bad argument of group-limited routing, in the spec's order
    and words (``reference/weights.py``): ``n_group`` divides ``num_experts`` into groups of
    >= 2 experts (a group scores its top 2), ``1 <= topk_group <= n_group``, ``1 <= top_k <=
    topk_group * group size``, ``routed_scaling_factor`` finite and > 0."""
    _int_at_least("n_group", n_group, 1)
    group_size, rest = divmod(num_experts, n_group)
    if rest:
        raise ValueError(f"n_group ({n_group}) must divide num_experts ({num_experts})")
    if group_size < 2:
        raise ValueError(f"n_group ({n_group}) leaves groups of {group_size} expert of "
                         f"{num_experts}; a group's score sums its top 2, so each group needs "
                         f">= 2 experts")
    if _int_at_least("topk_group", topk_group, 1) > n_group:
        raise ValueError(f"topk_group ({topk_group}) must be <= n_group ({n_group})")
    if _int_at_least("top_k", top_k, 1) > topk_group * group_size:
        raise ValueError(f"top_k ({top_k}) must be <= the experts of topk_group groups "
                         f"({topk_group} * {group_size} = {topk_group * group_size})")
    factor = routed_scaling_factor
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) \
            or not (factor > 0 and math.isfinite(factor)):
        raise ValueError(f"routed_scaling_factor must be a finite number > 0, got {factor!r}")


def weight_shapes(cfg: ModelConfig) -> dict:
    """The shape of every weight the model loads, by name (docs/model.md's table); the
    correction bias ``[E]`` of each layer only under routing "group_limited"."""
    h, nd, e, i, x = (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_experts,
                      cfg.intermediate_size, cfg.num_shared_experts)
    shapes = {"embed": (cfg.vocab_size, h), "final_norm": (h,), "lm_head": (h, cfg.vocab_size)}
    per_layer = {"attn_norm": (h,), "wq": (h, nd), "wk": (h, nd), "wv": (h, nd), "wo": (nd, h),
                 "mlp_norm": (h,), "router": (h, e),
                 **({CORRECTION_BIAS: (e,)} if cfg.routing == "group_limited" else {}),
                 "experts_gate": (e, h, i),
                 "experts_up": (e, h, i), "experts_down": (e, i, h), "shared_gate": (x, h, i),
                 "shared_up": (x, h, i), "shared_down": (x, i, h)}
    for layer in range(cfg.num_layers):
        shapes.update({f"layers.{layer}.{name}": shape for name, shape in per_layer.items()})
    return shapes


def check_weights(cfg: ModelConfig, weights: dict) -> None:
    """ValueError naming the first missing or misshapen weight, or a correction bias the
    model would ignore (any under routing "top_k")."""
    shapes = weight_shapes(cfg)
    for name, shape in shapes.items():
        if name not in weights:
            raise ValueError(f"weights is missing {name!r}")
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"weights[{name!r}] has shape {tuple(weights[name].shape)}, "
                             f"expected {shape}")
    for name in weights:
        if name.endswith(CORRECTION_BIAS) and name not in shapes:
            raise ValueError(f"weights has {name!r}, a correction bias this config does not "
                             f"use (routing {cfg.routing!r}, {cfg.num_layers} layers)")
