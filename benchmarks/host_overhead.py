"""Host overhead of one eager EXTEND step, plain vs two-batch overlap (TBO).

    PYTHONPATH=. python benchmarks/host_overhead.py [--nproc=2] [--tokens=128] [--seq_len=8]
        [--layers=4] [--dtype=bfloat16] [--attention=sdpa] [--repeats=50]
        [--profile=tbo] [--top=40] [--device=cpu] [--size=tiny] [--experts=N]

Why: on 2 H200s, ``benchmarks/overlap.py``'s eager prefill of 1024 tokens per rank (silent
transport) took 20.9 ms plain and 26.2 ms with TBO, with ~19-20 ms of GPU work and 492 vs 975
kernel launches: the TBO step is *host*-bound, its Python and dispatch time per operator,
doubled by the two micro-batches, exceeds the GPU's. That host work hardly depends on the
tensor sizes, so it can be measured on a CPU, with the same model at ``--tiny`` sizes (hidden
32, 2 heads of 8, ``4 * nproc`` experts top-4): with tiny tensors nearly all of a step's time
is Python and operator dispatch.

The model, dispatcher (``make_dispatcher(cfg, "none", ...)``: the silent transport, no
exchange), KV pool and batch are built as ``benchmarks/overlap.py`` builds them, in a process
group of ``--nproc`` ranks on this host (``parity_tests.ep_parity.launch``: gloo on CPUs, NCCL
on GPUs; rank 0 reports). With ``--nproc=1`` the dispatcher is not expert-parallel
(``ep_step=None``); ``--experts=16`` then gives one rank the expert work of a rank of the
2-GPU benchmark (8 experts per rank over 2 ranks' rows). The step timed is the
benchmark's ``fn``: a ``TboAttnBackend`` initialised from the batch, then
``model(batch, backend, ep_step=step)``. ``--device=cuda --size=full`` runs the benchmark's
own sizes on a GPU (hidden 7168, 8 heads of 128, expert intermediate 2048).

Per step, plain and TBO, it prints:

- ``host ms``: median (and min) time for the host to issue one step, over ``--repeats`` (after
  3 warm-ups). On a CPU that is the whole step; on a GPU the step is not waited for, and
  ``wall ms`` (synchronised before and after) is printed beside it;
- ``aten ops``: operators dispatched (counted by a ``TorchDispatchMode``, below autograd;
  composite ops such as ``einsum`` count as what they decompose into), and how many of them
  are views (dispatch cost, no kernel): the others are roughly one kernel launch each on a
  GPU;
- ``syncs?``: operators that read a device tensor on the host when run on a GPU
  (``_local_scalar_dense`` = ``.item()``/``int()``/``bool()``, ``nonzero``, ``masked_select``,
  boolean indexing, ``repeat_interleave`` without ``output_size``) and calls of
  ``Tensor.tolist``, each listed with its call site. On a CPU every tensor is a host tensor,
  so the list also holds reads of ``*_cpu`` fields, which are no sync on a GPU: read the sites
  (today's four are ``int(lens_cpu.max())`` and ``bool((prefix_cpu == 0).all())`` of the
  attention plan, host tensors: the step has no device read);
- ``digest``: SHA-256 of the logits, hidden states and expert load of one more step with the
  ``all_to_all`` transport (the silent one leaves the receive buffers unwritten, so its
  outputs are garbage): a change must leave it the same (same machine, build and options);
- with ``--profile=plain|tbo``: cProfile's top ``--top`` functions by own time.

Measured before and after the host-overhead changes that came with this script (the commit
that added it says what each change is; the digests did not change anywhere):

On this repository's 2-core CPU machine (torch 2.13.0+cpu, the defaults: 2 gloo ranks, 128
tokens per rank in 16 sequences of 8, 4 layers, SdpaAttnBackend; host ms: the median of three
runs' medians over 100 steps each, base and new interleaved on a shared machine):

    dtype     step   host ms        aten ops (views)          kernels (ops - views)
    bfloat16  plain  3.42 -> 2.86    825 (328) ->  554 (188)   497 -> 366
    bfloat16  tbo    5.93 -> 4.65   1638 (658) -> 1094 (376)   980 -> 718
    float32   plain  2.38 -> 1.89    738 (328) ->  504 (188)   410 -> 316
    float32   tbo    3.83 -> 2.90   1467 (658) ->  996 (376)   809 -> 620

On one H200 (torch 2.11.0+cu130; the multi-GPU machines were not lent, so ``--nproc=1
--experts=16``: one rank holding all 16 experts, the same expert GEMM work per rank as the
2-GPU benchmark's 8 experts over 2 ranks' rows), ``--device=cuda --size=full --seq_len=64
--repeats=20``, bfloat16:

    tokens  step   host ms        wall ms        tbo / plain (wall)
    1024    plain  11.1 -> 14.0*  16.6 -> 16.5
    1024    tbo    20.4 -> 15.5   21.8 -> 17.7   1.31x -> 1.07x
    4096    plain  12.1 ->  9.0   56.0 -> 53.2
    4096    tbo    22.5 -> 16.2   59.2 -> 55.3   1.06x -> 1.04x
    128 (--size=tiny): plain 9.4 -> 6.7, tbo 19.1 -> 14.3 host ms

(* a noisy median: its min went 10.1 -> 10.8; the GPU-bound plain step's host time hides
behind its kernels.)
"""

from __future__ import annotations

import argparse
import cProfile
import collections
import hashlib
import io
import json
import os
import pstats
import statistics
import sys
import time
import traceback

# Operators that make a GPU's host wait for the device (a value or a data-dependent shape).
SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "is_nonzero")


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="ranks (gloo on CPUs, one per GPU)")
    p.add_argument("--tokens", type=int, default=128, help="EXTEND tokens per rank")
    p.add_argument("--seq_len", type=int, default=8, help="tokens per fresh sequence")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                   help="model dtype (bfloat16: the GPU's, where .float()/.to() are copies)")
    p.add_argument("--attention", choices=("sdpa", "reference"), default="sdpa")
    p.add_argument("--repeats", type=int, default=50, help="timed steps (median reported)")
    p.add_argument("--profile", choices=("", "plain", "tbo"), default="",
                   help="cProfile this step and print its hotspots")
    p.add_argument("--top", type=int, default=40, help="cProfile rows printed")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--size", choices=("tiny", "full"), default="tiny",
                   help="tiny: overlap.py --tiny's model; full: the benchmark's")
    p.add_argument("--experts", type=int, default=0,
                   help="experts in all (0: the benchmark's, per rank times ranks)")
    p.add_argument("--out_dir", default="/tmp/host_overhead", help="rank reports")
    return p.parse_args(argv)


def _counting_mode():
    """A TorchDispatchMode that counts every operator dispatched, the views among them, and
    where the ones that would sync a GPU were called from."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()
            self.views = 0
            self.syncs = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func.overloadpacket.__name__
            self.ops[name] += 1
            self.views += func.is_view
            sync = name in SYNC_OPS
            if name == "repeat_interleave" and kwargs.get("output_size") is None:
                sync = True
            if name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                       for i in (args[1] if len(args) > 1 else ())):
                sync = True
            if sync:
                self.syncs[f"{name} @ {_call_site()}"] += 1
            return func(*args, **kwargs)

    return Counter()


def _call_site() -> str:
    """The innermost frame in this repository's torch_impl/ or benchmarks/ (not this file)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if ("torch_impl" in frame.filename or "benchmarks" in frame.filename) \
                and not frame.filename.endswith("host_overhead.py"):
            return f"{os.path.basename(frame.filename)}:{frame.lineno} {frame.name}"
    return "?"


class _ToListSpy:
    """Counts ``Tensor.tolist`` calls (a host read of a device tensor on a GPU) by call site."""

    def __init__(self, counts):
        import torch

        self.counts, self.original, self.torch = counts, torch.Tensor.tolist, torch

    def __enter__(self):
        original, counts = self.original, self.counts

        def tolist(tensor):
            counts[f"tolist @ {_call_site()}"] += 1
            return original(tensor)

        self.torch.Tensor.tolist = tolist
        return self

    def __exit__(self, *exc):
        self.torch.Tensor.tolist = self.original


def _digest(out) -> str:
    import torch

    h = hashlib.sha256()
    for t in (out.logits, out.hidden, out.expert_load):
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _config(args, world: int):
    import dataclasses

    from tbo_parity.benchmarks import overlap as ob

    cfg = ob.model_config(world, args.layers, tiny=args.size == "tiny")
    return dataclasses.replace(cfg, num_experts=args.experts) if args.experts else cfg


def _timed(fn, repeats: int, device) -> tuple:
    """(issue ms, wall ms) per step, each a list: the host's time to return from ``fn``, and
    (on a GPU) the time until the device has finished it too."""
    import torch

    cuda = device.type == "cuda"
    issue, wall = [], []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        if cuda:
            torch.cuda.synchronize(device)
        issue.append((t1 - t0) * 1e3)
        wall.append((time.perf_counter() - t0) * 1e3)
    return issue, wall


def _step_row(args, fn, name: str, device) -> dict:
    """One step's host figures: issue and wall times, aten ops, views, host syncs, and (for
    ``--profile``) a cProfile table."""
    for _ in range(3):
        fn()
    issue, wall = _timed(fn, args.repeats, device)
    counter, syncs = _counting_mode(), collections.Counter()
    with counter, _ToListSpy(syncs):
        fn()
    syncs.update(counter.syncs)
    row = {"host_ms": statistics.median(issue), "host_ms_min": min(issue),
           "wall_ms": statistics.median(wall),
           "aten_ops": sum(counter.ops.values()), "views": counter.views,
           "top_ops": counter.ops.most_common(12),
           "sync_candidates": sum(syncs.values()), "syncs": dict(syncs)}
    if args.profile == name:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.repeats):
            fn()
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.top)
        row["cprofile"] = text.getvalue()
    return row


def measure(args) -> dict:
    import torch
    import torch.distributed as dist

    from tbo_parity.benchmarks import overlap as ob
    from tbo_parity.parity_tests.ep_parity import init_rank
    from tbo_parity.torch_impl.attention import TboAttnBackend
    from tbo_parity.torch_impl.batch_splitter import TboForwardBatchPreparer
    from tbo_parity.torch_impl.expert_parallel import agree_ep_step

    if args.device == "cpu":
        torch.set_num_threads(1)  # the ranks share this host's cores
    rank, world, device = init_rank(args.device)
    dtype = getattr(torch, args.dtype)
    cfg = _config(args, world)
    silent, exchanging = (ob.make_dispatcher(cfg, name, max_capacity=args.tokens,
                                             device=device, dtype=dtype)
                          for name in ("none", "all_to_all"))
    model = ob.build_model(cfg, silent, device=device, dtype=dtype, seed=1 + rank)
    length = min(args.tokens, args.seq_len)
    seqs = max(1, args.tokens // length)
    srv = ob.serving(cfg, seqs, length, device=device, dtype=dtype)
    make_backend = ob.attention_backend(args.attention)
    result = {"rank": rank, "world_size": world, "tokens": seqs * length, "seqs": seqs,
              "seq_len": length, "dtype": args.dtype, "device": str(device),
              "experts": cfg.num_experts, "hidden": cfg.hidden_size, "steps": {}}
    for tbo in (False, True):
        name = "tbo" if tbo else "plain"
        batch = ob.extend_batch(cfg, srv, seqs, length, device=device)
        if tbo:
            batch = TboForwardBatchPreparer().prepare(batch)
        step = agree_ep_step(batch, micro_batches=2 if tbo else 1) if world > 1 else None

        def fn(batch=batch, step=step):
            backend = TboAttnBackend(make_backend)
            backend.init_forward_metadata(batch)
            return model(batch, backend, ep_step=step)

        ob.use_dispatcher(model, exchanging)
        digest = _digest(fn())
        ob.use_dispatcher(model, silent)
        result["steps"][name] = _step_row(args, fn, name, device) | {"digest": digest}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()
    dist.destroy_process_group()
    return result


def report(result: dict) -> str:
    cuda = result["device"].startswith("cuda")
    lines = [f"rank {result['rank']} of {result['world_size']} ({result['device']}): "
             f"{result['tokens']} tokens in {result['seqs']} sequences of {result['seq_len']}, "
             f"{result['dtype']}, hidden {result['hidden']}, {result['experts']} experts", "",
             f"{'step':6} {'host ms':>8} {'(min)':>7} "
             + (f"{'wall ms':>8} " if cuda else "")
             + f"{'aten ops':>9} {'(views)':>8} {'syncs?':>7}  digest"]
    for name, row in result["steps"].items():
        lines.append(f"{name:6} {row['host_ms']:8.2f} {row['host_ms_min']:7.2f} "
                     + (f"{row['wall_ms']:8.2f} " if cuda else "")
                     + f"{row['aten_ops']:9d} {row['views']:8d} {row['sync_candidates']:7d}  "
                     f"{row['digest']}")
    plain, tbo = result["steps"]["plain"], result["steps"]["tbo"]
    lines.append(f"tbo / plain: host {tbo['host_ms'] / plain['host_ms']:.2f}x, "
                 + (f"wall {tbo['wall_ms'] / plain['wall_ms']:.2f}x, " if cuda else "")
                 + f"ops {tbo['aten_ops'] / plain['aten_ops']:.2f}x")
    for name, row in result["steps"].items():
        lines += ["", f"{name}: most frequent ops: " + ", ".join(
            f"{op} {n}" for op, n in row["top_ops"])]
        lines += [f"{name}: sync candidate {n}x {where}" for where, n in row["syncs"].items()]
        if "cprofile" in row:
            lines += ["", row["cprofile"]]
    return "\n".join(lines)


def main(argv) -> int:
    args = _args(argv[1:])
    if "RANK" in os.environ:  # a rank launched below (or by torchrun)
        result = measure(args)
        with open(os.path.join(args.out_dir, f"rank{result['rank']}.json"), "w") as f:
            json.dump(result, f)
        return 0
    from tbo_parity.parity_tests.ep_parity import launch

    passthrough = [a for a in argv[1:] if not a.startswith("--out_dir")]
    ranks = launch(args.nproc, args.out_dir, passthrough, timeout_s=600,
                   module="tbo_parity.benchmarks.host_overhead")
    print(report(ranks[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
