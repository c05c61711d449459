"""Building the two child ``ForwardBatch``es of a two-batch-overlap step.

``split_fields`` is the one generic splitter: it walks a dataclass's fields and applies the
split kind each field declares (see ``forward_batch.py``). ``TboForwardBatchPreparer`` computes
the split with ``two_batch_overlap`` and hands each child's plan to ``split_fields``.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from tbo_parity.torch_impl import two_batch_overlap as tbo
from tbo_parity.torch_impl.forward_batch import ChildPlan, ForwardBatch, Split


def _slice_axis0(name: str, value, start: int, end: int, expected: int, axis_name: str):
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"field {name!r} is split along the {axis_name} axis but is "
                         f"{type(value).__name__}, not a tensor")
    if value.shape[0] != expected:
        raise ValueError(f"field {name!r} has {value.shape[0]} rows along the {axis_name} axis, "
                         f"expected {expected}")
    return value[start:end]


def split_fields(obj, plan: ChildPlan):
    """A child of ``obj`` (a ForwardBatch or a nested dataclass), field by declared field."""
    parent, child = plan.parent, plan.child
    values = {}
    for field in dataclasses.fields(obj):
        kind = field.metadata.get("split")
        value = getattr(obj, field.name)
        if kind is Split.TOKEN:
            values[field.name] = _slice_axis0(field.name, value, *child.token_range,
                                              parent.num_tokens, "token")
        elif kind is Split.SEQ:
            values[field.name] = _slice_axis0(field.name, value, *child.seq_range,
                                              parent.batch_size, "sequence")
        elif kind is Split.SHARED:
            values[field.name] = value
        elif kind is Split.DERIVED:
            values[field.name] = field.metadata["rule"](plan)
        elif kind is Split.NESTED:
            values[field.name] = None if value is None else split_fields(value, plan)
        else:
            raise ValueError(f"field {field.name!r} of {type(obj).__name__} declares no split "
                             f"kind; declare it with token_axis/seq_axis/shared/derived/nested")
    return type(obj)(**values)


def _lens(tensor):
    return None if tensor is None else tensor.tolist()


def _check_token_count(batch: ForwardBatch, tnps) -> None:
    mode = batch.forward_mode
    if mode.is_extend():
        expected = sum(_lens(batch.extend_seq_lens_cpu) or [])
    else:
        expected = batch.batch_size * tnps
    if batch.num_tokens != expected:
        raise ValueError(f"input_ids has {batch.num_tokens} tokens, the {mode.name} batch's "
                         f"lengths imply {expected}")


# The arguments of ``two_batch_overlap`` that the preparer fills from a ForwardBatch, and the
# field each comes from: a message about the argument is re-raised naming the field the user
# set (``extend_seq_lens_cpu is required``, not ``extend_lens is required``).
_FIELD_OF_ARGUMENT = {
    "seq_lens": "seq_lens_cpu",
    "extend_lens": "extend_seq_lens_cpu",
    "extend_prefix_lens": "extend_prefix_lens_cpu",
    "draft_token_num": "spec_info.draft_token_num",
}
_ARGUMENT_NAME = re.compile(r"(?<![\w.])(" + "|".join(_FIELD_OF_ARGUMENT) + r")(?!\w)")


def _naming_fields(function, *args):
    """``function(*args)``; a ValueError it raises is re-raised with every argument name of
    ``_FIELD_OF_ARGUMENT`` in its message replaced by the field's."""
    try:
        return function(*args)
    except ValueError as error:
        message = _ARGUMENT_NAME.sub(lambda m: _FIELD_OF_ARGUMENT[m.group(1)], str(error))
        raise ValueError(message) from error


@dataclasses.dataclass(frozen=True)
class TboForwardBatchPreparer:
    """Splits a ForwardBatch into two children by the rules of ``two_batch_overlap``."""

    threshold: float = tbo.DEFAULT_THRESHOLD

    def split_children(self, batch: ForwardBatch) -> tuple:
        """The (TboChild A, TboChild B) numbers of this batch, validated. A rejected field is
        named as the batch's field (``extend_seq_lens_cpu``), not as the argument of
        ``two_batch_overlap`` it was passed as (``extend_lens``)."""
        mode = batch.forward_mode
        draft = None if batch.spec_info is None else batch.spec_info.draft_token_num
        tnps = _naming_fields(tbo.token_num_per_seq, mode,
                              draft if mode is tbo.ForwardMode.TARGET_VERIFY else None)
        if batch.seq_lens_cpu is None:
            raise ValueError("seq_lens_cpu is required to split a batch")
        if len(batch.seq_lens_cpu) != batch.batch_size:
            raise ValueError(f"seq_lens_cpu has {len(batch.seq_lens_cpu)} entries, "
                             f"batch_size is {batch.batch_size}")
        children = _naming_fields(
            tbo.derive_children, mode, _lens(batch.seq_lens_cpu),
            _lens(batch.extend_seq_lens_cpu), _lens(batch.extend_prefix_lens_cpu), tnps,
            self.threshold)
        _check_token_count(batch, tnps)
        return children

    def prepare(self, batch: ForwardBatch) -> ForwardBatch:
        """The parent with ``tbo_split_seq_index`` and ``tbo_children`` (A, B) filled in.
        A batch that is split already (``tbo_children`` set) is refused, not split again."""
        if batch.tbo_children is not None:
            raise ValueError("tbo_children is set: the batch is split already; prepare the "
                             "unsplit batch (a split batch is not split again)")
        if isinstance(batch.num_token_non_padded, torch.Tensor):
            raise ValueError("num_token_non_padded is a device tensor (a CUDA-graph batch); "
                             "such a batch is split by TboCudaGraphRunnerPlugin")
        child_a, child_b = self.split_children(batch)
        counts = tbo.compute_children_num_token_non_padded(child_a.token_range[1],
                                                           batch.num_real_tokens)
        children = tuple(
            split_fields(batch, ChildPlan(batch, child, count))
            for child, count in zip((child_a, child_b), counts))
        return dataclasses.replace(batch, tbo_split_seq_index=child_b.seq_range[0],
                                   tbo_children=children)
