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

Shape letters (docs/spec.md, "Shape letters"): ``N`` ranks, ``E`` routed experts,
``L = E // N`` local experts per rank, ``C`` token rows per rank, ``H`` hidden, ``I`` expert
intermediate size, ``K`` top-k; for the packed layout ``M = min(K, L)``, ``S = C*M`` region
rows and ``J`` rows of a receive buffer.
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


LAYOUTS = ("packed", "capacity")


def check_layout_name(layout) -> str:
    """One of ``LAYOUTS``, else a ValueError naming ``layout``."""
    if not (isinstance(layout, str) and layout in LAYOUTS):
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def ep_routed_moe(h, topk_w, topk_ids, gate, up, down, *, mesh, axis_name, layout="packed"):
    """``[N*C, H]``: the routed MoE output of every rank's tokens, with ``jax.shard_map`` over
    the mesh axis ``axis_name`` (of size ``N``) and one ``jax.lax.all_to_all`` each way.

    Global inputs: ``h [N*C, H]`` (rank ``r`` owns rows ``r*C:(r+1)*C``), ``topk_w [N*C, K]``,
    ``topk_ids [N*C, K]`` (int, -1 = no expert), ``gate, up [E, H, I]``, ``down [E, I, H]``;
    all are split along their first axis over ``axis_name`` (so rank ``r`` holds experts
    ``r*L .. (r+1)*L - 1``) and replicated over the mesh's other axes. ``layout`` is
    ``"packed"`` (``packed_rank_step``: only the real rows computed) or ``"capacity"``
    (``rank_step``: every slot of every expert's block computed); the outputs agree up to
    summation order.
    """
    check_layout_name(layout)
    if not isinstance(mesh, (Mesh, AbstractMesh)):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh "
                         f"{tuple(mesh.axis_names)}")
    num_ranks = dict(mesh.shape)[axis_name]
    num_experts = _check_global(h, topk_w, topk_ids, gate, up, down, num_ranks)
    step = functools.partial(
        packed_rank_step if layout == "packed" else rank_step,
        num_ranks=num_ranks, num_experts=num_experts,
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


def ep_routed_moe_on_one_device(h, topk_w, topk_ids, gate, up, down, *, num_ranks,
                                layout="packed"):
    """``ep_routed_moe`` with ``N = num_ranks`` simulated on one device: the same per-rank
    functions, ``vmap``-ed over ranks, with ``exchange`` for each all-to-all. Same inputs and
    output as ``ep_routed_moe``."""
    check_layout_name(layout)
    num_experts = _check_global(h, topk_w, topk_ids, gate, up, down, num_ranks)
    if layout == "packed":
        return _packed_on_one_device(h, topk_w, topk_ids, gate, up, down, num_ranks=num_ranks,
                                     num_experts=num_experts)
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


# ---------------------------------------------------------------------------------------------
# The packed layout: only the real pairs are computed, and only real rows need to move.
# ---------------------------------------------------------------------------------------------
#
# The capacity layout above gives every (source token, expert) pair a slot whether or not the
# token picked the expert, so each local expert computes all ``N*C`` rows of its block: ``E/K``
# times the real work. The packed layout (docs/model.md, "The packed layout") keeps the shapes
# static and packs the real rows at the front instead:
#
# * ``M = min(K, L)``: the most pairs one token can send to one rank (its ``K`` experts are
#   distinct, and a rank holds ``L``). ``S = C*M``: the rows of one destination's region.
# * Sender: ``send [N, S, H]``; destination ``r``'s region holds the rows of its local experts
#   ``l = 0 .. L-1`` one after the other, each expert's rows in source-token order, packed at
#   the front; ``send_counts [N, L]`` (int32) says how many rows each (destination, local
#   expert) has. Rows past a region's real rows are zero.
# * Exchange: ``send`` and ``send_counts`` travel as ``[N(destination), ...]`` -> ``[N(source),
#   ...]`` (an all-to-all), giving ``received [N, S, H]`` and ``recv_counts [N, L]``.
# * Receiver: ``recv [N*S, H]`` holds every real row once, expert-major: local expert ``l``'s
#   rows, ordered by source rank, then source token, at rows ``group_ends[l-1] ..
#   group_ends[l] - 1`` (``group_ends [L]`` int32, the inclusive cumsum of the per-expert row
#   counts). Rows from ``group_ends[L-1]`` on are zero. ``N*S`` rows always suffice: a source
#   sends at most ``S`` rows to one rank.
# * Experts: a grouped matrix product over ``recv`` with the group ends (``jax.lax.ragged_dot``;
#   a grouped GEMM on a GPU): exactly the real rows are computed.
# * Return: the receiver sends each row back to the slot it came from (``return_rows``), and
#   the source reads pair ``(t, k)``'s output at ``back[dest, slot]``, the place it wrote it.
#
# Every order is fixed by the ids alone (by local expert, then source rank, then source token),
# so the buffers, and so the outputs, are the same on every transport and every run.


def max_pairs_per_rank(top_k, local) -> int:
    """``M = min(K, L)``: the most (token, expert) pairs one token can send to one rank."""
    _check_positive_int("top_k", top_k)
    _check_positive_int("local", local)
    return min(int(top_k), int(local))


def packed_region_rows(capacity, top_k, local) -> int:
    """``S = C * min(K, L)``: the rows of one destination's region of the send buffer."""
    _check_positive_int("capacity", capacity)
    return int(capacity) * max_pairs_per_rank(top_k, local)


def _exclusive_cumsum(x, axis):
    return jnp.cumsum(x, axis=axis) - x


def packed_slots(topk_ids, *, num_ranks, num_experts):
    """Where each pair of this rank goes in the packed layout: ``(dest, slot, send_counts)``,
    ``dest, slot [C, K]`` int32 (-1 for id -1 pairs) and ``send_counts [N, L]`` int32.

    Pair ``(t, k)`` with expert ``e`` goes to rank ``dest = e // L``, row ``slot`` of that
    rank's region: after the rows of the lower local experts of that rank, and after the
    tokens ``t' < t`` that picked ``e`` too (a scan over tokens; no sort)."""
    local = check_ep_layout(num_experts, num_ranks)
    _check_ids(topk_ids)
    ids = jnp.asarray(topk_ids)
    chosen = (ids[:, :, None] == jnp.arange(num_experts)).any(axis=1).astype(jnp.int32)  # [C, E]
    rank_in_expert = _exclusive_cumsum(chosen, axis=0)  # [C, E]: earlier tokens of expert e
    counts = chosen.sum(axis=0).reshape(num_ranks, local)  # [N, L]
    start = _exclusive_cumsum(counts, axis=1).reshape(num_experts)  # [E]: expert's first row
    valid = ids >= 0
    safe = jnp.where(valid, ids, 0)
    slot = start[safe] + jnp.take_along_axis(rank_in_expert, safe, axis=1)
    return (jnp.where(valid, safe // local, -1).astype(jnp.int32),
            jnp.where(valid, slot, -1).astype(jnp.int32), counts.astype(jnp.int32))


def packed_send_buffer(h, topk_ids, *, num_ranks, num_experts):
    """``(send [N, S, H], send_counts [N, L])``: ``send[dest, slot] = h[t]`` for every pair
    ``(t, k)`` of ``packed_slots``, zeros elsewhere (``h [C, H]``, ``topk_ids [C, K]``)."""
    local = check_ep_layout(num_experts, num_ranks)
    _check_tokens(h, topk_ids)
    capacity, top_k = topk_ids.shape
    region = packed_region_rows(capacity, top_k, local)
    dest, slot, counts = packed_slots(topk_ids, num_ranks=num_ranks, num_experts=num_experts)
    flat = jnp.where(dest >= 0, dest * region + slot, num_ranks * region)  # [C, K]; -1 -> past
    tokens = jnp.broadcast_to(jnp.arange(capacity)[:, None], flat.shape)
    send = jnp.zeros((num_ranks * region, h.shape[1]), h.dtype)
    send = send.at[flat.reshape(-1)].set(h[tokens.reshape(-1)], mode="drop",
                                         unique_indices=True)
    return send.reshape(num_ranks, region, h.shape[1]), counts


def packed_receive_map(recv_counts, region_rows):
    """``(row_of [N, S], group_ends [L])`` from ``recv_counts [N(source), L]``: received row
    ``i`` of source ``s`` goes to row ``row_of[s, i]`` of ``recv`` (-1: no real row there), and
    local expert ``l``'s rows end at ``group_ends[l]`` (int32, inclusive cumsum).

    Source ``s``'s region holds its rows for experts ``0 .. L-1`` one after the other; expert
    ``l``'s rows in ``recv`` start after the lower experts' (``base``) and after the lower
    sources' rows for ``l`` (``before``)."""
    num_ranks, local = _check_ndim("recv_counts", recv_counts, 2)
    counts = jnp.asarray(recv_counts, jnp.int32)
    totals = counts.sum(axis=0)  # [L]
    group_ends = jnp.cumsum(totals).astype(jnp.int32)
    base = group_ends - totals  # [L]
    before = _exclusive_cumsum(counts, axis=0)  # [N, L]: lower sources' rows of expert l
    region_end = jnp.cumsum(counts, axis=1)  # [N, L]: where expert l's rows end in region s
    i = jnp.arange(region_rows, dtype=jnp.int32)
    expert = (i[None, :, None] >= region_end[:, None, :]).sum(axis=2)  # [N, S]: l of row i
    valid = expert < local
    l_safe = jnp.minimum(expert, local - 1)
    first = jnp.take_along_axis(region_end - counts, l_safe, axis=1)  # [N, S]
    row = base[l_safe] + jnp.take_along_axis(before, l_safe, axis=1) + i[None] - first
    return jnp.where(valid, row, -1).astype(jnp.int32), group_ends


def packed_receive_buffer(received, row_of):
    """``recv [N*S, H]``: every real row of ``received [N(source), S, H]`` at ``row_of``;
    rows that receive none are zero."""
    num_ranks, region, hidden = _check_ndim("received", received, 3)
    flat = jnp.where(row_of >= 0, row_of, num_ranks * region).reshape(-1)
    recv = jnp.zeros((num_ranks * region, hidden), received.dtype)
    return recv.at[flat].set(received.reshape(-1, hidden), mode="drop", unique_indices=True)


def grouped_experts(recv, group_ends, gate, up, down):
    """``out [J, H]``: row ``j`` of ``recv [J, H]`` through local expert ``l``'s SwiGLU, where
    ``group_ends[l-1] <= j < group_ends[l]`` (``gate, up [L, H, I]``, ``down [L, I, H]``);
    rows from ``group_ends[L-1]`` on are zero. One grouped matrix product per weight
    (``jax.lax.ragged_dot``): only the real rows are computed."""
    rows, hidden = _check_ndim("recv", recv, 2)
    local = _check_experts(gate, up, down, hidden)
    if _check_ndim("group_ends", group_ends, 1) != (local,):
        raise ValueError(f"group_ends must hold one end per local expert ({local}), "
                         f"got shape {group_ends.shape}")
    sizes = jnp.diff(jnp.asarray(group_ends, jnp.int32), prepend=0)
    act = (jax.nn.silu(jax.lax.ragged_dot(recv, gate, sizes))
           * jax.lax.ragged_dot(recv, up, sizes))
    return jax.lax.ragged_dot(act, down, sizes)


def return_rows(out, row_of):
    """``[N(source), S, H]``: ``out``'s row ``row_of[s, i]`` back at ``[s, i]``, the slot it
    arrived in (zeros where ``row_of`` is -1): the combine exchange's sender-side buffer."""
    _, hidden = _check_ndim("out", out, 2)
    num_ranks, region = _check_ndim("row_of", row_of, 2)
    picked = out[jnp.maximum(row_of, 0)]  # [N, S, H]
    return jnp.where((row_of >= 0)[:, :, None], picked, jnp.zeros((), out.dtype))


def combine_packed(back, topk_w, dest, slot):
    """``[C, H]``: ``sum_k topk_w[t, k] * back[dest[t, k], slot[t, k]]`` over ``k`` in ``k``
    order (``back [N, S, H]``; ``dest, slot, topk_w [C, K]``); pairs with dest -1 give 0."""
    _check_ndim("back", back, 3)
    ids_shape = _check_ids(dest)
    _check_weights(topk_w, ids_shape)
    if _check_ndim("slot", slot, 2) != ids_shape:
        raise ValueError(f"slot must have dest's shape {ids_shape}, got {slot.shape}")
    out = jnp.zeros((ids_shape[0], back.shape[2]), jnp.result_type(back, topk_w))
    for k in range(ids_shape[1]):  # static K; the loop fixes the summation order
        valid = (dest[:, k] >= 0)[:, None]
        picked = back[jnp.maximum(dest[:, k], 0), jnp.maximum(slot[:, k], 0)]  # [C, H]
        out = out + jnp.where(valid, topk_w[:, k, None] * picked, 0)
    return out


def packed_rank_step(h, topk_w, topk_ids, gate, up, down, *, all_to_all, num_ranks,
                     num_experts):
    """``rank_step`` in the packed layout: the same ``[C, H]`` routed output, computing and
    moving only the real rows (three exchanges: rows, counts, rows back)."""
    send, counts = packed_send_buffer(h, topk_ids, num_ranks=num_ranks, num_experts=num_experts)
    dest, slot, _ = packed_slots(topk_ids, num_ranks=num_ranks, num_experts=num_experts)
    received, recv_counts = all_to_all(send), all_to_all(counts)
    row_of, group_ends = packed_receive_map(recv_counts, send.shape[1])
    out = grouped_experts(packed_receive_buffer(received, row_of), group_ends, gate, up, down)
    back = all_to_all(return_rows(out, row_of))  # [N(expert rank), S, H]
    return combine_packed(back, topk_w, dest, slot)


def packed_dispatch_all_ranks(h, topk_ids, *, num_ranks, num_experts):
    """Every rank's packed receive side, on one device, from the global ``h [N*C, H]`` and
    ``topk_ids [N*C, K]``: ``(recv [N, N*S, H], group_ends [N, L], row_of [N, N, S])``."""
    check_ep_layout(num_experts, num_ranks)
    _check_tokens(h, topk_ids)
    if h.shape[0] % num_ranks:
        raise ValueError(f"h's rows ({h.shape[0]}) must be num_ranks ({num_ranks}) blocks")
    per_rank = functools.partial(packed_send_buffer, num_ranks=num_ranks,
                                 num_experts=num_experts)
    sends, counts = jax.vmap(per_rank)(h.reshape(num_ranks, -1, h.shape[1]),
                                       topk_ids.reshape(num_ranks, -1, topk_ids.shape[1]))
    region = sends.shape[2]
    row_of, group_ends = jax.vmap(packed_receive_map, in_axes=(0, None))(exchange(counts),
                                                                        region)
    recv = jax.vmap(packed_receive_buffer)(exchange(sends), row_of)
    return recv, group_ends, row_of


def _packed_on_one_device(h, topk_w, topk_ids, gate, up, down, *, num_ranks, num_experts):
    local = num_experts // num_ranks
    capacity = h.shape[0] // num_ranks
    recv, group_ends, row_of = packed_dispatch_all_ranks(h, topk_ids, num_ranks=num_ranks,
                                                         num_experts=num_experts)
    by_rank = [w.reshape(num_ranks, local, *w.shape[1:]) for w in (gate, up, down)]
    out = jax.vmap(grouped_experts)(recv, group_ends, *by_rank)  # [N, N*S, H]
    back = exchange(jax.vmap(return_rows)(out, row_of))  # [N(source), N(expert rank), S, H]
    slots = functools.partial(packed_slots, num_ranks=num_ranks, num_experts=num_experts)
    ids = topk_ids.reshape(num_ranks, capacity, -1)
    dest, slot, _ = jax.vmap(slots)(ids)
    routed = jax.vmap(combine_packed)(back, topk_w.reshape(num_ranks, capacity, -1), dest, slot)
    return routed.reshape(h.shape)
