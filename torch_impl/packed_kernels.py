"""The packed layout's index passes as three Triton kernels, for CUDA devices: the same values
as ``packed_dispatch.packed_slots`` and ``packed_dispatch.packed_receive_map`` (integers, so bit
for bit), in three launches instead of about forty small torch kernels.

Why: in a decode step of 32 tokens per rank the packed layout's own passes (a scan over the
tokens per expert, the slots, the counts, the receive map) were each a handful of tiny torch
kernels, and together cost more than the step saved (docs/gpu-results.md, 2026-12-02). Each
kernel here does one pass of the spec's formulas (docs/model.md, "The packed layout"):

- ``_ranks_kernel`` (one program per expert ``e``): walks the tokens in blocks, and gives every
  pair that picked ``e`` its rank among the earlier tokens that picked ``e`` (a cumsum over the
  block plus the blocks before it), and ``counts[e]``;
- ``_slots_kernel`` (one program per block of pairs): ``slot = rank + start(e)``, where
  ``start(e)`` sums the counts of the lower experts of ``e``'s rank, and ``dest = e // L``;
- ``_receive_map_kernel`` (one program per (source, block of region rows)): from the ``[N, L]``
  received counts, the group ends and each received row's place in the expert-major buffer.

No host reads; the grids depend on shapes only, so the kernels are captured in CUDA graphs like
the torch passes they replace. Triton ships with torch's CUDA wheels; where it is missing (a
CPU-only torch) or the tensors are not on a GPU, ``available`` is False and the torch passes run.
``parity_tests/test_packed_dispatch.py`` compares both ways on the GPU, bit for bit.
"""

from __future__ import annotations

import torch

try:  # Triton comes with torch's CUDA wheels only
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - a CPU-only torch: the torch passes run
    triton = None


def available(x: torch.Tensor) -> bool:
    """Whether the kernels can run on ``x``'s device."""
    return triton is not None and x.is_cuda


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, int(n) - 1).bit_length())


if triton is not None:

    @triton.jit
    def _ranks_kernel(ids_ptr, rank_ptr, counts_ptr, T, K: tl.constexpr, BT: tl.constexpr,
                      BK: tl.constexpr):
        e = tl.program_id(0)
        k = tl.arange(0, BK)
        seen = tl.sum(tl.zeros((BT,), tl.int32), axis=0)  # tokens before this block that
        for t0 in tl.range(0, T, BT):                     # picked e
            t = t0 + tl.arange(0, BT)
            inside = (t[:, None] < T) & (k[None, :] < K)
            ids = tl.load(ids_ptr + t[:, None] * K + k[None, :], mask=inside, other=-1)
            hit = ids == e
            picked = tl.sum(hit.to(tl.int32), axis=1)  # per token of the block: 0 or 1 (distinct experts)
            before = tl.cumsum(picked, axis=0) - picked + seen
            rank = before[:, None] + tl.zeros((BT, BK), tl.int32)
            tl.store(rank_ptr + t[:, None] * K + k[None, :], rank.to(tl.int64),
                     mask=inside & hit)
            seen += tl.sum(picked, axis=0)
        tl.store(counts_ptr + e, seen)

    @triton.jit
    def _slots_kernel(ids_ptr, rank_ptr, counts_ptr, dest_ptr, slot_ptr, P,
                      L: tl.constexpr, BP: tl.constexpr, BL: tl.constexpr):
        p = tl.program_id(0) * BP + tl.arange(0, BP)
        inside = p < P
        ids = tl.load(ids_ptr + p, mask=inside, other=-1)
        valid = ids >= 0
        safe = tl.where(valid, ids, 0)
        dest = safe // L
        local = safe % L
        l = tl.arange(0, BL)
        lower = (l[None, :] < local[:, None]) & valid[:, None]  # the lower experts of dest
        counts = tl.load(counts_ptr + dest[:, None] * L + l[None, :], mask=lower, other=0)
        start = tl.sum(counts, axis=1).to(tl.int64)
        rank = tl.load(rank_ptr + p, mask=inside & valid, other=0)
        tl.store(dest_ptr + p, tl.where(valid, dest.to(tl.int64), -1), mask=inside)
        tl.store(slot_ptr + p, tl.where(valid, start + rank, -1), mask=inside)

    @triton.jit
    def _receive_map_kernel(counts_ptr, row_of_ptr, ends_ptr, S, N: tl.constexpr,
                            L: tl.constexpr, BN: tl.constexpr, BL: tl.constexpr,
                            BS: tl.constexpr):
        s = tl.program_id(0)
        n = tl.arange(0, BN)
        l = tl.arange(0, BL)
        inside = (n[:, None] < N) & (l[None, :] < L)
        c = tl.load(counts_ptr + n[:, None] * L + l[None, :], mask=inside, other=0)  # [N, L]
        totals = tl.sum(c, axis=0)  # [L]: rows of each local expert
        ends = tl.cumsum(totals, axis=0)
        first = (tl.program_id(1) == 0) & (s == 0)
        tl.store(ends_ptr + l, ends, mask=(l < L) & first)
        lower_sources = tl.cumsum(c, axis=0) - c  # [N, L]: rows of l from sources before s
        region_end = tl.cumsum(c, axis=1)  # [N, L]: where l's rows end in s's region
        base = (ends - totals)[None, :] + lower_sources - (region_end - c)
        mine = n[:, None] == s
        end_s = tl.sum(tl.where(mine, region_end, 0), axis=0)  # [L]
        base_s = tl.sum(tl.where(mine, base, 0), axis=0)  # [L]: row = base_s[l] + i
        i = tl.program_id(1) * BS + tl.arange(0, BS)
        expert = tl.sum(((i[:, None] >= end_s[None, :]) & (l[None, :] < L)).to(tl.int32),
                        axis=1)  # per row i of the block: its local expert (L: no real row)
        row = tl.sum(tl.where(l[None, :] == expert[:, None], base_s[None, :], 0), axis=1)
        tl.store(row_of_ptr + s * S + i, tl.where(expert < L, (row + i).to(tl.int64), -1),
                 mask=i < S)


def packed_slots(topk_ids: torch.Tensor, num_ranks: int, num_experts: int) -> tuple:
    """``packed_dispatch.packed_slots`` in two kernels: ``(dest, slot, counts)``."""
    tokens, top_k = topk_ids.shape
    local = num_experts // num_ranks
    ids = topk_ids.contiguous()
    rank = torch.empty_like(ids)
    counts = torch.empty(num_experts, dtype=torch.int32, device=ids.device)
    block_t = min(_pow2(tokens), 128)
    _ranks_kernel[(num_experts,)](ids, rank, counts, tokens, K=top_k, BT=block_t,
                                  BK=_pow2(top_k, 2))
    dest, slot = torch.empty_like(ids), torch.empty_like(ids)
    pairs = tokens * top_k
    block_p = 128
    _slots_kernel[(max(1, triton.cdiv(pairs, block_p)),)](
        ids, rank, counts, dest, slot, pairs, L=local, BP=block_p, BL=_pow2(local, 2))
    return dest, slot, counts.view(num_ranks, local)


def packed_receive_map(recv_counts: torch.Tensor, region: int) -> tuple:
    """``packed_dispatch.packed_receive_map`` in one kernel: ``(row_of, group_ends)``."""
    n, local = recv_counts.shape
    counts = recv_counts.to(torch.int32).contiguous()
    row_of = torch.empty(n, region, dtype=torch.int64, device=counts.device)
    ends = torch.empty(local, dtype=torch.int32, device=counts.device)
    block_s = 64
    _receive_map_kernel[(n, max(1, triton.cdiv(region, block_s)))](
        counts, row_of, ends, region, N=n, L=local, BN=_pow2(n, 2), BL=_pow2(local, 2),
        BS=block_s)
    return row_of, ends
