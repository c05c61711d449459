"""The host-overhead rewrites of the eager step give the same bits as what they replaced.

Each rewrite in ``torch_impl`` that cut operators from a step (``benchmarks/host_overhead.py``
measures them) is checked here against the formula it replaced, written out as it was, bit for
bit, in every dtype the model runs in (float32, bfloat16) and in float64, where a skipped
``.float()`` would not be exact: rotary embedding in rotate-half form with tables shared by the
layers, ``rmsnorm`` and the float32 operands that skip a conversion kernel, the shared expert's
matrix products without ``einsum``, the send buffer filled without a gathered copy of the
tokens, ``combine_from_back``, ``select_experts`` without its all-false masks, and the expert
load counted once per step. A last test holds the operator counts of those pieces, so that a
later edit cannot add host work back silently.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tbo_parity.torch_impl import expert_parallel as ep
from tbo_parity.torch_impl import moe
from tbo_parity.torch_impl.model import rmsnorm, rope, rotary_tables

DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def _same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.view(-1).view(torch.uint8) if got.numel() else got,
                       want.view(-1).view(torch.uint8) if want.numel() else want)


def _with_specials(x: torch.Tensor) -> torch.Tensor:
    """``x`` with signed zeros and extreme values planted, where rounding and signs differ."""
    flat = x.view(-1)
    specials = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3e4, -3e4], dtype=torch.float64)
    flat[:specials.numel()] = specials.to(x.dtype)
    return x


# --- what the rewrites replaced, as it was -------------------------------------------------------


def _old_rope(x, positions, inv_freq):
    angle = positions.to(inv_freq.dtype)[:, None, None] * inv_freq
    cos, sin = torch.cos(angle), torch.sin(angle)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].to(angle.dtype), x[..., half:].to(angle.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def _old_rmsnorm(x, weight, eps):
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype)


def _old_swiglu(x, gate, up, down):
    g = torch.einsum("...h,...hi->...i", x, gate).float()
    u = torch.einsum("...h,...hi->...i", x, up).float()
    return torch.einsum("...i,...ih->...h", (F.silu(g) * u).to(x.dtype), down)


def _old_expert_swiglu(recv, gate, up, down):
    g = torch.bmm(recv, gate).float()
    u = torch.bmm(recv, up).float()
    return torch.bmm((F.silu(g) * u).to(recv.dtype), down)


def _old_fill_send_buffer(rows, hidden, topk_ids, capacity):
    num_tokens, top_k = topk_ids.shape
    scratch = rows.shape[0] - 1
    token = torch.arange(num_tokens).repeat_interleave(top_k)
    ids = topk_ids.flatten()
    index = torch.where(ids < 0, scratch, ids * capacity + token)
    rows.zero_()
    rows.index_copy_(0, index, hidden[token])


def _old_combine_from_back(back, topk_weights, topk_ids):
    e, c, h = back.shape
    num_tokens, top_k = topk_ids.shape
    token = torch.arange(num_tokens)[:, None]
    rows = torch.where(topk_ids < 0, 0, topk_ids * c + token)
    picked = back.view(e * c, h)[rows.flatten()].view(num_tokens, top_k, h)
    return (picked.float() * topk_weights[:, :, None]).sum(dim=1)


def _old_expert_load(topk_ids, num_experts):
    ids = topk_ids.flatten()
    bins = torch.where(ids < 0, num_experts, ids)
    load = torch.zeros(num_experts + 1, dtype=torch.int64)
    return load.scatter_add_(0, bins, torch.ones_like(bins))[:num_experts]


def _routing(gen, tokens, num_experts, top_k, padded_pairs=()):
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k]
                       for _ in range(tokens)]) if tokens else torch.zeros(0, top_k,
                                                                           dtype=torch.int64)
    for t, k in padded_pairs:
        ids[t, k] = -1
    return ids


# --- bit for bit -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_in_rotate_half_form_with_shared_tables_is_the_old_rope(dtype):
    gen = torch.Generator().manual_seed(0)
    x = _with_specials(torch.randn(37, 3, 16, generator=gen, dtype=torch.float64).to(dtype))
    positions = torch.randint(0, 5000, (37,), generator=gen)
    inv_freq = torch.as_tensor(np.power(10000.0, -np.arange(0, 16, 2) / 16),
                               dtype=torch.float32)
    tables = rotary_tables(positions, inv_freq)
    _same_bits(rope(x, tables), _old_rope(x, positions, inv_freq))
    _same_bits(rope(x[:0], rotary_tables(positions[:0], inv_freq)),
               _old_rope(x[:0], positions[:0], inv_freq))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_without_the_weight_conversion_is_the_old_rmsnorm(dtype):
    gen = torch.Generator().manual_seed(1)
    x = _with_specials(torch.randn(9, 24, generator=gen, dtype=torch.float64).to(dtype))
    weight = torch.randn(24, generator=gen, dtype=torch.float64).to(dtype)
    _same_bits(rmsnorm(x, weight, 1e-6), _old_rmsnorm(x, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_float32_operand_converts_only_where_promotion_would_not_be_exact(dtype):
    x = torch.ones(3, dtype=dtype)
    assert (moe.float32_operand(x) is x) == (dtype != torch.float64)
    assert moe.float32_operand(x).dtype == (torch.float32 if dtype == torch.float64 else dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden,inter", [(1, 8, 4), (13, 16, 8), (5, 2, 1), (4, 1, 3),
                                                 (0, 8, 4)])
def test_shared_expert_matrix_products_are_einsums(dtype, tokens, hidden, inter):
    """The 2-D fast path is the very ``bmm`` einsum runs (same operands, same bits); the
    per-pair weights of ``LocalDispatcher`` and a contraction of size 1 still go through
    einsum."""
    gen = torch.Generator().manual_seed(2)

    def draw(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    x = _with_specials(draw(tokens, hidden)) if tokens * hidden > 6 else draw(tokens, hidden)
    shared = [draw(2, hidden, inter)[1], draw(2, hidden, inter)[1], draw(2, inter, hidden)[1]]
    _same_bits(moe.swiglu(x, *shared), _old_swiglu(x, *shared))
    per_pair = [draw(tokens, hidden, inter), draw(tokens, hidden, inter),
                draw(tokens, inter, hidden)]
    _same_bits(moe.swiglu(x, *per_pair), _old_swiglu(x, *per_pair))
    recv = draw(3, tokens, hidden)
    local = [draw(3, hidden, inter), draw(3, hidden, inter), draw(3, inter, hidden)]
    _same_bits(ep.expert_swiglu(recv, *local), _old_expert_swiglu(recv, *local))


@pytest.mark.parametrize("dtype", DTYPES)
def test_send_buffer_and_combine_are_the_old_ones_with_padding_pairs(dtype):
    """Including padding pairs (id -1, which go to the scratch row and read row 0 with weight
    0) and a token whose pairs are all padding."""
    gen = torch.Generator().manual_seed(3)
    n, l, c, h, k, tokens = 2, 3, 7, 5, 3, 6
    ids = _routing(gen, tokens, n * l, k, padded_pairs=[(1, 2), (5, 0), (5, 1), (5, 2)])
    hidden = torch.randn(tokens, h, generator=gen, dtype=torch.float64).to(dtype)
    got, want = (torch.full(((n * l * c + 1) * h,), 7.0, dtype=dtype) for _ in range(2))
    ep.fill_send_buffer(ep.send_views(got, (n, l, c, h))[1], hidden, ids, c)
    _old_fill_send_buffer(ep.send_views(want, (n, l, c, h))[1], hidden, ids, c)
    scratch = slice(n * l * c * h, None)  # holds one of the padding pairs' tokens: never read
    _same_bits(got[:scratch.start], want[:scratch.start])
    assert any(torch.equal(got[scratch], hidden[t]) for t in (1, 5))

    back = _with_specials(torch.randn(n * l, c, h, generator=gen,
                                      dtype=torch.float64).to(dtype))
    for weight_dtype in (torch.float32, torch.float64):
        weights = torch.rand(tokens, k, generator=gen, dtype=torch.float64).to(weight_dtype)
        weights = weights.masked_fill(ids < 0, 0.0)
        _same_bits(ep.combine_from_back(back, weights, ids),
                   _old_combine_from_back(back, weights, ids))


@pytest.mark.parametrize("scoring", ("softmax", "sigmoid"))
def test_select_experts_without_padding_skips_only_all_false_masks(scoring):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(11, 8, generator=gen)
    logits[3] = 0.25  # a row of ties
    for count in (11, 12):  # an eager int covering every row: no masks
        weights, ids = moe.select_experts(logits, top_k=3, scoring=scoring,
                                          num_token_non_padded=count)
        want_w, want_ids = moe.select_experts(logits, top_k=3, scoring=scoring,
                                              num_token_non_padded=torch.tensor(count))
        _same_bits(weights.contiguous(), want_w)
        _same_bits(ids.contiguous(), want_ids)
    weights, ids = moe.select_experts(logits, top_k=3, scoring=scoring,
                                      num_token_non_padded=7)  # padded: masked as before
    assert (ids[7:] == -1).all() and (weights[7:] == 0).all() and (ids[:7] >= 0).all()


def test_expert_load_counted_once_per_step_is_the_sum_of_per_layer_counts():
    gen = torch.Generator().manual_seed(5)
    num_experts, layers = 6, 3
    loads = []
    for tokens, padded in ((5, [(0, 1), (4, 0)]), (0, []), (3, [(2, 2)])):  # B empty, C
        load = moe.ExpertLoad()
        for _ in range(layers):
            load.add(_routing(gen, tokens, num_experts, 3, padded), num_experts)
        loads.append(load)
    for group in (loads[:1], loads[:2], loads[1:], loads[::2]):
        want = torch.stack([sum(_old_expert_load(load.topk_ids[layer], num_experts)
                                for load in group) for layer in range(layers)])
        got = moe.ExpertLoad.total(group)
        assert got.dtype == torch.int64
        _same_bits(got.contiguous(), want)


# --- the host work those pieces dispatch -------------------------------------------------------


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.kernels, self.views = collections.Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.is_view:
            self.views += 1
        elif func.overloadpacket.__name__ != "scalar_tensor":  # a host scalar, no kernel
            self.kernels[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _kernels(fn) -> collections.Counter:
    with _Count() as count:
        fn()
    return count.kernels


def test_the_rewritten_pieces_dispatch_no_more_operators_than_today():
    """Operator counts of the pieces, bfloat16 (the GPU's dtype, where a ``.float()`` is a
    kernel). Before the rewrites: rope 15 per call (its angles included; now 5, and 7 for the
    tables once per step), rmsnorm 9, the shared expert's matrix product one bmm behind 11
    views, select_experts 8, the send buffer 9, combine 9, the expert load 5 per layer and
    micro-batch (now 6 per step)."""
    gen = torch.Generator().manual_seed(6)
    b16 = torch.bfloat16
    x = torch.randn(8, 2, 16, generator=gen).to(b16)
    tables = rotary_tables(torch.arange(8), torch.rand(8, generator=gen))
    assert sum(_kernels(lambda: rope(x, tables)).values()) == 5  # cat, mul, mul, add, to
    h = torch.randn(8, 32, generator=gen).to(b16)
    weight = torch.ones(32, dtype=b16)
    # float, pow, mean, add, rsqrt, mul, mul, to
    assert sum(_kernels(lambda: rmsnorm(h, weight, 1e-6)).values()) == 8
    gate = torch.randn(32, 4, generator=gen).to(b16)
    with _Count() as count:
        moe._matmul(h, gate)
    assert dict(count.kernels) == {"bmm": 1} and count.views <= 3
    logits = torch.randn(8, 6, generator=gen)
    assert sum(_kernels(lambda: moe.select_experts(
        logits, top_k=2, scoring="softmax", num_token_non_padded=8)).values()) == 4
    ids = _routing(gen, 8, 6, 2)
    storage = torch.empty((2 * 3 * 8 + 1) * 32, dtype=b16)
    rows = ep.send_views(storage, (2, 3, 8, 32))[1]
    # arange, lt, mul, add, where, zero_, index_put_
    assert sum(_kernels(lambda: ep.fill_send_buffer(rows, h, ids, 8)).values()) == 7
    back = torch.randn(6, 8, 32, generator=gen).to(b16)
    w = torch.rand(8, 2, generator=gen)
    # arange, lt, mul, add, where, index, mul, sum
    assert sum(_kernels(lambda: ep.combine_from_back(back, w, ids)).values()) == 8
    load = moe.ExpertLoad()
    for _ in range(4):
        load.add(ids, 6)
    # stack, lt, where, zeros, ones_like, scatter_add_: for all four layers
    assert sum(_kernels(lambda: moe.ExpertLoad.total([load])).values()) == 6
