"""Does two-batch overlap hide the expert-parallel exchange? Measured on N GPUs of one host.

    PYTHONPATH=. python3 benchmarks/overlap.py --nproc=2 [--out_dir=docs] [--commit=SHA]
        [--tokens=32,64,128,256,512,1024] [--prefill_tokens=1024,4096] [--emulated_link_us=100,250] [--layers=4]
        [--transports=all_to_all,copy_engine] [--knobs] [--timeline_tokens=1024]

The model is a slice of a DeepSeek-V3 MoE decoder, in bfloat16: hidden 7168, top-8 routing over
``8 * N`` experts (8 per rank), expert intermediate size 2048, one shared expert, a small
attention (8 heads of 128) and ``--layers`` layers. Every rank decodes its own batch of ``T``
sequences (data-parallel attention, expert-parallel MoE), captured in CUDA graphs by
``CudaGraphRunner``. Per transport and per ``T`` (tokens per rank) it measures, as the median
over ``--repeats`` timed blocks of ``--iters`` graph replays each (CUDA events on the replay
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

Also: prefill steps (EXTEND, ``--prefill_tokens`` per rank in sequences of 64 tokens, eager:
graphs are for decode), plain vs TBO; a clearly labelled slow-link emulation (a spin of
``--emulated_link_us`` on the communication stream after every send: the regime of a link
slower than NVLink, never a replacement for the real numbers); with ``--knobs``, NCCL's SM trade (``max_ctas`` of the communicator, cuBLAS SM
carve-out) swept for ``all_to_all`` at 256 and 1024 tokens; a check that the logits are bit for
bit the same for every transport and knob; the crossover (the smallest ``T`` from which TBO wins
at every larger measured ``T``); and one TBO decode step recorded with CUDA events on both
streams for the timeline picture (``tbo-parity timeline`` draws it).

Writes ``overlap-benchmark.json`` and ``overlap-benchmark.md`` (and ``timeline.json``) to
``--out_dir``. Timings are never asserted anywhere; the targets of the issue are reported as
met or missed.
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
HEADS, HEAD_DIM, VOCAB, CONTEXT = 8, 128, 1024, 32
PREFILL_LENGTH = 64


def _flags():
    from absl import flags

    F = flags.FlagValues()
    flags.DEFINE_integer("nproc", 2, "ranks (GPUs) to launch", lower_bound=1, flag_values=F)
    flags.DEFINE_string("out_dir", "docs", "where the JSON and Markdown go", flag_values=F)
    flags.DEFINE_string("commit", "unknown", "the commit measured (for the record)",
                        flag_values=F)
    flags.DEFINE_list("tokens", ["32", "64", "128", "256", "512", "1024"],
                      "decode tokens per rank", flag_values=F)
    flags.DEFINE_list("prefill_tokens", ["1024", "4096"], "EXTEND tokens per rank (empty: "
                      "skip)", flag_values=F)
    flags.DEFINE_list("emulated_link_us", ["100", "250"], "slow-link emulation: delays added "
                      "to every exchange on the communication stream (empty: skip)",
                      flag_values=F)
    flags.DEFINE_integer("layers", 4, "decoder layers", lower_bound=1, flag_values=F)
    flags.DEFINE_list("transports", ["all_to_all", "copy_engine"], "transports to measure",
                      flag_values=F)
    flags.DEFINE_bool("knobs", True, "sweep NCCL max_ctas and the cuBLAS SM carve-out",
                      flag_values=F)
    flags.DEFINE_integer("timeline_tokens", 1024, "tokens per rank of the timeline step (0: "
                         "skip)", lower_bound=0, flag_values=F)
    flags.DEFINE_string("timeline_transport", "copy_engine", "transport of the timeline step",
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


def model_config(world_size: int, layers: int, tiny: bool):
    from torch_impl.config import ModelConfig

    if tiny:
        return ModelConfig(num_layers=layers, hidden_size=32, num_heads=2, head_dim=8,
                           num_experts=4 * world_size, top_k=4, num_shared_experts=1,
                           intermediate_size=16, vocab_size=64)
    return ModelConfig(num_layers=layers, hidden_size=HIDDEN, num_heads=HEADS,
                       head_dim=HEAD_DIM, num_experts=EXPERTS_PER_RANK * world_size,
                       top_k=TOP_K, num_shared_experts=1, intermediate_size=INTERMEDIATE,
                       vocab_size=VOCAB)


def build_model(cfg, dispatcher, *, device, dtype, seed: int = 0):
    """The model with random weights made on the device. Expert weights are drawn for this
    rank's experts only (a full ``[E, H, I]`` draw per layer would not fit the host's time);
    the constructor is given stride-0 placeholders of the full shape."""
    import torch

    from torch_impl.config import weight_shapes
    from torch_impl.model import MoEModel

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
        from torch_impl.expert_parallel import AllToAllTransport

        self._shapes = AllToAllTransport(group)

    def allocate(self, shape, dtype, device):
        return self._shapes.allocate(shape, dtype, device)

    def start_dispatch(self, send, bufs, c):
        return None

    def finish_dispatch(self, work, send, bufs, c):
        from torch_impl.expert_parallel import _view

        n, l, _, h = send.shape
        return _view(bufs["recv"], (l, n * c, h))

    def start_combine(self, out, bufs, c):
        return None

    def finish_combine(self, work, bufs, shape):
        from torch_impl.expert_parallel import _view

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


def make_dispatcher(cfg, transport: str, *, max_capacity, device, dtype, group=None,
                    comm_stream=None):
    """A dispatcher for ``transport``: a name, or "none" for ``SilentTransport``."""
    from torch_impl import expert_parallel as ep

    return ep.ExpertParallelDispatcher(
        cfg.num_experts, hidden_size=cfg.hidden_size, max_capacity=max_capacity, dtype=dtype,
        device=device, group=group, comm_stream=comm_stream,
        transport=SilentTransport(group) if transport == "none" else transport)


# --- batches ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Serving:
    req_to_token: object  # [R + 1, CONTEXT]: row R is the padding row
    pool: object  # KVPool with one extra slot (the padding slot)

    @property
    def padding_req_row(self):
        return self.req_to_token.shape[0] - 1

    @property
    def padding_slot(self):
        return self.pool.k.shape[1] - 1


def serving(cfg, num_requests: int, context: int, *, device, dtype) -> Serving:
    import torch

    from torch_impl.kv_cache import KVPool

    slots = num_requests * context
    table = torch.arange(slots, device=device).view(num_requests, context)
    table = torch.cat([table, torch.full((1, context), slots, device=device)])
    shape = (cfg.num_layers, slots + 1, cfg.num_heads, cfg.head_dim)
    return Serving(table, KVPool(torch.randn(shape, device=device).to(dtype),
                                 torch.randn(shape, device=device).to(dtype)))


def decode_batch(cfg, srv: Serving, num_seqs: int, *, device, seed: int = 0):
    """``num_seqs`` sequences of ``CONTEXT - 1`` cached tokens each decode one token."""
    import torch

    from torch_impl.forward_batch import ForwardBatch
    from torch_impl.forward_mode import ForwardMode

    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(num_seqs)
    pos = torch.full((num_seqs,), CONTEXT - 1)
    seq_lens = pos + 1
    return ForwardBatch(
        forward_mode=ForwardMode.DECODE, batch_size=num_seqs,
        input_ids=torch.randint(0, cfg.vocab_size, (num_seqs,), generator=gen).to(device),
        positions=pos.to(device), out_cache_loc=srv.req_to_token[rows.to(device), CONTEXT - 1],
        req_pool_indices=rows.to(device), seq_lens=seq_lens.to(device), seq_lens_cpu=seq_lens,
        num_token_non_padded=num_seqs, req_to_token=srv.req_to_token, kv_pool=srv.pool)


def extend_batch(cfg, srv: Serving, num_seqs: int, length: int, *, device, seed: int = 0):
    """``num_seqs`` fresh sequences of ``length`` tokens (no cached prefix)."""
    import torch

    from torch_impl.forward_batch import ForwardBatch
    from torch_impl.forward_mode import ForwardMode

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


def worker(F) -> dict:
    import torch
    import torch.distributed as dist

    from parity_tests.ep_parity import init_rank
    from torch_impl.cuda_graph_runner import CudaGraphRunner

    rank, world, device = init_rank(F.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = model_config(world, F.layers, F.tiny)
    tokens = sorted(int(t) for t in F.tokens)
    max_t = max(tokens)
    result = {"rank": rank, "world_size": world, "decode": [], "knobs": [], "prefill": [],
              "emulated": [], "bitwise": {}}
    comm_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    first = make_dispatcher(cfg, "none", max_capacity=max_t, device=device, dtype=dtype,
                            comm_stream=comm_stream)
    model = build_model(cfg, first, device=device, dtype=dtype, seed=1 + rank)
    srv = serving(cfg, max_t, CONTEXT, device=device, dtype=dtype)
    initial = srv.pool.clone()

    def runner(tbo, sizes):
        return CudaGraphRunner(model, srv.pool, srv.req_to_token, max_context_len=CONTEXT,
                               padding_slot=srv.padding_slot,
                               padding_req_row=srv.padding_req_row, batch_sizes=sizes,
                               tbo=tbo)

    def replay_fn(r, t):
        batch = decode_batch(cfg, srv, t, device=device, seed=t)
        key, _ = r.prepare_replay(batch)
        return r._graphs[key], key

    def decode_row(name, tbo_runner, plain_runner, silent_tbo_ms, silent_plain_ms, t):
        tbo_fn, key = replay_fn(tbo_runner, t)
        plain_fn, _ = replay_fn(plain_runner, t)
        tbo_ms = timed(tbo_fn, iters=F.iters, repeats=F.repeats, device=device)
        plain_ms = timed(plain_fn, iters=F.iters, repeats=F.repeats, device=device)
        comm = graph_of(exchanges_only(model, t, 2, device=device, dtype=dtype), device)
        comm_ms = timed(comm, iters=F.iters, repeats=F.repeats, device=device)
        compute_ms = silent_tbo_ms
        shorter, longer = min(compute_ms, comm_ms), max(compute_ms, comm_ms)
        srv.pool.k.copy_(initial.k)
        srv.pool.v.copy_(initial.v)
        srv_logits = tbo_fn().logits.float().cpu()
        return {"transport": name, "tokens": t, "compute_ms": compute_ms,
                "compute_plain_ms": silent_plain_ms, "comm_ms": comm_ms,
                "plain_ms": plain_ms, "tbo_ms": tbo_ms,
                "hidden_fraction": (compute_ms + comm_ms - tbo_ms) / shorter,
                "limit_ratio": tbo_ms / longer, "speedup": plain_ms / tbo_ms}, srv_logits

    # compute only: the silent transport
    silent = {}
    if not F.timeline_only:
        r_tbo, r_plain = runner(True, tokens), runner(False, tokens)
        for t in tokens:
            silent[t] = (timed(replay_fn(r_tbo, t)[0], iters=F.iters, repeats=F.repeats,
                               device=device),
                         timed(replay_fn(r_plain, t)[0], iters=F.iters, repeats=F.repeats,
                               device=device))
        del r_tbo, r_plain
    logits = {}
    for name in ([] if F.timeline_only else F.transports):
        d = make_dispatcher(cfg, name, max_capacity=max_t, device=device, dtype=dtype,
                            comm_stream=comm_stream)
        use_dispatcher(model, d)
        r_tbo, r_plain = runner(True, tokens), runner(False, tokens)
        for t in tokens:
            row, lg = decode_row(name, r_tbo, r_plain, *silent[t], t)
            result["decode"].append(row)
            logits[(name, t)] = lg
        del r_tbo, r_plain
        torch.cuda.synchronize(device) if device.type == "cuda" else None
    # the SM trade for NCCL
    if F.knobs and not F.timeline_only and "all_to_all" in F.transports and device.type == "cuda":
        knob_tokens = [t for t in (256, 1024) if t in tokens] or [max_t]
        for max_ctas in (None, 4, 8, 16):
            opts = dist.ProcessGroupNCCL.Options()
            if max_ctas is not None:
                opts.config.max_ctas = max_ctas
            group = dist.new_group(list(range(world)), backend="nccl", pg_options=opts)
            for carveout in (0, 16, 32):
                torch._C._set_sm_carveout_experimental(carveout or None)
                d = make_dispatcher(cfg, "all_to_all", max_capacity=max_t, device=device,
                                    dtype=dtype, group=group, comm_stream=comm_stream)
                use_dispatcher(model, d)
                r_tbo, r_plain = runner(True, knob_tokens), runner(False, knob_tokens)
                for t in knob_tokens:
                    row, lg = decode_row("all_to_all", r_tbo, r_plain, *silent[t], t)
                    row |= {"max_ctas": max_ctas, "sm_carveout": carveout,
                            "logits_equal_default": bool(torch.equal(lg, logits[("all_to_all",
                                                                                 t)]))}
                    result["knobs"].append(row)
                del r_tbo, r_plain
            torch._C._set_sm_carveout_experimental(None)
    if logits:
        for t in tokens:
            got = [logits[(name, t)] for name in F.transports if (name, t) in logits]
            result["bitwise"][str(t)] = all(torch.equal(got[0], g) for g in got)
    # prefill (eager)
    # the slow-link emulation (multi-node regime): clearly labelled, never the real numbers
    if F.emulated_link_us and not F.timeline_only and device.type == "cuda":
        cycles_per_us = sleep_cycles_per_us(device)
        for delay in (int(x) for x in F.emulated_link_us):
            d = make_dispatcher(cfg, "copy_engine", max_capacity=max_t, device=device,
                                dtype=dtype, comm_stream=comm_stream)
            d.transport = DelayedTransport(d.transport, int(delay * cycles_per_us))
            use_dispatcher(model, d)
            big = [t for t in (256, 1024) if t in tokens] or [max_t]
            r_tbo, r_plain = runner(True, big), runner(False, big)
            for t in big:
                row, _ = decode_row(f"copy_engine + {delay} us/exchange (emulated)", r_tbo,
                                    r_plain, *silent[t], t)
                result["emulated"].append(row | {"delay_us": delay})
            del r_tbo, r_plain
    if F.prefill_tokens and not F.timeline_only:
        del srv
        result["prefill"] = prefill_rows(F, cfg, model, [int(x) for x in F.prefill_tokens],
                                         device, dtype, comm_stream)
    # the timeline step
    if F.timeline_tokens:
        result["timeline"] = record_timeline(F, cfg, model, device, dtype, comm_stream)
    return result


def prefill_rows(F, cfg, model, totals, device, dtype, comm_stream) -> list:
    """One eager EXTEND step per size in ``totals`` (tokens per rank), plain and TBO, for the
    silent transport (compute only) and each measured transport."""
    from torch_impl.attention import TboAttnBackend
    from torch_impl.batch_splitter import TboForwardBatchPreparer
    from torch_impl.expert_parallel import agree_ep_step

    rows = []
    for total in totals:
        # Sequences of PREFILL_LENGTH tokens: the reference attention gathers each token's
        # whole context ([T, length, heads, dim]); long sequences would time the attention.
        seqs, length = max(1, total // PREFILL_LENGTH), min(total, PREFILL_LENGTH)
        srv = serving(cfg, seqs, length, device=device, dtype=dtype)
        for name in ["none"] + list(F.transports):
            use_dispatcher(model, make_dispatcher(cfg, name, max_capacity=total,
                                                  device=device, dtype=dtype,
                                                  comm_stream=comm_stream))
            times = {}
            for tbo in (False, True):
                batch = extend_batch(cfg, srv, seqs, length, device=device)
                if tbo:
                    batch = TboForwardBatchPreparer().prepare(batch)
                step = agree_ep_step(batch, micro_batches=2 if tbo else 1)

                def fn(batch=batch, step=step):
                    backend = TboAttnBackend()
                    backend.init_forward_metadata(batch)
                    return model(batch, backend, ep_step=step)

                times[tbo] = timed(fn, iters=1, repeats=max(3, F.repeats // 2), device=device)
            rows.append({"transport": name, "tokens": total, "plain_ms": times[False],
                         "tbo_ms": times[True], "speedup": times[False] / times[True]})
    return rows


class HostEvent:
    """A stand-in for a CUDA timing event on a CPU (the script's smoke test): host time."""

    def record(self, stream=None):
        self.t = time.perf_counter()

    def elapsed_time(self, other) -> float:
        return (other.t - self.t) * 1e3


def record_timeline(F, cfg, model, device, dtype, comm_stream) -> list:
    """One eager TBO decode step with timing events around every stage (compute stream) and
    every exchange (communication stream): a list of interval dicts (parity_tests/timeline)."""
    import torch

    from torch_impl.attention import TboAttnBackend
    from torch_impl.batch_splitter import TboForwardBatchPreparer
    from torch_impl.expert_parallel import agree_ep_step
    from torch_impl.forward_mode import ForwardMode
    from torch_impl.model import LAYOUTS
    from torch_impl.operations import YieldOperation, split_stages
    from torch_impl.overlap import model_forward_maybe_tbo

    t = F.timeline_tokens
    srv = serving(cfg, t, CONTEXT, device=device, dtype=dtype)
    d = make_dispatcher(cfg, F.timeline_transport, max_capacity=t, device=device, dtype=dtype,
                        comm_stream=comm_stream)
    use_dispatcher(model, d)
    names = [stage.split() for stage in LAYOUTS["decode"].split("|")][:-1]  # trailing "|"
    marks = []

    new_event = (lambda: torch.cuda.Event(enable_timing=True)) if device.type == "cuda" \
        else HostEvent

    def marker(index, where):
        def op(state):
            event = new_event()
            event.record()
            marks.append((state.micro_batch, index, where, event))
        return op

    ops, delta = model.operations(ForwardMode.DECODE)
    wrapped = []
    for index, stage in enumerate(split_stages(ops)):  # each stage between two markers
        wrapped += [marker(index, "start"), *stage, marker(index, "end"), YieldOperation()]

    def step(trace):
        batch = TboForwardBatchPreparer().prepare(decode_batch(cfg, srv, t, device=device))
        ep_step = agree_ep_step(batch, micro_batches=2)
        backend = TboAttnBackend()
        backend.init_forward_metadata(batch)
        d.trace = trace
        marks.clear()
        hidden = model.embed[batch.input_ids]
        start = new_event()
        start.record()
        model_forward_maybe_tbo(wrapped, delta, batch, hidden, attn_backend=backend,
                                ep_capacity=ep_step.capacity)
        d.trace = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return start

    for _ in range(3):
        step(None)
    trace = []
    start = step(trace)
    intervals = []
    opened = {}
    for mb, index, where, event in marks:
        if where == "start":
            opened[(mb, index)] = event
            continue
        begin = opened.pop((mb, index))
        label = f"{'ab'[mb]}{index}: " + " ".join(names[index % len(names)])
        ms0, ms1 = start.elapsed_time(begin), start.elapsed_time(event)
        if ms1 > ms0:
            intervals.append({"lane": "compute", "micro_batch": "ab"[mb], "label": label,
                              "start_ms": ms0, "end_ms": ms1})
    for label, mb, begin, end in trace:
        intervals.append({"lane": "comm", "micro_batch": "ab"[mb], "label": label,
                          "start_ms": start.elapsed_time(begin),
                          "end_ms": start.elapsed_time(end)})
    return intervals


# --- report ------------------------------------------------------------------------------------


def crossover(rows: list) -> dict:
    """Per transport: the smallest measured T from which TBO is faster at every larger T."""
    out = {}
    for name in sorted({r["transport"] for r in rows}):
        mine = sorted((r for r in rows if r["transport"] == name), key=lambda r: r["tokens"])
        wins = [r["speedup"] > 1.0 for r in mine]
        first = None
        for i in range(len(mine)):
            if all(wins[i:]):
                first = mine[i]["tokens"]
                break
        out[name] = first
    return out


def _decode_line(r: dict) -> str:
    return (f"| {r['transport']} | {r['tokens']} | {r['compute_ms']:.3f} | {r['comm_ms']:.3f} | "
            f"{r['plain_ms']:.3f} | {r['tbo_ms']:.3f} | {r['hidden_fraction']:.2f} | "
            f"{r['limit_ratio']:.2f} | {r['speedup']:.2f} |")


def markdown(report: dict) -> str:
    env = report["env"]
    lines = [
        "# Two-batch overlap of the expert-parallel exchange: measured",
        "",
        f"{env['date']}, {env['world_size']} x {env['gpu']}, torch {env['torch']} (CUDA "
        f"{env['cuda']}), NCCL {env['nccl']}, commit `{env['commit']}`. Produced by "
        "`benchmarks/overlap.py`; every figure is a median (see its docstring). Model: "
        f"DeepSeek-V3 MoE slice, hidden {HIDDEN}, top-{TOP_K} of {EXPERTS_PER_RANK} experts "
        f"per rank, expert intermediate {INTERMEDIATE}, one shared expert, {env['layers']} "
        "layers, bfloat16, decode in CUDA graphs.",
        "",
        "## Decode (CUDA graphs), per transport and tokens per rank",
        "",
        "| transport | tokens/rank | compute ms | comm ms | plain ms | TBO ms | hidden fraction "
        "| TBO / max(compute, comm) | plain / TBO |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_decode_line(r) for r in report["decode"]]
    if report["knobs"]:
        lines += ["", "## NCCL's SM trade (all_to_all)", "",
                  "| max_ctas | cuBLAS SM carve-out | tokens/rank | comm ms | TBO ms | hidden "
                  "fraction | TBO / max | plain / TBO | logits unchanged |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in report["knobs"]:
            lines.append(f"| {r['max_ctas'] or 'default'} | {r['sm_carveout']} | {r['tokens']} "
                         f"| {r['comm_ms']:.3f} | {r['tbo_ms']:.3f} | "
                         f"{r['hidden_fraction']:.2f} | {r['limit_ratio']:.2f} | "
                         f"{r['speedup']:.2f} | {r['logits_equal_default']} |")
    if report["prefill"]:
        lines += ["", "## Prefill (eager, EXTEND)", "",
                  "| transport | tokens/rank | plain ms | TBO ms | plain / TBO |",
                  "|---|---|---|---|---|"]
        for r in report["prefill"]:
            lines.append(f"| {r['transport']} | {r['tokens']} | {r['plain_ms']:.2f} | "
                         f"{r['tbo_ms']:.2f} | {r['speedup']:.2f} |")
    if report.get("emulated"):
        lines += ["", "## Emulated slow link (NOT a measurement of a real link)", "",
                  "copy_engine plus a spin of the stated length on the communication stream "
                  "after every send: the regime where communication costs about as much as "
                  "compute (across hosts).", "",
                  "| transport | tokens/rank | compute ms | comm ms | plain ms | TBO ms | hidden "
                  "fraction | TBO / max | plain / TBO |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [_decode_line(r) for r in report["emulated"]]
    lines += ["", "## Crossover and bit-identity", "",
              f"- TBO wins from (tokens per rank, decode): {report['crossover']}",
              f"- Logits bit for bit equal across transports, per token count: "
              f"{report['bitwise']}"]
    return "\n".join(lines) + "\n"


def main(argv) -> int:
    F = _flags()
    F(argv)
    if "RANK" in os.environ:  # a rank (launched below, or by torchrun)
        result = worker(F)
        import torch
        import torch.distributed as dist

        path = os.path.join(F.out_dir, f"overlap-rank{result['rank']}.json")
        with open(path, "w") as f:
            json.dump(result, f)
        if F.device == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        dist.destroy_process_group()
        return 0
    from parity_tests.ep_parity import launch

    os.makedirs(F.out_dir, exist_ok=True)
    passthrough = [a for a in argv[1:] if not a.startswith("--nproc")]
    launch(F.nproc, F.out_dir, passthrough, timeout_s=540, module="benchmarks.overlap",
           report_glob="overlap-rank{rank}.json")
    with open(os.path.join(F.out_dir, "overlap-rank0.json")) as f:
        rank0 = json.load(f)
    import torch

    report = {
        "env": {"date": datetime.date.today().isoformat(), "world_size": F.nproc,
                "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                "torch": torch.__version__, "cuda": torch.version.cuda,
                "nccl": ".".join(map(str, torch.cuda.nccl.version()))
                if torch.cuda.is_available() else None,
                "commit": F.commit, "layers": F.layers},
        "decode": rank0["decode"], "knobs": rank0["knobs"], "prefill": rank0["prefill"],
        "emulated": rank0["emulated"], "bitwise": rank0["bitwise"],
        "crossover": crossover(rank0["decode"]),
    }
    if rank0.get("timeline"):
        with open(os.path.join(F.out_dir, "timeline.json"), "w") as f:
            json.dump(rank0["timeline"], f, indent=1)
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
