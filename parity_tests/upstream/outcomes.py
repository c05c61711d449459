"""What a call returns, on either side, in comparable form: a value in plain Python values,
or ``Raised``; a release's function called with its arguments bound by parameter name.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Callable

from tbo_parity.parity_tests.upstream.lift import Release, parameters_of

@dataclasses.dataclass(frozen=True)
class Raised:
    """The outcome of a call that raised."""

    error: str

    def __repr__(self):
        return f"raises {self.error}"


SPEC_REJECTS = Raised("ValueError")
IDLE_REPLAY_DIVIDES = Raised("ZeroDivisionError")  # 0.4.9 on: IDLE's token_num_per_seq is 0


class MissingMode(Raised):
    """A probe names a mode the release's own ForwardMode does not have: nothing was called."""


def _plain(value):
    """A result in comparable Python values (tensors and arrays as tuples, modes by name)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, enum.Enum):
        return value.name
    return value


def call_release(release: Release, role: str, values: dict, threshold: float = 0.48):
    """The release's ``role`` function on the values whose names match its parameters."""
    loaded = release.roles[role]
    kwargs = {}
    for name, parameter in parameters_of(loaded.function).items():
        if name in values:
            kwargs[name] = values[name]
        elif parameter.default is parameter.empty and parameter.kind not in (
                parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            return Raised(f"TypeError: the loader has no value for parameter {name!r}")
    release.settings.threshold = threshold
    try:
        return _plain(loaded.function(**kwargs))
    except Exception as error:  # noqa: BLE001 (any failure is an outcome to compare)
        return Raised(type(error).__name__)


def spec_outcome(function: Callable):
    try:
        return _plain(function())
    except ValueError:
        return SPEC_REJECTS
