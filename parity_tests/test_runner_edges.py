"""The CUDA-graph runner and its TBO plugin at their boundaries: which batches replay and which
fall back, which graph a data-parallel rank replays, what the static buffers hold before a
replay, and what the plugin's public hooks refuse.

Each test checks both sides of its boundary (the last value that replays or is accepted, and
the first that falls back or is refused). The property test draws random capture sets, real
batch sizes, draft counts and data-parallel sizes and holds the runner's plan and buffers to
the JAX spec of the replay plan (``reference/replay_plan.py``).

On a CPU the runner takes its replay path with the captured forward called eagerly
(``use_cuda_graph=False``): everything here holds for a GPU replay too, except the graph
itself, which ``parity_tests/test_cuda_graph.py`` replays with ``-m gpu``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tbo_parity.parity_tests import model_parity as mp
from tbo_parity.parity_tests.graph_parity import (SCENARIOS, GraphHarness, GraphScenario,
                                                  check_step, idle_batch)
from tbo_parity.reference import replay_plan as spec
from tbo_parity.reference import split as spec_split
from tbo_parity.torch_impl.batch_splitter import TboForwardBatchPreparer
from tbo_parity.torch_impl.cuda_graph_runner import (SEQ_LEN_FILL, CaptureSet, CudaGraphRunner,
                                                     GraphKey)
from tbo_parity.torch_impl.forward_mode import ForwardMode
from tbo_parity.torch_impl.two_batch_overlap import TboCudaGraphRunnerPlugin

GRAPH_CONTEXT = 16  # what the context-boundary runners capture for (the layout holds 24)
BOUND = 1e-5  # float32, every pair (graph_parity.BOUNDS)
SPEC_DECODE = spec_split.ForwardMode.DECODE


def _case(mode: str, prefix: tuple, draft=None, seed: int = 1) -> mp.ModelCase:
    return mp.ModelCase(mode, prefix, draft_token_num=draft, seed=seed)


@pytest.fixture(scope="module")
def context_harness():
    """``get(tbo)``: a runner capturing graphs of 2 and 4 sequences, DECODE and
    TARGET_VERIFY with 3 drafts, for a context of ``GRAPH_CONTEXT`` columns (the layout holds
    5 requests of 24)."""
    built = {}

    def get(tbo: bool) -> GraphHarness:
        if tbo not in built:
            built[tbo] = GraphHarness(device="cpu", tbo=tbo, max_bs=5, max_context_len=24,
                                      graph_context_len=GRAPH_CONTEXT, batch_sizes=(2, 4),
                                      draft_token_nums=(3,))
        return built[tbo]

    return get


# --- which batches replay, which fall back ----------------------------------------------------


@pytest.mark.parametrize("tbo", [False, True], ids=["plain", "tbo"])
@pytest.mark.parametrize("mode,draft,fits,too_long", [
    # DECODE reads seq_len columns (prefix + the new token).
    ("DECODE", None, (GRAPH_CONTEXT - 1, 3), (GRAPH_CONTEXT, 3)),
    # TARGET_VERIFY reads seq_len + draft columns: a prefix of GRAPH_CONTEXT - 2 has a seq_len
    # that fits the captured context, but not once its 3 drafts are added.
    ("TARGET_VERIFY", 3, (GRAPH_CONTEXT - 3, 3), (GRAPH_CONTEXT - 2, 3)),
], ids=["decode", "verify"])
def test_context_boundary_replays_up_to_the_captured_width_then_falls_back(
        context_harness, tbo, mode, draft, fits, too_long):
    """The longest sequence reading exactly the captured columns replays, and equals the eager
    forward and the spec; one column more runs the eager forward (never a replay cut short)
    and says why."""
    h = context_harness(tbo)
    fallbacks = dict(h.runner.fallbacks)
    world = mp.build_world(_case(mode, fits, draft), h.ref_cfg, h.layout)
    report = check_step(h, world)
    assert report["ok"] and report["emulated"] and not report["replayed"], report
    longer = mp.build_world(_case(mode, too_long, draft), h.ref_cfg, h.layout)
    if draft is not None:  # the seq_len alone would fit: only the drafts overflow
        assert int(longer.seq_lens.max()) <= GRAPH_CONTEXT
    out, result = h.run_runner(longer)
    assert not result.replay_path and result.fallback.kind == "context", result.fallback
    eager = h.run_eager(longer)
    assert all(np.array_equal(out[name], eager[name]) for name in out)
    assert h.runner.fallbacks["context"] == fallbacks.get("context", 0) + 1


@pytest.mark.parametrize("tbo", [False, True], ids=["plain", "tbo"])
def test_batch_size_boundary_replays_the_largest_graph_then_falls_back(context_harness, tbo):
    h = context_harness(tbo)
    report = check_step(h, mp.build_world(_case("DECODE", (3, 9, 1, 6)), h.ref_cfg, h.layout))
    assert report["ok"] and report["graph_bs"] == 4, report
    _, result = h.run_runner(mp.build_world(_case("DECODE", (3, 9, 1, 6, 2)), h.ref_cfg,
                                            h.layout))
    assert not result.replay_path and result.fallback.kind == "batch_size"


def test_the_runner_counts_every_replay_and_every_fallback(context_harness):
    """``replays`` counts each launch of the replay path and ``fallbacks`` each eager fallback,
    by its reason: three replays add three, two over-long batches add two under "context", and
    a fallback's result says ``replayed=False`` (a bool, as its type says)."""
    h = context_harness(False)
    replays, context = h.runner.replays, h.runner.fallbacks["context"]
    fits = mp.build_world(_case("DECODE", (GRAPH_CONTEXT - 1, 3)), h.ref_cfg, h.layout)
    too_long = mp.build_world(_case("DECODE", (GRAPH_CONTEXT, 3)), h.ref_cfg, h.layout)
    for _ in range(3):
        assert h.run_runner(fits)[1].replay_path
    for _ in range(2):
        result = h.run_runner(too_long)[1]
        assert result.fallback.kind == "context" and result.replayed is False
    assert (h.runner.replays, h.runner.fallbacks["context"]) == (replays + 3, context + 2)


# --- the runner's configuration, each check on both sides of its boundary ---------------------


@pytest.fixture(scope="module")
def parts():
    """A model and a serving layout (3 requests of 6 columns) to build runners from."""
    return GraphHarness(device="cpu", tbo=False, max_bs=3, max_context_len=6, batch_sizes=(1,),
                        draft_token_nums=())


def _build(h: GraphHarness, **overrides) -> CudaGraphRunner:
    """A runner of one DECODE graph over fresh copies of the harness's pools (a capture
    writes the padding slot and row)."""
    pool = overrides.pop("kv_pool", None) or h.pool.clone()
    req_to_token = overrides.pop("req_to_token", h.req_to_token.clone())
    kwargs = dict(max_context_len=h.max_context_len, padding_slot=h.layout.padding_slot,
                  padding_req_row=h.layout.padding_req_row, batch_sizes=(1,)) | overrides
    return CudaGraphRunner(h.model, pool, req_to_token, **kwargs)


def _config_cases(h: GraphHarness) -> list:
    """(overrides, None if accepted else the argument the refusal starts with)."""
    rows, columns = h.req_to_token.shape
    slots = h.pool.k.shape[1]
    return [
        (dict(draft_token_nums=(1,)), None), (dict(draft_token_nums=(1, 2)), None),
        (dict(draft_token_nums=(0,)), "draft_token_nums"),
        (dict(draft_token_nums=(True,)), "draft_token_nums"),
        (dict(draft_token_nums=(1.0,)), "draft_token_nums"),
        # A padding sequence reads seq_len 1 plus its drafts: max_context_len from 1 + max d
        # (1 with no drafts) to the table's width.
        (dict(max_context_len=1), None), (dict(max_context_len=0), "max_context_len"),
        (dict(max_context_len=4, draft_token_nums=(3,)), None),
        (dict(max_context_len=3, draft_token_nums=(3,)), "max_context_len"),
        (dict(max_context_len=columns), None),
        (dict(max_context_len=columns + 1), "max_context_len"),
        (dict(max_context_len=True), "max_context_len"),
        (dict(max_context_len=float(columns)), "max_context_len"),
        (dict(padding_slot=0), None), (dict(padding_slot=slots - 1), None),
        (dict(padding_slot=slots), "padding_slot"), (dict(padding_slot=-1), "padding_slot"),
        (dict(padding_slot=1.0), "padding_slot"), (dict(padding_slot=True), "padding_slot"),
        (dict(padding_req_row=0), None), (dict(padding_req_row=rows - 1), None),
        (dict(padding_req_row=rows), "padding_req_row"),
        (dict(padding_req_row=1.0), "padding_req_row"),
        # Pools on another device than the model ("meta" stands in for a second device).
        (dict(req_to_token=h.req_to_token.to("meta")), "req_to_token"),
        (dict(kv_pool=dataclasses.replace(h.pool.clone(), k=h.pool.k.to("meta"))), "kv_pool.k"),
        (dict(kv_pool=dataclasses.replace(h.pool.clone(), v=h.pool.v.to("meta"))), "kv_pool.v"),
    ]


def test_configuration_boundaries_accept_the_last_valid_value_and_refuse_the_first_invalid(
        parts):
    """Each check of the runner's configuration on both sides of its boundary: the accepted
    values build a runner; each refusal is a ValueError whose message starts with the
    argument, before anything is captured."""
    for overrides, refused in _config_cases(parts):
        if refused is None:
            assert isinstance(_build(parts, **overrides), CudaGraphRunner), overrides
        else:
            with pytest.raises(ValueError, match=f"^{refused}"):
                _build(parts, **overrides)


def test_without_decode_graphs_decode_and_idle_fall_back_for_their_mode(parts):
    """A runner of TARGET_VERIFY graphs only: a DECODE batch and an IDLE one (which replays the
    DECODE graphs) both run eagerly, each refused for its mode, and the reasons say which
    graphs are missing; a refusal names its numbers (the batch size, the context)."""
    runner = _build(parts, decode=False, draft_token_nums=(3,), max_context_len=5)
    decode = mp.torch_batch(mp.build_world(_case("DECODE", (2,)), parts.ref_cfg, parts.layout),
                            dtype=torch.float32, device="cpu",
                            pools=(runner.req_to_token, runner.kv_pool))
    idle = idle_batch(runner.req_to_token, runner.kv_pool)
    for batch, reason in ((decode, "no DECODE graphs"), (idle, "IDLE replays the DECODE")):
        result = runner.forward(batch)
        assert not result.replay_path and result.fallback.kind == "mode", result.fallback
        assert result.fallback.message.startswith(reason), result.fallback
    assert dict(runner.fallbacks) == {"mode": 2}


def test_a_verify_batch_without_spec_info_is_refused_before_anything_runs(context_harness):
    """Its draft count picks the graph: without one the runner neither replays nor falls back
    (the eager forward would fail inside attention), it refuses the batch."""
    h = context_harness(False)
    world = mp.build_world(_case("TARGET_VERIFY", (3, 5), 3), h.ref_cfg, h.layout)
    batch = dataclasses.replace(h.batch(world), spec_info=None)
    fallbacks, replays = dict(h.runner.fallbacks), h.runner.replays
    h.reset_pool()
    for call in (h.runner.forward, h.runner.refusal, h.runner.prepare_replay):
        with pytest.raises(ValueError, match="^batch.spec_info is required in TARGET_VERIFY"):
            call(batch)
    assert (dict(h.runner.fallbacks), h.runner.replays) == (fallbacks, replays)
    assert torch.equal(h.pool.k, h.initial.k) and torch.equal(h.pool.v, h.initial.v)


def test_fallback_reasons_name_the_size_and_context_refused(context_harness):
    h = context_harness(False)
    too_many = h.run_runner(mp.build_world(_case("DECODE", (3, 9, 1, 6, 2)), h.ref_cfg,
                                           h.layout))[1]
    assert "batch_size=5" in too_many.fallback.message and "(4)" in too_many.fallback.message
    too_long = h.run_runner(mp.build_world(_case("DECODE", (GRAPH_CONTEXT, 3)), h.ref_cfg,
                                           h.layout))[1]
    assert f"max_context_len={GRAPH_CONTEXT}" in too_long.fallback.message


def test_the_tbo_eager_forward_splits_every_batch_but_an_idle_one(context_harness, monkeypatch):
    """Under TBO the runner's eager forward (its fallback) runs the batch split in two by the
    preparer, as the replay does; an IDLE batch has nothing to split and is not prepared."""
    h = context_harness(True)
    prepared = []
    real_prepare = TboForwardBatchPreparer.prepare
    monkeypatch.setattr(TboForwardBatchPreparer, "prepare", lambda self, batch: (
        prepared.append(batch.forward_mode) or real_prepare(self, batch)))
    h.run_eager(mp.build_world(_case("DECODE", (3, 9)), h.ref_cfg, h.layout))
    h.runner.eager(idle_batch(h.req_to_token, h.pool))
    assert prepared == [ForwardMode.DECODE]


# --- which graphs, by key ---------------------------------------------------------------------


def test_keys_are_typed_decode_first_and_largest_first(context_harness):
    """One key per captured graph, a ``GraphKey`` of the mode, tokens per sequence and
    sequences (no string to parse back); the captured forwards are stored under them."""
    runner = context_harness(False).runner
    decode, verify = ForwardMode.DECODE, ForwardMode.TARGET_VERIFY
    assert runner.captures == CaptureSet(True, (3,), (2, 4), GRAPH_CONTEXT)
    assert runner.keys() == [GraphKey(decode, 1, 4), GraphKey(decode, 1, 2),
                             GraphKey(verify, 3, 4), GraphKey(verify, 3, 2)]
    assert list(runner._graphs) == runner.keys()
    assert [key.num_tokens for key in runner.keys()] == [4, 2, 12, 6]
    assert CaptureSet(False, (2, 5), (1,), 8).keys() == [GraphKey(verify, 2, 1),
                                                         GraphKey(verify, 5, 1)]


@pytest.mark.parametrize("draft,captured", [
    (3, True), (np.int64(3), True), (torch.tensor(3), True),
    (4, False), (True, False), (3.0, False), ("3", False), (None, False),
], ids=["int", "numpy", "0-dim-tensor", "other", "bool", "float", "str", "none"])
def test_a_verify_batch_finds_its_graphs_by_the_value_of_its_draft_count(context_harness,
                                                                         draft, captured):
    """Any integral scalar naming a captured draft count finds its graphs; anything else is
    refused as ``draft_token_num`` (the batch then runs eagerly)."""
    h = context_harness(True)
    batch = h.batch(mp.build_world(_case("TARGET_VERIFY", (3, 5), 3), h.ref_cfg, h.layout))
    batch = dataclasses.replace(batch, spec_info=dataclasses.replace(
        batch.spec_info, draft_token_num=draft))
    refused = h.runner.refusal(batch)
    assert h.runner.captures.has_verify(draft) == captured
    if captured:
        assert refused is None
    else:
        assert refused.kind == "draft_token_num"
        assert refused.message == (f"no TARGET_VERIFY graph for draft_token_num={draft} "
                                   f"(captured: [3])")


# --- data-parallel graph choice ---------------------------------------------------------------


@pytest.fixture(scope="module")
def dp_harness():
    return GraphHarness(device="cpu", tbo=True, max_bs=8, batch_sizes=(2, 4, 8))


def _replay_errors(h: GraphHarness, world: mp.World, dp_batch_size) -> float:
    """The replay with ``dp_batch_size`` against the eager forward: max relative error over
    the real rows of hidden states and logits (and the expert load must be equal)."""
    h.reset_pool()
    out = h.runner.replay(h.batch(world), dp_batch_size)
    got = {"hidden": out.hidden.numpy().copy(), "logits": out.logits.numpy().copy()}
    load = out.expert_load.numpy().copy()
    h.reset_pool()
    eager = h.runner.eager(h.batch(world))
    assert np.array_equal(load, eager.expert_load.numpy())
    return max(float(np.abs(got[name] - getattr(eager, name).numpy()).max()
                     / np.abs(getattr(eager, name).numpy()).max()) for name in got)


@pytest.mark.parametrize("real_bs,dp_batch_size,graph_bs", [
    (1, 1, 2),  # dp equal to the rank's own batch: the rank's own graph
    (1, 2, 2),  # equal to a captured size
    (1, 3, 4),  # between two captured sizes: the larger
    (3, 4, 4),
    (3, 5, 8),
    (1, 8, 8),  # equal to the largest size
    (8, 8, 8),
])
def test_dp_batch_size_picks_the_graph_of_the_largest_rank(dp_harness, real_bs, dp_batch_size,
                                                            graph_bs):
    """Every rank replays the graph that fits the largest rank's batch (so all ranks run the
    same exchanges); the replay of the smaller real batch in it equals the eager forward."""
    h = dp_harness
    world = h.world(SCENARIOS["decode"], real_bs, seed=real_bs)
    plan = h.runner.plan(h.batch(world), dp_batch_size)
    assert plan.graph_bs == graph_bs
    assert plan.graph_bs == spec.plan_replay(SPEC_DECODE, dp_batch_size, h.runner.batch_sizes,
                                             tbo=True).graph_bs
    want = dataclasses.asdict(spec.plan_replay(SPEC_DECODE, real_bs, (graph_bs,), tbo=True))
    assert dataclasses.asdict(plan) == want
    assert _replay_errors(h, world, dp_batch_size) <= BOUND
    counts = h.runner.plugin.children_num_token_non_padded.tolist()
    assert tuple(counts) == want["children_num_token_non_padded"]


@pytest.mark.parametrize("dp_batch_size", [0, 9, True, 2.0], ids=["below-batch", "above-largest",
                                                                 "bool", "float"])
def test_dp_batch_size_out_of_range_is_refused_before_writing(dp_harness, dp_batch_size):
    """dp_batch_size below the rank's own batch (1 here) or above the largest graph cannot name
    a graph every rank can replay: a ValueError naming it, and the buffers untouched."""
    h = dp_harness
    batch = h.batch(h.world(SCENARIOS["decode"], 1, seed=1))
    before = h.runner.static.input_ids.clone(), h.runner.replays
    with pytest.raises(ValueError, match="dp_batch_size"):
        h.runner.replay(batch, dp_batch_size)
    assert torch.equal(h.runner.static.input_ids, before[0]) and h.runner.replays == before[1]


# --- the plan and the buffers, against the spec, on random configurations ---------------------


@pytest.fixture(scope="module")
def shared():
    """One model and serving layout of 16 requests; each example builds its own runner."""
    return GraphHarness(device="cpu", tbo=False, max_bs=16, batch_sizes=(1,),
                        draft_token_nums=())


@st.composite
def replay_configs(draw):
    tbo = draw(st.booleans())
    pool = range(2, 17, 2) if tbo else range(1, 17)
    sizes = tuple(sorted(draw(st.sets(st.sampled_from(pool), min_size=1, max_size=5))))
    drafts = tuple(sorted(draw(st.sets(st.integers(1, 4), max_size=2))))
    mode = "TARGET_VERIFY" if drafts and draw(st.booleans()) else "DECODE"
    draft = draw(st.sampled_from(drafts)) if mode == "TARGET_VERIFY" else None
    real_bs = draw(st.integers(1, sizes[-1]))
    dp = draw(st.none() | st.integers(real_bs, sizes[-1]))
    return tbo, sizes, drafts, mode, draft, real_bs, dp, draw(st.integers(0, 2**16))


@settings(max_examples=60)
@given(config=replay_configs())
def test_replay_plan_and_static_buffers_match_the_spec(shared, config):
    """For a random capture set, mode, draft count, real batch and data-parallel size: the
    runner replays the graph the spec picks for the largest rank's batch, its plan of the real
    batch in that graph equals the spec's field for field, and the static buffers hold the
    real inputs in front, padding that touches only the scratch slot and row behind, and the
    children's real counts the spec gives."""
    tbo, sizes, drafts, mode, draft, real_bs, dp, seed = config
    h = shared
    runner = CudaGraphRunner(h.model, h.pool, h.req_to_token, max_context_len=h.max_context_len,
                             padding_slot=h.layout.padding_slot,
                             padding_req_row=h.layout.padding_req_row, decode=True,
                             draft_token_nums=drafts, batch_sizes=sizes, tbo=tbo,
                             use_cuda_graph=False)
    scenario = GraphScenario(mode, draft, tree=draft is not None and draft > 1)
    batch = h.batch(h.world(scenario, real_bs, seed=seed))
    s = runner.static
    for buffer in (s.input_ids, s.positions, s.out_cache_loc, s.req_pool_indices, s.seq_lens,
                   s.custom_mask_offsets):
        buffer.fill_(-7)  # stale values a replay must overwrite wherever the graph reads
    runner.plugin.children_num_token_non_padded.fill_(-7)

    key, plan = runner.prepare_replay(batch, dp)

    spec_mode = spec_split.ForwardMode[mode]
    graph_bs = spec.plan_replay(spec_mode, real_bs if dp is None else dp, sizes, tbo=tbo,
                                draft_token_num=draft).graph_bs
    want = spec.plan_replay(spec_mode, real_bs, (graph_bs,), tbo=tbo, draft_token_num=draft)
    assert dataclasses.asdict(plan) == dataclasses.asdict(want)
    tnps = want.token_num_per_seq
    assert key == GraphKey(ForwardMode[mode], tnps, graph_bs)
    n, total = want.num_token_non_padded, want.num_tokens
    assert int(s.num_token_non_padded) == n
    for name in ("input_ids", "positions", "out_cache_loc"):
        assert torch.equal(getattr(s, name)[:n], getattr(batch, name)), name
    assert torch.equal(s.req_pool_indices[:real_bs], batch.req_pool_indices)
    assert torch.equal(s.seq_lens[:real_bs], batch.seq_lens)
    assert (s.input_ids[n:total] == 0).all() and (s.positions[n:total] == 0).all()
    assert (s.out_cache_loc[n:total] == h.layout.padding_slot).all()
    assert (s.req_pool_indices[real_bs:graph_bs] == h.layout.padding_req_row).all()
    assert (s.seq_lens[real_bs:graph_bs] == SEQ_LEN_FILL).all()
    if mode == "TARGET_VERIFY":
        block = (batch.seq_lens_cpu + draft) * draft
        assert torch.equal(s.custom_mask_offsets[:real_bs], torch.cumsum(block, 0) - block)
        assert (s.custom_mask_offsets[real_bs:graph_bs] == runner.scratch_mask_start).all()
        assert torch.equal(s.custom_mask[:int(block.sum())], batch.spec_info.custom_mask)
    counts = runner.plugin.children_num_token_non_padded.tolist()
    if tbo:
        assert tuple(counts) == want.children_num_token_non_padded
    else:
        assert counts == [-7, -7]  # a plain runner never touches the plugin


# --- the plugin's public hooks ------------------------------------------------------------------


def _plugin() -> TboCudaGraphRunnerPlugin:
    plugin = TboCudaGraphRunnerPlugin("cpu", TboForwardBatchPreparer())
    plugin.children_num_token_non_padded.copy_(torch.tensor([-7, -7]))
    return plugin


@dataclasses.dataclass
class _Spec:
    draft_token_num: int


def _spec_counts(bs: int, tnps: int, real_tokens: int) -> tuple:
    """The spec's children counts for ``real_tokens`` in a TBO graph of ``bs`` sequences."""
    _, split_token = spec_split.uniform_split_indices(bs * tnps, tnps)
    return tuple(int(c) for c in spec_split.children_num_token_non_padded(split_token,
                                                                         real_tokens))


@pytest.mark.parametrize("mode,spec_info,tnps", [
    (ForwardMode.DECODE, None, 1), (ForwardMode.TARGET_VERIFY, _Spec(3), 3),
], ids=["decode", "verify"])
@pytest.mark.parametrize("bs", [2, 4, 6])
def test_replay_prepare_accepts_up_to_the_graphs_tokens_and_refuses_one_more(mode, spec_info,
                                                                            tnps, bs):
    plugin = _plugin()
    for real in (0, 1, bs * tnps // 2, bs * tnps // 2 + 1, bs * tnps):
        written = plugin.replay_prepare(mode, bs, real, spec_info)
        assert written == _spec_counts(bs, tnps, real), real
        assert tuple(plugin.children_num_token_non_padded.tolist()) == written
    plugin.children_num_token_non_padded.copy_(torch.tensor([-7, -7]))
    with pytest.raises(ValueError, match=rf"^num_token_non_padded={bs * tnps + 1} > the "
                                         rf"graph's {bs * tnps} tokens$"):
        plugin.replay_prepare(mode, bs, bs * tnps + 1, spec_info)
    with pytest.raises(ValueError, match=r"^num_token_non_padded must be an int >= 0"):
        plugin.replay_prepare(mode, bs, -1, spec_info)
    assert plugin.children_num_token_non_padded.tolist() == [-7, -7]  # nothing written


@pytest.mark.parametrize("bs,accepted", [(0, False), (1, False), (2, True), (3, False),
                                         (4, True), (True, False), (2.0, False)])
def test_replay_prepare_takes_only_sizes_tbo_captures(bs, accepted):
    """A TBO graph holds two equal halves of at least one sequence: even sizes >= 2."""
    plugin = _plugin()
    if accepted:
        assert plugin.replay_prepare(ForwardMode.DECODE, bs, 1) == (1, 0)
        return
    with pytest.raises(ValueError, match=r"^bs must be "):
        plugin.replay_prepare(ForwardMode.DECODE, bs, 0)
    assert plugin.children_num_token_non_padded.tolist() == [-7, -7]


@pytest.mark.parametrize("mode,spec_info,real,match", [
    (ForwardMode.EXTEND, None, 2, "EXTEND"),
    ("MIXED", None, 2, "forward_mode"),
    ("SPECULATIVE", None, 2, "forward_mode"),
    (ForwardMode.TARGET_VERIFY, None, 2, "draft_token_num"),
    (ForwardMode.IDLE, None, 1, "IDLE"),
], ids=["extend", "mixed", "unknown", "verify-without-drafts", "idle-with-tokens"])
def test_replay_prepare_refuses_modes_graphs_do_not_replay(mode, spec_info, real, match):
    plugin = _plugin()
    with pytest.raises(ValueError, match=match):
        plugin.replay_prepare(mode, 4, real, spec_info)
    assert plugin.children_num_token_non_padded.tolist() == [-7, -7]


def test_replay_prepare_idle_writes_empty_children():
    """IDLE (a rank with nothing to run) replays a DECODE graph of padding: both counts 0."""
    plugin = _plugin()
    assert plugin.replay_prepare(ForwardMode.IDLE, 2, 0) == (0, 0)
    assert plugin.children_num_token_non_padded.tolist() == [0, 0]


def test_capture_points_the_children_at_the_plugins_counts(dp_harness):
    """capture_one_batch_size: a DECODE or TARGET_VERIFY static batch of exactly its token
    count is split, and each child's real count is a view of the plugin's tensor, so a later
    replay_prepare is what the captured children read; a wrong count or mode is refused."""
    h = dp_harness
    plugin = _plugin()
    static = h.runner.static_batch(GraphKey(ForwardMode.DECODE, 1, 4))
    split = plugin.capture_one_batch_size(static, 4)
    # the parent keeps the runner's count buffer, which every replay rewrites
    assert split.num_token_non_padded is static.num_token_non_padded
    a, b = (child.num_token_non_padded for child in split.tbo_children)
    assert (a.tolist(), b.tolist()) == (2, 2)  # at capture every row is real
    plugin.replay_prepare(ForwardMode.DECODE, 4, 3)
    assert (a.tolist(), b.tolist()) == (2, 1)
    for wrong in (3, 5):
        with pytest.raises(ValueError, match="num_tokens"):
            plugin.capture_one_batch_size(static, wrong)
    extend = mp.torch_batch(mp.build_world(mp.ModelCase("EXTEND", (1, 2), (3, 4)), h.ref_cfg),
                            dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="EXTEND"):
        plugin.capture_one_batch_size(extend, extend.num_tokens)


@pytest.mark.parametrize("tbo", [False, True], ids=["plain", "tbo"])
def test_without_sizes_the_runner_captures_the_default_sizes_up_to_64(parts, tbo):
    """Neither ``max_bs`` nor ``batch_sizes`` given: the documented default, the default
    capture sizes up to 64 (even ones under TBO), the same sizes as ``max_bs=64`` names."""
    runner = _build(parts, batch_sizes=None, tbo=tbo)
    assert runner.captures.batch_sizes[-1] == 64
    assert runner.captures.batch_sizes == \
        _build(parts, batch_sizes=None, max_bs=64, tbo=tbo).captures.batch_sizes
