"""Configuration and weights of the reference MoE model (numpy only, shared by both sides).

The math contract is ``docs/model.md``. This module imports no framework so that the JAX
spec and the PyTorch twin initialise from the very same float32 arrays.

Shape letters: ``V`` vocabulary, ``H`` hidden, ``N`` heads, ``D`` head dim, ``E`` routed
experts, ``I`` expert intermediate size, ``X`` shared experts (``num_shared_experts``, may be 0).
"""

from __future__ import annotations

import dataclasses

import numpy as np

SCORINGS = ("softmax", "sigmoid")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the model; field names and defaults are those of docs/model.md."""

    num_layers: int = 2
    hidden_size: int = 64  # H
    num_heads: int = 4  # N
    head_dim: int = 16  # D
    num_experts: int = 8  # E
    top_k: int = 2  # K
    num_shared_experts: int = 1
    intermediate_size: int = 32  # I
    vocab_size: int = 128  # V
    scoring: str = "softmax"
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6

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
    ``fan_in = shape[-2]``, the contracted axis of ``x @ W`` (also for ``embed [V, H]``, whose
    fan_in is therefore ``V``, and for stacked ``[E, H, I]`` expert weights, whose fan_in is H).
    """
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in weight_shapes(cfg).items():
        if len(shape) == 1:
            w = 1.0 + rng.normal(0.0, 0.1, size=shape)
        else:
            w = rng.normal(0.0, 1.0 / np.sqrt(shape[-2]), size=shape)
        weights[name] = w.astype(np.float32)
    return weights
