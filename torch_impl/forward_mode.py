"""What a forward pass does (the PyTorch side's own copy; it must not import the JAX spec)."""

from __future__ import annotations

import enum


class ForwardMode(enum.Enum):
    """Forward modes of an engine. Only the first four take part in two-batch overlap."""

    EXTEND = "extend"
    DECODE = "decode"
    TARGET_VERIFY = "target_verify"
    IDLE = "idle"
    # Modes TBO does not split; present so that validation can reject them by name.
    MIXED = "mixed"
    DRAFT_EXTEND = "draft_extend"

    def is_extend(self) -> bool:
        return self is ForwardMode.EXTEND

    def is_uniform(self) -> bool:
        """DECODE and TARGET_VERIFY: every sequence brings the same number of tokens."""
        return self in (ForwardMode.DECODE, ForwardMode.TARGET_VERIFY)

    def is_idle(self) -> bool:
        return self is ForwardMode.IDLE


TBO_MODES = (ForwardMode.EXTEND, ForwardMode.DECODE, ForwardMode.TARGET_VERIFY, ForwardMode.IDLE)


def strategy_for(forward_mode: ForwardMode) -> str:
    """The operations layout a mode runs (docs/spec.md, "Overlapped execution"): EXTEND the
    "prefill" one, DECODE and TARGET_VERIFY the "decode" one."""
    if forward_mode.is_extend():
        return "prefill"
    if forward_mode.is_uniform():
        return "decode"
    raise ValueError(f"forward_mode {forward_mode.name} has no operations strategy")
