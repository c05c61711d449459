"""The serving attention (``SdpaAttnBackend``) equals the reference (``TorchAttnBackend``) in
every mode, plain and TBO, eager and through the CUDA-graph runner.

Bounds (max|x - y| / max|y| per tensor, ``model_parity``'s metric):

- float32: the model bound, 1e-5. Both backends compute the same softmax in float32; they
  differ only in the order of their sums (one fused kernel against two einsums). Measured on
  this suite's scenarios on a CPU: at most 1.1e-6.
- bfloat16: the first-order forward-error bound of a bf16 path, ``27 * 2^-9 = 5.3e-2``
  (``graph_parity.BOUNDS``, which derives it). The two backends round at the same places
  but sum in different orders inside attention, so each layer's attention output may differ
  by an ulp, and that difference travels through every later rounding. Measured on a CPU:
  at most 1.9e-2 over these scenarios. The model routes densely (every token to every
  expert), as the bf16 graph suite does: with sparse routing a one-ulp difference in a
  hidden state can flip a top-k choice, which is not an attention error (measured: one
  scenario of twelve flipped with 8 experts top-2).

Negative tests: a visibility rule that forgets the cached prefix, or lets a decode token see
one column past its sequence, must fail these comparisons.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tbo_parity.parity_tests import model_parity as mp
from tbo_parity.parity_tests.graph_parity import BOUNDS, SCENARIOS, GraphHarness, check_step
from tbo_parity.torch_impl import attention
from tbo_parity.torch_impl.attention import SdpaAttnBackend, TorchAttnBackend

FLOAT32_BOUND = mp.BOUNDS["float32"]
BF16_BOUND = BOUNDS["bfloat16"]["spec"]
NAMED = [(name, case, 0) for name, case in mp.CASES.items() if case.mode != "IDLE"] + [
    (name, case, pad) for name, (case, pad) in mp.PADDED.items()]
IDS = [name for name, _, _ in NAMED]


@pytest.fixture(scope="module")
def models():
    return {"float32": mp.make_models(0),
            "bfloat16": mp.make_models(0, dtype=torch.bfloat16, num_experts=4, top_k=4)}


def _world(ref_cfg, case, pad):
    world = mp.build_world(case, ref_cfg)
    return mp.pad_world(world, pad) if pad else world


def _errors(models, dtype_name, case, pad, tbo):
    ref_cfg, _, _, model = models[dtype_name]
    world = _world(ref_cfg, case, pad)
    dtype = mp.TORCH_DTYPES[dtype_name]
    want = mp.run_torch(world, model, tbo=tbo, dtype=dtype)
    got = mp.run_torch(world, model, tbo=tbo, dtype=dtype, make_backend=SdpaAttnBackend)
    return mp.relative_errors(got, want), got, want


@pytest.mark.parametrize("tbo", [False, True], ids=["plain", "tbo"])
@pytest.mark.parametrize("name,case,pad", NAMED, ids=IDS)
def test_sdpa_equals_reference_float32(models, name, case, pad, tbo):
    errors, got, want = _errors(models, "float32", case, pad, tbo)
    assert max(errors.values()) <= FLOAT32_BOUND, errors
    np.testing.assert_array_equal(got["expert_load"], want["expert_load"])


@pytest.mark.parametrize("tbo", [False, True], ids=["plain", "tbo"])
@pytest.mark.parametrize("name,case,pad", NAMED, ids=IDS)
def test_sdpa_equals_reference_bfloat16(models, name, case, pad, tbo):
    errors, got, want = _errors(models, "bfloat16", case, pad, tbo)
    assert max(errors.values()) <= BF16_BOUND, errors


cuda = pytest.param("cuda", marks=[
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("device", ["cpu", cuda])
@pytest.mark.parametrize("tbo", [False, True], ids=["plain", "tbo"])
@pytest.mark.parametrize("scenario", ["decode", "verify-chain", "verify-tree"])
def test_sdpa_through_the_graph_runner(tbo, scenario, device, dtype_name):
    """The runner with the SDPA backend: a padded batch (5 in a graph of 8) and an exact one
    (8 in 8), each against the runner's eager forward and the JAX spec, within
    ``graph_parity.BOUNDS``. A CPU runs the static-buffer path and calls the captured forward
    eagerly; a GPU replays real CUDA graphs, with the fused kernels inside them."""
    h = GraphHarness(device=device, dtype_name=dtype_name, tbo=tbo, max_bs=8,
                     make_attn_backend=SdpaAttnBackend)
    for size, seed in ((5, 1), (8, 2)):
        report = check_step(h, h.world(SCENARIOS[scenario], size, seed=seed))
        assert report["ok"] and report["graph_bs"] == 8, report


def test_verify_gathers_once_per_sequence(models):
    """The point of the backend: keys are gathered per sequence (``[B, L]`` slots), not per
    token as the reference does (``[T, L]``): a TARGET_VERIFY batch of 4 drafts reads 4x
    fewer rows."""
    ref_cfg = models["float32"][0]
    case = mp.CASES["target-verify-tree"]
    batch = mp.torch_batch(_world(ref_cfg, case, 0), dtype=torch.float32, device="cpu")
    sdpa, ref = SdpaAttnBackend(), TorchAttnBackend()
    sdpa.init_forward_metadata(batch)
    ref.init_forward_metadata(batch)
    num_seqs, width = len(case.prefix_lens), ref.metadata.table_slots.shape[1]
    assert sdpa.plan.slots.shape == (num_seqs, width)
    assert ref.metadata.table_slots.shape == (num_seqs * case.draft_token_num, width)
    assert sdpa.plan.mask.shape == (num_seqs, 1, case.draft_token_num, width)


def test_fresh_equal_sequences_use_the_kernels_causal_rule(models):
    """EXTEND of fresh sequences of one length needs no mask (the fused kernels' own causal
    rule); a cached prefix needs one."""
    ref_cfg = models["float32"][0]
    fresh = mp.ModelCase("EXTEND", (0, 0, 0), (5, 5, 5), seed=3)
    prefixed = mp.CASES["extend-two-chunk-prefixed"]
    for case, causal in ((fresh, True), (prefixed, False)):
        backend = SdpaAttnBackend()
        backend.init_forward_metadata(
            mp.torch_batch(_world(ref_cfg, case, 0), dtype=torch.float32, device="cpu"))
        assert backend.plan.causal is causal and (backend.plan.mask is None) is causal


def test_width_past_the_table_is_refused(models):
    ref_cfg = models["float32"][0]
    batch = mp.torch_batch(_world(ref_cfg, mp.CASES["decode"], 0), dtype=torch.float32,
                           device="cpu")
    with pytest.raises(ValueError, match="^width="):
        SdpaAttnBackend().init_forward_metadata(batch, width=batch.req_to_token.shape[1] + 1)


def test_empty_batch_has_no_plan(models):
    ref_cfg = models["float32"][0]
    batch = mp.torch_batch(_world(ref_cfg, mp.CASES["decode"], 0), dtype=torch.float32,
                           device="cpu")
    batch.input_ids = batch.input_ids[:0]
    backend = SdpaAttnBackend()
    backend.plan = "stale"
    backend.init_forward_metadata(batch)
    assert backend.plan is None


# --- negative tests: a broken visibility rule must fail -----------------------------------


def test_forgotten_prefix_is_caught(models, monkeypatch):
    """EXTEND tokens that do not see their sequence's cached prefix."""
    real = attention._extend_plan

    def without_prefix(batch):
        saved = batch.extend_prefix_lens
        batch.extend_prefix_lens = torch.zeros_like(saved)
        try:
            return real(batch)
        finally:
            batch.extend_prefix_lens = saved

    monkeypatch.setattr(attention, "_extend_plan", without_prefix)
    errors, _, _ = _errors(models, "float32", mp.CASES["extend-two-chunk-prefixed"], 0, True)
    assert errors["hidden"] > 100 * FLOAT32_BOUND, errors


def test_one_column_too_many_is_caught(models, monkeypatch):
    """A DECODE token that also sees the column after its sequence (``j <= seq_len``)."""
    real = attention._uniform_plan

    def one_more(batch, width):
        plan = real(batch, width)
        seq_lens = batch.seq_lens[:plan.slots.shape[0]]
        columns = torch.arange(plan.slots.shape[1])
        plan.mask = (columns[None, :] <= seq_lens[:, None])[:, None, None, :]
        return plan

    monkeypatch.setattr(attention, "_uniform_plan", one_more)
    errors, _, _ = _errors(models, "float32", mp.CASES["decode"], 0, False)
    assert errors["hidden"] > 100 * FLOAT32_BOUND, errors


@pytest.mark.parametrize("device", [cuda])
def test_sdpa_is_reproducible(device):
    """The same step twice gives the same bits (the fused kernels are limited to those that
    do; on an H200 cuDNN's attention does not)."""
    ref_cfg, _, _, model = mp.make_models(0, dtype=torch.bfloat16, device=device)
    for name in ("decode", "target-verify-tree", "extend-two-chunk-prefixed"):
        world = _world(ref_cfg, mp.CASES[name], 0)
        runs = [mp.run_torch(world, model, tbo=True, dtype=torch.bfloat16,
                             make_backend=SdpaAttnBackend) for _ in range(3)]
        for other in runs[1:]:
            for key, value in runs[0].items():
                np.testing.assert_array_equal(value, other[key], err_msg=f"{name} {key}")
