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
test suite checks every part of the replay path except the graph itself.

Shape letters: ``B`` the largest captured batch, ``T`` = ``B * max(token_num_per_seq)``,
``M`` the tree-mask buffer (``B * d_max * max_context_len`` entries for real blocks, then one
all-visible scratch block of ``d_max * (1 + d_max)``).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Optional, Sequence

import torch

from torch_impl import replay_plan
from torch_impl.attention import TboAttnBackend, TorchAttnBackend
from torch_impl.batch_splitter import TboForwardBatchPreparer
from torch_impl.expert_parallel import EPStep, micro_batch_rows
from torch_impl.forward_batch import ForwardBatch, VerifyInput
from torch_impl.forward_mode import ForwardMode
from torch_impl.kv_cache import KVPool
from torch_impl.model import ModelOutput, MoEModel
from torch_impl.two_batch_overlap import TboCudaGraphRunnerPlugin

WARMUP_RUNS = 2  # eager runs before each capture: lazy initialisation must not be captured
SEQ_LEN_FILL = 1  # a padding sequence "holds" one token, so its attention row is not empty


@dataclasses.dataclass(frozen=True)
class GraphKey:
    """One captured graph: DECODE or TARGET_VERIFY, tokens per sequence, sequences."""

    mode: str
    token_num_per_seq: int
    batch_size: int

    @property
    def num_tokens(self) -> int:
        return self.batch_size * self.token_num_per_seq


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why a batch is not replayed: ``kind`` is one of ``mode``, ``draft_token_num``,
    ``batch_size``, ``context``; ``message`` says it with the numbers."""

    kind: str
    message: str


@dataclasses.dataclass
class RunnerOutput:
    output: ModelOutput  # views of the graph's outputs: valid until the next replay
    replayed: bool
    fallback: Optional[Refusal] = None


class StaticInputs:
    """The device buffers every graph reads (allocated once, at the largest size)."""

    def __init__(self, max_bs: int, max_tokens: int, mask_len: int, device):
        def ints(n):
            return torch.zeros(n, dtype=torch.int64, device=device)

        self.input_ids = ints(max_tokens)  # [T]
        self.positions = ints(max_tokens)  # [T]
        self.out_cache_loc = ints(max_tokens)  # [T]
        self.req_pool_indices = ints(max_bs)  # [B]
        self.seq_lens = ints(max_bs)  # [B]
        self.custom_mask_offsets = ints(max_bs)  # [B]
        self.custom_mask = torch.ones(mask_len, dtype=torch.bool, device=device)  # [M]
        self.num_token_non_padded = ints(())  # [] real tokens of the whole graph


class CudaGraphRunner:
    """Captures the model's DECODE / TARGET_VERIFY forward per batch size and replays it.

    ``kv_pool`` and ``req_to_token`` are the pools every replay reads and writes (graphs hold
    their addresses). The caller reserves ``padding_slot`` (a KV slot no request uses) and
    ``padding_req_row`` (a request row no request uses); the runner points every column of
    that row at the padding slot, so padding rows read and write only that slot.
    ``make_attn_backend`` builds the attention of each (micro-)batch: the reference
    ``TorchAttnBackend`` by default, ``SdpaAttnBackend`` for real contexts.
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
        self._check_config(max_context_len, padding_slot, padding_req_row, decode,
                           draft_token_nums)
        self.max_context_len = max_context_len
        self.padding_slot, self.padding_req_row = padding_slot, padding_req_row
        self.batch_sizes = replay_plan.capture_batch_sizes(
            tbo=self.tbo, max_bs=None if batch_sizes is not None else max_bs,
            batch_sizes=batch_sizes)
        self.token_nums = ({"DECODE": 1} if decode else {}) | {
            f"TARGET_VERIFY/{d}": d for d in draft_token_nums}
        self.preparer = preparer or TboForwardBatchPreparer()
        self.plugin = plugin or TboCudaGraphRunnerPlugin(self.device, self.preparer)
        if self.tbo and self.plugin.children_num_token_non_padded.device != self.device:
            raise ValueError(f"plugin's count buffer is on "
                             f"{self.plugin.children_num_token_non_padded.device}, the model "
                             f"on {self.device}")
        max_bs_captured, d_max = self.batch_sizes[-1], max(draft_token_nums, default=0)
        self.scratch_mask_start = max_bs_captured * d_max * max_context_len
        self.static = StaticInputs(
            max_bs_captured, max_bs_captured * max(1, d_max),
            self.scratch_mask_start + d_max * (1 + d_max), self.device)
        req_to_token[padding_req_row].fill_(padding_slot)
        self.replays = 0
        self.fallbacks: collections.Counter = collections.Counter()
        self._graphs: dict = {}
        self._pool = None
        self.capture()

    # --- configuration -----------------------------------------------------------------------

    def _check_config(self, max_context_len, padding_slot, padding_req_row, decode,
                      draft_token_nums) -> None:
        if self.use_cuda_graph and self.device.type != "cuda":
            raise ValueError(f"use_cuda_graph=True needs the model on a CUDA device, it is on "
                             f"{self.device}")
        for name, tensor in (("req_to_token", self.req_to_token), ("kv_pool.k", self.kv_pool.k),
                             ("kv_pool.v", self.kv_pool.v)):
            if tensor.device != self.device:
                raise ValueError(f"{name} is on {tensor.device}, the model on {self.device}")
        rows, columns = self.req_to_token.shape
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
        for name, value, limit in (("padding_slot", padding_slot, self.kv_pool.k.shape[1]),
                                   ("padding_req_row", padding_req_row, rows)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
                raise ValueError(f"{name} must be an int in [0, {limit}), got {value!r}")

    def keys(self) -> list:
        """Every graph the runner captures, largest first."""
        return [GraphKey(name.split("/")[0], tnps, bs) for name, tnps in self.token_nums.items()
                for bs in reversed(self.batch_sizes)]

    # --- capture -----------------------------------------------------------------------------

    def _static_batch(self, key: GraphKey) -> ForwardBatch:
        """The batch a graph is captured on: views of the static buffers, every row padding."""
        s, bs, n = self.static, key.batch_size, key.num_tokens
        spec_info = None
        if key.mode == "TARGET_VERIFY":
            spec_info = VerifyInput(draft_token_num=key.token_num_per_seq,
                                    custom_mask=s.custom_mask,
                                    custom_mask_offsets=s.custom_mask_offsets[:bs])
        return ForwardBatch(
            forward_mode=ForwardMode[key.mode], batch_size=bs, input_ids=s.input_ids[:n],
            positions=s.positions[:n], out_cache_loc=s.out_cache_loc[:n],
            req_pool_indices=s.req_pool_indices[:bs], seq_lens=s.seq_lens[:bs],
            seq_lens_cpu=torch.full((bs,), SEQ_LEN_FILL, dtype=torch.int64),
            spec_info=spec_info, num_token_non_padded=s.num_token_non_padded,
            req_to_token=self.req_to_token, kv_pool=self.kv_pool)

    def _fill_padding(self, key: GraphKey, real_bs: int) -> None:
        """Rows ``real_bs..`` of the static buffers hold padding for the graph ``key``."""
        s, d = self.static, key.token_num_per_seq
        bs, first, n = key.batch_size, real_bs * d, key.num_tokens
        if n > first:
            s.input_ids[first:n].zero_()
            s.positions[first:n].zero_()
            s.out_cache_loc[first:n].fill_(self.padding_slot)
        if bs > real_bs:
            s.req_pool_indices[real_bs:bs].fill_(self.padding_req_row)
            s.seq_lens[real_bs:bs].fill_(SEQ_LEN_FILL)
            s.custom_mask_offsets[real_bs:bs].fill_(self.scratch_mask_start)

    def _capture_one(self, key: GraphKey) -> Callable[[], ModelOutput]:
        batch = self._static_batch(key)
        self._fill_padding(key, 0)
        self.static.num_token_non_padded.fill_(key.num_tokens)  # at capture every row is real
        if self.tbo:
            batch = self.plugin.capture_one_batch_size(batch, key.num_tokens)
        backend = TboAttnBackend(self.make_attn_backend)

        ep_step = self._ep_step(batch)

        def forward() -> ModelOutput:
            backend.init_forward_metadata(batch, width=self.max_context_len)
            return self.model(batch, backend, ep_step=ep_step)

        if not self.use_cuda_graph:
            return forward
        for _ in range(WARMUP_RUNS):  # buffers hold padding: the runs write the scratch slot
            forward()
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = forward()
        self._pool = graph.pool()

        def replay() -> ModelOutput:
            graph.replay()
            return out

        return replay

    def _ep_step(self, batch: ForwardBatch) -> Optional[EPStep]:
        """With experts sharded over ranks: the step every rank's graph of this size runs
        (all ranks replay the same graph, so the capacity is the larger micro-batch's rows)."""
        if not self.model.expert_parallel:
            return None
        return EPStep(micro_batch_rows(batch), 1 if batch.tbo_children is None else 2,
                      "decode")

    @torch.no_grad()
    def capture(self) -> None:
        """Capture every key, largest batch first (later, smaller graphs reuse its memory)."""
        if self.use_cuda_graph:
            self._pool = torch.cuda.graph_pool_handle()
        for key in self.keys():
            self._graphs[key] = self._capture_one(key)
        self.static.num_token_non_padded.zero_()

    # --- replay ------------------------------------------------------------------------------

    def refusal(self, batch: ForwardBatch) -> Optional[Refusal]:
        """None if ``batch`` can be replayed, else why not."""
        mode = batch.forward_mode
        if mode is ForwardMode.IDLE:
            if "DECODE" not in self.token_nums:
                return Refusal("mode", "IDLE replays the DECODE graphs; none were captured")
        elif mode is ForwardMode.DECODE:
            if "DECODE" not in self.token_nums:
                return Refusal("mode", "no DECODE graphs were captured")
        elif mode is ForwardMode.TARGET_VERIFY:
            d = batch.spec_info.draft_token_num if batch.spec_info is not None else None
            if f"TARGET_VERIFY/{d}" not in self.token_nums:
                captured = [v for k, v in self.token_nums.items() if k != "DECODE"]
                return Refusal("draft_token_num", f"no TARGET_VERIFY graph for "
                                                  f"draft_token_num={d} (captured: {captured})")
        else:
            return Refusal("mode", f"{mode.name} is not replayed from a CUDA graph")
        if batch.batch_size > self.batch_sizes[-1]:
            return Refusal("batch_size", f"batch_size={batch.batch_size} > the largest "
                                         f"captured graph ({self.batch_sizes[-1]})")
        if batch.batch_size:
            extra = batch.spec_info.draft_token_num if mode is ForwardMode.TARGET_VERIFY else 0
            need = int(batch.seq_lens_cpu.max()) + extra
            if need > self.max_context_len:
                return Refusal("context", f"a sequence reads {need} KV columns, graphs were "
                                          f"captured for max_context_len={self.max_context_len}")
        return None

    def can_run(self, batch: ForwardBatch) -> bool:
        return self.refusal(batch) is None

    def _check_batch(self, batch: ForwardBatch) -> None:
        if not isinstance(batch, ForwardBatch):
            raise ValueError(f"batch must be a ForwardBatch, got {type(batch).__name__}")
        if batch.tbo_children is not None:
            raise ValueError("batch is already split (tbo_children is set); the runner splits "
                             "the unsplit batch itself")
        if batch.num_token_non_padded is not None \
                and batch.num_token_non_padded != batch.num_tokens:
            raise ValueError("batch has padding (num_token_non_padded != num_tokens); give "
                             "the runner the real batch, it pads")
        if batch.kv_pool is not None and batch.kv_pool.k is not self.kv_pool.k:
            raise ValueError("batch.kv_pool is not the runner's kv_pool (graphs write theirs)")
        if batch.req_to_token is not None and batch.req_to_token is not self.req_to_token:
            raise ValueError("batch.req_to_token is not the runner's req_to_token")

    def plan(self, batch: ForwardBatch, dp_batch_size: Optional[int] = None
             ) -> replay_plan.ReplayPlan:
        """``dp_batch_size``: under expert parallelism, the largest batch size over the ranks;
        every rank then replays the graph that fits it, so all ranks run the same exchanges."""
        mode = batch.forward_mode
        draft = batch.spec_info.draft_token_num if mode is ForwardMode.TARGET_VERIFY else None
        sizes = self.batch_sizes
        if dp_batch_size is not None:
            if (isinstance(dp_batch_size, bool) or not isinstance(dp_batch_size, int)
                    or not batch.batch_size <= dp_batch_size <= sizes[-1]):
                raise ValueError(f"dp_batch_size must be an int in [batch_size="
                                 f"{batch.batch_size}, {sizes[-1]}], got {dp_batch_size!r}")
            sizes = [size for size in sizes if size >= dp_batch_size]
        return replay_plan.plan_replay(mode, batch.batch_size, sizes, tbo=self.tbo,
                                       draft_token_num=draft)

    def _mask_block_sizes(self, batch: ForwardBatch) -> Optional[torch.Tensor]:
        """[B] host sizes of a TARGET_VERIFY batch's tree-mask blocks, its mask checked."""
        if batch.forward_mode is not ForwardMode.TARGET_VERIFY or not batch.batch_size:
            return None
        d, mask = batch.spec_info.draft_token_num, batch.spec_info.custom_mask
        sizes = (batch.seq_lens_cpu + d) * d  # the blocks lie end to end (docs/spec.md)
        if mask is None or mask.numel() != int(sizes.sum()):
            raise ValueError(f"spec_info.custom_mask must hold {int(sizes.sum())} entries for "
                             f"these seq_lens, got {None if mask is None else mask.numel()}")
        return sizes

    def _write_inputs(self, batch: ForwardBatch, key: GraphKey, real_bs: int) -> None:
        s, n = self.static, real_bs * key.token_num_per_seq
        sizes = self._mask_block_sizes(batch)  # validated before anything is written
        if n:
            s.input_ids[:n].copy_(batch.input_ids)
            s.positions[:n].copy_(batch.positions)
            s.out_cache_loc[:n].copy_(batch.out_cache_loc)
            s.req_pool_indices[:real_bs].copy_(batch.req_pool_indices)
            s.seq_lens[:real_bs].copy_(batch.seq_lens)
        if sizes is not None:
            mask = batch.spec_info.custom_mask
            s.custom_mask[:mask.numel()].copy_(mask)
            s.custom_mask_offsets[:real_bs].copy_(torch.cumsum(sizes, 0) - sizes)
        self._fill_padding(key, real_bs)
        s.num_token_non_padded.fill_(n)

    @torch.no_grad()
    def prepare_replay(self, batch: ForwardBatch, dp_batch_size: Optional[int] = None
                       ) -> tuple:
        """Everything a replay does before the graph runs: check the batch, plan it, write its
        inputs and padding into the static buffers, write the real-token counts (the
        children's through the plugin). Returns ``(key, plan)`` of the graph to replay."""
        self._check_batch(batch)
        refusal = self.refusal(batch)
        if refusal is not None:
            raise ValueError(f"batch cannot be replayed: {refusal.message}")
        return self._prepare_checked(batch, dp_batch_size)

    def _prepare_checked(self, batch: ForwardBatch, dp_batch_size: Optional[int] = None
                         ) -> tuple:
        plan = self.plan(batch, dp_batch_size)
        mode = "DECODE" if batch.forward_mode is ForwardMode.IDLE else batch.forward_mode.name
        key = GraphKey(mode, plan.token_num_per_seq, plan.graph_bs)
        self._write_inputs(batch, key, plan.real_bs)
        if self.tbo:
            self.plugin.replay_prepare(batch.forward_mode, plan.graph_bs,
                                       plan.num_token_non_padded, batch.spec_info)
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
        n = plan.num_token_non_padded
        return ModelOutput(out.hidden[:n], out.logits[:n], out.expert_load)

    @torch.no_grad()
    def eager(self, batch: ForwardBatch) -> ModelOutput:
        """The eager forward (split by the preparer when the runner runs TBO)."""
        backend = TboAttnBackend(self.make_attn_backend)
        if self.tbo and not batch.forward_mode.is_idle():
            batch = self.preparer.prepare(batch)
        backend.init_forward_metadata(batch)
        return self.model(batch, backend)

    def forward(self, batch: ForwardBatch) -> RunnerOutput:
        """Replay when the batch fits a captured graph, else run eagerly and say why."""
        self._check_batch(batch)
        refusal = self.refusal(batch)
        if refusal is None:  # checked once: replay without checking again
            with torch.no_grad():
                output = self._launch(*self._prepare_checked(batch))
            return RunnerOutput(output, replayed=True)
        self.fallbacks[refusal.kind] += 1
        return RunnerOutput(self.eager(batch), replayed=False, fallback=refusal)
