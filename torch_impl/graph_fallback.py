"""When a batch is not replayed, and what runs instead: a batch the captured graphs cannot hold
(EXTEND, too many sequences, a draft count not captured, a context longer than captured) runs
the eager forward, and the runner says why (``Refusal``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from tbo_parity.torch_impl.attention import TboAttnBackend
from tbo_parity.torch_impl.batch_splitter import TboForwardBatchPreparer
from tbo_parity.torch_impl.forward_batch import ForwardBatch
from tbo_parity.torch_impl.forward_mode import ForwardMode
from tbo_parity.torch_impl.graph_key import CaptureSet
from tbo_parity.torch_impl.model import ModelOutput, MoEModel


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why a batch is not replayed: ``kind`` is one of ``mode``, ``draft_token_num``,
    ``batch_size``, ``context``; ``message`` says it with the numbers."""

    kind: str
    message: str


def _mode_refusal(batch: ForwardBatch, capture: CaptureSet) -> Optional[Refusal]:
    """None if graphs of the batch's mode (and draft count) were captured, else why not."""
    mode = batch.forward_mode
    if mode is ForwardMode.IDLE:
        if not capture.decode:
            return Refusal("mode", "IDLE replays the DECODE graphs; none were captured")
    elif mode is ForwardMode.DECODE:
        if not capture.decode:
            return Refusal("mode", "no DECODE graphs were captured")
    elif mode is ForwardMode.TARGET_VERIFY:
        if batch.spec_info is None:
            raise ValueError("batch.spec_info is required in TARGET_VERIFY (its draft count "
                             "picks the graph)")
        d = batch.spec_info.draft_token_num
        if not capture.has_verify(d):
            return Refusal("draft_token_num", f"no TARGET_VERIFY graph for draft_token_num={d} "
                                              f"(captured: {list(capture.draft_token_nums)})")
    else:
        return Refusal("mode", f"{mode.name} is not replayed from a CUDA graph")
    return None


def refusal(batch: ForwardBatch, capture: CaptureSet) -> Optional[Refusal]:
    """None if ``batch`` can be replayed from the graphs of ``capture``, else why not."""
    refused = _mode_refusal(batch, capture)
    if refused is not None:
        return refused
    if batch.batch_size > capture.max_bs:
        return Refusal("batch_size", f"batch_size={batch.batch_size} > the largest captured "
                                     f"graph ({capture.max_bs})")
    if batch.batch_size:
        mode = batch.forward_mode
        extra = batch.spec_info.draft_token_num if mode is ForwardMode.TARGET_VERIFY else 0
        need = int(batch.seq_lens_cpu.max()) + extra
        if need > capture.max_context_len:
            return Refusal("context", f"a sequence reads {need} KV columns, graphs were "
                                      f"captured for max_context_len={capture.max_context_len}")
    return None


def eager_forward(model: MoEModel, batch: ForwardBatch, make_attn_backend: Callable,
                  preparer: Optional[TboForwardBatchPreparer] = None) -> ModelOutput:
    """The eager forward, split by ``preparer`` when one is given (TBO; IDLE is not split)."""
    backend = TboAttnBackend(make_attn_backend)
    if preparer is not None and not batch.forward_mode.is_idle():
        batch = preparer.prepare(batch)
    backend.init_forward_metadata(batch)
    return model(batch, backend)
