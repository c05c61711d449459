"""The packed expert-parallel layout on the PyTorch side (``torch_impl.packed_dispatch``,
docs/model.md "The packed layout"), in one process with simulated ranks.

The ranks are threads, and the collectives are the simulated ones of
``test_expert_parallel_edges`` (``all_to_all_single`` with equal splits, ``all_reduce``): the
real ``PackedDispatcher`` and its ``all_to_all`` transport run unchanged. Each rank's send
buffer, counts, receive buffer and group ends must equal the JAX spec's bit for bit on every
real row; each rank's output must equal one device's MoE on its tokens (float64 but for the
activation, rounded to float32 once on both paths: relative 2^-24, as in
test_expert_parallel_edges). The routings are the ones that stress a packed layout: every token
to one expert (the most rows one expert can get), an expert with no rows, a rank with no
tokens, padding rows and pairs. A count one row short must fail; a step past the capacity is
refused before anything launches. The ``exact`` transport runs on real gloo ranks
(test_expert_parallel.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from parity_tests.test_expert_parallel_edges import (  # noqa: F401 - simulated_dist: fixture
    _Group, _Rank, _one_device, _raise_first, run_ranks, simulated_dist)
from tbo_parity.reference import expert_parallel as spec_ep
from tbo_parity.torch_impl import expert_parallel as ep
from tbo_parity.torch_impl import packed_dispatch as pd

NUM_EXPERTS, HIDDEN, INTER, MAX_CAPACITY = 8, 6, 5, 5
ROUTINGS = ("random", "one_expert", "no_rows_for_expert_1", "rank_0_empty", "padding")
# jitted once: the routings of one (ranks, top_k) share their shapes, so one compilation
LAYOUT_ARGS = ("num_ranks", "num_experts")
spec_dispatch_all_ranks = jax.jit(spec_ep.packed_dispatch_all_ranks, static_argnames=LAYOUT_ARGS)
spec_send_buffer = jax.jit(spec_ep.packed_send_buffer, static_argnames=LAYOUT_ARGS)


def _experts(seed=0):
    rng = np.random.default_rng(seed)
    gate, up = (torch.tensor(rng.normal(size=(NUM_EXPERTS, HIDDEN, INTER))) for _ in range(2))
    return gate, up, torch.tensor(rng.normal(size=(NUM_EXPERTS, INTER, HIDDEN)))


def _inputs(routing: str, ranks: int, top_k: int, tokens: int = MAX_CAPACITY, seed: int = 0):
    """Per rank ``(hidden [T, H], weights [T, K], ids [T, K])``, float64, distinct ids."""
    rng = np.random.default_rng([seed, ranks, top_k, ROUTINGS.index(routing)])
    per_rank = []
    for r in range(ranks):
        count = 0 if (routing == "rank_0_empty" and r == 0) else tokens
        choices = np.arange(NUM_EXPERTS)
        if routing == "no_rows_for_expert_1":
            choices = choices[choices != 1]
        ids = np.array([rng.choice(choices, top_k, replace=False) for _ in range(count)],
                       dtype=np.int64).reshape(count, top_k)
        if routing == "one_expert":  # every token's first pick is expert 3
            others = choices[choices != 3]
            ids = np.array([[3, *rng.choice(others, top_k - 1, replace=False)]
                            for _ in range(count)], dtype=np.int64).reshape(count, top_k)
        if routing == "padding" and count:
            ids[count // 2:] = -1  # padding rows
            ids[0, -1] = -1  # and a padding pair in a real row
        h = torch.tensor(rng.normal(size=(count, HIDDEN)))
        w = torch.tensor(rng.random(size=(count, top_k))).masked_fill(torch.tensor(ids) < 0, 0)
        per_rank.append((h, w, torch.tensor(ids, dtype=torch.int64)))
    return per_rank


def _dispatcher(rank, top_k, transport="all_to_all", max_capacity=MAX_CAPACITY, cls=None):
    return (cls or pd.PackedDispatcher)(NUM_EXPERTS, top_k=top_k, hidden_size=HIDDEN,
                                        max_capacity=max_capacity, dtype=torch.float64,
                                        device="cpu", group=rank, transport=transport)


def _run(ranks, top_k, per_rank, experts, cls=None, capacity=MAX_CAPACITY):
    def step(rank):
        # buffers sized for a larger step than this one, as a runner's largest graph sizes
        # them: every view and every pass must be the step's
        d = _dispatcher(rank, top_k, cls=cls, max_capacity=capacity + 3)
        h, w, ids = per_rank[rank.rank]
        handle = d.dispatch_launch(h, w, ids, micro_batch=rank.rank % 2, capacity=capacity)
        n, s = d.world_size, d.region_rows(capacity)
        send = handle.keep[0].clone()
        counts = d._bufs[handle.micro_batch]["counts"].clone()
        handle = d.dispatch_wait(handle)
        recv, ends = handle.recv.clone(), handle.group_ends.clone()
        out = d.experts(handle, *(d.experts_of(x) for x in experts))
        got = d.combine_wait(d.combine_launch(out, handle))
        assert send.shape == (n, s, HIDDEN) and recv.shape == (n * s, HIDDEN)
        return send, counts, recv, ends, got

    results, group = run_ranks(ranks, step)
    return _raise_first(results), group


def _pad(t, rows):
    """``t [T, ...]`` padded with id -1 / zero rows to ``rows`` (the spec's capacity)."""
    fill = -1 if t.dtype == torch.int64 else 0
    return torch.cat([t, t.new_full((rows - t.shape[0], *t.shape[1:]), fill)])


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("ranks,top_k", [(2, 3), (4, 2), (4, 4), (2, 7)])
def test_buffers_equal_the_spec_and_outputs_one_device(simulated_dist, ranks, top_k, routing):
    per_rank = _inputs(routing, ranks, top_k)
    experts = _experts()
    results, group = _run(ranks, top_k, per_rank, experts)
    assert group.all_to_alls == [3] * ranks  # counts, rows, rows back
    with jax.enable_x64(True):
        h_all = jnp.asarray(torch.cat([_pad(h, MAX_CAPACITY) for h, _, _ in per_rank]).numpy())
        ids_all = jnp.asarray(torch.cat([_pad(i, MAX_CAPACITY) for _, _, i in per_rank]
                                        ).numpy(), jnp.int32)
        # numpy, so that the slicing below compiles nothing (eagerly, each slice length was a
        # compilation of its own: 120 in this test)
        want_recv, want_ends, _ = jax.device_get(spec_dispatch_all_ranks(
            h_all, ids_all, num_ranks=ranks, num_experts=NUM_EXPERTS))
        for r, (send, counts, recv, ends, got) in enumerate(results):
            h, w, ids = per_rank[r]
            want_send, want_counts = jax.device_get(spec_send_buffer(
                jnp.asarray(_pad(h, MAX_CAPACITY).numpy()),
                jnp.asarray(_pad(ids, MAX_CAPACITY).numpy(), jnp.int32),
                num_ranks=ranks, num_experts=NUM_EXPERTS))
            np.testing.assert_array_equal(counts.numpy(), want_counts)
            for dest in range(ranks):  # every real row of every region, bit for bit
                real = int(counts[dest].sum())
                np.testing.assert_array_equal(send[dest, :real].numpy(), want_send[dest, :real])
            np.testing.assert_array_equal(ends.numpy(), want_ends[r])
            real = int(ends[-1])
            np.testing.assert_array_equal(recv[:real].numpy(), want_recv[r, :real])
            if ids.shape[0]:
                want = _one_device(h, w, ids, experts)
                assert float((got - want).abs().max()) <= 2.0 ** -24 * float(want.abs().max())
            assert got.shape == (ids.shape[0], HIDDEN)


def test_every_token_to_one_expert_fills_its_group_with_every_rank_s_tokens(simulated_dist):
    """The worst case for a packed group: expert 3 gets all ``N*C`` rows, the most any expert
    can get (``per_expert`` of the fallback's padded block)."""
    per_rank = _inputs("one_expert", 4, 2)
    results, _ = _run(4, 2, per_rank, _experts())
    ends = results[1][3]  # expert 3 is rank 1's local expert 1 (L = 2)
    assert int(ends[1] - ends[0]) == 4 * MAX_CAPACITY


class _CountsShort(pd.PackedDispatcher):
    """A planted fault: each sender reports one row fewer for its first non-empty (destination,
    local expert)."""

    @staticmethod
    def pack(rows, counts_out, hidden, topk_ids, num_ranks, num_experts, region):
        dest, slot = pd.PackedDispatcher.pack(rows, counts_out, hidden, topk_ids, num_ranks,
                                              num_experts, region)
        flat = counts_out.view(-1)
        first = int(torch.nonzero(flat)[0, 0])
        flat[first] -= 1
        return dest, slot


def test_a_count_one_row_short_fails_parity(simulated_dist):
    per_rank = _inputs("random", 2, 3)
    experts = _experts()
    results, _ = _run(2, 3, per_rank, experts, cls=_CountsShort)
    errors = []
    for r, result in enumerate(results):
        h, w, ids = per_rank[r]
        want = _one_device(h, w, ids, experts)
        errors.append(float((result[-1] - want).abs().max()) / float(want.abs().max()))
    assert max(errors) > 0.01, errors  # the parity bound above is 2^-24


def test_a_step_past_max_capacity_is_refused_before_anything_launches(simulated_dist):
    per_rank = _inputs("random", 2, 3, tokens=MAX_CAPACITY)

    def step(rank):
        d = _dispatcher(rank, 3)
        buffers = list(d._send) + [t for b in d._bufs for t in b.values()
                                   if isinstance(t, torch.Tensor)]
        for b in buffers:
            b.fill_(-7)
        h, w, ids = per_rank[rank.rank]
        with pytest.raises(ValueError, match=rf"ep_capacity {MAX_CAPACITY + 1} exceeds"):
            d.dispatch_launch(h, w, ids, micro_batch=0, capacity=MAX_CAPACITY + 1)
        with pytest.raises(ValueError, match="exceeds ep_capacity 4"):
            d.dispatch_launch(h, w, ids, micro_batch=0, capacity=4)
        return all(bool((b == -7).all()) for b in buffers)

    results, group = run_ranks(2, step)
    assert _raise_first(results) == [True, True]
    assert group.all_to_alls == [0, 0]


def test_the_fallback_experts_compute_each_real_row_with_its_expert():
    rng = np.random.default_rng(5)
    local, rows, per_expert = 3, 10, 4
    gate, up = (torch.tensor(rng.normal(size=(local, HIDDEN, INTER))) for _ in range(2))
    down = torch.tensor(rng.normal(size=(local, INTER, HIDDEN)))
    recv = torch.tensor(rng.normal(size=(rows, HIDDEN)))
    ends = torch.tensor([3, 3, 7], dtype=torch.int32)  # expert 1 empty, rows 7.. past the end
    out = pd.grouped_swiglu(recv, ends, gate, up, down, per_expert=per_expert)
    assert not pd.grouped_gemm_available(recv, gate, up, down)  # a CPU: the fallback
    for j, e in enumerate([0, 0, 0, 2, 2, 2, 2]):
        want = ep.expert_swiglu(recv[j][None, None], gate[e:e + 1], up[e:e + 1], down[e:e + 1])
        # float64 products, the activation rounded to float32 once on both paths (a batched
        # product of another M may round g differently): within 2^-23 of the magnitude
        scale = float(want.abs().max())
        assert float((out[j] - want[0, 0]).abs().max()) <= 2.0 ** -23 * scale
    assert pd.padded_expert_rows(ends, rows, per_expert).tolist() == [
        0, 1, 2, 8, 9, 10, 11, 12, 12, 12]


def test_the_grouped_gemm_runs_only_where_an_expert_may_get_more_than_a_tile(monkeypatch):
    """The static choice: available and ``per_expert > TILE_ROWS``; a CPU never takes it."""
    recv = torch.zeros(4, 8)
    assert not pd.uses_grouped_gemm(recv, pd.TILE_ROWS + 1)  # a CPU: not available
    monkeypatch.setattr(pd, "grouped_gemm_available", lambda *args: True)
    assert pd.uses_grouped_gemm(recv, pd.TILE_ROWS + 1)
    assert not pd.uses_grouped_gemm(recv, pd.TILE_ROWS)


spec_receive_map = jax.jit(spec_ep.packed_receive_map, static_argnums=1)


@pytest.mark.parametrize("n,local,capacity", [(1, 1, 1), (2, 3, 2), (4, 4, 3), (3, 1, 3)])
def test_the_receive_map_matches_the_spec_on_random_counts(n, local, capacity):
    """Random counts at a few fixed shapes (one compilation of the spec each)."""
    rng = np.random.default_rng(11 + n * 16 + local * 4 + capacity)
    region = capacity * local
    for _ in range(8):
        counts = np.stack([np.diff(np.sort(np.concatenate([[0], rng.integers(0, region + 1,
                                                                           local - 1),
                                                           [rng.integers(0, region + 1)]])),
                                   prepend=0)[:local] for _ in range(n)])
        counts = np.abs(counts) % (capacity + 1)
        row_of, ends = pd.packed_receive_map(torch.tensor(counts, dtype=torch.int32), region)
        want_row, want_ends = spec_receive_map(jnp.asarray(counts, jnp.int32), region)
        np.testing.assert_array_equal(row_of.numpy(), np.asarray(want_row))
        np.testing.assert_array_equal(ends.numpy(), np.asarray(want_ends))
        assert ends.dtype == torch.int32


def test_make_dispatcher_and_bad_arguments(simulated_dist):
    rank = _Rank(_Group(2), 0)
    kwargs = dict(hidden_size=HIDDEN, max_capacity=2, dtype=torch.float64, device="cpu",
                  group=rank)
    assert isinstance(pd.make_dispatcher(NUM_EXPERTS, top_k=2, **kwargs), pd.PackedDispatcher)
    old = pd.make_dispatcher(NUM_EXPERTS, layout="capacity", top_k=2, **kwargs)
    assert type(old) is ep.ExpertParallelDispatcher and old.layout == "capacity"
    assert isinstance(pd.make_dispatcher(NUM_EXPERTS, top_k=2, transport="exact",
                                         **kwargs).transport, pd.PackedExact)
    with pytest.raises(ValueError, match="^layout must be one of"):
        pd.make_dispatcher(NUM_EXPERTS, layout="sparse", top_k=2, **kwargs)
    for bad in (0, NUM_EXPERTS + 1, True, 2.0):
        with pytest.raises(ValueError, match="^top_k must be an int"):
            pd.make_dispatcher(NUM_EXPERTS, top_k=bad, **kwargs)
    with pytest.raises(ValueError, match=r"^transport must be one of \['all_to_all', 'exact'\]"):
        pd.make_dispatcher(NUM_EXPERTS, top_k=2, transport="copy_engine", **kwargs)
    with pytest.raises(ValueError, match="lacks one of"):
        pd.make_dispatcher(NUM_EXPERTS, top_k=2, transport=ep.AllToAllTransport(), **kwargs)


def test_the_exact_transport_refuses_graph_capture(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    send = torch.zeros(2, 2, 2)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with pytest.raises(ValueError, match="^transport 'exact' reads the counts on the host"):
        pd.PackedExact().start_dispatch(send, None, None, None, {})


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="needs an sm90+ CUDA device")
def test_the_grouped_gemm_path_agrees_with_the_fallback_and_replays_fresh_group_ends():
    """On an sm90+ GPU in bf16 ``grouped_swiglu`` takes the grouped GEMM (device-side group
    ends, no host read). (1) Its real rows agree with the expert-padded bmm fallback's: both
    are bf16 pipelines over the same inputs with float32 accumulation, rounded to bf16 twice
    (the activation, the output), so a row may differ by the rounding of its activation
    passed through the down projection: bounded here by 2^-6 of the output's magnitude.
    (2) Captured in a CUDA graph with one set of ends and replayed after the ends tensor is
    overwritten, it equals an eager call with the new ends bit for bit (the same kernel)."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(3)
    local, hidden, inter, rows = 4, 256, 128, 64

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, device=dev) * scale).to(torch.bfloat16)

    gate, up = randn(local, hidden, inter, scale=hidden ** -0.5), randn(
        local, hidden, inter, scale=hidden ** -0.5)
    down = randn(local, inter, hidden, scale=inter ** -0.5)
    recv = randn(rows, hidden)
    ends = torch.tensor([5, 17, 17, 40], dtype=torch.int32, device=dev)  # expert 2 empty
    per = pd.TILE_ROWS + 1  # an expert may get more than a tile: the grouped GEMM runs
    assert pd.uses_grouped_gemm(recv, per, gate, up, down)
    assert not pd.uses_grouped_gemm(recv, pd.TILE_ROWS, gate, up, down)
    grouped = pd.grouped_swiglu(recv, ends, gate, up, down, per_expert=per)
    fallback = pd.grouped_swiglu(recv, ends, gate, up, down, per_expert=pd.TILE_ROWS)
    real = int(ends[-1])
    diff = float((grouped[:real].float() - fallback[:real].float()).abs().max())
    scale = float(fallback[:real].float().abs().max())
    assert diff <= 2.0 ** -6 * scale, (diff, scale)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        captured = pd.grouped_swiglu(recv, ends, gate, up, down, per_expert=per)
    ends.copy_(torch.tensor([0, 30, 31, 60], dtype=torch.int32))  # fresh counts, on device
    graph.replay()
    torch.cuda.synchronize()
    eager = pd.grouped_swiglu(recv, ends, gate, up, down, per_expert=per)
    assert torch.equal(captured[:60], eager[:60])
    assert not torch.equal(captured[:60], grouped[:60])  # the replay used the new ends


def _triton_on_gpu() -> bool:
    from tbo_parity.torch_impl import packed_kernels

    return torch.cuda.is_available() and packed_kernels.triton is not None


@pytest.mark.gpu
@pytest.mark.skipif(not _triton_on_gpu(), reason="needs a CUDA device and Triton")
def test_the_triton_index_passes_equal_the_torch_passes_bit_for_bit():
    """``packed_kernels`` computes the slots, counts and receive map the torch passes compute
    (integers: equal, not close), on random routings with padding, every rank and expert
    count up to DeepSeek-V3's 128 local experts, from no token to 4096; and a captured graph
    of the kernels replays fresh routings."""
    from tbo_parity.torch_impl import packed_kernels as pk

    rng = np.random.default_rng(7)
    dev = torch.device("cuda")
    shapes = [(1, 8, 8, 32), (2, 8, 8, 256), (2, 128, 8, 32), (4, 8, 8, 4096), (3, 5, 4, 0),
              (2, 3, 6, 1), (1, 1, 1, 17)]
    for n, local, top_k, tokens in shapes:
        experts = n * local
        ids = np.stack([rng.permutation(experts)[:top_k] for _ in range(tokens)]) \
            if tokens else np.zeros((0, top_k), dtype=np.int64)
        ids[rng.random(tokens) < 0.2] = -1
        topk_ids = torch.tensor(ids, dtype=torch.int64, device=dev)
        got, want = pk.packed_slots(topk_ids, n, experts), pd.packed_slots(topk_ids, n,
                                                                          experts)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and torch.equal(g, w), (n, local, top_k, tokens)
        region = pd.region_rows(max(tokens, 1), top_k, local)
        received = want[2][torch.tensor(rng.integers(0, n, n), device=dev)]
        for g, w in zip(pk.packed_receive_map(received, region),
                        pd.packed_receive_map(received, region)):
            assert g.dtype == w.dtype and torch.equal(g, w), (n, local, top_k, tokens)
    topk_ids = torch.tensor(np.stack([rng.permutation(16)[:8] for _ in range(64)]),
                            device=dev)
    graph = torch.cuda.CUDAGraph()
    pk.packed_slots(topk_ids, 2, 16)  # compiled before the capture
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        captured = pk.packed_slots(topk_ids, 2, 16)
    topk_ids.copy_(torch.tensor(np.stack([rng.permutation(16)[:8] for _ in range(64)])))
    graph.replay()
    torch.cuda.synchronize()
    for g, w in zip(captured, pd.packed_slots(topk_ids, 2, 16)):
        assert torch.equal(g, w)
