"""CUDA-graph replay with two-batch overlap: which batch sizes to capture, and where a real
batch sits in the graph it replays.

Why graphs, and why padding. A decode step of a large model is hundreds of small kernel
launches; capturing them once in a CUDA graph and replaying the graph removes the launch cost.
A graph is frozen to the shapes it was captured with, so an engine captures one graph per
batch size (``capture_batch_sizes``: 1, 2, 4, 8, 12, 16, 24, 32, ... up to the configured
maximum, which is always captured). At every DECODE or TARGET_VERIFY step a real batch of
``real_bs`` sequences, each bringing ``token_num_per_seq`` tokens (1 in DECODE,
``draft_token_num`` in TARGET_VERIFY), is copied into the static input buffers of the
**smallest captured graph that fits** (``bisect_left``), and the remaining sequence slots, with
their tokens, are padding: rows the graph computes and the engine throws away. The count of
real tokens (``num_token_non_padded``) travels with the batch so that padding rows stay out of
MoE routing.

Where TBO cuts. With two-batch overlap the captured graph holds two micro-batches, A and B, and
the cut was frozen into the graph when it was captured. So at replay the split comes from the
**graph's** size, never from the real batch: ``compute_split_indices_for_cuda_graph_replay``
on the graph's token count, i.e. ``graph_bs // 2`` sequences in A. The real sequences are
packed at the front and the padding at the back, so all padding falls into child B: A holds
``min(split_token, real tokens)`` real tokens and B the rest
(``compute_children_num_token_non_padded``). B may be entirely padding (a real batch of 1 in a
graph of 2) and, with ``real_bs == 0``, so may A.

Which sizes TBO can capture. A graph of ``bs`` sequences is captured with TBO only if ``bs`` is
even (and so >= 2): each micro-batch needs a sequence, and the two halves are equal. Defaults
under TBO keep only such sizes; a user's list with any other size is refused with the reason
(``tbo_capture_refusal``), never filtered silently.

IDLE (a data-parallel rank with nothing to do) replays as DECODE with one token per sequence
and ``real_bs == 0``: it runs the smallest graph, entirely padding, so that it takes part in the
same collective communication as its busy peers.

``plan_replay`` is called on every replay, so it is plain integer arithmetic on the host. The
JAX spec of the same rules is ``reference/replay_plan.py``; ``parity_tests/test_replay_plan.py``
proves the two agree for every ``real_bs``.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Optional, Sequence

from tbo_parity.torch_impl import split_rules as rules
from tbo_parity.torch_impl.forward_mode import ForwardMode
from tbo_parity.torch_impl.two_batch_overlap import (compute_children_num_token_non_padded,
                                                     compute_split_indices_for_cuda_graph_replay)

DEFAULT_CAPTURE_HEAD = (1, 2, 4, 8, 12)
CAPTURE_STEP = 8

REPLAY_MODES = (ForwardMode.DECODE, ForwardMode.TARGET_VERIFY, ForwardMode.IDLE)

__all__ = [
    "DEFAULT_CAPTURE_HEAD", "CAPTURE_STEP", "REPLAY_MODES", "default_capture_batch_sizes",
    "tbo_capture_refusal", "capture_batch_sizes", "ReplayPlan", "plan_replay",
]


# Counts are validated as in the split functions (``split_rules``: any integral scalar, at most
# ``MAX_COUNT``), with the same messages as ``reference/replay_plan.py``.


# ---------------------------------------------------------------------------------------------
# Which batch sizes to capture (runs once, at start-up).
# ---------------------------------------------------------------------------------------------


def default_capture_batch_sizes(max_bs: int) -> tuple:
    """1, 2, 4, 8, 12, then 16, 24, 32, ... (steps of 8), all <= max_bs, then max_bs itself."""
    max_bs = rules.check_count("max_bs", max_bs, 1)
    sizes = [bs for bs in DEFAULT_CAPTURE_HEAD if bs <= max_bs]
    bs = (DEFAULT_CAPTURE_HEAD[-1] // CAPTURE_STEP + 1) * CAPTURE_STEP  # 16
    while bs <= max_bs:
        sizes.append(bs)
        bs += CAPTURE_STEP
    if sizes[-1] != max_bs:
        sizes.append(max_bs)
    return tuple(sizes)


def tbo_capture_refusal(bs: int) -> Optional[str]:
    """None if a graph of ``bs`` sequences can be captured with TBO, else the reason why not."""
    bs = rules.check_fits("bs", rules.as_int("bs", bs))
    if bs < 2:
        return (f"each of the two micro-batches needs at least one sequence, and a graph of "
                f"{bs} has fewer than 2")
    if bs % 2:
        return (f"TBO captures only even sizes, so that the two micro-batches of the graph are "
                f"equal halves ({bs} is odd; upstream SGLang keeps only even sizes too)")
    return None


def capture_batch_sizes(*, tbo: bool, max_bs: Optional[int] = None,
                        batch_sizes: Optional[Sequence[int]] = None) -> tuple:
    """The sizes to capture, ascending: the defaults for ``max_bs`` (under TBO, only those TBO
    can capture), or the user's ``batch_sizes`` (sorted, every entry checked, none dropped)."""
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
    for entry in rules.check_sequence("batch_sizes", batch_sizes):
        bs = rules.integer_or_none(entry)
        if bs is None or bs < 1:
            raise ValueError(f"batch_sizes: {rules.describe(entry) if bs is None else bs} is "
                             f"not an int >= 1")
        rules.check_fits("batch_sizes: size", bs)
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
# The plan of one replay (runs on every replay: plain int arithmetic).
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReplayPlan:
    """Where a real batch sits in the graph it replays. Split fields are None without TBO.

    token_num_per_seq is the graph's (1 for IDLE). Ranges are half-open and may be empty:
    padding sequences are [real_bs, graph_bs), padding tokens [num_token_non_padded,
    num_tokens).
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


def _check_capture_sizes(capture_sizes) -> Sequence[int]:
    """A non-empty, strictly ascending sequence of ints >= 1, the largest <= MAX_COUNT (a list
    or tuple of Python ints is returned as given, nothing is copied: this runs on every
    replay; numpy integers, an integer array or an iterator come back as Python ints)."""
    sizes = capture_sizes
    if not isinstance(sizes, (list, tuple)):
        try:
            sizes = rules.check_sequence("capture_sizes", sizes)
        except ValueError:
            sizes = ()
    converted, previous = None, 0
    for index, bs in enumerate(sizes):
        if type(bs) is not int:
            bs = rules.integer_or_none(bs)
            if bs is None:
                break
            if converted is None:
                converted = list(sizes[:index])
        if bs <= previous:
            break
        if converted is not None:
            converted.append(bs)
        previous = bs
    else:
        if sizes:
            rules.check_fits("capture_sizes: size", previous)
            return sizes if converted is None else tuple(converted)
    raise ValueError(f"capture_sizes must be a non-empty, strictly ascending sequence of ints "
                     f">= 1, got {rules.describe(capture_sizes)}")


def plan_replay(forward_mode, real_bs, capture_sizes, *, tbo: bool,
                draft_token_num=None) -> ReplayPlan:
    """The plan for replaying ``real_bs`` sequences in the smallest captured graph that fits.

    forward_mode: DECODE, TARGET_VERIFY (draft_token_num required) or IDLE (real_bs must be 0;
    replayed as DECODE). ``real_bs == 0`` in DECODE/TARGET_VERIFY is a fully padded replay of
    the smallest graph. With TBO the picked graph must be one TBO can capture.
    """
    mode = rules.as_forward_mode("forward_mode", forward_mode)
    if mode not in REPLAY_MODES:
        raise ValueError(f"forward_mode {mode.name} is not replayed from a CUDA graph "
                         f"(only DECODE, TARGET_VERIFY and IDLE are)")
    if not isinstance(tbo, bool):
        raise ValueError(f"tbo must be a bool, got {tbo!r}")
    sizes = _check_capture_sizes(capture_sizes)
    if mode is ForwardMode.TARGET_VERIFY:
        if draft_token_num is None:
            raise ValueError("draft_token_num is required in TARGET_VERIFY")
        tnps = rules.check_count("draft_token_num", draft_token_num, 1)
    elif draft_token_num is not None:
        raise ValueError(f"draft_token_num must be None in {mode.name}, got {draft_token_num!r}")
    else:
        tnps = 1
    real_bs = rules.check_count("real_bs", real_bs)
    if mode is ForwardMode.IDLE and real_bs != 0:
        raise ValueError(f"real_bs must be 0 in IDLE, got {real_bs}")
    if real_bs > sizes[-1]:
        raise ValueError(f"real_bs={real_bs} exceeds the largest captured batch size {sizes[-1]}")

    graph_bs = sizes[bisect.bisect_left(sizes, real_bs)]  # the smallest captured size >= real_bs
    num_tokens = graph_bs * tnps
    non_padded = real_bs * tnps
    rules.check_fits("graph_bs * token_num_per_seq", num_tokens)
    if tbo:
        reason = tbo_capture_refusal(graph_bs)
        if reason is not None:
            raise ValueError(f"capture_sizes: the graph of {graph_bs} sequences picked for "
                             f"real_bs={real_bs} cannot run with two-batch overlap: {reason}")
        # The cut comes from the graph (it was frozen at capture), not from the real batch.
        split_seq, split_token = compute_split_indices_for_cuda_graph_replay(
            mode, num_tokens, tnps)
        children = compute_children_num_token_non_padded(split_token, non_padded)
    else:
        split_seq = split_token = children = None
    return ReplayPlan(graph_bs, tnps, num_tokens, real_bs, non_padded, split_seq, split_token,
                      children, (real_bs, graph_bs), (non_padded, num_tokens))
