"""Expert parallelism (EP) of the routed MoE: the experts spread over ranks, tokens sent to them.

On one device ``reference.moe`` dispatches the (token, expert) pairs into an expert-major
buffer, runs the experts and combines (docs/model.md, "MoE"). With expert parallelism every
rank holds a slice of the experts and its own tokens; dispatch and combine become two
all-to-alls (docs/model.md, "Dispatch and combine on one device"). This module is the spec of
that layout (the DeepEP low-latency layout), and the PyTorch side implements the same
contract:

* ``N`` ranks, ``E`` routed experts, ``E % N == 0``; rank ``r`` holds the ``L = E // N``
  experts ``r*L .. (r+1)*L - 1`` (expert ``e`` lives on rank ``e // L`` as local expert
  ``e % L``).
* Every rank has ``C`` token rows (the capacity, the same on all ranks in one step). A row
  whose ``topk_ids`` are all -1 is padding; a pair with id -1 goes nowhere.
* Dispatch: the pair (token ``t`` of rank ``s``, expert ``e >= 0``) is written to rank
  ``e // L``'s receive buffer ``recv[e % L, s*C + t]``, of shape ``[L, N*C, H]``. A token
  picks distinct experts, so a slot receives at most one pair: no counts, no prefix sums, and
  every shape is static. Slots that receive nothing hold zeros.
* Experts: each rank runs its ``L`` SwiGLU experts over their whole slot blocks, one batched
  matmul ``[L, N*C, H] x [L, H, I]`` (zero slots give zero rows, which nobody reads).
* Combine: expert rank ``r`` sends ``out[:, s*C:(s+1)*C]`` back to rank ``s``, which stacks
  what it receives as ``back [E, C, H]`` (row block ``e = r*L + l``, expert-major). Token
  ``t``'s routed output is ``sum_k topk_w[t, k] * back[topk_ids[t, k], t]``, summed over
  ``k`` in ``k`` order; pairs with id -1 contribute 0.

Each exchange is one ``jax.lax.all_to_all`` over the leading (destination rank) axis of a
sender-side buffer: ``send [N, L, C, H]`` with ``send[e // L, e % L, t] = h[t]`` arrives as
``[N(source), L, C, H]``, which is ``recv`` once the source axis moves behind ``L``.

The per-rank functions are pure and need no mesh (``jit``/``vmap`` them freely);
``ep_routed_moe`` runs them under ``jax.shard_map`` on a mesh, and ``ep_routed_moe_on_one_device``
runs every rank on one device, an all-to-all being a swap of the two rank axes
(``exchange``). Both equal ``reference.moe``'s single-device routed output up to summation
order (``parity_tests/test_expert_parallel_spec.py``).

Shape letters: ``N`` ranks, ``E`` routed experts, ``L = E // N`` local experts per rank,
``C`` token rows per rank, ``H`` hidden, ``I`` expert intermediate size, ``K`` top-k.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

# ---------------------------------------------------------------------------------------------
# Validation (shapes are static, so everything here runs before any work, also under jit).
# ---------------------------------------------------------------------------------------------


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def check_ep_layout(num_experts, num_ranks) -> int:
    """``L``, the local experts per rank; ``ValueError`` unless ``num_ranks`` is an int >= 1
    and ``num_experts`` an int >= 1 divisible by it."""
    _check_positive_int("num_ranks", num_ranks)
    _check_positive_int("num_experts", num_experts)
    if num_experts % num_ranks:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by num_ranks "
                         f"({num_ranks}): every rank holds the same number of experts")
    return int(num_experts) // int(num_ranks)


def _check_ndim(name: str, value, ndim: int) -> tuple:
    shape = getattr(value, "shape", None)
    if shape is None or len(shape) != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array, got shape {shape}")
    return tuple(shape)


def _check_ids(topk_ids, rows=None, rows_of="h") -> tuple:
    """Integer ``topk_ids [C, K]``, with ``C == rows`` if given; returns its shape."""
    ids_shape = _check_ndim("topk_ids", topk_ids, 2)
    if not jnp.issubdtype(topk_ids.dtype, jnp.integer):
        raise ValueError(f"topk_ids must hold integers, got dtype {topk_ids.dtype}")
    if rows is not None and ids_shape[0] != rows:
        raise ValueError(f"topk_ids must have one row per token of {rows_of} ({rows}), "
                         f"got {ids_shape}")
    return ids_shape


def _check_weights(topk_w, ids_shape: tuple) -> None:
    if _check_ndim("topk_w", topk_w, 2) != ids_shape:
        raise ValueError(f"topk_w must have topk_ids' shape {ids_shape}, got {topk_w.shape}")


def _check_tokens(h, topk_ids, topk_w=None) -> None:
    """``h [C, H]``, integer ``topk_ids [C, K]`` and ``topk_w [C, K]`` (if given) agree."""
    rows, _ = _check_ndim("h", h, 2)
    ids_shape = _check_ids(topk_ids, rows)
    if topk_w is not None:
        _check_weights(topk_w, ids_shape)


def _check_experts(gate, up, down, hidden: int) -> int:
    """``E``, from ``gate, up [E, H, I]`` and ``down [E, I, H]``."""
    gate_shape = _check_ndim("gate", gate, 3)
    if gate_shape[1] != hidden:
        raise ValueError(f"gate must be [E, H={hidden}, I], got {gate_shape}")
    if _check_ndim("up", up, 3) != gate_shape:
        raise ValueError(f"up must have gate's shape {gate_shape}, got {up.shape}")
    e, h, i = gate_shape
    if _check_ndim("down", down, 3) != (e, i, h):
        raise ValueError(f"down must be [E, I, H] = {(e, i, h)}, got {down.shape}")
    return e


def _check_id_values(topk_ids, num_experts: int) -> None:
    """Ids in ``[-1, E)``; only checkable on concrete arrays (under ``jit`` ids are traced)."""
    if isinstance(topk_ids, jax.core.Tracer):
        return
    ids = np.asarray(topk_ids)
    if ids.size and (ids.min() < -1 or ids.max() >= num_experts):
        raise ValueError(f"topk_ids must lie in [-1, {num_experts}), got values in "
                         f"[{ids.min()}, {ids.max()}]")


# ---------------------------------------------------------------------------------------------
# The layout, per rank (pure, no mesh).
# ---------------------------------------------------------------------------------------------


def dispatch_slots(topk_ids, source_rank, *, num_ranks, num_experts):
    """Where each pair of rank ``source_rank`` lands: ``(dest_rank, local_expert, row)``, each
    ``[C, K]`` int32, so that pair ``(t, k)`` sits at ``recv[local_expert, row]`` of rank
    ``dest_rank``, with ``row = source_rank*C + t``; all three are -1 for id -1 pairs.

    The layout as an index map; ``dispatch_send_buffer`` + the all-to-all + ``receive_buffer``
    realise it, and the map is injective over all ranks' pairs (a token's experts are distinct).
    """
    local = check_ep_layout(num_experts, num_ranks)
    capacity, _ = _check_ids(topk_ids)
    ids = jnp.asarray(topk_ids)
    valid = ids >= 0
    row = source_rank * capacity + jnp.arange(capacity, dtype=jnp.int32)[:, None]  # [C, 1]
    return (jnp.where(valid, ids // local, -1).astype(jnp.int32),
            jnp.where(valid, ids % local, -1).astype(jnp.int32),
            jnp.where(valid, row, -1).astype(jnp.int32))


def dispatch_send_buffer(h, topk_ids, *, num_ranks, num_experts):
    """``send [N, L, C, H]``: ``send[e // L, e % L, t] = h[t]`` for every pair (t, e >= 0),
    zeros elsewhere; ``h [C, H]``, ``topk_ids [C, K]``.

    Expert-major ``[E, C, H]`` reshaped with the destination rank first; built from a one-hot
    of the ids (a copy, no arithmetic on ``h``), so id -1 pairs select nothing. (Were an id
    repeated in a row, its slot would hold the same row once, and the combine would still
    weight it once per k.)
    """
    local = check_ep_layout(num_experts, num_ranks)
    _check_tokens(h, topk_ids)
    chosen = jnp.any(topk_ids[:, :, None] == jnp.arange(num_experts), axis=1)  # [C, E]
    send = jnp.where(chosen.T[:, :, None], h[None], jnp.zeros((), h.dtype))  # [E, C, H]
    return send.reshape(num_ranks, local, *h.shape)


def receive_buffer(received):
    """``recv [L, N*C, H]`` from what the dispatch all-to-all delivers, ``[N(source), L, C, H]``:
    rank ``s``'s token ``t`` for local expert ``l`` lands at ``recv[l, s*C + t]``."""
    num_ranks, local, capacity, hidden = _check_ndim("received", received, 4)
    return jnp.transpose(received, (1, 0, 2, 3)).reshape(local, num_ranks * capacity, hidden)


def local_experts(recv, gate, up, down):
    """``out [L, N*C, H]``: local expert ``l``'s SwiGLU over its slot block ``recv[l]``, batched
    over ``L`` (``gate, up [L, H, I]``, ``down [L, I, H]``; one matmul per expert, no per-pair
    weight gather). Zero slots give zero rows."""
    local, _, hidden = _check_ndim("recv", recv, 3)
    if _check_experts(gate, up, down, hidden) != local:
        raise ValueError(f"gate must hold the rank's {local} local experts, got {gate.shape}")
    act = (jax.nn.silu(jnp.einsum("lmh,lhi->lmi", recv, gate))
           * jnp.einsum("lmh,lhi->lmi", recv, up))  # [L, N*C, I]
    return jnp.einsum("lmi,lih->lmh", act, down)


def return_send_buffer(out, *, num_ranks):
    """``[N(destination), L, C, H]``: row block ``s`` of ``out [L, N*C, H]`` goes back to rank
    ``s`` (the combine all-to-all's sender-side buffer)."""
    local, rows, hidden = _check_ndim("out", out, 3)
    _check_positive_int("num_ranks", num_ranks)
    if rows % num_ranks:
        raise ValueError(f"out's rows ({rows}) must be num_ranks ({num_ranks}) blocks of C")
    return jnp.transpose(out.reshape(local, num_ranks, rows // num_ranks, hidden), (1, 0, 2, 3))


def back_buffer(returned):
    """``back [E, C, H]`` from what the combine all-to-all delivers, ``[N(expert rank), L, C,
    H]``: expert ``e = r*L + l``'s outputs for this rank's tokens are ``back[e]``."""
    num_ranks, local, capacity, hidden = _check_ndim("returned", returned, 4)
    return returned.reshape(num_ranks * local, capacity, hidden)


def combine_from_back(back, topk_w, topk_ids):
    """``[C, H]``: ``sum_k topk_w[t, k] * back[topk_ids[t, k], t]`` over ``k`` in ``k`` order;
    ``back [E, C, H]``, ``topk_w, topk_ids [C, K]``; id -1 pairs contribute 0."""
    _, capacity, hidden = _check_ndim("back", back, 3)
    _check_weights(topk_w, _check_ids(topk_ids, capacity, "back"))
    rows = jnp.arange(capacity)
    out = jnp.zeros((capacity, hidden), jnp.result_type(back, topk_w))
    for k in range(topk_ids.shape[1]):  # static K; the loop fixes the summation order
        valid = (topk_ids[:, k] >= 0)[:, None]  # [C, 1]
        picked = back[jnp.maximum(topk_ids[:, k], 0), rows]  # [C, H]
        out = out + jnp.where(valid, topk_w[:, k, None] * picked, 0)
    return out


def rank_step(h, topk_w, topk_ids, gate, up, down, *, all_to_all, num_ranks, num_experts):
    """One rank's routed MoE, ``[C, H]``: dispatch, exchange, local experts, exchange back,
    combine. ``gate, up, down`` are the rank's ``L`` experts; ``all_to_all`` maps a sender
    buffer ``[N(destination), ...]`` to the received ``[N(source), ...]``."""
    send = dispatch_send_buffer(h, topk_ids, num_ranks=num_ranks, num_experts=num_experts)
    recv = receive_buffer(all_to_all(send))  # [L, N*C, H]
    out = local_experts(recv, gate, up, down)  # [L, N*C, H]
    back = back_buffer(all_to_all(return_send_buffer(out, num_ranks=num_ranks)))  # [E, C, H]
    return combine_from_back(back, topk_w, topk_ids)


# ---------------------------------------------------------------------------------------------
# All ranks: on a mesh (shard_map), or simulated on one device.
# ---------------------------------------------------------------------------------------------


def _check_global(h, topk_w, topk_ids, gate, up, down, num_ranks) -> int:
    """Validate the global inputs of ``N`` ranks; returns ``E``."""
    _check_tokens(h, topk_ids, topk_w)
    num_experts = _check_experts(gate, up, down, h.shape[1])
    if h.shape[0] % num_ranks:
        raise ValueError(f"h's rows ({h.shape[0]}) must be num_ranks ({num_ranks}) blocks of "
                         f"C rows, one per rank")
    check_ep_layout(num_experts, num_ranks)
    _check_id_values(topk_ids, num_experts)
    return num_experts


def ep_routed_moe(h, topk_w, topk_ids, gate, up, down, *, mesh, axis_name):
    """``[N*C, H]``: the routed MoE output of every rank's tokens, with ``jax.shard_map`` over
    the mesh axis ``axis_name`` (of size ``N``) and one ``jax.lax.all_to_all`` each way.

    Global inputs: ``h [N*C, H]`` (rank ``r`` owns rows ``r*C:(r+1)*C``), ``topk_w [N*C, K]``,
    ``topk_ids [N*C, K]`` (int, -1 = no expert), ``gate, up [E, H, I]``, ``down [E, I, H]``;
    all are split along their first axis over ``axis_name`` (so rank ``r`` holds experts
    ``r*L .. (r+1)*L - 1``) and replicated over the mesh's other axes.
    """
    if not isinstance(mesh, (Mesh, AbstractMesh)):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh "
                         f"{tuple(mesh.axis_names)}")
    num_ranks = dict(mesh.shape)[axis_name]
    num_experts = _check_global(h, topk_w, topk_ids, gate, up, down, num_ranks)
    step = functools.partial(
        rank_step, num_ranks=num_ranks, num_experts=num_experts,
        all_to_all=functools.partial(jax.lax.all_to_all, axis_name=axis_name, split_axis=0,
                                     concat_axis=0))
    spec = PartitionSpec(axis_name)
    return jax.shard_map(step, mesh=mesh, in_specs=(spec,) * 6, out_specs=spec)(
        h, topk_w, topk_ids, gate, up, down)


def exchange(buffers):
    """What one all-to-all does to every rank's buffer at once: ``[N(from), N(to), ...]`` ->
    ``[N(to), N(from), ...]``."""
    shape = getattr(buffers, "shape", ())
    if len(shape) < 2 or shape[0] != shape[1]:
        raise ValueError(f"buffers must be [N, N, ...], got shape {shape}")
    return jnp.swapaxes(buffers, 0, 1)


def dispatch_all_ranks(h, topk_ids, *, num_ranks, num_experts):
    """``recv [N, L, N*C, H]``: every rank's receive buffer, from the global ``h [N*C, H]``
    and ``topk_ids [N*C, K]`` (rank ``r`` owns rows ``r*C:(r+1)*C``), on one device."""
    check_ep_layout(num_experts, num_ranks)
    _check_tokens(h, topk_ids)
    if h.shape[0] % num_ranks:
        raise ValueError(f"h's rows ({h.shape[0]}) must be num_ranks ({num_ranks}) blocks")
    per_rank = functools.partial(dispatch_send_buffer, num_ranks=num_ranks,
                                 num_experts=num_experts)
    sends = jax.vmap(per_rank)(h.reshape(num_ranks, -1, h.shape[1]),
                               topk_ids.reshape(num_ranks, -1, topk_ids.shape[1]))
    return jax.vmap(receive_buffer)(exchange(sends))  # sends: [N(src), N(dst), L, C, H]


def ep_routed_moe_on_one_device(h, topk_w, topk_ids, gate, up, down, *, num_ranks):
    """``ep_routed_moe`` with ``N = num_ranks`` simulated on one device: the same per-rank
    functions, ``vmap``-ed over ranks, with ``exchange`` for each all-to-all. Same inputs and
    output as ``ep_routed_moe``."""
    num_experts = _check_global(h, topk_w, topk_ids, gate, up, down, num_ranks)
    local = num_experts // num_ranks
    recv = dispatch_all_ranks(h, topk_ids, num_ranks=num_ranks, num_experts=num_experts)
    by_rank = [w.reshape(num_ranks, local, *w.shape[1:]) for w in (gate, up, down)]
    out = jax.vmap(local_experts)(recv, *by_rank)  # [N, L, N*C, H]
    returned = exchange(jax.vmap(functools.partial(return_send_buffer, num_ranks=num_ranks))(out))
    back = jax.vmap(back_buffer)(returned)  # [N, E, C, H]
    capacity = h.shape[0] // num_ranks
    routed = jax.vmap(combine_from_back)(
        back, topk_w.reshape(num_ranks, capacity, -1), topk_ids.reshape(num_ranks, capacity, -1))
    return routed.reshape(h.shape)
