"""Hyper-parameters of the PyTorch MoE model: the fields and defaults of docs/model.md.

(The JAX spec has its own twin in reference/weights.py; parity tests build both from one dict.)
"""

from __future__ import annotations

import dataclasses

SCORINGS = ("softmax", "sigmoid")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
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


def weight_shapes(cfg: ModelConfig) -> dict:
    """The shape of every weight the model loads, by name (docs/model.md's table)."""
    h, nd, e, i, x = (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_experts,
                      cfg.intermediate_size, cfg.num_shared_experts)
    shapes = {"embed": (cfg.vocab_size, h), "final_norm": (h,), "lm_head": (h, cfg.vocab_size)}
    per_layer = {"attn_norm": (h,), "wq": (h, nd), "wk": (h, nd), "wv": (h, nd), "wo": (nd, h),
                 "mlp_norm": (h,), "router": (h, e), "experts_gate": (e, h, i),
                 "experts_up": (e, h, i), "experts_down": (e, i, h), "shared_gate": (x, h, i),
                 "shared_up": (x, h, i), "shared_down": (x, i, h)}
    for layer in range(cfg.num_layers):
        shapes.update({f"layers.{layer}.{name}": shape for name, shape in per_layer.items()})
    return shapes


def check_weights(cfg: ModelConfig, weights: dict) -> None:
    """ValueError naming the first missing or misshapen weight."""
    for name, shape in weight_shapes(cfg).items():
        if name not in weights:
            raise ValueError(f"weights is missing {name!r}")
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"weights[{name!r}] has shape {tuple(weights[name].shape)}, "
                             f"expected {shape}")
