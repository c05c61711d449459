"""Validation of the inputs of the split functions: every bad input is a ValueError naming the
argument, raised before any work starts. (The JAX spec validates the same inputs the same way;
parity tests assert both sides reject the same inputs.)"""

from __future__ import annotations

from typing import Optional, Sequence

from torch_impl.forward_mode import TBO_MODES, ForwardMode


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_mode(forward_mode) -> ForwardMode:
    if not isinstance(forward_mode, ForwardMode):
        raise ValueError(f"forward_mode must be a ForwardMode, got {forward_mode!r}")
    if forward_mode not in TBO_MODES:
        raise ValueError(f"forward_mode {forward_mode.name} is not supported by two-batch overlap")
    return forward_mode


def check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"threshold must be a number in (0, 0.5], got {threshold!r}")
    if not 0 < threshold <= 0.5:
        raise ValueError(f"threshold must be in (0, 0.5], got {threshold!r}")
    return float(threshold)


def check_count(name: str, value, minimum: int = 0) -> int:
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_lens(name: str, values: Optional[Sequence[int]], minimum: int) -> list:
    if values is None:
        raise ValueError(f"{name} is required")
    values = list(values)
    for value in values:
        check_count(name, value, minimum)
    return values


def check_extend_lens(extend_lens) -> list:
    lens = check_lens("extend_lens", extend_lens, 1)
    if not lens:
        raise ValueError("extend_lens must hold at least one sequence in EXTEND")
    return lens


def check_no_token_num_per_seq(token_num_per_seq) -> None:
    if token_num_per_seq is not None:
        raise ValueError("token_num_per_seq must be None in EXTEND")


def check_uniform(mode: ForwardMode, extend_lens, token_num_per_seq) -> int:
    """DECODE / TARGET_VERIFY: no extend lens, a positive token count per sequence."""
    if extend_lens is not None:
        raise ValueError(f"extend_lens must be None in {mode.name}")
    return check_count("token_num_per_seq", token_num_per_seq, 1)


def check_idle(extend_lens, token_num_per_seq, allowed=(None, 0)) -> None:
    if extend_lens is not None:
        raise ValueError("extend_lens must be None in IDLE")
    if isinstance(token_num_per_seq, bool) or token_num_per_seq not in allowed:
        raise ValueError(f"token_num_per_seq must be one of {allowed} in IDLE, "
                         f"got {token_num_per_seq!r}")


def check_divisible(name: str, num_tokens: int, token_num_per_seq: int) -> None:
    if num_tokens % token_num_per_seq:
        raise ValueError(f"{name}={num_tokens} is not a multiple of "
                         f"token_num_per_seq={token_num_per_seq}")


def check_extend_batch(seq_lens: list, extend_lens, extend_prefix_lens):
    """EXTEND lengths agree: seq_lens == prefix + extend. A missing prefix is derived."""
    lens = check_extend_lens(extend_lens)
    if len(seq_lens) != len(lens):
        raise ValueError(f"seq_lens has {len(seq_lens)} entries, extend_lens {len(lens)}")
    if extend_prefix_lens is None:
        prefix = [s - e for s, e in zip(seq_lens, lens)]
        check_lens("seq_lens", prefix, 0)  # a seq_len shorter than its extend_len
        return lens, prefix
    prefix = check_lens("extend_prefix_lens", extend_prefix_lens, 0)
    if len(prefix) != len(lens):
        raise ValueError(f"extend_prefix_lens has {len(prefix)} entries, extend_lens {len(lens)}")
    if any(s != p + e for s, p, e in zip(seq_lens, prefix, lens)):
        raise ValueError("seq_lens must equal extend_prefix_lens + extend_lens")
    return lens, prefix
