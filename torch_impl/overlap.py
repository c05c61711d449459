"""Running a model's operations plainly or as two overlapped micro-batches.

``model_forward_maybe_tbo`` is where the batch becomes two micro-batches: hidden states (and
the residual) are cut at the children's token ranges, each child gets its own state with its
own ForwardBatch and attention backend, the executor steps both through the same operations,
and the outputs are concatenated back in token order.
"""

from __future__ import annotations

import torch

from torch_impl.attention import TboAttnBackend
from torch_impl.forward_batch import ForwardBatch
from torch_impl.operations import State, execute_operations, execute_overlapped_operations


def _state(batch: ForwardBatch, backend, hidden, residual) -> State:
    return State(hidden_states=hidden, residual=residual, forward_batch=batch,
                 attn_backend=backend, expert_load=[])


def _outputs(states: list) -> tuple:
    """Concatenate hidden states and residuals in token order; sum expert loads."""
    hidden = torch.cat([s.hidden_states for s in states])
    residual = torch.cat([s.residual for s in states])
    load = sum(torch.stack(s.expert_load) for s in states)
    return hidden, residual, load


def model_forward_maybe_tbo(operations, delta_stages: int, batch: ForwardBatch,
                            hidden_states: torch.Tensor, residual=None, *, attn_backend,
                            profile: bool = False) -> tuple:
    """(hidden [T, H], residual [T, H], expert_load [layers, E]) after all operations.

    Without ``batch.tbo_children`` this is the plain path. With them, each non-empty child
    runs as a micro-batch; when both are non-empty they overlap with ``delta_stages``.
    """
    if batch.tbo_children is None:
        backend = attn_backend.primary if isinstance(attn_backend, TboAttnBackend) \
            else attn_backend
        state = _state(batch, backend, hidden_states, residual)
        return _outputs([execute_operations(state, operations, profile=profile)])
    if not isinstance(attn_backend, TboAttnBackend):
        raise ValueError("attn_backend must be a TboAttnBackend for a batch with tbo_children")
    states = []
    for child, backend in zip(batch.tbo_children, attn_backend.children):
        start, end = child.tbo_parent_token_range
        if end > start:  # an empty child is skipped
            states.append(_state(child, backend, hidden_states[start:end],
                                 None if residual is None else residual[start:end]))
    if len(states) == 1:
        return _outputs([execute_operations(states[0], operations, profile=profile)])
    return _outputs(execute_overlapped_operations(states, [operations, operations],
                                                  delta_stages, profile=profile))
