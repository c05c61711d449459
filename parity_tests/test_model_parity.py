"""Output parity of the MoE model: torch TBO == torch plain == JAX spec, per mode.

Compared: final hidden states, logits, and the whole KV pool after the pass (written slots and
untouched ones), plus the per-expert load; error = max|x - y| / max|y| per tensor.

- float32, bound 1e-5. Measured on CPU: <= ~1.5e-6 (reduction order differs between XLA and
  PyTorch kernels, and between a micro-batch's matmul and the whole batch's).
- bfloat16, bound 2e-2 (bf16 keeps 8 bits of mantissa: each rounding is up to 2^-9 = 2e-3
  relative, and a pass rounds some twenty times along the residual stream). The oracle is the
  JAX spec in float32 fed the *bf16-rounded* weights and cache the bf16 model actually holds,
  and the model routes densely (top_k = num_experts): top-k selection is discontinuous, so
  bf16 rounding near a tie between two experts' scores would swap an expert and change that
  token by O(1), which no tolerance describes. Sparse routing is proven in float32. Measured
  on CPU: <= 1.7e-2 against the oracle, 0 between TBO and plain.

The cuda device runs where a GPU is (docs/gpu-results.md records those runs); on a CPU-only
machine those cases skip.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tbo_parity.parity_tests.model_parity import (CASES, PADDED, ModelCase, bf16_oracle_inputs,
                                                  build_world, make_models, pad_world,
                                                  relative_errors, run_jax, run_torch, torch_batch)
from tbo_parity.reference import split as spec
from tbo_parity.torch_impl import overlap
from tbo_parity.torch_impl.attention import TorchAttnBackend
from tbo_parity.torch_impl.model import MoEModel

F32_BOUND = 1e-5
BF16_BOUND = 2e-2
cuda = pytest.param("cuda", marks=[
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])
DEVICES = ["cpu", cuda]

@pytest.fixture(scope="module", params=DEVICES)
def models(request):
    return make_models(seed=0, device=request.param)


def _assert_close(got, want, bound, what):
    errors = relative_errors(got, want)
    assert max(errors.values()) <= bound, f"{what}: {errors}"
    np.testing.assert_array_equal(got["expert_load"], want["expert_load"], err_msg=what)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_tbo_matches_plain_matches_jax(models, case):
    ref_cfg, _, weights, model = models
    world = build_world(case, ref_cfg)
    spec_out = run_jax(world, ref_cfg, weights)
    plain = run_torch(world, model, tbo=False)
    tbo = run_torch(world, model, tbo=True)
    _assert_close(plain, spec_out, F32_BOUND, "torch plain vs JAX")
    _assert_close(tbo, plain, F32_BOUND, "torch TBO vs torch plain")
    _assert_close(tbo, spec_out, F32_BOUND, "torch TBO vs JAX")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bfloat16_tbo_matches_plain_matches_jax(device, case):
    ref_cfg, _, weights, model = make_models(seed=0, dtype=torch.bfloat16, device=device,
                                             num_experts=4, top_k=4)
    world, oracle_weights = bf16_oracle_inputs(build_world(case, ref_cfg), weights)
    spec_out = run_jax(world, ref_cfg, oracle_weights)
    plain = run_torch(world, model, tbo=False, dtype=torch.bfloat16)
    tbo = run_torch(world, model, tbo=True, dtype=torch.bfloat16)
    _assert_close(plain, spec_out, BF16_BOUND, "bf16 torch plain vs JAX")
    _assert_close(tbo, plain, BF16_BOUND, "bf16 torch TBO vs torch plain")
    _assert_close(tbo, spec_out, BF16_BOUND, "bf16 torch TBO vs JAX")


@pytest.mark.parametrize("case,num_padding", PADDED.values(), ids=PADDED.keys())
def test_padded_batch_tbo_matches_plain_matches_jax(models, case, num_padding):
    ref_cfg, _, weights, model = models
    world = pad_world(build_world(case, ref_cfg), num_padding)
    spec_out = run_jax(world, ref_cfg, weights)
    plain = run_torch(world, model, tbo=False)
    _assert_close(plain, spec_out, F32_BOUND, "torch plain vs JAX")
    _assert_close(run_torch(world, model, tbo=True), plain, F32_BOUND, "TBO vs plain")


# Padding past the spec's cut: (case, padding sequences appended by pad_world, real tokens).
# The spec cuts the padded DECODE batch (6 + 2 sequences) at token 4 and the padded
# TARGET_VERIFY batch (3 + 3 sequences of 2 drafts) at token 6; every real count below leaves
# child B padding only, and all but the last of each mode let the padding reach into child A
# (real sequences past the count are treated as padding, as a graph replay would).
_DECODE_6 = ModelCase("DECODE", (5, 9, 3, 7, 2, 6), seed=12)
_VERIFY_3 = ModelCase("TARGET_VERIFY", (5, 9, 3), draft_token_num=2, seed=13)
PADDING_PAST_THE_CUT = (
    pytest.param(_DECODE_6, 2, 3, id="decode-padding-reaches-into-a"),
    pytest.param(_DECODE_6, 2, 1, id="decode-one-real-token"),
    pytest.param(_DECODE_6, 2, 0, id="decode-no-real-token"),
    pytest.param(_DECODE_6, 2, 4, id="decode-b-padding-only"),
    pytest.param(_VERIFY_3, 3, 5, id="verify-padding-reaches-into-a"),
    pytest.param(_VERIFY_3, 3, 6, id="verify-b-padding-only"),
)


def _spec_real_counts(world) -> tuple:
    """(child A's tokens, (A's, B's) real tokens) of the spec's split of a uniform batch."""
    mode = spec.ForwardMode[world.case.mode]
    tokens_per_seq = spec.token_num_per_seq(mode, world.case.draft_token_num)
    child_a, _ = spec.derive_children(mode, world.seq_lens.tolist(), None, None, tokens_per_seq)
    split = child_a.token_range[1]
    return split, spec.compute_children_num_token_non_padded(split, world.num_token_non_padded)


@pytest.mark.parametrize("case,num_padding,num_real", PADDING_PAST_THE_CUT)
def test_padding_past_the_cut_matches_across_torch_and_jax_tbo(models, case, num_padding,
                                                               num_real):
    """Padding reaching into child A, child B holding padding only: torch TBO, JAX TBO
    (``reference.operations.forward_tbo``), JAX plain and torch plain agree, expert loads
    exactly, and every layer routes exactly ``num_real * top_k`` (token, expert) pairs."""
    ref_cfg, _, weights, model = models
    world = dataclasses.replace(pad_world(build_world(case, ref_cfg), num_padding),
                                num_token_non_padded=num_real)
    split, (real_a, real_b) = _spec_real_counts(world)
    assert real_b == 0 and (real_a < split or num_real == split), "not the scenario described"
    jax_plain = run_jax(world, ref_cfg, weights)
    np.testing.assert_array_equal(jax_plain["expert_load"].sum(axis=1),
                                  [num_real * ref_cfg.top_k] * ref_cfg.num_layers)
    jax_tbo, torch_tbo = run_jax(world, ref_cfg, weights, tbo=True), run_torch(world, model,
                                                                                tbo=True)
    _assert_close(jax_tbo, jax_plain, F32_BOUND, "JAX TBO vs JAX plain")
    _assert_close(torch_tbo, jax_tbo, F32_BOUND, "torch TBO vs JAX TBO")
    _assert_close(torch_tbo, jax_plain, F32_BOUND, "torch TBO vs JAX plain")
    _assert_close(run_torch(world, model, tbo=False), jax_plain, F32_BOUND,
                  "torch plain vs JAX plain")


@pytest.mark.parametrize("case", [CASES["extend-two-chunk-prefixed"], CASES["target-verify-tree"]],
                         ids=["extend-two-chunk", "target-verify"])
def test_jax_tbo_matches_torch_tbo(models, case):
    ref_cfg, _, weights, model = models
    world = build_world(case, ref_cfg)
    _assert_close(run_torch(world, model, tbo=True), run_jax(world, ref_cfg, weights, tbo=True),
                  F32_BOUND, "torch TBO vs JAX TBO")


def test_sigmoid_scoring_without_shared_expert():
    ref_cfg, _, weights, model = make_models(seed=3, scoring="sigmoid", num_shared_experts=0,
                                             top_k=3)
    world = build_world(CASES["extend-two-chunk-prefixed"], ref_cfg)
    spec_out = run_jax(world, ref_cfg, weights)
    _assert_close(run_torch(world, model, tbo=True), spec_out, F32_BOUND, "sigmoid TBO vs JAX")


def test_idle_forward_does_nothing(models):
    ref_cfg, _, weights, model = models
    world = build_world(ModelCase("IDLE", ()), ref_cfg)
    out = run_torch(world, model, tbo=True)
    assert out["hidden"].shape == (0, ref_cfg.hidden_size)
    np.testing.assert_array_equal(out["k_pool"], world.k_pool)
    assert not out["expert_load"].any()


def test_two_chunk_child_b_before_child_a_breaks_parity(models, monkeypatch):
    """Negative test: B's stages run before A's in every layer, so B's first sequence reads
    the KV slots A has not written yet (stale random values). Parity must fail for B's rows,
    while A's rows (which never read B's KV) still match."""
    ref_cfg, _, weights, model = models
    world = build_world(CASES["extend-two-chunk-prefixed"], ref_cfg)
    good = run_torch(world, model, tbo=True)
    original = overlap.execute_overlapped_operations

    def b_first(states, operations_arr, delta_stages, **kwargs):
        return original(states[::-1], operations_arr[::-1], delta_stages, **kwargs)[::-1]

    monkeypatch.setattr(overlap, "execute_overlapped_operations", b_first)
    bad = run_torch(world, model, tbo=True)
    split = 11  # [3, 20] -> two-chunk, child B starts at token 23 // 2
    assert relative_errors(bad, good, rows=slice(0, split))["hidden"] <= F32_BOUND
    assert relative_errors(bad, good, rows=slice(split, None))["hidden"] > 1e-2


def test_padding_rows_leave_real_rows_and_expert_load_unchanged(models):
    ref_cfg, _, weights, model = models
    unpadded = build_world(ModelCase("DECODE", (5, 9, 3, 8), seed=11), ref_cfg)
    padded = pad_world(unpadded, 3)
    for tbo in (False, True):
        a, b = run_torch(padded, model, tbo=tbo), run_torch(unpadded, model, tbo=tbo)
        errors = relative_errors(a, b, rows=slice(0, 4), names=("hidden", "logits"))
        assert max(errors.values()) <= F32_BOUND, errors
        # The real slots of the pool hold the same keys/values too (padding wrote its own).
        real_slots = unpadded.k_pool.shape[1]
        np.testing.assert_allclose(a["k_pool"][:, :real_slots], b["k_pool"], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(a["expert_load"], b["expert_load"])


def test_padding_rows_would_add_load_if_counted_as_real(models):
    """The padding check has teeth: counting padding rows as real changes the expert load."""
    ref_cfg, _, weights, model = models
    world = pad_world(build_world(ModelCase("DECODE", (5, 9, 3, 8), seed=11), ref_cfg), 3)
    honest = run_torch(world, model, tbo=True)
    world.num_token_non_padded = len(world.input_ids)
    assert run_torch(world, model, tbo=True)["expert_load"].sum() > honest["expert_load"].sum()


def test_model_rejects_missing_or_misshapen_weights():
    ref_cfg, torch_cfg, weights, _ = make_models(seed=0)
    broken = dict(weights)
    del broken["layers.1.router"]
    with pytest.raises(ValueError, match="layers.1.router"):
        MoEModel(torch_cfg, broken)
    broken = dict(weights, lm_head=weights["lm_head"][:, :5])
    with pytest.raises(ValueError, match="lm_head"):
        MoEModel(torch_cfg, broken)


def test_attention_names_a_missing_field(models):
    ref_cfg, _, _, model = models
    batch = torch_batch(build_world(CASES["target-verify-chain"], ref_cfg),
                        dtype=torch.float32, device="cpu")
    batch.spec_info.custom_mask = None
    with pytest.raises(ValueError, match="custom_mask"):
        TorchAttnBackend().init_forward_metadata(batch)
