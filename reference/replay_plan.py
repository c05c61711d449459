"""The spec of CUDA-graph replay with two-batch overlap (TBO): which batch sizes are captured,
and how a real batch is laid out in the graph it replays, in JAX.

An engine captures one CUDA graph per batch size for DECODE and TARGET_VERIFY; every sequence
brings ``token_num_per_seq`` tokens (1 in DECODE, ``draft_token_num`` in TARGET_VERIFY). At
replay a real batch of ``real_bs`` sequences runs in the smallest captured graph that fits;
the graph's extra sequence slots (and their tokens) are padding. With TBO the graph holds two
micro-batches, cut where the **graph's** size says (``split.uniform_split_indices`` of the
graph's token count), so padding, which sits at the end, always falls into child B. IDLE (a
rank with 0 sequences) replays as DECODE with one token per sequence (docs/spec.md).

Two rules live here, each with its invariant written next to it:

- the *capture-size rule* (plain Python, it runs once at start-up): ``default_capture_batch_sizes``,
  ``tbo_capture_refusal``, ``capture_batch_sizes``;
- the *replay plan*: the pure, shape-static ``pick_graph_index`` and ``replay_plan_arrays``
  (``jax.jit``/``jax.vmap``-able; a test vmaps them over every ``real_bs`` at once), and the
  named wrapper ``plan_replay``, which validates Python inputs (``ValueError`` naming the
  argument), runs the pure functions under ``jax.enable_x64(True)`` as ``split.py``'s wrappers
  do, and returns a ``ReplayPlan`` of Python ints.

``capture_sizes`` is a 1-D int array, one entry per captured graph, strictly ascending, every
entry >= 1 (no shape letter: ``G`` is expert groups, docs/spec.md, "Shape letters").

``real_bs == 0`` in DECODE / TARGET_VERIFY is allowed: it is a fully padded replay of the
smallest graph (every slot is padding; with TBO both children hold 0 real tokens). It is the
same plan as IDLE's, which always has ``real_bs == 0``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from tbo_parity.reference import split
from tbo_parity.reference.split import ForwardMode

DEFAULT_CAPTURE_HEAD = (1, 2, 4, 8, 12)
CAPTURE_STEP = 8

REPLAY_MODES = (ForwardMode.DECODE, ForwardMode.TARGET_VERIFY, ForwardMode.IDLE)

__all__ = [
    "DEFAULT_CAPTURE_HEAD", "CAPTURE_STEP", "REPLAY_MODES", "default_capture_batch_sizes",
    "tbo_capture_refusal", "capture_batch_sizes", "pick_graph_index", "ReplayPlanArrays",
    "replay_plan_arrays", "ReplayPlan", "plan_replay",
]


# Counts are validated as in ``split.py`` (any integral scalar; at most ``split.MAX_COUNT``), with
# the same messages as ``torch_impl/replay_plan.py``.
_check_count = split._check_count


# ---------------------------------------------------------------------------------------------
# The capture-size rule (plain Python: it runs once, when the graphs are captured).
# ---------------------------------------------------------------------------------------------


def default_capture_batch_sizes(max_bs: int) -> tuple:
    """The batch sizes captured by default for a configured maximum of ``max_bs`` sequences.

    1, 2, 4, 8, 12, then 16, 24, 32, ... in steps of ``CAPTURE_STEP``, every entry <= max_bs,
    then max_bs itself if it is not there yet.
    Invariant: strictly ascending, every entry in [1, max_bs], and the last entry == max_bs
    (the configured maximum is always captured, so every real_bs <= max_bs fits a graph).
    """
    max_bs = _check_count("max_bs", max_bs, minimum=1)
    sizes = [bs for bs in DEFAULT_CAPTURE_HEAD if bs <= max_bs]
    first_step = (DEFAULT_CAPTURE_HEAD[-1] // CAPTURE_STEP + 1) * CAPTURE_STEP  # 16
    sizes += range(first_step, max_bs + 1, CAPTURE_STEP)
    if sizes[-1] != max_bs:
        sizes.append(max_bs)
    return tuple(sizes)


def tbo_capture_refusal(bs: int) -> Optional[str]:
    """None if a graph of ``bs`` sequences can be captured with TBO, else the reason.

    Invariant: accepted iff bs >= 2 and bs is even. Each child of the graph needs at least one
    sequence, and the graph's two micro-batches are equal halves (bs // 2 each), which the
    engine's per-child buffers rely on; upstream SGLang keeps only sizes divisible by 2 under
    TBO too (its ``mul_base``).
    """
    bs = split._check_fits("bs", split._as_int("bs", bs))
    if bs < 2:
        return (f"each of the two micro-batches needs at least one sequence, and a graph of "
                f"{bs} has fewer than 2")
    if bs % 2:
        return (f"TBO captures only even sizes, so that the two micro-batches of the graph are "
                f"equal halves ({bs} is odd; upstream SGLang keeps only even sizes too)")
    return None


def capture_batch_sizes(*, tbo: bool, max_bs: Optional[int] = None,
                        batch_sizes: Optional[Sequence[int]] = None) -> tuple:
    """The batch sizes to capture, ascending: the defaults for ``max_bs``, or ``batch_sizes``.

    Exactly one of max_bs / batch_sizes is given.
    - From max_bs: ``default_capture_batch_sizes(max_bs)``; with TBO the default list keeps only
      the sizes TBO can capture (those ``tbo_capture_refusal`` accepts). Note that an odd max_bs
      is then not captured itself: the largest graph is the largest even default below it.
    - From batch_sizes: the user's list, sorted, never filtered silently: an entry that is not
      an int >= 1, a duplicate, or (with TBO) a size TBO refuses is a ValueError naming
      batch_sizes, the size and the reason.
    Invariant: strictly ascending, non-empty, every entry >= 1, and with TBO every entry is
    accepted by ``tbo_capture_refusal``.
    """
    if not isinstance(tbo, bool):
        raise ValueError(f"tbo must be a bool, got {tbo!r}")
    if (max_bs is None) == (batch_sizes is None):
        raise ValueError(f"exactly one of max_bs and batch_sizes must be given, got "
                         f"max_bs={max_bs!r} and batch_sizes={batch_sizes!r}")
    if max_bs is not None:
        sizes = default_capture_batch_sizes(max_bs)
        if tbo:
            sizes = tuple(bs for bs in sizes if tbo_capture_refusal(bs) is None)
        if not sizes:
            raise ValueError(f"max_bs={max_bs} leaves no batch size that two-batch overlap can "
                             f"capture (the smallest is 2)")
        return sizes
    seen = set()
    for entry in split._check_sequence("batch_sizes", batch_sizes):
        bs = split._integer_or_none(entry)
        if bs is None or bs < 1:
            raise ValueError(f"batch_sizes: {split._describe(entry) if bs is None else bs} is "
                             f"not an int >= 1")
        split._check_fits("batch_sizes: size", bs)
        if bs in seen:
            raise ValueError(f"batch_sizes: size {bs} appears more than once")
        seen.add(bs)
        if tbo:
            reason = tbo_capture_refusal(bs)
            if reason is not None:
                raise ValueError(f"batch_sizes: size {bs} cannot be captured with two-batch "
                                 f"overlap: {reason}")
    if not seen:
        raise ValueError("batch_sizes must hold at least one size")
    return tuple(sorted(seen))


# ---------------------------------------------------------------------------------------------
# Pure functions (jit/vmap-able).
# ---------------------------------------------------------------------------------------------


def pick_graph_index(capture_sizes: jax.Array, real_bs) -> jax.Array:
    """Index of the smallest captured size >= real_bs.

    capture_sizes: 1-D int, strictly ascending. Defined for 0 <= real_bs <= capture_sizes[-1];
    a larger real_bs gives len(capture_sizes) (no graph fits; the wrapper rejects it up front).
    Invariant: capture_sizes[i] >= real_bs and (i == 0 or capture_sizes[i - 1] < real_bs).
    """
    return jnp.searchsorted(capture_sizes, real_bs, side="left")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ReplayPlanArrays:
    """How a real batch lies in the graph it replays; every field a scalar (or 1-D under vmap).

    graph_bs: sequences of the graph; num_tokens = graph_bs * token_num_per_seq its tokens.
    num_token_non_padded = real_bs * token_num_per_seq: the real tokens, at the front.
    split_seq_index, split_token_index: the TBO cut, from the graph's token count.
    child_a_non_padded, child_b_non_padded: each child's real tokens.
    padding_seq_start/end = (real_bs, graph_bs), padding_token_start/end =
    (num_token_non_padded, num_tokens): the padding rows, at the back.
    The split fields are computed whether or not TBO runs; without TBO they are unused.
    """

    graph_bs: jax.Array
    num_tokens: jax.Array
    num_token_non_padded: jax.Array
    split_seq_index: jax.Array
    split_token_index: jax.Array
    child_a_non_padded: jax.Array
    child_b_non_padded: jax.Array
    padding_seq_start: jax.Array
    padding_seq_end: jax.Array
    padding_token_start: jax.Array
    padding_token_end: jax.Array


def replay_plan_arrays(capture_sizes: jax.Array, real_bs, token_num_per_seq) -> ReplayPlanArrays:
    """The replay plan of ``real_bs`` sequences of ``token_num_per_seq`` tokens each.

    capture_sizes: 1-D int, strictly ascending; 0 <= real_bs <= capture_sizes[-1];
    token_num_per_seq >= 1 (IDLE passes 1: it replays as DECODE).
    Invariants:
    - graph_bs = capture_sizes[pick_graph_index(...)], the smallest captured size >= real_bs;
    - the split depends on graph_bs only (never on real_bs): the DECODE/TARGET_VERIFY rule
      applied to the graph's num_tokens, i.e. (graph_bs // 2, graph_bs // 2 * tnps);
    - child_a + child_b == num_token_non_padded; padding lies at the back, so child A holds
      min(split_token, real tokens) and child B the rest: all padding is in child B;
    - padding ranges are [real_bs, graph_bs) and [real tokens, num_tokens), possibly empty.
    """
    capture_sizes = jnp.asarray(capture_sizes)
    real_bs = jnp.asarray(real_bs, capture_sizes.dtype)
    index = jnp.clip(pick_graph_index(capture_sizes, real_bs), 0, capture_sizes.shape[0] - 1)
    graph_bs = capture_sizes[index]
    num_tokens = graph_bs * token_num_per_seq
    non_padded = real_bs * token_num_per_seq
    split_seq, split_token = split.uniform_split_indices(num_tokens, token_num_per_seq)
    child_a, child_b = split.children_num_token_non_padded(split_token, non_padded)
    return ReplayPlanArrays(
        graph_bs=graph_bs, num_tokens=num_tokens, num_token_non_padded=non_padded,
        split_seq_index=split_seq, split_token_index=split_token,
        child_a_non_padded=child_a, child_b_non_padded=child_b,
        padding_seq_start=real_bs, padding_seq_end=graph_bs,
        padding_token_start=non_padded, padding_token_end=num_tokens)


# ---------------------------------------------------------------------------------------------
# The named wrapper: validate Python inputs, call the pure function, return Python ints.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReplayPlan:
    """The replay plan in Python ints. Split fields are None when TBO does not run.

    token_num_per_seq is the graph's (1 for IDLE, which replays as DECODE). Ranges are
    half-open (start, end) and may be empty.
    """

    graph_bs: int
    token_num_per_seq: int
    num_tokens: int
    real_bs: int
    num_token_non_padded: int
    split_seq_index: Optional[int]
    split_token_index: Optional[int]
    children_num_token_non_padded: Optional[tuple]
    padding_seq_range: tuple
    padding_token_range: tuple


_replay_plan_jit = jax.jit(replay_plan_arrays)


def _check_replay_mode(forward_mode) -> ForwardMode:
    mode = split._as_forward_mode("forward_mode", forward_mode)
    if mode not in REPLAY_MODES:
        raise ValueError(f"forward_mode {mode.name} is not replayed from a CUDA graph "
                         f"(only DECODE, TARGET_VERIFY and IDLE are)")
    return mode


def _check_capture_sizes(capture_sizes) -> tuple:
    try:
        entries = split._check_sequence("capture_sizes", capture_sizes)
    except ValueError:
        entries = []
    sizes, previous = [], 0
    for entry in entries:
        bs = split._integer_or_none(entry)
        if bs is None or bs <= previous:
            break
        sizes.append(bs)
        previous = bs
    else:
        if sizes:
            split._check_fits("capture_sizes: size", sizes[-1])
            return tuple(sizes)
    raise ValueError(f"capture_sizes must be a non-empty, strictly ascending sequence of ints "
                     f">= 1, got {split._describe(capture_sizes)}")


def _check_draft(mode: ForwardMode, draft_token_num) -> int:
    """The graph's token_num_per_seq: draft_token_num in TARGET_VERIFY, else 1."""
    if mode is ForwardMode.TARGET_VERIFY:
        if draft_token_num is None:
            raise ValueError("draft_token_num is required in TARGET_VERIFY")
        return _check_count("draft_token_num", draft_token_num, minimum=1)
    if draft_token_num is not None:
        raise ValueError(f"draft_token_num must be None in {mode.name}, got {draft_token_num!r}")
    return 1


def _check_real_bs(mode: ForwardMode, real_bs, largest: int) -> int:
    real_bs = _check_count("real_bs", real_bs)
    if mode is ForwardMode.IDLE and real_bs != 0:
        raise ValueError(f"real_bs must be 0 in IDLE, got {real_bs}")
    if real_bs > largest:
        raise ValueError(f"real_bs={real_bs} exceeds the largest captured batch size {largest}")
    return real_bs


def plan_replay(forward_mode, real_bs, capture_sizes, *, tbo: bool,
                draft_token_num=None) -> ReplayPlan:
    """The plan for replaying a batch of ``real_bs`` sequences from the captured graphs.

    forward_mode: DECODE, TARGET_VERIFY (draft_token_num required) or IDLE (real_bs 0, replayed
    as DECODE). capture_sizes: what was captured, strictly ascending. With TBO the picked
    graph must be one TBO can capture (``tbo_capture_refusal``).
    """
    mode = _check_replay_mode(forward_mode)
    if not isinstance(tbo, bool):
        raise ValueError(f"tbo must be a bool, got {tbo!r}")
    sizes = _check_capture_sizes(capture_sizes)
    tnps = _check_draft(mode, draft_token_num)
    real_bs = _check_real_bs(mode, real_bs, sizes[-1])
    with jax.enable_x64(True):
        arrays = jax.device_get(_replay_plan_jit(
            jnp.asarray(sizes, jnp.int64), jnp.int64(real_bs), jnp.int64(tnps)))
    graph_bs = int(arrays.graph_bs)
    split._check_fits("graph_bs * token_num_per_seq", int(arrays.num_tokens))
    if tbo:
        reason = tbo_capture_refusal(graph_bs)
        if reason is not None:
            raise ValueError(f"capture_sizes: the graph of {graph_bs} sequences picked for "
                             f"real_bs={real_bs} cannot run with two-batch overlap: {reason}")
    return ReplayPlan(
        graph_bs=graph_bs, token_num_per_seq=tnps, num_tokens=int(arrays.num_tokens),
        real_bs=real_bs, num_token_non_padded=int(arrays.num_token_non_padded),
        split_seq_index=int(arrays.split_seq_index) if tbo else None,
        split_token_index=int(arrays.split_token_index) if tbo else None,
        children_num_token_non_padded=(
            (int(arrays.child_a_non_padded), int(arrays.child_b_non_padded)) if tbo else None),
        padding_seq_range=(int(arrays.padding_seq_start), int(arrays.padding_seq_end)),
        padding_token_range=(int(arrays.padding_token_start), int(arrays.padding_token_end)))
