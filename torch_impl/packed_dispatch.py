"""The packed expert-parallel layout: only the real (token, expert) pairs are computed, and
only real rows need to move.

The layout is docs/model.md's "The packed layout"; the JAX twin is the packed half of
``reference/expert_parallel.py`` (``packed_slots`` .. ``combine_packed``), and the buffers here
equal the spec's bit for bit on every real row (``parity_tests/test_packed_dispatch.py``).
``N`` ranks, ``L`` local experts per rank, ``C`` token rows per rank (the step's capacity),
``K`` top-k, ``M = min(K, L)``, ``S = C*M`` rows per destination region, ``H`` hidden:

    send    [N, S, H]   on the source: destination r's region holds r's local experts' rows,
                        expert after expert, each in token order, packed at the front
    counts  [N, L]      int32, rows per (destination, local expert), sent with the rows
    recv    [N*S, H]    on the expert's rank: every real row once, expert-major, then by
                        source rank, then by source token; group_ends [L] int32 end the groups
    out     [N*S, H]    a grouped GEMM over exactly the real rows (``grouped_swiglu``)
    back    [N, S, H]   on the source again: pair (t, k)'s output where it sent the pair

Every shape is fixed by ``(N, L, C, K, H)`` and every index is computed on the device with
scans (cumsums), never sorts and never host reads, so a step with the ``all_to_all`` transport
captures in a CUDA graph. The ``exact`` transport moves only the real rows: it exchanges the
counts first and reads them on the host (one sync per step, as DeepEP's normal mode does), so
it is for eager steps (prefill) and refuses graph capture.

Compared with the capacity layout (``torch_impl/expert_parallel.py``), the experts compute
``real pairs`` rows instead of ``L*N*C`` (``E/K`` times fewer when routing is balanced), and
the buffers are ``N*S = N*C*min(K, L)`` rows instead of ``N*L*C`` (``L/K`` times smaller when
``L > K``: 16x for DeepSeek-V3's 256 experts on 2 ranks).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tbo_parity.torch_impl import packed_kernels
from tbo_parity.torch_impl.expert_parallel import EPHandle, ExpertParallelDispatcher, expert_swiglu
from tbo_parity.torch_impl.moe import float32_operand


def region_rows(capacity: int, top_k: int, local_experts: int) -> int:
    """``S = C * min(K, L)``: a token sends at most ``min(K, L)`` pairs to one rank."""
    return capacity * min(top_k, local_experts)


def _exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.cumsum(x, dim=dim) - x


# --- the sender ------------------------------------------------------------------------------


def packed_slots(topk_ids: torch.Tensor, num_ranks: int, num_experts: int) -> tuple:
    """``(dest, slot, counts)``: pair ``(t, k)`` goes to rank ``dest[t, k]``, row
    ``slot[t, k]`` of its region (both ``[T, K]`` int64, -1 for id -1), ``counts [N, L]``
    int32. The slot is the expert's first row in the region (after the lower local experts'
    rows) plus the number of earlier tokens that picked the same expert: one cumsum over
    tokens, no sort."""
    local = num_experts // num_ranks
    valid = topk_ids >= 0
    safe = torch.where(valid, topk_ids, 0)
    # expert-major [E, T], so that the scan over tokens runs along the contiguous axis (a
    # scan over the outer axis of [T, E] has only E columns to spread: 0.36 ms at T = 4096
    # on an H200, benchmarks/probes/p18_prefill_profile.py)
    chosen = torch.zeros(num_experts, topk_ids.shape[0], dtype=torch.int32,
                         device=topk_ids.device)
    chosen.scatter_add_(0, safe.t(), valid.t().to(torch.int32))  # padding pairs add 0
    earlier = _exclusive_cumsum(chosen, 1)  # [E, T]: earlier tokens that picked e
    counts = chosen.sum(1, dtype=torch.int32).view(num_ranks, local)  # [N, L]
    start = _exclusive_cumsum(counts, 1).view(num_experts)  # [E]: e's first row in its region
    slot = start[safe] + earlier.t().gather(1, safe)
    return (torch.where(valid, safe // local, -1), torch.where(valid, slot, -1), counts)


def fill_packed_send(rows: torch.Tensor, hidden: torch.Tensor, dest: torch.Tensor,
                     slot: torch.Tensor, region: int) -> None:
    """``rows [N*S + 1, H]`` (the send buffer flattened, plus one scratch row) <- each pair's
    token at ``dest*S + slot``; padding pairs go to the scratch row. Rows no pair writes keep
    what they held: nobody reads past a region's counts."""
    scratch = rows.shape[0] - 1
    index = torch.where(dest < 0, scratch, dest * region + slot)  # [T, K]
    rows.index_put_((index,), hidden[:, None])  # [T, 1, H] broadcast over k, no [T*K, H] copy


# --- the receiver ----------------------------------------------------------------------------


def packed_receive_map(recv_counts: torch.Tensor, region: int) -> tuple:
    """``(row_of [N, S] int64, group_ends [L] int32)`` from ``recv_counts [N(source), L]``:
    source ``s``'s received row ``i`` belongs at ``recv[row_of[s, i]]`` (-1: not a real row);
    local expert ``l``'s rows end at ``group_ends[l]``. As ``reference.expert_parallel.
    packed_receive_map``: expert ``l``'s rows come after the lower experts' rows and after the
    lower sources' rows of ``l``."""
    counts = recv_counts.to(torch.int64)
    n, local = counts.shape
    totals = counts.sum(0)  # [L]
    group_ends = torch.cumsum(totals, 0)
    region_end = torch.cumsum(counts, 1)  # [N, L]
    i = torch.arange(region, device=counts.device)
    expert = (i[None, :, None] >= region_end[:, None, :]).sum(2)  # [N, S]: l of row i
    valid = expert < local
    l_safe = expert.clamp(max=local - 1)
    base = (group_ends - totals)[l_safe]  # [N, S]
    before = _exclusive_cumsum(counts, 0).gather(1, l_safe)
    first = (region_end - counts).gather(1, l_safe)
    row_of = torch.where(valid, base + before + i[None] - first, -1)
    return row_of, group_ends.to(torch.int32)


def fill_packed_recv(recv_rows: torch.Tensor, received: torch.Tensor,
                     row_of: torch.Tensor) -> None:
    """``recv_rows[:N*S]`` (of ``[J, H]``, ``J >= N*S``) <- every real row of ``received [N, S, H]``
    at ``row_of``. A gather, not a scatter: each recv row looks up the received row that lands
    on it (an int64 scatter of ``N*S`` indices first), so the wide copy runs as a vectorised
    gather, about twice the bandwidth of an indexed put of the rows on an H200. Rows past the
    last group end get received row 0: the grouped GEMM does not read them."""
    n, s, hidden = received.shape
    rows = n * s
    landing = torch.where(row_of < 0, rows, row_of).view(-1)  # the scratch index for non-rows
    source = torch.zeros(rows + 1, dtype=torch.int64, device=received.device)
    source.scatter_(0, landing, torch.arange(rows, device=received.device))
    torch.index_select(received.reshape(rows, hidden), 0, source[:rows],
                       out=recv_rows[:rows])


# --- the experts on the real rows ------------------------------------------------------------


def grouped_gemm_available(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs its own kernel here: bf16 on an sm90+ GPU, with the
    row lengths its kernel needs (16-byte multiples). Anywhere else torch falls back to a
    path that reads the group ends on the host, which breaks graph capture, so it is never
    called there."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(x.device) >= (9, 0)
            and all(w.dtype == torch.bfloat16 and w.shape[-1] % 8 == 0 and w.shape[-2] % 8 == 0
                    for w in weights))


# Rows of one M tile of the grouped GEMM. An expert's group costs at least one tile, so when
# no expert can receive more rows than a tile (``per_expert <= TILE_ROWS``) the expert-padded
# batched matmul computes no more rows than the grouped GEMM's tiles do, and streams the
# weights faster at these sizes (measured on an H200: docs/gpu-results.md). It is also about
# where an H200 turns from bandwidth- to compute-bound (bf16: ~700 TFLOPS over ~4.3 TB/s).
TILE_ROWS = 128


def uses_grouped_gemm(recv: torch.Tensor, per_expert: int, *weights: torch.Tensor) -> bool:
    """Whether ``grouped_swiglu`` runs the grouped GEMM: where it is available and an expert
    may receive more than one tile of rows. A static choice (shapes only), so a captured
    graph's path never depends on the step's counts."""
    return per_expert > TILE_ROWS and grouped_gemm_available(recv, *weights)


def _grouped_mm(x, weight, group_ends):
    return torch._grouped_mm(x, weight, offs=group_ends)


def padded_expert_rows(group_ends: torch.Tensor, rows: int, per_expert: int) -> torch.Tensor:
    """``[J]`` int64: row ``j`` of ``recv`` at row ``l*per_expert + (j - start_l)`` of an
    ``[L, per_expert]`` expert-padded block (``per_expert`` rows per expert), or
    ``L*per_expert`` (a scratch row) past the last group end."""
    ends = group_ends.to(torch.int64)
    j = torch.arange(rows, device=ends.device)
    expert = torch.searchsorted(ends, j, right=True)  # [J]: l with ends[l-1] <= j < ends[l]
    valid = expert < ends.shape[0]
    l_safe = expert.clamp(max=ends.shape[0] - 1)
    starts = ends - torch.diff(ends, prepend=ends.new_zeros(1))
    return torch.where(valid, l_safe * per_expert + j - starts[l_safe],
                       ends.shape[0] * per_expert)


def grouped_swiglu(recv: torch.Tensor, group_ends: torch.Tensor, gate: torch.Tensor,
                   up: torch.Tensor, down: torch.Tensor, *, per_expert: int) -> torch.Tensor:
    """``out [J, H]``: row ``j`` of ``recv [J, H]`` through the SwiGLU of the local expert
    whose group holds it (``group_ends [L]`` int32, device-side; ``gate, up [L, H, I]``,
    ``down [L, I, H]``). Rows past the last group end are left undefined (zero on the grouped
    GEMM path); nobody reads them. The activation runs in float32 and is rounded once, as in
    ``expert_swiglu``.

    On an sm90+ GPU in bf16, when an expert may receive more than ``TILE_ROWS`` rows: three
    grouped GEMMs over the real rows only (waste: tile rounding). Otherwise (a small step; a
    CPU, float32, older GPUs) the same semantics through a batched matmul over an
    expert-padded block of ``per_expert`` rows per expert (at most ``N*C``): no host reads,
    so it captures too; it computes ``L*per_expert`` rows, no more than one tile per expert in a
    small step (``uses_grouped_gemm``)."""
    if uses_grouped_gemm(recv, per_expert, gate, up, down):
        g = _grouped_mm(recv, gate, group_ends).float()
        u = float32_operand(_grouped_mm(recv, up, group_ends))
        return _grouped_mm((F.silu(g) * u).to(recv.dtype), down, group_ends)
    local, hidden = gate.shape[0], recv.shape[1]
    where = padded_expert_rows(group_ends, recv.shape[0], per_expert)
    padded = recv.new_zeros(local * per_expert + 1, hidden)
    padded.index_put_((where,), recv)
    out = expert_swiglu(padded[:-1].view(local, per_expert, hidden), gate, up, down)
    return out.view(-1, hidden)[where.clamp(max=local * per_expert - 1)]


# --- the return path and the combine ---------------------------------------------------------


def return_rows(out: torch.Tensor, row_of: torch.Tensor) -> torch.Tensor:
    """``[N, S, H]``: ``out[row_of[s, i]]`` back at ``[s, i]``, the slot the row came from;
    slots without a real row get row 0's output (nobody reads them)."""
    return out[row_of.clamp(min=0)]


def combine_packed(back: torch.Tensor, topk_weights: torch.Tensor, dest: torch.Tensor,
                   slot: torch.Tensor) -> torch.Tensor:
    """``[T, H]`` float32: ``sum_k w[t, k] * back[dest[t, k], slot[t, k]]``, summed over k
    as ``combine_from_back`` sums; padding pairs read row 0 with weight 0."""
    n, region, hidden = back.shape
    valid = dest >= 0
    rows = torch.where(valid, dest * region + slot, 0)  # [T, K]
    picked = back.reshape(n * region, hidden)[rows]  # [T, K, H]
    weights = topk_weights.masked_fill(~valid, 0)
    return (float32_operand(picked) * weights[:, :, None]).sum(dim=1)


# --- transports ------------------------------------------------------------------------------


class PackedAllToAll:
    """The packed regions with ``all_to_all_single`` over ``group`` (NCCL on GPUs, gloo on
    CPUs): every region travels whole (``S`` rows per peer, fixed sizes), so it captures in a
    CUDA graph. Bytes per exchange: ``N*S*H`` elements, ``L/min(K, L)`` times fewer than the
    capacity layout's ``N*L*C*H``."""

    name = "all_to_all"

    def __init__(self, group=None):
        self.group = group

    def _exchange(self, output, source):
        asynchronous = source.device.type != "cuda"
        work = dist.all_to_all_single(output, source, group=self.group, async_op=asynchronous)
        return [work] if asynchronous else []

    def start_dispatch(self, send, counts, received, recv_counts, rows):
        del rows  # every region travels whole
        return self._exchange(recv_counts, counts) + self._exchange(received, send)

    def start_combine(self, ret, back, splits):
        del splits
        return self._exchange(back, ret)

    @staticmethod
    def finish(works) -> None:
        for work in works:
            work.wait()


class PackedExact:
    """Only the real rows move: the counts are exchanged first and read on the host (one sync
    per step), then ``all_to_all`` sends each peer the real rows of its region alone and the
    combine sends them back the same way. For eager steps on any link (prefill); it cannot be
    captured in a CUDA graph, and refuses to be."""

    name = "exact"

    def __init__(self, group=None):
        self.group = group

    def start_dispatch(self, send, counts, received, recv_counts, rows):
        if send.is_cuda and torch.cuda.is_current_stream_capturing():
            raise ValueError("transport 'exact' reads the counts on the host and cannot be "
                             "captured in a CUDA graph; use transport 'all_to_all'")
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        rows["send"] = counts.sum(1).tolist()  # rows per destination
        rows["recv"] = recv_counts.sum(1).tolist()  # rows per source
        return self._exchange(received, send, rows["recv"], rows["send"])

    def _exchange(self, output, source, out_rows, in_rows):
        """Each peer's real rows, ``source[r, :in_rows[r]]``, to ``output[s, :out_rows[s]]``:
        one ``all_to_all_single`` with split sizes over the real rows laid end to end (gloo's
        list ``all_to_all`` needs equal sizes), a copy of the real rows on each side."""
        staged = torch.cat([source[r, :n] for r, n in enumerate(in_rows)])
        landed = staged.new_empty(sum(out_rows), staged.shape[1])
        dist.all_to_all_single(landed, staged, output_split_sizes=out_rows,
                               input_split_sizes=in_rows, group=self.group)
        for s, piece in enumerate(landed.split(out_rows)):
            output[s, :out_rows[s]].copy_(piece)
        return []

    def start_combine(self, ret, back, splits):
        return self._exchange(back, ret, splits["send"], splits["recv"])

    finish = staticmethod(PackedAllToAll.finish)


PACKED_TRANSPORTS = {"all_to_all": PackedAllToAll, "exact": PackedExact}
PACKED_TRANSPORT_METHODS = ("start_dispatch", "start_combine", "finish")


# --- the dispatcher --------------------------------------------------------------------------


class PackedDispatcher(ExpertParallelDispatcher):
    """``ExpertParallelDispatcher``'s four operations in the packed layout (same interface,
    same streams, same capacity rules; ``top_k`` sizes the regions).

    Dispatch launch (compute stream): the slots and the send buffer. On the communication
    stream: the counts and the rows travel; the dispatch wait builds the receive map and the
    expert-major ``recv``. The experts (compute stream): ``grouped_swiglu`` over the real rows.
    Combine launch (communication stream): each row back to its slot, and the exchange; the
    combine wait (compute stream) sums each token's pairs."""

    layout = "packed"
    TRANSPORTS = PACKED_TRANSPORTS
    TRANSPORT_METHODS = PACKED_TRANSPORT_METHODS

    def __init__(self, num_experts: int, *, top_k: int, **kwargs):
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}], "
                             f"got {top_k!r}")
        self.top_k = top_k
        super().__init__(num_experts, **kwargs)

    def region_rows(self, capacity: int) -> int:
        return region_rows(capacity, self.top_k, self.local_experts)

    def _allocate(self) -> None:
        n, l, h = self.world_size, self.local_experts, self.hidden_size
        rows = n * self.region_rows(self.max_capacity)

        def empty(*shape, dtype=self.dtype):
            return torch.empty(shape, dtype=dtype, device=self.device)

        self._send = [empty(rows + 1, h) for _ in range(2)]
        self._bufs = [{"counts": empty(n, l, dtype=torch.int32),
                       "recv_counts": empty(n, l, dtype=torch.int32),
                       "received": empty(rows, h), "recv": empty(rows + 1, h),
                       "back": empty(rows, h), "rows": {}} for _ in range(2)]

    def _views(self, micro_batch: int, capacity: int) -> tuple:
        """This step's ``(send, received, back)`` as ``[N, S, H]`` views, and the bufs."""
        n, h, s = self.world_size, self.hidden_size, self.region_rows(capacity)
        bufs = self._bufs[micro_batch]
        return tuple(b[:n * s].view(n, s, h) for b in (self._send[micro_batch],
                                                         bufs["received"], bufs["back"])) + (
            bufs,)

    @staticmethod
    def pack(rows, counts_out, hidden, topk_ids, num_ranks, num_experts, region) -> tuple:
        """The slots, the counts (into ``counts_out``) and the send buffer; ``(dest, slot)``."""
        # the same values from three Triton kernels on a GPU, from the torch passes elsewhere
        slots = packed_kernels.packed_slots if packed_kernels.available(topk_ids) \
            else packed_slots
        dest, slot, counts = slots(topk_ids, num_ranks, num_experts)
        counts_out.copy_(counts)
        fill_packed_send(rows, hidden, dest, slot, region)
        return dest, slot

    def dispatch_launch(self, hidden, topk_weights, topk_ids, *, micro_batch: int,
                        capacity: int) -> EPHandle:
        self.check_capacity(capacity, topk_ids.shape[0])
        send, received, _, bufs = self._views(micro_batch, capacity)
        region = send.shape[1]
        rows = self._send[micro_batch][:send.shape[0] * region + 1]
        dest, slot = self.pack(rows, bufs["counts"], hidden, topk_ids, self.world_size,
                               self.num_experts, region)  # on the compute stream
        work, event = self._on_comm(
            lambda: self.transport.start_dispatch(send, bufs["counts"], received,
                                                  bufs["recv_counts"], bufs["rows"]),
            "dispatch", micro_batch)
        return EPHandle(micro_batch, capacity, topk_weights, topk_ids, work, event,
                        keep=(send,), dest=dest, slot=slot)

    def _receive(self, handle: EPHandle, received, bufs) -> None:
        self.transport.finish(handle.work)
        receive_map = packed_kernels.packed_receive_map \
            if packed_kernels.available(received) else packed_receive_map
        handle.row_of, handle.group_ends = receive_map(bufs["recv_counts"], received.shape[1])
        fill_packed_recv(bufs["recv"], received, handle.row_of)
        # the step's N*S rows, not the buffer's (sized for max_capacity): the experts' work
        # and its index passes scale with the step
        handle.recv = bufs["recv"][:received.shape[0] * received.shape[1]]

    def dispatch_wait(self, handle: EPHandle) -> EPHandle:
        _, received, _, bufs = self._views(handle.micro_batch, handle.capacity)
        if self.comm_stream is None:
            self._receive(handle, received, bufs)
        else:  # the receive map and the packing belong to the communication stream
            with torch.cuda.stream(self.comm_stream):
                self._traced(lambda: self._receive(handle, received, bufs),
                             "dispatch (layout)", handle.micro_batch)
            handle.event = self._record()
            self._join(handle)
        return handle

    def experts(self, handle: EPHandle, gate, up, down) -> torch.Tensor:
        """The local experts over the real received rows: ``[N*S, H]``."""
        return grouped_swiglu(handle.recv, handle.group_ends, gate, up, down,
                              per_expert=self.world_size * handle.capacity)

    def combine_launch(self, expert_out: torch.Tensor, handle: EPHandle) -> EPHandle:
        _, _, back, bufs = self._views(handle.micro_batch, handle.capacity)
        row_of = handle.row_of
        work, event = self._on_comm(
            lambda: self.transport.start_combine(return_rows(expert_out, row_of), back,
                                                 bufs["rows"]),
            "combine", handle.micro_batch)
        return dataclasses.replace(handle, work=work, event=event, recv=None,
                                   keep=(expert_out,))

    def combine_wait(self, handle: EPHandle) -> torch.Tensor:
        """``[T, H]`` float32: each token's weighted sum over its experts' outputs."""
        _, _, back, _ = self._views(handle.micro_batch, handle.capacity)
        if self.comm_stream is None:
            self.transport.finish(handle.work)
        else:
            with torch.cuda.stream(self.comm_stream):
                self.transport.finish(handle.work)
            handle.event = self._record()
            self._join(handle)
        return combine_packed(back, handle.topk_weights, handle.dest, handle.slot)


DISPATCHERS = {"packed": PackedDispatcher, "capacity": ExpertParallelDispatcher}


def make_dispatcher(num_experts: int, *, layout: str = "packed", top_k: int, **kwargs):
    """The expert-parallel dispatcher of ``layout`` (``"packed"``, the default, or
    ``"capacity"``, the baseline); ``kwargs`` as ``ExpertParallelDispatcher`` takes them."""
    if not (isinstance(layout, str) and layout in DISPATCHERS):
        raise ValueError(f"layout must be one of {sorted(DISPATCHERS)}, got {layout!r}")
    if layout == "packed":
        return PackedDispatcher(num_experts, top_k=top_k, **kwargs)
    return ExpertParallelDispatcher(num_experts, **kwargs)
