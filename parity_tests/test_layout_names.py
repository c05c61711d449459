"""Twins that are twins: the JAX spec and the PyTorch model lay a layer out with the same
operations, under the same names, in the same stages, and write the KV cache in the same one.

Output parity cannot see a name: a stage renamed, an operation moved across a yield that
changes nothing numerically, or the KV write drifting into another stage all pass it. These
tests compare what each side actually builds (the JAX spec's ``model_operations``, the PyTorch
layer's ``operations``), not only the layout text, for both layouts; a negative test shows
that a renamed or moved operation on one side is caught. The timeline labels of
``benchmarks/overlap.py`` are read off the same layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tbo_parity.benchmarks import overlap as ob
from tbo_parity.parity_tests import model_parity as mp
from tbo_parity.reference import model as ref_model
from tbo_parity.torch_impl import model as torch_model
from tbo_parity.torch_impl import operations as torch_ops
from tbo_parity.torch_impl.attention import TorchAttnBackend
from tbo_parity.torch_impl.forward_mode import ForwardMode
from tbo_parity.torch_impl.overlap import _state

MODES = ("EXTEND", "DECODE", "TARGET_VERIFY")
STRATEGIES = ("prefill", "decode")
NUM_LAYERS = 2


@pytest.fixture(scope="module")
def models():
    return mp.make_models(seed=0, num_layers=NUM_LAYERS)


# ---------------------------------------------------------------------------------------------
# Each side's layout, as built, in one comparable form: a layer's words, "|" for a yield.
# ---------------------------------------------------------------------------------------------


def jax_layer_words(cfg, weights, mode: str) -> list:
    """Per layer, the JAX spec's operation names (``l3.attn_core`` -> ``attn_core``) and "|"
    for its yields, as ``model_operations`` builds them (the embed and final operations, which
    lie outside the layers, left out)."""
    ops, _ = ref_model.model_operations(
        cfg, weights, mode, draft_token_num=2 if mode == "TARGET_VERIFY" else None)
    assert [op.name for op in (ops[0], ops[-1])] == ["embed", "final"]
    layers = [[] for _ in range(cfg.num_layers)]
    layer = 0
    for op in ops[1:-1]:
        if isinstance(op, ref_model.YieldOperation):
            layers[layer].append("|")
            continue
        prefix, name = op.name.split(".", 1)
        layer = int(prefix[1:])
        layers[layer].append(name)
    return layers


def torch_layer_words(model, mode: str) -> list:
    """Per layer, the PyTorch layer's operation names (``op_attn_core`` -> ``attn_core``) and
    "|" for its yields, as ``MoEDecoderLayer.operations`` builds them."""
    strategy = torch_model.strategy_for(ForwardMode[mode])
    return [["|" if isinstance(op, torch_ops.YieldOperation)
             else op.__func__.__name__.removeprefix("op_") for op in layer.operations(strategy)]
            for layer in model.layers]


def stages(words: list) -> list:
    """A layer's words cut at the yields: its stages, each a list of operation names (a
    trailing yield ends the last stage)."""
    cut = " ".join(words).split("|")
    return [stage.split() for stage in (cut[:-1] if not cut[-1].strip() else cut)]


def mismatches(jax_words: list, torch_words: list) -> list:
    """Where two layers' layouts differ, one readable line each; [] when they are twins."""
    found = []
    jax_stages, torch_stages = stages(jax_words), stages(torch_words)
    if len(jax_stages) != len(torch_stages):
        found.append(f"{len(jax_stages)} stages in JAX, {len(torch_stages)} in PyTorch")
    for index, (a, b) in enumerate(zip(jax_stages, torch_stages)):
        if a != b:
            found.append(f"stage {index}: JAX {a}, PyTorch {b}")
    if jax_words != torch_words and not found:  # the same stages, a yield added at the end
        found.append(f"JAX {jax_words}, PyTorch {torch_words}")
    return found


# ---------------------------------------------------------------------------------------------
# The layouts agree.
# ---------------------------------------------------------------------------------------------


def test_both_sides_publish_the_same_layout_text():
    assert ref_model.LAYOUTS == torch_model.LAYOUTS
    assert set(torch_model.LAYOUTS) == set(STRATEGIES)


@pytest.mark.parametrize("mode", MODES)
def test_both_sides_build_the_same_stages_and_operations(models, mode):
    """Every layer of each side, as built for ``mode``, has the published layout's operations
    under the same names, in the same order and the same stages, with the same offset."""
    ref_cfg, _, weights, model = models
    strategy = torch_model.strategy_for(ForwardMode[mode])
    assert ref_model.strategy_for(mode) == strategy
    published = ref_model.LAYOUTS[strategy].split()
    jax_words, torch_words = jax_layer_words(ref_cfg, weights, mode), torch_layer_words(model,
                                                                                        mode)
    assert jax_words == torch_words == [published] * NUM_LAYERS
    assert mismatches(jax_words[0], torch_words[0]) == []
    assert ref_model.DELTA_STAGES[mode] == torch_model.DELTA_STAGES[strategy]


def test_the_layouts_as_they_read():
    """The layouts spelled out, stage by stage (docs/spec.md, "Overlapped execution")."""
    assert stages(ref_model.LAYOUTS["prefill"].split()) == [
        ["attn_input_prep", "attn_qkv", "attn_core", "mlp_input_prep", "router_gate",
         "select_experts", "dispatch_launch"],
        ["dispatch_wait", "routed_experts", "combine_launch"],
        ["shared_experts", "combine_wait", "layer_output"]]
    assert stages(ref_model.LAYOUTS["decode"].split()) == [
        ["attn_input_prep", "attn_qkv"],
        ["attn_core", "mlp_input_prep", "router_gate", "select_experts"],
        ["dispatch_launch", "shared_experts"],
        ["dispatch_wait", "routed_experts", "combine_launch"],
        ["combine_wait", "layer_output"]]


def test_timeline_labels_name_the_shared_stages():
    """The benchmark's timeline labels (``"a1: attn_core mlp_input_prep ..."``) are the decode
    layout's stages, so a timeline reads the same on both sides."""
    names = ob._stage_names()
    assert names == stages(ref_model.LAYOUTS["decode"].split())
    assert ob.stage_label(1, 6, names) == "b6: " + " ".join(names[1])


# ---------------------------------------------------------------------------------------------
# A drift on one side is caught.
# ---------------------------------------------------------------------------------------------


def _mutated(words: list, how: str) -> list:
    words = list(words)
    if how == "renamed":
        words[words.index("attn_core")] = "attn_part2"
    elif how == "swapped":
        i = words.index("shared_experts")
        words[i - 1], words[i] = words[i], words[i - 1]
    elif how == "yield moved":
        i = words.index("|")
        words[i], words[i + 1] = words[i + 1], words[i]
    elif how == "dropped":
        words.remove("layer_output")
    else:  # "yield added"
        words.append("|")
    return words


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("how", ["renamed", "swapped", "yield moved", "dropped", "yield added"])
def test_a_mutated_copy_of_one_side_is_caught(strategy, how):
    words = ref_model.LAYOUTS[strategy].split()
    if how == "yield added" and strategy == "decode":
        words = words[:-1]  # the decode layout already ends in a yield: add it to a copy without
    assert mismatches(words, words) == []
    assert mismatches(words, _mutated(words, how)) != []
    assert mismatches(_mutated(words, how), words) != []


def test_a_renamed_torch_operation_fails_the_comparison(models, monkeypatch):
    """A PyTorch rename that is consistent on its own side (the method and the layout text)
    still runs, but no longer matches the spec."""
    ref_cfg, _, weights, model = models

    def op_attn_part2(self, s):
        return torch_model.MoEDecoderLayer.op_attn_core(self, s)

    monkeypatch.setattr(torch_model.MoEDecoderLayer, "op_attn_part2", op_attn_part2,
                        raising=False)
    monkeypatch.setitem(torch_model.LAYOUTS, "decode",
                        torch_model.LAYOUTS["decode"].replace("attn_core", "attn_part2"))
    found = mismatches(jax_layer_words(ref_cfg, weights, "DECODE")[0],
                       torch_layer_words(model, "DECODE")[0])
    assert found == ["stage 1: JAX ['attn_core', 'mlp_input_prep', 'router_gate', "
                     "'select_experts'], PyTorch ['attn_part2', 'mlp_input_prep', "
                     "'router_gate', 'select_experts']"]


def test_a_moved_jax_yield_fails_the_comparison(models, monkeypatch):
    """The spec's operations moved across a yield (here the attention core back into stage 0)
    compute the same outputs, but the comparison sees it."""
    ref_cfg, _, weights, model = models
    monkeypatch.setitem(ref_model.LAYOUTS, "decode", ref_model.LAYOUTS["decode"].replace(
        "attn_qkv | attn_core", "attn_qkv attn_core |"))
    found = mismatches(jax_layer_words(ref_cfg, weights, "TARGET_VERIFY")[0],
                       torch_layer_words(model, "TARGET_VERIFY")[0])
    assert found[:2] == ["stage 0: JAX ['attn_input_prep', 'attn_qkv', 'attn_core'], PyTorch "
                         "['attn_input_prep', 'attn_qkv']",
                         "stage 1: JAX ['mlp_input_prep', 'router_gate', 'select_experts'], "
                         "PyTorch ['attn_core', 'mlp_input_prep', 'router_gate', "
                         "'select_experts']"]


# ---------------------------------------------------------------------------------------------
# The KV cache is written by the attention core, on both sides.
# ---------------------------------------------------------------------------------------------


def _jitted_operation(op):
    """``op`` as one jitted program, ``(values, k, v) -> (values, k, v)`` (the state's values
    but the pools, then the pools): one compilation per operation. Run eagerly, each primitive
    compiled on its own: 356 compilations for the three cases below, 15 s on 2 cores."""
    def run(values, k, v):
        pools = ref_model.KVPools(k=k, v=v)
        state = ref_model.State(**values, pools=pools)
        op(state)
        state.pop("pools")
        return {name: getattr(state, name) for name in state.keys()}, pools.k, pools.v

    return jax.jit(run, compiler_options=mp.fast_compile())


def jax_pool_writers(world, cfg, weights) -> list:
    """The names of the JAX operations after which the KV pools changed, run one at a time
    (each jitted, see ``_jitted_operation``)."""
    inputs = ref_model.normalize_inputs(ref_model.ModelInputs(
        input_ids=world.input_ids, positions=world.positions, out_cache_loc=world.out_cache_loc,
        req_pool_indices=world.req_pool_indices, seq_lens=world.seq_lens,
        extend_prefix_lens=world.prefix_lens, extend_seq_lens=world.extend_lens,
        custom_mask=world.custom_mask, req_to_token=world.req_to_token))
    k, v = jnp.asarray(world.k_pool), jnp.asarray(world.v_pool)
    state = ref_model.initial_state(inputs, ref_model.KVPools(k=k, v=v))
    state.pop("pools")
    values = {name: getattr(state, name) for name in state.keys()}
    ops, _ = ref_model.model_operations(cfg, weights, world.case.mode,
                                        draft_token_num=world.case.draft_token_num)
    writers = []
    for op in ops:
        if isinstance(op, ref_model.YieldOperation):
            continue
        values, k_after, v_after = _jitted_operation(op)(values, k, v)
        if not (np.array_equal(k, k_after) and np.array_equal(v, v_after)):
            writers.append(op.name)
        k, v = k_after, v_after
    return writers


def torch_pool_writers(world, model) -> list:
    """The names of the PyTorch operations after which the KV pool changed, run one at a
    time."""
    batch = mp.torch_batch(world, dtype=torch.float32, device="cpu")
    backend = TorchAttnBackend()
    backend.init_forward_metadata(batch)
    state = _state(batch, backend, model.embed[batch.input_ids], None)
    ops, _ = model.operations(batch.forward_mode)
    writers, pool = [], batch.kv_pool
    with torch.no_grad():
        for op in ops:
            if isinstance(op, torch_ops.YieldOperation):
                continue
            before = pool.clone()
            op(state)
            if not (torch.equal(before.k, pool.k) and torch.equal(before.v, pool.v)):
                writers.append(f"l{op.__self__.layer}.{op.__func__.__name__.removeprefix('op_')}")
    return writers


@pytest.mark.parametrize("name", ["extend-two-chunk-prefixed", "decode", "target-verify-tree"])
def test_the_kv_cache_is_written_by_attn_core_on_both_sides(models, name):
    """Only ``attn_core`` changes the KV pools, once per layer, on both sides: the write lies
    in the stage of the read it feeds (docs/spec.md, "Overlapped execution")."""
    ref_cfg, _, weights, model = models
    world = mp.build_world(mp.CASES[name], ref_cfg)
    want = [f"l{layer}.attn_core" for layer in range(NUM_LAYERS)]
    assert jax_pool_writers(world, ref_cfg, weights) == want
    assert torch_pool_writers(world, model) == want
    for strategy in STRATEGIES:
        core = [i for i, stage in enumerate(stages(ref_model.LAYOUTS[strategy].split()))
                if "attn_core" in stage]
        assert core == [0 if strategy == "prefill" else 1]


# ---------------------------------------------------------------------------------------------
# The state has one interface on both sides.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("State", [ref_model.State, torch_ops.State], ids=["jax", "torch"])
def test_state_interface(State):
    """Attributes to read and set, ``pop`` to consume, ``in`` and ``keys``; the same errors
    with the same messages on both sides."""
    s = State(hidden_states=1)
    s.q = 2
    assert (s.hidden_states, s.q, "q" in s, "k" in s) == (1, 2, True, False)
    assert sorted(s.keys()) == ["hidden_states", "q"]
    with pytest.raises(KeyError, match="state already holds 'q'; pop it before setting it again"):
        s.q = 3
    assert s.pop("q") == 2
    s.q = 3
    assert s.q == 3
    with pytest.raises(AttributeError, match=r"state has no 'k'; it holds \['hidden_states', "
                                             r"'q'\]"):
        s.k

