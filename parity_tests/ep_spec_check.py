"""Cases and the multi-device run of the expert-parallel spec (``reference.expert_parallel``).

``parity_tests/test_expert_parallel_spec.py`` imports the cases from here and runs ``main`` in
a subprocess: a mesh of ``N`` CPU devices needs
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before JAX starts its backend, which the
pytest process has already done. Run by hand:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
        python -m tbo_parity.parity_tests.ep_spec_check

It prints one JSON object: per (ranks, case, layout) the max error of ``ep_routed_moe`` on an
``N``-device mesh against the single-device ``reference.moe`` routed output (float64), and of
deliberately wrong layouts, which the test requires to be caught.

Shape letters as in ``reference.expert_parallel``: ``N`` ranks, ``E`` experts, ``L = E // N``,
``C`` rows per rank, ``H`` hidden, ``I`` intermediate, ``K`` top-k.
"""

from __future__ import annotations

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tbo_parity.reference import expert_parallel as ep
from tbo_parity.reference import moe

NUM_EXPERTS = 8  # E
HIDDEN = 16  # H
INTERMEDIATE = 8  # I
CAPACITY = 6  # C
RANKS = (1, 2, 4)
AXIS = "ep"

# The top-k of a case is one of four rules of L, so that a mesh size compiles at most four
# programs (compiling, not running, is what these runs spend their time on).
TOP_K_RULES = {
    "1": lambda local: 1,
    "L": lambda local: local,
    "L+1": lambda local: min(local + 1, NUM_EXPERTS),  # beyond the local experts (E when N = 1)
    "E": lambda local: NUM_EXPERTS,
}
# name -> (top-k rule, weights, what the case stresses)
CASES = {
    "one_expert": ("1", "softmax", "K = 1 (every weight 1)"),
    "k_local": ("L", "random", "K = L, signed random weights"),
    "k_beyond_local": ("L+1", "softmax", "K = L + 1: every token needs two ranks (N > 1)"),
    "dense": ("E", "softmax", "K = E: every token to every expert"),
    "skewed": ("1", "random", "~90% of the tokens go to expert 0 alone"),
    "idle_experts": ("L+1", "softmax",
                     "experts 1, E-2, E-1 receive nothing (their pairs are -1): with N = 4 "
                     "the last rank computes nothing"),
    "padding_rows": ("L", "softmax", "each rank's last 0 .. C rows are padding"),
    "padded_rank": ("L+1", "random", "rank N-1's rows are all padding"),
    "padding_pairs": ("E", "random",
                      "a third of the pairs are -1 inside rows, with nonzero weights that "
                      "must not leak"),
}
CASE_NAMES = tuple(CASES)
NEGATIVE_CASE = "k_local"  # two ranks' token t often share an expert here
WRONG_PACKED = ("counts_short",)
WRONG_LAYOUTS = ("no_source_offset", "ranks_swapped") + WRONG_PACKED


def make_case(name: str, num_ranks: int, seed: int = 0) -> dict:
    """Global float64 inputs of ``N = num_ranks`` ranks: ``h [N*C, H]``, ``topk_w, topk_ids
    [N*C, K]`` (distinct ids per row, -1 = padding) and expert weights ``[E, H, I]``,
    ``[E, I, H]`` (``normal(0, 1/sqrt(fan_in))``, as ``reference.weights`` draws them)."""
    rule, weight_kind, _ = CASES[name]
    top_k = TOP_K_RULES[rule](ep.check_ep_layout(NUM_EXPERTS, num_ranks))
    rng = np.random.default_rng([seed, num_ranks, CASE_NAMES.index(name)])
    rows = num_ranks * CAPACITY
    ids = np.stack([rng.permutation(NUM_EXPERTS)[:top_k] for _ in range(rows)])  # [N*C, K]
    if name == "skewed":  # expert 0 first for ~90% of tokens
        for t in np.flatnonzero(rng.random(rows) < 0.9):
            ids[t] = np.concatenate([[0], [e for e in ids[t] if e != 0]])[:top_k]
    if name == "idle_experts":
        ids[np.isin(ids, [1, NUM_EXPERTS - 2, NUM_EXPERTS - 1])] = -1
    if weight_kind == "softmax":
        logits = rng.normal(size=(rows, top_k))
        weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    else:
        weights = rng.normal(size=(rows, top_k))
    real = np.ones(rows, bool)
    if name == "padding_rows":  # 0 .. C-1 real rows per rank
        for r in range(num_ranks):
            real[r * CAPACITY + rng.integers(0, CAPACITY):(r + 1) * CAPACITY] = False
    if name == "padded_rank":
        real[(num_ranks - 1) * CAPACITY:] = False
    ids[~real], weights[~real] = -1, 0.0
    if name == "padding_pairs":  # about a third of the pairs dropped, weights left in place
        ids[rng.random(ids.shape) < 0.35] = -1
    gate = rng.normal(0, HIDDEN ** -0.5, size=(NUM_EXPERTS, HIDDEN, INTERMEDIATE))
    up = rng.normal(0, HIDDEN ** -0.5, size=(NUM_EXPERTS, HIDDEN, INTERMEDIATE))
    down = rng.normal(0, INTERMEDIATE ** -0.5, size=(NUM_EXPERTS, INTERMEDIATE, HIDDEN))
    return dict(h=rng.normal(size=(rows, HIDDEN)), topk_w=weights,
                topk_ids=ids.astype(np.int32), gate=gate, up=up, down=down)


@jax.jit
def _single_device_routed(h, topk_w, topk_ids, gate, up, down):
    """``[C, H]``: one rank's rows through ``reference.moe``'s dispatch, experts, combine."""
    buffer = moe.dispatch(h, topk_ids, num_experts=gate.shape[0])
    return moe.combine(moe.routed_experts(buffer, gate, up, down), buffer.pair_index, topk_w)


def reference_routed(case: dict, num_ranks: int) -> np.ndarray:
    """``[N*C, H]``: each rank's rows through the single-device ``reference.moe`` path (in the
    current precision: call under ``jax.enable_x64`` for float64)."""
    out = []
    for r in range(num_ranks):
        rows = slice(r * CAPACITY, (r + 1) * CAPACITY)
        out.append(np.asarray(_single_device_routed(
            *(jnp.asarray(case[k][rows]) for k in ("h", "topk_w", "topk_ids")),
            *(jnp.asarray(case[k]) for k in ("gate", "up", "down")))))
    return np.concatenate(out)


def _wrong_rank_step(layout, h, topk_w, topk_ids, gate, up, down, *, axis_name, num_ranks,
                     num_experts):
    """``ep.rank_step`` with one deliberate layout bug, to show the comparison can fail.

    ``no_source_offset``: every source rank writes its token ``t`` to row ``t`` instead of
    ``s*C + t`` (colliding pairs add up, as a scatter-add would) and reads row ``t`` back.
    ``ranks_swapped``: the receiver files rank ``s``'s tokens under rank ``N-1-s``.
    """
    all_to_all = functools.partial(jax.lax.all_to_all, axis_name=axis_name, split_axis=0,
                                   concat_axis=0)
    send = ep.dispatch_send_buffer(h, topk_ids, num_ranks=num_ranks, num_experts=num_experts)
    received = all_to_all(send)  # [N(source), L, C, H]
    capacity = h.shape[0]
    if layout == "ranks_swapped":
        received = received[::-1]
    recv = ep.receive_buffer(received)  # [L, N*C, H]
    if layout == "no_source_offset":
        recv = jnp.zeros_like(recv).at[:, :capacity].set(received.sum(axis=0))
    out = ep.local_experts(recv, gate, up, down)
    if layout == "no_source_offset":
        out = jnp.tile(out[:, :capacity], (1, num_ranks, 1))
    back = ep.back_buffer(all_to_all(ep.return_send_buffer(out, num_ranks=num_ranks)))
    return ep.combine_from_back(back, topk_w, topk_ids)


def _wrong_packed_rank_step(layout, h, topk_w, topk_ids, gate, up, down, *, axis_name,
                            num_ranks, num_experts):
    """``ep.packed_rank_step`` with one planted fault. ``counts_short``: each sender reports
    one row fewer for its first (destination, local expert) that has any, so the receiver
    leaves that expert's last row out of the computation."""
    del layout  # one packed fault
    all_to_all = functools.partial(jax.lax.all_to_all, axis_name=axis_name, split_axis=0,
                                   concat_axis=0)
    send, counts = ep.packed_send_buffer(h, topk_ids, num_ranks=num_ranks,
                                         num_experts=num_experts)
    flat = counts.reshape(-1)
    first = jnp.argmax(flat > 0)
    counts = flat.at[first].add(-(flat[first] > 0).astype(flat.dtype)).reshape(counts.shape)
    dest, slot, _ = ep.packed_slots(topk_ids, num_ranks=num_ranks, num_experts=num_experts)
    row_of, group_ends = ep.packed_receive_map(all_to_all(counts), send.shape[1])
    out = ep.grouped_experts(ep.packed_receive_buffer(all_to_all(send), row_of), group_ends,
                             gate, up, down)
    back = all_to_all(ep.return_rows(out, row_of))
    return ep.combine_packed(back, topk_w, dest, slot)


def _wrong_ep_routed_moe(layout, mesh, *args):
    num_ranks = mesh.shape[AXIS]
    wrong = _wrong_packed_rank_step if layout in WRONG_PACKED else _wrong_rank_step
    step = functools.partial(wrong, layout, axis_name=AXIS, num_ranks=num_ranks,
                             num_experts=NUM_EXPERTS)
    spec = jax.sharding.PartitionSpec(AXIS)
    return jax.shard_map(step, mesh=mesh, in_specs=(spec,) * 6, out_specs=spec)(*args)


def _max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)), initial=0.0))


def run_case(mesh: Mesh, name: str, routed, layout: str = "packed") -> dict:
    """One (mesh, case, layout): errors of the mesh run and (once per mesh size, with the
    packed layout) of the wrong layouts, in float64."""
    num_ranks = mesh.shape[AXIS]
    case = make_case(name, num_ranks)
    # numpy inputs: each rank's shard goes straight from the host to its device
    args = [case[k] for k in ("h", "topk_w", "topk_ids", "gate", "up", "down")]
    want = reference_routed(case, num_ranks)
    got = routed(*args)
    record = dict(num_ranks=num_ranks, case=name, layout=layout,
                  top_k=int(case["topk_ids"].shape[1]),
                  dtype=str(got.dtype), devices=len(got.sharding.device_set),
                  scale=float(np.max(np.abs(want), initial=0.0)),
                  max_err=_max_abs(got, want),
                  padding_rows_zero=bool(np.all(np.asarray(got)[
                      np.all(case["topk_ids"] < 0, axis=1)] == 0)),
                  wrong={})
    if num_ranks == max(RANKS) and name == NEGATIVE_CASE and layout == "packed":
        for layout in WRONG_LAYOUTS:
            wrong = jax.jit(functools.partial(_wrong_ep_routed_moe, layout, mesh))(*args)
            record["wrong"][layout] = _max_abs(wrong, want)
    return record


def bad_mesh_message() -> str:
    """The ``ValueError`` of 6 experts on a real 4-rank mesh (6 % 4 != 0)."""
    mesh = Mesh(np.array(jax.devices()[:4]), (AXIS,))
    case = make_case("one_expert", 4)
    gate, up, down = (case[k][:6] for k in ("gate", "up", "down"))
    try:
        ep.ep_routed_moe(case["h"], case["topk_w"], np.minimum(case["topk_ids"], 5), gate, up,
                         down, mesh=mesh, axis_name=AXIS)
    except ValueError as error:
        return str(error)
    return "no error"


def main(argv=None) -> int:
    ranks = RANKS if not argv else tuple(int(a) for a in argv)
    if jax.device_count() < max(ranks):
        print(f"need {max(ranks)} devices, have {jax.device_count()}: run with "
              f"XLA_FLAGS=--xla_force_host_platform_device_count={max(ranks)}", file=sys.stderr)
        return 2
    records = []
    with jax.enable_x64(True):
        for num_ranks in ranks:
            mesh = Mesh(np.array(jax.devices()[:num_ranks]), (AXIS,))
            for layout in ep.LAYOUTS:
                routed = jax.jit(functools.partial(ep.ep_routed_moe, mesh=mesh, axis_name=AXIS,
                                                   layout=layout))
                records += [run_case(mesh, name, routed, layout) for name in CASE_NAMES]
        bad = bad_mesh_message() if max(ranks) >= 4 else None
    print(json.dumps(dict(platform=jax.default_backend(), device_count=jax.device_count(),
                          records=records, bad_mesh_message=bad)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
