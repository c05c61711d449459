"""The empty micro-batch: one with no tokens of its own, and what a step does for it.

A (micro-)batch is *empty* when it holds no tokens (``is_empty``): an IDLE batch (a
data-parallel rank with no requests this step; ``reference.model.check_inputs`` allows IDLE
no tokens), or a two-batch-overlap child whose token range is empty (a split that leaves every
token to the other child). This module is where that is decided, and ``step_batches`` is what
a step does with one; ``reference.operations.forward_tbo`` asks them.

The spec's model runs on one device, so nothing waits for an empty micro-batch: it is skipped,
and the other micro-batch runs alone. A step whose micro-batches are all empty (an IDLE step)
runs the whole batch once, over its zero rows, so that its outputs keep their shapes (0 rows
of hidden states and logits, an all-zero expert load) and the KV pools come back unchanged.

The PyTorch twin is ``torch_impl/empty_batch.py``. It also runs experts sharded over ranks,
where an empty micro-batch is *not* skipped: dispatch and combine are all-to-alls that every
rank must enter in the same order, and its experts compute its peers' tokens, so it runs its
part of every exchange with zero rows of its own (see that module).
"""

from __future__ import annotations

import jax.numpy as jnp


def is_empty(batch) -> bool:
    """Whether ``batch`` (a micro-batch's ``reference.model.ModelInputs``, whole or a TBO
    child) holds no tokens. Read off the shape, so it is static and holds under ``jit``."""
    return jnp.shape(batch.input_ids)[0] == 0


def step_batches(whole, parts) -> list:
    """The micro-batches a step runs, from the ``whole`` batch and its TBO ``parts``: the
    non-empty parts, in order (an empty one is skipped: on one device nothing waits for it);
    ``[whole]`` when every part is empty (an IDLE step still yields its empty outputs)."""
    return [part for part in parts if not is_empty(part)] or [whole]
