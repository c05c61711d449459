"""Does two-batch overlap hide the expert-parallel exchange? Measured on N GPUs of one host,
over two links.

    PYTHONPATH=. python3 benchmarks/overlap.py --nproc=2 [--out_dir=docs] [--commit=SHA]
        [--links=nvlink,network] [--context=2048] [--long_context=8192]
        [--long_context_tokens=256] [--tokens=32,64,128,256,512,1024] [--attention=sdpa]
        [--prefill_tokens=1024,4096,16384] [--prefill_seq_len=1024] [--layers=4]
        [--layouts=packed,capacity] [--experts_per_rank=8] [--routing=top_k]
        [--transports=all_to_all,copy_engine,exact] [--knobs] [--emulated_link_us=100,250]
        [--timeline_tokens=256] [--timeline_link=network]

The model is a slice of a DeepSeek-V3 MoE decoder, in bfloat16: hidden 7168, top-8 routing over
``--experts_per_rank * N`` experts (8 per rank by default; 128 is DeepSeek-V3's 256 on 2
ranks; ``--routing=group_limited`` is its group-limited routing), expert intermediate size
2048, one shared expert, attention of
8 heads of 128 (``--attention=sdpa``: ``SdpaAttnBackend``, which holds real contexts) and
``--layers`` layers. Every rank decodes its own batch of ``T`` sequences of ``--context``
cached tokens each (data-parallel attention, expert-parallel MoE), captured in CUDA graphs by
``CudaGraphRunner``.

The links (``--links``), one launch of the ranks each, since NCCL reads its settings at start:

- ``nvlink``: the GPUs' own NVLink (NCCL over peer-to-peer access; copy engines over
  symmetric memory);
- ``network``: NCCL with ``NCCL_P2P_DISABLE=1``, so every exchange goes through host memory.
  That is a real link, of the class of one 400 Gb/s NIC per GPU, where SGLang measured its
  gains; each run measures its bandwidth (``link_bandwidth``) beside NVLink's. Only
  ``all_to_all`` runs there (symmetric memory needs peer access).

Per link, context, transport and ``T`` (tokens per rank) it measures, as the median over
``--repeats`` timed blocks of ``--iters`` graph replays each (CUDA events on the replay
stream; ranks start each block together after a barrier):

- ``compute_ms``: the TBO step with a transport that moves nothing (same shapes, same kernels,
  no communication): what the overlap cannot go below;
- ``comm_ms``: only the step's exchanges (both micro-batches' dispatch and combine in every
  layer, with their packing), captured as one graph;
- ``plain_ms``: the step without TBO; ``tbo_ms``: with TBO;
- ``hidden_fraction`` = ``(compute_ms + comm_ms - tbo_ms) / min(compute_ms, comm_ms)``: how much
  of the shorter of the two the overlapped step hides (1 = all of it);
- ``limit_ratio`` = ``tbo_ms / max(compute_ms, comm_ms)`` (1.00 is the physical limit);
- ``speedup`` = ``plain_ms / tbo_ms``.

Every measurement runs for each of ``--layouts`` in the same launch, side by side: ``packed``
(the default: the experts compute only the real (token, expert) pairs) and ``capacity`` (the
old baseline: every local expert computes all ``N*C`` rows of its block); a table gives the
packed layout's times over the capacity layout's. The routed experts of one layer are also
timed alone (``expert_rows``): real pairs, rows computed, bytes per exchange, TFLOPS on the
real rows and on the rows computed, and the expert weights' read bandwidth against the card's
copy bandwidth (``copy_bandwidth``).

Also: prefill steps (EXTEND, ``--prefill_tokens`` per rank in fresh sequences of
``--prefill_seq_len`` tokens, eager: graphs are for decode), plain vs TBO, with the silent
transport (``none``: compute only) and each transport; a check that the TBO logits are bit
for bit the same for every transport on every link (SHA-256 digests across the launches); the
crossover (the smallest ``T`` from which TBO wins at every larger measured ``T``); the
targets of the issue, each met or missed; one eager TBO decode step recorded with CUDA events
on both streams (``timeline.json``; ``tbo-parity timeline`` draws it); and, on
``--timeline_link``, one TBO decode step *replayed as a CUDA graph* under ``torch.profiler``
(``timeline-graph.json``: kernel timestamps per stream, see ``record_graph_timeline``).

Labelled extras, off by default: ``--knobs`` sweeps NCCL's SM trade (``max_ctas``, cuBLAS SM
carve-out); ``--emulated_link_us`` adds a spin after every copy-engine send (the old
emulation of a slow link, never a replacement for the network link's real numbers).

Writes ``overlap-benchmark.json`` and ``overlap-benchmark.md`` to ``--out_dir``. Timings are
never asserted anywhere.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import sys
import time

HIDDEN, INTERMEDIATE, TOP_K, EXPERTS_PER_RANK = 7168, 2048, 8, 8
GROUPS, TOPK_GROUP, ROUTED_SCALE = 8, 4, 2.5  # DeepSeek-V3's group-limited routing
HEADS, HEAD_DIM, VOCAB = 8, 128, 1024
# The links a benchmark run can measure, and the environment each one's ranks start with.
# "network": NCCL with peer-to-peer access off, so every byte crosses host memory through
# NCCL's shared-memory transport: one link per GPU of the class of a 400 Gb/s NIC (measured
# beside NVLink in the same run). Symmetric memory needs peer access, so only all_to_all
# runs there.
LINKS = {"nvlink": {}, "network": {"NCCL_P2P_DISABLE": "1"}}
LINK_TRANSPORTS = {"nvlink": ("all_to_all", "copy_engine", "exact"),
                   "network": ("all_to_all", "exact")}
# The transports of each layout, for decode (CUDA graphs) and prefill (eager). The packed
# layout's "exact" moves only real rows but reads the counts on the host: eager only.
LAYOUT_TRANSPORTS = {("packed", "decode"): ("all_to_all",),
                     ("packed", "prefill"): ("all_to_all", "exact"),
                     ("capacity", "decode"): ("all_to_all", "copy_engine"),
                     ("capacity", "prefill"): ("all_to_all", "copy_engine")}


def transports_of(F, layout: str, kind: str) -> list:
    """The transports measured for ``layout`` in ``kind`` (decode or prefill) on this link."""
    return [t for t in F.transports
            if t in LAYOUT_TRANSPORTS[(layout, kind)] and t in LINK_TRANSPORTS[F.link]]


def _flags():
    from absl import flags

    F = flags.FlagValues()
    flags.DEFINE_integer("nproc", 2, "ranks (GPUs) to launch", lower_bound=1, flag_values=F)
    flags.DEFINE_string("out_dir", "docs", "where the JSON and Markdown go", flag_values=F)
    flags.DEFINE_string("commit", "unknown", "the commit measured (for the record)",
                        flag_values=F)
    flags.DEFINE_list("tokens", ["32", "64", "128", "256", "512", "1024"],
                      "decode tokens per rank", flag_values=F)
    flags.DEFINE_integer("context", 2048, "cached tokens per decoding sequence", lower_bound=2,
                         flag_values=F)
    flags.DEFINE_integer("long_context", 8192, "a second decode context, measured at "
                         "--long_context_tokens (0: skip)", lower_bound=0, flag_values=F)
    flags.DEFINE_list("long_context_tokens", ["256"], "tokens per rank at --long_context",
                      flag_values=F)
    flags.DEFINE_enum("attention", "sdpa", ["sdpa", "reference"], "attention backend: sdpa "
                      "(SdpaAttnBackend, real contexts) or reference (TorchAttnBackend)",
                      flag_values=F)
    flags.DEFINE_list("links", ["nvlink", "network"], f"links to measure, of {sorted(LINKS)}",
                      flag_values=F)
    flags.DEFINE_string("link", "nvlink", "the link of this rank (set by the launcher)",
                        flag_values=F)
    flags.DEFINE_enum("comm_priority", "high", ["high", "normal"], "priority of the "
                      "communication stream: high lets an exchange's kernels take SMs as soon "
                      "as compute blocks retire", flag_values=F)
    flags.DEFINE_list("prefill_tokens", ["1024", "4096", "16384"], "EXTEND tokens per rank "
                      "(empty: skip)", flag_values=F)
    flags.DEFINE_integer("prefill_seq_len", 1024, "tokens per prefill sequence",
                         lower_bound=1, flag_values=F)
    flags.DEFINE_list("emulated_link_us", [], "slow-link emulation, a labelled extra: delays "
                      "added to every exchange on the communication stream (empty: skip)",
                      flag_values=F)
    flags.DEFINE_integer("layers", 4, "decoder layers", lower_bound=1, flag_values=F)
    flags.DEFINE_list("layouts", ["packed", "capacity"], "expert-parallel layouts to measure "
                      "side by side: packed (the default) and capacity (the old baseline)",
                      flag_values=F)
    flags.DEFINE_integer("experts_per_rank", EXPERTS_PER_RANK, "routed experts per rank (8; "
                         "32; 128: DeepSeek-V3's 256 on 2 ranks)", lower_bound=1, flag_values=F)
    flags.DEFINE_enum("routing", "top_k", ["top_k", "group_limited"], "top_k over all experts, "
                      f"or DeepSeek-V3's group-limited routing ({GROUPS} groups, the best "
                      f"{TOPK_GROUP} kept, sigmoid scores)", flag_values=F)
    flags.DEFINE_list("transports", ["all_to_all", "copy_engine", "exact"], "transports to "
                      "measure where the layout has them (LAYOUT_TRANSPORTS)", flag_values=F)
    flags.DEFINE_bool("knobs", False, "sweep NCCL max_ctas and the cuBLAS SM carve-out",
                      flag_values=F)
    flags.DEFINE_integer("timeline_tokens", 256, "tokens per rank of the timeline step (0: "
                         "skip)", lower_bound=0, flag_values=F)
    flags.DEFINE_string("timeline_link", "network", "the link whose run records the replayed "
                        "timeline", flag_values=F)
    flags.DEFINE_string("timeline_transport", "all_to_all", "transport of the timeline step",
                        flag_values=F)
    flags.DEFINE_integer("iters", 10, "graph replays per timed block", lower_bound=1,
                         flag_values=F)
    flags.DEFINE_integer("repeats", 7, "timed blocks (the median is reported)", lower_bound=1,
                         flag_values=F)
    flags.DEFINE_bool("tiny", False, "a tiny model (CPU smoke test of the script itself)",
                      flag_values=F)
    flags.DEFINE_string("device", "cuda", "cuda, or cpu with --tiny", flag_values=F)
    flags.DEFINE_bool("timeline_only", False, "record the timeline step only", flag_values=F)
    return F


# --- the model ---------------------------------------------------------------------------------


def model_config(world_size: int, layers: int, tiny: bool, *,
                 experts_per_rank: int = EXPERTS_PER_RANK, routing: str = "top_k"):
    """The benchmark's model: ``experts_per_rank * world_size`` routed experts, top-8 (top-4
    over 4 per rank with ``tiny``); ``routing="group_limited"``: DeepSeek-V3's routing."""
    from tbo_parity.torch_impl.config import ModelConfig

    grouped = {} if routing == "top_k" else dict(
        routing=routing, scoring="sigmoid", n_group=GROUPS, topk_group=TOPK_GROUP,
        routed_scaling_factor=ROUTED_SCALE)
    if tiny:
        return ModelConfig(num_layers=layers, hidden_size=32, num_heads=2, head_dim=8,
                           num_experts=4 * world_size, top_k=4, num_shared_experts=1,
                           intermediate_size=16, vocab_size=64, **grouped)
    return ModelConfig(num_layers=layers, hidden_size=HIDDEN, num_heads=HEADS,
                       head_dim=HEAD_DIM, num_experts=experts_per_rank * world_size,
                       top_k=TOP_K, num_shared_experts=1, intermediate_size=INTERMEDIATE,
                       vocab_size=VOCAB, **grouped)


def build_model(cfg, dispatcher, *, device, dtype, seed: int = 0):
    """The model with random weights made on the device. Expert weights are drawn for this
    rank's experts only (a full ``[E, H, I]`` draw per layer would not fit the host's time);
    the constructor is given stride-0 placeholders of the full shape."""
    import torch

    from tbo_parity.torch_impl.config import CORRECTION_BIAS, weight_shapes
    from tbo_parity.torch_impl.model import MoEModel

    gen = torch.Generator(device=device).manual_seed(seed)

    def draw(shape, fan_in):
        return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
                / fan_in ** 0.5).to(dtype)

    weights = {}
    for name, shape in weight_shapes(cfg).items():
        if "experts_" in name and "shared" not in name:
            weights[name] = torch.zeros((1,) + shape[1:], dtype=dtype,
                                        device=device).expand(shape)
        elif name.endswith("norm"):
            weights[name] = torch.ones(shape, dtype=dtype, device=device)
        elif name.endswith(CORRECTION_BIAS):  # small, as a trained model's: it only nudges
            weights[name] = draw(shape, 100)
        else:
            weights[name] = draw(shape, shape[-2] if len(shape) > 1 else 1)
    model = MoEModel(cfg, weights, dtype=dtype, device=device, dispatcher=dispatcher)
    local = dispatcher.local_experts
    for layer in model.layers:
        for name in ("experts_gate", "experts_up", "experts_down"):
            shape = (local,) + tuple(getattr(layer, name).shape[1:])
            setattr(layer, name, torch.nn.Parameter(draw(shape, shape[1]),
                                                    requires_grad=False))
    return model


def use_dispatcher(model, dispatcher) -> None:
    """Point the model (and every layer) at another dispatcher; the weights stay."""
    model.dispatcher = dispatcher
    for layer in model.layers:
        layer.dispatcher = dispatcher


class SilentTransport:
    """Moves nothing: the same buffers and shapes as ``all_to_all``, no exchange and no
    permutes. A step with it costs exactly its compute (``compute_ms``)."""

    name = "none"

    def __init__(self, group=None):
        from tbo_parity.torch_impl.expert_parallel import AllToAllTransport

        self._shapes = AllToAllTransport(group)

    def allocate(self, shape, dtype, device):
        return self._shapes.allocate(shape, dtype, device)

    def start_dispatch(self, send, bufs, c):
        return None

    def finish_dispatch(self, work, send, bufs, c):
        from tbo_parity.torch_impl.expert_parallel import _view

        n, l, _, h = send.shape
        return _view(bufs["recv"], (l, n * c, h))

    def start_combine(self, out, bufs, c):
        return None

    def finish_combine(self, work, bufs, shape):
        from tbo_parity.torch_impl.expert_parallel import _view

        n, l, c, h = shape
        return _view(bufs["back"], (n * l, c, h))


class DelayedTransport:
    """Slow-link emulation: the wrapped transport, then a spin of ``cycles`` GPU clock cycles
    on the communication stream after every send (``torch.cuda._sleep``, one tiny kernel:
    capturable, and it occupies one SM, not the link). For the regime of a link slower than
    NVLink (across hosts); its numbers are labelled emulated and never replace the real ones."""

    def __init__(self, inner, cycles: int):
        self.inner, self.cycles, self.name = inner, cycles, inner.name + "+delay"

    def allocate(self, shape, dtype, device):
        return self.inner.allocate(shape, dtype, device)

    def _delay(self):
        import torch

        torch.cuda._sleep(self.cycles)

    def start_dispatch(self, send, bufs, c):
        work = self.inner.start_dispatch(send, bufs, c)
        self._delay()
        return work

    def finish_dispatch(self, work, send, bufs, c):
        return self.inner.finish_dispatch(work, send, bufs, c)

    def start_combine(self, out, bufs, c):
        work = self.inner.start_combine(out, bufs, c)
        self._delay()
        return work

    def finish_combine(self, work, bufs, shape):
        return self.inner.finish_combine(work, bufs, shape)


def sleep_cycles_per_us(device) -> float:
    """GPU clock cycles per microsecond of ``torch.cuda._sleep``, measured."""
    import torch

    cycles = 10_000_000
    torch.cuda._sleep(cycles)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / (start.elapsed_time(end) * 1e3)


class SilentPacked:
    """The packed layout's transport that moves nothing: the counts this rank sends to rank
    ``s`` stand in for those ``s`` would send it (the same load when routing is balanced), and
    the rows stay where they are. A step with it costs exactly its compute."""

    name = "none"

    def __init__(self, group=None):
        del group

    def start_dispatch(self, send, counts, received, recv_counts, rows):
        recv_counts.copy_(counts)
        return []

    def start_combine(self, ret, back, splits):
        return []

    @staticmethod
    def finish(works) -> None:
        del works


def make_dispatcher(cfg, transport: str, *, layout: str = "packed", max_capacity, device,
                    dtype, group=None, comm_stream=None):
    """A dispatcher of ``layout`` (the packed one by default) for ``transport``: a name, or
    "none" for the layout's transport that moves nothing."""
    from tbo_parity.torch_impl.packed_dispatch import make_dispatcher as make

    silent = {"packed": SilentPacked, "capacity": SilentTransport}[layout]
    return make(cfg.num_experts, layout=layout, top_k=cfg.top_k, hidden_size=cfg.hidden_size,
                max_capacity=max_capacity, dtype=dtype, device=device, group=group,
                comm_stream=comm_stream,
                transport=silent(group) if transport == "none" else transport)


# --- batches ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Serving:
    req_to_token: object  # [R + 1, context]: row R is the padding row
    pool: object  # KVPool with one extra slot (the padding slot)

    @property
    def padding_req_row(self):
        return self.req_to_token.shape[0] - 1

    @property
    def padding_slot(self):
        return self.pool.k.shape[1] - 1


def serving(cfg, num_requests: int, context: int, *, device, dtype, seed: int = 0) -> Serving:
    """Request ``r`` holds slots ``r*context .. (r+1)*context - 1``; the pools are random
    (seeded: every launch, on every link, starts from the same cache)."""
    import torch

    from tbo_parity.torch_impl.kv_cache import KVPool

    gen = torch.Generator(device=device).manual_seed(seed)

    slots = num_requests * context
    table = torch.arange(slots, device=device).view(num_requests, context)
    table = torch.cat([table, torch.full((1, context), slots, device=device)])
    shape = (cfg.num_layers, slots + 1, cfg.num_heads, cfg.head_dim)
    return Serving(table, KVPool(
        torch.randn(shape, device=device, dtype=dtype, generator=gen),
        torch.randn(shape, device=device, dtype=dtype, generator=gen)))


def decode_batch(cfg, srv: Serving, num_seqs: int, *, device, seed: int = 0):
    """``num_seqs`` sequences of ``context - 1`` cached tokens each (the table's width) decode
    one token."""
    import torch

    from tbo_parity.torch_impl.forward_batch import ForwardBatch
    from tbo_parity.torch_impl.forward_mode import ForwardMode

    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(num_seqs)
    context = srv.req_to_token.shape[1]
    pos = torch.full((num_seqs,), context - 1)
    seq_lens = pos + 1
    return ForwardBatch(
        forward_mode=ForwardMode.DECODE, batch_size=num_seqs,
        input_ids=torch.randint(0, cfg.vocab_size, (num_seqs,), generator=gen).to(device),
        positions=pos.to(device), out_cache_loc=srv.req_to_token[rows.to(device), context - 1],
        req_pool_indices=rows.to(device), seq_lens=seq_lens.to(device), seq_lens_cpu=seq_lens,
        num_token_non_padded=num_seqs, req_to_token=srv.req_to_token, kv_pool=srv.pool)


def extend_batch(cfg, srv: Serving, num_seqs: int, length: int, *, device, seed: int = 0):
    """``num_seqs`` fresh sequences of ``length`` tokens (no cached prefix)."""
    import torch

    from tbo_parity.torch_impl.forward_batch import ForwardBatch
    from tbo_parity.torch_impl.forward_mode import ForwardMode

    gen = torch.Generator().manual_seed(seed)
    n = num_seqs * length
    rows = torch.arange(num_seqs)
    lens = torch.full((num_seqs,), length)
    zeros = torch.zeros(num_seqs, dtype=torch.int64)
    positions = torch.arange(length).repeat(num_seqs)
    batch = ForwardBatch(
        forward_mode=ForwardMode.EXTEND, batch_size=num_seqs,
        input_ids=torch.randint(0, cfg.vocab_size, (n,), generator=gen).to(device),
        positions=positions.to(device),
        out_cache_loc=srv.req_to_token[:num_seqs, :length].reshape(-1),
        req_pool_indices=rows.to(device), seq_lens=lens.to(device), seq_lens_cpu=lens,
        num_token_non_padded=n, req_to_token=srv.req_to_token, kv_pool=srv.pool)
    batch.extend_seq_lens, batch.extend_seq_lens_cpu = lens.to(device), lens
    batch.extend_prefix_lens, batch.extend_prefix_lens_cpu = zeros.to(device), zeros
    batch.extend_start_loc = (torch.cumsum(lens, 0) - lens).to(device)
    batch.extend_num_tokens = n
    return batch


# --- timing ------------------------------------------------------------------------------------


def timed(fn, *, iters: int, repeats: int, device) -> float:
    """Median over ``repeats`` blocks of the mean ms per ``fn()`` call in a block of ``iters``
    calls; ranks start every block together (``fn`` holds collectives: they keep step)."""
    import torch
    import torch.distributed as dist

    for _ in range(2):
        fn()
    blocks = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            blocks.append(start.elapsed_time(end) / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            blocks.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(blocks)


def graph_of(fn, device):
    """``fn`` captured as a CUDA graph (after two warm-up runs); the replay callable. On a CPU,
    ``fn`` itself."""
    import torch

    if device.type != "cuda":
        return fn
    for _ in range(2):
        fn()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def exchanges_only(model, tokens: int, micro_batches: int, *, device, dtype, seed=0):
    """The step's exchanges without any compute: every layer's dispatch and combine for each
    micro-batch (``tokens / micro_batches`` rows each, random top-k routing)."""
    import torch

    cfg, d = model.cfg, model.dispatcher
    rows = tokens // micro_batches
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(rows, cfg.hidden_size, generator=gen, device=device).to(dtype)
    scores = torch.rand(rows, cfg.num_experts, generator=gen, device=device)
    ids = scores.topk(cfg.top_k, dim=-1).indices
    weights = torch.full((rows, cfg.top_k), 1.0 / cfg.top_k, device=device)

    def step():
        for _ in range(cfg.num_layers):
            for mb in range(micro_batches):
                handle = d.dispatch_wait(d.dispatch_launch(hidden, weights, ids,
                                                           micro_batch=mb, capacity=rows))
                d.combine_wait(d.combine_launch(handle.recv, handle))

    return step


# --- the worker --------------------------------------------------------------------------------


def attention_backend(name: str):
    """The attention backend class of ``--attention``."""
    from tbo_parity.torch_impl.attention import SdpaAttnBackend, TorchAttnBackend

    return {"sdpa": SdpaAttnBackend, "reference": TorchAttnBackend}[name]


def link_bandwidth(device, *, megabytes: int = 64, iters: int = 10) -> dict:
    """The link as the exchanges see it: ``all_to_all_single`` of ``megabytes`` per rank,
    eager, on this rank's process group; GB/s of what leaves each GPU (``(N-1)/N`` of it)."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    x = torch.ones(megabytes * 2**20 // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        dist.all_to_all_single(y, x)
    torch.cuda.synchronize(device)
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        dist.all_to_all_single(y, x)
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end) / iters
    leaving = x.numel() * x.element_size() * (world - 1) / world
    return {"megabytes_per_rank": megabytes, "ms": ms, "gb_per_s": leaving / (ms * 1e-3) / 1e9}


class DecodeSweep:
    """Decode steps in CUDA graphs at one context: for each tokens-per-rank ``T`` the TBO and
    plain steps with a transport that moves nothing (compute only), then per transport the
    exchanges alone, the plain step and the TBO step (see the module docstring)."""

    def __init__(self, F, cfg, model, *, device, dtype, comm_stream, max_tokens: int):
        self.F, self.cfg, self.model = F, cfg, model
        self.device, self.dtype, self.comm_stream = device, dtype, comm_stream
        self.max_tokens = max_tokens
        self.layout = F.layouts[0]  # the layout being measured (``sweep`` sets it)
        self.logits = {}  # (context, layout, transport, T, knob) -> the TBO step's logits
        self.knobs, self.emulated = [], []

    def _timed(self, fn) -> float:
        return timed(fn, iters=self.F.iters, repeats=self.F.repeats, device=self.device)

    def _use(self, transport: str, group=None) -> None:
        use_dispatcher(self.model, make_dispatcher(
            self.cfg, transport, layout=self.layout, max_capacity=self.max_tokens,
            device=self.device,
            dtype=self.dtype, group=group, comm_stream=self.comm_stream))

    def _runners(self, srv, context: int, sizes) -> dict:
        from tbo_parity.torch_impl.cuda_graph_runner import CudaGraphRunner

        return {tbo: CudaGraphRunner(
            self.model, srv.pool, srv.req_to_token, max_context_len=context,
            padding_slot=srv.padding_slot, padding_req_row=srv.padding_req_row,
            batch_sizes=sizes, tbo=tbo, make_attn_backend=attention_backend(self.F.attention))
            for tbo in (True, False)}

    def _replay(self, runner, srv, t):
        batch = decode_batch(self.cfg, srv, t, device=self.device, seed=t)
        key, _ = runner.prepare_replay(batch)
        return runner._graphs[key]

    def sweep(self, context: int, tokens: list, layout: str) -> list:
        """Rows for every ``T`` of ``tokens`` and every transport of ``layout``."""
        self.layout = layout
        transports = transports_of(self.F, layout, "decode")
        srv = serving(self.cfg, max(tokens), context, device=self.device, dtype=self.dtype)
        initial = srv.pool.clone()
        self._use("none")
        runners = self._runners(srv, context, tokens)
        silent = {t: (self._timed(self._replay(runners[True], srv, t)),
                      self._timed(self._replay(runners[False], srv, t))) for t in tokens}
        del runners
        rows = []
        for name in transports:
            self._use(name)
            runners = self._runners(srv, context, tokens)
            for t in tokens:
                row = self.row(name, runners, srv, initial, silent[t], t, context)
                rows.append(row)
            del runners
        self.extras(srv, initial, silent, context, tokens, transports)
        return rows

    def row(self, name, runners, srv, initial, silent, t, context, knob=None) -> dict:
        tbo_fn = self._replay(runners[True], srv, t)
        plain_fn = self._replay(runners[False], srv, t)
        tbo_ms, plain_ms = self._timed(tbo_fn), self._timed(plain_fn)
        comm = graph_of(exchanges_only(self.model, t, 2, device=self.device,
                                       dtype=self.dtype), self.device)
        comm_ms = self._timed(comm)
        compute_ms, compute_plain_ms = silent
        shorter, longer = min(compute_ms, comm_ms), max(compute_ms, comm_ms)
        runs = []
        for _ in range(2):  # twice from the same cache: is the step itself repeatable?
            srv.pool.k.copy_(initial.k)
            srv.pool.v.copy_(initial.v)
            runs.append(tbo_fn().logits.float().cpu())
        self.logits[(context, self.layout, name, t, knob)] = runs[0]
        return {"link": self.F.link, "context": context, "layout": self.layout,
                "transport": name, "tokens": t,
                "repeatable": bool((runs[0] == runs[1]).all()),
                "compute_ms": compute_ms, "compute_plain_ms": compute_plain_ms,
                "comm_ms": comm_ms, "plain_ms": plain_ms, "tbo_ms": tbo_ms,
                "hidden_fraction": (compute_ms + comm_ms - tbo_ms) / shorter,
                "limit_ratio": tbo_ms / longer, "speedup": plain_ms / tbo_ms}

    def digests(self) -> dict:
        """Per ``context/T/layout/transport``: a SHA-256 of the TBO step's logits (bytes), so
        that runs in other processes (the other link) can be compared bit for bit."""
        import hashlib

        return {f"{c}/{t}/{layout}/{name}": hashlib.sha256(v.numpy().tobytes()).hexdigest()
                for (c, layout, name, t, knob), v in self.logits.items() if knob is None}

    def extras(self, srv, initial, silent, context, tokens, transports) -> None:
        """The labelled extras at the main context: NCCL's SM trade (``--knobs``) and the
        emulated slow link (``--emulated_link_us``); results go to ``self.knobs`` and
        ``self.emulated``."""
        import torch
        import torch.distributed as dist

        F, device = self.F, self.device
        if device.type != "cuda" or context != F.context:
            return
        big = [t for t in (256, 1024) if t in tokens] or [max(tokens)]
        if F.knobs and "all_to_all" in transports and self.layout == F.layouts[0]:
            for max_ctas in (None, 4, 8, 16):
                opts = dist.ProcessGroupNCCL.Options()
                if max_ctas is not None:
                    opts.config.max_ctas = max_ctas
                group = dist.new_group(list(range(dist.get_world_size())), backend="nccl",
                                       pg_options=opts)
                for carveout in (0, 16, 32):
                    torch._C._set_sm_carveout_experimental(carveout or None)
                    self._use("all_to_all", group)
                    runners = self._runners(srv, context, big)
                    for t in big:
                        knob = (max_ctas, carveout)
                        row = self.row("all_to_all", runners, srv, initial, silent[t], t,
                                       context, knob)
                        same = torch.equal(
                            self.logits[(context, self.layout, "all_to_all", t, knob)],
                            self.logits[(context, self.layout, "all_to_all", t, None)])
                        self.knobs.append(row | {"max_ctas": max_ctas, "sm_carveout": carveout,
                                                 "logits_equal_default": bool(same)})
                    del runners
                torch._C._set_sm_carveout_experimental(None)
        if F.emulated_link_us and "copy_engine" in transports:
            cycles_per_us = sleep_cycles_per_us(device)
            for delay in (int(x) for x in F.emulated_link_us):
                self._use("copy_engine")
                d = self.model.dispatcher
                d.transport = DelayedTransport(d.transport, int(delay * cycles_per_us))
                runners = self._runners(srv, context, big)
                for t in big:
                    row = self.row(f"copy_engine + {delay} us/exchange (emulated)", runners,
                                   srv, initial, silent[t], t, context, ("delay", delay))
                    self.emulated.append(row | {"delay_us": delay})
                del runners


def worker(F) -> dict:
    import torch

    from tbo_parity.parity_tests.ep_parity import init_rank

    rank, world, device = init_rank(F.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = model_config(world, F.layers, F.tiny, experts_per_rank=F.experts_per_rank,
                       routing=F.routing)
    tokens = sorted(int(t) for t in F.tokens)
    long_tokens = sorted(int(t) for t in F.long_context_tokens) if F.long_context else []
    max_t = max(tokens + long_tokens + [F.timeline_tokens])
    result = {"rank": rank, "world_size": world, "link": F.link, "attention": F.attention,
              "layouts": list(F.layouts), "decode": [], "knobs": [], "prefill": [],
              "emulated": [], "experts": [], "bitwise": {}, "comm_priority": F.comm_priority,
              "routing": routing_facts(cfg, world)}
    comm_stream = None
    if device.type == "cuda":
        # lower is more urgent; a value past the device's range maps to its highest priority
        comm_stream = torch.cuda.Stream(device, priority=-100 if F.comm_priority == "high"
                                        else 0)
    model = build_model(cfg, make_dispatcher(cfg, "none", layout=F.layouts[0],
                                             max_capacity=max_t, device=device, dtype=dtype,
                                             comm_stream=comm_stream),
                        device=device, dtype=dtype, seed=1 + rank)
    if device.type == "cuda":
        result["link_bandwidth"] = link_bandwidth(device)
        result["copy_bandwidth"] = copy_bandwidth(device)
    if not F.timeline_only:
        result |= measure(F, cfg, model, tokens, long_tokens, max_t, device=device,
                          dtype=dtype, comm_stream=comm_stream)
    if F.timeline_tokens and (F.timeline_only or F.link == F.timeline_link):
        result["timeline"] = record_timeline(F, cfg, model, device, dtype, comm_stream)
        if device.type == "cuda" and not F.timeline_only:
            result["graph_timeline"] = record_graph_timeline(F, cfg, model, device, dtype,
                                                             comm_stream)
    return result


def measure(F, cfg, model, tokens, long_tokens, max_t, *, device, dtype, comm_stream) -> dict:
    """Every layout's decode sweep (and the long context's), the routed experts alone, and
    the prefill steps: the worker's measured rows."""
    out = {"decode": [], "experts": [], "prefill": []}
    sweep = DecodeSweep(F, cfg, model, device=device, dtype=dtype, comm_stream=comm_stream,
                        max_tokens=max_t)
    for layout in F.layouts:
        out["decode"] += sweep.sweep(F.context, tokens, layout)
        if long_tokens:
            out["decode"] += sweep.sweep(F.long_context, long_tokens, layout)
        out["experts"] += expert_rows(F, cfg, model, tokens, layout, device=device,
                                      dtype=dtype, comm_stream=comm_stream)
        if F.prefill_tokens:
            out["prefill"] += prefill_rows(F, cfg, model, [int(x) for x in F.prefill_tokens],
                                           layout, device, dtype, comm_stream)
    out["knobs"], out["emulated"], out["digests"] = sweep.knobs, sweep.emulated, sweep.digests()
    return out


def routing_facts(cfg, world: int) -> dict:
    """The routing measured, and the most ranks one token's experts can lie on (group-limited
    routing bounds it below ``min(K, N)``, and so bounds a token's traffic)."""
    from tbo_parity.torch_impl.moe import max_ranks_reached

    reach = min(cfg.top_k, world)
    if cfg.routing == "group_limited":
        reach = max_ranks_reached(cfg.num_experts, world, cfg.n_group, cfg.topk_group,
                                  cfg.top_k)
    return {"routing": cfg.routing, "num_experts": cfg.num_experts, "top_k": cfg.top_k,
            "n_group": cfg.n_group, "topk_group": cfg.topk_group,
            "max_ranks_per_token": reach}


def copy_bandwidth(device, *, megabytes: int = 1024, iters: int = 10) -> dict:
    """The card's device-to-device copy bandwidth, bytes read plus bytes written per second:
    what a kernel streaming its weights can at best approach."""
    import torch

    x = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        y.copy_(x)
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end) / iters
    return {"megabytes": megabytes, "ms": ms, "gb_per_s": 2 * x.numel() / (ms * 1e-3) / 1e9}


def exchange_bytes(layout: str, transport: str, *, world: int, local: int, capacity: int,
                   top_k: int, hidden: int, itemsize: int, real_sent: int) -> int:
    """Bytes one rank's send of one exchange moves (its own region included): the capacity
    layout's whole ``[N, L, C, H]`` block; the packed layout's ``[N, S, H]`` regions plus the
    ``[N, L]`` int32 counts; the exact transport's real rows plus the counts."""
    if layout == "capacity":
        return world * local * capacity * hidden * itemsize
    counts = world * local * 4
    if transport == "exact":
        return real_sent * hidden * itemsize + counts
    return world * capacity * min(top_k, local) * hidden * itemsize + counts


def expert_rows(F, cfg, model, tokens, layout, *, device, dtype, comm_stream) -> list:
    """The routed experts of one layer alone, per ``T``: one micro-batch of ``T`` tokens per
    rank routed uniformly at random (``K`` distinct experts each), dispatched for real, then
    ``dispatcher.experts`` captured and timed by itself. Per row: the real pairs this rank's
    experts receive, the rows they compute, the bytes of one exchange, TFLOPS counted on the
    real rows and on the rows computed, and the expert weights' read bandwidth."""
    import torch
    import torch.distributed as dist

    from tbo_parity.torch_impl.packed_dispatch import uses_grouped_gemm

    rows = []
    layer = model.layers[0]
    weights = (layer.experts_gate, layer.experts_up, layer.experts_down)
    d = make_dispatcher(cfg, "all_to_all", layout=layout, max_capacity=max(tokens),
                        device=device, dtype=dtype, comm_stream=comm_stream)
    n, local, h, i = d.world_size, d.local_experts, cfg.hidden_size, cfg.intermediate_size
    for t in tokens:
        gen = torch.Generator(device=device).manual_seed(1000 + t + d.rank)
        hidden = torch.randn(t, h, generator=gen, device=device).to(dtype)
        ids = torch.rand(t, cfg.num_experts, generator=gen, device=device).topk(
            cfg.top_k, dim=-1).indices
        gates = torch.full((t, cfg.top_k), 1.0 / cfg.top_k, device=device)
        handle = d.dispatch_wait(d.dispatch_launch(hidden, gates, ids, micro_batch=0,
                                                   capacity=t))
        ms = timed(graph_of(lambda: d.experts(handle, *weights), device), iters=F.iters,
                   repeats=F.repeats, device=device)
        per_rank = torch.bincount((ids // local).view(-1), minlength=n)
        dist.all_reduce(per_rank)
        real = int(per_rank[d.rank])
        grouped = layout == "packed" and uses_grouped_gemm(handle.recv, n * t, *weights)
        computed = real if grouped else local * n * t
        flops = 2 * 3 * h * i
        rows.append({
            "link": F.link, "layout": layout, "tokens": t, "real_pairs": real,
            "local_experts": local,
            "rows_computed": computed, "grouped_gemm": grouped, "expert_ms": ms,
            "bytes_per_exchange": {name: exchange_bytes(
                layout, name, world=n, local=local, capacity=t, top_k=cfg.top_k, hidden=h,
                itemsize=hidden.element_size(), real_sent=t * cfg.top_k)
                for name in LAYOUT_TRANSPORTS[(layout, "prefill")]},
            "real_tflops": flops * real / (ms * 1e-3) / 1e12,
            "computed_tflops": flops * computed / (ms * 1e-3) / 1e12,
            "weight_gb_per_s": 3 * local * h * i * hidden.element_size() / (ms * 1e-3) / 1e9})
    return rows


def prefill_rows(F, cfg, model, totals, layout, device, dtype, comm_stream) -> list:
    """One eager EXTEND step per size in ``totals`` (tokens per rank, in fresh sequences of
    ``--prefill_seq_len``), plain and TBO, for the silent transport (compute only) and each
    transport of ``layout``."""
    from tbo_parity.torch_impl.attention import TboAttnBackend
    from tbo_parity.torch_impl.batch_splitter import TboForwardBatchPreparer
    from tbo_parity.torch_impl.expert_parallel import agree_ep_step

    rows = []
    make_backend = attention_backend(F.attention)
    for total in totals:
        length = min(total, F.prefill_seq_len)
        seqs = max(1, total // length)
        srv = serving(cfg, seqs, length, device=device, dtype=dtype)
        for name in ["none"] + transports_of(F, layout, "prefill"):
            use_dispatcher(model, make_dispatcher(cfg, name, layout=layout, max_capacity=total,
                                                  device=device, dtype=dtype,
                                                  comm_stream=comm_stream))
            times = {}
            for tbo in (False, True):
                batch = extend_batch(cfg, srv, seqs, length, device=device)
                if tbo:
                    batch = TboForwardBatchPreparer().prepare(batch)
                step = agree_ep_step(batch, micro_batches=2 if tbo else 1) \
                    if model.expert_parallel else None  # one rank: no step to agree on

                def fn(batch=batch, step=step):
                    backend = TboAttnBackend(make_backend)
                    backend.init_forward_metadata(batch)
                    return model(batch, backend, ep_step=step)

                times[tbo] = timed(fn, iters=1, repeats=max(3, F.repeats), device=device)
            rows.append({"link": F.link, "layout": layout, "transport": name,
                         "tokens": total, "seq_len": length, "plain_ms": times[False],
                         "tbo_ms": times[True], "speedup": times[False] / times[True]})
        del srv
    return rows


class HostEvent:
    """A stand-in for a CUDA timing event on a CPU (the script's smoke test): host time."""

    def record(self, stream=None):
        self.t = time.perf_counter()

    def elapsed_time(self, other) -> float:
        return (other.t - self.t) * 1e3


def _stage_names() -> list:
    from tbo_parity.torch_impl.model import LAYOUTS

    return [stage.split() for stage in LAYOUTS["decode"].split("|")][:-1]  # trailing "|"


def stage_label(micro_batch: int, index: int, names: list) -> str:
    """A compute interval's label: ``"a2: dispatch_launch shared_experts"`` (micro-batch,
    stage index over the whole step, the stage's operations; ``parity_tests/timeline``)."""
    return f"{'ab'[micro_batch]}{index}: " + " ".join(names[index % len(names)])


def _with_markers(model, marker) -> tuple:
    """The decode operations with ``marker(index, where)`` around every stage."""
    from tbo_parity.torch_impl.forward_mode import ForwardMode
    from tbo_parity.torch_impl.operations import YieldOperation, split_stages

    ops, delta = model.operations(ForwardMode.DECODE)
    wrapped = []
    for index, stage in enumerate(split_stages(ops)):  # each stage between two markers
        wrapped += [marker(index, "start"), *stage, marker(index, "end"), YieldOperation()]
    return wrapped, delta


def _timeline_step(F, cfg, model, device, dtype, comm_stream, operations):
    """(step(), dispatcher): one eager TBO decode step of ``--timeline_tokens`` at
    ``--context`` through ``operations``."""
    from tbo_parity.torch_impl.attention import TboAttnBackend
    from tbo_parity.torch_impl.batch_splitter import TboForwardBatchPreparer
    from tbo_parity.torch_impl.expert_parallel import agree_ep_step
    from tbo_parity.torch_impl.overlap import model_forward_maybe_tbo

    t = F.timeline_tokens
    context = F.context
    srv = serving(cfg, t, context, device=device, dtype=dtype)
    d = make_dispatcher(cfg, F.timeline_transport, layout=F.layouts[0], max_capacity=t,
                        device=device, dtype=dtype, comm_stream=comm_stream)
    use_dispatcher(model, d)
    batch = TboForwardBatchPreparer().prepare(decode_batch(cfg, srv, t, device=device))
    ep_step = agree_ep_step(batch, micro_batches=2)
    backend = TboAttnBackend(attention_backend(F.attention))
    delta = operations[1]

    def step():
        backend.init_forward_metadata(batch, width=context)
        hidden = model.embed[batch.input_ids]
        return model_forward_maybe_tbo(operations[0], delta, batch, hidden,
                                       attn_backend=backend, ep_capacity=ep_step.capacity)

    return step, d


def record_timeline(F, cfg, model, device, dtype, comm_stream) -> list:
    """One eager TBO decode step with timing events around every stage (compute stream) and
    every exchange (communication stream): a list of interval dicts (parity_tests/timeline)."""
    import torch

    names = _stage_names()
    marks = []
    new_event = (lambda: torch.cuda.Event(enable_timing=True)) if device.type == "cuda" \
        else HostEvent

    def marker(index, where):
        def op(state):
            event = new_event()
            event.record()
            marks.append((state.micro_batch, index, where, event))
        return op

    step, d = _timeline_step(F, cfg, model, device, dtype, comm_stream,
                             _with_markers(model, marker))

    def traced(trace):
        d.trace = trace
        marks.clear()
        start = new_event()
        start.record()
        step()
        d.trace = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return start

    for _ in range(3):
        traced(None)
    trace = []
    start = traced(trace)
    intervals = []
    opened = {}
    for mb, index, where, event in marks:
        if where == "start":
            opened[(mb, index)] = event
            continue
        begin = opened.pop((mb, index))
        label = stage_label(mb, index, names)
        ms0, ms1 = start.elapsed_time(begin), start.elapsed_time(event)
        if ms1 > ms0:
            intervals.append({"lane": "compute", "micro_batch": "ab"[mb], "label": label,
                              "start_ms": ms0, "end_ms": ms1})
    for label, mb, begin, end in trace:
        intervals.append({"lane": "comm", "micro_batch": "ab"[mb], "label": label,
                          "start_ms": start.elapsed_time(begin),
                          "end_ms": start.elapsed_time(end)})
    return intervals


MARKER_KERNEL = "spin"  # torch.cuda._sleep's kernel: the stage marker inside a graph


def record_graph_timeline(F, cfg, model, device, dtype, comm_stream) -> dict:
    """One TBO decode step captured as a CUDA graph and replayed under ``torch.profiler``:
    kernel timestamps per stream, as the GPU ran them.

    A graph holds no timing events, so each stage starts with a marker kernel (a
    ``torch.cuda._sleep`` of one cycle, a microsecond or two) whose (micro-batch, stage) the
    capture notes in order; the exchanges' order is noted the same way. In the trace, the
    compute stream is the one that ran the markers: stage k spans from its marker to the last
    kernel before the next marker. Each NCCL kernel is one exchange, in capture order.
    Returns the intervals (parity_tests/timeline) and the replayed step's time."""
    import json as _json
    import tempfile

    import torch

    names = _stage_names()
    stages, exchanges = [], []

    def marker(index, where):
        def op(state):
            if where == "start":
                stages.append((state.micro_batch, index))
                torch.cuda._sleep(1)
        return op

    step, d = _timeline_step(F, cfg, model, device, dtype, comm_stream,
                             _with_markers(model, marker))
    real_traced = d._traced

    def noting(fn, label, micro_batch):
        exchanges.append((label, micro_batch))
        return real_traced(fn, label, micro_batch)

    for _ in range(2):  # warm-up runs, then the capture
        step()
    torch.cuda.synchronize(device)
    d._traced = noting
    stages.clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    d._traced = real_traced
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize(device)
    torch.distributed.barrier()  # ranks start the profiled replay together
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize(device)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = _json.load(open(f.name))["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    return graph_intervals(kernels, stages, exchanges, names)


def graph_intervals(kernels, stages, exchanges, names) -> dict:
    """Intervals from a replay's kernels (chrome-trace dicts with ``name``, ``ts``, ``dur``
    in microseconds and ``args.stream``), the capture's stage order and exchange order.

    A replayed graph runs its nodes on streams of its own choosing, so lanes are told apart
    by kernel, not by stream: every NCCL kernel is one exchange (labelled in capture order),
    every other kernel is compute (the transport's layout permutes included: they run on SMs)
    and belongs to the stage whose marker last started before it."""
    markers = [k for k in kernels if MARKER_KERNEL in k["name"]]
    if len(markers) != len(stages):
        return {"error": f"{len(markers)} marker kernels for {len(stages)} stages"}
    t0 = kernels[0]["ts"]

    def ms(us):
        return (us - t0) / 1e3

    nccl = [k for k in kernels if "nccl" in k["name"].lower()]
    work = [k for k in kernels if MARKER_KERNEL not in k["name"] and k not in nccl]
    intervals = []
    bounds = [m["ts"] for m in markers] + [float("inf")]
    for (mb, index), begin, end in zip(stages, bounds, bounds[1:]):
        body = [k for k in work if begin <= k["ts"] < end]
        if body:
            intervals.append({"lane": "compute", "micro_batch": "ab"[mb],
                              "label": stage_label(mb, index, names),
                              "start_ms": ms(body[0]["ts"]),
                              "end_ms": ms(max(k["ts"] + k["dur"] for k in body))})
    exchanges = [(label, mb) for label, mb in exchanges if label in ("dispatch", "combine")]
    if len(nccl) == len(exchanges):
        for (label, mb), k in zip(exchanges, nccl):
            intervals.append({"lane": "comm", "micro_batch": "ab"[mb], "label": label,
                              "start_ms": ms(k["ts"]), "end_ms": ms(k["ts"] + k["dur"])})
    raw = [[k["name"][:48], k["args"].get("stream"), round(ms(k["ts"]), 4),
            round(k["dur"] / 1e3, 4)] for k in kernels]
    return {"intervals": intervals, "step_ms": ms(max(k["ts"] + k["dur"] for k in kernels)),
            "kernels": len(kernels), "nccl_kernels": len(nccl), "exchanges": len(exchanges),
            "raw_kernels": raw}


# --- report ------------------------------------------------------------------------------------


def _series(r: dict) -> tuple:
    return r["link"], r["context"], r["layout"], r["transport"]


def crossover(rows: list) -> dict:
    """Per ``link/context/layout/transport``: the smallest measured T from which TBO is
    faster at every larger measured T (None: it never is)."""
    out = {}
    for key in sorted({_series(r) for r in rows}):
        mine = sorted((r for r in rows if _series(r) == key), key=lambda r: r["tokens"])
        wins = [r["speedup"] > 1.0 for r in mine]
        first = next((mine[i]["tokens"] for i in range(len(mine)) if all(wins[i:])), None)
        out["/".join(map(str, key))] = first
    return out


def bitwise(digests: dict) -> dict:
    """Per ``context/T/layout``: whether the TBO logits are bit for bit the same for every
    transport of the layout on every link measured (from each run's digests); None where only
    one run was measured, so nothing was compared."""
    seen = {}
    for per_link in digests.values():
        for key, digest in per_link.items():
            seen.setdefault(key.rsplit("/", 1)[0], []).append(digest)
    return {key: len(set(found)) == 1 if len(found) > 1 else None
            for key, found in sorted(seen.items())}


def _target(name: str, rows: list, test, describe) -> dict:
    """A target: met when every row it applies to passes ``test``; the rows' figures."""
    return {"target": name, "rows": len(rows), "met": all(map(test, rows)) if rows else None,
            "figures": [describe(r) for r in rows]}


def targets(report: dict) -> list:
    """The issue's targets, each met or missed, with the figures it was judged on."""
    decode = [r for r in report["decode"] if r["link"] == "network" and r["tokens"] >= 256]
    prefill = report["prefill"]

    def speed(r):
        return f"{r['link']} {r.get('context', '')} {r['layout']}/{r['transport']} " \
               f"T={r['tokens']}: {r['speedup']:.2f}x"

    return [
        _target("network, decode graphs, T >= 256: TBO >= 1.25x plain", decode,
                lambda r: r["speedup"] >= 1.25, speed),
        _target("network, decode graphs, T >= 256: TBO <= 1.10x max(compute, comm)", decode,
                lambda r: r["limit_ratio"] <= 1.10,
                lambda r: f"{r['context']} T={r['tokens']}: {r['limit_ratio']:.2f}"),
        _target("network, decode graphs, T >= 256: hidden fraction >= 0.8", decode,
                lambda r: r["hidden_fraction"] >= 0.8,
                lambda r: f"{r['context']} T={r['tokens']}: {r['hidden_fraction']:.2f}"),
        _target("network, prefill, T >= 4096: TBO >= 1.25x plain",
                [r for r in prefill if r["link"] == "network" and r["transport"] != "none"
                 and r["tokens"] >= 4096], lambda r: r["speedup"] >= 1.25, speed),
        _target("nvlink, prefill, T >= 4096: TBO no slower than plain",
                [r for r in prefill if r["link"] == "nvlink" and r["transport"] != "none"
                 and r["tokens"] >= 4096], lambda r: r["speedup"] >= 1.0, speed),
        _target("prefill compute only (no transport), T >= 1024: TBO <= 1.10x plain",
                [r for r in prefill if r["transport"] == "none" and r["tokens"] >= 1024],
                lambda r: r["tbo_ms"] <= 1.10 * r["plain_ms"],
                lambda r: f"{r['link']} T={r['tokens']}: "
                          f"{r['tbo_ms'] / r['plain_ms']:.2f}x"),
        _target("logits bit for bit equal across transports and links", [
            {"key": k, "equal": v} for k, v in report["bitwise"].items() if v is not None],
            lambda r: r["equal"], lambda r: f"{r['key']}: {r['equal']}"),
    ] + layout_targets(report)


# The packed layout's compute budget against the capacity layout's at 1024 tokens per rank
# with 8 experts per rank, by rank count (the targets; other counts are not judged).
COMPUTE_RATIO_TARGET = {2: 0.75, 4: 0.5}


def layout_ratios(decode: list) -> list:
    """Per link, context and ``T`` measured in both layouts (transport ``all_to_all``): the
    packed layout's times over the capacity layout's, for the compute-only steps (plain and
    TBO) and the real steps."""
    rows = {}
    for r in decode:
        if r["transport"] == "all_to_all":
            rows[(r["link"], r["context"], r["tokens"], r["layout"])] = r
    out = []
    for (link, context, t, layout), packed in sorted(rows.items()):
        old = rows.get((link, context, t, "capacity"))
        if layout == "packed" and old:
            out.append({"link": link, "context": context, "tokens": t} | {
                key: packed[key] / old[key]
                for key in ("compute_plain_ms", "compute_ms", "plain_ms", "tbo_ms")})
    return out


def layout_targets(report: dict) -> list:
    """The packed layout's targets, each met, missed or not measured here."""
    from tbo_parity.torch_impl.packed_dispatch import TILE_ROWS

    env, experts = report["env"], report["experts"]
    ratios = layout_ratios(report["decode"])
    bound = COMPUTE_RATIO_TARGET.get(env["world_size"]) if env["experts_per_rank"] == 8 \
        else None
    copy = (report.get("copy_bandwidth") or {}).get("gb_per_s")
    bmm = {(r["link"], r["tokens"]): r["computed_tflops"] for r in experts
           if r["layout"] == "capacity"}
    grouped = [r for r in experts if r["layout"] == "packed" and r["tokens"] >= 1024
               and (r["link"], r["tokens"]) in bmm]
    streaming = [r for r in experts if r["layout"] == "packed" and 32 <= r["tokens"] <= 256
                 and env["experts_per_rank"] >= 128 and copy]
    return [
        _target(f"packed: rows computed <= real pairs + one tile ({TILE_ROWS} rows) per local "
                "expert",
                [r for r in experts if r["layout"] == "packed"],
                lambda r: r["rows_computed"] <= r["real_pairs"] + TILE_ROWS * r["local_experts"],
                lambda r: f"T={r['tokens']}: {r['rows_computed']} rows for {r['real_pairs']} "
                          f"real pairs ({'grouped GEMM' if r['grouped_gemm'] else 'bmm'})"),
        _target("8 experts/rank, T = 1024: plain compute <= the capacity layout's x "
                + (f"{bound}" if bound else "0.75 (2 ranks) or 0.5 (4 ranks)"),
                [r for r in ratios if r["tokens"] == 1024 and bound],
                lambda r: r["compute_plain_ms"] <= bound,
                lambda r: f"{r['link']} {r['context']}: {r['compute_plain_ms']:.2f}x"),
        _target("T >= 1024: grouped GEMM on real rows >= 70% of the bmm's all-rows TFLOPS",
                grouped, lambda r: r["real_tflops"] >= 0.7 * bmm[(r["link"], r["tokens"])],
                lambda r: f"T={r['tokens']}: {r['real_tflops']:.0f} vs "
                          f"{bmm[(r['link'], r['tokens'])]:.0f} TFLOPS"),
        _target(">= 128 experts/rank, 32 <= T <= 256: expert weights read at >= 60% of the "
                "copy bandwidth", streaming,
                lambda r: r["weight_gb_per_s"] >= 0.6 * copy,
                lambda r: f"T={r['tokens']}: {r['weight_gb_per_s']:.0f} of {copy:.0f} GB/s"),
        _target("T = 32: the packed layout no slower than the capacity layout (TBO and plain)",
                [r for r in ratios if r["tokens"] == 32],
                lambda r: r["plain_ms"] <= 1.0 and r["tbo_ms"] <= 1.0,
                lambda r: f"{r['link']} {r['context']}: plain {r['plain_ms']:.2f}x, TBO "
                          f"{r['tbo_ms']:.2f}x"),
    ]


def _decode_line(r: dict) -> str:
    return (f"| {r['link']} | {r['context']} | {r['layout']} | {r['transport']} | "
            f"{r['tokens']} | "
            f"{r['compute_ms']:.3f} | {r['comm_ms']:.3f} | {r['plain_ms']:.3f} | "
            f"{r['tbo_ms']:.3f} | {r['hidden_fraction']:.2f} | {r['limit_ratio']:.2f} | "
            f"{r['speedup']:.2f} |")


DECODE_HEADER = ["| link | context | layout | transport | tokens/rank | compute ms | comm ms "
                 "| plain ms | TBO ms | hidden fraction | TBO / max(compute, comm) | "
                 "plain / TBO |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]


def layout_lines(report: dict) -> list:
    """The layouts side by side (packed over capacity) and the routed experts alone."""
    lines = []
    if layout_ratios(report["decode"]):
        lines += ["", "## Packed over capacity (all_to_all, same run)", "",
                  "| link | context | tokens/rank | plain compute | TBO compute | plain step | "
                  "TBO step |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['link']} | {r['context']} | {r['tokens']} | "
                  f"{r['compute_plain_ms']:.2f}x | {r['compute_ms']:.2f}x | "
                  f"{r['plain_ms']:.2f}x | {r['tbo_ms']:.2f}x |"
                  for r in layout_ratios(report["decode"])]
    if report["experts"]:
        r0 = report["routing"]
        lines += ["", "## The routed experts of one layer, alone (CUDA graph)", "",
                  f"One micro-batch of T tokens per rank, uniform random top-{r0['top_k']} of "
                  f"{r0['num_experts']} experts, dispatched for real. Bytes: what one rank "
                  "sends in one exchange (its own region included). A token's experts lie on "
                  f"at most {r0['max_ranks_per_token']} ranks ({r0['routing']} routing).", "",
                  "| layout | tokens/rank | real pairs | rows computed | expert ms | TFLOPS "
                  "(real rows) | TFLOPS (rows computed) | weights GB/s | bytes per exchange |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in report["experts"]:
            moved = ", ".join(f"{k} {v / 2**20:.1f} MiB"
                              for k, v in r["bytes_per_exchange"].items())
            lines.append(f"| {r['layout']} | {r['tokens']} | {r['real_pairs']} | "
                         f"{r['rows_computed']} | {r['expert_ms']:.3f} | "
                         f"{r['real_tflops']:.0f} | {r['computed_tflops']:.0f} | "
                         f"{r['weight_gb_per_s']:.0f} | {moved} |")
    return lines


def extra_lines(report: dict) -> list:
    """The prefill table, the labelled extras (NCCL's SM trade, the emulated link) and the
    replayed step's profile, where the report has them."""
    lines = []
    if report["prefill"]:
        lines += ["", "## Prefill (eager, EXTEND)", "",
                  "`none` is a transport that moves nothing: the compute alone.", "",
                  "| link | layout/transport | tokens/rank | sequence length | plain ms | TBO ms "
                  "| plain / TBO |", "|---|---|---|---|---|---|---|"]
        for r in report["prefill"]:
            lines.append(f"| {r['link']} | {r['layout']}/{r['transport']} | {r['tokens']} | "
                         f"{r['seq_len']} | "
                         f"{r['plain_ms']:.2f} | {r['tbo_ms']:.2f} | {r['speedup']:.2f} |")
    if report["knobs"]:
        lines += ["", "## NCCL's SM trade (all_to_all)", "",
                  "| link | max_ctas | cuBLAS SM carve-out | tokens/rank | comm ms | TBO ms | "
                  "hidden fraction | TBO / max | plain / TBO | logits unchanged |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["knobs"]:
            lines.append(f"| {r['link']} | {r['max_ctas'] or 'default'} | {r['sm_carveout']} "
                         f"| {r['tokens']} | {r['comm_ms']:.3f} | {r['tbo_ms']:.3f} | "
                         f"{r['hidden_fraction']:.2f} | {r['limit_ratio']:.2f} | "
                         f"{r['speedup']:.2f} | {r['logits_equal_default']} |")
    if report.get("emulated"):
        lines += ["", "## Emulated slow link (NOT a measurement of a real link)", "",
                  "copy_engine plus a spin of the stated length on the communication stream "
                  "after every send.", ""] + DECODE_HEADER
        lines += [_decode_line(r) for r in report["emulated"]]
    graph = report.get("graph_timeline")
    if graph:
        lines += ["", "## One replayed TBO decode step (torch.profiler)", "",
                  f"- {graph['link']}: {graph.get('step_ms', float('nan')):.3f} ms, "
                  f"{graph.get('kernels')} kernels, {graph.get('nccl_kernels')} NCCL kernels "
                  f"for {graph.get('exchanges')} exchanges"
                  + (f"; {graph['error']}" if graph.get("error") else "")]
    return lines


def markdown(report: dict) -> str:
    env = report["env"]
    lines = [
        "# Two-batch overlap of the expert-parallel exchange: measured",
        "",
        f"{env['date']}, {env['world_size']} x {env['gpu']}, torch {env['torch']} (CUDA "
        f"{env['cuda']}), NCCL {env['nccl']}, commit `{env['commit']}`. Produced by "
        "`benchmarks/overlap.py`; every figure is a median (see its docstring). Model: "
        f"DeepSeek-V3 MoE slice, hidden {HIDDEN}, top-{TOP_K} of {env['experts_per_rank']} "
        f"experts per rank ({env['routing']} routing), expert intermediate {INTERMEDIATE}, one "
        f"shared expert, {env['layers']} "
        f"layers, {HEADS} heads of {HEAD_DIM}, bfloat16, `{env['attention']}` attention; "
        f"decode in CUDA graphs at {env['context']} (and {env['long_context']}) cached tokens "
        f"per sequence; prefill eager, fresh sequences of {env['prefill_seq_len']} tokens. "
        "Expert layouts (docs/model.md): `packed` (the default: only the real pairs are "
        "computed, regions of `C*min(K, L)` rows per peer) and `capacity` (the old baseline: "
        "every local expert computes, and every exchange moves, all `N*C` rows of its block).",
        "",
        "## The links", "",
        "| link | all_to_all of 64 MB per rank, ms | GB/s leaving each GPU |", "|---|---|---|"]
    for link, bw in report["link_bandwidth"].items():
        if bw:
            lines.append(f"| {link} | {bw['ms']:.3f} | {bw['gb_per_s']:.1f} |")
    if report.get("copy_bandwidth"):
        lines.append(f"| device copy, 1 GiB (read + write) | "
                     f"{report['copy_bandwidth']['ms']:.3f} | "
                     f"{report['copy_bandwidth']['gb_per_s']:.0f} |")
    lines += ["", "## Decode (CUDA graphs)", ""] + DECODE_HEADER
    lines += [_decode_line(r) for r in report["decode"]]
    lines += layout_lines(report)
    lines += extra_lines(report)
    lines += ["", "## Crossover and bit-identity", "",
              f"- TBO wins from (tokens per rank, decode, link/context/layout/transport): "
              f"{report['crossover']}",
              f"- Logits bit for bit equal across transports and links (context/tokens): "
              f"{report['bitwise']}", "", "## Targets", "",
              "| target | met | figures |", "|---|---|---|"]
    for t in report["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {verdict} | "
                     f"{'; '.join(t['figures']) or 'not measured'} |")
    return "\n".join(lines) + "\n"


def _write_rank(F, result) -> None:
    import torch
    import torch.distributed as dist

    path = os.path.join(F.out_dir, f"overlap-{F.link}-rank{result['rank']}.json")
    with open(path, "w") as f:
        json.dump(result, f)
    if F.device == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    dist.destroy_process_group()


def _env(F) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {"date": datetime.date.today().isoformat(), "world_size": F.nproc,
            "gpu": torch.cuda.get_device_name(0) if cuda else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
            "commit": F.commit, "layers": F.layers, "attention": F.attention,
            "experts_per_rank": F.experts_per_rank, "routing": F.routing,
            "context": F.context, "long_context": F.long_context,
            "prefill_seq_len": F.prefill_seq_len}


def main(argv) -> int:
    F = _flags()
    F(argv)
    if "RANK" in os.environ:  # a rank (launched below, or by torchrun)
        _write_rank(F, worker(F))
        return 0
    from tbo_parity.parity_tests.ep_parity import launch

    for name, chosen, known in (("links", F.links, LINKS), ("layouts", F.layouts,
                                                             ("packed", "capacity"))):
        if not chosen or set(chosen) - set(known):
            raise SystemExit(f"overlap: --{name} must be of {sorted(known)}, got {chosen}")
    os.makedirs(F.out_dir, exist_ok=True)
    passthrough = [a for a in argv[1:] if not a.startswith(("--nproc", "--link="))]
    ranks0 = {}
    for link in F.links:  # one launch per link: NCCL reads its settings at start
        launch(F.nproc, F.out_dir, passthrough + [f"--link={link}"], env=LINKS[link],
               timeout_s=570, module="tbo_parity.benchmarks.overlap",
               report_glob=f"overlap-{link}-rank{{rank}}.json")
        with open(os.path.join(F.out_dir, f"overlap-{link}-rank0.json")) as f:
            ranks0[link] = json.load(f)
    report = {"env": _env(F)}
    for key in ("decode", "knobs", "prefill", "emulated", "experts"):
        report[key] = [row for r in ranks0.values() for row in r[key]]
    report["routing"] = next(iter(ranks0.values()))["routing"]
    report["copy_bandwidth"] = next(iter(ranks0.values())).get("copy_bandwidth")
    report["bitwise"] = bitwise({link: r.get("digests", {}) for link, r in ranks0.items()})
    report["link_bandwidth"] = {link: r.get("link_bandwidth") for link, r in ranks0.items()}
    report["crossover"] = crossover(report["decode"])
    for link, r in ranks0.items():
        if r.get("timeline"):
            with open(os.path.join(F.out_dir, "timeline.json"), "w") as f:
                json.dump(r["timeline"], f, indent=1)
        if r.get("graph_timeline"):
            report["graph_timeline"] = {"link": link} | r["graph_timeline"]
            with open(os.path.join(F.out_dir, "timeline-graph.json"), "w") as f:
                json.dump(r["graph_timeline"].get("intervals", []), f, indent=1)
    report["targets"] = targets(report)
    if not F.timeline_only:
        with open(os.path.join(F.out_dir, "overlap-benchmark.json"), "w") as f:
            json.dump(report, f, indent=1)
        text = markdown(report)
        with open(os.path.join(F.out_dir, "overlap-benchmark.md"), "w") as f:
            f.write(text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
