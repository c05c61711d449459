"""The reference MoE model in JAX: the math of ``docs/model.md`` as small pure functions.

The layer is written once, as a flat list of named operations with yield points
(``model_operations``); ``forward`` runs that list in order, and ``reference.operations``
steps two micro-batches through the same list (two-batch overlap). This module holds the
inputs and their validation, norms, rotary, the attention mask of each mode, attention over
the paged KV cache, the operations vocabulary (``Operation``, ``YieldOperation``, ``State``,
``KVPools``) and the plain forward; routing, dispatch/combine and the experts are in
``reference.moe``.

Imports flow one way: ``reference.moe`` <- ``reference.model`` <- ``reference.operations``
(``parity_tests/test_tbo_structure.py`` checks that the import graph has no cycle).

Shape letters (docs/spec.md, "Shape letters"): ``T`` tokens, ``B`` sequences, ``H`` hidden,
``Q`` heads, ``D`` head dim, ``E`` routed experts, ``K`` top-k, ``V`` vocabulary, ``R`` rows
and ``W`` columns of ``req_to_token``, ``P`` KV-pool slots, ``F`` flattened custom-mask
entries.

Everything is shape-static: padding rows are marked by ``num_token_non_padded`` and routed
nowhere (``reference.moe``). Padding rows still compute attention (their outputs are
meaningless but finite for valid inputs) and never change a real row.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tbo_parity.reference import moe
from tbo_parity.reference.weights import ModelConfig

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
    req_pool_indices: jax.Array  # [B] int32, row of req_to_token per sequence
    seq_lens: jax.Array  # [B] int32
    extend_prefix_lens: Optional[jax.Array] = None  # [B] int32, EXTEND only
    extend_seq_lens: Optional[jax.Array] = None  # [B] int32, EXTEND only
    custom_mask: Optional[jax.Array] = None  # [F] bool, TARGET_VERIFY only (docs/spec.md, Children)
    req_to_token: jax.Array  # [R, W] int32
    num_token_non_padded: Optional[jax.Array] = None  # int32 scalar; None means T


@functools.partial(jax.tree_util.register_dataclass, meta_fields=[],
                   data_fields=["hidden", "logits", "k_pool", "v_pool", "expert_load"])
@dataclasses.dataclass(frozen=True)
class ForwardOutput:
    hidden: jax.Array  # [T, H]  final-norm hidden states
    logits: jax.Array  # [T, V]
    k_pool: jax.Array  # [num_layers, P, Q, D]  after the pass's writes
    v_pool: jax.Array  # [num_layers, P, Q, D]
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
    """NeoX rotary (rotate halves). x: [T, Q, D]; positions: [T].

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
# Each returns (seq_of_token [T], allowed [T, W]).
# ---------------------------------------------------------------------------------------------


def _exclusive_cumsum(x):
    return jnp.cumsum(x) - x


def extend_allowed(extend_prefix_lens, extend_seq_lens, *, num_tokens, num_cols):
    """Token ``t``, the ``o``-th new token of ``s``, sees ``j <= extend_prefix_lens[s] + o``.

    Tokens lie sequence after sequence, so ``s`` is where ``t`` falls among the running sums.
    """
    t = jnp.arange(num_tokens)
    ends = jnp.cumsum(extend_seq_lens)  # [B]
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
    width = seq_lens + d  # [B]: columns of each block
    block_start = _exclusive_cumsum(width * d)  # [B]
    j = jnp.arange(num_cols)[None, :]  # [1, W]
    flat = block_start[seq][:, None] + r[:, None] * width[seq][:, None] + j  # [T, W]
    in_block = j < width[seq][:, None]
    return seq, in_block & custom_mask[jnp.clip(flat, 0, custom_mask.shape[0] - 1)]


def attention_layout(inputs: ModelInputs, *, mode, draft_token_num=None):
    """``(table_rows [T, W], allowed [T, W])``: each token's table row and visible columns."""
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
    """The projections of ``attn_qkv``: q, k, v ``[T, Q, D]``, with q and k rotated."""
    shape = (h.shape[0], cfg.num_heads, cfg.head_dim)
    q, k, v = (h @ wq).reshape(shape), (h @ wk).reshape(shape), (h @ wv).reshape(shape)
    return rope(q, positions, theta=cfg.rope_theta), rope(k, positions, theta=cfg.rope_theta), v


def attend(q, k_pool_layer, v_pool_layer, table_rows, allowed):
    """The read of ``attn_core``: attention over one layer's pool, through the table.

    q: [T, Q, D]; pools: [P, Q, D]; table_rows, allowed: [T, W]. Returns [T, Q, D].
    Scores and softmax run in at least float32; disallowed columns get -inf, and every valid
    row has at least one allowed column (its own token).
    """
    softmax_dtype = jnp.promote_types(q.dtype, jnp.float32)
    keys = k_pool_layer[table_rows].astype(softmax_dtype)  # [T, W, Q, D]
    values = v_pool_layer[table_rows].astype(softmax_dtype)  # [T, W, Q, D]
    scores = jnp.einsum("tnd,tlnd->tnl", q.astype(softmax_dtype), keys) / np.sqrt(q.shape[-1])
    scores = jnp.where(allowed[:, None, :], scores, -jnp.inf)  # [T, Q, W]
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("tnl,tlnd->tnd", probs, values).astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# Validation.
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




# ---------------------------------------------------------------------------------------------
# Operations: the vocabulary the layer is written in (reference.operations overlaps them).
# ---------------------------------------------------------------------------------------------


class YieldOperation:
    """Marker between stages: here the other micro-batch gets to run."""

    def __repr__(self):
        return "|"


@dataclasses.dataclass(frozen=True)
class Operation:
    """A named ``fn(state) -> None``; the name shows up in schedules and profiler scopes."""

    name: str
    fn: Callable

    def __call__(self, state):
        self.fn(state)

    def __repr__(self):
        return self.name


class State:
    """Values one micro-batch passes from operation to operation, read and set as attributes
    (``s.q = q``, ``s.q``), the same interface as ``torch_impl.operations.State``.

    Setting a name that is already set raises: an operation that replaces a value must
    ``pop`` it first, so no value is overwritten by accident (e.g. by the other micro-batch's
    operation writing into the wrong state). The store is plain Python around immutable jax
    arrays: the operations stay pure functions of the values they read, and jit traces them.
    """

    def __init__(self, **values):
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name):
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"state has no {name!r}; it holds {sorted(self._values)}")

    def __setattr__(self, name, value):
        if name in self._values:
            raise KeyError(f"state already holds {name!r}; pop it before setting it again")
        self._values[name] = value

    def __contains__(self, name):
        return name in self._values

    def pop(self, name):
        return self._values.pop(name)

    def keys(self):
        return self._values.keys()


@dataclasses.dataclass
class KVPools:
    """The shared, mutable holder of ``k``/``v`` ``[num_layers, P, N, D]`` (functional updates)."""

    k: jax.Array
    v: jax.Array

    def write(self, layer, slots, k, v):
        self.k = self.k.at[layer, slots].set(k.astype(self.k.dtype))
        self.v = self.v.at[layer, slots].set(v.astype(self.v.dtype))


def execute_operations(state: State, operations: Sequence) -> State:
    """The plain path: every operation in order; yields do nothing."""
    for op in operations:
        if not isinstance(op, YieldOperation):
            op(state)
    return state


# ---------------------------------------------------------------------------------------------
# The model as operations.
# ---------------------------------------------------------------------------------------------

DELTA_STAGES = {"EXTEND": 0, "DECODE": 2, "TARGET_VERIFY": 2, "IDLE": 2}


def initial_state(inputs: ModelInputs, pools: KVPools) -> State:
    """A micro-batch's starting state: its inputs, the shared pools and no expert loads yet."""
    return State(inputs=inputs, pools=pools, expert_loads=())


def _model_edges(cfg, w, mode, draft_token_num):
    """The operations before the first layer and after the last."""
    def embed(s):
        inputs = s.inputs
        s.table_rows, s.allowed = attention_layout(  # [T, W] each
            inputs, mode=mode, draft_token_num=draft_token_num)
        s.hidden_states = w["embed"][inputs.input_ids]  # [T, H]
        s.residual = None

    def final(s):
        h = rmsnorm(s.pop("hidden_states") + s.pop("residual"), w["final_norm"],
                    eps=cfg.rms_eps)
        s.final_hidden = h
        s.logits = h @ w["lm_head"]  # [T, V]
        s.expert_load = jnp.stack(s.pop("expert_loads"))  # [layers, E]

    return Operation("embed", embed), Operation("final", final)


def _layer_operations(cfg: ModelConfig, w: dict, layer: int) -> dict[str, Operation]:
    """One layer's operations by name, in execution order (the yields are placed by the caller):
    the attention half, then the MoE half.

    The names are ``torch_impl.model.MoEDecoderLayer``'s ``op_*`` methods without ``op_``, and
    each does the same work (``parity_tests/test_layout_names.py`` keeps them equal).
    """
    fns = _attention_operations(cfg, w, layer) + _moe_operations(cfg, w, layer)
    return {fn.__name__: Operation(f"l{layer}.{fn.__name__}", fn) for fn in fns}


def _attention_operations(cfg: ModelConfig, w: dict, layer: int) -> list:
    """The attention half of a layer: norm, projections, the cache write and attention."""
    p = f"layers.{layer}."
    eps = cfg.rms_eps

    def attn_input_prep(s):  # fused residual add + RMSNorm
        h, residual = s.pop("hidden_states"), s.pop("residual")
        residual = h if residual is None else h + residual
        s.residual = residual
        s.attn_input = rmsnorm(residual, w[p + "attn_norm"], eps=eps)

    def attn_qkv(s):  # q/k/v projections and rotary; touches nothing shared
        s.q, s.k, s.v = project_qkv(s.pop("attn_input"), s.inputs.positions, w[p + "wq"],
                                    w[p + "wk"], w[p + "wv"], cfg=cfg)  # [T, Q, D] each

    def attn_core(s):  # write this layer's k, v into the cache, then read through the table
        pools = s.pools
        pools.write(layer, s.inputs.out_cache_loc, s.pop("k"), s.pop("v"))
        o = attend(s.pop("q"), pools.k[layer], pools.v[layer], s.table_rows,
                   s.allowed)  # [T, Q, D]
        s.hidden_states = o.reshape(o.shape[0], cfg.num_heads * cfg.head_dim) @ w[p + "wo"]

    return [attn_input_prep, attn_qkv, attn_core]


def _moe_operations(cfg: ModelConfig, w: dict, layer: int) -> list:
    """The MoE half of a layer: norm, routing, dispatch, experts, combine and the output."""
    p = f"layers.{layer}."
    eps = cfg.rms_eps

    def mlp_input_prep(s):  # fused residual add + RMSNorm
        residual = s.pop("hidden_states") + s.pop("residual")
        s.residual = residual
        s.mlp_input = rmsnorm(residual, w[p + "mlp_norm"], eps=eps)

    def router_gate(s):
        s.router_logits = s.mlp_input @ w[p + "router"]  # [T, E]

    def select_experts(s):
        s.topk_weights, s.topk_ids = moe.select_experts(
            s.pop("router_logits"), s.inputs.num_token_non_padded, cfg=cfg,
            correction_bias=w.get(p + "e_score_correction_bias"))  # group-limited routing only
        s.expert_loads = s.pop("expert_loads") + (  # one [E] entry per layer, in order
            moe.expert_load(s.topk_ids, num_experts=cfg.num_experts),)

    # On one device a "launch" does the local permutation and a "wait" hands it over; across
    # devices these become the two halves of an all-to-all.
    def dispatch_launch(s):
        s.dispatch_handle = moe.dispatch(s.mlp_input, s.pop("topk_ids"),
                                         num_experts=cfg.num_experts)

    def dispatch_wait(s):
        s.dispatched = s.pop("dispatch_handle")

    def routed_experts(s):
        s.expert_out = moe.routed_experts(s.dispatched, w[p + "experts_gate"],
                                          w[p + "experts_up"], w[p + "experts_down"])  # [T*K, H]

    def combine_launch(s):
        s.combine_handle = moe.combine(s.pop("expert_out"), s.pop("dispatched").pair_index,
                                       s.pop("topk_weights"))

    def combine_wait(s):
        s.routed_out = s.pop("combine_handle")

    def shared_experts(s):
        s.shared_out = moe.shared_experts(s.pop("mlp_input"), w[p + "shared_gate"],
                                          w[p + "shared_up"], w[p + "shared_down"])

    def layer_output(s):  # routed + shared: the layer's hidden states (the residual waits)
        s.hidden_states = s.pop("routed_out") + s.pop("shared_out")

    return [mlp_input_prep, router_gate, select_experts, dispatch_launch, dispatch_wait,
            routed_experts, combine_launch, combine_wait, shared_experts, layer_output]


# The two published layouts (docs/spec.md, "Overlapped execution"), as names of the operations
# above, "|" a yield; torch_impl.model.LAYOUTS is the same text, kept equal by
# parity_tests/test_layout_names.py.
LAYOUTS = {
    "prefill": ("attn_input_prep attn_qkv attn_core mlp_input_prep router_gate select_experts "
                "dispatch_launch | dispatch_wait routed_experts combine_launch | "
                "shared_experts combine_wait layer_output"),
    "decode": ("attn_input_prep attn_qkv | attn_core mlp_input_prep router_gate select_experts | "
               "dispatch_launch shared_experts | dispatch_wait routed_experts combine_launch | "
               "combine_wait layer_output |"),
}


def strategy_for(mode) -> str:
    """The layout a mode runs: EXTEND ``"prefill"``; DECODE, TARGET_VERIFY and IDLE (which has
    no tokens) ``"decode"``."""
    return "prefill" if mode_name(mode) == "EXTEND" else "decode"


def model_operations(cfg: ModelConfig, weights, mode, *, draft_token_num=None,
                     dtype=jnp.float32):
    """``(operations, delta_stages)`` of the whole model for ``mode``.

    EXTEND uses the prefill layout (``delta_stages = 0``); DECODE, TARGET_VERIFY (and IDLE,
    which has no tokens) the decode layout (``delta_stages = 2``). Layers chain: the last
    stage of one layer and the first of the next follow each other in the same list.
    """
    name = mode_name(mode)
    token_num_per_seq(name, draft_token_num)  # validates draft_token_num
    w = {k: jnp.asarray(v, dtype) for k, v in weights.items()}
    layout = LAYOUTS[strategy_for(name)]
    embed, final = _model_edges(cfg, w, name, draft_token_num)
    ops = [embed]
    for layer in range(cfg.num_layers):
        by_name = _layer_operations(cfg, w, layer)
        ops += [YieldOperation() if word == "|" else by_name[word] for word in layout.split()]
    return ops + [final], DELTA_STAGES[name]


def output_of(states: Sequence[State], pools: KVPools) -> ForwardOutput:
    """Concatenate the micro-batches' outputs in token order; sum their expert loads."""
    return ForwardOutput(
        hidden=jnp.concatenate([s.final_hidden for s in states]),
        logits=jnp.concatenate([s.logits for s in states]),
        k_pool=pools.k, v_pool=pools.v,
        expert_load=sum(s.expert_load for s in states))


# ---------------------------------------------------------------------------------------------
# The plain forward pass.
# ---------------------------------------------------------------------------------------------


def forward(weights, inputs: ModelInputs, k_pool, v_pool, *, cfg: ModelConfig, mode,
            draft_token_num=None, dtype=jnp.float32) -> ForwardOutput:
    """The plain (un-split) forward pass of docs/model.md: the model's operations in order.

    jit-able with ``cfg``, ``mode``, ``draft_token_num`` and ``dtype`` static. The pools are
    ``[num_layers, P, N, D]``; the returned ones hold this pass's KV writes. Shapes are always
    checked; values (extend lens summing to T, the mask's length) only when concrete, i.e.
    not under jit. ``reference.operations.forward_tbo`` runs the same operations as two
    overlapped micro-batches.
    """
    inputs = normalize_inputs(inputs)
    check_inputs(inputs, k_pool, v_pool, cfg=cfg, mode=mode, draft_token_num=draft_token_num)
    ops, _ = model_operations(cfg, weights, mode, draft_token_num=draft_token_num, dtype=dtype)
    pools = KVPools(k=jnp.asarray(k_pool), v=jnp.asarray(v_pool))
    state = execute_operations(initial_state(inputs, pools), ops)
    return output_of([state], pools)
