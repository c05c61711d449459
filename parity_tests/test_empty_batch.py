"""The empty micro-batch has one home per side: ``torch_impl/empty_batch.py`` and its JAX twin
``reference/empty_batch.py``. Both say "empty" for the same batches, the JAX side skips an
empty micro-batch (or runs the whole batch once when every part is empty), and the PyTorch
side's empty micro-batch runs exactly the layer's exchanges, on a state that keeps nothing.
What the model then does with an empty batch is held by the model and expert-parallel tests
(``test_model_parity.py``, ``test_reference_model.py``, ``test_expert_parallel*.py``).
"""

from __future__ import annotations

import inspect
import types

import numpy as np
import pytest
import torch

from tbo_parity.reference import empty_batch as spec
from tbo_parity.torch_impl import empty_batch as impl
from tbo_parity.torch_impl import model as torch_model
from tbo_parity.torch_impl.forward_mode import ForwardMode


def _torch_batch(mode: str, tokens: int):
    return types.SimpleNamespace(forward_mode=ForwardMode[mode], num_tokens=tokens)


def _jax_batch(tokens: int):
    return types.SimpleNamespace(input_ids=np.zeros((tokens,), np.int32))


@pytest.mark.parametrize("mode,tokens,empty", [
    ("IDLE", 0, True), ("DECODE", 0, True), ("EXTEND", 0, True), ("DECODE", 1, False),
    ("TARGET_VERIFY", 4, False), ("EXTEND", 7, False)])
def test_both_sides_call_the_same_batches_empty(mode, tokens, empty):
    assert impl.is_empty(_torch_batch(mode, tokens)) is empty
    assert spec.is_empty(_jax_batch(tokens)) is empty


def test_the_twins_share_the_predicate_and_its_parameters():
    assert list(inspect.signature(spec.is_empty).parameters) == \
        list(inspect.signature(impl.is_empty).parameters) == ["batch"]


def test_the_spec_skips_empty_parts_and_runs_an_all_empty_step_whole():
    whole, a, b, none = _jax_batch(5), _jax_batch(2), _jax_batch(3), _jax_batch(0)
    assert spec.step_batches(whole, (a, b)) == [a, b]
    assert spec.step_batches(whole, (none, b)) == [b]
    assert spec.step_batches(whole, (a, none)) == [a]
    idle, parts = _jax_batch(0), (_jax_batch(0), _jax_batch(0))
    assert spec.step_batches(idle, parts) == [idle]


def test_an_empty_state_holds_no_rows_and_no_batch():
    state = impl.empty_state(6, torch.bfloat16, "cpu", 1, 4)
    assert impl.is_empty_state(state)
    assert state.mlp_input.shape == (0, 6) and state.mlp_input.dtype == torch.bfloat16
    assert (state.micro_batch, state.ep_capacity) == (1, 4)
    assert not impl.is_empty_state(types.SimpleNamespace(forward_batch=_torch_batch("DECODE", 1)))


@pytest.mark.parametrize("strategy", ["prefill", "decode"])
def test_an_empty_micro_batch_runs_the_exchanges_in_the_layout_and_keeps_the_yields(strategy):
    """``operations(strategy, empty=True)`` is the layout with every operation that is not an
    exchange (or the expert compute between) left out, every yield kept: the same stages, so
    an empty micro-batch's exchanges fall in the same stages as a real one's."""
    words = torch_model.LAYOUTS[strategy].split()
    assert set(impl.EXCHANGE_OPERATIONS) <= set(words)
    want = [w for w in words if w == "|" or w in impl.EXCHANGE_OPERATIONS]
    layer = object.__new__(torch_model.MoEDecoderLayer)  # operations() reads only LAYOUTS
    got = ["|" if isinstance(op, torch_model.YieldOperation)
           else op.__func__.__name__.removeprefix("op_")
           for op in torch_model.MoEDecoderLayer.operations(layer, strategy, empty=True)]
    assert got == want
