"""What a forward pass carries, and how each field splits between two micro-batches.

Every field of ``ForwardBatch`` (and of ``VerifyInput``, its speculative-verify part) declares
its split kind right where it is defined:

- ``token_axis()``: a tensor whose axis 0 runs over tokens; a child takes its token range.
- ``seq_axis()``: a tensor whose axis 0 runs over sequences; a child takes its sequence range.
- ``shared()``: read but not split (mode, pools); a child holds the same object.
- ``derived(rule)``: recomputed for the child by ``rule(plan)``, e.g. the two-chunk lengths.
- ``nested()``: a dataclass that declares its own fields the same way (``spec_info``).

``batch_splitter.split_fields`` is the one generic splitter that reads these declarations; a
field without one is an error naming the field, never silently copied.

Shape letters (docs/spec.md, "Shape letters"): ``T`` tokens, ``B`` sequences (``batch_size``),
``d`` draft tokens per sequence, ``F`` = sum over sequences of (seq_len + d) * d, the flattened
tree-mask length.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, Optional

import torch

from tbo_parity.torch_impl.forward_mode import ForwardMode


class Split(enum.Enum):
    TOKEN = "token"
    SEQ = "seq"
    SHARED = "shared"
    DERIVED = "derived"
    NESTED = "nested"


def token_axis(default=None):
    return dataclasses.field(default=default, metadata={"split": Split.TOKEN})


def seq_axis(default=None):
    return dataclasses.field(default=default, metadata={"split": Split.SEQ})


def shared(default=None):
    return dataclasses.field(default=default, metadata={"split": Split.SHARED})


def nested(default=None):
    return dataclasses.field(default=default, metadata={"split": Split.NESTED})


def derived(rule: Callable[["ChildPlan"], Any], default=None):
    return dataclasses.field(default=default, metadata={"split": Split.DERIVED, "rule": rule})


@dataclasses.dataclass(frozen=True)
class ChildPlan:
    """Everything a derivation rule may read: the parent batch and one child's numbers.

    ``child`` is a ``two_batch_overlap.TboChild``; ``num_token_non_padded`` is the child's
    count of real tokens from ``compute_children_num_token_non_padded``.
    """

    parent: "ForwardBatch"
    child: Any
    num_token_non_padded: int


# --- derivation rules (each reads only the plan) ---------------------------------------------


def _on_device_of(reference: Optional[torch.Tensor], values, device=None) -> torch.Tensor:
    if reference is None:
        return torch.tensor(values, dtype=torch.int64, device=device)
    return torch.tensor(values, dtype=reference.dtype, device=reference.device)


def _child_batch_size(plan):
    return plan.child.batch_size


def _child_seq_lens(plan):
    """Outside EXTEND a child's lengths are the parent's own, so the child gets a view of the
    parent's tensor (a CUDA graph's children then read the graph's static buffer). EXTEND
    re-derives them (two-chunk changes the straddling sequence's length)."""
    if plan.child.extend_seq_lens is None and plan.parent.seq_lens is not None:
        first, last = plan.child.seq_range
        return plan.parent.seq_lens[first:last]
    return _on_device_of(plan.parent.seq_lens, plan.child.seq_lens)


def _child_seq_lens_cpu(plan):
    return _on_device_of(plan.parent.seq_lens_cpu, plan.child.seq_lens, "cpu")


def _extend_rule(attribute: str, parent_field: str):
    """Child tensor of an extend field (None outside EXTEND), on the parent field's device."""

    def rule(plan):
        values = getattr(plan.child, attribute)
        if values is None:
            return None
        return _on_device_of(getattr(plan.parent, parent_field), values)

    return rule


def _child_extend_num_tokens(plan):
    return plan.child.extend_num_tokens


def _child_num_token_non_padded(plan):
    return plan.num_token_non_padded


def _not_split_again(plan):
    return None


def _child_parent_token_range(plan):
    return plan.child.token_range


def _child_custom_mask(plan):
    """The tree-mask blocks of the child's sequences (docs/spec.md, speculative verify).

    Sequence i's block is d x (seq_lens[i] + d), flattened; blocks are laid end to end, so the
    child's blocks are one contiguous range found from the host lengths. When the parent
    carries ``custom_mask_offsets`` (a CUDA graph's static batch, whose lengths change at every
    replay) the child keeps the parent's whole mask and finds its blocks through its own slice
    of the offsets instead: nothing is computed from host lengths that a replay would change.
    """
    spec = plan.parent.spec_info
    if spec.custom_mask is None:
        return None
    if spec.custom_mask_offsets is not None:
        return spec.custom_mask
    d = spec.draft_token_num
    block_sizes = [(n + d) * d for n in plan.parent.seq_lens_cpu.tolist()]
    first, last = plan.child.seq_range
    start = sum(block_sizes[:first])
    return spec.custom_mask[start:start + sum(block_sizes[first:last])]


# --- the batch -------------------------------------------------------------------------------


@dataclasses.dataclass
class VerifyInput:
    """Speculative decoding, verify step: the drafted tokens each sequence checks."""

    draft_token_num: int = shared()
    draft_tokens: Optional[torch.Tensor] = token_axis()  # [T]
    positions: Optional[torch.Tensor] = token_axis()  # [T]
    custom_mask: Optional[torch.Tensor] = derived(_child_custom_mask)  # [F] bool
    # [B] where each sequence's block starts in custom_mask; None: end to end from 0.
    custom_mask_offsets: Optional[torch.Tensor] = seq_axis()
    retrieve_index: Optional[torch.Tensor] = seq_axis()  # [B, d]


@dataclasses.dataclass
class ForwardBatch:
    """One forward pass's inputs. Two-batch overlap splits it into two of the same type."""

    forward_mode: ForwardMode = shared()
    batch_size: int = derived(_child_batch_size, default=0)
    input_ids: Optional[torch.Tensor] = token_axis()  # [T]
    positions: Optional[torch.Tensor] = token_axis()  # [T]
    out_cache_loc: Optional[torch.Tensor] = token_axis()  # [T] KV-pool slot of each new token
    req_pool_indices: Optional[torch.Tensor] = seq_axis()  # [B] row in req_to_token
    seq_lens: Optional[torch.Tensor] = derived(_child_seq_lens)  # [B]
    seq_lens_cpu: Optional[torch.Tensor] = derived(_child_seq_lens_cpu)  # [B]
    extend_seq_lens: Optional[torch.Tensor] = derived(
        _extend_rule("extend_seq_lens", "extend_seq_lens"))  # [B]
    extend_seq_lens_cpu: Optional[torch.Tensor] = derived(
        _extend_rule("extend_seq_lens", "extend_seq_lens_cpu"))  # [B]
    extend_prefix_lens: Optional[torch.Tensor] = derived(
        _extend_rule("extend_prefix_lens", "extend_prefix_lens"))  # [B]
    extend_prefix_lens_cpu: Optional[torch.Tensor] = derived(
        _extend_rule("extend_prefix_lens", "extend_prefix_lens_cpu"))  # [B]
    extend_start_loc: Optional[torch.Tensor] = derived(
        _extend_rule("extend_start_loc", "extend_start_loc"))  # [B], child-relative
    extend_num_tokens: Optional[int] = derived(_child_extend_num_tokens)
    spec_info: Optional[VerifyInput] = nested()
    # Real (non-padding) tokens: an int eagerly, a 0-dim device tensor in a CUDA graph.
    num_token_non_padded: Any = derived(_child_num_token_non_padded)
    # Pools read (and written) by the pass, shared by both children.
    req_to_token: Optional[torch.Tensor] = shared()  # [R, W]
    kv_pool: Any = shared()
    # Two-batch overlap bookkeeping: set on the parent, reset on the children.
    tbo_split_seq_index: Optional[int] = derived(_not_split_again)
    tbo_parent_token_range: Optional[tuple] = derived(_child_parent_token_range)
    tbo_children: Optional[tuple] = derived(_not_split_again)

    @property
    def num_tokens(self) -> int:
        return 0 if self.input_ids is None else int(self.input_ids.shape[0])

    @property
    def num_real_tokens(self):
        """Tokens that are not CUDA-graph padding (an int, or a 0-dim tensor in a graph)."""
        if self.num_token_non_padded is None:
            return self.num_tokens
        return self.num_token_non_padded
