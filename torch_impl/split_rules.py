"""Validation of the inputs of the split functions: every bad input is a ValueError naming the
argument, raised before any work starts. (The JAX spec validates the same inputs the same way,
with the same messages; parity tests assert both sides reject the same inputs alike.)

What is accepted (docs/spec.md, "Bad input" and "Representable range"):

- a count: any integral scalar, i.e. what ``operator.index`` takes (a Python int, a numpy
  integer, a 0-dim integer numpy array or torch tensor), but never a bool, a float or an array
  with dimensions;
- a list of lengths: any sequence (or other iterable) of such scalars, or a 1-D integer array
  (numpy or torch);
- a forward mode: a ``ForwardMode``, or a member of another package's enum of that name (the JAX
  spec's) whose name is a mode of this package;
- every count and length, and every sum of token counts, at most ``MAX_COUNT``.
"""

from __future__ import annotations

import enum
import numbers
import operator
import re
import reprlib
from collections.abc import Mapping, Set
from typing import Optional

from tbo_parity.torch_impl.forward_mode import TBO_MODES, ForwardMode

# How EXTEND picks its split (docs/spec.md, "EXTEND split rules"): the options, and the default.
EXTEND_SPLITS = ("balanced", "two_chunk", "guarded_two_chunk")
DEFAULT_EXTEND_SPLIT = "two_chunk"

# How data-parallel ranks agree (docs/spec.md, "Data-parallel agreement"): the options, and the
# default. "idle_left_out": idle ranks take no part in the agreement; "idle_as_decode": an idle
# rank counts as a DECODE rank (SGLang 0.4.7 to 0.4.9.post3).
DP_RULES = ("idle_left_out", "idle_as_decode")
DEFAULT_DP_RULE = "idle_left_out"

# The largest count the spec covers (int32): every count and length, and every sum of token
# counts, must be <= MAX_COUNT. The JAX spec computes in fixed-width integers, so past it the
# two sides would silently disagree; both reject such input instead.
MAX_COUNT = 2**31 - 1

_INTEGER_DTYPE = re.compile(r"(torch\.)?u?int\d*")  # numpy / jax / torch integer dtype names
_REAL_DTYPE = re.compile(r"(torch\.)?(u?int|float|bfloat)\d*")  # ... and float dtype names

_repr = reprlib.Repr()
_repr.maxlist = _repr.maxtuple = 20
_repr.maxstring, _repr.maxother = 60, 80


def _shape(value) -> Optional[tuple]:
    """The shape of an array-like value (numpy, torch, jax), None for anything else."""
    shape = getattr(value, "shape", None)
    if shape is None or getattr(value, "dtype", None) is None:
        return None
    try:
        return tuple(int(n) for n in shape)
    except (TypeError, ValueError):
        return None


def describe(value) -> str:
    """What was given, for an error message: a scalar's value and type; an array's type, shape
    and dtype (not its values)."""
    shape = _shape(value)
    kind = type(value).__name__
    if shape is None:
        return f"{_repr.repr(value)} of type {kind}"
    if shape:
        return f"{kind} of shape {shape} and dtype {value.dtype}"
    return f"{_repr.repr(value)} of type {kind}, shape () and dtype {value.dtype}"


def integer_or_none(value) -> Optional[int]:
    """An integral scalar as a Python int, or None if ``value`` is not one (bools are not)."""
    if type(value) is int:
        return value
    if isinstance(value, bool):
        return None
    shape = _shape(value)
    if shape is not None and (shape or not _INTEGER_DTYPE.fullmatch(str(value.dtype))):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def as_int(name: str, value) -> int:
    """An integral scalar as a Python int, else a ValueError naming ``name``."""
    number = integer_or_none(value)
    if number is None:
        raise ValueError(f"{name} must be an integer (an int, a numpy integer or a 0-dim integer "
                         f"array), got {describe(value)}")
    return number


def check_fits(name: str, value: int) -> int:
    """A count within the representable range (docs/spec.md)."""
    if value > MAX_COUNT:
        raise ValueError(f"{name}={value} exceeds MAX_COUNT={MAX_COUNT} (2**31 - 1), the largest "
                         f"count the spec covers")
    return value


def check_count(name: str, value, minimum: int = 0) -> int:
    """An integral scalar in [minimum, MAX_COUNT], as a Python int."""
    number = as_int(name, value)
    if number < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {number}")
    return check_fits(name, number)


def check_sequence(name: str, values) -> list:
    """The entries of a sequence (or other iterable), or of a 1-D integer array, as a list
    (entries unchecked)."""
    shape = _shape(values)
    if shape is not None:
        if len(shape) == 1 and _INTEGER_DTYPE.fullmatch(str(values.dtype)):
            return values.tolist()
    elif not isinstance(values, (str, bytes, bytearray, Mapping, Set)):
        try:
            return list(values)
        except TypeError:
            pass
    raise ValueError(f"{name} must be a sequence of ints or a 1-D integer array, "
                     f"got {describe(values)}")


def check_lens(name: str, values, minimum: int) -> list:
    """Per-sequence lengths, each in [minimum, MAX_COUNT], as a list of Python ints."""
    if values is None:
        raise ValueError(f"{name} is required")
    return [check_count(f"{name}[{i}]", value, minimum)
            for i, value in enumerate(check_sequence(name, values))]


def as_forward_mode(name: str, value, expected: str = "a ForwardMode") -> ForwardMode:
    """This package's ForwardMode for ``value``: itself, or, for a member of another package's
    ``ForwardMode`` (the JAX spec's), the member of the same name."""
    if isinstance(value, ForwardMode):
        return value
    if isinstance(value, enum.Enum) and type(value).__name__ == "ForwardMode":
        if value.name in ForwardMode.__members__:
            return ForwardMode[value.name]
        raise ValueError(f"{name} must be {expected}, got {value!r}, a ForwardMode of another "
                         f"package, and there is no ForwardMode.{value.name}")
    raise ValueError(f"{name} must be {expected}, got {describe(value)}")


def check_mode(forward_mode) -> ForwardMode:
    mode = as_forward_mode("forward_mode", forward_mode)
    if mode not in TBO_MODES:
        raise ValueError(f"forward_mode {mode.name} is not supported by two-batch overlap")
    return mode


def check_threshold(threshold) -> float:
    """A real scalar (an int or float, a numpy one, a 0-dim int or float array) in (0, 0.5]."""
    shape = _shape(threshold)
    if shape is None:
        real = isinstance(threshold, numbers.Real) and not isinstance(threshold, bool)
    else:
        real = shape == () and bool(_REAL_DTYPE.fullmatch(str(threshold.dtype)))
    if not real:
        raise ValueError(f"threshold must be a real number in (0, 0.5], "
                         f"got {describe(threshold)}")
    value = float(threshold)
    if not 0 < value <= 0.5:
        raise ValueError(f"threshold must be in (0, 0.5], got {value!r}")
    return value


def check_extend_split(extend_split) -> str:
    """One of EXTEND_SPLITS: which EXTEND rule to apply."""
    if not (isinstance(extend_split, str) and extend_split in EXTEND_SPLITS):
        raise ValueError(f"extend_split must be one of {EXTEND_SPLITS}, "
                         f"got {describe(extend_split)}")
    return extend_split


def check_dp_rule(dp_rule) -> str:
    """One of DP_RULES: which data-parallel agreement to apply."""
    if not (isinstance(dp_rule, str) and dp_rule in DP_RULES):
        raise ValueError(f"dp_rule must be one of {DP_RULES}, got {describe(dp_rule)}")
    return dp_rule


def check_extend_lens(extend_lens) -> list:
    lens = check_lens("extend_lens", extend_lens, 1)
    if not lens:
        raise ValueError("extend_lens must hold at least one sequence in EXTEND")
    check_fits("sum(extend_lens)", sum(lens))
    return lens


def check_no_token_num_per_seq(token_num_per_seq) -> None:
    if token_num_per_seq is not None:
        raise ValueError("token_num_per_seq must be None in EXTEND")


def check_fixed_token_num_per_seq(mode: ForwardMode, token_num_per_seq, allowed) -> None:
    """A mode whose token count per sequence is fixed (DECODE: 1, IDLE: 0) takes only the
    ``allowed`` values (None among them: not given)."""
    if token_num_per_seq is None:
        return
    number = as_int("token_num_per_seq", token_num_per_seq)
    if number not in allowed:
        raise ValueError(f"token_num_per_seq must be one of {allowed} in {mode.name}, "
                         f"got {number}")


def check_token_num_per_seq(mode: ForwardMode, token_num_per_seq) -> int:
    """DECODE: 1 (None or 1 given); TARGET_VERIFY: the given count, >= 1."""
    if mode is ForwardMode.DECODE:
        check_fixed_token_num_per_seq(mode, token_num_per_seq, (None, 1))
        return 1
    return check_count("token_num_per_seq", token_num_per_seq, 1)


def check_uniform(mode: ForwardMode, extend_lens, token_num_per_seq) -> int:
    """DECODE / TARGET_VERIFY: no extend lens, the mode's token count per sequence."""
    if extend_lens is not None:
        raise ValueError(f"extend_lens must be None in {mode.name}")
    return check_token_num_per_seq(mode, token_num_per_seq)


def check_idle(extend_lens, token_num_per_seq, allowed=(None, 0)) -> None:
    if extend_lens is not None:
        raise ValueError("extend_lens must be None in IDLE")
    check_fixed_token_num_per_seq(ForwardMode.IDLE, token_num_per_seq, allowed)


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
        for i, (s, e) in enumerate(zip(seq_lens, lens)):
            if s < e:
                raise ValueError(f"seq_lens[{i}]={s} is shorter than extend_lens[{i}]={e}")
        return lens, [s - e for s, e in zip(seq_lens, lens)]
    prefix = check_lens("extend_prefix_lens", extend_prefix_lens, 0)
    if len(prefix) != len(lens):
        raise ValueError(f"extend_prefix_lens has {len(prefix)} entries, extend_lens {len(lens)}")
    for i, (s, p, e) in enumerate(zip(seq_lens, prefix, lens)):
        if s != p + e:
            raise ValueError(f"seq_lens[{i}]={s} must equal extend_prefix_lens[{i}]={p} + "
                             f"extend_lens[{i}]={e}")
    return lens, prefix


def check_per_rank(per_rank) -> list:
    """The (can_run_tbo, mode or None) report of every data-parallel rank, modes as this
    package's ForwardMode."""
    if isinstance(per_rank, (str, bytes, bytearray, Mapping)):
        ranks = None
    else:
        try:
            ranks = list(per_rank)
        except TypeError:
            ranks = None
    if ranks is None:
        raise ValueError(f"per_rank must be a sequence of (can_run_tbo, mode) pairs, "
                         f"got {describe(per_rank)}")
    if not ranks:
        raise ValueError("per_rank must hold at least one rank")
    return [check_rank(index, rank) for index, rank in enumerate(ranks)]


def check_rank(index: int, rank) -> tuple:
    what = f"per_rank[{index}]"
    pair = None
    if not isinstance(rank, (str, bytes, bytearray, Mapping, Set)):
        try:
            pair = tuple(rank)
        except TypeError:
            pass
    if pair is None or len(pair) != 2:
        raise ValueError(f"{what} must be a (can_run_tbo, mode) pair, got {describe(rank)}")
    can_run, mode = pair
    if not isinstance(can_run, bool):
        raise ValueError(f"{what}: can_run_tbo must be a bool, got {describe(can_run)}")
    if mode is not None:
        mode = as_forward_mode(f"{what}: mode", mode, "a ForwardMode or None")
        if can_run and mode not in TBO_MODES:
            raise ValueError(f"{what}: a rank that can run TBO reports {mode.name}")
    return can_run, mode
