"""The spec of how two-batch overlap (TBO) splits a forward batch, in JAX.

The rules are those of ``docs/spec.md``. The arithmetic lives in pure ``jax.numpy`` functions
over fixed-size arrays (padded, with a count of valid entries), so every rule can be
``jax.jit``-ed and ``jax.vmap``-ed over many batches at once. The named functions at the bottom
are thin wrappers: they validate Python inputs (``ValueError`` naming the argument; every count
at most ``MAX_COUNT``, see docs/spec.md, "Representable range"), pad them, call the pure
functions and return Python ints.

A child of a split is a ``Child``; the PyTorch side's is a ``TboChild`` with the same fields.
The two classes never compare equal (``==`` is False across them): compare ``as_tuple()``,
the plain-Python tuple that both return, equal exactly when the splits are.

Shape letters (docs/spec.md, "Shape letters"): ``B`` = sequence slots of a padded batch
(valid ones first, ``num_seqs`` of them; padded slots hold 0). Padded slots never change a result.

Precision: the two-chunk test compares an integer with ``total * threshold``, exactly as the
Python rule does in float64. The wrappers therefore run under ``jax.enable_x64(True)``;
callers of the pure functions get bit-for-bit agreement at the threshold boundary only with
x64 on (in float32, a sum that lands exactly on ``total * threshold`` may round either way).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import numbers
import operator
import re
import reprlib
from collections.abc import Mapping, Set
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

DEFAULT_THRESHOLD = 0.48

# How EXTEND picks its split (docs/spec.md, "EXTEND split rules"): the options, and the default.
# "balanced": the balanced split only (never two-chunk); "two_chunk": the balanced split, or
# two-chunk when it is lopsided beyond the threshold; "guarded_two_chunk": as "two_chunk", but
# two-chunk is refused when child A would hold more sequences than total // 2 tokens.
EXTEND_SPLITS = ("balanced", "two_chunk", "guarded_two_chunk")
DEFAULT_EXTEND_SPLIT = "two_chunk"

# How data-parallel ranks agree (docs/spec.md, "Data-parallel agreement"): the options, and the
# default. "idle_left_out": idle ranks take no part in the agreement; "idle_as_decode": an idle
# rank counts as a DECODE rank (SGLang 0.4.7 to 0.4.9.post3).
DP_RULES = ("idle_left_out", "idle_as_decode")
DEFAULT_DP_RULE = "idle_left_out"


class ForwardMode(enum.Enum):
    """What a forward pass does. Only the first four take part in two-batch overlap."""

    EXTEND = "extend"
    DECODE = "decode"
    TARGET_VERIFY = "target_verify"
    IDLE = "idle"
    # Modes an engine has that TBO does not split; they exist so validation can reject them.
    MIXED = "mixed"
    DRAFT_EXTEND = "draft_extend"


TBO_MODES = (ForwardMode.EXTEND, ForwardMode.DECODE, ForwardMode.TARGET_VERIFY, ForwardMode.IDLE)


def _mode_code(mode: ForwardMode) -> int:
    """A mode as the pure data-parallel function takes it: its index in ForwardMode."""
    return list(ForwardMode).index(mode)


# ---------------------------------------------------------------------------------------------
# Pure functions over padded arrays (jit/vmap-able).
# ---------------------------------------------------------------------------------------------


def balanced_split_index(extend_lens: jax.Array, num_seqs: jax.Array) -> jax.Array:
    """The balanced split of EXTEND: the walk of docs/spec.md, "Split sequence index", literally.

    extend_lens: [B] int, valid entries first (all >= 1), padded with 0.
    Walk i = 1 .. num_seqs-1 with left = sum(extend_lens[:i]) and diff = |left - (total-left)|;
    keep the last i whose diff is <= the best so far, stop at the first larger diff.
    Returns the kept i, or 0 when there is no i to walk (one sequence).
    """
    total = jnp.sum(extend_lens)
    lefts = jnp.cumsum(extend_lens)[:-1]  # [B-1]: lefts[i-1] = sum(extend_lens[:i])
    diffs = jnp.abs(2 * lefts - total)  # |left - (total - left)|
    steps = jnp.arange(1, extend_lens.shape[0])  # [B-1]: the i of each step

    def walk(carry, step):
        best_index, best_diff, stopped = carry
        i, diff = step
        in_range = i < num_seqs
        take = in_range & ~stopped & (diff <= best_diff)
        stopped = stopped | (in_range & ~take)
        return (
            jnp.where(take, i, best_index),
            jnp.where(take, diff, best_diff),
            stopped,
        ), None

    start = (jnp.zeros((), steps.dtype), jnp.asarray(jnp.iinfo(diffs.dtype).max, diffs.dtype),
             jnp.asarray(False))
    (best_index, _, _), _ = jax.lax.scan(walk, start, (steps, diffs))
    return best_index


def is_two_chunk(extend_lens: jax.Array, num_seqs: jax.Array, threshold,
                 extend_split: str = DEFAULT_EXTEND_SPLIT) -> jax.Array:
    """Whether the straddling sequence is cut in two: the balanced split is too lopsided (and,
    under "guarded_two_chunk", child A would hold no more sequences than tokens). Never under
    "balanced". ``extend_split`` is static (a Python str: pass it as a static argument to jit).
    """
    _check_extend_split(extend_split)
    total = jnp.sum(extend_lens)
    balanced = balanced_split_index(extend_lens, num_seqs)
    left = jnp.sum(jnp.where(jnp.arange(extend_lens.shape[0]) < balanced, extend_lens, 0))
    lo = total * threshold
    hi = total * (1 - threshold)
    lopsided = (left < lo) | (left > hi)
    if extend_split == "balanced":
        return jnp.zeros_like(lopsided)
    if extend_split == "guarded_two_chunk":
        # Child A would hold sequences [0, straddling + 1) and total // 2 tokens.
        return lopsided & (straddling_seq_index(extend_lens) + 1 <= total // 2)
    return lopsided


def straddling_seq_index(extend_lens: jax.Array) -> jax.Array:
    """Index of the first sequence at which the running sum exceeds total // 2."""
    half = jnp.sum(extend_lens) // 2
    # cumsum is non-decreasing, so the first index with cumsum > half is a searchsorted.
    return jnp.searchsorted(jnp.cumsum(extend_lens), half, side="right")


def extend_split_indices(extend_lens, num_seqs, threshold, extend_split=DEFAULT_EXTEND_SPLIT):
    """EXTEND: (split_seq_index, split_token_index, two_chunk) for a padded batch, under the
    rule ``extend_split`` (static)."""
    two_chunk = is_two_chunk(extend_lens, num_seqs, threshold, extend_split)
    balanced = balanced_split_index(extend_lens, num_seqs)
    split_seq = jnp.where(two_chunk, straddling_seq_index(extend_lens), balanced)
    before = jnp.sum(jnp.where(jnp.arange(extend_lens.shape[0]) < split_seq, extend_lens, 0))
    split_token = jnp.where(two_chunk, jnp.sum(extend_lens) // 2, before)
    return split_seq, split_token, two_chunk


def uniform_split_indices(num_tokens, token_num_per_seq):
    """DECODE / TARGET_VERIFY (and graph replay): cut the sequences in half."""
    split_seq = (num_tokens // token_num_per_seq) // 2
    return split_seq, split_seq * token_num_per_seq


def children_num_token_non_padded(split_token_index, num_token_non_padded):
    """Each child's count of real (non-padding) tokens: (min(split, n), max(0, n - split))."""
    a = jnp.minimum(split_token_index, num_token_non_padded)
    b = jnp.maximum(0, num_token_non_padded - split_token_index)
    return a, b


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ChildArrays:
    """One child of a split, padded to the parent's ``B`` sequence slots (valid first, the rest 0).

    seq_start/seq_end, token_start/token_end: the child's ranges in the parent.
    seq_lens, extend_seq_lens, extend_prefix_lens, extend_start_loc: [B], child-relative.
    """

    seq_start: jax.Array
    seq_end: jax.Array
    token_start: jax.Array
    token_end: jax.Array
    seq_lens: jax.Array
    extend_seq_lens: jax.Array
    extend_prefix_lens: jax.Array
    extend_start_loc: jax.Array


def _child_window(values, start, end):
    """values[start:end] moved to the front of a [B] array, zeros after (shape-static)."""
    slots = jnp.arange(values.shape[0])
    src = start + slots
    taken = jnp.take(values, jnp.clip(src, 0, values.shape[0] - 1))
    return jnp.where(src < end, taken, 0)


def _exclusive_cumsum(x):
    return jnp.cumsum(x) - x


def derive_extend_children(seq_lens, extend_lens, prefix_lens, num_seqs, threshold,
                           extend_split=DEFAULT_EXTEND_SPLIT):
    """EXTEND children, with the two-chunk re-derivation of the straddling sequence, under the
    rule ``extend_split`` (static).

    With s = split_seq, half = total // 2, left_last = half - sum(extend_lens[:s]):
    A holds sequences [0, s+1) when two-chunk (else [0, s)) and its last sequence keeps
    only left_last new tokens; B holds [s, num_seqs) and its first sequence starts
    left_last tokens later (prefix += left_last) with seq_len unchanged.
    """
    split_seq, split_token, two_chunk = extend_split_indices(extend_lens, num_seqs, threshold,
                                                             extend_split)
    total = jnp.sum(extend_lens)
    left_last = split_token - jnp.sum(
        jnp.where(jnp.arange(extend_lens.shape[0]) < split_seq, extend_lens, 0))
    a_end = split_seq + two_chunk.astype(split_seq.dtype)

    a_ext = _child_window(extend_lens, 0, a_end)
    a_pre = _child_window(prefix_lens, 0, a_end)
    a_last = (jnp.arange(a_ext.shape[0]) == split_seq) & two_chunk
    a_ext = jnp.where(a_last, left_last, a_ext)
    a = ChildArrays(
        seq_start=jnp.zeros_like(split_seq), seq_end=a_end,
        token_start=jnp.zeros_like(split_token), token_end=split_token,
        seq_lens=a_pre + a_ext, extend_seq_lens=a_ext, extend_prefix_lens=a_pre,
        extend_start_loc=_exclusive_cumsum(a_ext))

    b_ext = _child_window(extend_lens, split_seq, num_seqs)
    b_pre = _child_window(prefix_lens, split_seq, num_seqs)
    b_first = (jnp.arange(b_ext.shape[0]) == 0) & two_chunk
    b_ext = jnp.where(b_first, b_ext - left_last, b_ext)
    b_pre = jnp.where(b_first, b_pre + left_last, b_pre)
    b = ChildArrays(
        seq_start=split_seq, seq_end=jnp.asarray(num_seqs, split_seq.dtype),
        token_start=split_token, token_end=total,
        seq_lens=_child_window(seq_lens, split_seq, num_seqs), extend_seq_lens=b_ext,
        extend_prefix_lens=b_pre, extend_start_loc=_exclusive_cumsum(b_ext))
    return a, b


def derive_uniform_children(seq_lens, num_seqs, token_num_per_seq):
    """DECODE / TARGET_VERIFY (and IDLE with 0 sequences): cut the sequence list in half."""
    # bs // 2, the uniform rule written without dividing by token_num_per_seq (0 in IDLE).
    split_seq = jnp.asarray(num_seqs // 2)
    split_token = split_seq * token_num_per_seq
    zeros = jnp.zeros_like(seq_lens)
    a = ChildArrays(
        seq_start=jnp.zeros_like(split_seq), seq_end=split_seq,
        token_start=jnp.zeros_like(split_token), token_end=split_token,
        seq_lens=_child_window(seq_lens, 0, split_seq),
        extend_seq_lens=zeros, extend_prefix_lens=zeros, extend_start_loc=zeros)
    b = ChildArrays(
        seq_start=split_seq, seq_end=jnp.asarray(num_seqs, split_seq.dtype),
        token_start=split_token, token_end=num_seqs * token_num_per_seq,
        seq_lens=_child_window(seq_lens, split_seq, num_seqs),
        extend_seq_lens=zeros, extend_prefix_lens=zeros, extend_start_loc=zeros)
    return a, b


def dp_tbo_decision(can_run, mode_codes, dp_rule: str = DEFAULT_DP_RULE):
    """Data-parallel agreement over N ranks, under the rule ``dp_rule`` (static).

    can_run: [N] bool; mode_codes: [N] int (a mode's index in ForwardMode), -1 for an idle rank.
    Returns (run_tbo, global_mode_code); the code is -1 when TBO does not run.
    TBO runs iff every rank can run it, some rank is not idle, and all non-idle ranks agree;
    under "idle_as_decode" an idle rank first becomes a DECODE rank.
    """
    _check_dp_rule(dp_rule)
    if dp_rule == "idle_as_decode":
        mode_codes = jnp.where(mode_codes < 0, _mode_code(ForwardMode.DECODE), mode_codes)
    busy = mode_codes >= 0
    some_busy = jnp.any(busy)
    first_busy = jnp.argmax(busy)  # index of the first non-idle rank (0 if none)
    mode = mode_codes[first_busy]
    agree = jnp.all(~busy | (mode_codes == mode))
    run = jnp.all(can_run) & some_busy & agree
    return run, jnp.where(run, mode, -1)


# ---------------------------------------------------------------------------------------------
# Named wrappers: validate Python inputs, pad, call the pure functions, return Python ints.
# ---------------------------------------------------------------------------------------------

# What the wrappers accept (docs/spec.md, "Bad input" and "Representable range"): a count is any
# integral scalar (what ``operator.index`` takes: an int, a numpy integer, a 0-dim integer numpy
# or jax array; never a bool, a float or an array with dimensions); a list of lengths is any
# sequence (or other iterable) of those, or a 1-D integer array (numpy or jax); a forward mode
# is a ForwardMode, or a member of another package's ForwardMode (the PyTorch side's) whose name
# is one of ours. Messages are those of ``torch_impl/split_rules.py``, word for word.

# The largest count the spec covers (int32): every count and length, and every sum of token
# counts, must be <= MAX_COUNT. Within it the pure functions give the same results in int32 as
# in int64 (the wrappers' x64), and the same as the PyTorch side's Python ints; past it they
# would silently disagree, so the wrappers reject such input.
MAX_COUNT = 2**31 - 1

_INTEGER_DTYPE = re.compile(r"(torch\.)?u?int\d*")  # numpy / jax / torch integer dtype names
_REAL_DTYPE = re.compile(r"(torch\.)?(u?int|float|bfloat)\d*")  # ... and float dtype names

_repr = reprlib.Repr()
_repr.maxlist = _repr.maxtuple = 20
_repr.maxstring, _repr.maxother = 60, 80


def _shape(value) -> Optional[tuple]:
    """The shape of an array-like value (numpy, jax, torch), None for anything else."""
    shape = getattr(value, "shape", None)
    if shape is None or getattr(value, "dtype", None) is None:
        return None
    try:
        return tuple(int(n) for n in shape)
    except (TypeError, ValueError):
        return None


def _describe(value) -> str:
    """What was given, for an error message: a scalar's value and type; an array's type, shape
    and dtype (not its values)."""
    shape = _shape(value)
    kind = type(value).__name__
    if shape is None:
        return f"{_repr.repr(value)} of type {kind}"
    if shape:
        return f"{kind} of shape {shape} and dtype {value.dtype}"
    return f"{_repr.repr(value)} of type {kind}, shape () and dtype {value.dtype}"


def _integer_or_none(value) -> Optional[int]:
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


def _as_int(name: str, value) -> int:
    number = _integer_or_none(value)
    if number is None:
        raise ValueError(f"{name} must be an integer (an int, a numpy integer or a 0-dim integer "
                         f"array), got {_describe(value)}")
    return number


def _check_fits(name: str, value: int) -> int:
    if value > MAX_COUNT:
        raise ValueError(f"{name}={value} exceeds MAX_COUNT={MAX_COUNT} (2**31 - 1), the largest "
                         f"count the spec covers")
    return value


def _check_count(name: str, value, *, minimum: int = 0) -> int:
    number = _as_int(name, value)
    if number < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {number}")
    return _check_fits(name, number)


def _check_sequence(name: str, values) -> list:
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
                     f"got {_describe(values)}")


def _check_lens(name: str, values, *, minimum: int) -> list:
    if values is None:
        raise ValueError(f"{name} is required")
    return [_check_count(f"{name}[{i}]", value, minimum=minimum)
            for i, value in enumerate(_check_sequence(name, values))]


def _as_forward_mode(name: str, value, expected: str = "a ForwardMode") -> ForwardMode:
    if isinstance(value, ForwardMode):
        return value
    if isinstance(value, enum.Enum) and type(value).__name__ == "ForwardMode":
        if value.name in ForwardMode.__members__:
            return ForwardMode[value.name]
        raise ValueError(f"{name} must be {expected}, got {value!r}, a ForwardMode of another "
                         f"package, and there is no ForwardMode.{value.name}")
    raise ValueError(f"{name} must be {expected}, got {_describe(value)}")


def _check_mode(forward_mode) -> ForwardMode:
    mode = _as_forward_mode("forward_mode", forward_mode)
    if mode not in TBO_MODES:
        raise ValueError(f"forward_mode {mode.name} is not supported by two-batch overlap")
    return mode


def _check_threshold(threshold) -> float:
    """A real scalar (an int or float, a numpy one, a 0-dim int or float array) in (0, 0.5]."""
    shape = _shape(threshold)
    if shape is None:
        real = isinstance(threshold, numbers.Real) and not isinstance(threshold, bool)
    else:
        real = shape == () and bool(_REAL_DTYPE.fullmatch(str(threshold.dtype)))
    if not real:
        raise ValueError(f"threshold must be a real number in (0, 0.5], "
                         f"got {_describe(threshold)}")
    value = float(threshold)
    if not 0 < value <= 0.5:
        raise ValueError(f"threshold must be in (0, 0.5], got {value!r}")
    return value


def _check_extend_split(extend_split) -> str:
    """One of EXTEND_SPLITS (a str; checked in the pure functions too, where it is static)."""
    if not (isinstance(extend_split, str) and extend_split in EXTEND_SPLITS):
        raise ValueError(f"extend_split must be one of {EXTEND_SPLITS}, "
                         f"got {_describe(extend_split)}")
    return extend_split


def _check_dp_rule(dp_rule) -> str:
    """One of DP_RULES (a str; checked in the pure function too, where it is static)."""
    if not (isinstance(dp_rule, str) and dp_rule in DP_RULES):
        raise ValueError(f"dp_rule must be one of {DP_RULES}, got {_describe(dp_rule)}")
    return dp_rule


def _check_extend_lens(extend_lens) -> list:
    lens = _check_lens("extend_lens", extend_lens, minimum=1)
    if not lens:
        raise ValueError("extend_lens must hold at least one sequence in EXTEND")
    _check_fits("sum(extend_lens)", sum(lens))
    return lens


def _check_fixed_token_num_per_seq(mode, token_num_per_seq, allowed) -> None:
    """A mode whose token count per sequence is fixed (DECODE: 1, IDLE: 0) takes only the
    ``allowed`` values (None among them: not given)."""
    if token_num_per_seq is None:
        return
    number = _as_int("token_num_per_seq", token_num_per_seq)
    if number not in allowed:
        raise ValueError(f"token_num_per_seq must be one of {allowed} in {mode.name}, "
                         f"got {number}")


def _check_token_num_per_seq(mode, token_num_per_seq) -> int:
    """DECODE: 1 (None or 1 given); TARGET_VERIFY: the given count, >= 1."""
    if mode is ForwardMode.DECODE:
        _check_fixed_token_num_per_seq(mode, token_num_per_seq, (None, 1))
        return 1
    return _check_count("token_num_per_seq", token_num_per_seq, minimum=1)


def _check_uniform(mode, extend_lens, token_num_per_seq) -> int:
    if extend_lens is not None:
        raise ValueError(f"extend_lens must be None in {mode.name}")
    return _check_token_num_per_seq(mode, token_num_per_seq)


def _check_idle(extend_lens, token_num_per_seq, *, allowed=(None, 0)) -> None:
    if extend_lens is not None:
        raise ValueError("extend_lens must be None in IDLE")
    _check_fixed_token_num_per_seq(ForwardMode.IDLE, token_num_per_seq, allowed)


def _check_divisible(name, num_tokens, token_num_per_seq) -> None:
    if num_tokens % token_num_per_seq:
        raise ValueError(f"{name}={num_tokens} is not a multiple of "
                         f"token_num_per_seq={token_num_per_seq}")


def _bucket(n: int) -> int:
    """Pad lengths to a power of two (>= 8) so jit compiles a handful of shapes, not one each."""
    size = 8
    while size < n:
        size *= 2
    return size


def _padded(values, size=None):
    size = _bucket(len(values)) if size is None else size
    return jnp.asarray(list(values) + [0] * (size - len(values)), dtype=jnp.int64)


# The wrappers call the pure functions jitted: one dispatch a call, where eagerly each
# primitive was one (the same values, several times faster per call).
_extend_split_jit = jax.jit(extend_split_indices, static_argnames="extend_split")
_derive_extend_jit = jax.jit(derive_extend_children, static_argnames="extend_split")
_derive_uniform_jit = jax.jit(derive_uniform_children)
_dp_decision_jit = jax.jit(dp_tbo_decision, static_argnames="dp_rule")
_uniform_split_jit = jax.jit(uniform_split_indices)
_non_padded_jit = jax.jit(children_num_token_non_padded)


@functools.partial(jax.jit, static_argnames="extend_split")
def _extend_split_token(padded, num_seqs, threshold, split_seq_index, extend_split):
    """``compute_split_token_index`` in EXTEND: half the tokens if the split is two-chunk,
    else the tokens of the sequences before ``split_seq_index`` (a mask, not
    ``padded[:split_seq_index]``: one compiled shape for every index)."""
    before = jnp.arange(padded.shape[0]) < split_seq_index
    return jnp.where(is_two_chunk(padded, num_seqs, threshold, extend_split=extend_split),
                     jnp.sum(padded) // 2, jnp.sum(jnp.where(before, padded, 0)))


def token_num_per_seq(forward_mode, draft_token_num=None) -> Optional[int]:
    """Tokens each sequence brings: 1 in DECODE, draft_token_num in TARGET_VERIFY, 0 in IDLE,
    None in EXTEND (where it varies per sequence)."""
    mode = _check_mode(forward_mode)
    if draft_token_num is not None:
        draft_token_num = _check_count("draft_token_num", draft_token_num, minimum=1)
    if mode is ForwardMode.TARGET_VERIFY:
        if draft_token_num is None:
            raise ValueError("draft_token_num is required in TARGET_VERIFY")
        return draft_token_num
    if mode is ForwardMode.DECODE and draft_token_num not in (None, 1):
        raise ValueError(f"draft_token_num must be one of (None, 1) in DECODE, where "
                         f"token_num_per_seq is 1, got {draft_token_num}")
    return {ForwardMode.DECODE: 1, ForwardMode.IDLE: 0, ForwardMode.EXTEND: None}[mode]


def compute_split_seq_index(forward_mode, num_tokens, extend_lens, token_num_per_seq,
                            threshold=DEFAULT_THRESHOLD,
                            extend_split=DEFAULT_EXTEND_SPLIT) -> int:
    """Where child B's sequences start (EXTEND under the rule ``extend_split``)."""
    mode = _check_mode(forward_mode)
    threshold = _check_threshold(threshold)
    extend_split = _check_extend_split(extend_split)
    num_tokens = _check_count("num_tokens", num_tokens)
    if mode is ForwardMode.EXTEND:
        lens = _check_extend_lens(extend_lens)
        if token_num_per_seq is not None:
            raise ValueError("token_num_per_seq must be None in EXTEND")
        if num_tokens != sum(lens):
            raise ValueError(f"num_tokens={num_tokens} != sum(extend_lens)={sum(lens)}")
        with jax.enable_x64(True):
            split_seq, _, _ = _extend_split_jit(_padded(lens), len(lens), threshold,
                                                extend_split=extend_split)
            return int(split_seq)
    if mode is ForwardMode.IDLE:
        _check_idle(extend_lens, token_num_per_seq)
        if num_tokens != 0:
            raise ValueError(f"num_tokens must be 0 in IDLE, got {num_tokens}")
        return 0
    tnps = _check_uniform(mode, extend_lens, token_num_per_seq)
    _check_divisible("num_tokens", num_tokens, tnps)
    with jax.enable_x64(True):
        return int(_uniform_split_jit(jnp.int64(num_tokens), tnps)[0])


def compute_split_token_index(split_seq_index, forward_mode, extend_lens, token_num_per_seq,
                              threshold=DEFAULT_THRESHOLD,
                              extend_split=DEFAULT_EXTEND_SPLIT) -> int:
    """Where child B's tokens start (EXTEND under the rule ``extend_split``)."""
    mode = _check_mode(forward_mode)
    threshold = _check_threshold(threshold)
    extend_split = _check_extend_split(extend_split)
    split_seq_index = _check_count("split_seq_index", split_seq_index)
    if mode is ForwardMode.EXTEND:
        lens = _check_extend_lens(extend_lens)
        if token_num_per_seq is not None:
            raise ValueError("token_num_per_seq must be None in EXTEND")
        if split_seq_index > len(lens):
            raise ValueError(f"split_seq_index={split_seq_index} > number of sequences "
                             f"{len(lens)}")
        with jax.enable_x64(True):
            return int(_extend_split_token(_padded(lens), len(lens), threshold, split_seq_index,
                                           extend_split=extend_split))
    if mode is ForwardMode.IDLE:
        _check_idle(extend_lens, token_num_per_seq)
        if split_seq_index != 0:
            raise ValueError(f"split_seq_index must be 0 in IDLE, got {split_seq_index}")
        return 0
    tnps = _check_uniform(mode, extend_lens, token_num_per_seq)
    return _check_fits("split_seq_index * token_num_per_seq", split_seq_index * tnps)


def compute_split_indices_for_cuda_graph_replay(forward_mode, cuda_graph_num_tokens,
                                                token_num_per_seq) -> tuple:
    """(split_seq, split_token) of a captured graph, from the graph's own token count.

    (choice) IDLE replays as DECODE with one token per sequence.
    """
    mode = _check_mode(forward_mode)
    cuda_graph_num_tokens = _check_count("cuda_graph_num_tokens", cuda_graph_num_tokens)
    if mode is ForwardMode.EXTEND:
        raise ValueError("forward_mode EXTEND is not replayed from a CUDA graph")
    if mode is ForwardMode.IDLE:
        _check_idle(None, token_num_per_seq, allowed=(None, 0, 1))
        tnps = 1
    else:
        tnps = _check_token_num_per_seq(mode, token_num_per_seq)
    _check_divisible("cuda_graph_num_tokens", cuda_graph_num_tokens, tnps)
    with jax.enable_x64(True):
        seq, tok = _uniform_split_jit(jnp.int64(cuda_graph_num_tokens), tnps)
        return int(seq), int(tok)


def compute_children_num_token_non_padded(split_token_index, num_token_non_padded) -> tuple:
    """(child A's, child B's) count of real tokens."""
    split_token_index = _check_count("split_token_index", split_token_index)
    num_token_non_padded = _check_count("num_token_non_padded", num_token_non_padded)
    with jax.enable_x64(True):
        a, b = _non_padded_jit(jnp.int64(split_token_index), jnp.int64(num_token_non_padded))
        return int(a), int(b)


@dataclasses.dataclass(frozen=True)
class Child:
    """One child of a split, in Python values. Extend fields are None outside EXTEND.

    Comparing with the implementation: ``Child`` and the PyTorch side's ``TboChild`` are
    different classes, so ``==`` between them is always False. Compare their ``as_tuple()``
    instead: both return the same plain-Python tuple for the same split.
    """

    seq_range: tuple
    token_range: tuple
    seq_lens: tuple
    extend_seq_lens: Optional[tuple]
    extend_prefix_lens: Optional[tuple]
    extend_start_loc: Optional[tuple]
    extend_num_tokens: Optional[int]

    def as_tuple(self) -> tuple:
        """The child as a plain-Python tuple, the form it shares with ``TboChild.as_tuple()``:
        ``(seq_range, token_range, seq_lens, extend_seq_lens, extend_prefix_lens,
        extend_start_loc, extend_num_tokens)``, every number a Python int, every range or
        list of lengths a tuple of them, and None where the field is None (outside EXTEND)."""
        def ints(values):
            return None if values is None else tuple(int(v) for v in values)

        return (ints(self.seq_range), ints(self.token_range), ints(self.seq_lens),
                ints(self.extend_seq_lens), ints(self.extend_prefix_lens),
                ints(self.extend_start_loc),
                None if self.extend_num_tokens is None else int(self.extend_num_tokens))


def _to_child(arrays: ChildArrays, extend: bool) -> Child:
    arrays = jax.device_get(arrays)  # one transfer, then plain numpy
    start, end = int(arrays.seq_start), int(arrays.seq_end)
    n = end - start

    def first(values):
        return tuple(values[:n].tolist())

    return Child(
        seq_range=(start, end),
        token_range=(int(arrays.token_start), int(arrays.token_end)),
        seq_lens=first(arrays.seq_lens),
        extend_seq_lens=first(arrays.extend_seq_lens) if extend else None,
        extend_prefix_lens=first(arrays.extend_prefix_lens) if extend else None,
        extend_start_loc=first(arrays.extend_start_loc) if extend else None,
        extend_num_tokens=int(arrays.extend_seq_lens.sum()) if extend else None,
    )


def _check_extend_batch(seq_lens, extend_lens, extend_prefix_lens):
    lens = _check_extend_lens(extend_lens)
    if len(seq_lens) != len(lens):
        raise ValueError(f"seq_lens has {len(seq_lens)} entries, extend_lens {len(lens)}")
    if extend_prefix_lens is None:
        for i, (s, e) in enumerate(zip(seq_lens, lens)):
            if s < e:
                raise ValueError(f"seq_lens[{i}]={s} is shorter than extend_lens[{i}]={e}")
        return lens, [s - e for s, e in zip(seq_lens, lens)]
    prefix = _check_lens("extend_prefix_lens", extend_prefix_lens, minimum=0)
    if len(prefix) != len(lens):
        raise ValueError(f"extend_prefix_lens has {len(prefix)} entries, "
                         f"extend_lens {len(lens)}")
    for i, (s, p, e) in enumerate(zip(seq_lens, prefix, lens)):
        if s != p + e:
            raise ValueError(f"seq_lens[{i}]={s} must equal extend_prefix_lens[{i}]={p} + "
                             f"extend_lens[{i}]={e}")
    return lens, prefix


def derive_children(forward_mode, seq_lens, extend_lens=None, extend_prefix_lens=None,
                    token_num_per_seq=None, threshold=DEFAULT_THRESHOLD,
                    extend_split=DEFAULT_EXTEND_SPLIT) -> tuple:
    """The two children (A, B) of a batch, per the rules of docs/spec.md, "Children" (EXTEND
    under the rule ``extend_split``)."""
    mode = _check_mode(forward_mode)
    threshold = _check_threshold(threshold)
    extend_split = _check_extend_split(extend_split)
    seq_lens = _check_lens("seq_lens", seq_lens, minimum=1)
    if mode is ForwardMode.EXTEND:
        if token_num_per_seq is not None:
            raise ValueError("token_num_per_seq must be None in EXTEND")
        lens, prefix = _check_extend_batch(seq_lens, extend_lens, extend_prefix_lens)
        size = _bucket(len(lens))
        with jax.enable_x64(True):
            a, b = _derive_extend_jit(_padded(seq_lens, size), _padded(lens, size),
                                      _padded(prefix, size), len(lens), threshold,
                                      extend_split=extend_split)
            return _to_child(a, True), _to_child(b, True)
    if extend_prefix_lens is not None:
        raise ValueError(f"extend_prefix_lens must be None in {mode.name}")
    if mode is ForwardMode.IDLE:
        _check_idle(extend_lens, token_num_per_seq)
        if seq_lens:
            raise ValueError(f"seq_lens must be empty in IDLE, got {len(seq_lens)} entries")
        tnps = 0
    else:
        tnps = _check_uniform(mode, extend_lens, token_num_per_seq)
    _check_fits("len(seq_lens) * token_num_per_seq", len(seq_lens) * tnps)
    with jax.enable_x64(True):
        a, b = _derive_uniform_jit(_padded(seq_lens), len(seq_lens), tnps)
        return _to_child(a, False), _to_child(b, False)


def _check_per_rank(per_rank) -> list:
    if isinstance(per_rank, (str, bytes, bytearray, Mapping)):
        ranks = None
    else:
        try:
            ranks = list(per_rank)
        except TypeError:
            ranks = None
    if ranks is None:
        raise ValueError(f"per_rank must be a sequence of (can_run_tbo, mode) pairs, "
                         f"got {_describe(per_rank)}")
    if not ranks:
        raise ValueError("per_rank must hold at least one rank")
    return [_check_rank(index, rank) for index, rank in enumerate(ranks)]


def _check_rank(index: int, rank) -> tuple:
    what = f"per_rank[{index}]"
    pair = None
    if not isinstance(rank, (str, bytes, bytearray, Mapping, Set)):
        try:
            pair = tuple(rank)
        except TypeError:
            pass
    if pair is None or len(pair) != 2:
        raise ValueError(f"{what} must be a (can_run_tbo, mode) pair, got {_describe(rank)}")
    can_run, mode = pair
    if not isinstance(can_run, bool):
        raise ValueError(f"{what}: can_run_tbo must be a bool, got {_describe(can_run)}")
    if mode is not None:
        mode = _as_forward_mode(f"{what}: mode", mode, "a ForwardMode or None")
        if can_run and mode not in TBO_MODES:
            raise ValueError(f"{what}: a rank that can run TBO reports {mode.name}")
    return can_run, mode


def compute_dp_tbo_decision(per_rank: Sequence, dp_rule=DEFAULT_DP_RULE) -> tuple:
    """(run_tbo, global_mode) for data-parallel ranks reporting (can_run_tbo, mode or None),
    under the rule ``dp_rule``.

    An idle rank reports mode None (ForwardMode.IDLE is taken as idle too). A rank that says it
    can run TBO must report a mode TBO supports.
    """
    ranks = _check_per_rank(per_rank)
    dp_rule = _check_dp_rule(dp_rule)
    codes, can_run = [], []
    for can, mode in ranks:
        idle = mode is None or mode is ForwardMode.IDLE
        codes.append(-1 if idle else _mode_code(mode))
        can_run.append(can)
    run, code = _dp_decision_jit(jnp.asarray(can_run), jnp.asarray(codes), dp_rule=dp_rule)
    return bool(run), (list(ForwardMode)[int(code)] if bool(run) else None)
