"""The edges of an expert-parallel step, in one process: the capacity at ``max_capacity`` and
one past it, a micro-batch of exactly ``capacity`` tokens and one more, and what the ranks
agree on when every rank is idle (docs/model.md, "Expert parallelism").

The ranks are threads of this process. The real ``ExpertParallelDispatcher``, its
``AllToAllTransport``, ``agree_ep_step`` and ``MoEModel`` run unchanged; only the two
collectives they call, ``torch.distributed.all_to_all_single`` and ``all_reduce`` (MAX), are
simulated, as torch documents them (``_Group``). The largest captured graph always runs at
``capacity == max_capacity``, so that step must be accepted and exact; one row more must be a
``ValueError`` on every rank before any exchange starts. Every rank idle at once on real gloo
ranks is in parity_tests/test_expert_parallel.py (scenario ``all-idle``).
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.distributed as dist

from tbo_parity.reference import expert_parallel as spec_ep
from tbo_parity.torch_impl import expert_parallel as ep
from tbo_parity.torch_impl import moe

HANG_GUARD_S = 120  # a rank left alone in a collective fails instead of hanging the suite


class _Group:
    """``n`` simulated ranks sharing the two collectives the EP code calls. Each rank passes
    its own ``_Rank`` as the ``group`` argument. A rank's k-th collective meets every other
    rank's k-th and returns once all have entered it, so threads run in lockstep as processes
    would; if a rank has left (returned or raised) without entering it, the others raise at
    once instead of waiting for a peer that will never come."""

    def __init__(self, n: int):
        self.size = n
        self.cond = threading.Condition()
        self.rounds = {}  # k -> [(kind, value) of each rank]
        self.entered = [0] * n  # collectives entered, per rank
        self.left = set()
        self.all_to_alls = [0] * n  # exchanges started, per rank

    def collective(self, rank: int, kind: str, value, combine):
        with self.cond:
            k = self.entered[rank]
            self.entered[rank] += 1
            entries = self.rounds.setdefault(k, [None] * self.size)
            entries[rank] = (kind, value)
            self.cond.notify_all()
            complete = lambda: all(e is not None for e in entries)  # noqa: E731
            self.cond.wait_for(lambda: complete() or self.left, timeout=HANG_GUARD_S)
            if not complete():
                raise RuntimeError(f"rank {rank}'s collective {k} ({kind}) was not entered by "
                                   f"ranks {[r for r, e in enumerate(entries) if e is None]}")
        if {e[0] for e in entries} != {kind}:
            raise RuntimeError(f"collective {k} mixes {sorted({e[0] for e in entries})}")
        return combine([e[1] for e in entries])

    def leave(self, rank: int) -> None:
        with self.cond:
            self.left.add(rank)
            self.cond.notify_all()


class _Rank:
    def __init__(self, group: _Group, rank: int):
        self.shared, self.rank, self.size = group, rank, group.size


class _Done:
    def wait(self):
        return True


def _all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None,
                       group=None, async_op=False):
    """Equal splits along dim 0: rank ``r``'s ``output[s]`` is rank ``s``'s ``input[r]``."""
    assert output_split_sizes is None and input_split_sizes is None
    n, shared = group.size, group.shared
    shared.all_to_alls[group.rank] += 1
    received = shared.collective(group.rank, "all_to_all", input.reshape(n, -1).clone(),
                                 lambda sources: torch.stack([s[group.rank] for s in sources]))
    output.view(n, -1).copy_(received)
    return _Done() if async_op else None


def _all_reduce(tensor, op=None, group=None, async_op=False):
    assert op == dist.ReduceOp.MAX
    tensor.copy_(group.shared.collective(group.rank, "all_reduce_max", tensor.clone(),
                                         lambda values: torch.stack(values).amax(0)))
    return _Done() if async_op else None


@pytest.fixture
def simulated_dist(monkeypatch):
    """torch.distributed as the EP code sees it, with ``group`` a ``_Rank``."""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: group.rank)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: group.size)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(dist, "all_to_all_single", _all_to_all_single)
    monkeypatch.setattr(dist, "all_reduce", _all_reduce)


def run_ranks(n: int, fn) -> tuple:
    """``(results, group)``: ``fn(rank)`` on ``n`` threads, ``rank`` a ``_Rank``. Each result is
    what ``fn`` returned or the exception it raised."""
    group = _Group(n)
    results = [None] * n

    def body(r):
        try:
            results[r] = fn(_Rank(group, r))
        except BaseException as error:  # noqa: BLE001 - handed to the test
            results[r] = error
        finally:
            group.leave(r)

    threads = [threading.Thread(target=body, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, group


def _raise_first(results):
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def _poison(dispatcher) -> list:
    """Every buffer the dispatcher owns, filled with NaN (to prove a refused step wrote none)."""
    buffers = list(dispatcher._send) + [t for bufs in dispatcher._bufs for t in bufs.values()]
    for b in buffers:
        b.fill_(float("nan"))
    return buffers


# --- the dispatcher at the capacity boundary ---------------------------------------------------

NUM_EXPERTS, TOP_K, HIDDEN, INTER, MAX_CAPACITY = 8, 3, 6, 5, 5


def _layer_inputs(n: int, tokens: int, seed: int = 0):
    """Per rank ``(hidden [T, H], weights [T, K], ids [T, K])`` (float64) and the expert
    weights. Every rank's last pair is padding (id -1), so the scratch row after the send
    buffer's last slot is written too."""
    rng = np.random.default_rng(seed + n)
    gate, up = (torch.tensor(rng.normal(size=(NUM_EXPERTS, HIDDEN, INTER))) for _ in range(2))
    down = torch.tensor(rng.normal(size=(NUM_EXPERTS, INTER, HIDDEN)))
    per_rank = []
    for _ in range(n):
        ids = np.stack([rng.choice(NUM_EXPERTS, TOP_K, replace=False) for _ in range(tokens)])
        ids[-1, -1] = -1
        h = torch.tensor(rng.normal(size=(tokens, HIDDEN)))
        w = torch.tensor(rng.random(size=(tokens, TOP_K))).masked_fill(torch.tensor(ids) < 0, 0)
        per_rank.append((h, w, torch.tensor(ids)))
    return per_rank, (gate, up, down)


def _dispatcher(rank, max_capacity=MAX_CAPACITY):
    return ep.ExpertParallelDispatcher(NUM_EXPERTS, hidden_size=HIDDEN,
                                       max_capacity=max_capacity, dtype=torch.float64,
                                       device="cpu", group=rank)


def _one_device(h, w, ids, experts):
    local = moe.LocalDispatcher(NUM_EXPERTS)
    dispatched = local.dispatch_launch(h, w, ids)
    return local.combine_launch(local.experts(dispatched, *experts), dispatched)


@pytest.mark.parametrize("ranks", [2, 4])
def test_a_step_at_max_capacity_equals_the_spec_and_one_device(simulated_dist, ranks):
    """``capacity == max_capacity`` (every slot of the send buffer and its scratch row in use,
    every rank full): each rank's send buffer and receive buffer equal the JAX spec's bit for
    bit, and each rank's output equals one device's MoE on its tokens. float64 but for the
    activation, which both round to float32 once: the bound of
    test_expert_parallel_layout.test_simulated_ranks_equal_one_device, 2^-24 relative."""
    per_rank, experts = _layer_inputs(ranks, MAX_CAPACITY)

    def step(rank):
        d = _dispatcher(rank)
        h, w, ids = per_rank[rank.rank]
        handle = d.dispatch_launch(h, w, ids, micro_batch=0, capacity=MAX_CAPACITY)
        send = handle.keep[0].clone()
        handle = d.dispatch_wait(handle)
        recv = handle.recv.clone()
        out = d.experts(handle, *(d.experts_of(x) for x in experts))
        return send, recv, d.combine_wait(d.combine_launch(out, handle))

    results, group = run_ranks(ranks, step)
    _raise_first(results)
    assert group.all_to_alls == [2] * ranks  # dispatch and combine, on every rank
    with jax.enable_x64(True):
        h_all = jnp.asarray(torch.cat([h for h, _, _ in per_rank]).numpy())
        ids_all = jnp.asarray(torch.cat([ids for _, _, ids in per_rank]).numpy(), jnp.int32)
        want_recv = np.asarray(spec_ep.dispatch_all_ranks(h_all, ids_all, num_ranks=ranks,
                                                          num_experts=NUM_EXPERTS))
        for r, (send, recv, got) in enumerate(results):
            h, w, ids = per_rank[r]
            want_send = spec_ep.dispatch_send_buffer(jnp.asarray(h.numpy()),
                                                     jnp.asarray(ids.numpy(), jnp.int32),
                                                     num_ranks=ranks, num_experts=NUM_EXPERTS)
            np.testing.assert_array_equal(send.numpy(), np.asarray(want_send))
            np.testing.assert_array_equal(recv.numpy(), want_recv[r])
            want = _one_device(h, w, ids, experts)
            assert got.shape == want.shape == (MAX_CAPACITY, HIDDEN)
            assert float((got - want).abs().max()) <= 2.0 ** -24 * float(want.abs().max())


@pytest.mark.parametrize("ranks", [2, 4])
def test_one_row_past_max_capacity_is_refused_before_any_exchange(simulated_dist, ranks):
    """``capacity == max_capacity + 1``: a ValueError naming both numbers on every rank, no
    exchange started and not one byte of the dispatcher's buffers written."""
    per_rank, _ = _layer_inputs(ranks, MAX_CAPACITY)

    def step(rank):
        d = _dispatcher(rank)
        buffers = _poison(d)
        h, w, ids = per_rank[rank.rank]
        with pytest.raises(ValueError, match=rf"ep_capacity {MAX_CAPACITY + 1} exceeds .*"
                                             rf"max_capacity {MAX_CAPACITY}"):
            d.dispatch_launch(h, w, ids, micro_batch=0, capacity=MAX_CAPACITY + 1)
        return all(bool(b.isnan().all()) for b in buffers)

    results, group = run_ranks(ranks, step)
    assert _raise_first(results) == [True] * ranks
    assert group.all_to_alls == [0] * ranks


def test_check_capacity_boundaries(simulated_dist):
    """``num_tokens <= capacity <= max_capacity``, each end inclusive: the largest legal pair
    passes, one more on either side is refused with the argument named."""

    def check(rank):
        d = _dispatcher(rank)
        d.check_capacity(MAX_CAPACITY, MAX_CAPACITY)  # both ends at once
        d.check_capacity(1, 1)
        d.check_capacity(1, 0)  # an empty micro-batch
        with pytest.raises(ValueError, match="max_capacity"):
            d.check_capacity(MAX_CAPACITY + 1, MAX_CAPACITY)
        with pytest.raises(ValueError, match=f"{MAX_CAPACITY + 1} tokens exceeds ep_capacity "
                                             f"{MAX_CAPACITY}"):
            d.check_capacity(MAX_CAPACITY, MAX_CAPACITY + 1)
        with pytest.raises(ValueError, match="ep_capacity must be an int >= 1"):
            d.check_capacity(0, 0)

    _raise_first(run_ranks(2, check)[0])


def test_a_micro_batch_of_capacity_tokens_is_sent_and_one_more_is_refused(simulated_dist):
    """The tokens side at the launch: ``T == capacity`` goes through (the spec's send
    buffer); ``T == capacity + 1`` is a ValueError before the send buffer is written, not a
    token silently landing in the next expert's slot (row ``e*C + C`` is ``(e+1)*C + 0``)."""
    capacity = MAX_CAPACITY - 2
    per_rank, _ = _layer_inputs(2, capacity + 1)

    def step(rank):
        d = _dispatcher(rank)
        h, w, ids = per_rank[rank.rank]
        buffers = _poison(d)
        with pytest.raises(ValueError, match=f"{capacity + 1} tokens exceeds ep_capacity "
                                             f"{capacity}"):
            d.dispatch_launch(h, w, ids, micro_batch=0, capacity=capacity)
        untouched = all(bool(b.isnan().all()) for b in buffers)
        handle = d.dispatch_launch(h[:capacity], w[:capacity], ids[:capacity], micro_batch=0,
                                   capacity=capacity)
        d.dispatch_wait(handle)
        return untouched, handle.keep[0].clone(), (h[:capacity], ids[:capacity])

    results, group = run_ranks(2, step)
    _raise_first(results)
    assert group.all_to_alls == [1, 1]  # only the accepted dispatch
    for untouched, send, (h, ids) in results:
        assert untouched
        with jax.enable_x64(True):
            want = spec_ep.dispatch_send_buffer(jnp.asarray(h.numpy()),
                                                jnp.asarray(ids.numpy(), jnp.int32),
                                                num_ranks=2, num_experts=NUM_EXPERTS)
            np.testing.assert_array_equal(send.numpy(), np.asarray(want))


# --- the model at the capacity boundary --------------------------------------------------------


def _cases():
    """Two ranks of one step: rank 0 the larger batch (it sets the capacity), rank 1 smaller."""
    from tbo_parity.parity_tests.model_parity import ModelCase

    return [ModelCase("DECODE", (3, 7, 4, 6, 5, 2), seed=91),
            ModelCase("TARGET_VERIFY", (4, 6), draft_token_num=2, seed=92)]


def _run_model(ranks, cases, *, tbo, max_capacity):
    """Each rank: the sharded model on its case, the step agreed by ``agree_ep_step``.
    Returns per rank ``(step, outputs or the exception, buffers untouched, kv untouched)``."""
    from tbo_parity.parity_tests import model_parity as mp
    from tbo_parity.torch_impl.attention import TboAttnBackend
    from tbo_parity.torch_impl.batch_splitter import TboForwardBatchPreparer
    from tbo_parity.torch_impl.model import MoEModel

    ref_cfg, torch_cfg, weights, _ = mp.make_models(0)
    worlds = [mp.build_world(case, ref_cfg) for case in cases]

    def rank_fn(rank):
        d = ep.ExpertParallelDispatcher(torch_cfg.num_experts, hidden_size=torch_cfg.hidden_size,
                                        max_capacity=max_capacity, dtype=torch.float32,
                                        device="cpu", group=rank)
        model = MoEModel(torch_cfg, weights, dispatcher=d)
        batch = mp.torch_batch(worlds[rank.rank], dtype=torch.float32, device="cpu")
        backend = TboAttnBackend()
        if tbo:
            batch = TboForwardBatchPreparer().prepare(batch)
        step = ep.agree_ep_step(batch, micro_batches=2 if tbo else 1, group=rank)
        backend.init_forward_metadata(batch)
        buffers = _poison(d)
        try:
            out = model(batch, backend, ep_step=step)
        except ValueError as error:
            return (step, ep.micro_batch_rows(batch), error,
                    all(bool(b.isnan().all()) for b in buffers),
                    np.array_equal(batch.kv_pool.k.numpy(), worlds[rank.rank].k_pool))
        return step, ep.micro_batch_rows(batch), {
            "hidden": out.hidden.numpy(), "logits": out.logits.numpy(),
            "k_pool": batch.kv_pool.k.numpy(), "v_pool": batch.kv_pool.v.numpy(),
            "expert_load": out.expert_load.numpy()}, None, None

    results, group = run_ranks(ranks, rank_fn)
    return _raise_first(results), group, worlds, (ref_cfg, weights)


def _largest_rows(tbo: bool) -> int:
    """Rank 0's largest micro-batch, from the case itself: 6 DECODE tokens plain; under TBO
    child B holds the last 6 - 6 // 2 = 3 (docs/spec.md, DECODE splits at bs // 2)."""
    return 3 if tbo else 6


@pytest.mark.parametrize("tbo", [False, True], ids=["plain", "tbo"])
def test_the_model_at_max_capacity_equals_the_spec_on_every_rank(simulated_dist, tbo):
    """The step the largest captured graph runs: the agreed capacity is exactly the
    dispatcher's ``max_capacity``. It is accepted, and each rank's hidden states, logits, KV
    pools and expert load equal the single-device JAX spec on that rank's batch (float32,
    the model bound of parity_tests/test_model_parity.py)."""
    from tbo_parity.parity_tests import model_parity as mp

    rows = _largest_rows(tbo)
    results, group, worlds, (ref_cfg, weights) = _run_model(2, _cases(), tbo=tbo,
                                                            max_capacity=rows)
    assert [r[0] for r in results] == [ep.EPStep(rows, 2 if tbo else 1, "decode")] * 2
    assert results[0][1] == rows  # rank 0 sets the capacity, rank 1 offers fewer rows
    assert results[1][1] < rows
    assert all(n > 0 for n in group.all_to_alls)
    for (_, _, got, _, _), world in zip(results, worlds):
        want = mp.run_jax(world, ref_cfg, weights)
        assert all(got[n].shape == want[n].shape for n in got)
        errors = mp.relative_errors(got, want)
        assert max(errors.values()) <= mp.BOUNDS["float32"], errors
        np.testing.assert_array_equal(got["expert_load"], want["expert_load"])


@pytest.mark.parametrize("tbo", [False, True], ids=["plain", "tbo"])
def test_the_model_one_row_past_max_capacity_is_refused_on_every_rank(simulated_dist, tbo):
    """The same step with a dispatcher sized one row smaller: every rank (also the one whose
    own batch would fit) refuses with a ValueError naming ``max_capacity`` before anything
    runs: no exchange, no buffer and no KV-cache slot written."""
    rows = _largest_rows(tbo)
    results, group, _, _ = _run_model(2, _cases(), tbo=tbo, max_capacity=rows - 1)
    for step, _, error, buffers_untouched, kv_untouched in results:
        assert step.capacity == rows
        assert isinstance(error, ValueError) and "max_capacity" in str(error), error
        assert f"ep_capacity {rows} exceeds" in str(error)
        assert buffers_untouched and kv_untouched
    assert group.all_to_alls == [0, 0]


# --- every rank idle: what the ranks agree on --------------------------------------------------


def _idle_or(case_of_rank, n, micro_batches):
    """``agree_ep_step`` on ``n`` ranks, rank r's batch ``case_of_rank(r)`` (None: IDLE)."""
    from tbo_parity.parity_tests import model_parity as mp
    from tbo_parity.parity_tests.model_parity import ModelCase

    ref_cfg, _, _, _ = mp.make_models(0)

    def rank_fn(rank):
        case = case_of_rank(rank.rank) or ModelCase("IDLE", ())
        batch = mp.torch_batch(mp.build_world(case, ref_cfg), dtype=torch.float32,
                               device="cpu")
        return ep.agree_ep_step(batch, micro_batches=micro_batches, group=rank)

    results, group = run_ranks(n, rank_fn)
    return _raise_first(results)


@pytest.mark.parametrize("micro_batches", [1, 2])
@pytest.mark.parametrize("ranks", [2, 4])
def test_every_rank_idle_agrees_on_the_smallest_decode_step(simulated_dist, ranks,
                                                            micro_batches):
    """No rank has a token: the capacity is the largest micro-batch over ranks (0) raised to
    the smallest legal one, 1; no busy rank names a layout, so it is IDLE's own, decode (IDLE
    is DECODE at ``real_bs = 0``, docs/spec.md); the micro-batches stay the caller's. Every
    rank gets the same step. The other side of the edge: one busy EXTEND rank of 5 tokens
    makes it ``(5, prefill)`` for everyone, the idle ranks following."""
    from tbo_parity.parity_tests.model_parity import ModelCase

    assert _idle_or(lambda r: None, ranks, micro_batches) == \
        [ep.EPStep(1, micro_batches, "decode")] * ranks
    busy = ModelCase("EXTEND", (0,), (5,), seed=3)
    assert _idle_or(lambda r: busy if r == ranks - 1 else None, ranks, 1) == \
        [ep.EPStep(5, 1, "prefill")] * ranks


# --- configuration the dispatcher refuses, and what it allocates --------------------------------
# (written against the survivors of the mutation run, docs/testing.md: each refusal is pinned
# to its exact message start, each boundary on both sides)


@pytest.mark.parametrize("name", ["hidden_size", "max_capacity"])
def test_dispatcher_sizes_from_one_accepted_below_or_not_an_int_refused(simulated_dist, name):
    group = _Group(2)
    kwargs = dict(hidden_size=HIDDEN, max_capacity=MAX_CAPACITY, dtype=torch.float64,
                  device="cpu", group=_Rank(group, 0))
    d = ep.ExpertParallelDispatcher(NUM_EXPERTS, **kwargs | {name: 1})
    assert getattr(d, name) == 1
    for bad in (0, -1, True, 2.0, "2"):
        with pytest.raises(ValueError, match=rf"^{name} must be an int >= 1, got "):
            ep.ExpertParallelDispatcher(NUM_EXPERTS, **kwargs | {name: bad})


class _StubTransport:
    """A transport object: every method of ep.TRANSPORT_METHODS, delegating to all_to_all."""

    def __init__(self, missing=None):
        inner = ep.AllToAllTransport()
        for method in ep.TRANSPORT_METHODS:
            if method != missing:
                setattr(self, method, getattr(inner, method))


def test_dispatcher_transport_names_and_objects(simulated_dist):
    """A known name or an object with every transport method is taken as given; an unknown
    name, an object missing one method, and the copy engines on a CPU are refused."""
    rank = _Rank(_Group(2), 0)

    def make(transport, device="cpu"):
        return ep.ExpertParallelDispatcher(NUM_EXPERTS, hidden_size=HIDDEN, max_capacity=2,
                                           dtype=torch.float64, device=device, group=rank,
                                           transport=transport)

    assert isinstance(make("all_to_all").transport, ep.AllToAllTransport)
    assert make("all_to_all").transport.group is rank
    stub = _StubTransport()
    assert make(stub).transport is stub
    with pytest.raises(ValueError, match=r"^transport must be one of \['all_to_all', "
                                         r"'copy_engine'\] or a transport object, got 'nccl'"):
        make("nccl")
    for missing in ep.TRANSPORT_METHODS:
        with pytest.raises(ValueError, match=r"^transport object .* lacks one of "):
            make(_StubTransport(missing))
    with pytest.raises(ValueError, match=r"^transport 'copy_engine' needs CUDA devices, got "
                                         r"device cpu$"):
        make("copy_engine")


def test_dispatcher_without_a_process_group_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    with pytest.raises(ValueError, match=r"^ExpertParallelDispatcher needs torch.distributed "
                                         r"initialised \(init_process_group\) first$"):
        _dispatcher(None)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dispatcher_buffers_have_the_shapes_dtype_and_device_asked(simulated_dist, dtype):
    """Two micro-batches' send buffers of ``N*L*max_capacity`` rows plus one scratch row, and
    two sets of exchange buffers; the transport allocates each in the dtype and on the device
    asked (checked on the meta device, where nothing is allocated)."""
    n = 2
    rank = _Rank(_Group(n), 1)
    d = ep.ExpertParallelDispatcher(NUM_EXPERTS, hidden_size=HIDDEN, max_capacity=3,
                                    dtype=dtype, device="cpu", group=rank)
    assert d.group is rank and d.num_experts == NUM_EXPERTS and d.local_experts == 4
    assert d.comm_stream is None and d.trace is None
    rows = n * (NUM_EXPERTS // n) * 3 + 1
    assert [(s.shape, s.dtype) for s in d._send] == [((rows * HIDDEN,), dtype)] * 2
    assert len(d._bufs) == 2
    shape = (n, 4, 3, HIDDEN)
    bufs = ep.AllToAllTransport().allocate(shape, dtype, "meta")
    assert {name: (t.shape, t.dtype, t.device.type) for name, t in bufs.items()} == {
        "raw": (shape, dtype, "meta"), "recv": ((4, n, 3, HIDDEN), dtype, "meta"),
        "out_t": (shape, dtype, "meta"), "back": (shape, dtype, "meta")}


def _stub_batch(mode, tokens, children=None):
    import types

    from tbo_parity.torch_impl.forward_mode import ForwardMode

    return types.SimpleNamespace(forward_mode=ForwardMode[mode], num_tokens=tokens,
                                 tbo_children=children)


def test_micro_batch_rows_boundaries():
    """An idle or empty batch offers 0 rows, a batch of one token 1, a split batch its larger
    child's rows."""
    import types

    child = lambda start, end: types.SimpleNamespace(tbo_parent_token_range=(start, end))  # noqa
    assert ep.micro_batch_rows(_stub_batch("IDLE", 0)) == 0
    assert ep.micro_batch_rows(_stub_batch("DECODE", 0)) == 0
    assert ep.micro_batch_rows(_stub_batch("DECODE", 1)) == 1
    assert ep.micro_batch_rows(_stub_batch("EXTEND", 7)) == 7
    assert ep.micro_batch_rows(_stub_batch("EXTEND", 7, (child(0, 3), child(3, 7)))) == 4
    assert ep.micro_batch_rows(_stub_batch("EXTEND", 7, (child(0, 5), child(5, 7)))) == 5


@pytest.mark.parametrize("modes,want", [
    (("DECODE", "IDLE"), "decode"), (("IDLE", "EXTEND"), "prefill"),
    (("TARGET_VERIFY", "DECODE"), "decode"), (("EXTEND", "DECODE"), None),
    (("DECODE", "EXTEND", "IDLE"), None),
    (("DECODE/0", "EXTEND"), "prefill"), (("DECODE/1", "EXTEND"), None),
], ids=["decode+idle", "idle+prefill", "verify+decode", "prefill+decode", "three-mixed",
        "empty-decode+prefill", "one-token-decode+prefill"])
def test_agree_ep_step_takes_the_busy_ranks_layout_and_refuses_two(simulated_dist, modes,
                                                                    want):
    """The layout is the busy ranks' (an idle rank, or one whose batch has no token, follows
    it); ranks that run both layouts in one step, even with one token, raise the same
    ValueError on every rank, none left waiting. ``MODE/n``: a batch of ``n`` tokens."""
    tokens = {"IDLE": 0, "DECODE": 2, "TARGET_VERIFY": 6, "EXTEND": 5}

    def parse(entry):
        mode, _, count = entry.partition("/")
        return mode, int(count) if count else tokens[mode]

    def step(rank):
        return ep.agree_ep_step(_stub_batch(*parse(modes[rank.rank])), micro_batches=1,
                                group=rank)

    results, _ = run_ranks(len(modes), step)
    if want is None:
        assert all(isinstance(r, ValueError) and str(r).startswith(
            "the ranks' batches run different layouts (prefill and decode) in one step")
            for r in results), results
    else:
        capacity = max(1, max(parse(m)[1] for m in modes))
        assert results == [ep.EPStep(capacity, 1, want)] * len(modes)


def test_check_capacity_refuses_a_capacity_that_is_not_an_int(simulated_dist):
    d = _dispatcher(_Rank(_Group(2), 0))
    d.check_capacity(2, 1)
    for bad in (2.0, "2", True, None):
        with pytest.raises(ValueError, match=r"^ep_capacity must be an int >= 1"):
            d.check_capacity(bad, 1)
