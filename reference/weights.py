"""Configuration and weights of the reference MoE model (numpy only, shared by both sides).

The math contract is ``docs/model.md``. This module imports no framework so that the JAX
spec and the PyTorch twin initialise from the very same float32 arrays.

Shape letters (docs/spec.md, "Shape letters"): ``V`` vocabulary, ``H`` hidden, ``Q`` heads,
``D`` head dim, ``E`` routed experts, ``I`` expert intermediate size, ``X`` shared experts
(``num_shared_experts``, may be 0).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

SCORINGS = ("softmax", "sigmoid")
# "top_k": the K best scores over all experts. "group_limited": DeepSeek-V3's routing, the K
# best bias-corrected scores within the topk_group best of n_group expert groups (docs/model.md,
# "Group-limited routing (DeepSeek-V3)").
ROUTINGS = ("top_k", "group_limited")
# The group-limited fields and the values routing "top_k" takes (it uses none of them).
GROUP_LIMITED_DEFAULTS = (("n_group", 1), ("topk_group", 1), ("routed_scaling_factor", 1.0))
CORRECTION_BIAS = "e_score_correction_bias"  # the per-layer weight [E] of group-limited routing


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the model; field names and defaults are those of docs/model.md."""

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
        positive = ("num_layers", "hidden_size", "num_heads", "head_dim", "num_experts", "top_k",
                    "intermediate_size", "vocab_size")
        for name in positive:
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("num_shared_experts", self.num_shared_experts, minimum=0)
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
        check_routing_fields(self)


def check_routing_fields(cfg) -> None:
    """The routing fields of a config: ``routing`` one of ROUTINGS; under "top_k" the three
    group-limited fields keep their defaults (a grouping it would ignore is a mistake); under
    "group_limited" ``scoring`` is "sigmoid" and ``check_group_limited`` holds. Each failure is
    a ValueError naming its field (``torch_impl/config.py`` raises the same messages)."""
    if not (isinstance(cfg.routing, str) and cfg.routing in ROUTINGS):
        raise ValueError(f"routing must be one of {ROUTINGS}, got {cfg.routing!r}")
    if cfg.routing == "top_k":
        for name, default in GROUP_LIMITED_DEFAULTS:
            value = getattr(cfg, name)
            if isinstance(value, bool) or value != default:
                raise ValueError(f"{name} applies to routing 'group_limited' only; routing "
                                 f"'top_k' takes {name}={default!r}, got {value!r}")
        return
    if cfg.scoring != "sigmoid":
        raise ValueError(f"scoring must be 'sigmoid' with routing 'group_limited', "
                         f"got {cfg.scoring!r}")
    check_group_limited(cfg.num_experts, cfg.top_k, cfg.n_group, cfg.topk_group,
                        cfg.routed_scaling_factor)


def check_group_limited(num_experts, top_k, n_group, topk_group, routed_scaling_factor) -> None:
    """ValueError naming the first bad argument of group-limited routing over ``num_experts``
    experts, checked in this order: ``n_group`` (an int >= 1 dividing ``num_experts`` into
    groups of at least 2 experts, as a group scores the sum of its 2 best), ``topk_group`` (an
    int in ``[1, n_group]``), ``top_k`` (an int in ``[1, topk_group * group size]``: the kept
    groups must hold K experts) and ``routed_scaling_factor`` (a finite number > 0)."""
    _check_int("n_group", n_group, minimum=1)
    if num_experts % n_group:
        raise ValueError(f"n_group ({n_group}) must divide num_experts ({num_experts})")
    group_size = num_experts // n_group
    if group_size < 2:
        raise ValueError(f"n_group ({n_group}) leaves groups of {group_size} expert of "
                         f"{num_experts}; a group's score sums its top 2, so each group needs "
                         f">= 2 experts")
    _check_int("topk_group", topk_group, minimum=1)
    if topk_group > n_group:
        raise ValueError(f"topk_group ({topk_group}) must be <= n_group ({n_group})")
    _check_int("top_k", top_k, minimum=1)
    if top_k > topk_group * group_size:
        raise ValueError(f"top_k ({top_k}) must be <= the experts of topk_group groups "
                         f"({topk_group} * {group_size} = {topk_group * group_size})")
    value = routed_scaling_factor
    if (isinstance(value, bool) or not isinstance(value, (int, float, np.floating))
            or not (value > 0 and math.isfinite(value))):
        raise ValueError(f"routed_scaling_factor must be a finite number > 0, got {value!r}")


def _check_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight's shape, in the order ``init_weights`` draws them (the doc's table order)."""
    h, nd, e, i, x = (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_experts,
                      cfg.intermediate_size, cfg.num_shared_experts)
    shapes = {"embed": (cfg.vocab_size, h)}
    for layer in range(cfg.num_layers):
        p = f"layers.{layer}."
        shapes.update({
            p + "attn_norm": (h,),
            p + "wq": (h, nd), p + "wk": (h, nd), p + "wv": (h, nd),
            p + "wo": (nd, h),
            p + "mlp_norm": (h,),
            p + "router": (h, e),
            **({p + CORRECTION_BIAS: (e,)} if cfg.routing == "group_limited" else {}),
            p + "experts_gate": (e, h, i), p + "experts_up": (e, h, i),
            p + "experts_down": (e, i, h),
            p + "shared_gate": (x, h, i), p + "shared_up": (x, h, i),
            p + "shared_down": (x, i, h),
        })
    shapes.update({"final_norm": (h,), "lm_head": (h, cfg.vocab_size)})
    return shapes


def init_weights(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Draw all weights (float32) from ``numpy.random.default_rng(seed)`` in the listed order.

    Norm weights (1-D): ``1 + normal(0, 0.1)``. Matrices: ``normal(0, 1/sqrt(fan_in))`` where
    ``fan_in = shape[-2]``, the contracted axis of ``x @ w`` (also for ``embed [V, H]``, whose
    fan_in is therefore ``V``, and for stacked ``[E, H, I]`` expert weights, whose fan_in is H).
    The correction bias ``[E]`` of group-limited routing (drawn only under
    ``routing="group_limited"``, so other configs draw exactly what they drew before it
    existed): ``normal(0, 0.1)``, about the spread of the sigmoid scores it corrects.
    """
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in weight_shapes(cfg).items():
        if name.endswith(CORRECTION_BIAS):
            w = rng.normal(0.0, 0.1, size=shape)
        elif len(shape) == 1:
            w = 1.0 + rng.normal(0.0, 0.1, size=shape)
        else:
            w = rng.normal(0.0, 1.0 / np.sqrt(shape[-2]), size=shape)
        weights[name] = w.astype(np.float32)
    return weights
