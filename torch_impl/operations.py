"""Operations with yield points, and the executor that overlaps two micro-batches.

A layer's forward is a flat list of callables ``op(state)``; ``YieldOperation()`` entries cut
it into *stages*. The plain path runs every operation in order. The overlapped path steps two
micro-batches A and B through their stage lists with an offset of ``delta_stages``:

    A runs stages 0 .. delta-1 alone, then A's stage i+delta and B's stage i alternate,
    then B runs its last delta stages alone.

Communication is launched in one stage and waited on in a later one, so whatever the other
micro-batch runs in between overlaps it. The schedule is data: ``stage_schedule`` returns it.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch


class YieldOperation:
    """A stage boundary: here the executor may switch to the other micro-batch."""

    def __repr__(self):
        return "|"


class State:
    """Values one micro-batch passes from operation to operation, read and set as attributes
    (``s.q = q``, ``s.q``), the same interface as ``reference.model.State``.

    Setting a name that is already set raises: an operation that replaces a value must
    ``pop`` it first, so no value is overwritten by accident (e.g. by the other micro-batch's
    operation writing into the wrong state).
    """

    def __init__(self, **values):
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name):
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"state has no {name!r}; it holds {sorted(self._values)}")

    def __setattr__(self, name, value):
        if name in self._values:
            raise KeyError(f"state already holds {name!r}; pop it before setting it again")
        self._values[name] = value

    def __contains__(self, name):
        return name in self._values

    def pop(self, name):
        return self._values.pop(name)

    def keys(self):
        return self._values.keys()


def split_stages(operations: Sequence) -> list:
    """The operations between yields, as a list of stages (a trailing yield ends the last)."""
    stages, current = [], []
    for op in operations:
        if isinstance(op, YieldOperation):
            stages.append(current)
            current = []
        else:
            current.append(op)
    if current:
        stages.append(current)
    return stages


def stage_schedule(num_stages: int, delta_stages: int) -> list:
    """The order the overlapped executor runs stages in: [("a", 0), ("a", 1), ("b", 0), ...]."""
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 0:
        raise ValueError(f"num_stages must be an int >= 0, got {num_stages!r}")
    if (isinstance(delta_stages, bool) or not isinstance(delta_stages, int)
            or not 0 <= delta_stages <= num_stages):
        raise ValueError(f"delta_stages must be an int in [0, num_stages={num_stages}], "
                         f"got {delta_stages!r}")
    schedule = [("a", i) for i in range(delta_stages)]
    for i in range(num_stages - delta_stages):
        schedule += [("a", i + delta_stages), ("b", i)]
    schedule += [("b", i) for i in range(num_stages - delta_stages, num_stages)]
    return schedule


def _profiled(enabled: bool, label: str):
    """A named profiler range per stage and micro-batch ("a0", "b1", ...) when enabled."""
    return torch.profiler.record_function(label) if enabled else contextlib.nullcontext()


def _run_stage(stage: Sequence[Callable], state: State) -> None:
    for op in stage:
        op(state)


def execute_operations(state: State, operations: Sequence, *, profile: bool = False) -> State:
    """The plain path: every operation in order, yields ignored."""
    for index, stage in enumerate(split_stages(operations)):
        with _profiled(profile, f"plain{index}"):
            _run_stage(stage, state)
    return state


def execute_overlapped_operations(states: Sequence[State], operations_arr: Sequence[Sequence],
                                  delta_stages: int, *, profile: bool = False) -> list:
    """Two micro-batches (states[0] = A, states[1] = B) stepped by ``stage_schedule``."""
    if len(states) != 2 or len(operations_arr) != 2:
        raise ValueError("execute_overlapped_operations takes exactly two micro-batches")
    stages = [split_stages(ops) for ops in operations_arr]
    if len(stages[0]) != len(stages[1]):
        raise ValueError(f"operations_arr: micro-batches have {len(stages[0])} and "
                         f"{len(stages[1])} stages")
    for name, index in stage_schedule(len(stages[0]), delta_stages):
        which = "ab".index(name)
        with _profiled(profile, f"{name}{index}"):
            _run_stage(stages[which][index], states[which])
    return list(states)
