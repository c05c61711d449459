"""The PyTorch operations executor: schedules, state safety and the published layouts."""

from __future__ import annotations

import pytest
from torch.profiler import ProfilerActivity, profile

from tbo_parity.reference import operations as ref_ops
from tbo_parity.torch_impl.forward_mode import ForwardMode
from tbo_parity.torch_impl.model import DELTA_STAGES, LAYOUTS, strategy_for
from tbo_parity.torch_impl.operations import (State, YieldOperation, execute_operations,
                                              execute_overlapped_operations, split_stages,
                                              stage_schedule)


def test_state_refuses_silent_overwrite():
    state = State(hidden_states=1)
    with pytest.raises(KeyError, match="hidden_states"):
        state.hidden_states = 2
    assert state.pop("hidden_states") == 1
    state.hidden_states = 2  # allowed once popped
    assert state.hidden_states == 2


def test_stage_schedule_written_out_by_hand():
    # delta 0: A and B alternate from the start.
    assert stage_schedule(3, 0) == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    # delta 2: A runs two stages alone, they alternate, B runs its last two alone.
    assert stage_schedule(3, 2) == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2)]
    assert stage_schedule(5, 2) == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("a", 3), ("b", 1),
                                    ("a", 4), ("b", 2), ("b", 3), ("b", 4)]


@pytest.mark.parametrize("stages,delta", [(3, 0), (5, 2), (10, 2), (1, 1), (0, 0)])
def test_schedule_matches_the_jax_twin(stages, delta):
    assert stage_schedule(stages, delta) == ref_ops.stage_schedule(stages, delta)


@pytest.mark.parametrize("delta", [-1, 4, 1.0, True])
def test_bad_delta_stages_raise(delta):
    with pytest.raises(ValueError, match="delta_stages"):
        stage_schedule(3, delta)


def _recording_ops(log, stages):
    ops = []
    for index in range(stages):
        ops.append(lambda s, i=index: log.append((s.name, i)))
        ops.append(YieldOperation())
    return ops


@pytest.mark.parametrize("delta", [0, 1, 2])
def test_overlapped_executor_follows_the_schedule(delta):
    log = []
    ops = _recording_ops(log, 4)
    execute_overlapped_operations([State(name="a"), State(name="b")], [ops, ops], delta)
    assert log == stage_schedule(4, delta)


def test_plain_executor_runs_every_operation_in_order():
    log = []
    execute_operations(State(name="p"), _recording_ops(log, 3))
    assert log == [("p", 0), ("p", 1), ("p", 2)]


def test_micro_batches_with_different_stage_counts_are_rejected():
    with pytest.raises(ValueError, match="operations_arr"):
        execute_overlapped_operations([State(), State()], [[print, YieldOperation(), print],
                                                           [print]], 0)


def test_split_stages_cuts_at_yields():
    a, b, c = (lambda s: None for _ in range(3))
    assert split_stages([a, YieldOperation(), b, c, YieldOperation()]) == [[a], [b, c]]


def test_published_layouts():
    """Prefill: two yields per layer (after dispatch launch, after combine launch), delta 0.
    Decode: five stages per layer, delta 2; attention is cut between projections and core."""
    assert strategy_for(ForwardMode.EXTEND) == "prefill"
    assert strategy_for(ForwardMode.DECODE) == strategy_for(ForwardMode.TARGET_VERIFY) == "decode"
    prefill = [stage.split() for stage in LAYOUTS["prefill"].split("|")]
    assert prefill[0][-1] == "dispatch_launch" and prefill[1][-1] == "combine_launch"
    assert DELTA_STAGES["prefill"] == 0
    decode = [stage.split() for stage in LAYOUTS["decode"].split("|") if stage.strip()]
    assert len(decode) == 5 and DELTA_STAGES["decode"] == 2
    assert decode[0][-1] == "attn_qkv" and decode[1][0] == "attn_core"
    assert "dispatch_launch" in decode[2] and "dispatch_wait" in decode[3]
    assert "combine_launch" in decode[3] and "combine_wait" in decode[4]
    with pytest.raises(ValueError, match="forward_mode"):
        strategy_for(ForwardMode.IDLE)


def test_profiler_ranges_name_each_stage_and_micro_batch():
    """With profile=True a trace shows which micro-batch ran which stage: a0, b0, a1, ..."""
    ops = [lambda s: None, YieldOperation(), lambda s: None]
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        execute_overlapped_operations([State(), State()], [ops, ops], 0, profile=True)
    names = {event.name for event in trace.events()}
    assert {"a0", "b0", "a1", "b1"} <= names
