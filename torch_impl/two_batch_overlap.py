"""Two-batch overlap: where a batch is cut, what its two children hold, and when TBO runs.

The PyTorch twin of ``reference/split.py``: the same six functions with the same signatures,
computed the way an engine does on the host (plain Python integers over the batch's CPU
copies). ``TboForwardBatchPreparer`` (in ``batch_splitter.py``) turns these numbers into two
child ``ForwardBatch``es.

A child of a split is a ``TboChild``; the spec's is a ``Child`` with the same fields. The two
classes never compare equal (``==`` is False across them): compare ``as_tuple()``, the
plain-Python tuple that both return, equal exactly when the splits are.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from tbo_parity.torch_impl import split_rules as rules
from tbo_parity.torch_impl.forward_batch import ForwardBatch
from tbo_parity.torch_impl.forward_mode import (TBO_MODES,  # noqa: F401 (TBO_MODES re-exported)
                                                ForwardMode)
from tbo_parity.torch_impl.split_rules import (DEFAULT_DP_RULE, DEFAULT_EXTEND_SPLIT, DP_RULES,
                                               EXTEND_SPLITS, MAX_COUNT)

DEFAULT_THRESHOLD = 0.48

__all__ = [
    "DEFAULT_THRESHOLD", "DEFAULT_EXTEND_SPLIT", "EXTEND_SPLITS", "DEFAULT_DP_RULE", "DP_RULES",
    "MAX_COUNT", "ForwardMode",
    "TboChild", "token_num_per_seq",
    "compute_split_seq_index", "compute_split_token_index",
    "compute_split_indices_for_cuda_graph_replay", "compute_children_num_token_non_padded",
    "derive_children", "compute_dp_tbo_decision", "TboCudaGraphRunnerPlugin",
]


# The split rules below are out of the mutation run's scope (docs/testing.md): exhaustive
# verification and property tests hold them. The plugin at the end of the file is in it.
# pragma: no mutate start
# ---------------------------------------------------------------------------------------------
# Split math on Python ints (inputs already validated).
# ---------------------------------------------------------------------------------------------


def _balanced_split(lens: list) -> int:
    """The last i whose |left - right| is <= the best so far; stop at the first larger one."""
    total, left = sum(lens), 0
    best_index, best_diff = 0, None
    for i in range(1, len(lens)):
        left += lens[i - 1]
        diff = abs(left - (total - left))
        if best_diff is not None and diff > best_diff:
            break
        best_index, best_diff = i, diff
    return best_index


def _two_chunk(lens: list, threshold: float, extend_split: str = DEFAULT_EXTEND_SPLIT) -> bool:
    """Whether the straddling sequence is cut in two under the rule ``extend_split``."""
    if extend_split == "balanced":
        return False
    total = sum(lens)
    left = sum(lens[:_balanced_split(lens)])
    lopsided = left < total * threshold or left > total * (1 - threshold)
    if lopsided and extend_split == "guarded_two_chunk":
        # Refused when child A (sequences [0, straddling + 1)) would hold more sequences than
        # its total // 2 tokens.
        return _straddling_seq(lens) + 1 <= total // 2
    return lopsided


def _straddling_seq(lens: list) -> int:
    """The first sequence at which the running sum exceeds total // 2."""
    half, running = sum(lens) // 2, 0
    for i, n in enumerate(lens):  # lens is non-empty and total > total // 2: the loop breaks
        running += n
        if running > half:
            break
    return i


def _extend_split(lens: list, threshold: float, extend_split: str = DEFAULT_EXTEND_SPLIT) -> tuple:
    """(split_seq_index, split_token_index, two_chunk) of an EXTEND batch."""
    if _two_chunk(lens, threshold, extend_split):
        return _straddling_seq(lens), sum(lens) // 2, True
    split_seq = _balanced_split(lens)
    return split_seq, sum(lens[:split_seq]), False


# ---------------------------------------------------------------------------------------------
# The named functions.
# ---------------------------------------------------------------------------------------------


def token_num_per_seq(forward_mode, draft_token_num=None) -> Optional[int]:
    """1 in DECODE, draft_token_num in TARGET_VERIFY, 0 in IDLE, None in EXTEND."""
    mode = rules.check_mode(forward_mode)
    if draft_token_num is not None:
        draft_token_num = rules.check_count("draft_token_num", draft_token_num, 1)
    if mode is ForwardMode.TARGET_VERIFY:
        if draft_token_num is None:
            raise ValueError("draft_token_num is required in TARGET_VERIFY")
        return draft_token_num
    if mode is ForwardMode.DECODE:
        if draft_token_num not in (None, 1):
            raise ValueError(f"draft_token_num must be one of (None, 1) in DECODE, where "
                             f"token_num_per_seq is 1, got {draft_token_num}")
        return 1
    return 0 if mode is ForwardMode.IDLE else None


def compute_split_seq_index(forward_mode, num_tokens, extend_lens, token_num_per_seq,
                            threshold=DEFAULT_THRESHOLD,
                            extend_split=DEFAULT_EXTEND_SPLIT) -> int:
    """Where child B's sequences start (EXTEND under the rule ``extend_split``)."""
    mode = rules.check_mode(forward_mode)
    threshold = rules.check_threshold(threshold)
    extend_split = rules.check_extend_split(extend_split)
    num_tokens = rules.check_count("num_tokens", num_tokens)
    if mode.is_extend():
        lens = rules.check_extend_lens(extend_lens)
        rules.check_no_token_num_per_seq(token_num_per_seq)
        if num_tokens != sum(lens):
            raise ValueError(f"num_tokens={num_tokens} != sum(extend_lens)={sum(lens)}")
        return _extend_split(lens, threshold, extend_split)[0]
    if mode.is_idle():
        rules.check_idle(extend_lens, token_num_per_seq)
        if num_tokens != 0:
            raise ValueError(f"num_tokens must be 0 in IDLE, got {num_tokens}")
        return 0
    tnps = rules.check_uniform(mode, extend_lens, token_num_per_seq)
    rules.check_divisible("num_tokens", num_tokens, tnps)
    return (num_tokens // tnps) // 2


def compute_split_token_index(split_seq_index, forward_mode, extend_lens, token_num_per_seq,
                              threshold=DEFAULT_THRESHOLD,
                              extend_split=DEFAULT_EXTEND_SPLIT) -> int:
    """Where child B's tokens start (EXTEND under the rule ``extend_split``)."""
    mode = rules.check_mode(forward_mode)
    threshold = rules.check_threshold(threshold)
    extend_split = rules.check_extend_split(extend_split)
    split_seq_index = rules.check_count("split_seq_index", split_seq_index)
    if mode.is_extend():
        lens = rules.check_extend_lens(extend_lens)
        rules.check_no_token_num_per_seq(token_num_per_seq)
        if split_seq_index > len(lens):
            raise ValueError(f"split_seq_index={split_seq_index} > number of sequences "
                             f"{len(lens)}")
        if _two_chunk(lens, threshold, extend_split):
            return sum(lens) // 2
        return sum(lens[:split_seq_index])
    if mode.is_idle():
        rules.check_idle(extend_lens, token_num_per_seq)
        if split_seq_index != 0:
            raise ValueError(f"split_seq_index must be 0 in IDLE, got {split_seq_index}")
        return 0
    tnps = rules.check_uniform(mode, extend_lens, token_num_per_seq)
    return rules.check_fits("split_seq_index * token_num_per_seq", split_seq_index * tnps)


def compute_split_indices_for_cuda_graph_replay(forward_mode, cuda_graph_num_tokens,
                                                token_num_per_seq) -> tuple:
    """(split_seq, split_token) from the captured graph's token count, not the real batch's.

    (choice) IDLE replays as DECODE with one token per sequence.
    """
    mode = rules.check_mode(forward_mode)
    cuda_graph_num_tokens = rules.check_count("cuda_graph_num_tokens", cuda_graph_num_tokens)
    if mode.is_extend():
        raise ValueError("forward_mode EXTEND is not replayed from a CUDA graph")
    if mode.is_idle():
        rules.check_idle(None, token_num_per_seq, allowed=(None, 0, 1))
        tnps = 1
    else:
        tnps = rules.check_token_num_per_seq(mode, token_num_per_seq)
    rules.check_divisible("cuda_graph_num_tokens", cuda_graph_num_tokens, tnps)
    split_seq = (cuda_graph_num_tokens // tnps) // 2
    return split_seq, split_seq * tnps


def compute_children_num_token_non_padded(split_token_index, num_token_non_padded) -> tuple:
    """(child A's, child B's) count of real tokens; padding rows sit at the end of the parent."""
    split_token_index = rules.check_count("split_token_index", split_token_index)
    num_token_non_padded = rules.check_count("num_token_non_padded", num_token_non_padded)
    return (min(split_token_index, num_token_non_padded),
            max(0, num_token_non_padded - split_token_index))


@dataclasses.dataclass(frozen=True)
class TboChild:
    """One child of a split. Ranges index the parent; extend fields are None outside EXTEND,
    and ``extend_start_loc`` is child-relative (choice).

    Comparing with the spec: ``TboChild`` and the JAX spec's ``Child`` are different classes,
    so ``==`` between them is always False. Compare their ``as_tuple()`` instead: both return
    the same plain-Python tuple for the same split.
    """

    seq_range: tuple
    token_range: tuple
    seq_lens: tuple
    extend_seq_lens: Optional[tuple]
    extend_prefix_lens: Optional[tuple]
    extend_start_loc: Optional[tuple]
    extend_num_tokens: Optional[int]

    @property
    def num_tokens(self) -> int:
        return self.token_range[1] - self.token_range[0]

    @property
    def batch_size(self) -> int:
        return self.seq_range[1] - self.seq_range[0]

    def as_tuple(self) -> tuple:
        """The child as a plain-Python tuple, the form it shares with the spec's
        ``Child.as_tuple()``: ``(seq_range, token_range, seq_lens, extend_seq_lens,
        extend_prefix_lens, extend_start_loc, extend_num_tokens)``, every number a Python int,
        every range or list of lengths a tuple of them, and None where the field is None
        (outside EXTEND)."""
        def ints(values):
            return None if values is None else tuple(int(v) for v in values)

        return (ints(self.seq_range), ints(self.token_range), ints(self.seq_lens),
                ints(self.extend_seq_lens), ints(self.extend_prefix_lens),
                ints(self.extend_start_loc),
                None if self.extend_num_tokens is None else int(self.extend_num_tokens))


def _start_locs(lens: list) -> tuple:
    locs, running = [], 0
    for n in lens:
        locs.append(running)
        running += n
    return tuple(locs)


def _extend_child(seq_range, token_range, seq_lens, extend_lens, prefix_lens) -> TboChild:
    return TboChild(seq_range, token_range, tuple(seq_lens), tuple(extend_lens),
                    tuple(prefix_lens), _start_locs(extend_lens), sum(extend_lens))


def _extend_children(seq_lens, lens, prefix, threshold,
                     extend_split: str = DEFAULT_EXTEND_SPLIT) -> tuple:
    split_seq, split_token, two_chunk = _extend_split(lens, threshold, extend_split)
    bs, total = len(lens), sum(lens)
    if not two_chunk:
        a = _extend_child((0, split_seq), (0, split_token), seq_lens[:split_seq],
                          lens[:split_seq], prefix[:split_seq])
        b = _extend_child((split_seq, bs), (split_token, total), seq_lens[split_seq:],
                          lens[split_seq:], prefix[split_seq:])
        return a, b
    # Two-chunk: the straddling sequence s is cut; A keeps its first left_last new tokens,
    # B the rest, on top of a prefix that now includes what A writes in this same pass.
    s = split_seq
    left_last = split_token - sum(lens[:s])
    a_lens = lens[:s] + [left_last]
    a_prefix = prefix[:s + 1]
    a = _extend_child((0, s + 1), (0, split_token),
                      [p + n for p, n in zip(a_prefix, a_lens)], a_lens, a_prefix)
    b_lens = [lens[s] - left_last] + lens[s + 1:]
    b_prefix = [prefix[s] + left_last] + prefix[s + 1:]
    b = _extend_child((s, bs), (split_token, total), seq_lens[s:], b_lens, b_prefix)
    return a, b


def derive_children(forward_mode, seq_lens, extend_lens=None, extend_prefix_lens=None,
                    token_num_per_seq=None, threshold=DEFAULT_THRESHOLD,
                    extend_split=DEFAULT_EXTEND_SPLIT) -> tuple:
    """The two children (A, B) of a batch with these per-sequence lengths (EXTEND under the
    rule ``extend_split``)."""
    mode = rules.check_mode(forward_mode)
    threshold = rules.check_threshold(threshold)
    extend_split = rules.check_extend_split(extend_split)
    seq_lens = rules.check_lens("seq_lens", seq_lens, 1)
    if mode.is_extend():
        rules.check_no_token_num_per_seq(token_num_per_seq)
        lens, prefix = rules.check_extend_batch(seq_lens, extend_lens, extend_prefix_lens)
        return _extend_children(seq_lens, lens, prefix, threshold, extend_split)
    if extend_prefix_lens is not None:
        raise ValueError(f"extend_prefix_lens must be None in {mode.name}")
    if mode.is_idle():
        rules.check_idle(extend_lens, token_num_per_seq)
        if seq_lens:
            raise ValueError(f"seq_lens must be empty in IDLE, got {len(seq_lens)} entries")
        tnps = 0
    else:
        tnps = rules.check_uniform(mode, extend_lens, token_num_per_seq)
    bs = len(seq_lens)
    rules.check_fits("len(seq_lens) * token_num_per_seq", bs * tnps)
    split_seq = bs // 2
    a = TboChild((0, split_seq), (0, split_seq * tnps), tuple(seq_lens[:split_seq]),
                 None, None, None, None)
    b = TboChild((split_seq, bs), (split_seq * tnps, bs * tnps), tuple(seq_lens[split_seq:]),
                 None, None, None, None)
    return a, b


def compute_dp_tbo_decision(per_rank: Sequence, dp_rule=DEFAULT_DP_RULE) -> tuple:
    """(run_tbo, global_mode) from each data-parallel rank's (can_run_tbo, mode or None),
    under the rule ``dp_rule``.

    TBO runs only if every rank can run it, some rank is not idle, and all non-idle ranks
    report the same mode, which becomes the global mode. An idle rank reports None
    (ForwardMode.IDLE is taken as idle too). Under "idle_as_decode" an idle rank is a DECODE
    rank instead (so every rank is busy).
    """
    ranks = rules.check_per_rank(per_rank)
    dp_rule = rules.check_dp_rule(dp_rule)
    modes = [ForwardMode.IDLE if mode is None else mode for _, mode in ranks]
    if dp_rule == "idle_as_decode":
        modes = [ForwardMode.DECODE if mode.is_idle() else mode for mode in modes]
    busy_modes = {mode for mode in modes if not mode.is_idle()}
    if all(can for can, _ in ranks) and len(busy_modes) == 1:
        return True, busy_modes.pop()
    return False, None


# pragma: no mutate end


# ---------------------------------------------------------------------------------------------
# The CUDA-graph runner's TBO plugin.
# ---------------------------------------------------------------------------------------------


class TboCudaGraphRunnerPlugin:
    """What two-batch overlap adds to a CUDA-graph runner (upstream's name and two hooks).

    A graph captured with TBO holds both micro-batches, cut where the *graph's* batch size
    says. The only thing about the split that changes from replay to replay is how many of
    each child's rows are real, so the plugin owns one static device tensor,
    ``children_num_token_non_padded [2]``, and the captured children read their counts as
    views of it (``[0]`` child A, ``[1]`` child B):

    - ``capture_one_batch_size`` splits the runner's static batch and points the children's
      counts at that tensor;
    - ``replay_prepare`` recomputes the split from the graph's size
      (``compute_split_indices_for_cuda_graph_replay``) and writes the children's real counts
      (``compute_children_num_token_non_padded``) into the same tensor. Padding sits at the
      end of the batch, so all of it falls into child B, which may hold no real token at all.

    The preparer (``TboForwardBatchPreparer``) is injected: it builds the children.
    """

    def __init__(self, device, preparer):
        self.device = torch.device(device)
        self.preparer = preparer
        self.children_num_token_non_padded = torch.zeros(2, dtype=torch.int64,
                                                         device=self.device)

    def capture_one_batch_size(self, batch: ForwardBatch, num_tokens: int) -> ForwardBatch:
        """The static ``batch`` (every row treated as real, ``num_tokens`` of them) with
        ``tbo_children`` whose non-padded counts are views of the plugin's tensor."""
        if not batch.forward_mode.is_uniform():
            raise ValueError(f"forward_mode {batch.forward_mode.name} is not captured in a "
                             f"CUDA graph (DECODE and TARGET_VERIFY are)")
        if num_tokens != batch.num_tokens:
            raise ValueError(f"num_tokens={num_tokens}, the batch holds {batch.num_tokens}")
        host_counts = dataclasses.replace(batch, num_token_non_padded=num_tokens)
        prepared = self.preparer.prepare(host_counts)
        counts = [child.num_token_non_padded for child in prepared.tbo_children]
        for index, count in enumerate(counts):  # the capture-time values, as upstream
            self.children_num_token_non_padded[index].fill_(count)
        children = tuple(
            dataclasses.replace(child,
                                num_token_non_padded=self.children_num_token_non_padded[index])
            for index, child in enumerate(prepared.tbo_children))
        return dataclasses.replace(prepared, num_token_non_padded=batch.num_token_non_padded,
                                   tbo_children=children)

    def replay_prepare(self, forward_mode, bs: int, num_token_non_padded: int,
                       spec_info=None) -> tuple:
        """Write the children's real counts for a replay of the graph of ``bs`` sequences
        holding ``num_token_non_padded`` real tokens; returns the (A, B) counts written.
        IDLE replays as DECODE (the spec's choice) and holds no real token. Every argument is
        checked before anything is written: ``bs`` must be a size TBO captures (even, >= 2),
        the real tokens must fit the graph."""
        forward_mode = rules.check_mode(forward_mode)
        if forward_mode not in (ForwardMode.DECODE, ForwardMode.TARGET_VERIFY,
                                ForwardMode.IDLE):
            raise ValueError(f"forward_mode {forward_mode.name} is not replayed from a CUDA "
                             f"graph (DECODE, TARGET_VERIFY and IDLE are)")
        draft = spec_info.draft_token_num if forward_mode is ForwardMode.TARGET_VERIFY \
            and spec_info is not None else None
        tnps = 1 if forward_mode is ForwardMode.IDLE else token_num_per_seq(forward_mode, draft)
        bs = rules.check_count("bs", bs, 2)
        if bs % 2:
            raise ValueError(f"bs must be even: a TBO graph holds two equal halves, got {bs}")
        num_token_non_padded = rules.check_count("num_token_non_padded", num_token_non_padded)
        if num_token_non_padded > bs * tnps:
            raise ValueError(f"num_token_non_padded={num_token_non_padded} > the graph's "
                             f"{bs * tnps} tokens")
        if forward_mode is ForwardMode.IDLE and num_token_non_padded:
            raise ValueError(f"num_token_non_padded must be 0 in IDLE, got "
                             f"{num_token_non_padded}")
        _, split_token = compute_split_indices_for_cuda_graph_replay(forward_mode, bs * tnps,
                                                                     tnps)
        a, b = compute_children_num_token_non_padded(split_token, num_token_non_padded)
        self.children_num_token_non_padded[0].fill_(a)
        self.children_num_token_non_padded[1].fill_(b)
        return a, b
