"""Expert parallelism: the routed experts sharded over ranks, dispatch and combine as exchanges.

The layout is docs/model.md's "Expert parallelism" (the JAX twin is
``reference/expert_parallel.py``). ``N`` ranks, ``E`` experts, ``L = E / N`` local experts
per rank; rank ``r`` holds experts ``r*L .. r*L + L - 1``. In one step every rank offers ``C``
token rows (the capacity, equal on all ranks). The pair (token ``t`` of rank ``s``, expert
``e``) lands in rank ``e // L``'s receive buffer at ``[e % L, s*C + t]``:

    send  [N, L, C, H]   on the source, destination rank first (zeros where no pair goes)
    recv  [L, N*C, H]    on the expert's rank: one row block per local expert, DeepEP's
                         low-latency layout; a token picks distinct experts, so no slot is
                         shared and no counts or prefix sums are needed
    out   [L, N*C, H]    the local experts' SwiGLU as batched matrix products over recv
    back  [E, C, H]      on the source again: row ``(e, t)`` is expert ``e``'s output for t

Every shape is fixed by ``(N, L, C, H)``, so a step can be captured in a CUDA graph. ``C`` is
at most ``max_capacity`` (the largest captured batch): nothing is ever dropped, and a step
that would need more is refused before anything launches.

Dispatch and combine are each a *launch* and a *wait*. On a GPU the launch records an event on
the compute stream, the communication stream waits on it and runs the exchange, and the wait
makes the compute stream wait on the exchange's event: whatever the other micro-batch computes
in between runs in parallel, and captured in a graph the two streams become parallel branches.
On a CPU (gloo) the launch starts an asynchronous all-to-all and the wait waits on it.

Transports (one interface, the same bytes land in the same slots, so outputs are bit-identical):

- ``AllToAllTransport``: ``all_to_all_single`` of the process group (NCCL on GPUs, gloo on
  CPUs), then a permute of ``[N, L, C, H]`` into ``recv``'s layout on the communication stream.
- ``CopyEngineTransport`` (GPUs of one host): the receive buffers are PyTorch symmetric memory,
  mapped into every peer; a send is ``L`` contiguous copies into the peer's buffer, which run
  on the copy engines rather than the SMs, and a symmetric-memory barrier (one small kernel)
  says that every peer's copies have landed.

Shape letters (docs/spec.md, "Shape letters"): ``T`` tokens of a micro-batch (``T <= C``),
``H`` hidden, ``K`` top-k, ``I`` expert intermediate size, ``J`` rows of a receive buffer per
local expert.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tbo_parity.torch_impl.empty_batch import is_empty
from tbo_parity.torch_impl.forward_mode import strategy_for
from tbo_parity.torch_impl.moe import float32_operand


def check_layout(num_experts: int, world_size: int) -> int:
    """``L``, the local experts per rank; ValueError unless ``E`` splits evenly over ranks."""
    for name, value in (("num_experts", num_experts), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if num_experts % world_size:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by world_size "
                         f"({world_size})")
    return num_experts // world_size


def local_slice(array, rank: int, local_experts: int):
    """Rank ``rank``'s experts of an ``[E, ...]`` weight: rows ``rank*L .. rank*L + L - 1``."""
    return array[rank * local_experts:(rank + 1) * local_experts]


def send_views(storage: torch.Tensor, shape) -> tuple:
    """``(send [N, L, C, H], rows [N*L*C + 1, H])`` over one flat buffer: ``rows`` is ``send``
    flattened plus one scratch row at the end, where padding pairs are written."""
    n, l, c, h = shape
    rows = storage.view(-1)[:(n * l * c + 1) * h].view(n * l * c + 1, h)
    return rows[:-1].view(n, l, c, h), rows


def fill_send_buffer(rows: torch.Tensor, hidden: torch.Tensor, topk_ids: torch.Tensor,
                     capacity: int) -> None:
    """``rows`` (``send_views``) <- each pair's token at flat row ``e*C + t`` (that is
    ``send[e // L, e % L, t]``), zeros elsewhere. Padding pairs (id -1) go to the scratch row,
    so the shapes never depend on how many pairs are real."""
    scratch = rows.shape[0] - 1
    token = torch.arange(topk_ids.shape[0], device=topk_ids.device)[:, None]  # [T, 1]
    index = torch.where(topk_ids < 0, scratch, topk_ids * capacity + token)  # [T, K]
    rows.zero_()
    # rows[index[t, k]] <- hidden[t]: the value [T, 1, H] broadcasts over k, so no [T*K, H]
    # copy of the tokens is gathered first (a token's K pairs land in distinct rows)
    rows.index_put_((index,), hidden[:, None])


def expert_swiglu(recv: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                  down: torch.Tensor) -> torch.Tensor:
    """``recv [L, J, H]`` through the local experts ``gate/up [L, H, I], down [L, I, H]``:
    batched matrix products over each expert's whole row block -> ``[L, J, H]``. The activation
    runs in float32 and is rounded once, as in ``moe.swiglu``."""
    g = torch.bmm(recv, gate).float()
    u = float32_operand(torch.bmm(recv, up))
    return torch.bmm((F.silu(g) * u).to(recv.dtype), down)


def combine_from_back(back: torch.Tensor, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor) -> torch.Tensor:
    """``back [E, C, H]`` -> ``[T, H]`` float32: ``sum_k w[t, k] * back[ids[t, k], t]`` in k
    order (the order ``LocalDispatcher`` sums in). Padding pairs read row 0 with weight 0."""
    e, c, h = back.shape
    token = torch.arange(topk_ids.shape[0], device=topk_ids.device)[:, None]
    rows = torch.where(topk_ids < 0, 0, topk_ids * c + token)  # [T, K]
    picked = back.view(e * c, h)[rows]  # [T, K, H]
    return (float32_operand(picked) * topk_weights[:, :, None]).sum(dim=1)


# --- transports ------------------------------------------------------------------------------


class AllToAllTransport:
    """``all_to_all_single`` over ``group``: NCCL on GPUs, gloo on CPUs.

    On a CPU the collective is started asynchronously in ``start`` and waited on in
    ``finish``; on a GPU it is enqueued on the communication stream (the caller's current
    stream) and ``finish`` has nothing left to do."""

    name = "all_to_all"

    def __init__(self, group=None):
        self.group = group

    def allocate(self, shape, dtype, device) -> dict:
        n, l, c, h = shape
        return {"raw": torch.empty(shape, dtype=dtype, device=device),
                "recv": torch.empty((l, n, c, h), dtype=dtype, device=device),
                "out_t": torch.empty(shape, dtype=dtype, device=device),
                "back": torch.empty(shape, dtype=dtype, device=device)}

    def _exchange(self, output, source):
        asynchronous = source.device.type != "cuda"
        work = dist.all_to_all_single(output, source, group=self.group,
                                      async_op=asynchronous)
        return work if asynchronous else None

    def start_dispatch(self, send, bufs, c):
        n, l, _, h = send.shape
        raw = _view(bufs["raw"], (n, l, c, h))
        return self._exchange(raw, send)

    def finish_dispatch(self, work, send, bufs, c):
        n, l, _, h = send.shape
        if work is not None:
            work.wait()
        recv = _view(bufs["recv"], (l, n, c, h))
        recv.copy_(_view(bufs["raw"], (n, l, c, h)).transpose(0, 1))
        return recv.view(l, n * c, h)

    def start_combine(self, out, bufs, c):
        l, nc, h = out.shape
        n = nc // c
        out_t = _view(bufs["out_t"], (n, l, c, h))
        out_t.copy_(out.view(l, n, c, h).transpose(0, 1))
        back = _view(bufs["back"], (n, l, c, h))
        return self._exchange(back, out_t)

    def finish_combine(self, work, bufs, shape):
        if work is not None:
            work.wait()
        n, l, c, h = shape
        return _view(bufs["back"], (n * l, c, h))


class CopyEngineTransport:
    """Peer copies into symmetric memory (GPUs of one host), arrival by a barrier.

    Each rank's ``recv`` and ``back`` buffers are allocated with
    ``torch.distributed._symmetric_memory`` and rendezvoused over ``group``, so every rank can
    address its peers' buffers. A send is one contiguous ``copy_`` per local expert into the
    peer's buffer (a device-to-device memcpy over NVLink: the copy engines move the bytes, not
    the SMs). Two barriers fence each exchange: the first says every peer has finished reading
    what the previous exchange left in the buffer it is about to overwrite, the second that
    every peer's copies into this rank have landed. All of it is capturable."""

    name = "copy_engine"

    def __init__(self, group=None):
        self.group = group if group is not None else dist.group.WORLD

    def allocate(self, shape, dtype, device) -> dict:
        import torch.distributed._symmetric_memory as symm_mem  # GPU-only; import lazily

        n, l, c, h = shape
        bufs = {}
        for name in ("recv", "back"):
            tensor = symm_mem.empty(n * l * c * h, dtype=dtype, device=device)
            bufs[name] = tensor
            bufs[name + "_handle"] = symm_mem.rendezvous(tensor, self.group)
        return bufs

    @staticmethod
    def _copies(handle, sources, dtype, numel):
        for peer, offset, block in sources:
            target = handle.get_buffer(peer, (numel,), dtype)
            target[offset:offset + block.numel()].view_as(block).copy_(block)

    def start_dispatch(self, send, bufs, c):
        n, l, _, h = send.shape
        handle, me, block = bufs["recv_handle"], handle_rank(bufs["recv_handle"]), c * h
        handle.barrier(channel=0)  # every peer is done with the buffer's previous contents
        # send[r, j] -> rank r's recv[j, me] (recv is [L, N, C, H] = [L, N*C, H])
        self._copies(handle, [(r, (j * n + me) * block, send[r, j])
                              for r in range(n) for j in range(l)],
                     send.dtype, bufs["recv"].numel())
        handle.barrier(channel=0)  # every peer's copies into this rank have landed
        return None

    def finish_dispatch(self, work, send, bufs, c):
        n, l, _, h = send.shape
        return _view(bufs["recv"], (l, n * c, h))

    def start_combine(self, out, bufs, c):
        l, nc, h = out.shape
        n = nc // c
        handle, me, block = bufs["back_handle"], handle_rank(bufs["back_handle"]), c * h
        handle.barrier(channel=0)
        # out[j, s*C:(s+1)*C] -> rank s's back[me*L + j] (back is [E, C, H])
        self._copies(handle, [(s, (me * l + j) * block, out[j, s * c:(s + 1) * c])
                              for s in range(n) for j in range(l)],
                     out.dtype, bufs["back"].numel())
        handle.barrier(channel=0)
        return None

    def finish_combine(self, work, bufs, shape):
        n, l, c, h = shape
        return _view(bufs["back"], (n * l, c, h))


def handle_rank(handle) -> int:
    return int(handle.rank)


def _view(buffer: torch.Tensor, shape) -> torch.Tensor:
    """The first ``prod(shape)`` elements of a flat-allocated buffer, contiguous in ``shape``."""
    numel = 1
    for size in shape:
        numel *= size
    return buffer.view(-1)[:numel].view(shape)


TRANSPORTS = {"all_to_all": AllToAllTransport, "copy_engine": CopyEngineTransport}
# What a transport object provides (the dispatcher calls nothing else).
TRANSPORT_METHODS = ("allocate", "start_dispatch", "finish_dispatch", "start_combine",
                     "finish_combine")


@dataclasses.dataclass(frozen=True)
class EPStep:
    """What every rank of an expert-parallel group must agree on for one forward: the exchanges
    are collective, so all ranks run the same ones, in the same order, with the same shapes.

    ``capacity``: token rows each rank offers per micro-batch (>= every micro-batch's tokens on
    every rank); ``micro_batches``: 2 under two-batch overlap, else 1; ``strategy``: the
    operations layout ("prefill" or "decode"), which fixes the order of the exchanges."""

    capacity: int
    micro_batches: int
    strategy: str

    def __post_init__(self):
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, int) \
                or self.capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {self.capacity!r}")
        if self.micro_batches not in (1, 2) or isinstance(self.micro_batches, bool):
            raise ValueError(f"micro_batches must be 1 or 2, got {self.micro_batches!r}")
        if self.strategy not in ("prefill", "decode"):
            raise ValueError(f"strategy must be 'prefill' or 'decode', got {self.strategy!r}")


# --- the dispatcher --------------------------------------------------------------------------


@dataclasses.dataclass
class EPHandle:
    """What passes from a launch to its wait (and from dispatch to combine)."""

    micro_batch: int
    capacity: int
    topk_weights: torch.Tensor  # [T, K]
    topk_ids: torch.Tensor  # [T, K]
    work: object = None
    event: Optional[torch.cuda.Event] = None
    recv: Optional[torch.Tensor] = None  # [L, N*C, H] after dispatch_wait ([N*S, H] packed)
    keep: tuple = ()  # tensors the communication stream reads, alive until the wait
    # the packed layout's maps (torch_impl.packed_dispatch): where this rank's pairs went,
    # where the received rows sit, and the local experts' group ends
    dest: Optional[torch.Tensor] = None  # [T, K]
    slot: Optional[torch.Tensor] = None  # [T, K]
    row_of: Optional[torch.Tensor] = None  # [N, S]
    group_ends: Optional[torch.Tensor] = None  # [L] int32


class ExpertParallelDispatcher:
    """Dispatch/combine across the ranks of ``group`` with a fixed-capacity layout.

    ``max_capacity``: the most token rows one micro-batch of one rank may offer (the largest
    captured batch); buffers for two micro-batches are allocated once for it. A step's capacity
    ``C`` is passed to every launch (equal on all ranks); steps use views of the same buffers.
    The model slices its expert weights with ``local_experts`` and calls ``experts`` on what
    ``dispatch_wait`` returns.

    This is the *capacity* layout, the baseline; ``torch_impl.packed_dispatch`` has the packed
    layout, the default (``make_dispatcher``).
    """

    layout = "capacity"
    TRANSPORTS = TRANSPORTS
    TRANSPORT_METHODS = TRANSPORT_METHODS

    def __init__(self, num_experts: int, *, hidden_size: int, max_capacity: int, dtype,
                 device, group=None, transport: str = "all_to_all",
                 comm_stream: Optional[torch.cuda.Stream] = None):
        if not dist.is_initialized():
            raise ValueError("ExpertParallelDispatcher needs torch.distributed initialised "
                             "(init_process_group) first")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.num_experts = num_experts
        self.local_experts = check_layout(num_experts, self.world_size)
        for name, value in (("hidden_size", hidden_size), ("max_capacity", max_capacity)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        transports = self.TRANSPORTS
        if isinstance(transport, str) and transport not in transports:
            raise ValueError(f"transport must be one of {sorted(transports)} or a transport "
                             f"object, got {transport!r}")
        if not isinstance(transport, str) and not all(
                callable(getattr(transport, m, None)) for m in self.TRANSPORT_METHODS):
            raise ValueError(f"transport object {transport!r} lacks one of "
                             f"{self.TRANSPORT_METHODS}")
        self.device = torch.device(device)
        if transport == "copy_engine" and self.device.type != "cuda":
            raise ValueError("transport 'copy_engine' needs CUDA devices, got device "
                             f"{self.device}")
        self.max_capacity, self.hidden_size, self.dtype = max_capacity, hidden_size, dtype
        self.transport = (transports[transport](group) if isinstance(transport, str)
                          else transport)
        on_gpu = self.device.type == "cuda"
        self.comm_stream = (comm_stream or torch.cuda.Stream(self.device)) if on_gpu else None
        self._allocate()
        # Observability (the timeline): when a list, every piece of communication-stream work
        # appends (label, micro_batch, start event, end event). None costs nothing.
        self.trace: Optional[list] = None

    def _allocate(self) -> None:
        """The send buffers and the transport's buffers, one set per micro-batch (A's and B's
        exchanges are in flight together), sized for ``max_capacity``."""
        n, l, c, h = self.world_size, self.local_experts, self.max_capacity, self.hidden_size
        self._send = [torch.empty((n * l * c + 1) * h, dtype=self.dtype, device=self.device)
                      for _ in range(2)]
        self._bufs = [self.transport.allocate((n, l, c, h), self.dtype, self.device)
                      for _ in range(2)]

    def experts_of(self, weight):
        """This rank's rows of an ``[E, ...]`` expert weight."""
        return local_slice(weight, self.rank, self.local_experts)

    def check_capacity(self, capacity: int, num_tokens: int) -> None:
        """ValueError, before anything launches, unless ``num_tokens <= capacity <= max``."""
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"ep_capacity must be an int >= 1, got {capacity!r}")
        if capacity > self.max_capacity:
            raise ValueError(f"ep_capacity {capacity} exceeds the dispatcher's max_capacity "
                             f"{self.max_capacity} (the largest batch it was sized for)")
        if num_tokens > capacity:
            raise ValueError(f"a micro-batch of {num_tokens} tokens exceeds ep_capacity "
                             f"{capacity}")

    # -- stream plumbing --
    def _fork(self):
        if self.comm_stream is None:
            return None
        self.comm_stream.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self.comm_stream)

    def _join(self, handle: EPHandle) -> None:
        if handle.event is not None:
            torch.cuda.current_stream(self.device).wait_event(handle.event)

    def _record(self) -> Optional[torch.cuda.Event]:
        if self.comm_stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.comm_stream)
        return event

    def _traced(self, fn, label: str, micro_batch: int):
        """Run ``fn`` on the communication stream (current), bracketed by timing events if
        tracing."""
        if self.trace is None:
            return fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(self.comm_stream)
        result = fn()
        end.record(self.comm_stream)
        self.trace.append((label, micro_batch, start, end))
        return result

    def _on_comm(self, fn, label: str = "", micro_batch: int = 0):
        context = self._fork()
        if context is None:
            return fn(), None
        with context:
            result = self._traced(fn, label, micro_batch)
        return result, self._record()

    @staticmethod
    def pack(send, rows, hidden, topk_ids, capacity) -> None:
        """Fill this micro-batch's send buffer (``fill_send_buffer``)."""
        fill_send_buffer(rows, hidden, topk_ids, capacity)

    # -- the four operations --
    def dispatch_launch(self, hidden, topk_weights, topk_ids, *, micro_batch: int,
                        capacity: int) -> EPHandle:
        # before the buffer is touched: past max_capacity the views do not exist, and a token
        # t >= capacity would land in the next expert's slot ((e + 1)*C + t - C)
        self.check_capacity(capacity, topk_ids.shape[0])
        n, l, h = self.world_size, self.local_experts, self.hidden_size
        send, rows = send_views(self._send[micro_batch], (n, l, capacity, h))
        self.pack(send, rows, hidden, topk_ids, capacity)  # on the compute stream
        bufs = self._bufs[micro_batch]
        work, event = self._on_comm(
            lambda: self.transport.start_dispatch(send, bufs, capacity), "dispatch",
            micro_batch)
        return EPHandle(micro_batch, capacity, topk_weights, topk_ids, work, event,
                        keep=(send,))

    def dispatch_wait(self, handle: EPHandle) -> EPHandle:
        c = handle.capacity
        send = handle.keep[0]
        bufs = self._bufs[handle.micro_batch]
        if self.comm_stream is None:
            handle.recv = self.transport.finish_dispatch(handle.work, send, bufs, c)
        else:
            # the permute (all_to_all) belongs to the communication stream
            with torch.cuda.stream(self.comm_stream):
                handle.recv = self._traced(
                    lambda: self.transport.finish_dispatch(handle.work, send, bufs, c),
                    "dispatch (layout)", handle.micro_batch)
            handle.event = self._record()
            self._join(handle)
        return handle

    def experts(self, handle: EPHandle, gate, up, down) -> torch.Tensor:
        """The local experts over the received row blocks: ``[L, N*C, H]``."""
        return expert_swiglu(handle.recv, gate, up, down)

    def combine_launch(self, expert_out: torch.Tensor, handle: EPHandle) -> EPHandle:
        bufs = self._bufs[handle.micro_batch]
        work, event = self._on_comm(
            lambda: self.transport.start_combine(expert_out, bufs, handle.capacity), "combine",
            handle.micro_batch)
        return dataclasses.replace(handle, work=work, event=event, recv=None,
                                   keep=(expert_out,))

    def combine_wait(self, handle: EPHandle) -> torch.Tensor:
        """``[T, H]`` float32: each token's weighted sum over its experts' outputs."""
        n, l, h = self.world_size, self.local_experts, self.hidden_size
        bufs = self._bufs[handle.micro_batch]
        shape = (n, l, handle.capacity, h)
        if self.comm_stream is None:
            back = self.transport.finish_combine(handle.work, bufs, shape)
        else:
            with torch.cuda.stream(self.comm_stream):
                back = self.transport.finish_combine(handle.work, bufs, shape)
            handle.event = self._record()
            self._join(handle)
        return combine_from_back(back, handle.topk_weights, handle.topk_ids)


# --- agreeing on a step ----------------------------------------------------------------------


def micro_batch_rows(batch) -> int:
    """The token rows of the batch's largest micro-batch: a child's under TBO, else the
    batch's own (0 for an empty batch): what one exchange of this rank must fit."""
    if is_empty(batch):
        return 0
    if batch.tbo_children is None:
        return batch.num_tokens
    return max(end - start for start, end in (c.tbo_parent_token_range
                                              for c in batch.tbo_children))

_STRATEGY_CODES = {"prefill": 1, "decode": 2}


def agree_ep_step(batch, *, micro_batches: int, group=None) -> EPStep:
    """The ``EPStep`` of this forward, agreed by one small all-reduce over ``group``.

    Every rank passes its own batch (already split by the preparer when ``micro_batches`` is
    2; the decision to overlap is the caller's and must be the same on all ranks, as
    ``two_batch_overlap.compute_dp_tbo_decision`` makes it). The capacity is the largest
    micro-batch over all ranks; the layout is that of the busy ranks' mode, which must be one
    (an idle rank follows it). Every rank sees the same reduced numbers, so a disagreement
    raises the same ValueError on all of them instead of leaving some waiting.
    """
    rows = max(1, micro_batch_rows(batch))
    if is_empty(batch):  # no layout of its own: it follows the busy ranks'
        code_max, code_min = 0, 3
    else:
        code_max = code_min = _STRATEGY_CODES[strategy_for(batch.forward_mode)]
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    local = torch.tensor([rows, code_max, -code_min], dtype=torch.int64, device=device)
    dist.all_reduce(local, op=dist.ReduceOp.MAX, group=group)
    rows, code_max, code_min = (int(x) for x in local.tolist())
    code_min = -code_min
    if code_max and code_min != code_max:
        raise ValueError("the ranks' batches run different layouts (prefill and decode) in "
                         "one step; expert parallelism needs one")
    strategy = {0: "decode", 1: "prefill", 2: "decode"}[code_max]
    return EPStep(rows, micro_batches, strategy)
