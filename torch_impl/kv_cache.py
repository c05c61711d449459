"""The paged KV cache: a request-to-token table and a token-to-KV pool.

- ``req_to_token [R, W] int64``: row r maps a request's positions 0..W-1 to pool slots.
- ``KVPool.k``, ``KVPool.v`` ``[num_layers, P, Q, D]``: keys and values per slot and layer.

A forward writes each new token's keys/values at its ``out_cache_loc`` slot, then attention
reads every visible position through the table. Both micro-batches of a TBO step share the
pool (they write disjoint slots).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class KVPool:
    k: torch.Tensor  # [num_layers, P, Q, D]
    v: torch.Tensor  # [num_layers, P, Q, D]

    @classmethod
    def empty(cls, num_layers, num_slots, num_heads, head_dim, *, dtype, device) -> "KVPool":
        shape = (num_layers, num_slots, num_heads, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(shape, dtype=dtype, device=device))

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v ``[T, Q, D]`` of layer ``layer`` at ``slots [T]``."""
        self.k[layer, slots] = k.to(self.k.dtype)
        self.v[layer, slots] = v.to(self.v.dtype)

    def gather(self, layer: int, slots: torch.Tensor) -> tuple:
        """Keys and values at ``slots`` (any shape ``[...]``) -> ``[..., Q, D]`` each."""
        return self.k[layer][slots], self.v[layer][slots]

    def clone(self) -> "KVPool":
        return KVPool(self.k.clone(), self.v.clone())
