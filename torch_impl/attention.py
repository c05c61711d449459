"""Attention over the paged KV cache, and the TBO backend that holds one backend per child.

A backend is initialised from a ForwardBatch (``init_forward_metadata``): for each token it
finds its sequence, the table row to read and which table columns it may see. The per-mode
rule (docs/model.md):

- EXTEND, the o-th new token of sequence s: columns ``j <= prefix[s] + o`` (causal).
- DECODE: columns ``j < seq_lens[s]``.
- TARGET_VERIFY, draft r of s: columns ``j < seq_lens[s] + d`` where row r of s's tree-mask
  block allows it (the block is ``d x (seq_lens[s] + d)``, blocks laid end to end).

Shape letters: ``T`` tokens, ``B`` sequences, ``L`` table columns read, ``N`` heads, ``D``
head dim.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from torch_impl.forward_batch import ForwardBatch
from torch_impl.kv_cache import KVPool


@dataclasses.dataclass
class AttnMetadata:
    table_slots: torch.Tensor  # [T, L] pool slot of every column a token may read
    allowed: torch.Tensor  # [T, L] bool


def _extend_allowed(batch: ForwardBatch, columns: torch.Tensor):
    lens, prefix = batch.extend_seq_lens, batch.extend_prefix_lens
    seq_of_token = torch.repeat_interleave(torch.arange(len(lens), device=lens.device), lens)
    offset = torch.arange(batch.num_tokens, device=lens.device) - batch.extend_start_loc[
        seq_of_token]
    limit = prefix[seq_of_token] + offset  # [T] last visible column
    return seq_of_token, columns[None, :] <= limit[:, None]


def _decode_allowed(batch: ForwardBatch, columns: torch.Tensor):
    seq_of_token = torch.arange(batch.batch_size, device=columns.device)
    return seq_of_token, columns[None, :] < batch.seq_lens[:, None]


def _verify_allowed(batch: ForwardBatch, columns: torch.Tensor):
    d = batch.spec_info.draft_token_num
    seq_of_token = torch.arange(batch.batch_size, device=columns.device).repeat_interleave(d)
    allowed = torch.zeros(batch.num_tokens, columns.numel(), dtype=torch.bool,
                          device=columns.device)
    offset = 0
    for s, seq_len in enumerate(batch.seq_lens_cpu.tolist()):
        width = seq_len + d
        block = batch.spec_info.custom_mask[offset:offset + d * width].view(d, width)
        allowed[s * d:(s + 1) * d, :width] = block
        offset += d * width
    return seq_of_token, allowed


REQUIRED_FIELDS = {
    "EXTEND": ("extend_seq_lens", "extend_prefix_lens", "extend_start_loc"),
    "DECODE": (),
    "TARGET_VERIFY": ("spec_info",),
}


def _check_attention_fields(batch: ForwardBatch) -> None:
    """ValueError naming the first field attention needs and the batch lacks."""
    mode = batch.forward_mode.name
    if mode not in REQUIRED_FIELDS:
        raise ValueError(f"forward_mode {mode} has no attention")
    for name in ("positions", "out_cache_loc", "req_pool_indices", "seq_lens", "seq_lens_cpu",
                 "req_to_token", "kv_pool") + REQUIRED_FIELDS[mode]:
        if getattr(batch, name) is None:
            raise ValueError(f"{name} is required for attention in {mode}")
    if mode == "TARGET_VERIFY" and batch.spec_info.custom_mask is None:
        raise ValueError("spec_info.custom_mask is required for attention in TARGET_VERIFY")


def build_metadata(batch: ForwardBatch) -> Optional[AttnMetadata]:
    """Which pool slots each token reads; None for a batch without tokens."""
    if batch.num_tokens == 0:
        return None
    _check_attention_fields(batch)
    mode = batch.forward_mode
    extra = batch.spec_info.draft_token_num if mode.name == "TARGET_VERIFY" else 0
    width = max(1, int(batch.seq_lens_cpu.max()) + extra)  # L
    columns = torch.arange(width, device=batch.input_ids.device)
    if mode.is_extend():
        seq_of_token, allowed = _extend_allowed(batch, columns)
    elif mode.name == "DECODE":
        seq_of_token, allowed = _decode_allowed(batch, columns)
    else:
        seq_of_token, allowed = _verify_allowed(batch, columns)
    rows = batch.req_to_token[batch.req_pool_indices[seq_of_token]]  # [T, table width]
    return AttnMetadata(table_slots=rows[:, :width], allowed=allowed)


class TorchAttnBackend:
    """Reference attention: gathers each token's visible keys/values through the table."""

    def __init__(self):
        self.metadata: Optional[AttnMetadata] = None

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        self.metadata = build_metadata(batch)

    def forward(self, q, k, v, *, layer: int, batch: ForwardBatch) -> torch.Tensor:
        """q, k, v: ``[T, N, D]`` -> ``[T, N, D]``. Writes this layer's k, v first."""
        pool: KVPool = batch.kv_pool
        pool.write(layer, batch.out_cache_loc, k, v)
        keys, values = pool.gather(layer, self.metadata.table_slots)  # [T, L, N, D]
        scores = torch.einsum("tnd,tlnd->tnl", q.float(), keys.float())
        scores = scores / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~self.metadata.allowed[:, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return torch.einsum("tnl,tlnd->tnd", probs, values.float()).to(q.dtype)


class TboAttnBackend:
    """A primary backend for the whole batch and one per child, each initialised from its
    own ForwardBatch. An empty child's backend is left uninitialised (it never runs)."""

    def __init__(self, make_backend=TorchAttnBackend):
        self.primary = make_backend()
        self.children = (make_backend(), make_backend())

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        self.primary.init_forward_metadata(batch)
        for backend, child in zip(self.children, batch.tbo_children or ()):
            if child.num_tokens:
                backend.init_forward_metadata(child)
