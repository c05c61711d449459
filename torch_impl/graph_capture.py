"""Capturing the forward of each graph: the forward over a static batch (attention metadata
computed inside it, at the captured width), its warm-up runs, and the CUDA graph that records
it into a memory pool the graphs share.

Without CUDA graphs (on a CPU) the forward itself stands in for the graph: calling it runs the
same kernels eagerly over the same static buffers.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from tbo_parity.torch_impl.attention import TboAttnBackend
from tbo_parity.torch_impl.expert_parallel import EPStep, micro_batch_rows
from tbo_parity.torch_impl.forward_batch import ForwardBatch
from tbo_parity.torch_impl.model import ModelOutput, MoEModel

WARMUP_RUNS = 2  # eager runs before each capture: lazy initialisation must not be captured


def ep_step_for(model: MoEModel, batch: ForwardBatch) -> Optional[EPStep]:
    """With experts sharded over ranks: the step every rank's graph of this size runs (all
    ranks replay the same graph, so the capacity is the larger micro-batch's rows)."""
    if not model.expert_parallel:
        return None
    return EPStep(micro_batch_rows(batch), 1 if batch.tbo_children is None else 2, "decode")


def static_forward(model: MoEModel, batch: ForwardBatch, make_attn_backend: Callable,
                   width: int) -> Callable[[], ModelOutput]:
    """The forward a graph records: metadata of ``batch`` at ``width`` columns, then the model
    (both micro-batches when ``batch`` is split)."""
    backend = TboAttnBackend(make_attn_backend)
    ep_step = ep_step_for(model, batch)

    def forward() -> ModelOutput:
        backend.init_forward_metadata(batch, width=width)
        return model(batch, backend, ep_step=ep_step)

    return forward


def record(forward: Callable[[], ModelOutput], pool, device) -> tuple:
    """``(replay, pool)``: ``forward`` captured in a CUDA graph (after warm-up runs) in
    ``pool``, and the graph's pool for the next capture; ``replay()`` replays the graph and
    returns its output buffers."""
    for _ in range(WARMUP_RUNS):  # buffers hold padding: the runs write the scratch slot
        forward()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = forward()

    def replay() -> ModelOutput:
        graph.replay()
        return out

    return replay, graph.pool()
