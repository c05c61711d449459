"""Which CUDA graphs a runner holds: the ``CaptureSet`` it was configured with (DECODE, the
TARGET_VERIFY draft counts, the batch sizes, the context width) and one ``GraphKey`` per
captured graph.
"""

from __future__ import annotations

import dataclasses

from tbo_parity.torch_impl import split_rules as rules
from tbo_parity.torch_impl.forward_mode import ForwardMode
from tbo_parity.torch_impl.replay_plan import ReplayPlan


@dataclasses.dataclass(frozen=True)
class GraphKey:
    """One captured graph: DECODE or TARGET_VERIFY, tokens per sequence, sequences."""

    mode: ForwardMode
    token_num_per_seq: int
    batch_size: int

    @property
    def num_tokens(self) -> int:
        return self.batch_size * self.token_num_per_seq

    @classmethod
    def for_plan(cls, forward_mode: ForwardMode, plan: ReplayPlan) -> GraphKey:
        """The graph a replay plan runs (IDLE replays the DECODE graphs)."""
        mode = ForwardMode.DECODE if forward_mode is ForwardMode.IDLE else forward_mode
        return cls(mode, plan.token_num_per_seq, plan.graph_bs)


@dataclasses.dataclass(frozen=True)
class CaptureSet:
    """What a runner captures: DECODE graphs or not, a TARGET_VERIFY graph family per draft
    count, each at every batch size (ascending), for sequences reading up to
    ``max_context_len`` KV columns."""

    decode: bool
    draft_token_nums: tuple
    batch_sizes: tuple
    max_context_len: int

    @property
    def max_bs(self) -> int:
        return self.batch_sizes[-1]

    @property
    def max_draft(self) -> int:
        return max(self.draft_token_nums, default=0)

    def has_verify(self, draft_token_num) -> bool:
        """Whether TARGET_VERIFY graphs were captured for ``draft_token_num`` (an integral
        scalar; anything else, a bool included, names no graph)."""
        return rules.integer_or_none(draft_token_num) in self.draft_token_nums

    def keys(self) -> list:
        """Every graph, DECODE's first, then each draft count's; largest batch first."""
        families = [(ForwardMode.DECODE, 1)] if self.decode else []
        families += [(ForwardMode.TARGET_VERIFY, d) for d in self.draft_token_nums]
        return [GraphKey(mode, tnps, bs) for mode, tnps in families
                for bs in reversed(self.batch_sizes)]
