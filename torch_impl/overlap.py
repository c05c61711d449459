"""Running a model's operations plainly or as two overlapped micro-batches.

``model_forward_maybe_tbo`` is where the batch becomes two micro-batches: hidden states (and
the residual) are cut at the children's token ranges, each child gets its own state with its
own ForwardBatch and attention backend, the executor steps both through the same operations,
and the outputs are concatenated back in token order.
"""

from __future__ import annotations

import torch

from tbo_parity.torch_impl.attention import TboAttnBackend
from tbo_parity.torch_impl.empty_batch import empty_state, is_empty, is_empty_state
from tbo_parity.torch_impl.forward_batch import ForwardBatch
from tbo_parity.torch_impl.moe import ExpertLoad
from tbo_parity.torch_impl.operations import (State, execute_operations,
                                              execute_overlapped_operations)


def _state(batch: ForwardBatch, backend, hidden, residual, micro_batch: int = 0,
           ep_capacity=None) -> State:
    """A micro-batch's state. ``micro_batch`` (0 = A or plain, 1 = B) picks the dispatcher's
    buffers; ``ep_capacity`` is the step's expert-parallel capacity (None: the micro-batch's
    own token count, valid where every rank's micro-batch has the same shape, as in a graph)."""
    return State(hidden_states=hidden, residual=residual, forward_batch=batch,
                 attn_backend=backend, expert_load=ExpertLoad(), micro_batch=micro_batch,
                 ep_capacity=hidden.shape[0] if ep_capacity is None else ep_capacity)


def _outputs(states: list) -> tuple:
    """Concatenate hidden states and residuals in token order; count expert loads over all
    micro-batches (an empty micro-batch adds no rows and no load)."""
    real = [s for s in states if not is_empty_state(s)]
    if len(real) == 1:  # the plain path: a concatenation of one would only copy
        hidden, residual = real[0].hidden_states, real[0].residual
    else:
        hidden = torch.cat([s.hidden_states for s in real])
        residual = torch.cat([s.residual for s in real])
    return hidden, residual, ExpertLoad.total([s.expert_load for s in states])


def model_forward_maybe_tbo(operations, delta_stages: int, batch: ForwardBatch,
                            hidden_states: torch.Tensor, residual=None, *, attn_backend,
                            profile: bool = False, ep_capacity=None,
                            empty_operations=None) -> tuple:
    """(hidden [T, H], residual [T, H], expert_load [layers, E]) after all operations.

    Without ``batch.tbo_children`` this is the plain path. With them, each non-empty child
    runs as a micro-batch; when both are non-empty they overlap with ``delta_stages``. An
    empty child (``empty_batch.is_empty``) is skipped, unless ``empty_operations`` is given
    (expert parallelism over several ranks): then it runs these operations (its part in the
    exchanges) on an ``empty_batch.empty_state``, so every rank runs the same exchanges in the
    same order; ``ep_capacity`` (the step's, equal on all ranks) is then required.
    """
    if batch.tbo_children is None:
        backend = attn_backend.primary if isinstance(attn_backend, TboAttnBackend) \
            else attn_backend
        state = _state(batch, backend, hidden_states, residual, 0, ep_capacity)
        return _outputs([execute_operations(state, operations, profile=profile)])
    if not isinstance(attn_backend, TboAttnBackend):
        raise ValueError("attn_backend must be a TboAttnBackend for a batch with tbo_children")
    states, ops = [], []
    for index, (child, backend) in enumerate(zip(batch.tbo_children, attn_backend.children)):
        start, end = child.tbo_parent_token_range
        if not is_empty(child):
            states.append(_state(child, backend, hidden_states[start:end],
                                 None if residual is None else residual[start:end], index,
                                 ep_capacity))
            ops.append(operations)
        elif empty_operations is not None:  # it still takes part in every exchange
            states.append(empty_state(hidden_states.shape[1], hidden_states.dtype,
                                      hidden_states.device, index, ep_capacity))
            ops.append(empty_operations)
        # else: an empty child is skipped
    if len(states) == 1:
        return _outputs([execute_operations(states[0], ops[0], profile=profile)])
    return _outputs(execute_overlapped_operations(states, ops, delta_stages,
                                                  profile=profile))
