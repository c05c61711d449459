"""The static device buffers every captured graph reads, and the writes a replay makes into
them: the real batch in the first rows, padding that touches nothing real behind it.

Shape letters (docs/spec.md, "Shape letters"): ``B`` the largest captured batch, ``T`` =
``B * max(token_num_per_seq)``, ``F`` the tree-mask buffer (``B * d_max * max_context_len`` entries
for real blocks, then one all-visible scratch block of ``d_max * (1 + d_max)``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from tbo_parity.torch_impl.forward_batch import ForwardBatch, VerifyInput
from tbo_parity.torch_impl.forward_mode import ForwardMode
from tbo_parity.torch_impl.graph_key import CaptureSet, GraphKey

SEQ_LEN_FILL = 1  # a padding sequence "holds" one token, so its attention row is not empty


@dataclasses.dataclass
class Padding:
    """What a padding row holds: its tokens write the KV slot ``slot``, its sequence reads
    through the request row ``req_row`` (every column pointing at ``slot``), and its tree-mask
    block starts at ``mask_offset`` (the all-visible scratch block)."""

    slot: int
    req_row: int
    mask_offset: int


class StaticInputs:
    """The device buffers every graph reads (allocated once, at the largest size)."""

    def __init__(self, max_bs: int, max_tokens: int, mask_len: int, device):
        def ints(n):
            return torch.zeros(n, dtype=torch.int64, device=device)

        self.input_ids = ints(max_tokens)  # [T]
        self.positions = ints(max_tokens)  # [T]
        self.out_cache_loc = ints(max_tokens)  # [T]
        self.req_pool_indices = ints(max_bs)  # [B]
        self.seq_lens = ints(max_bs)  # [B]
        self.custom_mask_offsets = ints(max_bs)  # [B]
        self.custom_mask = torch.ones(mask_len, dtype=torch.bool, device=device)  # [F]
        self.num_token_non_padded = ints(())  # [] real tokens of the whole graph

    @classmethod
    def for_capture(cls, capture: CaptureSet, device) -> tuple:
        """``(buffers, scratch_mask_start)`` for every graph of ``capture``: the scratch
        tree-mask block starts after the real blocks of the largest batch."""
        bs, d_max = capture.max_bs, capture.max_draft
        scratch_mask_start = bs * d_max * capture.max_context_len
        buffers = cls(bs, bs * max(1, d_max), scratch_mask_start + d_max * (1 + d_max), device)
        return buffers, scratch_mask_start

    def batch(self, key: GraphKey, req_to_token: torch.Tensor, kv_pool) -> ForwardBatch:
        """The batch a graph is captured on: views of the buffers, every row padding."""
        bs, n = key.batch_size, key.num_tokens
        spec_info = None
        if key.mode is ForwardMode.TARGET_VERIFY:
            spec_info = VerifyInput(draft_token_num=key.token_num_per_seq,
                                    custom_mask=self.custom_mask,
                                    custom_mask_offsets=self.custom_mask_offsets[:bs])
        return ForwardBatch(
            forward_mode=key.mode, batch_size=bs, input_ids=self.input_ids[:n],
            positions=self.positions[:n], out_cache_loc=self.out_cache_loc[:n],
            req_pool_indices=self.req_pool_indices[:bs], seq_lens=self.seq_lens[:bs],
            seq_lens_cpu=torch.full((bs,), SEQ_LEN_FILL, dtype=torch.int64),
            spec_info=spec_info, num_token_non_padded=self.num_token_non_padded,
            req_to_token=req_to_token, kv_pool=kv_pool)

    def fill_padding(self, key: GraphKey, real_bs: int, padding: Padding) -> None:
        """Rows ``real_bs..`` hold padding for the graph ``key``."""
        bs, first, n = key.batch_size, real_bs * key.token_num_per_seq, key.num_tokens
        if n > first:
            self.input_ids[first:n].zero_()
            self.positions[first:n].zero_()
            self.out_cache_loc[first:n].fill_(padding.slot)
        if bs > real_bs:
            self.req_pool_indices[real_bs:bs].fill_(padding.req_row)
            self.seq_lens[real_bs:bs].fill_(SEQ_LEN_FILL)
            self.custom_mask_offsets[real_bs:bs].fill_(padding.mask_offset)

    def write(self, batch: ForwardBatch, key: GraphKey, real_bs: int, padding: Padding) -> None:
        """The real batch into the first rows, padding behind it, and its real-token count.
        The batch's tree mask is checked before anything is written."""
        n = real_bs * key.token_num_per_seq
        sizes = mask_block_sizes(batch)
        if n:
            self.input_ids[:n].copy_(batch.input_ids)
            self.positions[:n].copy_(batch.positions)
            self.out_cache_loc[:n].copy_(batch.out_cache_loc)
            self.req_pool_indices[:real_bs].copy_(batch.req_pool_indices)
            self.seq_lens[:real_bs].copy_(batch.seq_lens)
        if sizes is not None:
            mask = batch.spec_info.custom_mask
            self.custom_mask[:mask.numel()].copy_(mask)
            self.custom_mask_offsets[:real_bs].copy_(torch.cumsum(sizes, 0) - sizes)
        self.fill_padding(key, real_bs, padding)
        self.num_token_non_padded.fill_(n)


def mask_block_sizes(batch: ForwardBatch) -> Optional[torch.Tensor]:
    """[B] host sizes of a TARGET_VERIFY batch's tree-mask blocks, its mask checked."""
    if batch.forward_mode is not ForwardMode.TARGET_VERIFY or not batch.batch_size:
        return None
    d, mask = batch.spec_info.draft_token_num, batch.spec_info.custom_mask
    sizes = (batch.seq_lens_cpu + d) * d  # the blocks lie end to end (docs/spec.md)
    if mask is None or mask.numel() != int(sizes.sum()):
        raise ValueError(f"spec_info.custom_mask must hold {int(sizes.sum())} entries for "
                         f"these seq_lens, got {None if mask is None else mask.numel()}")
    return sizes
