"""The packed expert-parallel layout of the spec (``reference.expert_parallel``, docs/model.md
"The packed layout"), piece by piece, against the rule written out as plain loops.

The rule: a sender's region for destination ``r`` holds the rows of ``r``'s local experts
``0 .. L-1`` one after the other, each expert's rows in source-token order; the receiver holds
every real row once, expert-major, then by source rank, then by source token; the experts
compute exactly those rows; the return path sends each row back to the slot it came from. The
whole step (every rank, on a mesh and on one device) is compared with the single-device MoE in
``test_expert_parallel_spec.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tbo_parity.parity_tests import ep_spec_check as check
from tbo_parity.parity_tests.ep_spec_check import CAPACITY, NUM_EXPERTS
from tbo_parity.reference import expert_parallel as ep

LAYOUT_ARGS = ("num_ranks", "num_experts")
# Jitted: a case's shapes compile once, where eagerly every primitive compiled per shape (141
# compilations in test_every_pair_lands_at_the_row_the_rule_names_and_the_rest_is_zero alone).
packed_dispatch = jax.jit(ep.packed_dispatch_all_ranks, static_argnames=LAYOUT_ARGS)
packed_send_buffer = jax.jit(ep.packed_send_buffer, static_argnames=LAYOUT_ARGS)
packed_slots = jax.jit(ep.packed_slots, static_argnames=LAYOUT_ARGS)
CASES = ["dense", "skewed", "idle_experts", "padded_rank", "padding_pairs", "k_beyond_local"]


def _rule_send(h, ids, num_ranks):
    """``(send [N, S, H], counts [N, L], where {(t, k): (dest, slot)})`` by the rule, in loops."""
    local = NUM_EXPERTS // num_ranks
    region = h.shape[0] * min(ids.shape[1], local)
    send = np.zeros((num_ranks, region, h.shape[1]))
    counts = np.zeros((num_ranks, local), np.int64)
    where = {}
    for r in range(num_ranks):
        row = 0
        for l in range(local):
            for t in range(h.shape[0]):
                for k in np.flatnonzero(ids[t] == r * local + l):
                    send[r, row] = h[t]
                    where[(t, int(k))] = (r, row)
                    counts[r, l] += 1
                    row += 1
    return send, counts, where


def _rule_recv(case, num_ranks):
    """Per rank ``(recv [N*S, H], group_ends [L])`` by the rule: expert, then source, then
    token."""
    local = NUM_EXPERTS // num_ranks
    region = CAPACITY * min(case["topk_ids"].shape[1], local)
    out = []
    for r in range(num_ranks):
        recv, ends = np.zeros((num_ranks * region, case["h"].shape[1])), []
        row = 0
        for l in range(local):
            for s in range(num_ranks):
                for t in range(CAPACITY):
                    if r * local + l in case["topk_ids"][s * CAPACITY + t]:
                        recv[row] = case["h"][s * CAPACITY + t]
                        row += 1
            ends.append(row)
        out.append((recv, np.array(ends)))
    return out


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("num_ranks", [1, 2, 4])
def test_every_pair_lands_at_the_row_the_rule_names_and_the_rest_is_zero(num_ranks, case):
    data = check.make_case(case, num_ranks)
    for s in range(num_ranks):
        rows = slice(s * CAPACITY, (s + 1) * CAPACITY)
        h, ids = data["h"][rows], data["topk_ids"][rows]
        send, counts = packed_send_buffer(jnp.asarray(h), jnp.asarray(ids),
                                          num_ranks=num_ranks, num_experts=NUM_EXPERTS)
        want_send, want_counts, where = _rule_send(h, ids, num_ranks)
        np.testing.assert_array_equal(np.asarray(send), want_send.astype(send.dtype))
        np.testing.assert_array_equal(np.asarray(counts), want_counts)
        dest, slot, _ = jax.device_get(packed_slots(jnp.asarray(ids), num_ranks=num_ranks,
                                                    num_experts=NUM_EXPERTS))
        got = {(t, k): (int(dest[t, k]), int(slot[t, k]))
               for t in range(ids.shape[0]) for k in range(ids.shape[1]) if ids[t, k] >= 0}
        assert got == where
        assert np.all(dest[ids < 0] == -1) and np.all(slot[ids < 0] == -1)
        assert len(set(got.values())) == len(got)  # injective: no two pairs share a row


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("num_ranks", [1, 2, 4])
def test_the_receiver_holds_every_real_row_once_expert_source_token_major(num_ranks, case):
    data = check.make_case(case, num_ranks)
    with jax.enable_x64(True):
        recv, ends, row_of = jax.device_get(packed_dispatch(
            jnp.asarray(data["h"]), jnp.asarray(data["topk_ids"]), num_ranks=num_ranks,
            num_experts=NUM_EXPERTS))  # numpy: indexing below compiles nothing
    for r, (want, want_ends) in enumerate(_rule_recv(data, num_ranks)):
        np.testing.assert_array_equal(recv[r], want)
        np.testing.assert_array_equal(ends[r], want_ends)
        mapped = row_of[r]
        real = np.sort(mapped[mapped >= 0])
        np.testing.assert_array_equal(real, np.arange(want_ends[-1]))  # a bijection onto rows


def test_the_experts_compute_each_row_with_its_own_expert_and_zero_past_the_end():
    rng = np.random.default_rng(3)
    local, hidden, inter, rows = 3, 4, 5, 9
    gate, up = (rng.normal(size=(local, hidden, inter)) for _ in range(2))
    down = rng.normal(size=(local, inter, hidden))
    recv = rng.normal(size=(rows, hidden))
    ends = np.array([2, 2, 6])  # expert 1 gets nothing; rows 6.. are past the end
    with jax.enable_x64(True):
        out = np.asarray(ep.grouped_experts(*(jnp.asarray(a) for a in
                                              (recv, ends, gate, up, down))))
    expert_of = [0, 0, 2, 2, 2, 2]
    for j, e in enumerate(expert_of):
        g, u = recv[j] @ gate[e], recv[j] @ up[e]
        want = (g / (1 + np.exp(-g)) * u) @ down[e]
        np.testing.assert_allclose(out[j], want, rtol=1e-12, atol=1e-12)
    assert np.all(out[6:] == 0)


def test_the_return_path_sends_each_row_back_to_its_slot():
    data = check.make_case("padding_pairs", 2)
    @jax.jit  # one compilation, not one per primitive
    def back_and_sends(h, ids):
        recv, _, row_of = ep.packed_dispatch_all_ranks(h, ids, num_ranks=2,
                                                       num_experts=NUM_EXPERTS)
        back = ep.exchange(jax.vmap(ep.return_rows)(recv, row_of))  # identity experts
        sends, _ = jax.vmap(functools.partial(ep.packed_send_buffer, num_ranks=2,
                                              num_experts=NUM_EXPERTS))(
            h.reshape(2, CAPACITY, -1), ids.reshape(2, CAPACITY, -1))
        return back, sends

    with jax.enable_x64(True):
        back, sends = back_and_sends(jnp.asarray(data["h"]), jnp.asarray(data["topk_ids"]))
    np.testing.assert_array_equal(np.asarray(back), np.asarray(sends))


def test_combine_packed_sums_the_picked_rows_in_k_order():
    back = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
    dest = jnp.array([[1, 0], [-1, 0]], jnp.int32)
    slot = jnp.array([[2, 0], [-1, 1]], jnp.int32)
    w = jnp.array([[0.5, 2.0], [9.0, 1.0]], jnp.float32)
    out = np.asarray(ep.combine_packed(back, w, dest, slot))
    np.testing.assert_array_equal(out, [[0.5 * 10 + 2 * 0, 0.5 * 11 + 2 * 1], [2, 3]])


def test_max_pairs_and_region_rows():
    assert ep.max_pairs_per_rank(8, 128) == 8  # DeepSeek-V3's 256 experts on 2 ranks
    assert ep.max_pairs_per_rank(8, 4) == 4  # a token reaches a rank at most L times
    assert ep.packed_region_rows(32, 8, 128) == 256
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="top_k"):
            ep.max_pairs_per_rank(bad, 4)
        with pytest.raises(ValueError, match="local"):
            ep.max_pairs_per_rank(4, bad)
        with pytest.raises(ValueError, match="capacity"):
            ep.packed_region_rows(bad, 4, 4)


def test_bad_input_is_a_value_error_naming_the_argument():
    ids = jnp.zeros((2, 2), jnp.int32)
    with pytest.raises(ValueError, match="layout"):
        ep.ep_routed_moe_on_one_device(jnp.zeros((2, 4)), jnp.zeros((2, 2)), ids,
                                       *(jnp.zeros((8, 4, 4)),) * 3, num_ranks=1,
                                       layout="sparse")
    with pytest.raises(ValueError, match="group_ends"):
        ep.grouped_experts(jnp.zeros((4, 4)), jnp.zeros((3,), jnp.int32),
                           *(jnp.zeros((2, 4, 4)),) * 3)
    with pytest.raises(ValueError, match="recv_counts"):
        ep.packed_receive_map(jnp.zeros((2,), jnp.int32), 4)
    with pytest.raises(ValueError, match="received"):
        ep.packed_receive_buffer(jnp.zeros((2, 4)), jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="row_of"):
        ep.return_rows(jnp.zeros((4, 2)), jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="slot"):
        ep.combine_packed(jnp.zeros((1, 2, 2)), jnp.zeros((2, 2)), ids, jnp.zeros((2, 3),
                                                                                  jnp.int32))
    with pytest.raises(ValueError, match="h's rows"):
        ep.packed_dispatch_all_ranks(jnp.zeros((3, 4)), jnp.zeros((3, 2), jnp.int32),
                                     num_ranks=2, num_experts=8)


def test_the_packed_pieces_are_jit_and_vmap_able():
    data = check.make_case("dense", 2)
    h, ids = jnp.asarray(data["h"], jnp.float32), jnp.asarray(data["topk_ids"])
    step = jax.jit(functools.partial(ep.packed_send_buffer, num_ranks=2,
                                     num_experts=NUM_EXPERTS))
    sends, counts = jax.vmap(step)(h.reshape(2, CAPACITY, -1), ids.reshape(2, CAPACITY, -1))
    assert sends.shape == (2, 2, CAPACITY * 4, h.shape[1]) and counts.shape == (2, 2, 4)
    row_of, ends = jax.jit(ep.packed_receive_map, static_argnums=1)(counts[0], sends.shape[2])
    assert row_of.shape == (2, sends.shape[2]) and ends.shape == (4,)


def test_each_per_rank_function_returns_the_dtypes_its_docstring_names():
    """Index maps are int32, whatever integer type the ids come in (int64 with x64 on), and
    padding pairs (id -1) are -1 in every field of the map; a buffer keeps the dtype of the
    rows it moves (bfloat16 stays bfloat16, not promoted by its zero fill); the combine sums
    in the wider of the rows' and the weights' types (docs/model.md, "Expert parallelism")."""
    ids = np.array([[0, 3], [-1, 1], [2, -1], [3, 0]], np.int64)  # C=4, K=2; N=2, E=4, L=2
    pad = ids < 0
    layout = {"num_ranks": 2, "num_experts": 4}
    h = jnp.asarray(np.arange(12.0).reshape(4, 3), jnp.bfloat16)
    with jax.enable_x64(True):
        for field in ep.dispatch_slots(ids, 1, **layout):
            assert field.dtype == jnp.int32 and np.all(np.asarray(field)[pad] == -1)
        assert ep.dispatch_send_buffer(h, ids, **layout).dtype == jnp.bfloat16
        dest, slot, counts = ep.packed_slots(ids, **layout)
        assert (dest.dtype, slot.dtype, counts.dtype) == (jnp.int32,) * 3
        assert np.all(np.asarray(dest)[pad] == -1) and np.all(np.asarray(slot)[pad] == -1)
        send, send_counts = ep.packed_send_buffer(h, ids, **layout)
        assert (send.dtype, send_counts.dtype) == (jnp.bfloat16, jnp.int32)
        region = send.shape[1]
        row_of, group_ends = ep.packed_receive_map(np.asarray(counts, np.int64), region)
        assert (row_of.dtype, group_ends.dtype) == (jnp.int32, jnp.int32)
        assert ep.packed_receive_buffer(send, row_of).dtype == jnp.bfloat16
        assert ep.return_rows(send.reshape(-1, 3), row_of).dtype == jnp.bfloat16
        w16 = jnp.full(ids.shape, 0.5, jnp.bfloat16)
        assert ep.combine_packed(send, w16, dest, slot).dtype == jnp.bfloat16
        wide = ep.combine_packed(send.astype(jnp.float64), w16.astype(jnp.float32), dest, slot)
        assert wide.dtype == jnp.float64
        assert ep.combine_packed(send, w16.astype(jnp.float32), dest, slot).dtype == \
            jnp.float32
        # with no expert per token (K = 0) the sum is empty: zeros, in that same wider type
        none = np.zeros((4, 0), np.int32)
        for back, w, want in ((send.astype(jnp.float64), none.astype(np.float32), jnp.float64),
                              (send, none.astype(np.float32), jnp.float32)):
            empty = ep.combine_packed(back, w, none, none)
            assert empty.dtype == want and not np.asarray(empty).any()


@pytest.mark.parametrize("layout", ["packed", "capacity"])
def test_the_layout_argument_picks_the_layout_that_runs(layout):
    """``layout`` chooses the computation, not only a name: the packed layout runs its
    grouped matrix products (``ragged_dot``) over the real rows, the capacity layout a batched
    matmul over every slot and none. Both give the same MoE (the one-device and mesh tests),
    so only the program tells them apart: here on a one-device mesh and in the one-device
    simulation of two ranks."""
    rng = np.random.default_rng(0)
    h = rng.normal(size=(4, 8)).astype(np.float32)
    w = rng.random((4, 2)).astype(np.float32)
    ids = np.array([[0, 1], [2, 3], [1, -1], [3, 0]], np.int32)
    gate, up = (rng.normal(size=(4, 8, 6)).astype(np.float32) for _ in range(2))
    down = rng.normal(size=(4, 6, 8)).astype(np.float32)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("ep",))
    programs = [
        jax.make_jaxpr(functools.partial(ep.ep_routed_moe, mesh=mesh, axis_name="ep",
                                         layout=layout))(h, w, ids, gate, up, down),
        jax.make_jaxpr(functools.partial(ep.ep_routed_moe_on_one_device, num_ranks=2,
                                         layout=layout))(h, w, ids, gate, up, down)]
    for program in programs:
        assert ("ragged_dot" in str(program)) == (layout == "packed")


@pytest.mark.parametrize("build", [ep.dispatch_send_buffer, ep.packed_send_buffer],
                         ids=["capacity", "packed"])
def test_a_send_buffer_refuses_ids_with_another_row_count_than_h(build):
    """One row of ``topk_ids`` per token of ``h``: a mismatch is refused naming both, before
    a gather that would read past ``h`` (JAX clamps the index: a wrong buffer, silently)."""
    h, ids = np.ones((3, 2), np.float32), np.zeros((4, 1), np.int32)
    with pytest.raises(ValueError, match=r"^topk_ids must have one row per token of h \(3\), "
                                         r"got \(4, 1\)$"):
        build(h, ids, num_ranks=2, num_experts=2)
