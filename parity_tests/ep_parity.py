"""Expert-parallel parity on N ranks: every rank's outputs against the single-device JAX spec.

Data-parallel attention with expert parallelism, as DeepSeek-style serving runs it: each rank
has its own batch and KV cache, and the routed experts are sharded over the ranks, so a
token's MoE output is computed partly on other ranks. Mathematically nothing changes per
token, so rank ``r``'s outputs must equal the single-device spec run on rank ``r``'s batch
alone (docs/model.md, "Expert parallelism").

A rank is a process. ``launch`` starts N of them on this host with the environment
``torchrun`` sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so the worker also
runs under ``torchrun --nproc-per-node N -m tbo_parity.parity_tests.ep_parity
--out_dir=...``. Each rank writes ``rank<r>.json``; ``launch`` kills every rank if one fails or
time runs out, and never waits without a limit.

The ranks run the PyTorch side only. A model or graph row names the batch it ran (the
scenario, the rank) and its outputs go to ``rank<r>.npz``; ``check_launch`` (``launch`` and
then ``compare_with_spec``) runs the JAX spec on each batch in the launching process, once per
distinct batch however many ranks, dispatchers or launches ran it (``spec_outputs``), and
writes the comparisons into the rows. Run under ``torchrun``, the worker leaves that step to
``compare_with_spec``.

Checks on every rank (each a row of the JSON):

- ``layer``: dispatch -> local experts -> combine of crafted routings (uneven loads, an expert
  that receives nothing, padding rows, a rank with no tokens) against ``LocalDispatcher`` with
  every expert on one device; with several transports, their outputs bit for bit;
- ``model``: the MoE model, plain and with TBO, in DECODE, TARGET_VERIFY and EXTEND, with an
  idle rank, a rank whose child A is empty, every rank idle at once, every rank's child A
  empty at once and a padded batch, against the JAX spec;
- ``graph`` (CUDA only): the same model captured in CUDA graphs per batch size, plain and TBO,
  every rank replaying the graph that fits the largest rank's batch.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import time
from typing import Optional, Sequence

SHUTDOWN_GRACE_S = 20  # after the last rank reported, how long teardown may take


# --- the launcher ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(nproc: int, out_dir: str, args: Sequence[str] = (), *, timeout_s: float,
           env: Optional[dict] = None, module: str = "tbo_parity.parity_tests.ep_parity",
           report_glob: str = "rank{rank}.json", base_env: Optional[dict] = None,
           stop=None) -> list:
    """Run ``nproc`` ranks of ``module`` (this module's worker by default); return each rank's
    report, the JSON file ``report_glob`` names in ``out_dir``. The ranks' environment is
    ``base_env`` (default this process's) with ``env`` and the rank's variables added;
    ``stop``: an event (``threading.Event``) that, once set, ends the run as a timeout does.

    Raises RuntimeError naming the rank and showing the end of its output if a rank exits
    non-zero, the run exceeds ``timeout_s`` or ``stop`` is set; every rank is killed before it
    returns."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an int >= 1, got {nproc!r}")
    os.makedirs(out_dir, exist_ok=True)
    port = free_port()
    procs, logs = [], []
    for rank in range(nproc):
        # one host's cores shared by the ranks (torch's CPU kernels would each take them all)
        rank_env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
        rank_env.update(os.environ if base_env is None else base_env)
        rank_env.update(env or {})
        rank_env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                        LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port), PYTHONUNBUFFERED="1")
        log = open(os.path.join(out_dir, f"rank{rank}.log"), "w")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", module, f"--out_dir={out_dir}", *args],
            env=rank_env, stdout=log, stderr=subprocess.STDOUT, process_group=0))
    deadline = time.monotonic() + timeout_s
    failure = None
    try:
        while any(p.poll() is None for p in procs):
            bad = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
            if bad:
                failure = f"rank {bad[0]} exited with {procs[bad[0]].returncode}"
                break
            if time.monotonic() > deadline:
                waiting = [r for r, p in enumerate(procs) if p.poll() is None]
                failure = f"timed out after {timeout_s:.0f} s; ranks {waiting} still running"
                break
            if stop is not None and stop.is_set():
                failure = "stopped before every rank finished"
                break
            time.sleep(0.05)
        else:
            bad = [r for r, p in enumerate(procs) if p.returncode != 0]
            if bad:
                failure = f"rank {bad[0]} exited with {procs[bad[0]].returncode}"
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
        for log in logs:
            log.close()
    if failure:
        tails = []
        for rank in range(nproc):
            with open(os.path.join(out_dir, f"rank{rank}.log")) as f:
                tails.append(f"--- rank {rank} ---\n" + "".join(f.readlines()[-25:]))
        raise RuntimeError(f"{failure}\n" + "\n".join(tails))
    reports = []
    for rank in range(nproc):
        with open(os.path.join(out_dir, report_glob.format(rank=rank))) as f:
            reports.append(json.load(f))
    return reports


def check_launch(nproc: int, out_dir: str, args: Sequence[str] = (), **launch_kwargs) -> list:
    """``launch`` this module's worker, then ``compare_with_spec``: the ranks' reports with
    every model and graph row held against the spec."""
    return compare_with_spec(launch(nproc, out_dir, args, **launch_kwargs), out_dir)


# --- the spec, in the launching process --------------------------------------------------------


@functools.lru_cache(maxsize=None)
def spec_outputs(batch, dtype_name: str) -> dict:
    """The JAX spec's outputs (read-only arrays) on ``batch``: what a ``model_scenarios``
    function returns for a rank, or ``("graph", rank, mode)`` for ``graph_world``'s. Cached:
    the spec is a pure function of the batch, and batches recur (on every dispatcher, and on
    the same rank of another launch)."""
    from tbo_parity.parity_tests import model_parity as mp

    ref_cfg, weights = _spec_model()
    if isinstance(batch, tuple) and batch[0] == "graph":
        world = graph_world(batch[1], batch[2], ref_cfg)
    else:
        world = _world(batch, ref_cfg)
    outputs = mp.run_oracle(world, ref_cfg, weights, dtype_name)
    for array in outputs.values():
        array.flags.writeable = False
    return outputs


@functools.lru_cache(maxsize=1)
def _spec_model() -> tuple:
    """(JAX config, numpy weights) of the ranks' model (``make_models(0)``)."""
    from tbo_parity.parity_tests import model_parity as mp

    ref_cfg, _, weights, _ = mp.make_models(0)
    return ref_cfg, weights


def _batch_of(row: dict, rank: int, world_size: int):
    """The batch a model or graph row ran, as ``spec_outputs`` takes it."""
    if row["check"] == "model":
        return model_scenarios(world_size)[row["name"]](rank)
    return "graph", rank, row["mode"]


def compare_with_spec(reports: list, out_dir: str) -> list:
    """Fill each model and graph row of the ranks' ``reports`` with its comparison against the
    spec (the outputs are read from ``rank<r>.npz`` in ``out_dir``): ``errors`` (relative, per
    output), ``error`` (their max) and ``expert_load_equal``; a model row also
    ``shapes_equal`` and ``zero_load_experts`` (experts the spec gave no token)."""
    import numpy as np

    from tbo_parity.parity_tests import model_parity as mp

    for report in reports:
        rank, world_size = report["rank"], report["world_size"]
        with np.load(os.path.join(out_dir, f"rank{rank}.npz")) as stored:
            arrays = {name: stored[name] for name in stored.files}
        for row in report["rows"]:
            if "outputs" not in row:
                continue
            key = row.pop("outputs")
            want = spec_outputs(_batch_of(row, rank, world_size), report["dtype"])
            model = row["check"] == "model"
            names = mp.OUTPUTS if model else ("hidden", "logits")  # a graph row: no pools
            got = {name: arrays[f"{key}/{name}"] for name in names + ("expert_load",)}
            errors = mp.relative_errors(got, want, names=names)
            if model:
                # relative_errors broadcasts: a wrong row count must fail on its own
                row["shapes_equal"] = all(got[n].shape == want[n].shape for n in got)
                row["zero_load_experts"] = int((want["expert_load"].sum(0) == 0).sum())
            row["errors"], row["error"] = errors, max(errors.values())
            row["expert_load_equal"] = bool(np.array_equal(got["expert_load"],
                                                           want["expert_load"]))
    return reports


# --- what each rank runs -----------------------------------------------------------------------

# Per-rank scenarios: the case of rank r is built from ``cases(r)``; ranks differ in batch size,
# lengths and seed, so capacity, padding and splits differ per rank.


def model_scenarios(world_size: int) -> dict:
    """name -> function rank -> ModelCase (or ("padded", case, n) for a padded batch)."""
    from tbo_parity.parity_tests.model_parity import ModelCase

    def decode(r):
        return ModelCase("DECODE", tuple(3 + 2 * i + r for i in range(2 + r % 3)), seed=20 + r)

    def verify(r):
        return ModelCase("TARGET_VERIFY", tuple(4 + i + r for i in range(2 + r % 2)),
                         draft_token_num=3, tree=bool(r % 2), seed=30 + r)

    def extend(r):
        lens = tuple(2 + (3 * i + r) % 7 for i in range(2 + r % 2))
        return ModelCase("EXTEND", tuple(i % 3 for i in range(len(lens))), lens, seed=40 + r)

    def idle_rank(r):  # the last rank has nothing to run but still hosts experts
        return ModelCase("IDLE", ()) if r == world_size - 1 else decode(r)

    def one_sequence(r):  # rank 0's child A is empty under TBO (one sequence: A gets bs // 2)
        return ModelCase("DECODE", (7,), seed=50) if r == 0 else decode(r)

    def padded(r):
        return ("padded", ModelCase("DECODE", tuple(5 + i for i in range(2 + r)), seed=60 + r),
                1 + r)

    def all_idle(r):  # every rank idle at once: no busy rank names the layout or the capacity
        return ModelCase("IDLE", ())

    def all_child_a_empty(r):  # one sequence per rank: under TBO every rank's child A is empty
        # (docs/spec.md, split case 11); DECODE (1 token) and TARGET_VERIFY (3 tokens) alternate,
        # both the decode layout, so rank 0 offers fewer rows than the capacity
        if r % 2:
            return ModelCase("TARGET_VERIFY", (4 + r,), draft_token_num=3, seed=80 + r)
        return ModelCase("DECODE", (5 + r,), seed=80 + r)

    return {"decode": decode, "target-verify": verify, "extend": extend,
            "idle-rank": idle_rank, "one-sequence": one_sequence, "decode-padded": padded,
            "all-idle": all_idle, "all-child-a-empty": all_child_a_empty}


def layer_routings(rank: int, world_size: int, num_experts: int, top_k: int, tokens: int):
    """name -> topk_ids [T, K] (int64 numpy) of crafted routings for one rank."""
    import numpy as np

    rng = np.random.default_rng(100 + rank)

    def distinct(rows, choices):
        return np.stack([rng.choice(choices, top_k, replace=False) for _ in range(rows)])

    everyone = np.arange(num_experts)
    uneven = distinct(tokens, everyone)
    uneven[:, 0] = 0  # every token's first pick is expert 0
    uneven[:, 1:] = np.where(uneven[:, 1:] == 0, num_experts - 1, uneven[:, 1:])
    routings = {
        "uniform": distinct(tokens, everyone),
        "uneven": uneven,
        "empty-expert": distinct(tokens, everyone[everyone != 1]),  # expert 1 gets nothing
        "padding": distinct(tokens, everyone),
        "idle-rank": distinct(tokens, everyone),
    }
    routings["padding"][tokens // 2:] = -1
    if rank == world_size - 1:
        routings["idle-rank"] = routings["idle-rank"][:0]
    return routings


def _relative(x, y) -> float:
    import numpy as np

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = max(float(np.abs(y).max(initial=0.0)), 1e-30)
    return float(np.abs(x - y).max(initial=0.0)) / scale


def check_layer(dispatchers: dict, cfg, weights, *, device, dtype, rank, world_size) -> list:
    """The EP exchange + local experts of every crafted routing against LocalDispatcher."""
    import torch

    from tbo_parity.torch_impl import moe

    rows = []
    tokens = 12
    g = {n: torch.as_tensor(weights[f"layers.0.experts_{n}"]).to(device=device, dtype=dtype)
         for n in ("gate", "up", "down")}
    local = moe.LocalDispatcher(cfg.num_experts)
    gen = torch.Generator().manual_seed(7 + rank)
    for name, ids in layer_routings(rank, world_size, cfg.num_experts, cfg.top_k,
                                    tokens).items():
        count = ids.shape[0]
        hidden = torch.randn(count, cfg.hidden_size, generator=gen).to(device=device,
                                                                        dtype=dtype)
        w = torch.rand(count, cfg.top_k, generator=gen).to(device)
        topk_ids = torch.as_tensor(ids, device=device)
        w = w.masked_fill(topk_ids < 0, 0.0)
        if count:
            dispatched = local.dispatch_launch(hidden, w, topk_ids)
            want = local.combine_launch(local.experts(dispatched, g["gate"], g["up"],
                                                      g["down"]), dispatched)
        else:
            want = torch.zeros(0, cfg.hidden_size)
        outputs = {}
        for transport, disp in dispatchers.items():
            handle = disp.dispatch_wait(disp.dispatch_launch(hidden, w, topk_ids,
                                                             micro_batch=0, capacity=tokens))
            out = disp.experts(handle, *(disp.experts_of(g[n]) for n in ("gate", "up", "down")))
            got = disp.combine_wait(disp.combine_launch(out, handle))
            outputs[transport] = got.cpu()
            rows.append({"check": "layer", "name": name, "transport": transport,
                         "tokens": count, "error": _relative(got.cpu(), want.cpu()),
                         "pairs_to_expert_1": int((topk_ids == 1).sum())})
        for layout in sorted({key.split("/")[0] for key in outputs}):  # within a layout
            same = [o for key, o in outputs.items() if key.split("/")[0] == layout]
            rows.append({"check": "layer-transports", "name": name, "layout": layout,
                         "transports": len(same),
                         "bitwise_equal": all(torch.equal(same[0], o) for o in same)})
    return rows


def _world(spec, ref_cfg):
    from tbo_parity.parity_tests import model_parity as mp

    if isinstance(spec, tuple):
        _, case, pad = spec
        return mp.pad_world(mp.build_world(case, ref_cfg), pad)
    return mp.build_world(spec, ref_cfg)


def check_model(model, ref_cfg, outputs: dict, *, dtype_name, rank, world_size,
                only=None) -> list:
    """Plain and TBO forwards of every scenario; each row's outputs go into ``outputs`` under
    the row's ``"outputs"`` key, for ``compare_with_spec``."""
    from tbo_parity.parity_tests import model_parity as mp
    from tbo_parity.torch_impl.attention import TboAttnBackend
    from tbo_parity.torch_impl.batch_splitter import TboForwardBatchPreparer
    from tbo_parity.torch_impl.expert_parallel import agree_ep_step

    rows = []
    device = model.embed.device
    for name, make in model_scenarios(world_size).items():
        if only is not None and name not in only:
            continue
        world = _world(make(rank), ref_cfg)
        for tbo in (False, True):
            batch = mp.torch_batch(world, dtype=mp.TORCH_DTYPES[dtype_name], device=device)
            backend = TboAttnBackend()
            if tbo and not batch.forward_mode.is_idle():
                batch = TboForwardBatchPreparer().prepare(batch)
            step = agree_ep_step(batch, micro_batches=2 if tbo else 1)
            if not batch.forward_mode.is_idle():
                backend.init_forward_metadata(batch)
            out = model(batch, backend, ep_step=step)
            key = len(outputs)
            outputs[key] = {"hidden": out.hidden.float().cpu().numpy(),
                            "logits": out.logits.float().cpu().numpy(),
                            "k_pool": batch.kv_pool.k.float().cpu().numpy(),
                            "v_pool": batch.kv_pool.v.float().cpu().numpy(),
                            "expert_load": out.expert_load.cpu().numpy()}
            rows.append({"check": "model", "name": name, "tbo": tbo, "mode": world.case.mode,
                         "capacity": step.capacity, "micro_batches": step.micro_batches,
                         "strategy": step.strategy, "tokens": batch.num_tokens,
                         "child_tokens": None if batch.tbo_children is None else [
                             end - start for start, end in (c.tbo_parent_token_range
                                                            for c in batch.tbo_children)],
                         "outputs": key})
    return rows


GRAPH_MAX_BS, GRAPH_CONTEXT = 16, 24  # check_graphs' serving layout


def graph_world(rank: int, mode: str, ref_cfg):
    """The batch rank ``rank`` replays in ``check_graphs`` (DECODE or TARGET_VERIFY with 3
    drafts): ``2 + 3 * rank`` sequences on the graphs' serving layout."""
    import numpy as np

    from tbo_parity.parity_tests import model_parity as mp

    layout = mp.serving_layout(ref_cfg, GRAPH_MAX_BS, GRAPH_CONTEXT, 0)
    real_bs = 2 + 3 * rank  # ranks differ: every rank but the last pads more
    rng = np.random.default_rng(70 + rank)
    prefix = tuple(int(p) for p in rng.integers(1, GRAPH_CONTEXT - 3, size=real_bs))
    case = mp.ModelCase(mode, prefix, draft_token_num=3 if mode == "TARGET_VERIFY" else None,
                        tree=True, seed=70 + rank)
    return mp.build_world(case, ref_cfg, layout)


def check_graphs(model, ref_cfg, outputs: dict, *, dtype_name, rank, world_size) -> list:
    """CUDA-graph replay on every rank: each rank its own batch size, all ranks the graph
    that fits the largest rank's batch (``dp_batch_size``), plain and TBO. Outputs as in
    ``check_model``."""
    import torch
    import torch.distributed as dist

    from tbo_parity.parity_tests import model_parity as mp
    from tbo_parity.torch_impl.cuda_graph_runner import CudaGraphRunner
    from tbo_parity.torch_impl.kv_cache import KVPool

    rows = []
    device = model.embed.device
    dtype = mp.TORCH_DTYPES[dtype_name]
    layout = mp.serving_layout(ref_cfg, GRAPH_MAX_BS, GRAPH_CONTEXT, 0)
    dp_bs = 2 + 3 * (world_size - 1)
    for tbo in (False, True):
        req_to_token = torch.tensor(layout.req_to_token, device=device)
        pool = KVPool(torch.tensor(layout.k_pool).to(device, dtype),
                      torch.tensor(layout.v_pool).to(device, dtype))
        runner = CudaGraphRunner(
            model, pool, req_to_token, max_context_len=GRAPH_CONTEXT,
            padding_slot=layout.padding_slot, padding_req_row=layout.padding_req_row,
            draft_token_nums=(3,), batch_sizes=[2, 4, 8, 16] if tbo else [1, 2, 4, 8, 16],
            tbo=tbo)
        for mode in ("DECODE", "TARGET_VERIFY"):
            world = graph_world(rank, mode, ref_cfg)
            pool.k.copy_(torch.tensor(layout.k_pool).to(device, dtype))
            pool.v.copy_(torch.tensor(layout.v_pool).to(device, dtype))
            batch = mp.torch_batch(world, dtype=dtype, device=device,
                                   pools=(req_to_token, pool))
            out = runner.replay(batch, dp_batch_size=dp_bs)
            key = len(outputs)
            outputs[key] = {"hidden": out.hidden.float().cpu().numpy(),
                            "logits": out.logits.float().cpu().numpy(),
                            "expert_load": out.expert_load.cpu().numpy()}
            rows.append({"check": "graph", "mode": mode, "tbo": tbo, "outputs": key,
                         "name": f"{mode.lower()}-bs{batch.batch_size}-in-{dp_bs}"})
        del runner
        torch.cuda.synchronize(device)
        dist.barrier()
    return rows


# What the worker checks by default: both layouts, every transport a CPU has.
DEFAULT_DISPATCHERS = ("packed/all_to_all", "packed/exact", "capacity/all_to_all")
FAULTS = {"rotate_destinations": "capacity", "counts_short": "packed"}  # fault -> its layout


def faulty_dispatcher_type(fault: str = "rotate_destinations"):
    """A dispatcher with a planted bug, for the negative tests. ``rotate_destinations``
    (capacity layout): its pairs go to the wrong ranks (each destination gets the block meant
    for the next rank). ``counts_short`` (packed layout): it reports one row fewer for its
    first non-empty (destination, local expert), so that expert's last row is left out."""
    import torch

    from tbo_parity.torch_impl.expert_parallel import ExpertParallelDispatcher
    from tbo_parity.torch_impl.packed_dispatch import PackedDispatcher

    class RotateDestinations(ExpertParallelDispatcher):
        @staticmethod
        def pack(send, rows, hidden, topk_ids, capacity) -> None:
            ExpertParallelDispatcher.pack(send, rows, hidden, topk_ids, capacity)
            send.copy_(send.roll(1, dims=0))

    class CountsShort(PackedDispatcher):
        @staticmethod
        def pack(rows, counts_out, hidden, topk_ids, num_ranks, num_experts, region):
            placed = PackedDispatcher.pack(rows, counts_out, hidden, topk_ids, num_ranks,
                                           num_experts, region)
            flat = counts_out.view(-1)
            first = (flat > 0).to(torch.int32).argmax()  # device-side: no host read
            flat[first] -= (flat[first] > 0).to(flat.dtype)
            return placed

    return {"rotate_destinations": RotateDestinations, "counts_short": CountsShort}[fault]


def worker_main(argv) -> int:
    """One rank: build the sharded model, run the checks, write ``rank<r>.json``."""
    from absl import flags

    FLAGS = flags.FlagValues()
    flags.DEFINE_string("out_dir", None, "where rank<r>.json goes", flag_values=FLAGS)
    flags.DEFINE_enum("device", "cpu", ["cpu", "cuda"], "cpu (gloo) or cuda (nccl)",
                      flag_values=FLAGS)
    flags.DEFINE_list("dispatchers", list(DEFAULT_DISPATCHERS),
                      "layout/transport pairs: packed/all_to_all, packed/exact, "
                      "capacity/all_to_all, capacity/copy_engine", flag_values=FLAGS)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "model dtype",
                      flag_values=FLAGS)
    flags.DEFINE_bool("graphs", False, "also CUDA-graph replay (cuda only)", flag_values=FLAGS)
    flags.DEFINE_list("scenarios", None, "model scenarios to run (default: all)",
                      flag_values=FLAGS)
    flags.DEFINE_multi_enum("fault", [], list(FAULTS),
                            "negative tests only: plant a bug on rank 0, in the dispatchers of "
                            "its layout (rotate_destinations: its pairs go to the wrong ranks, "
                            "capacity layout; counts_short: one count one row short, packed "
                            "layout); parity must then fail. Repeat the flag for both",
                            flag_values=FLAGS)
    FLAGS(argv)

    import numpy as np
    import torch

    from tbo_parity.parity_tests import model_parity as mp
    from tbo_parity.torch_impl.model import MoEModel
    from tbo_parity.torch_impl.packed_dispatch import make_dispatcher

    rank, world_size, device = init_rank(FLAGS.device)
    started = time.time()
    dtype = mp.TORCH_DTYPES[FLAGS.dtype]
    ref_cfg, torch_cfg, weights, _ = mp.make_models(0)
    report = {"rank": rank, "world_size": world_size, "device": str(device),
              "dtype": FLAGS.dtype, "torch": torch.__version__, "rows": []}
    outputs = {}  # row key -> the arrays compare_with_spec holds against the spec
    dispatchers = {}
    for key in FLAGS.dispatchers:
        layout, transport = key.split("/")
        kwargs = dict(hidden_size=torch_cfg.hidden_size, max_capacity=128, dtype=dtype,
                      device=device, transport=transport)
        fault = next((f for f in FLAGS.fault if FAULTS[f] == layout), None) if rank == 0 else None
        if fault is not None:
            dispatchers[key] = faulty_dispatcher_type(fault)(
                torch_cfg.num_experts, **kwargs,
                **({"top_k": torch_cfg.top_k} if layout == "packed" else {}))
        else:
            dispatchers[key] = make_dispatcher(torch_cfg.num_experts, layout=layout,
                                               top_k=torch_cfg.top_k, **kwargs)
    report["rows"] += check_layer(dispatchers, torch_cfg, weights, device=device, dtype=dtype,
                                  rank=rank, world_size=world_size)
    for transport, dispatcher in dispatchers.items():
        model = MoEModel(torch_cfg, weights, dtype=dtype, device=device, dispatcher=dispatcher)
        for row in check_model(model, ref_cfg, outputs, dtype_name=FLAGS.dtype, rank=rank,
                               world_size=world_size, only=FLAGS.scenarios):
            report["rows"].append(row | {"transport": transport})
        if FLAGS.graphs and not transport.endswith("/exact"):  # exact refuses capture
            for row in check_graphs(model, ref_cfg, outputs, dtype_name=FLAGS.dtype,
                                    rank=rank, world_size=world_size):
                report["rows"].append(row | {"transport": transport})
    report["seconds"] = time.time() - started
    report["imported_jax"] = "jax" in sys.modules  # the spec runs in the launching process
    np.savez(os.path.join(FLAGS.out_dir, f"rank{rank}.npz"),
             **{f"{key}/{name}": array for key, arrays in outputs.items()
                for name, array in arrays.items()})
    with open(os.path.join(FLAGS.out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f, indent=1)
    shutdown(device)
    return 0


def init_rank(device_type: str) -> tuple:
    """``(rank, world_size, device)`` of this process, its process group initialised from the
    environment torchrun (or ``launch``) sets: NCCL on its own GPU for "cuda", gloo for "cpu"."""
    import torch
    import torch.distributed as dist

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world_size, device


def shutdown(device) -> None:
    """Leave the process group without hanging: every rank reaches a barrier, the device is
    idle, then the group is destroyed (after CUDA-graph capture a bare destroy was seen to
    hang; ``launch`` still bounds it)."""
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv))
