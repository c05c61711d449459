"""Attention over the paged KV cache, and the TBO backend that holds one backend per child.

A backend is initialised from a ForwardBatch (``init_forward_metadata``): for each token it
finds its sequence, the table row to read and which table columns it may see. The per-mode
rule (docs/model.md):

- EXTEND, the o-th new token of sequence s: columns ``j <= prefix[s] + o`` (causal).
- DECODE: columns ``j < seq_lens[s]``.
- TARGET_VERIFY, draft r of s: columns ``j < seq_lens[s] + d`` where row r of s's tree-mask
  block allows it (the block is ``d x (seq_lens[s] + d)``, blocks laid end to end).

Two backends compute it, and must agree (``parity_tests/test_sdpa_attention.py``):

- ``TorchAttnBackend``, the readable reference: every token gathers its own ``[W, Q, D]``
  keys and values and the softmax runs in float32. Memory ``T * W``: fine for tests, not for
  thousands of cached tokens at hundreds of sequences.
- ``SdpaAttnBackend``, the serving path: one gather of ``[B, W, Q, D]`` per *sequence* in the
  pool's dtype, then ``torch.nn.functional.scaled_dot_product_attention`` (flash or
  memory-efficient kernels on a GPU) with the same visibility rule as a boolean mask. It
  captures in CUDA graphs (DECODE, TARGET_VERIFY) and runs EXTEND eagerly.

Shape letters (docs/spec.md, "Shape letters"): ``T`` tokens, ``B`` sequences, ``W`` table
columns read, ``Q`` heads, ``D`` head dim, ``U`` query rows per sequence (1 in DECODE, the
draft count in TARGET_VERIFY, the longest new run in EXTEND).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tbo_parity.torch_impl.forward_batch import ForwardBatch
from tbo_parity.torch_impl.kv_cache import KVPool


@dataclasses.dataclass
class AttnMetadata:
    table_slots: torch.Tensor  # [T, W] pool slot of every column a token may read
    allowed: torch.Tensor  # [T, W] bool


def _extend_positions(batch: ForwardBatch) -> tuple:
    """EXTEND: ``(seq [T], offset [T])``, token t is the ``offset[t]``-th new token of
    sequence ``seq[t]``."""
    lens = batch.extend_seq_lens
    seq_of_token = torch.repeat_interleave(torch.arange(len(lens), device=lens.device), lens,
                                           output_size=batch.num_tokens)
    offset = torch.arange(batch.num_tokens, device=lens.device) - batch.extend_start_loc[
        seq_of_token]
    return seq_of_token, offset


def _extend_allowed(batch: ForwardBatch, columns: torch.Tensor):
    seq_of_token, offset = _extend_positions(batch)
    limit = batch.extend_prefix_lens[seq_of_token] + offset  # [T] last visible column
    return seq_of_token, columns[None, :] <= limit[:, None]


def mask_block_offsets(seq_lens: torch.Tensor, draft_token_num: int) -> torch.Tensor:
    """[B] where each sequence's ``d x (seq_len + d)`` tree-mask block starts when the blocks
    lie end to end from 0 (docs/spec.md): the exclusive prefix sum of ``(seq_len + d) * d``."""
    sizes = (seq_lens + draft_token_num) * draft_token_num
    return torch.cumsum(sizes, 0) - sizes


def _uniform_allowed(batch: ForwardBatch, columns: torch.Tensor):
    """DECODE and TARGET_VERIFY, graph-safe: device tensors only, shapes fixed by the batch's
    token count and the column count, no host reads (this runs inside a captured graph).

    Token t belongs to sequence ``t // per_seq``. DECODE: column j is visible when
    ``j < seq_len``. TARGET_VERIFY, draft ``r = t % d``: row r of the sequence's mask block,
    which starts at ``offset + r * (seq_len + d)``, for columns ``j < seq_len + d``. The block
    offsets come from ``spec_info.custom_mask_offsets`` when the batch carries them (a CUDA
    graph's children read the parent's whole mask through them), else from ``seq_lens``.
    """
    verify = batch.forward_mode.name == "TARGET_VERIFY"
    per_seq = batch.spec_info.draft_token_num if verify else 1
    token = torch.arange(batch.num_tokens, device=columns.device)
    seq_of_token = token // per_seq  # [T]
    seq_len = batch.seq_lens[seq_of_token]  # [T]
    if not verify:
        return seq_of_token, columns[None, :] < seq_len[:, None]
    spec = batch.spec_info
    offsets = spec.custom_mask_offsets
    if offsets is None:
        offsets = mask_block_offsets(batch.seq_lens, per_seq)
    visible = seq_len + per_seq  # [T] columns of the token's mask row
    row_start = offsets[seq_of_token] + (token % per_seq) * visible  # [T]
    flat = (row_start[:, None] + columns[None, :]).clamp(max=spec.custom_mask.numel() - 1)
    in_row = columns[None, :] < visible[:, None]  # [T, W]
    return seq_of_token, in_row & spec.custom_mask[flat]


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


def context_width(batch: ForwardBatch) -> int:
    """The columns a batch's longest sequence reads (host arithmetic, for the eager path)."""
    extra = batch.spec_info.draft_token_num if batch.forward_mode.name == "TARGET_VERIFY" else 0
    return max(1, int(batch.seq_lens_cpu.max()) + extra)


def build_metadata(batch: ForwardBatch, width: Optional[int] = None) -> Optional[AttnMetadata]:
    """Which pool slots each token reads; None for a batch without tokens.

    ``width`` (L) is the number of table columns every token's row spans. Eagerly it defaults to
    what the batch's longest sequence needs (read from ``seq_lens_cpu``); a CUDA graph passes
    its ``max_context_len`` instead, so the shapes do not depend on the batch and nothing is
    read on the host. Columns past a sequence's length are masked, so the width changes no
    result.
    """
    if batch.num_tokens == 0:
        return None
    _check_attention_fields(batch)
    if width is None:
        width = context_width(batch)
    _check_width(batch, width)
    columns = torch.arange(width, device=batch.input_ids.device)
    if batch.forward_mode.is_extend():
        seq_of_token, allowed = _extend_allowed(batch, columns)
    else:
        seq_of_token, allowed = _uniform_allowed(batch, columns)
    rows = batch.req_to_token[batch.req_pool_indices[seq_of_token]]  # [T, table width]
    return AttnMetadata(table_slots=rows[:, :width], allowed=allowed)


class TorchAttnBackend:
    """Reference attention: gathers each token's visible keys/values through the table."""

    def __init__(self):
        self.metadata: Optional[AttnMetadata] = None

    def init_forward_metadata(self, batch: ForwardBatch, *, width: Optional[int] = None) -> None:
        self.metadata = build_metadata(batch, width)

    def forward(self, q, k, v, *, layer: int, batch: ForwardBatch) -> torch.Tensor:
        """q, k, v: ``[T, Q, D]`` -> ``[T, Q, D]``. Writes this layer's k, v first."""
        pool: KVPool = batch.kv_pool
        pool.write(layer, batch.out_cache_loc, k, v)
        keys, values = pool.gather(layer, self.metadata.table_slots)  # [T, W, Q, D]
        scores = torch.einsum("tnd,tlnd->tnl", q.float(), keys.float())
        scores = scores / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~self.metadata.allowed[:, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return torch.einsum("tnl,tlnd->tnd", probs, values.float()).to(q.dtype)


@dataclasses.dataclass
class SdpaPlan:
    """What ``SdpaAttnBackend`` needs per step; built once, read by every layer.

    ``slots [B, W]``: the pool slot of each sequence's table columns. ``mask [B, 1, U, W]``
    bool, or None with ``causal``: which columns each query row sees. ``query_index``: None
    when the ``T`` tokens are already ``[B, U]`` in order (DECODE, TARGET_VERIFY); in EXTEND
    ``(seq [T], offset [T])``, where token t sits in the padded ``[B, U]`` grid."""
    slots: torch.Tensor
    mask: Optional[torch.Tensor]
    causal: bool
    rows: int  # U
    query_index: Optional[tuple]


def _uniform_plan(batch: ForwardBatch, width: Optional[int]) -> SdpaPlan:
    """DECODE and TARGET_VERIFY: the ``[T, W]`` visibility of ``_uniform_allowed`` is already
    ``[B, U, W]`` in token order (sequence-major, ``U`` rows each), so it is only reshaped.
    Graph-safe: device tensors only, shapes from the token and column counts."""
    if width is None:
        width = context_width(batch)
    _check_width(batch, width)
    per_seq = batch.spec_info.draft_token_num if batch.forward_mode.name == "TARGET_VERIFY" \
        else 1
    num_seqs = batch.num_tokens // per_seq
    columns = torch.arange(width, device=batch.input_ids.device)
    _, allowed = _uniform_allowed(batch, columns)  # [T, W]
    slots = batch.req_to_token[batch.req_pool_indices[:num_seqs], :width]  # [B, W]
    return SdpaPlan(slots, allowed.view(num_seqs, 1, per_seq, width), False, per_seq, None)


def _extend_plan(batch: ForwardBatch) -> SdpaPlan:
    """EXTEND (eager: the sizes are read on the host). The new tokens of sequence s are padded
    into row s of a ``[B, U]`` grid, ``U`` the longest run; query row i of s sees columns
    ``j <= prefix[s] + i``. Padding rows (``i >= len[s]``) repeat the last real row's mask, so
    no row is empty (an all-masked row would be NaN); their output is never read. A batch of
    fresh sequences of one length needs no mask: the kernels' own causal rule is the same."""
    lens_cpu, prefix_cpu = batch.extend_seq_lens_cpu, batch.extend_prefix_lens_cpu
    rows, width = int(lens_cpu.max()), int((lens_cpu + prefix_cpu).max())
    _check_width(batch, width)
    device = batch.input_ids.device
    lens, prefix = batch.extend_seq_lens, batch.extend_prefix_lens
    seq, offset = _extend_positions(batch)
    slots = batch.req_to_token[batch.req_pool_indices, :width]  # [B, W]
    if bool((prefix_cpu == 0).all()) and bool((lens_cpu == rows).all()):
        return SdpaPlan(slots, None, True, rows, (seq, offset))
    row = torch.minimum(torch.arange(rows, device=device)[None, :], lens[:, None] - 1)  # [B, U]
    limit = prefix[:, None] + row  # [B, U] last visible column
    mask = torch.arange(width, device=device)[None, None, :] <= limit[:, :, None]
    return SdpaPlan(slots, mask[:, None], False, rows, (seq, offset))


def _check_width(batch: ForwardBatch, width: int) -> None:
    if width > batch.req_to_token.shape[1]:
        raise ValueError(f"width={width} exceeds req_to_token's {batch.req_to_token.shape[1]} "
                         f"columns")


# The fused kernels SdpaAttnBackend may use: each gives the same bits for the same inputs on
# every run. cuDNN's attention is left out: on an H200 it decodes about twice as fast as the
# memory-efficient kernel, but repeated calls on one input differ in the last bits
# (docs/gpu-results.md), and a TBO step must be reproducible and equal across transports.
REPRODUCIBLE_KERNELS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH)


class SdpaAttnBackend:
    """Attention through ``scaled_dot_product_attention`` over keys and values gathered per
    sequence (not per token) in the pool's dtype: the same rule as ``TorchAttnBackend``, in
    the memory a real context needs (``2 * B * W * Q * D`` elements per layer, reused).

    The gather is the price of a paged table with a dense kernel: it moves the context once
    more than a paged kernel would (docs/gpu-results.md measures it). Numerics: the kernels
    accumulate in float32 and round the output once to ``q``'s dtype, like the reference;
    they differ from it by the order of their sums (docs/model.md states the tolerance).
    """

    def __init__(self):
        self.plan: Optional[SdpaPlan] = None

    def init_forward_metadata(self, batch: ForwardBatch, *, width: Optional[int] = None) -> None:
        """As ``TorchAttnBackend``'s: ``width`` fixes the column count (a CUDA graph's
        ``max_context_len``); EXTEND is eager and sizes itself."""
        if batch.num_tokens == 0:
            self.plan = None
            return
        _check_attention_fields(batch)
        self.plan = (_extend_plan(batch) if batch.forward_mode.is_extend()
                     else _uniform_plan(batch, width))

    def forward(self, q, k, v, *, layer: int, batch: ForwardBatch) -> torch.Tensor:
        """q, k, v: ``[T, Q, D]`` -> ``[T, Q, D]``. Writes this layer's k, v first."""
        plan = self.plan
        pool: KVPool = batch.kv_pool
        pool.write(layer, batch.out_cache_loc, k, v)
        keys, values = pool.gather(layer, plan.slots)  # [B, W, Q, D] each
        num_seqs, (tokens, heads, dim) = plan.slots.shape[0], q.shape
        if plan.query_index is None:
            grid = q.view(num_seqs, plan.rows, heads, dim)
        else:
            grid = q.new_zeros(num_seqs, plan.rows, heads, dim)
            grid[plan.query_index] = q
        with sdpa_kernel(list(REPRODUCIBLE_KERNELS)):
            out = F.scaled_dot_product_attention(  # [B, Q, U, D]
                grid.transpose(1, 2), keys.to(q.dtype).transpose(1, 2),
                values.to(q.dtype).transpose(1, 2), attn_mask=plan.mask, is_causal=plan.causal)
        out = out.transpose(1, 2)  # [B, U, Q, D]
        if plan.query_index is None:
            return out.reshape(tokens, heads, dim)
        return out[plan.query_index]


class TboAttnBackend:
    """A primary backend for an unsplit batch and one per child of a split one, each
    initialised from its own ForwardBatch. With children the primary is left alone (the
    children run, not the parent); an empty child's backend is left uninitialised too.

    Eagerly (``width=None``) every backend sizes its metadata by its own longest sequence. For
    a CUDA graph the runner passes ``width=max_context_len`` and calls this *inside* the
    captured region: each child's metadata is then computed by captured kernels from its
    views of the graph's static buffers (its slice of ``seq_lens``, its request rows, its
    slice of the tree-mask offsets), so a replay recomputes it from whatever the runner wrote
    into those buffers, with no host work per child.
    """

    def __init__(self, make_backend=TorchAttnBackend):
        self.primary = make_backend()
        self.children = (make_backend(), make_backend())

    def init_forward_metadata(self, batch: ForwardBatch, *, width: Optional[int] = None) -> None:
        if batch.tbo_children is None:
            self.primary.init_forward_metadata(batch, width=width)
            return
        for backend, child in zip(self.children, batch.tbo_children):
            if child.num_tokens:
                backend.init_forward_metadata(child, width=width)
