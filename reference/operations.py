"""Operations with yield points, and two-batch overlap (TBO) of the reference model.

A layer is a flat list of operations separated by ``YieldOperation`` markers; a *stage* is the
run of operations between two yields. The plain path runs the list in order, ignoring yields;
the overlapped path steps two micro-batches through the same list with a stage offset. The
schedule is data (``stage_schedule``): read it to see which stage overlaps which.

State: each micro-batch has a ``State`` (a name -> value store) that refuses silent
overwrites: ``state.set(name, v)`` raises if ``name`` is present; an operation that replaces a
value first consumes it with ``state.pop(name)``; ``state.get(name)`` reads without consuming.
The KV pools are the one thing both micro-batches share (both write the same pool, and in the
two-chunk split B reads what A wrote in the same layer): a ``KVPools`` holder that every
micro-batch's state references and that operations update functionally.

Shape letters as in ``reference.model``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from reference import model as M
from reference.weights import ModelConfig


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
    """Per-micro-batch values by name; a value is never overwritten without being popped."""

    def __init__(self, **values):
        self._values = {}
        for name, value in values.items():
            self.set(name, value)

    def set(self, name: str, value) -> None:
        if name in self._values:
            raise ValueError(f"name {name!r} is already in the state; pop it before setting it")
        self._values[name] = value

    def get(self, name: str):
        return self._values[name]

    def pop(self, name: str):
        return self._values.pop(name)

    def __contains__(self, name):
        return name in self._values


@dataclasses.dataclass
class KVPools:
    """The shared, mutable holder of ``k``/``v`` ``[num_layers, P, N, D]`` (functional updates)."""

    k: jax.Array
    v: jax.Array

    def write(self, layer, slots, k, v):
        self.k = self.k.at[layer, slots].set(k.astype(self.k.dtype))
        self.v = self.v.at[layer, slots].set(v.astype(self.v.dtype))


# ---------------------------------------------------------------------------------------------
# The executor.
# ---------------------------------------------------------------------------------------------


def split_stages(operations: Sequence) -> list[list]:
    """Cut the list at the yields. A trailing yield ends the last stage (no empty stage)."""
    stages, current = [], []
    for op in operations:
        if isinstance(op, YieldOperation):
            stages.append(current)
            current = []
        else:
            current.append(op)
    if current:
        stages.append(current)
    if any(not stage for stage in stages):
        raise ValueError("operations must not contain an empty stage (a leading or double yield)")
    return stages


def stage_schedule(num_stages: int, delta_stages: int) -> list[tuple[str, int]]:
    """The overlapped order of stages, as ``("a" | "b", stage index)`` pairs.

    A runs ``delta_stages`` stages alone, then A's stage ``i + delta`` and B's stage ``i``
    alternate, then B runs its last ``delta_stages`` stages alone.
    """
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 0:
        raise ValueError(f"num_stages must be an int >= 0, got {num_stages!r}")
    if isinstance(delta_stages, bool) or not isinstance(delta_stages, int) \
            or not 0 <= delta_stages <= num_stages:
        raise ValueError(f"delta_stages must be an int in [0, {num_stages}], got {delta_stages!r}")
    head = [("a", i) for i in range(delta_stages)]
    body = [step for i in range(num_stages - delta_stages)
            for step in (("a", i + delta_stages), ("b", i))]
    tail = [("b", i) for i in range(num_stages - delta_stages, num_stages)]
    return head + body + tail


def execute_operations(state: State, operations: Sequence) -> State:
    """The plain path: every operation in order; yields do nothing."""
    for op in operations:
        if not isinstance(op, YieldOperation):
            op(state)
    return state


def execute_overlapped_operations(states: Sequence[State], operations_arr: Sequence[Sequence],
                                  delta_stages: int) -> Sequence[State]:
    """Step micro-batches A and B (``states[0]``, ``states[1]``) by ``stage_schedule``.

    Each stage runs inside a ``jax.named_scope`` called ``a0``, ``b3``, ... so a profile shows
    the interleaving.
    """
    if len(states) != 2 or len(operations_arr) != 2:
        raise ValueError("states and operations_arr must each hold two micro-batches")
    stages = [split_stages(ops) for ops in operations_arr]
    if len(stages[0]) != len(stages[1]):
        raise ValueError(f"operations_arr must have the same number of stages in both lists, "
                         f"got {len(stages[0])} and {len(stages[1])}")
    for who, i in stage_schedule(len(stages[0]), delta_stages):
        k = "ab".index(who)
        with jax.named_scope(f"{who}{i}"):
            execute_operations(states[k], stages[k][i])
    return states


# ---------------------------------------------------------------------------------------------
# The model as operations.
# ---------------------------------------------------------------------------------------------

DELTA_STAGES = {"EXTEND": 0, "DECODE": 2, "TARGET_VERIFY": 2, "IDLE": 2}


def initial_state(inputs: M.ModelInputs, pools: KVPools) -> State:
    """A micro-batch's starting state: its inputs and the shared pools."""
    return State(inputs=inputs, pools=pools)


def _model_edges(cfg, w, mode, draft_token_num):
    """The operations before the first layer and after the last."""
    def embed(s):
        inputs = s.get("inputs")
        table_rows, allowed = M.attention_layout(inputs, mode=mode,
                                                 draft_token_num=draft_token_num)
        s.set("table_rows", table_rows)  # [T, L]
        s.set("allowed", allowed)  # [T, L]
        s.set("hidden", w["embed"][inputs.input_ids])  # [T, H]
        s.set("residual", None)

    def final(s):
        h = M.rmsnorm(s.pop("hidden") + s.pop("residual"), w["final_norm"], eps=cfg.rms_eps)
        s.set("final_hidden", h)
        s.set("logits", h @ w["lm_head"])  # [T, V]
        s.set("expert_load", jnp.stack([s.pop(f"expert_load.{l}")
                                        for l in range(cfg.num_layers)]))  # [layers, E]

    return Operation("embed", embed), Operation("final", final)


def _layer_operations(cfg: ModelConfig, w: dict, layer: int) -> dict[str, Operation]:
    """One layer's operations by name, in execution order (the yields are placed by the caller)."""
    p = f"layers.{layer}."
    eps = cfg.rms_eps

    def attn_input_prep(s):
        h, residual = s.pop("hidden"), s.pop("residual")
        residual = h if residual is None else h + residual
        s.set("residual", residual)
        s.set("attn_in", M.rmsnorm(residual, w[p + "attn_norm"], eps=eps))

    def attn_part1(s):  # projections, rotary, KV write (the write precedes every read)
        inputs = s.get("inputs")
        q, k, v = M.project_qkv(s.pop("attn_in"), inputs.positions, w[p + "wq"], w[p + "wk"],
                                w[p + "wv"], cfg=cfg)
        s.get("pools").write(layer, inputs.out_cache_loc, k, v)
        s.set("q", q)  # [T, N, D]

    def attn_part2(s):  # the core: read through the table
        pools = s.get("pools")
        o = M.attend(s.pop("q"), pools.k[layer], pools.v[layer], s.get("table_rows"),
                     s.get("allowed"))  # [T, N, D]
        s.set("attn_out", o.reshape(o.shape[0], cfg.num_heads * cfg.head_dim) @ w[p + "wo"])

    def mlp_input_prep(s):
        residual = s.pop("attn_out") + s.pop("residual")
        s.set("residual", residual)
        s.set("mlp_in", M.rmsnorm(residual, w[p + "mlp_norm"], eps=eps))

    def router_gate(s):
        s.set("router_logits", s.get("mlp_in") @ w[p + "router"])  # [T, E]

    def select_experts(s):
        topk_w, topk_ids = M.select_experts(
            s.pop("router_logits"), s.get("inputs").num_token_non_padded, cfg=cfg)
        s.set("topk_w", topk_w)
        s.set("topk_ids", topk_ids)
        s.set(f"expert_load.{layer}", M.expert_load(topk_ids, num_experts=cfg.num_experts))

    # On one device a "launch" does the local permutation and a "wait" hands it over; across
    # devices these become the two halves of an all-to-all.
    def dispatch_launch(s):
        s.set("dispatch_handle", M.dispatch(s.get("mlp_in"), s.pop("topk_ids"),
                                            num_experts=cfg.num_experts))

    def dispatch_wait(s):
        s.set("dispatched", s.pop("dispatch_handle"))

    def routed_experts(s):
        buffer = s.pop("dispatched")
        out = M.routed_experts(buffer, w[p + "experts_gate"], w[p + "experts_up"],
                               w[p + "experts_down"])  # [TK, H]
        s.set("expert_out", (out, buffer.pair_index))

    def combine_launch(s):
        out, pair_index = s.pop("expert_out")
        s.set("combine_handle", M.combine(out, pair_index, s.pop("topk_w")))

    def combine_wait(s):
        s.set("routed_out", s.pop("combine_handle"))

    def shared_expert(s):
        s.set("shared_out", M.shared_experts(s.pop("mlp_in"), w[p + "shared_gate"],
                                             w[p + "shared_up"], w[p + "shared_down"]))

    def output(s):
        s.set("moe_out", s.pop("routed_out") + s.pop("shared_out"))

    def post_process(s):  # where a multi-device layout would re-scatter the residual stream
        s.set("hidden", s.pop("moe_out"))

    fns = [attn_input_prep, attn_part1, attn_part2, mlp_input_prep, router_gate, select_experts,
           dispatch_launch, dispatch_wait, routed_experts, combine_launch, combine_wait,
           shared_expert, output, post_process]
    return {fn.__name__: Operation(f"l{layer}.{fn.__name__}", fn) for fn in fns}


# The two published layouts ("|" is a yield), as names of the operations above.
PREFILL_LAYOUT = ("attn_input_prep attn_part1 attn_part2 mlp_input_prep router_gate "
                  "select_experts dispatch_launch | dispatch_wait routed_experts combine_launch "
                  "| shared_expert combine_wait output post_process")
DECODE_LAYOUT = ("attn_input_prep attn_part1 | attn_part2 mlp_input_prep router_gate "
                 "select_experts | dispatch_launch shared_expert | dispatch_wait routed_experts "
                 "combine_launch | combine_wait output post_process |")


def model_operations(cfg: ModelConfig, weights, mode, *, draft_token_num=None,
                     dtype=jnp.float32):
    """``(operations, delta_stages)`` of the whole model for ``mode``.

    EXTEND uses the prefill layout (``delta_stages = 0``); DECODE, TARGET_VERIFY (and IDLE,
    which has no tokens) the decode layout (``delta_stages = 2``). Layers chain: the last
    stage of one layer and the first of the next follow each other in the same list.
    """
    name = M.mode_name(mode)
    M.token_num_per_seq(name, draft_token_num)  # validates draft_token_num
    w = {k: jnp.asarray(v, dtype) for k, v in weights.items()}
    layout = PREFILL_LAYOUT if name == "EXTEND" else DECODE_LAYOUT
    embed, final = _model_edges(cfg, w, name, draft_token_num)
    ops = [embed]
    for layer in range(cfg.num_layers):
        by_name = _layer_operations(cfg, w, layer)
        ops += [YieldOperation() if word == "|" else by_name[word] for word in layout.split()]
    return ops + [final], DELTA_STAGES[name]


def output_of(states: Sequence[State], pools: KVPools) -> M.ForwardOutput:
    """Concatenate the micro-batches' outputs in token order; sum their expert loads."""
    return M.ForwardOutput(
        hidden=jnp.concatenate([s.get("final_hidden") for s in states]),
        logits=jnp.concatenate([s.get("logits") for s in states]),
        k_pool=pools.k, v_pool=pools.v,
        expert_load=sum(s.get("expert_load") for s in states))


# ---------------------------------------------------------------------------------------------
# Two-batch overlap.
# ---------------------------------------------------------------------------------------------


def _mask_block_sizes(seq_lens, d):
    """Entries of each sequence's ``d x (seq_len + d)`` custom-mask block."""
    return [(n + d) * d for n in seq_lens]


def child_inputs(inputs: M.ModelInputs, children, *, mode, draft_token_num=None):
    """Each child's ``ModelInputs``: token fields by token range, sequence fields by seq range.

    ``seq_lens`` and the extend lens come from the child (the two-chunk rule re-derives them);
    ``num_token_non_padded`` splits as ``(min(split, n), max(0, n - split))``; in
    TARGET_VERIFY each child's mask is its sequences' blocks (A's are first, then B's).
    """
    name = M.mode_name(mode)
    (a, b), num_tokens = children, inputs.input_ids.shape[0]
    if a.token_range[0] != 0 or a.token_range[1] != b.token_range[0] \
            or b.token_range[1] != num_tokens:
        raise ValueError(f"children must cover tokens [0, {num_tokens}) in order, got "
                         f"{a.token_range} and {b.token_range}")
    split, n = a.token_range[1], inputs.num_token_non_padded
    counts = (jnp.minimum(split, n), jnp.maximum(0, n - split))
    mask_bounds = [0, 0, 0]
    if name == "TARGET_VERIFY":
        if a.seq_range[0] != 0 or a.seq_range[1] != b.seq_range[0]:
            raise ValueError("children must hold sequences [0, s) and [s, S) in TARGET_VERIFY")
        sizes_a = sum(_mask_block_sizes(a.seq_lens, draft_token_num))
        sizes_b = sum(_mask_block_sizes(b.seq_lens, draft_token_num))
        mask_bounds = [0, sizes_a, sizes_a + sizes_b]

    def one(child, count, mask_lo, mask_hi):
        (t0, t1), (s0, s1) = child.token_range, child.seq_range
        if len(child.seq_lens) != s1 - s0:
            raise ValueError(f"children seq_lens must have {s1 - s0} entries, got {child.seq_lens}")
        extend = name == "EXTEND"
        return M.ModelInputs(
            input_ids=inputs.input_ids[t0:t1], positions=inputs.positions[t0:t1],
            out_cache_loc=inputs.out_cache_loc[t0:t1],
            req_pool_indices=inputs.req_pool_indices[s0:s1],
            seq_lens=jnp.asarray(child.seq_lens, jnp.int32),
            extend_prefix_lens=(jnp.asarray(child.extend_prefix_lens, jnp.int32)
                                if extend else None),
            extend_seq_lens=jnp.asarray(child.extend_seq_lens, jnp.int32) if extend else None,
            custom_mask=(inputs.custom_mask[mask_lo:mask_hi]
                         if name == "TARGET_VERIFY" else None),
            req_to_token=inputs.req_to_token, num_token_non_padded=count)

    return (one(a, counts[0], mask_bounds[0], mask_bounds[1]),
            one(b, counts[1], mask_bounds[1], mask_bounds[2]))


def forward_tbo(weights, inputs: M.ModelInputs, k_pool, v_pool, *, cfg: ModelConfig, mode,
                children, draft_token_num=None, dtype=jnp.float32,
                executor=execute_overlapped_operations) -> M.ForwardOutput:
    """The forward pass split into two micro-batches that run overlapped.

    ``children`` is ``(child_a, child_b)`` with ``token_range``, ``seq_range``, ``seq_lens``,
    ``extend_seq_lens`` and ``extend_prefix_lens`` (as ``reference.split.derive_children``
    gives). An empty child (no tokens) is skipped and the other runs alone. ``executor`` is
    injectable so a test can run a wrong schedule.
    """
    inputs = M.normalize_inputs(inputs)
    M.check_inputs(inputs, k_pool, v_pool, cfg=cfg, mode=mode, draft_token_num=draft_token_num)
    if len(children) != 2:
        raise ValueError(f"children must be a pair, got {len(children)}")
    ops, delta = model_operations(cfg, weights, mode, draft_token_num=draft_token_num,
                                  dtype=dtype)
    pools = KVPools(k=jnp.asarray(k_pool), v=jnp.asarray(v_pool))
    kept = [(child, sub) for child, sub in zip(children, child_inputs(
        inputs, children, mode=mode, draft_token_num=draft_token_num))
        if child.token_range[1] > child.token_range[0]]
    states = [initial_state(sub, pools) for _, sub in kept]
    if len(states) == 2:
        executor(states, [ops, ops], delta)
    else:  # one child (or none, IDLE): nothing to overlap with
        states = states or [initial_state(inputs, pools)]
        execute_operations(states[0], ops)
    return output_of(states, pools)
