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
