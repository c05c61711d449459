"""The reference MoE model in JAX: the math of ``docs/model.md`` as small pure functions.

``forward`` runs the model through ``reference.operations`` (the same list of operations that
two-batch overlap steps through), so the layer is defined exactly once. This module holds the
math the operations call: norms, rotary, the attention mask of each mode, attention over the
paged KV cache, routing, dispatch/combine and the experts.

Shape letters: ``T`` tokens, ``S`` sequences, ``H`` hidden, ``N`` heads, ``D`` head dim,
``E`` routed experts, ``K`` top-k, ``I`` expert intermediate size, ``X`` shared experts,
``V`` vocabulary, ``R`` rows and ``L`` columns of ``req_to_token``, ``P`` KV-pool slots,
``M`` flattened custom-mask entries, ``TK`` = ``T * K`` (token, expert) pairs.

Everything is shape-static: padding rows are marked by ``num_token_non_padded`` and routed
nowhere, experts are picked by gather/argsort, never by boolean indexing. Padding rows still
compute attention (their outputs are meaningless but finite for valid inputs) and never
change a real row.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from reference.weights import ModelConfig

MODES = ("EXTEND", "DECODE", "TARGET_VERIFY", "IDLE")


# ---------------------------------------------------------------------------------------------
# Inputs and outputs.
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.tree_util.register_dataclass, meta_fields=[], data_fields=[
    "input_ids", "positions", "out_cache_loc", "req_pool_indices", "seq_lens",
    "extend_prefix_lens", "extend_seq_lens", "custom_mask", "req_to_token",
    "num_token_non_padded"])
@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelInputs:
    """One (micro-)batch. The mode and ``draft_token_num`` are static and passed separately."""

    input_ids: jax.Array  # [T] int32
    positions: jax.Array  # [T] int32
    out_cache_loc: jax.Array  # [T] int32, KV-pool slot each token writes
    req_pool_indices: jax.Array  # [S] int32, row of req_to_token per sequence
    seq_lens: jax.Array  # [S] int32
    extend_prefix_lens: Optional[jax.Array] = None  # [S] int32, EXTEND only
    extend_seq_lens: Optional[jax.Array] = None  # [S] int32, EXTEND only
    custom_mask: Optional[jax.Array] = None  # [M] bool, TARGET_VERIFY only (TBO_SEMANTICS)
    req_to_token: jax.Array  # [R, L] int32
    num_token_non_padded: Optional[jax.Array] = None  # int32 scalar; None means T


@functools.partial(jax.tree_util.register_dataclass, meta_fields=[],
                   data_fields=["hidden", "logits", "k_pool", "v_pool", "expert_load"])
@dataclasses.dataclass(frozen=True)
class ForwardOutput:
    hidden: jax.Array  # [T, H]  final-norm hidden states
    logits: jax.Array  # [T, V]
    k_pool: jax.Array  # [num_layers, P, N, D]  after the pass's writes
    v_pool: jax.Array  # [num_layers, P, N, D]
    expert_load: jax.Array  # [num_layers, E] int32: (token, k) pairs routed to each expert


def mode_name(mode) -> str:
    """``"EXTEND"`` etc. from a string or any enum member (compared by ``.name``)."""
    name = getattr(mode, "name", mode)
    if name not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return name


def token_num_per_seq(mode, draft_token_num=None) -> Optional[int]:
    """1 for DECODE, ``draft_token_num`` for TARGET_VERIFY, 0 for IDLE, None for EXTEND."""
    name = mode_name(mode)
    if name == "TARGET_VERIFY":
        if isinstance(draft_token_num, bool) or not isinstance(draft_token_num, int) \
                or draft_token_num < 1:
            raise ValueError(f"draft_token_num must be an int >= 1 in TARGET_VERIFY, "
                             f"got {draft_token_num!r}")
        return draft_token_num
    return {"EXTEND": None, "DECODE": 1, "IDLE": 0}[name]


def normalize_inputs(inputs: ModelInputs) -> ModelInputs:
    """Integer fields as int32 arrays, the mask as bool, ``num_token_non_padded`` filled in."""
    def as_int(x):
        return None if x is None else jnp.asarray(x, jnp.int32)

    n = inputs.num_token_non_padded
    return ModelInputs(
        input_ids=as_int(inputs.input_ids), positions=as_int(inputs.positions),
        out_cache_loc=as_int(inputs.out_cache_loc),
        req_pool_indices=as_int(inputs.req_pool_indices), seq_lens=as_int(inputs.seq_lens),
        extend_prefix_lens=as_int(inputs.extend_prefix_lens),
        extend_seq_lens=as_int(inputs.extend_seq_lens),
        custom_mask=None if inputs.custom_mask is None else jnp.asarray(inputs.custom_mask, bool),
        req_to_token=as_int(inputs.req_to_token),
        num_token_non_padded=as_int(jnp.shape(inputs.input_ids)[0] if n is None else n))


# ---------------------------------------------------------------------------------------------
# Norm and rotary.
# ---------------------------------------------------------------------------------------------


def rmsnorm(x, w, *, eps):
    """``x * rsqrt(mean(x*x, -1) + eps) * w`` over the last axis."""
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, positions, *, theta):
    """NeoX rotary (rotate halves). x: [T, N, D]; positions: [T].

    ``inv_freq`` is computed in float64 numpy and cast, so it is the same on every backend.
    """
    d = x.shape[-1]
    inv_freq = jnp.asarray(np.power(theta, -np.arange(0, d, 2) / d), x.dtype)  # [D/2]
    angle = positions.astype(x.dtype)[:, None, None] * inv_freq  # [T, 1, D/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# ---------------------------------------------------------------------------------------------
# Which table columns each token may attend to: one small function per mode.
# Each returns (seq_of_token [T], allowed [T, L]).
# ---------------------------------------------------------------------------------------------


def _exclusive_cumsum(x):
    return jnp.cumsum(x) - x


def extend_allowed(extend_prefix_lens, extend_seq_lens, *, num_tokens, num_cols):
    """Token ``t``, the ``o``-th new token of ``s``, sees ``j <= extend_prefix_lens[s] + o``.

    Tokens lie sequence after sequence, so ``s`` is where ``t`` falls among the running sums.
    """
    t = jnp.arange(num_tokens)
    ends = jnp.cumsum(extend_seq_lens)  # [S]
    seq = jnp.minimum(jnp.searchsorted(ends, t, side="right"), len(ends) - 1)  # [T]
    offset = t - (ends - extend_seq_lens)[seq]  # [T]: o
    last = extend_prefix_lens[seq] + offset  # [T]: last visible column
    return seq, jnp.arange(num_cols)[None, :] <= last[:, None]


def decode_allowed(seq_lens, *, num_tokens, num_cols):
    """Token ``t`` is sequence ``t``'s new token (column ``seq_lens[t]-1``).

    It sees ``j < seq_lens[t]``.
    """
    seq = jnp.arange(num_tokens)
    return seq, jnp.arange(num_cols)[None, :] < seq_lens[seq][:, None]


def target_verify_allowed(seq_lens, custom_mask, *, draft_token_num, num_tokens, num_cols):
    """Draft ``r`` of ``s`` (token ``s*d + r``) sees ``j < seq_lens[s]+d`` with ``mask_s[r, j]``.

    ``mask_s`` is the row-major ``d x (seq_lens[s]+d)`` block of ``custom_mask`` starting at
    ``sum_{i<s} (seq_lens[i]+d) * d``. Columns past the block are clipped before the gather and
    then masked off, so the read stays in bounds.
    """
    d = draft_token_num
    t = jnp.arange(num_tokens)
    seq, r = t // d, t % d  # [T], [T]
    width = seq_lens + d  # [S]: columns of each block
    block_start = _exclusive_cumsum(width * d)  # [S]
    j = jnp.arange(num_cols)[None, :]  # [1, L]
    flat = block_start[seq][:, None] + r[:, None] * width[seq][:, None] + j  # [T, L]
    in_block = j < width[seq][:, None]
    return seq, in_block & custom_mask[jnp.clip(flat, 0, custom_mask.shape[0] - 1)]


def attention_layout(inputs: ModelInputs, *, mode, draft_token_num=None):
    """``(table_rows [T, L], allowed [T, L])``: each token's table row and visible columns."""
    name = mode_name(mode)
    num_tokens, num_cols = inputs.input_ids.shape[0], inputs.req_to_token.shape[1]
    sizes = dict(num_tokens=num_tokens, num_cols=num_cols)
    if name == "EXTEND":
        seq, allowed = extend_allowed(inputs.extend_prefix_lens, inputs.extend_seq_lens, **sizes)
    elif name == "DECODE":
        seq, allowed = decode_allowed(inputs.seq_lens, **sizes)
    elif name == "TARGET_VERIFY":
        seq, allowed = target_verify_allowed(inputs.seq_lens, inputs.custom_mask,
                                             draft_token_num=draft_token_num, **sizes)
    else:  # IDLE: no tokens
        seq, allowed = jnp.zeros((0,), jnp.int32), jnp.zeros((0, num_cols), bool)
    return inputs.req_to_token[inputs.req_pool_indices[seq]], allowed


# ---------------------------------------------------------------------------------------------
# Attention.
# ---------------------------------------------------------------------------------------------


def project_qkv(h, positions, wq, wk, wv, *, cfg: ModelConfig):
    """Attention part 1: q, k, v ``[T, N, D]``, with q and k rotated."""
    shape = (h.shape[0], cfg.num_heads, cfg.head_dim)
    q, k, v = (h @ wq).reshape(shape), (h @ wk).reshape(shape), (h @ wv).reshape(shape)
    return rope(q, positions, theta=cfg.rope_theta), rope(k, positions, theta=cfg.rope_theta), v


def attend(q, k_pool_layer, v_pool_layer, table_rows, allowed):
    """Attention part 2 (the core) over one layer's pool, read through the table.

    q: [T, N, D]; pools: [P, N, D]; table_rows, allowed: [T, L]. Returns [T, N, D].
    Scores and softmax run in at least float32; disallowed columns get -inf, and every valid
    row has at least one allowed column (its own token).
    """
    softmax_dtype = jnp.promote_types(q.dtype, jnp.float32)
    keys = k_pool_layer[table_rows].astype(softmax_dtype)  # [T, L, N, D]
    values = v_pool_layer[table_rows].astype(softmax_dtype)  # [T, L, N, D]
    scores = jnp.einsum("tnd,tlnd->tnl", q.astype(softmax_dtype), keys) / np.sqrt(q.shape[-1])
    scores = jnp.where(allowed[:, None, :], scores, -jnp.inf)  # [T, N, L]
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("tnl,tlnd->tnd", probs, values).astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# MoE: routing, dispatch, experts, combine.
# ---------------------------------------------------------------------------------------------


def select_experts(router_logits, num_token_non_padded, *, cfg: ModelConfig):
    """``(topk_w [T, K], topk_ids [T, K] int32)``; rows ``t >= num_token_non_padded`` get -1, 0.

    ``jax.lax.top_k`` breaks ties towards the lower index, as the spec asks.
    """
    if cfg.scoring == "softmax":
        scores = jax.nn.softmax(router_logits, axis=-1)
    else:
        scores = jax.nn.sigmoid(router_logits)
    topk_w, topk_ids = jax.lax.top_k(scores, cfg.top_k)  # [T, K]
    topk_w = topk_w / jnp.sum(topk_w, axis=-1, keepdims=True)
    real = (jnp.arange(router_logits.shape[0]) < num_token_non_padded)[:, None]  # [T, 1]
    return jnp.where(real, topk_w, 0), jnp.where(real, topk_ids, -1).astype(jnp.int32)


def expert_load(topk_ids, *, num_experts):
    """``[E]`` int32: how many (token, k) pairs go to each expert; id -1 counts nowhere."""
    return jnp.sum(topk_ids.reshape(-1)[:, None] == jnp.arange(num_experts), axis=0,
                   dtype=jnp.int32)


@functools.partial(jax.tree_util.register_dataclass, meta_fields=[],
                   data_fields=["tokens", "expert_ids", "pair_index"])
@dataclasses.dataclass(frozen=True)
class Dispatched:
    """The expert-major buffer: pair ``p`` of it is the flat (token, k) pair ``pair_index[p]``."""

    tokens: jax.Array  # [TK, H]  hidden state of each pair's token
    expert_ids: jax.Array  # [TK]  non-decreasing, -1 (padding) pairs last
    pair_index: jax.Array  # [TK]  flat index t*K + k of each pair


def dispatch(h, topk_ids, *, num_experts) -> Dispatched:
    """Order the ``T*K`` pairs by expert id, stably (token order within an expert).

    Id -1 sorts as ``num_experts`` so padding pairs go last; a stable argsort is a fixed-size
    permutation, so nothing here depends on the data's shape.
    """
    flat_ids = topk_ids.reshape(-1)  # [TK]
    order = jnp.argsort(jnp.where(flat_ids < 0, num_experts, flat_ids), stable=True)  # [TK]
    top_k = topk_ids.shape[1]
    return Dispatched(tokens=h[order // top_k], expert_ids=flat_ids[order], pair_index=order)


def swiglu(x, gate, up, down):
    """``(silu(x @ gate) * (x @ up)) @ down``; works per pair with batched weights too."""
    return jnp.einsum("...i,...ih->...h",
                      jax.nn.silu(jnp.einsum("...h,...hi->...i", x, gate))
                      * jnp.einsum("...h,...hi->...i", x, up), down)


def routed_experts(buffer: Dispatched, gate, up, down):
    """``[TK, H]``: each pair through its expert (weights gathered per pair); -1 pairs give 0."""
    valid = buffer.expert_ids >= 0  # [TK]
    e = jnp.where(valid, buffer.expert_ids, 0)
    out = swiglu(buffer.tokens, gate[e], up[e], down[e])  # [TK, H] from [TK, H, I] weights
    return jnp.where(valid[:, None], out, 0)


def combine(expert_out, pair_index, topk_w):
    """Scatter each pair's weighted output back to its token and sum: ``[T, H]``."""
    num_tokens, top_k = topk_w.shape
    weighted = expert_out * topk_w.reshape(-1)[pair_index][:, None]  # [TK, H]
    return jnp.zeros((num_tokens, expert_out.shape[1]), expert_out.dtype).at[
        pair_index // top_k].add(weighted)


def shared_experts(h, gate, up, down):
    """Sum of the shared SwiGLU experts ``[X, ...]`` over ``X`` (zeros when ``X == 0``)."""
    return sum((swiglu(h, gate[j], up[j], down[j]) for j in range(gate.shape[0])),
               jnp.zeros_like(h))


# ---------------------------------------------------------------------------------------------
# Validation and the forward pass.
# ---------------------------------------------------------------------------------------------


def _concrete(x):
    """``x`` as numpy when its value is known now (not under jit), else None."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_inputs(inputs: ModelInputs, k_pool, v_pool, *, cfg, mode, draft_token_num=None):
    """Raise ``ValueError`` naming the argument on inconsistent shapes or (when concrete) values."""
    name, tnps = mode_name(mode), token_num_per_seq(mode, draft_token_num)
    num_tokens, num_seqs = _check_rank("input_ids", inputs.input_ids, 1), \
        _check_rank("seq_lens", inputs.seq_lens, 1)
    for field in ("positions", "out_cache_loc"):
        if jnp.shape(getattr(inputs, field)) != (num_tokens,):
            raise ValueError(f"{field} must have shape [{num_tokens}] like input_ids")
    if jnp.shape(inputs.req_pool_indices) != (num_seqs,):
        raise ValueError(f"req_pool_indices must have shape [{num_seqs}] like seq_lens")
    _check_rank("req_to_token", inputs.req_to_token, 2)
    pool_shape = (cfg.num_layers, None, cfg.num_heads, cfg.head_dim)
    for field, pool in (("k_pool", k_pool), ("v_pool", v_pool)):
        shape = jnp.shape(pool)
        if len(shape) != 4 or any(w is not None and w != s for w, s in zip(pool_shape, shape)):
            raise ValueError(f"{field} must have shape [num_layers, P, N, D], got {shape}")
    if name == "EXTEND":
        for field in ("extend_prefix_lens", "extend_seq_lens"):
            if getattr(inputs, field) is None or jnp.shape(getattr(inputs, field)) != (num_seqs,):
                raise ValueError(f"{field} must be given with shape [{num_seqs}] in EXTEND")
        lens = _concrete(inputs.extend_seq_lens)
        if lens is not None and (lens.sum() != num_tokens or (lens < 1).any()):
            raise ValueError(f"extend_seq_lens must be >= 1 and sum to {num_tokens} tokens")
    elif name == "IDLE" and (num_tokens or num_seqs):
        raise ValueError(f"input_ids must be empty in IDLE, got {num_tokens} tokens")
    elif name != "IDLE" and num_tokens != num_seqs * tnps:
        raise ValueError(f"input_ids must hold {tnps} tokens per sequence in {name}: "
                         f"{num_seqs} sequences but {num_tokens} tokens")
    if name == "TARGET_VERIFY":
        if inputs.custom_mask is None or jnp.ndim(inputs.custom_mask) != 1:
            raise ValueError("custom_mask must be given, flattened to 1-D, in TARGET_VERIFY")
        lens = _concrete(inputs.seq_lens)
        expected = None if lens is None else int(((lens + tnps) * tnps).sum())
        if expected is not None and jnp.shape(inputs.custom_mask)[0] != expected:
            raise ValueError(f"custom_mask must have sum((seq_lens + d) * d) = {expected} "
                             f"entries, got {jnp.shape(inputs.custom_mask)[0]}")


def _check_rank(field, x, rank):
    if jnp.ndim(x) != rank:
        raise ValueError(f"{field} must be {rank}-D, got shape {jnp.shape(x)}")
    return jnp.shape(x)[0]


def forward(weights, inputs: ModelInputs, k_pool, v_pool, *, cfg: ModelConfig, mode,
            draft_token_num=None, dtype=jnp.float32) -> ForwardOutput:
    """The plain (un-split) forward pass of docs/model.md.

    jit-able with ``cfg``, ``mode``, ``draft_token_num`` and ``dtype`` static. The pools are
    ``[num_layers, P, N, D]``; the returned ones hold this pass's KV writes. Shapes are always
    checked; values (extend lens summing to T, the mask's length) only when concrete, i.e.
    not under jit.
    """
    # Imported here because reference.operations builds its operations from this module's
    # math; forward is the one place this module needs the executor.
    from reference import operations

    inputs = normalize_inputs(inputs)
    check_inputs(inputs, k_pool, v_pool, cfg=cfg, mode=mode, draft_token_num=draft_token_num)
    ops, _ = operations.model_operations(cfg, weights, mode, draft_token_num=draft_token_num,
                                         dtype=dtype)
    pools = operations.KVPools(k=jnp.asarray(k_pool), v=jnp.asarray(v_pool))
    state = operations.initial_state(inputs, pools)
    operations.execute_operations(state, ops)
    return operations.output_of([state], pools)
