"""Two-batch overlap (TBO) of the reference model: two micro-batches stepped through the
model's operations with a stage offset.

The model's layer is a flat list of operations separated by ``YieldOperation`` markers
(``reference.model.model_operations``); a *stage* is the run of operations between two yields.
The plain path (``reference.model.forward``) runs the list in order, ignoring yields; the
overlapped path here steps two micro-batches through the same list with a stage offset. The
schedule is data (``stage_schedule``): read it to see which stage overlaps which.

State: each micro-batch has a ``State``, values by name read and set as attributes, with the
interface of ``torch_impl.operations.State``: ``state.q = q`` raises if ``q`` is present; an
operation that replaces a value first consumes it with ``state.pop("q")``; ``state.q`` reads
without consuming. The KV pools are the one thing both micro-batches share (both write the same
pool, and in the two-chunk split B reads what A wrote in the same layer): a ``KVPools`` holder
that every micro-batch's state references and that only ``attn_core`` updates (functionally),
writing its keys and values just before it reads (docs/spec.md, "Overlapped execution").

The operations vocabulary lives in ``reference.model`` (which never imports this module) and is
re-exported here, so ``reference.operations.YieldOperation`` etc. name the same objects.

Shape letters as in ``reference.model``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from tbo_parity.reference import model as M
from tbo_parity.reference import split
from tbo_parity.reference.empty_batch import step_batches
from tbo_parity.reference.model import (DELTA_STAGES, LAYOUTS, KVPools,  # noqa: F401 (re-exported)
                                        Operation, State, YieldOperation, execute_operations,
                                        initial_state, model_operations, output_of, strategy_for)
from tbo_parity.reference.weights import ModelConfig


# ---------------------------------------------------------------------------------------------
# The overlapped executor.
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
# Two-batch overlap.
# ---------------------------------------------------------------------------------------------


def _mask_block_sizes(seq_lens, d):
    """Entries of each sequence's ``d x (seq_len + d)`` custom-mask block."""
    return [(n + d) * d for n in seq_lens]


def child_inputs(inputs: M.ModelInputs, children, *, mode, draft_token_num=None):
    """Each child's ``ModelInputs``: token fields by token range, sequence fields by seq range.

    ``seq_lens`` and the extend lens come from the child (the two-chunk rule re-derives them);
    ``num_token_non_padded`` splits by the spec's rule
    (``reference.split.children_num_token_non_padded``: ``(min(split, n), max(0, n - split))``,
    so padding reaching into A leaves B none real); in TARGET_VERIFY each child's mask is its
    sequences' blocks (A's are first, then B's).
    """
    name = M.mode_name(mode)
    (a, b), num_tokens = children, inputs.input_ids.shape[0]
    if a.token_range[0] != 0 or a.token_range[1] != b.token_range[0] \
            or b.token_range[1] != num_tokens:
        raise ValueError(f"children must cover tokens [0, {num_tokens}) in order, got "
                         f"{a.token_range} and {b.token_range}")
    counts = split.children_num_token_non_padded(a.token_range[1], inputs.num_token_non_padded)
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
    gives). An empty child (no tokens) is skipped and the other runs alone
    (``reference.empty_batch.step_batches``). ``executor`` is injectable so a test can run a
    wrong schedule.
    """
    inputs = M.normalize_inputs(inputs)
    M.check_inputs(inputs, k_pool, v_pool, cfg=cfg, mode=mode, draft_token_num=draft_token_num)
    if len(children) != 2:
        raise ValueError(f"children must be a pair, got {len(children)}")
    ops, delta = model_operations(cfg, weights, mode, draft_token_num=draft_token_num,
                                  dtype=dtype)
    pools = KVPools(k=jnp.asarray(k_pool), v=jnp.asarray(v_pool))
    parts = child_inputs(inputs, children, mode=mode, draft_token_num=draft_token_num)
    states = [initial_state(sub, pools) for sub in step_batches(inputs, parts)]
    if len(states) == 2:
        executor(states, [ops, ops], delta)
    else:  # one child (or the whole IDLE batch): nothing to overlap with
        execute_operations(states[0], ops)
    return output_of(states, pools)
