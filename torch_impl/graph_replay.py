"""Everything a replay does before and after the graph runs: check the batch, plan where it
sits in the graph it replays (``replay_plan.plan_replay``), write its inputs and padding into
the static buffers and the real-token counts (the children's through the TBO plugin), and cut
the graph's outputs back to the real rows.
"""

from __future__ import annotations

from typing import Optional

from tbo_parity.torch_impl import replay_plan
from tbo_parity.torch_impl.forward_batch import ForwardBatch
from tbo_parity.torch_impl.forward_mode import ForwardMode
from tbo_parity.torch_impl.graph_buffers import Padding, StaticInputs
from tbo_parity.torch_impl.graph_key import CaptureSet, GraphKey
from tbo_parity.torch_impl.model import ModelOutput
from tbo_parity.torch_impl.two_batch_overlap import TboCudaGraphRunnerPlugin


def check_batch(batch: ForwardBatch, kv_pool, req_to_token) -> None:
    """A real, unsplit, unpadded batch on the runner's pools, else a ValueError."""
    if not isinstance(batch, ForwardBatch):
        raise ValueError(f"batch must be a ForwardBatch, got {type(batch).__name__}")
    if batch.tbo_children is not None:
        raise ValueError("batch is already split (tbo_children is set); the runner splits "
                         "the unsplit batch itself")
    if batch.num_token_non_padded is not None \
            and batch.num_token_non_padded != batch.num_tokens:
        raise ValueError("batch has padding (num_token_non_padded != num_tokens); give "
                         "the runner the real batch, it pads")
    if batch.kv_pool is not None and batch.kv_pool.k is not kv_pool.k:
        raise ValueError("batch.kv_pool is not the runner's kv_pool (graphs write theirs)")
    if batch.req_to_token is not None and batch.req_to_token is not req_to_token:
        raise ValueError("batch.req_to_token is not the runner's req_to_token")


def plan_for(batch: ForwardBatch, capture: CaptureSet, *, tbo: bool,
             dp_batch_size: Optional[int] = None) -> replay_plan.ReplayPlan:
    """Where ``batch`` sits in the smallest graph that fits it, and ``dp_batch_size`` (under
    expert parallelism the largest batch size over the ranks) when given."""
    mode = batch.forward_mode
    draft = batch.spec_info.draft_token_num if mode is ForwardMode.TARGET_VERIFY else None
    sizes = capture.batch_sizes
    if dp_batch_size is not None:
        if (isinstance(dp_batch_size, bool) or not isinstance(dp_batch_size, int)
                or not batch.batch_size <= dp_batch_size <= sizes[-1]):
            raise ValueError(f"dp_batch_size must be an int in [batch_size="
                             f"{batch.batch_size}, {sizes[-1]}], got {dp_batch_size!r}")
        sizes = [size for size in sizes if size >= dp_batch_size]
    return replay_plan.plan_replay(mode, batch.batch_size, sizes, tbo=tbo,
                                   draft_token_num=draft)


def prepare(batch: ForwardBatch, plan: replay_plan.ReplayPlan, static: StaticInputs,
            padding: Padding, plugin: Optional[TboCudaGraphRunnerPlugin] = None) -> GraphKey:
    """Write ``batch`` and its padding into ``static``, and the children's counts through
    ``plugin`` (TBO); the key of the graph to replay."""
    key = GraphKey.for_plan(batch.forward_mode, plan)
    static.write(batch, key, plan.real_bs, padding)
    if plugin is not None:
        plugin.replay_prepare(batch.forward_mode, plan.graph_bs, plan.num_token_non_padded,
                              batch.spec_info)
    return key


def real_rows(out: ModelOutput, plan: replay_plan.ReplayPlan) -> ModelOutput:
    """The graph's outputs cut to the real rows (views, valid until the next replay)."""
    n = plan.num_token_non_padded
    return ModelOutput(out.hidden[:n], out.logits[:n], out.expert_load)
