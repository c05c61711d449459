"""The empty micro-batch: one with no tokens of its own, and what a step does for it.

A (micro-)batch is *empty* when it holds no tokens (``is_empty``): an IDLE batch (a
data-parallel rank with no requests this step), a batch of 0 tokens, or a two-batch-overlap
child whose token range is empty (a split that leaves every token to the other child). This
module is where that is decided; ``model.MoEModel.forward``, ``overlap.model_forward_maybe_tbo``,
the layer's operations and ``expert_parallel`` (``micro_batch_rows``, ``agree_ep_step``) ask it.

What a step does for an empty micro-batch depends on whether the experts are sharded:

* **On one rank** (a local dispatcher) it is skipped. Nothing it would compute is read, and
  nobody waits for it: an empty batch's forward is its 0 rows of hidden states and logits and
  an all-zero expert load; an empty child is left out and the other child runs alone.
* **With expert parallelism** it is *not* skipped. Dispatch and combine are all-to-alls,
  collectives that every rank of the group must enter, the same number of times, in the same
  order, with the same shapes (the step's ``EPStep``). A rank with no tokens that skipped them
  would leave its peers waiting in their all-to-all for ever; and its experts are needed
  anyway, since its peers route tokens to them. So an empty micro-batch runs
  ``EXCHANGE_OPERATIONS`` (the exchanges, and the expert compute between them) on an
  ``empty_state``: it sends zero rows of its own, receives its peers' rows, runs its experts
  on them, sends the results back and keeps nothing. The other operations (attention, norms,
  shared experts, the layer output) are skipped: they would only work on its zero rows. An
  idle rank runs as many empty micro-batches as its peers run micro-batches, on the same
  schedule (``exchange_only``), so its exchanges line up with theirs one for one.

The JAX twin is ``reference/empty_batch.py`` (its model runs on one device: the first case).
"""

from __future__ import annotations

import torch

from tbo_parity.torch_impl.moe import ExpertLoad
from tbo_parity.torch_impl.operations import (State, execute_operations,
                                              execute_overlapped_operations)

# What an empty micro-batch runs under expert parallelism: its part in the exchanges (and the
# expert compute its peers' tokens need); every other operation is skipped.
EXCHANGE_OPERATIONS = ("router_gate", "select_experts", "dispatch_launch", "dispatch_wait",
                       "routed_experts", "combine_launch", "combine_wait")


def is_empty(batch) -> bool:
    """Whether ``batch`` (a ``ForwardBatch``, whole or a TBO child) holds no tokens: IDLE, or
    0 tokens (a child's ``num_tokens`` is the length of its token range)."""
    return batch.forward_mode.is_idle() or batch.num_tokens == 0


def empty_state(hidden_size: int, dtype, device, micro_batch: int, ep_capacity: int) -> State:
    """The state of an empty micro-batch under expert parallelism: ``mlp_input`` of 0 rows (all
    that ``EXCHANGE_OPERATIONS`` read), no ``forward_batch`` (``is_empty_state``), and the
    micro-batch's index (its dispatcher buffers) and the step's capacity, as a real one has."""
    return State(mlp_input=torch.empty(0, hidden_size, dtype=dtype, device=device),
                 expert_load=ExpertLoad(), micro_batch=micro_batch, ep_capacity=ep_capacity,
                 forward_batch=None)


def is_empty_state(state: State) -> bool:
    """Whether ``state`` is an ``empty_state``: it routes no token of its own (0 real tokens)
    and keeps nothing of what the exchanges bring back."""
    return state.forward_batch is None


def exchange_only(operations, delta_stages: int, ep_step, *, hidden_size: int, dtype,
                  device) -> torch.Tensor:
    """An idle rank's step under expert parallelism: ``ep_step.micro_batches`` empty
    micro-batches through ``operations`` (every layer's ``EXCHANGE_OPERATIONS``, yields kept),
    two of them overlapped with ``delta_stages`` as its peers' are, so every exchange meets
    its peers' in the same order. Returns the expert load ``[layers, E]``, all zero."""
    states = [empty_state(hidden_size, dtype, device, index, ep_step.capacity)
              for index in range(ep_step.micro_batches)]
    if len(states) == 1:
        execute_operations(states[0], operations)
    else:
        execute_overlapped_operations(states, [operations, operations], delta_stages)
    return ExpertLoad.total([s.expert_load for s in states])
