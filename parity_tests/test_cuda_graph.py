"""CUDA-graph replay with and without two-batch overlap: every replay equals the eager forward
and the JAX spec.

Each replay is checked by ``graph_parity.check_step``: real rows of hidden states and logits,
both KV pools on every slot but the padding slot (float32: 1e-5 for every pair; bfloat16:
2e-2 against the eager forward, 27 * 2^-9 = 5.3e-2 against the float32 spec;
``graph_parity.BOUNDS`` derives them), the expert load exactly, and no slot written but the
batch's own and the padding slot.

On the CPU (CI) the runner takes the same static-buffer path and calls the capture-time
forward eagerly instead of replaying a graph (``use_cuda_graph=False``): everything but the
graph itself is checked, on batch sizes up to 8. On a GPU (``-m gpu``) the same tests replay
real CUDA graphs on batch sizes up to 64; docs/gpu-results.md records those runs.

Upstream bugs each test is written against are named in its docstring.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tbo_parity.parity_tests import model_parity as mp
from tbo_parity.parity_tests.graph_parity import (SCENARIOS, GraphHarness, GraphScenario,
                                                  check_step, idle_batch)
from tbo_parity.torch_impl.batch_splitter import TboForwardBatchPreparer
from tbo_parity.torch_impl.cuda_graph_runner import CudaGraphRunner
from tbo_parity.torch_impl.two_batch_overlap import TboCudaGraphRunnerPlugin

cuda = pytest.param("cuda", marks=[
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])
DEVICES = ["cpu", cuda]
MAX_BS = {"cpu": 8, "cuda": 64}  # the sweep: every real batch size from 1 to this
CONSECUTIVE = {"cpu": 40, "cuda": 200}

@pytest.fixture(scope="module")
def harness():
    """``harness(device, dtype_name, tbo)``: one model, pools and captured runner per
    configuration, built on first use and shared by this module's tests."""
    built = {}

    def get(device: str, dtype_name: str, tbo: bool) -> GraphHarness:
        key = (device, dtype_name, tbo)
        if key not in built:
            built[key] = GraphHarness(device=device, dtype_name=dtype_name, tbo=tbo,
                                      max_bs=MAX_BS[device])
        return built[key]

    return get


class StaleCountPlugin(TboCudaGraphRunnerPlugin):
    """A broken plugin: it never rewrites the children's counts, so every replay reads the
    counts written at capture (every row real)."""

    def replay_prepare(self, forward_mode, bs, num_token_non_padded, spec_info=None):
        return None


def _failures(reports: dict) -> dict:
    return {bs: report for bs, report in reports.items() if not report["ok"]}


# --- every batch size ------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
@pytest.mark.parametrize("tbo", [False, True], ids=["plain", "tbo"])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("device", DEVICES)
def test_every_replay_matches_eager_and_spec(harness, record_property, device, dtype_name, tbo,
                                            scenario):
    """Every real batch size from 1 to the largest graph, so most replays are padded (and
    under TBO a padded replay's child B holds padding). The worst errors go into the JUnit
    report (docs/gpu-results.md quotes them)."""
    h = harness(device, dtype_name, tbo)
    reports = {bs: check_step(h, h.world(scenario, bs, seed=1000 + bs))
               for bs in range(1, MAX_BS[device] + 1)}
    for name in ("replay_vs_eager", "replay_vs_spec", "replay_vs_spec_norm", "eager_vs_spec"):
        record_property(f"max_{name}", f"{max(r[name] for r in reports.values()):.2e}")
    assert _failures(reports) == {}
    assert sum(r["graph_bs"] > bs for bs, r in reports.items()) >= 2  # padded replays ran


@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
@pytest.mark.parametrize("device", DEVICES)
def test_child_b_made_of_pure_padding(harness, device, scenario):
    """One real sequence in a TBO graph of two: child A is the real sequence, child B is all
    padding and must touch nothing real."""
    h = harness(device, "float32", True)
    world = h.world(scenario, 1, seed=7)
    report = check_step(h, world)
    assert report["ok"] and report["graph_bs"] == 2, report
    counts = h.runner.plugin.children_num_token_non_padded.tolist()
    assert counts == [scenario.token_num_per_seq, 0]


@pytest.mark.parametrize("tbo", [False, True], ids=["plain", "tbo"])
@pytest.mark.parametrize("device", DEVICES)
def test_single_sequence_in_the_largest_graph(device, tbo):
    h = GraphHarness(device=device, tbo=tbo, max_bs=MAX_BS[device],
                     batch_sizes=(MAX_BS[device],))
    for name, scenario in SCENARIOS.items():
        report = check_step(h, h.world(scenario, 1, seed=3))
        assert report["ok"] and report["graph_bs"] == MAX_BS[device], (name, report)


@pytest.mark.parametrize("tbo", [False, True], ids=["plain", "tbo"])
@pytest.mark.parametrize("device", DEVICES)
def test_idle_replays_the_smallest_decode_graph(harness, device, tbo):
    """An idle rank replays a graph (it must join its peers' collectives), not the eager path:
    upstream once disabled graphs under TBO when a rank was idle (sglang #18320)."""
    h = harness(device, "float32", tbo)
    h.reset_pool()
    result = h.runner.forward(idle_batch(h.req_to_token, h.pool))
    assert result.replay_path and result.fallback is None
    # a CUDA graph on a GPU; on a CPU the replay path without one, and it says so
    assert (result.replayed, result.emulated) == ((True, False) if device == "cuda"
                                                  else (False, True))
    assert result.output.hidden.shape == (0, h.ref_cfg.hidden_size)
    assert not result.output.expert_load.any()  # padding routed nowhere
    changed = (h.pool.k != h.initial.k).any(dim=(0, 2, 3)).nonzero().flatten().tolist()
    assert set(changed) <= {h.layout.padding_slot}


# --- many replays in a row -------------------------------------------------------------------


@pytest.mark.parametrize("tbo", [False, True], ids=["plain", "tbo"])
@pytest.mark.parametrize("device", DEVICES)
def test_consecutive_replays_stay_correct_and_allocate_nothing(harness, device, tbo):
    """Fresh random inputs and changing batch sizes and modes, replay after replay; on a GPU
    the memory allocated afterwards equals the memory allocated before."""
    h = harness(device, "float32", tbo)
    rng = np.random.default_rng(5)
    names = list(SCENARIOS)
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    failures = []
    for step in range(CONSECUTIVE[device]):
        scenario = SCENARIOS[names[rng.integers(len(names))]]
        bs = int(rng.integers(1, MAX_BS[device] + 1))
        report = check_step(h, h.world(scenario, bs, seed=step), spec=False)
        if not report["ok"]:
            failures.append((step, bs, report))
    assert failures == []
    if device == "cuda":
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == before


# --- negative test: the counts must be rewritten at every replay ------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_stale_children_counts_fail_parity(record_property, device):
    """A plugin that keeps the capture-time counts lets padding rows route to experts: the
    expert load of every padded replay is wrong, so the parity check must fail there (and
    only there: a replay without padding has nothing to miscount)."""
    stale = GraphHarness(device=device, tbo=True, max_bs=8,
                         plugin=StaleCountPlugin(device, TboForwardBatchPreparer()))
    padded = check_step(stale, stale.world(SCENARIOS["decode"], 5, seed=2))
    for name in ("ok", "replay_vs_eager", "load_total_replay", "load_total_eager"):
        record_property(f"stale_bs5_graph8_{name}", padded[name])
    assert not padded["ok"] and not padded["load_replay_vs_eager"], padded
    assert not padded["load_replay_vs_spec"]
    full = check_step(stale, stale.world(SCENARIOS["decode"], 8, seed=2))
    assert full["ok"], full


@pytest.mark.parametrize("device", DEVICES)
def test_padding_written_to_a_real_slot_is_caught(device):
    """Negative test: padding tokens pointed at a slot that belongs to a request (column 0 of
    request row 0, cached context no step writes). Real rows are unaffected, so only the
    check that padding wrote nothing but the scratch slot can see it, and it must."""
    h = GraphHarness(device=device, tbo=True, max_bs=8)
    real_slot = int(h.layout.req_to_token[0, 0])
    h.runner.padding_slot = real_slot
    report = check_step(h, h.world(SCENARIOS["decode"], 3, seed=9))
    assert not report["ok"] and report["stray_slots"] == [real_slot], report


# --- upstream failures, each as a test --------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_plugin_counts_live_on_the_model_device(harness, device):
    """sglang #28337: the plugin's count buffer was allocated on the wrong device. It holds
    token counts, so it is int64 like every count the graphs read (a float32 count would be
    exact only up to 2^24 tokens)."""
    h = harness(device, "float32", True)
    counts = h.runner.plugin.children_num_token_non_padded
    assert counts.device == h.model.embed.device and counts.dtype == torch.int64
    with pytest.raises(ValueError, match="plugin"):
        GraphHarness(device=device, tbo=True, max_bs=2,
                     plugin=TboCudaGraphRunnerPlugin("meta", TboForwardBatchPreparer()))


@pytest.mark.parametrize("device", DEVICES)
def test_verify_and_decode_graphs_give_each_child_tokens(harness, device):
    """sglang #30238: TARGET_VERIFY went down the wrong TBO path and left a micro-batch with no
    tokens. Every TBO graph must cut both children non-empty, whatever the real batch."""
    h = harness(device, "float32", True)
    for scenario in SCENARIOS.values():
        for bs in range(1, MAX_BS[device] + 1):
            plan = h.runner.plan(h.batch(h.world(scenario, bs, seed=bs)))
            assert 0 < plan.split_token_index < plan.num_tokens, (scenario, bs, plan)
    plan = h.runner.plan(idle_batch(h.req_to_token, h.pool))
    assert 0 < plan.split_token_index < plan.num_tokens, ("IDLE", plan)


@pytest.mark.parametrize("device", DEVICES)
def test_large_batch_sizes_capture_and_replay(device):
    """uccl #987: masking padded rows crashed at capture for batch sizes of 128 and above."""
    h = GraphHarness(device=device, tbo=True, max_bs=160, batch_sizes=(128, 160),
                     draft_token_nums=())
    for bs in (1, 129, 160):
        report = check_step(h, h.world(SCENARIOS["decode"], bs, seed=bs))
        assert report["ok"], (bs, report)


# --- fallbacks --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_fallbacks_run_eagerly_and_say_why(device):
    h = GraphHarness(device=device, tbo=True, max_bs=8, max_context_len=24,
                     graph_context_len=16, batch_sizes=(2, 4), draft_token_nums=(3,))
    cases = {
        "mode": mp.build_world(mp.ModelCase("EXTEND", (2, 0, 5), (3, 4, 2), seed=1),
                               h.ref_cfg, h.layout),
        "batch_size": h.world(SCENARIOS["decode"], 5, seed=1),
        "draft_token_num": h.world(GraphScenario("TARGET_VERIFY", 2), 2, seed=1),
        "context": mp.build_world(mp.ModelCase("DECODE", (3, 20), seed=1), h.ref_cfg,
                                  h.layout),
    }
    for kind, world in cases.items():
        out, result = h.run_runner(world)
        assert not result.replay_path and result.fallback.kind == kind, (kind, result.fallback)
        assert not result.replayed and not result.emulated
        eager = h.run_eager(world)
        assert all(np.array_equal(out[name], eager[name]) for name in out), kind
    assert dict(h.runner.fallbacks) == dict.fromkeys(cases, 1)
    assert h.runner.replays == 0


# --- bad configuration and bad batches ---------------------------------------------------------


def _runner(h: GraphHarness, **overrides):
    kwargs = dict(max_context_len=h.max_context_len, padding_slot=h.layout.padding_slot,
                  padding_req_row=h.layout.padding_req_row, max_bs=4) | overrides
    return CudaGraphRunner(h.model, h.pool, h.req_to_token, **kwargs)


@pytest.mark.parametrize("overrides,argument", [
    (dict(max_context_len=10_000), "max_context_len"),
    (dict(max_context_len=3, draft_token_nums=(4,)), "max_context_len"),
    (dict(padding_slot=-1), "padding_slot"),
    (dict(padding_req_row=10_000), "padding_req_row"),
    (dict(draft_token_nums=(3, 3)), "draft_token_nums"),
    (dict(decode=False), "nothing to capture"),
    (dict(use_cuda_graph=True), "use_cuda_graph"),
    (dict(tbo=True, batch_sizes=(1, 2)), "batch_sizes"),
    (dict(tbo=True, batch_sizes=(2, 3)), "batch_sizes"),
], ids=["context-too-long", "context-too-short", "slot", "row", "drafts", "empty",
        "graphs-on-cpu", "tbo-size-1", "tbo-odd-size"])
def test_runner_rejects_bad_configuration(harness, overrides, argument):
    h = harness("cpu", "float32", False)
    with pytest.raises(ValueError, match=argument):
        _runner(h, **overrides)


def test_runner_rejects_bad_batches_before_writing_anything(harness):
    h = harness("cpu", "float32", True)
    world = h.world(SCENARIOS["verify-chain"], 3, seed=4)
    good = h.batch(world)
    before = {name: getattr(h.runner.static, name).clone() for name in
              ("input_ids", "seq_lens", "custom_mask", "custom_mask_offsets")}
    bad = {
        "already split": TboForwardBatchPreparer().prepare(good),
        "has padding": dataclasses.replace(good, num_token_non_padded=1),
        "kv_pool": dataclasses.replace(good, kv_pool=h.initial),
        "req_to_token": dataclasses.replace(good, req_to_token=h.req_to_token.clone()),
        "custom_mask": dataclasses.replace(good, spec_info=dataclasses.replace(
            good.spec_info, custom_mask=good.spec_info.custom_mask[:-1])),
    }
    replays = h.runner.replays
    for words, batch in bad.items():
        with pytest.raises(ValueError, match=words.split()[-1]):
            h.runner.replay(batch)
    assert h.runner.replays == replays
    for name, value in before.items():
        assert torch.equal(getattr(h.runner.static, name), value), name
