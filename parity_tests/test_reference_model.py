"""Properties of the JAX reference model (reference/model.py, reference/operations.py), on CPU.

Every test runs on a random KV pool whose table rows are a random permutation of slots, so
reads through ``req_to_token`` are real and a stale read shows up as a changed output.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tbo_parity.parity_tests.model_parity import supported_compile_options
from tbo_parity.reference import model as M
from tbo_parity.reference import moe
from tbo_parity.reference import operations as O
from tbo_parity.reference.weights import ModelConfig, init_weights

CFG = ModelConfig()
ROWS, COLS = 8, 40  # R, L of req_to_token
PAD_SLOT = ROWS * COLS  # the one pool slot outside the table: padding rows write here
SLOTS = PAD_SLOT + 1  # P
F32_TOL = dict(rtol=1e-5, atol=1e-5)

# The tests jit every pass (eager mode compiles each primitive per shape, which is slower) and
# ask XLA for a quick compile: a tiny model gains nothing from optimisation.
FAST_COMPILE = supported_compile_options(dict(
    xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True,
    xla_cpu_use_fusion_emitters=False, xla_cpu_parallel_codegen_split_count=1))
STATIC = ("cfg", "mode", "draft_token_num", "dtype")
jit_forward = jax.jit(M.forward, static_argnames=STATIC, compiler_options=FAST_COMPILE)
jit_forward_tbo = jax.jit(O.forward_tbo, static_argnames=STATIC + ("children", "executor"),
                          compiler_options=FAST_COMPILE)


@dataclasses.dataclass(frozen=True)
class Child:
    """A hand-written child, with the attributes reference.split.derive_children gives."""

    token_range: tuple
    seq_range: tuple
    seq_lens: tuple
    extend_seq_lens: Optional[tuple] = None
    extend_prefix_lens: Optional[tuple] = None


class World:
    """Weights, a shuffled table and random pools, in one dtype."""

    def __init__(self, seed=0, dtype=np.float32, cfg=CFG):
        rng = np.random.default_rng(seed)
        self.cfg, self.dtype, self.rng = cfg, dtype, rng
        self.weights = init_weights(cfg, seed)
        self.table = rng.permutation(PAD_SLOT)[: ROWS * COLS].reshape(ROWS, COLS).astype(np.int32)
        shape = (cfg.num_layers, SLOTS, cfg.num_heads, cfg.head_dim)
        self.k_pool = rng.normal(size=shape).astype(dtype)
        self.v_pool = rng.normal(size=shape).astype(dtype)

    def ids(self, n):
        return self.rng.integers(0, self.cfg.vocab_size, size=n).astype(np.int32)

    def extend(self, rows, prefix, ext, ids=None):
        ids = self.ids(sum(ext)) if ids is None else ids
        return M.ModelInputs(
            input_ids=ids,
            positions=np.concatenate([np.arange(p, p + e) for p, e in zip(prefix, ext)]),
            out_cache_loc=np.concatenate([self.table[r, p:p + e]
                                          for r, p, e in zip(rows, prefix, ext)]),
            req_pool_indices=np.array(rows), seq_lens=np.add(prefix, ext),
            extend_prefix_lens=np.array(prefix), extend_seq_lens=np.array(ext),
            req_to_token=self.table)

    def decode(self, rows, seq_lens, ids=None, num_token_non_padded=None):
        return M.ModelInputs(
            input_ids=self.ids(len(rows)) if ids is None else ids,
            positions=np.array(seq_lens) - 1,
            out_cache_loc=self.table[rows, np.array(seq_lens) - 1],
            req_pool_indices=np.array(rows), seq_lens=np.array(seq_lens),
            req_to_token=self.table, num_token_non_padded=num_token_non_padded)

    def verify(self, rows, seq_lens, masks, ids=None):
        d = masks[0].shape[0]
        return M.ModelInputs(
            input_ids=self.ids(d * len(rows)) if ids is None else ids,
            positions=np.concatenate([np.arange(n, n + d) for n in seq_lens]),
            out_cache_loc=np.concatenate([self.table[r, n:n + d] for r, n in zip(rows, seq_lens)]),
            req_pool_indices=np.array(rows), seq_lens=np.array(seq_lens),
            custom_mask=np.concatenate([m.reshape(-1) for m in masks]), req_to_token=self.table)

    def forward(self, inputs, mode, pools=None, **kw):
        k, v = (self.k_pool, self.v_pool) if pools is None else pools
        return jit_forward(self.weights, inputs, k, v, cfg=self.cfg, mode=mode,
                           dtype=jnp.dtype(self.dtype), **kw)

    def forward_tbo(self, inputs, mode, children, **kw):
        return jit_forward_tbo(self.weights, inputs, self.k_pool, self.v_pool, cfg=self.cfg,
                               mode=mode, children=children, dtype=jnp.dtype(self.dtype), **kw)


def chain_mask(seq_len, d):
    """Draft r sees every committed token and drafts 0..r."""
    return np.arange(seq_len + d)[None, :] < (seq_len + np.arange(d) + 1)[:, None]


def tree_mask(seq_len, d):
    """A non-chain tree: draft 0 is the root, every later draft is a child of draft 0."""
    mask = np.zeros((d, seq_len + d), bool)
    mask[:, : seq_len + 1] = True
    mask[np.arange(d), seq_len + np.arange(d)] = True
    return mask


def close(a, b, **tol):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **(tol or F32_TOL))


def close_pass(got, want, rows):
    """``got``'s rows equal ``want``'s ``rows``; the pools after both passes are equal."""
    close(got.hidden, want.hidden[rows])
    close(got.logits, want.logits[rows])
    close(got.k_pool, want.k_pool)
    close(got.v_pool, want.v_pool)


# ---------------------------------------------------------------------------------------------
# The forward pass against itself.
# ---------------------------------------------------------------------------------------------


def test_extend_in_two_passes_matches_one_pass():
    """Prefilling a sequence in two chunks (the second on the first's prefix) changes nothing."""
    w = World(seed=1)
    rows, prefix, ext, first = [2, 5], [4, 0], [12, 6], [5, 2]
    ids = w.ids(sum(ext))
    one = w.forward(w.extend(rows, prefix, ext, ids), "EXTEND")

    ids_1 = np.concatenate([ids[:5], ids[12:14]])
    ids_2 = np.concatenate([ids[5:12], ids[14:]])
    pass_1 = w.forward(w.extend(rows, prefix, first, ids_1), "EXTEND")
    pass_2 = w.forward(w.extend(rows, np.add(prefix, first), np.subtract(ext, first), ids_2),
                       "EXTEND", pools=(pass_1.k_pool, pass_1.v_pool))
    later = np.r_[5:12, 14:18]  # the rows of one pass that the second pass computes
    close_pass(pass_2, one, later)


def test_decode_step_matches_last_extend_token():
    """Decoding token n after prefilling n-1 equals prefilling all n, at the last token."""
    w = World(seed=2)
    rows, prefix, ext = [1, 6, 3], [3, 0, 7], [4, 5, 1]
    full_ext = np.add(ext, 1)
    ids = w.ids(int(full_ext.sum()))
    ends = np.cumsum(full_ext) - 1  # the last token of each sequence
    one = w.forward(w.extend(rows, prefix, full_ext, ids), "EXTEND")

    first = w.forward(w.extend(rows, prefix, ext, np.delete(ids, ends)), "EXTEND")
    step = w.forward(w.decode(rows, np.add(prefix, full_ext), ids[ends]), "DECODE",
                     pools=(first.k_pool, first.v_pool))
    close_pass(step, one, ends)


def test_target_verify_chain_matches_extend():
    """With a chain mask, verifying d drafts is prefilling them on the committed prefix."""
    w = World(seed=3)
    rows, seq_lens, d = [4, 0], [5, 9], 3
    ids = w.ids(d * len(rows))
    verify = w.forward(w.verify(rows, seq_lens, [chain_mask(n, d) for n in seq_lens], ids),
                       "TARGET_VERIFY", draft_token_num=d)
    extend = w.forward(w.extend(rows, seq_lens, [d] * len(rows), ids), "EXTEND")
    for field in ("hidden", "logits", "k_pool", "v_pool"):
        close(getattr(verify, field), getattr(extend, field))


def test_target_verify_mask_is_used():
    """Changing the mask of a leaf draft changes that row's outputs and no other row's.

    Only leaves are changed: no other draft attends to them, so their changed keys at layer 1
    are read by nobody else.
    """
    w = World(seed=4)
    rows, seq_lens, d = [4, 0], [5, 9], 3
    ids = w.ids(d * len(rows))
    masks = [chain_mask(n, d) for n in seq_lens]
    base = w.forward(w.verify(rows, seq_lens, masks, ids), "TARGET_VERIFY", draft_token_num=d)
    masks[0][d - 1, 1] = False  # seq 0's last draft no longer sees committed token 1
    masks[1][d - 1, seq_lens[1] + 1] = False  # seq 1's last draft no longer sees draft 1
    changed = w.forward(w.verify(rows, seq_lens, masks, ids), "TARGET_VERIFY",
                        draft_token_num=d)
    rows_changed = [d - 1, 2 * d - 1]
    others = [t for t in range(2 * d) if t not in rows_changed]
    assert (np.abs(np.asarray(changed.logits - base.logits))[rows_changed].max(axis=1) > 1e-3).all()
    close(np.asarray(changed.logits)[others], np.asarray(base.logits)[others], rtol=1e-6, atol=1e-6)
    close(np.asarray(changed.hidden)[others], np.asarray(base.hidden)[others], rtol=1e-6, atol=1e-6)


def test_padding_rows_leave_real_rows_unchanged_and_add_no_expert_load():
    """Graph-replay padding (extra rows past num_token_non_padded) changes no real output."""
    w = World(seed=5)
    rows, seq_lens = [1, 2, 3], [6, 3, 11]
    ids = w.ids(3)
    real = w.forward(w.decode(rows, seq_lens, ids), "DECODE")
    padded_inputs = dataclasses.replace(
        w.decode(rows + [0, 0], seq_lens + [1, 1], np.r_[ids, 0, 0], num_token_non_padded=3),
        out_cache_loc=np.r_[w.table[rows, np.array(seq_lens) - 1], PAD_SLOT, PAD_SLOT])
    padded = w.forward(padded_inputs, "DECODE")
    close(padded.hidden[:3], real.hidden)
    close(padded.logits[:3], real.logits)
    np.testing.assert_array_equal(padded.expert_load, real.expert_load)
    np.testing.assert_array_equal(np.asarray(real.expert_load).sum(axis=1),
                                  [3 * CFG.top_k] * CFG.num_layers)
    close(padded.k_pool[:, :PAD_SLOT], real.k_pool[:, :PAD_SLOT])


def test_idle_forward_is_empty_and_leaves_the_pools():
    w = World(seed=6)
    empty = np.zeros((0,), np.int32)
    idle = M.ModelInputs(input_ids=empty, positions=empty, out_cache_loc=empty,
                         req_pool_indices=empty, seq_lens=empty, req_to_token=w.table)
    out = w.forward(idle, "IDLE")
    assert out.hidden.shape == (0, CFG.hidden_size) and out.logits.shape == (0, CFG.vocab_size)
    np.testing.assert_array_equal(out.k_pool, w.k_pool)
    np.testing.assert_array_equal(out.expert_load, 0)


# ---------------------------------------------------------------------------------------------
# MoE pieces.
# ---------------------------------------------------------------------------------------------


def test_select_experts_ties_pick_lower_ids_and_padding_gets_none():
    logits = jnp.zeros((3, CFG.num_experts)).at[1, 5].set(1.0)
    topk_w, topk_ids = moe.select_experts(logits, 2, cfg=CFG)
    np.testing.assert_array_equal(topk_ids, [[0, 1], [5, 0], [-1, -1]])
    close(topk_w.sum(axis=1), [1, 1, 0])


def test_dispatch_experts_combine_equals_the_direct_sum():
    """routed[t] = sum_k w[t,k] * expert(ids[t,k], h[t]), through the expert-major buffer."""
    w, rng = init_weights(CFG, 8), np.random.default_rng(8)
    gate, up, down = (w[f"layers.0.experts_{n}"] for n in ("gate", "up", "down"))
    h = rng.normal(size=(7, CFG.hidden_size)).astype(np.float32)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)  # jitted, as everywhere here
    def routed_path(h, router, gate, up, down):
        topk_w, topk_ids = moe.select_experts(h @ router, 5, cfg=CFG)
        buffer = moe.dispatch(h, topk_ids, num_experts=CFG.num_experts)
        routed = moe.combine(moe.routed_experts(buffer, gate, up, down), buffer.pair_index,
                             topk_w)
        return topk_w, topk_ids, buffer.expert_ids, routed

    topk_w, topk_ids, ids, routed = jax.device_get(
        routed_path(h, w["layers.0.router"], gate, up, down))
    assert (np.diff(np.where(ids < 0, CFG.num_experts, ids)) >= 0).all()  # expert-major
    swiglu = jax.jit(moe.swiglu, compiler_options=FAST_COMPILE)
    direct = np.zeros_like(h)
    for t in range(5):
        for k in range(CFG.top_k):
            e = int(topk_ids[t, k])
            expert_out = swiglu(h[t], gate[e], up[e], down[e])
            direct[t] += float(topk_w[t, k]) * np.asarray(expert_out)
    close(routed, direct)


# ---------------------------------------------------------------------------------------------
# Two-batch overlap.
# ---------------------------------------------------------------------------------------------


def _tbo_case(name, w):
    """(inputs, mode, children, draft_token_num) of each parity case, children by hand."""
    if name == "extend_balanced":  # [6, 4, 5, 5]: balanced split 2, not lopsided
        inputs = w.extend([1, 2, 3, 4], [3, 0, 2, 7], [6, 4, 5, 5])
        return inputs, "EXTEND", (
            Child((0, 10), (0, 2), (9, 4), (6, 4), (3, 0)),
            Child((10, 20), (2, 4), (7, 12), (5, 5), (2, 7))), None
    if name == "extend_two_chunk":  # [3, 20]: left 3 < 23 * 0.48, cut at 23 // 2 = 11
        inputs = w.extend([5, 2], [4, 6], [3, 20])
        return inputs, "EXTEND", (
            Child((0, 11), (0, 2), (7, 14), (3, 8), (4, 6)),  # left_last = 11 - 3 = 8
            Child((11, 23), (1, 2), (26,), (12,), (14,))), None
    if name == "decode":
        return w.decode([1, 2, 3, 4, 5], [4, 7, 2, 9, 5]), "DECODE", (
            Child((0, 2), (0, 2), (4, 7)), Child((2, 5), (2, 5), (2, 9, 5))), None
    if name == "decode_padded":  # 3 real + 1 padding row: children count (2, 1) real tokens
        inputs = w.decode([1, 2, 3, 0], [4, 7, 2, 1], num_token_non_padded=3)
        return inputs, "DECODE", (
            Child((0, 2), (0, 2), (4, 7)), Child((2, 4), (2, 4), (2, 1))), None
    if name == "decode_padding_into_a":  # 1 real row of 4: A holds 1 real + 1 padding, B none
        inputs = w.decode([1, 2, 3, 0], [4, 7, 2, 1], num_token_non_padded=1)
        return inputs, "DECODE", (
            Child((0, 2), (0, 2), (4, 7)), Child((2, 4), (2, 4), (2, 1))), None
    if name == "decode_one_seq":  # bs 1: child A is empty and skipped
        return w.decode([3], [6]), "DECODE", (
            Child((0, 0), (0, 0), ()), Child((0, 1), (0, 1), (6,))), None
    if name == "target_verify":  # bs 3, d 3: split seq 1, token 3; a tree mask
        seq_lens, d = [4, 6, 3], 3
        inputs = w.verify([1, 2, 3], seq_lens, [tree_mask(n, d) for n in seq_lens])
        return inputs, "TARGET_VERIFY", (
            Child((0, 3), (0, 1), (4,)), Child((3, 9), (1, 3), (6, 3))), d
    raise KeyError(name)


TBO_CASES = ["extend_balanced", "extend_two_chunk", "decode", "decode_padded",
             "decode_padding_into_a", "decode_one_seq", "target_verify"]


@pytest.mark.parametrize("case", TBO_CASES)
def test_tbo_matches_plain(case):
    """Overlapped micro-batches give the plain pass's hidden, logits, pools and load (float64).

    Measured on CPU (jax 0.10.2): max |tbo - plain| is exactly 0 for every case and field,
    in float64 and float32 alike; the bound below only allows for another backend.
    """
    with jax.enable_x64(True):
        w = World(seed=10, dtype=np.float64)
        inputs, mode, children, d = _tbo_case(case, w)
        plain = w.forward(inputs, mode, draft_token_num=d)
        tbo = w.forward_tbo(inputs, mode, children, draft_token_num=d)
        for field in ("hidden", "logits", "k_pool", "v_pool"):
            a, b = np.asarray(getattr(tbo, field)), np.asarray(getattr(plain, field))
            assert a.dtype == np.float64 and a.shape == b.shape
            assert np.abs(a - b).max(initial=0) <= 1e-12, (field, np.abs(a - b).max())
        np.testing.assert_array_equal(tbo.expert_load, plain.expert_load)


@pytest.mark.parametrize("num_real,want", [(5, (2, 3)), (3, (2, 1)), (2, (2, 0)), (1, (1, 0)),
                                            (0, (0, 0))])
def test_children_count_real_tokens_by_the_spec_rule(num_real, want):
    """Child A counts ``min(split, n)`` real tokens and child B ``max(0, n - split)``: padding
    that reaches into A leaves B with none (DECODE of 5 cut at 2)."""
    w = World(seed=15)
    inputs, mode, children, _ = _tbo_case("decode", w)
    inputs = M.normalize_inputs(dataclasses.replace(inputs, num_token_non_padded=num_real))
    got = O.child_inputs(inputs, children, mode=mode)
    assert tuple(int(child.num_token_non_padded) for child in got) == want


def test_tbo_matches_plain_with_sigmoid_scoring_and_no_shared_expert():
    cfg = ModelConfig(scoring="sigmoid", num_shared_experts=0, num_layers=3)
    w = World(seed=11, cfg=cfg)
    inputs, mode, children, d = _tbo_case("extend_two_chunk", w)
    close(w.forward_tbo(inputs, mode, children).logits, w.forward(inputs, mode).logits)


def test_two_chunk_wrong_order_breaks_parity():
    """Running B's stages before A's lets B read stale KV where A has not written yet.

    B's first sequence attends to the 8 tokens A writes in the same layer; with B first it
    reads the pool's random old values there, so B's rows change; A's rows do not.
    """
    w = World(seed=12)
    inputs, mode, children, _ = _tbo_case("extend_two_chunk", w)

    def b_first(states, operations_arr, delta_stages):
        O.execute_overlapped_operations(states[::-1], operations_arr[::-1], delta_stages)

    plain = w.forward(inputs, mode)
    wrong = w.forward_tbo(inputs, mode, children, executor=b_first)
    close(wrong.logits[:11], plain.logits[:11])
    assert (np.abs(np.asarray(wrong.logits - plain.logits))[11:].max(axis=1) > 1e-3).all()


# ---------------------------------------------------------------------------------------------
# The executor.
# ---------------------------------------------------------------------------------------------


def test_state_refuses_silent_overwrite():
    state = O.State(x=1)
    with pytest.raises(KeyError, match="'x'"):
        state.x = 2
    assert state.pop("x") == 1
    state.x = 3
    assert state.x == 3 and "x" in state


def test_stage_schedule():
    """The rule of docs/spec.md, "Overlapped execution", written out: A runs delta stages
    alone, then they alternate."""
    assert O.stage_schedule(3, 0) == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert O.stage_schedule(3, 2) == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2)]
    assert O.stage_schedule(5, 2) == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("a", 3), ("b", 1),
                                      ("a", 4), ("b", 2), ("b", 3), ("b", 4)]
    for bad in (-1, 4, 1.0):
        with pytest.raises(ValueError, match="delta_stages"):
            O.stage_schedule(3, bad)


def test_overlapped_executor_follows_the_schedule():
    log = []

    def op(tag):
        return O.Operation(tag, lambda s: log.append(s.who + tag))

    ops = [op("0"), O.YieldOperation(), op("1"), op("1"), O.YieldOperation(), op("2"),
           O.YieldOperation()]
    O.execute_overlapped_operations([O.State(who="a"), O.State(who="b")], [ops, ops], 1)
    assert log == ["a0", "a1", "a1", "b0", "a2", "b1", "b1", "b2"]
    with pytest.raises(ValueError, match="operations_arr"):
        O.execute_overlapped_operations([O.State(), O.State()], [ops, ops[:2]], 0)


@pytest.mark.parametrize("mode,stages_per_layer,delta", [("EXTEND", 2, 0), ("DECODE", 5, 2)])
def test_model_operations_layouts(mode, stages_per_layer, delta):
    """Prefill: 3 stages a layer, the last merging with the next layer's first; decode: 5.

    The mode may be any enum member: it is compared by ``.name``.
    """
    member = enum.Enum("ForwardMode", ["EXTEND", "DECODE"])[mode]
    ops, got_delta = O.model_operations(CFG, init_weights(CFG, 0), member)
    assert got_delta == delta
    assert len(O.split_stages(ops)) == stages_per_layer * CFG.num_layers + 1
    first_stage = [op.name for op in O.split_stages(ops)[0]]
    assert first_stage[-1] == ("l0.dispatch_launch" if mode == "EXTEND" else "l0.attn_qkv")


# ---------------------------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("top_k", 9), ("head_dim", 15), ("scoring", "relu"), ("num_layers", 0),
    ("num_shared_experts", -1), ("rms_eps", 0.0)])
def test_bad_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{field: value})


def _bad_inputs(w):
    ok = w.extend([1, 2], [3, 0], [4, 5])
    dec = w.decode([1, 2], [4, 5])
    ver = w.verify([1], [4], [chain_mask(4, 2)])
    return {
        "mode": (ok, dict(mode="MIXED")),
        "extend_seq_lens": (dataclasses.replace(ok, extend_seq_lens=np.array([4, 4])),
                            dict(mode="EXTEND")),
        "extend_prefix_lens": (dataclasses.replace(ok, extend_prefix_lens=None),
                               dict(mode="EXTEND")),
        "positions": (dataclasses.replace(ok, positions=np.arange(3)), dict(mode="EXTEND")),
        "input_ids": (dataclasses.replace(dec, seq_lens=np.array([4, 5, 6]),
                                          req_pool_indices=np.array([1, 2, 3])),
                      dict(mode="DECODE")),
        "draft_token_num": (ver, dict(mode="TARGET_VERIFY")),
        "custom_mask": (dataclasses.replace(ver, custom_mask=np.ones(5, bool)),
                        dict(mode="TARGET_VERIFY", draft_token_num=2)),
        "k_pool": (ok, dict(mode="EXTEND", pools=(w.k_pool[:1], w.v_pool))),
    }


@pytest.mark.parametrize("field", ["mode", "extend_seq_lens", "extend_prefix_lens", "positions",
                                   "input_ids", "draft_token_num", "custom_mask", "k_pool"])
def test_bad_inputs_raise_naming_the_argument(field):
    w = World(seed=13)
    inputs, kw = _bad_inputs(w)[field]
    pools = kw.pop("pools", (w.k_pool, w.v_pool))
    with pytest.raises(ValueError, match=field):  # eager: value checks need concrete inputs
        M.forward(w.weights, inputs, *pools, cfg=CFG, **kw)


def test_children_that_do_not_cover_the_batch_raise():
    w = World(seed=14)
    inputs, mode, children, _ = _tbo_case("decode", w)
    gap = (children[0], dataclasses.replace(children[1], token_range=(3, 5)))
    with pytest.raises(ValueError, match="children"):
        w.forward_tbo(inputs, mode, gap)
