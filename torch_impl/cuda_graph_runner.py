"""CUDA-graph capture and replay of the decode forward, plain or with two-batch overlap.

Decode and speculative-verify steps are launch-bound: a small model's forward is hundreds of
tiny kernels, and launching them from Python costs more than running them. So the runner
captures the whole forward (attention metadata, every layer, both micro-batches under TBO,
final norm, LM head) once per (mode, batch size) and afterwards only *replays* it:

1. **Capture** (once). Static buffers are allocated at the largest size; each graph reads
   views of them. Sizes are captured largest first into one shared memory pool, each after
   warm-up runs. With TBO, ``TboCudaGraphRunnerPlugin`` splits the static batch, so each graph
   holds two micro-batches cut where the *graph's* size says.
2. **Replay** (every step). ``plan_replay`` picks the smallest captured size that fits the
   real batch; the real inputs are copied into the buffers' first rows and the rest is filled
   with padding that touches nothing real (the scratch KV slot, the scratch request row,
   ``seq_len = 1``, an all-visible scratch tree-mask block); the real-token counts are
   written (the parent's here, the children's by the plugin); the graph replays; the outputs
   come back sliced to the real rows.

Anything a captured kernel reads that changes between steps lives in those device buffers:
nothing is read on the host inside the graph. A batch the runner cannot replay (EXTEND, too
many sequences, a draft count it did not capture, a context longer than captured) runs the
eager forward instead, and ``forward`` says so in its result and in ``fallbacks``.

Without a GPU (``use_cuda_graph=False``) the runner runs exactly the same steps but calls the
capture-time forward eagerly over the static buffers instead of replaying a graph: the CPU
test suite checks every part of the replay path except the graph itself. ``forward`` then
says ``emulated``, never ``replayed``.

This module is the façade; each part has a module of its own:

- ``graph_key``: what is captured (``CaptureSet``) and the key of each graph (``GraphKey``);
- ``graph_buffers``: the static buffers and the writes of real rows and padding into them;
- ``graph_capture``: the forward over a static batch and its capture into a CUDA graph;
- ``graph_replay``: the checks, the plan and the writes before a replay, the real rows after;
- ``graph_fallback``: why a batch is not replayed, and the eager forward it runs instead.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Optional, Sequence

import torch

from tbo_parity.torch_impl import graph_replay, replay_plan
from tbo_parity.torch_impl.attention import TorchAttnBackend
from tbo_parity.torch_impl.batch_splitter import TboForwardBatchPreparer
from tbo_parity.torch_impl.forward_batch import ForwardBatch
from tbo_parity.torch_impl.graph_buffers import SEQ_LEN_FILL, Padding, StaticInputs
from tbo_parity.torch_impl.graph_capture import WARMUP_RUNS, record, static_forward
from tbo_parity.torch_impl.graph_fallback import Refusal, eager_forward, refusal
from tbo_parity.torch_impl.graph_key import CaptureSet, GraphKey
from tbo_parity.torch_impl.kv_cache import KVPool
from tbo_parity.torch_impl.model import ModelOutput, MoEModel
from tbo_parity.torch_impl.two_batch_overlap import TboCudaGraphRunnerPlugin

__all__ = ["CudaGraphRunner", "RunnerOutput", "GraphKey", "CaptureSet", "Refusal",
           "StaticInputs", "Padding", "SEQ_LEN_FILL", "WARMUP_RUNS"]


@dataclasses.dataclass
class RunnerOutput:
    """What ``CudaGraphRunner.forward`` ran. At most one of ``replayed`` (a CUDA graph was
    replayed), ``emulated`` (the replay path ran without a graph: the captured forward called
    eagerly over the static buffers, ``use_cuda_graph=False``) and ``fallback`` (the eager
    forward ran, and why) is set."""

    output: ModelOutput  # views of the graph's outputs: valid until the next replay
    replayed: bool
    fallback: Optional[Refusal] = None
    emulated: bool = False

    @property
    def replay_path(self) -> bool:
        """The batch went through the replay path (a graph, or its emulation on a CPU)."""
        return self.replayed or self.emulated


def _check_config(runner: CudaGraphRunner, max_context_len, padding_slot, padding_req_row,
                  decode, draft_token_nums) -> None:
    if runner.use_cuda_graph and runner.device.type != "cuda":
        raise ValueError(f"use_cuda_graph=True needs the model on a CUDA device, it is on "
                         f"{runner.device}")
    for name, tensor in (("req_to_token", runner.req_to_token),
                         ("kv_pool.k", runner.kv_pool.k), ("kv_pool.v", runner.kv_pool.v)):
        if tensor.device != runner.device:
            raise ValueError(f"{name} is on {tensor.device}, the model on {runner.device}")
    rows, columns = runner.req_to_token.shape
    drafts = list(draft_token_nums)
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in drafts) \
            or len(set(drafts)) != len(drafts):
        raise ValueError(f"draft_token_nums must be distinct ints >= 1, got {drafts!r}")
    if not decode and not drafts:
        raise ValueError("nothing to capture: decode=False and no draft_token_nums")
    need = 1 + max(drafts, default=0)  # a padding sequence's row: seq_len 1 + d drafts
    if isinstance(max_context_len, bool) or not isinstance(max_context_len, int) \
            or not need <= max_context_len <= columns:
        raise ValueError(f"max_context_len must be an int in [{need}, {columns}] "
                         f"(req_to_token has {columns} columns), got {max_context_len!r}")
    for name, value, limit in (("padding_slot", padding_slot, runner.kv_pool.k.shape[1]),
                               ("padding_req_row", padding_req_row, rows)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
            raise ValueError(f"{name} must be an int in [0, {limit}), got {value!r}")


class CudaGraphRunner:
    """Captures the model's DECODE / TARGET_VERIFY forward per batch size and replays it.

    ``kv_pool`` and ``req_to_token`` are the pools every replay reads and writes (graphs hold
    their addresses). The caller reserves ``padding_slot`` (a KV slot no request uses) and
    ``padding_req_row`` (a request row no request uses); the runner points every column of
    that row at the padding slot, so padding rows read and write only that slot.
    ``make_attn_backend`` builds the attention of each (micro-)batch: the reference
    ``TorchAttnBackend`` by default, ``SdpaAttnBackend`` for real contexts. The graphs are
    captured for the default sizes up to ``max_bs`` (64 unless given:
    ``replay_plan.default_capture_batch_sizes``), or for exactly ``batch_sizes``.
    """

    def __init__(self, model: MoEModel, kv_pool: KVPool, req_to_token: torch.Tensor, *,
                 max_context_len: int, padding_slot: int, padding_req_row: int,
                 decode: bool = True, draft_token_nums: Sequence[int] = (),
                 max_bs: Optional[int] = 64, batch_sizes: Optional[Sequence[int]] = None,
                 tbo: bool = False, use_cuda_graph: Optional[bool] = None,
                 plugin: Optional[TboCudaGraphRunnerPlugin] = None,
                 preparer: Optional[TboForwardBatchPreparer] = None,
                 make_attn_backend: Callable[[], object] = TorchAttnBackend):
        if not isinstance(model, MoEModel):
            raise ValueError(f"model must be a MoEModel, got {type(model).__name__}")
        self.model, self.kv_pool, self.req_to_token = model, kv_pool, req_to_token
        self.make_attn_backend = make_attn_backend
        self.device = model.embed.device
        self.tbo = bool(tbo)
        self.use_cuda_graph = (self.device.type == "cuda" if use_cuda_graph is None
                               else use_cuda_graph)
        _check_config(self, max_context_len, padding_slot, padding_req_row, decode,
                      draft_token_nums)
        self.captures = CaptureSet(bool(decode), tuple(draft_token_nums),
                                   replay_plan.capture_batch_sizes(
                                       tbo=self.tbo, batch_sizes=batch_sizes,
                                       max_bs=None if batch_sizes is not None else max_bs),
                                   max_context_len)
        self.preparer = preparer or TboForwardBatchPreparer()
        self.plugin = plugin or TboCudaGraphRunnerPlugin(self.device, self.preparer)
        if self.tbo and self.plugin.children_num_token_non_padded.device != self.device:
            raise ValueError(f"plugin's count buffer is on "
                             f"{self.plugin.children_num_token_non_padded.device}, the model "
                             f"on {self.device}")
        self.static, scratch_mask_start = StaticInputs.for_capture(self.captures, self.device)
        self.padding = Padding(padding_slot, padding_req_row, scratch_mask_start)
        req_to_token[padding_req_row].fill_(padding_slot)
        self.replays = 0  # launches of the replay path (graph replays, or their emulation)
        self.fallbacks: collections.Counter = collections.Counter()
        self._graphs: dict = {}  # GraphKey -> a callable that replays (or emulates) the graph
        self._pool = None
        self.capture()

    # --- what is captured ---------------------------------------------------------------------

    @property
    def batch_sizes(self) -> tuple:
        return self.captures.batch_sizes

    @property
    def max_context_len(self) -> int:
        return self.captures.max_context_len

    @property
    def scratch_mask_start(self) -> int:
        return self.padding.mask_offset

    @property
    def padding_slot(self) -> int:
        return self.padding.slot

    @padding_slot.setter
    def padding_slot(self, slot: int) -> None:
        self.padding.slot = slot

    @property
    def padding_req_row(self) -> int:
        return self.padding.req_row

    def keys(self) -> list:
        """Every graph the runner captures, largest first."""
        return self.captures.keys()

    # --- capture ------------------------------------------------------------------------------

    def static_batch(self, key: GraphKey) -> ForwardBatch:
        """The batch the graph ``key`` is captured on: views of the static buffers."""
        return self.static.batch(key, self.req_to_token, self.kv_pool)

    def _capture_one(self, key: GraphKey) -> Callable[[], ModelOutput]:
        batch = self.static_batch(key)
        self.static.fill_padding(key, 0, self.padding)
        self.static.num_token_non_padded.fill_(key.num_tokens)  # at capture every row is real
        if self.tbo:
            batch = self.plugin.capture_one_batch_size(batch, key.num_tokens)
        forward = static_forward(self.model, batch, self.make_attn_backend,
                                 self.max_context_len)
        if not self.use_cuda_graph:
            return forward
        replay, self._pool = record(forward, self._pool, self.device)
        return replay

    @torch.no_grad()
    def capture(self) -> None:
        """Capture every key, largest batch first (later, smaller graphs reuse its memory)."""
        if self.use_cuda_graph:
            self._pool = torch.cuda.graph_pool_handle()
        for key in self.keys():
            self._graphs[key] = self._capture_one(key)
        self.static.num_token_non_padded.zero_()

    # --- replay -------------------------------------------------------------------------------

    def refusal(self, batch: ForwardBatch) -> Optional[Refusal]:
        """None if ``batch`` can be replayed, else why not."""
        return refusal(batch, self.captures)

    def can_run(self, batch: ForwardBatch) -> bool:
        return self.refusal(batch) is None

    def plan(self, batch: ForwardBatch, dp_batch_size: Optional[int] = None
             ) -> replay_plan.ReplayPlan:
        """``dp_batch_size``: under expert parallelism, the largest batch size over the ranks;
        every rank then replays the graph that fits it, so all ranks run the same exchanges."""
        return graph_replay.plan_for(batch, self.captures, tbo=self.tbo,
                                     dp_batch_size=dp_batch_size)

    @torch.no_grad()
    def prepare_replay(self, batch: ForwardBatch, dp_batch_size: Optional[int] = None
                       ) -> tuple:
        """Everything a replay does before the graph runs: check the batch, plan it, write its
        inputs and padding into the static buffers, write the real-token counts (the
        children's through the plugin). Returns ``(key, plan)`` of the graph to replay."""
        graph_replay.check_batch(batch, self.kv_pool, self.req_to_token)
        refused = self.refusal(batch)
        if refused is not None:
            raise ValueError(f"batch cannot be replayed: {refused.message}")
        return self._prepare_checked(batch, dp_batch_size)

    def _prepare_checked(self, batch: ForwardBatch, dp_batch_size: Optional[int] = None
                         ) -> tuple:
        plan = self.plan(batch, dp_batch_size)
        key = graph_replay.prepare(batch, plan, self.static, self.padding,
                                   self.plugin if self.tbo else None)
        return key, plan

    @torch.no_grad()
    def replay(self, batch: ForwardBatch, dp_batch_size: Optional[int] = None) -> ModelOutput:
        """The forward of ``batch`` by replaying the smallest graph that fits it (and
        ``dp_batch_size``, see ``plan``). Outputs are views of the graph's buffers, overwritten
        by the next replay."""
        return self._launch(*self.prepare_replay(batch, dp_batch_size))

    def _launch(self, key: GraphKey, plan: replay_plan.ReplayPlan) -> ModelOutput:
        out = self._graphs[key]()
        self.replays += 1
        return graph_replay.real_rows(out, plan)

    @torch.no_grad()
    def eager(self, batch: ForwardBatch) -> ModelOutput:
        """The eager forward (split by the preparer when the runner runs TBO)."""
        return eager_forward(self.model, batch, self.make_attn_backend,
                             self.preparer if self.tbo else None)

    def forward(self, batch: ForwardBatch) -> RunnerOutput:
        """Replay when the batch fits a captured graph, else run eagerly and say why."""
        graph_replay.check_batch(batch, self.kv_pool, self.req_to_token)
        refused = self.refusal(batch)
        if refused is None:  # checked once: replay without checking again
            with torch.no_grad():
                output = self._launch(*self._prepare_checked(batch))
            return RunnerOutput(output, replayed=self.use_cuda_graph,
                                emulated=not self.use_cuda_graph)
        self.fallbacks[refused.kind] += 1
        return RunnerOutput(self.eager(batch), replayed=False, fallback=refused)
