"""The expert-parallel spec (``reference.expert_parallel``) equals the single-device MoE.

On ``N = 1, 2, 4`` ranks (a mesh of forced CPU devices, run in a subprocess because the mesh
needs ``XLA_FLAGS`` before JAX starts, see ``parity_tests/ep_spec_check.py``),
``ep_routed_moe`` must give every rank's rows the routed output of ``reference.moe``'s
dispatch, experts and combine, in float64, where the two differ only in summation order.
Two deliberately wrong layouts must fail the same comparison. In-process, the per-rank pieces
are checked one by one: every pair lands in exactly the slot the layout names and every other
slot is zero, the slot map is injective, the experts and the combine do what their formulas
say, and bad input is a ``ValueError`` naming the argument.
"""

from __future__ import annotations

import functools
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, Mesh

from tbo_parity.parity_tests import background
from tbo_parity.parity_tests import ep_spec_check as check
from tbo_parity.parity_tests.ep_spec_check import CAPACITY, CASE_NAMES, NUM_EXPERTS, RANKS
from tbo_parity.reference import expert_parallel as ep
from tbo_parity.reference import moe

ROOT = pathlib.Path(__file__).resolve().parents[1]
EPS64 = float(np.finfo(np.float64).eps)
# EP and the single-device MoE differ only in the order of float64 sums of at most
# max(H, I, K) = 16 terms (the expert matmuls, the weighted sum over k), which moves a result
# by at most ~16 ulps of what is summed. Measured over all (N, case): at most 0.96 eps *
# max|reference| (1.8e-15 at max|reference| = 8.3, N = 4, "k_local"); float32 gives 3.3 eps.
F64_BOUND = 16 * EPS64  # relative to max|reference| of the case
WRONG_MIN = 0.1  # a wrong layout must miss by at least this fraction of max|reference|
CHILD_TIMEOUT_S = 300
# Jitted once, so that cases of the same shapes share one compilation.
LAYOUT_ARGS = ("num_ranks", "num_experts")
slot_map = jax.jit(ep.dispatch_slots, static_argnames=LAYOUT_ARGS)
dispatch_all_ranks = jax.jit(ep.dispatch_all_ranks, static_argnames=LAYOUT_ARGS)
one_device = jax.jit(ep.ep_routed_moe_on_one_device, static_argnames=("num_ranks", "layout"))


# ---------------------------------------------------------------------------------------------
# On a mesh of N devices (subprocess).
# ---------------------------------------------------------------------------------------------


@background.job("ep-spec-mesh", background.reads(__name__, fixture="mesh_run"))
def _mesh_child() -> subprocess.CompletedProcess:
    """The child, a background job (parity_tests/background.py): 15 s on 2 cores, which the
    tests before this module's fill."""
    xla_flags = background.environ().get("XLA_FLAGS", "")
    env = dict(JAX_PLATFORMS="cpu", XLA_FLAGS=(
        xla_flags + f" --xla_force_host_platform_device_count={max(RANKS)}").strip())
    return background.command([sys.executable, "-m", "tbo_parity.parity_tests.ep_spec_check"],
                              cwd=ROOT, env=env, timeout=CHILD_TIMEOUT_S)


@pytest.fixture(scope="module")
def mesh_run() -> dict:
    """The child's JSON: one record per (ranks, case); fails with the child's stderr."""
    result = background.result("ep-spec-mesh")
    if result.returncode != 0:
        pytest.fail(f"ep_spec_check exited {result.returncode}:\n{result.stderr}")
    return json.loads(result.stdout)


def _record(mesh_run, num_ranks, case, layout="packed"):
    (record,) = [r for r in mesh_run["records"]
                 if r["num_ranks"] == num_ranks and r["case"] == case and r["layout"] == layout]
    return record


def test_the_child_ran_on_a_mesh_of_cpu_devices(mesh_run):
    assert mesh_run["platform"] == "cpu"
    assert mesh_run["device_count"] >= max(RANKS)
    assert len(mesh_run["records"]) == len(RANKS) * len(CASE_NAMES) * len(ep.LAYOUTS)


@pytest.mark.parametrize("layout", ep.LAYOUTS)
@pytest.mark.parametrize("case", CASE_NAMES)
@pytest.mark.parametrize("num_ranks", RANKS)
def test_ep_on_a_mesh_equals_the_single_device_moe(mesh_run, num_ranks, case, layout):
    """float64: ``ep_routed_moe`` on ``N`` devices, in either layout, equals ``reference.moe``
    per rank within the summation-order bound; padding rows are exactly 0."""
    record = _record(mesh_run, num_ranks, case, layout)
    assert record["dtype"] == "float64"
    assert record["devices"] == num_ranks  # the output really is spread over N devices
    bound = F64_BOUND * record["scale"]
    assert record["max_err"] <= bound, record
    assert record["padding_rows_zero"], record


@pytest.mark.parametrize("layout", check.WRONG_LAYOUTS)
def test_a_wrong_layout_fails_the_comparison(mesh_run, layout):
    """The source-rank offset ``s*C`` replaced by 0, source ranks swapped, or (packed) a count
    one row short, misses the reference by far more than the bound: the comparison above can
    fail."""
    record = _record(mesh_run, max(RANKS), check.NEGATIVE_CASE)
    assert record["max_err"] <= F64_BOUND * record["scale"]
    assert record["wrong"][layout] >= WRONG_MIN * record["scale"], record


def test_experts_not_divisible_by_a_real_mesh_are_rejected(mesh_run):
    assert mesh_run["bad_mesh_message"].startswith("num_experts (6) must be divisible by "
                                                   "num_ranks (4)")


# ---------------------------------------------------------------------------------------------
# The per-rank pieces, in-process (no mesh).
# ---------------------------------------------------------------------------------------------


def _expected_recv(case, num_ranks) -> np.ndarray:
    """``[N, L, N*C, H]`` straight from the layout: pair (t of rank s, e) at rank ``e // L``,
    ``[e % L, s*C + t]``; zeros elsewhere."""
    local = NUM_EXPERTS // num_ranks
    h, ids = case["h"], case["topk_ids"]
    want = np.zeros((num_ranks, local, num_ranks * CAPACITY, h.shape[1]))
    for s in range(num_ranks):
        for t in range(CAPACITY):
            for e in ids[s * CAPACITY + t]:
                if e >= 0:
                    want[e // local, e % local, s * CAPACITY + t] = h[s * CAPACITY + t]
    return want


@pytest.mark.parametrize("case", ["dense", "idle_experts", "padded_rank", "padding_pairs"])
@pytest.mark.parametrize("num_ranks", RANKS)
def test_every_pair_lands_in_its_slot_and_every_other_slot_is_zero(num_ranks, case):
    """Send buffers, the simulated all-to-all and ``receive_buffer`` put each pair's token
    bit for bit where the layout says, and nothing anywhere else."""
    data = check.make_case(case, num_ranks)
    with jax.enable_x64(True):
        recv = dispatch_all_ranks(data["h"], data["topk_ids"], num_ranks=num_ranks,
                                  num_experts=NUM_EXPERTS)
        np.testing.assert_array_equal(np.asarray(recv), _expected_recv(data, num_ranks))


def _slots(ids, num_ranks, *, source_offset=True):
    """Every valid pair's ``(dest_rank, local_expert, row)`` over all source ranks."""
    slots = []
    for s in range(num_ranks):
        rows = ids[s * CAPACITY:(s + 1) * CAPACITY]
        dest, local, row = (np.asarray(a) for a in slot_map(
            rows, s if source_offset else 0, num_ranks=num_ranks, num_experts=NUM_EXPERTS))
        valid = rows >= 0
        assert np.all(dest[~valid] == -1) and np.all(row[~valid] == -1)
        slots += list(zip(dest[valid], local[valid], row[valid]))
    return slots


@pytest.mark.parametrize("case", CASE_NAMES)
@pytest.mark.parametrize("num_ranks", RANKS)
def test_the_slot_map_follows_the_layout_and_is_injective(num_ranks, case):
    ids = check.make_case(case, num_ranks)["topk_ids"]
    local = NUM_EXPERTS // num_ranks
    slots = _slots(ids, num_ranks)
    want = [(e // local, e % local, s * CAPACITY + t) for s in range(num_ranks)
            for t in range(CAPACITY) for e in ids[s * CAPACITY + t] if e >= 0]
    assert slots == want
    assert len(set(slots)) == len(slots) == np.sum(ids >= 0)


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_without_the_source_offset_the_slot_map_collides(num_ranks):
    """The negative of the test above: dropping ``s*C`` makes two ranks' tokens share slots."""
    slots = _slots(check.make_case(check.NEGATIVE_CASE, num_ranks)["topk_ids"], num_ranks,
                   source_offset=False)
    assert len(set(slots)) < len(slots)


def test_the_return_path_inverts_the_receive_path():
    received = jnp.arange(4 * 2 * 3 * 5.0).reshape(4, 2, 3, 5)  # [N, L, C, H]
    recv = ep.receive_buffer(received)
    assert recv.shape == (2, 12, 5)
    np.testing.assert_array_equal(recv[1, 3 * 2 + 1], received[2, 1, 1])  # l=1, s=2, t=1
    np.testing.assert_array_equal(ep.return_send_buffer(recv, num_ranks=4), received)
    np.testing.assert_array_equal(ep.back_buffer(received).reshape(received.shape), received)


def test_local_experts_is_each_experts_swiglu_on_its_slot_block():
    data = check.make_case("dense", 2)
    with jax.enable_x64(True):
        recv = jnp.asarray(data["h"]).reshape(1, -1, data["h"].shape[1]).repeat(4, axis=0)
        recv = recv.at[:, 3].set(0.0)  # an empty slot
        weights = [jnp.asarray(data[k][4:]) for k in ("gate", "up", "down")]  # rank 1's experts
        out = np.asarray(jax.jit(ep.local_experts)(recv, *weights))
        for l in range(4):
            want = moe.swiglu(recv[l], *(w[l] for w in weights))
            np.testing.assert_allclose(out[l], want, rtol=0, atol=F64_BOUND * np.abs(want).max())
        np.testing.assert_array_equal(out[:, 3], 0.0)


def test_combine_from_back_sums_the_picked_rows_in_k_order():
    data = check.make_case("padding_pairs", 1)
    back = np.random.default_rng(0).normal(size=(NUM_EXPERTS, CAPACITY, 16))
    w, ids = data["topk_w"], data["topk_ids"]
    want = np.zeros((CAPACITY, 16))
    for k in range(ids.shape[1]):
        for t in range(CAPACITY):
            if ids[t, k] >= 0:
                want[t] = want[t] + w[t, k] * back[ids[t, k], t]
    with jax.enable_x64(True):
        got = np.asarray(jax.jit(ep.combine_from_back)(back, w, ids))
    np.testing.assert_allclose(got, want, rtol=0, atol=F64_BOUND * np.abs(want).max())


@pytest.mark.parametrize("layout", ep.LAYOUTS)
@pytest.mark.parametrize("num_ranks", RANKS)
def test_the_per_rank_functions_are_jit_and_vmap_able(num_ranks, layout):
    """``ep_routed_moe_on_one_device`` (every rank ``vmap``-ed, all-to-alls as axis swaps)
    under ``jit`` equals the single-device MoE in float64, in both layouts (the mesh child
    checks ``ep_routed_moe`` in both; this is the one-device simulation of each)."""
    data = check.make_case("k_beyond_local", num_ranks)
    with jax.enable_x64(True):
        want = check.reference_routed(data, num_ranks)
        args = [data[k] for k in ("h", "topk_w", "topk_ids", "gate", "up", "down")]
        got = one_device(*args, num_ranks=num_ranks, layout=layout)
        assert got.dtype == jnp.float64
    assert np.abs(np.asarray(got) - want).max() <= F64_BOUND * np.abs(want).max()


# ---------------------------------------------------------------------------------------------
# Bad input: a ValueError naming the argument, before any work.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_experts,num_ranks,argument", [
    (6, 4, "num_experts"), (8, 0, "num_ranks"), (8, 2.0, "num_ranks"), (8, True, "num_ranks"),
    (0, 1, "num_experts"), ("8", 2, "num_experts")])
def test_check_ep_layout_rejects_a_bad_layout(num_experts, num_ranks, argument):
    with pytest.raises(ValueError, match=argument):
        ep.check_ep_layout(num_experts, num_ranks)


def test_check_ep_layout_gives_the_local_expert_count():
    assert [ep.check_ep_layout(8, n) for n in (1, 2, 4, 8)] == [8, 4, 2, 1]
    assert ep.check_ep_layout(np.int64(6), 3) == 2


def _inputs(num_ranks=4, **changes):
    data = check.make_case("k_local", num_ranks)
    data.update(changes)
    return [data[k] for k in ("h", "topk_w", "topk_ids", "gate", "up", "down")]


def _bad(case_id, argument, *, axis_name="ep", mesh_ranks=4, **changes):
    return pytest.param(argument, axis_name, mesh_ranks, changes, id=case_id)


BAD_CALLS = [
    _bad("experts-not-divisible-by-mesh", "num_experts", mesh_ranks=3),
    _bad("rows-not-divisible-by-mesh", "h", h=np.zeros((22, 16)), topk_w=np.zeros((22, 2)),
         topk_ids=np.zeros((22, 2), np.int32)),
    _bad("axis-not-in-mesh", "axis_name", axis_name="tp"),
    _bad("h-1d", "h", h=np.zeros(24 * 16)),
    _bad("weights-rows", "topk_w", topk_w=np.zeros((23, 2))),
    _bad("weights-k", "topk_w", topk_w=np.zeros((24, 3))),
    _bad("ids-float", "topk_ids", topk_ids=np.zeros((24, 2))),
    _bad("ids-rows", "topk_ids", topk_ids=np.zeros((23, 2), np.int32)),
    _bad("ids-too-large", "topk_ids", topk_ids=np.full((24, 2), NUM_EXPERTS, np.int32)),
    _bad("ids-below-minus-one", "topk_ids", topk_ids=np.full((24, 2), -2, np.int32)),
    _bad("gate-hidden", "gate", gate=np.zeros((8, 15, 8))),
    _bad("up-shape", "up", up=np.zeros((8, 16, 7))),
    _bad("down-shape", "down", down=np.zeros((8, 16, 8))),
]


@pytest.mark.parametrize("argument,axis_name,mesh_ranks,changes", BAD_CALLS)
def test_ep_routed_moe_rejects_bad_input_naming_the_argument(argument, axis_name, mesh_ranks,
                                                             changes):
    """Checked before any work, so an abstract mesh of any size will do (no devices needed)."""
    mesh = AbstractMesh((mesh_ranks,), ("ep",))
    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        ep.ep_routed_moe(*_inputs(**changes), mesh=mesh, axis_name=axis_name)


def test_ep_routed_moe_rejects_a_mesh_that_is_not_one():
    with pytest.raises(ValueError, match="mesh"):
        ep.ep_routed_moe(*_inputs(), mesh=("ep", 4), axis_name="ep")


def test_the_one_device_simulation_and_the_pieces_reject_bad_input():
    h, w, ids, gate, up, down = _inputs()
    with pytest.raises(ValueError, match="num_experts"):
        ep.ep_routed_moe_on_one_device(h, w, ids, gate, up, down, num_ranks=3)
    with pytest.raises(ValueError, match="num_ranks"):
        ep.dispatch_send_buffer(h, ids, num_ranks=0, num_experts=8)
    with pytest.raises(ValueError, match=r"\bh\b"):
        ep.dispatch_send_buffer(h[0], ids, num_ranks=4, num_experts=8)
    with pytest.raises(ValueError, match="gate"):
        ep.local_experts(np.zeros((2, 24, 16)), gate[:3], up[:3], down[:3])
    with pytest.raises(ValueError, match="topk_w"):
        ep.combine_from_back(np.zeros((8, 24, 16)), w[:, :1], ids)
    with pytest.raises(ValueError, match="out"):
        ep.return_send_buffer(np.zeros((2, 25, 16)), num_ranks=4)
    with pytest.raises(ValueError, match="buffers"):
        ep.exchange(np.zeros((4, 3, 2)))
    # Values without a shape (a list, a number) are refused by name too, not an AttributeError.
    with pytest.raises(ValueError, match=r"^h must be a 2-D array, got shape None"):
        ep.dispatch_send_buffer(h.tolist(), ids, num_ranks=4, num_experts=8)
    with pytest.raises(ValueError, match=r"^back must be a 3-D array, got shape None"):
        ep.combine_from_back(0.0, w, ids)


def test_a_one_device_mesh_runs_in_process():
    """With the pytest process's single device, ``ep_routed_moe`` on a 1-rank mesh is the
    single-device MoE (the multi-device runs are in the subprocess above)."""
    mesh = Mesh(np.array(jax.devices()[:1]), ("ep",))
    data = check.make_case("padding_rows", 1)
    with jax.enable_x64(True):
        routed = jax.jit(functools.partial(ep.ep_routed_moe, mesh=mesh, axis_name="ep"))
        got = routed(*(data[k] for k in ("h", "topk_w", "topk_ids", "gate", "up", "down")))
        want = check.reference_routed(data, 1)
    assert np.abs(np.asarray(got) - want).max() <= F64_BOUND * np.abs(want).max()


# --- boundaries the mutation run found unpinned (docs/testing.md) -----------------------------


def test_concrete_ids_are_checked_on_both_sides_of_their_range():
    """Concrete ids lie in [-1, E): -1 (padding) and E - 1 are accepted, -2 and E refused; an
    empty batch has no id to check. (Under jit the ids are traced and not checked.)"""
    h, w, ids, gate, up, down = _inputs()
    for edge, ok in ((-2, False), (-1, True), (NUM_EXPERTS - 1, True), (NUM_EXPERTS, False)):
        edged = np.array(ids)
        edged[0, 0] = edge
        if ok:
            assert ep._check_global(h, w, edged, gate, up, down, 4) == NUM_EXPERTS
        else:
            with pytest.raises(ValueError, match=r"^topk_ids must lie in \[-1, 8\), got "):
                ep._check_global(h, w, edged, gate, up, down, 4)
    empty = (np.zeros((0, 16)), np.zeros((0, 2)), np.zeros((0, 2), np.int32))
    assert ep._check_global(*empty, gate, up, down, 4) == NUM_EXPERTS


def test_combine_from_back_keeps_the_inputs_precision_and_names_back_in_its_check():
    """The sum is accumulated in the inputs' result type (float64 stays float64), and ids
    whose rows do not match back's capacity are refused naming back."""
    back = np.random.default_rng(0).normal(size=(4, 3, 5))
    w = np.full((3, 2), 0.5)
    ids = np.array([[0, 1], [2, -1], [3, 0]], np.int32)
    with jax.enable_x64(True):
        out = ep.combine_from_back(back, w, ids)
        assert out.dtype == jnp.float64
        assert ep.combine_from_back(back.astype(np.float32), w.astype(np.float32),
                                    ids).dtype == jnp.float32
        # mixed: the wider of the two, whichever it is
        assert ep.combine_from_back(back, w.astype(np.float32), ids).dtype == jnp.float64
        assert ep.combine_from_back(back.astype(np.float32), w, ids).dtype == jnp.float64
        # with no expert per token (K = 0) the sum is empty: zeros, in that same type
        none_w, none_ids = np.zeros((3, 0)), np.zeros((3, 0), np.int32)
        for b, nw in ((back, none_w.astype(np.float32)), (back.astype(np.float32), none_w)):
            empty = ep.combine_from_back(b, nw, none_ids)
            assert empty.dtype == jnp.float64 and not np.asarray(empty).any()
    with pytest.raises(ValueError, match=r"^topk_ids must have one row per token of back "
                                         r"\(3\), got \(2, 2\)$"):
        ep.combine_from_back(back, w[:2], ids[:2])


def test_exchange_takes_square_leading_axes_from_two_dims_on():
    """[N, N] is the smallest buffer an exchange takes; fewer axes, unequal leading axes or
    something without a shape are refused naming buffers."""
    square = np.arange(4.0).reshape(2, 2)
    assert np.array_equal(np.asarray(ep.exchange(square)), square.T)
    for bad in (np.zeros(4), np.zeros((2, 3)), [[0.0, 1.0], [2.0, 3.0]]):
        with pytest.raises(ValueError, match=r"^buffers must be \[N, N, \.\.\.\], got shape"):
            ep.exchange(bad)


def test_the_one_device_simulation_checks_the_weights_too():
    """ep_routed_moe_on_one_device validates every global input as ep_routed_moe does, the
    weights included: a topk_w of the wrong shape is refused naming it."""
    h, w, ids, gate, up, down = _inputs()
    with pytest.raises(ValueError, match=r"^topk_w must have topk_ids' shape"):
        ep.ep_routed_moe_on_one_device(h, w[:, :1], ids, gate, up, down, num_ranks=4)
