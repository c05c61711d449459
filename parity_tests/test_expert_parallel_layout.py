"""The PyTorch side of the expert-parallel layout, in one process: the send buffer equals the
JAX spec's bit for bit, N simulated ranks' exchange equals one device's dispatch/experts/combine,
and bad configuration is refused before anything launches (docs/model.md, "Expert
parallelism")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tbo_parity.reference import expert_parallel as spec_ep
from tbo_parity.torch_impl import expert_parallel as ep
from tbo_parity.torch_impl import moe

# Jitted: one compilation per drawn shape, where eagerly each primitive compiled per shape (140
# compilations for the 30 draws below).
spec_send_buffer = jax.jit(spec_ep.dispatch_send_buffer,
                           static_argnames=("num_ranks", "num_experts"))


def _routing(rng, tokens, num_experts, top_k, padding):
    ids = np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(tokens)])
    ids[tokens - padding:] = -1
    return ids


@settings(max_examples=30, deadline=None)  # 3 rank counts x small shapes: 30 draws span them
@given(ranks=st.sampled_from([1, 2, 4]), local=st.integers(1, 3), tokens=st.integers(1, 6),
       extra=st.integers(0, 3), top_k=st.integers(1, 4), padding=st.integers(0, 6),
       seed=st.integers(0, 2**16))
def test_send_buffer_equals_the_spec_and_holds_each_pair_in_its_slot(ranks, local, tokens, extra,
                                                                    top_k, padding, seed):
    num_experts = ranks * local
    top_k, padding = min(top_k, num_experts), min(padding, tokens)
    capacity, hidden = tokens + extra, 3
    rng = np.random.default_rng(seed)
    ids = _routing(rng, tokens, num_experts, top_k, padding)
    h = rng.normal(size=(tokens, hidden)).astype(np.float32)
    storage = torch.full(((num_experts * capacity + 1) * hidden,), float("nan"))
    send, rows = ep.send_views(storage, (ranks, local, capacity, hidden))
    ep.fill_send_buffer(rows, torch.tensor(h), torch.tensor(ids), capacity)
    # the spec's buffer, from the same tokens padded to the capacity with id -1 rows
    h_c = np.zeros((capacity, hidden), np.float32)
    h_c[:tokens] = h
    ids_c = np.full((capacity, top_k), -1)
    ids_c[:tokens] = ids
    want = spec_send_buffer(jnp.asarray(h_c), jnp.asarray(ids_c, jnp.int32),
                            num_ranks=ranks, num_experts=num_experts)
    np.testing.assert_array_equal(send.numpy(), np.asarray(want))
    filled = 0
    for t in range(tokens):
        for e in ids[t]:
            if e >= 0:
                np.testing.assert_array_equal(send[e // local, e % local, t].numpy(), h[t])
                filled += 1
    assert int((send.abs().sum(-1) > 0).sum()) <= filled  # nothing else (zero rows aside)


def simulate(hidden_per_rank, weights_per_rank, ids_per_rank, gate, up, down, capacity):
    """Every rank's dispatch -> experts -> combine in one process, the exchanges written out
    as the layout says: rank r receives send_s[r] from every s, sends out[:, sC:(s+1)C] back."""
    n = len(hidden_per_rank)
    num_experts, hidden = gate.shape[0], gate.shape[1]
    local = ep.check_layout(num_experts, n)
    sends = []
    for h, ids in zip(hidden_per_rank, ids_per_rank):
        storage = torch.empty(((num_experts * capacity + 1) * hidden,), dtype=h.dtype)
        send, rows = ep.send_views(storage, (n, local, capacity, hidden))
        ep.fill_send_buffer(rows, h, ids, capacity)
        sends.append(send)
    outs = []
    for r in range(n):
        recv = torch.stack([sends[s][r] for s in range(n)]).transpose(0, 1)  # [L, N, C, H]
        outs.append(ep.expert_swiglu(recv.reshape(local, n * capacity, hidden),
                                     *(ep.local_slice(w, r, local) for w in (gate, up, down))))
    results = []
    for s in range(n):
        back = torch.cat([outs[r][:, s * capacity:(s + 1) * capacity] for r in range(n)])
        results.append(ep.combine_from_back(back, weights_per_rank[s], ids_per_rank[s]))
    return results


@pytest.mark.parametrize("ranks", [1, 2, 4])
@pytest.mark.parametrize("routing", ["uniform", "uneven", "empty-expert", "padding"])
def test_simulated_ranks_equal_one_device(ranks, routing):
    """float64 throughout but for the activation, which both paths round to float32 once (as
    fused MoE kernels do, ``moe.swiglu``). Their float64 products differ in summation order
    only, so a rounded activation differs by at most one float32 ulp, 2^-24 relative: the
    bound. (Measured: <= 8e-10 relative.)"""
    rng = np.random.default_rng(ranks)
    num_experts, top_k, hidden, inter, capacity = 4 * ranks, 3, 8, 5, 7
    gate, up = (torch.tensor(rng.normal(size=(num_experts, hidden, inter))) for _ in range(2))
    down = torch.tensor(rng.normal(size=(num_experts, inter, hidden)))
    hs, ws, ids_all, wants = [], [], [], []
    for r in range(ranks):
        tokens = capacity - r % 3  # ranks offer different counts, all within the capacity
        experts = np.arange(num_experts)
        if routing == "empty-expert":
            experts = experts[experts != 1]
        ids = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)])
        if routing == "uneven":
            ids[:, 0] = 0
            ids[:, 1:] = np.where(ids[:, 1:] == 0, num_experts - 1, ids[:, 1:])
        if routing == "padding":
            ids[tokens // 2:] = -1
        h = torch.tensor(rng.normal(size=(tokens, hidden)))
        w = torch.tensor(rng.random(size=(tokens, top_k))).masked_fill(
            torch.tensor(ids) < 0, 0.0)
        local = moe.LocalDispatcher(num_experts)
        dispatched = local.dispatch_launch(h, w, torch.tensor(ids))
        wants.append(local.combine_launch(local.experts(dispatched, gate, up, down),
                                          dispatched))
        hs.append(h)
        ws.append(w)
        ids_all.append(torch.tensor(ids))
    for got, want in zip(simulate(hs, ws, ids_all, gate, up, down, capacity), wants):
        scale = float(want.abs().max())
        assert float((got - want).abs().max()) <= 2.0 ** -24 * scale


def test_a_wrong_source_offset_is_caught():
    """Negative test: the source rank's block offset dropped (every source writes block 0),
    so two ranks' tokens collide in one slot: the comparison above must fail."""
    rng = np.random.default_rng(0)
    n, num_experts, top_k, hidden, inter, capacity = 2, 4, 2, 4, 3, 3
    gate, up = (torch.tensor(rng.normal(size=(num_experts, hidden, inter))) for _ in range(2))
    down = torch.tensor(rng.normal(size=(num_experts, inter, hidden)))
    hs = [torch.tensor(rng.normal(size=(capacity, hidden))) for _ in range(n)]
    ids = [torch.tensor(np.stack([rng.choice(num_experts, top_k, replace=False)
                                  for _ in range(capacity)])) for _ in range(n)]
    ws = [torch.full((capacity, top_k), 0.5, dtype=torch.float64) for _ in range(n)]
    right = simulate(hs, ws, ids, gate, up, down, capacity)
    original = ep.expert_swiglu
    try:  # the receive side reads source 0's block for every source
        ep.expert_swiglu = lambda recv, g, u, d: original(
            recv.view(recv.shape[0], n, capacity, hidden)[:, :1].expand(-1, n, -1, -1)
            .reshape(recv.shape), g, u, d)
        wrong = simulate(hs, ws, ids, gate, up, down, capacity)
    finally:
        ep.expert_swiglu = original
    assert torch.equal(right[0], wrong[0]) and not torch.allclose(right[1], wrong[1])


# --- bad configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    ((6, 4), r"^num_experts \(6\) must be divisible by world_size \(4\)$"),
    ((0, 1), "^num_experts must be an int >= 1, got 0$"),
    ((4, 0), "^world_size must be an int >= 1, got 0$"),
    ((4, True), "^world_size must be an int >= 1, got True$"),
    ((4.0, 2), "^num_experts must be an int >= 1, got 4.0$")])
def test_check_layout_rejects_naming_the_argument(args, message):
    with pytest.raises(ValueError, match=message):
        ep.check_layout(*args)


def test_combine_from_back_reads_row_0_for_padding_pairs():
    """A padding pair (id -1, weight 0) reads row 0 of ``back``, as documented: a row that is
    there for every ``E`` and ``C``. Reading any other row would turn an infinity there into
    NaN (0 * inf), and with one expert and one token there is no other row."""
    back = torch.tensor([[[1.0, 2.0]], [[float("inf"), float("inf")]]])  # [E=2, C=1, H=2]
    out = ep.combine_from_back(back, torch.tensor([[0.5, 0.0]]), torch.tensor([[0, -1]]))
    assert torch.equal(out, torch.tensor([[0.5, 1.0]]))
    one = ep.combine_from_back(torch.ones(1, 1, 2), torch.tensor([[0.0]]),
                               torch.tensor([[-1]]))
    assert torch.equal(one, torch.zeros(1, 2))


@pytest.mark.parametrize("kwargs,name", [
    ({"capacity": 0}, "capacity"), ({"capacity": True}, "capacity"),
    ({"micro_batches": 3}, "micro_batches"), ({"micro_batches": True}, "micro_batches"),
    ({"strategy": "chunked"}, "strategy")])
def test_ep_step_rejects(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ep.EPStep(**({"capacity": 4, "micro_batches": 1, "strategy": "decode"} | kwargs))


def test_dispatcher_needs_an_initialised_process_group():
    with pytest.raises(ValueError, match="init_process_group"):
        ep.ExpertParallelDispatcher(8, hidden_size=4, max_capacity=4, dtype=torch.float32,
                                    device="cpu")


class _TwoRanks(ep.ExpertParallelDispatcher):
    """A dispatcher that says it has two ranks, for checks that run before any exchange (no
    process group: nothing here may communicate)."""

    def __init__(self, num_experts, max_capacity):
        self.rank, self.world_size, self.num_experts = 0, 2, num_experts
        self.local_experts, self.max_capacity = num_experts // 2, max_capacity

    def dispatch_launch(self, *args, **kwargs):
        raise AssertionError("an exchange was launched")


def _ep_model_and_batch():
    from tbo_parity.parity_tests import model_parity as mp
    from tbo_parity.torch_impl.attention import TboAttnBackend
    from tbo_parity.torch_impl.model import MoEModel

    ref_cfg, torch_cfg, weights, _ = mp.make_models(0)
    model = MoEModel(torch_cfg, weights, dispatcher=_TwoRanks(torch_cfg.num_experts, 8))
    world = mp.build_world(mp.ModelCase("DECODE", (3, 5, 4), seed=1), ref_cfg)
    batch = mp.torch_batch(world, dtype=torch.float32, device="cpu")
    backend = TboAttnBackend()
    backend.init_forward_metadata(batch)
    return model, batch, backend


@pytest.mark.parametrize("step,words", [
    (None, "ep_step"), (ep.EPStep(4, 1, "prefill"), "strategy"),
    (ep.EPStep(4, 2, "decode"), "micro_batches"), (ep.EPStep(2, 1, "decode"), "exceeds"),
    (ep.EPStep(9, 1, "decode"), "max_capacity")])
def test_a_step_that_does_not_fit_is_refused_before_any_exchange(step, words):
    model, batch, backend = _ep_model_and_batch()
    assert model.layers[0].experts_gate.shape[0] == 4  # the rank holds half the experts
    with pytest.raises(ValueError, match=words):
        model(batch, backend, ep_step=step)


def test_a_local_model_refuses_an_ep_step():
    from tbo_parity.parity_tests import model_parity as mp
    from tbo_parity.torch_impl.attention import TboAttnBackend

    ref_cfg, _, _, model = mp.make_models(0)
    batch = mp.torch_batch(mp.build_world(mp.ModelCase("DECODE", (3,), seed=1), ref_cfg),
                           dtype=torch.float32, device="cpu")
    backend = TboAttnBackend()
    backend.init_forward_metadata(batch)
    with pytest.raises(ValueError, match="local"):
        model(batch, backend, ep_step=ep.EPStep(1, 1, "decode"))
