"""CUDA-graph decode benchmark: eager forward vs graph replay, plain and with two-batch overlap.

    PYTHONPATH=. python3 benchmarks/cuda_graph.py [--out_dir=docs] [--iters=200] [--warmup=20]
        [--host_calls=1000] [--batch_sizes=1,2,4,8,16,32,64] [--models=default,wide]
        [--seed=0] [--commit=SHA] [--quick] [--allow_cpu]

For each model ("default": the default ``ModelConfig``, hidden 64; "wide": hidden 1024), both in
bfloat16, the benchmark builds a serving layout (request table and KV pools for 64 requests of
up to 64 tokens) and a ``CudaGraphRunner`` capturing DECODE only (``max_bs=64``,
``max_context_len=64``), once with ``tbo=False`` and once with ``tbo=True``. At every batch
size it builds one real random DECODE batch on the runner's pools (``GraphHarness.world`` /
``batch``) and measures:

1. **Eager step** (``eager_ms``): ``runner.eager(batch)``, the forward launched op by op
   (split into two micro-batches by the preparer under TBO).
2. **Graph step** (``graph_ms``): ``runner.replay(batch)``, the whole replay: host
   preparation (check, plan, copy the inputs into the static buffers, padding, real-token
   counts) plus the graph launch. ``speedup`` = eager / graph.
3. **Host cost of ``plugin.replay_prepare``** (``replay_prepare_us``, TBO only): the plugin's
   per-step work, called with the arguments the runner passes (mode, the graph's batch size
   from ``runner.plan(batch)``, the real-token count, ``spec_info``).
4. **Host cost of the whole replay preparation** (``prepare_replay_us``):
   ``runner.prepare_replay(batch)``, everything a replay does before the graph launch.

Steps 1 and 2 run back to back ``--iters`` times after ``--warmup`` untimed runs; each run sits
between two CUDA events on the current stream, and the number reported is the **median** of
the per-run elapsed times, in milliseconds. Consecutive runs are not synchronised: a step that
is launch-bound measures as the time the host takes to issue it (the GPU waits between
kernels), a step that is GPU-bound as its GPU time. Nothing is reset between runs: a step
writes the same KV slots with the same values every time.

A "host cost" is CPU wall time (``time.perf_counter_ns``) around one call: Python work plus
issuing the call's kernels and copies, never waiting for them. The GPU is synchronised before
timing and, outside the timed window, every ``SYNC_EVERY`` calls so that the launch queue
never fills (a full queue would block a launch and charge GPU time to the host). Reported as
the median over ``--host_calls`` calls, in microseconds.

Targets (reported as met / missed, never asserted): graph replay at least 3x faster than eager
at batch sizes <= 16; ``replay_prepare`` under 50 us per step; the whole replay preparation
under 200 us at batch size 64.

Writes ``<out_dir>/cuda-graph-benchmark.json`` (every number, with the date, card, versions,
commit, model configs and settings) and ``<out_dir>/cuda-graph-benchmark.md`` (a Markdown
section: tables per model and the targets), and prints the Markdown last.

Without a CUDA device it prints why and exits 2; ``--quick --allow_cpu`` instead runs the same
code on the CPU (the runner with ``use_cuda_graph=False``, host timers instead of CUDA events)
with tiny iteration counts: a smoke test of the script, not a measurement.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
import types
from typing import Callable, Optional

# The JAX spec (imported with parity_tests) is not used here; keep it off the GPU so that it
# neither initialises CUDA nor preallocates the card's memory.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import torch  # noqa: E402
from absl import app, flags  # noqa: E402

from tbo_parity.parity_tests import graph_parity as gp  # noqa: E402
from tbo_parity.parity_tests import model_parity as mp  # noqa: E402
from tbo_parity.reference.weights import ModelConfig  # noqa: E402
from tbo_parity.torch_impl.cuda_graph_runner import CudaGraphRunner  # noqa: E402
from tbo_parity.torch_impl.kv_cache import KVPool  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out_dir", "docs", "Where the JSON and Markdown results are written.")
flags.DEFINE_integer("iters", 200, "Timed runs per measured step.", lower_bound=1)
flags.DEFINE_integer("warmup", 20, "Untimed runs before each measured step.", lower_bound=0)
flags.DEFINE_integer("host_calls", 1000, "Timed calls per host-cost measurement.",
                     lower_bound=1)
flags.DEFINE_list("batch_sizes", "1,2,4,8,16,32,64", "Real batch sizes to measure (<= 64).")
flags.DEFINE_list("models", "default,wide", "Models to measure: default, wide.")
flags.DEFINE_integer("seed", 0, "Seed of the weights, the layout and the batches.")
flags.DEFINE_string("commit", "", "Commit to record (default: `git rev-parse HEAD`, else "
                    "\"unknown\"; pass it where the tree has no .git).")
flags.DEFINE_bool("quick", False, "Tiny iteration counts (a smoke test, not a measurement).")
flags.DEFINE_bool("allow_cpu", False, "With --quick and no CUDA device: run on the CPU "
                  "(use_cuda_graph=False) to smoke-test the script.")

DTYPE_NAME = "bfloat16"
MAX_BS = 64
MAX_CONTEXT_LEN = 64
SYNC_EVERY = 50  # host-cost calls between two synchronisations (outside the timed window)
QUICK = types.MappingProxyType({"iters": 3, "warmup": 1, "host_calls": 10})
# ModelConfig overrides per model; "wide" keeps the default's 2 layers, vocabulary and routing.
MODEL_OVERRIDES = types.MappingProxyType({
    "default": types.MappingProxyType({}),
    "wide": types.MappingProxyType(dict(hidden_size=1024, num_heads=8, head_dim=128,
                                        intermediate_size=512, num_experts=8, top_k=2,
                                        num_shared_experts=1, vocab_size=128)),
})
SPEEDUP_TARGET = 3.0
SPEEDUP_MAX_BS = 16
REPLAY_PREPARE_TARGET_US = 50.0
PREPARE_REPLAY_TARGET_US = 200.0
PREPARE_REPLAY_TARGET_BS = 64
JSON_NAME = "cuda-graph-benchmark.json"
MARKDOWN_NAME = "cuda-graph-benchmark.md"


@dataclasses.dataclass(frozen=True)
class Settings:
    device: torch.device
    use_cuda_graph: bool
    iters: int
    warmup: int
    host_calls: int
    batch_sizes: tuple
    models: tuple
    seed: int
    quick: bool


class BenchHarness(gp.GraphHarness):
    """``GraphHarness`` with a chosen model config and a DECODE-only runner.

    ``GraphHarness`` builds the default model (and routes bfloat16 densely, for parity); a
    benchmark wants the production routing and a wider model, so this constructor builds the
    same pieces (model, serving layout, pools, runner) from ``overrides`` and inherits
    ``world`` and ``batch``."""

    def __init__(self, *, device: torch.device, overrides, tbo: bool, use_cuda_graph: bool,
                 seed: int):
        self.device, self.dtype_name = device, DTYPE_NAME
        self.dtype = mp.TORCH_DTYPES[DTYPE_NAME]
        self.ref_cfg, _, self.weights, self.model = mp.make_models(
            seed=seed, dtype=self.dtype, device=device, **overrides)
        self.max_context_len = MAX_CONTEXT_LEN
        self.layout = mp.serving_layout(self.ref_cfg, MAX_BS, MAX_CONTEXT_LEN, seed)
        self.req_to_token = torch.tensor(self.layout.req_to_token, device=device)
        self.pool = KVPool(torch.tensor(self.layout.k_pool).to(device, self.dtype),
                           torch.tensor(self.layout.v_pool).to(device, self.dtype))
        self.initial = self.pool.clone()
        self.runner = CudaGraphRunner(
            self.model, self.pool, self.req_to_token, max_context_len=MAX_CONTEXT_LEN,
            padding_slot=self.layout.padding_slot, padding_req_row=self.layout.padding_req_row,
            decode=True, draft_token_nums=(), max_bs=MAX_BS, tbo=tbo,
            use_cuda_graph=use_cuda_graph)


# --- timers ------------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_ms(step: Callable[[], object], settings: Settings) -> float:
    """Median elapsed time (ms) of ``step()`` run back to back, each run between two CUDA
    events (on the CPU: ``perf_counter_ns`` around each run)."""
    for _ in range(settings.warmup):
        step()
    _synchronize(settings.device)
    if settings.device.type != "cuda":
        elapsed_ms = []
        for _ in range(settings.iters):
            start_ns = time.perf_counter_ns()
            step()
            elapsed_ms.append((time.perf_counter_ns() - start_ns) / 1e6)
        return statistics.median(elapsed_ms)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(settings.iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(settings.iters)]
    for start, end in zip(starts, ends):
        start.record()
        step()
        end.record()
    torch.cuda.synchronize(settings.device)
    return statistics.median(start.elapsed_time(end) for start, end in zip(starts, ends))


def host_us(call: Callable[[], object], settings: Settings) -> float:
    """Median host wall time (us) of ``call()``; the GPU is synchronised every ``SYNC_EVERY``
    calls outside the timed window, so no call waits for a full launch queue."""
    for _ in range(min(settings.warmup, SYNC_EVERY)):
        call()
    elapsed_us = []
    for index in range(settings.host_calls):
        if index % SYNC_EVERY == 0:
            _synchronize(settings.device)
        start_ns = time.perf_counter_ns()
        call()
        elapsed_us.append((time.perf_counter_ns() - start_ns) / 1e3)
    _synchronize(settings.device)
    return statistics.median(elapsed_us)


# --- one model, one TBO setting ---------------------------------------------------------------


def replay_vs_eager_logits(runner: CudaGraphRunner, batch) -> float:
    """max|replay - eager| / max|eager| of the logits: a sanity check that the timed graph
    computes the timed eager forward (bf16; reported, not asserted)."""
    eager = runner.eager(batch).logits.float()
    replayed = runner.replay(batch).logits.float()
    scale = eager.abs().max().clamp_min(1e-30)
    return float((replayed - eager).abs().max() / scale)


def measure_point(harness: BenchHarness, batch_size: int, settings: Settings) -> dict:
    """Every measurement of one batch size on one runner."""
    runner = harness.runner
    world = harness.world(gp.SCENARIOS["decode"], batch_size, seed=settings.seed + batch_size)
    batch = harness.batch(world)
    refusal = runner.refusal(batch)
    if refusal is not None:
        raise RuntimeError(f"bs={batch_size}: the runner would not replay: {refusal.message}")
    plan = runner.plan(batch)
    point = {"batch_size": batch_size, "graph_bs": plan.graph_bs,
             "eager_ms": step_ms(lambda: runner.eager(batch), settings),
             "graph_ms": step_ms(lambda: runner.replay(batch), settings)}
    point["speedup"] = point["eager_ms"] / point["graph_ms"]
    point["prepare_replay_us"] = host_us(lambda: runner.prepare_replay(batch), settings)
    point["replay_prepare_us"] = None
    if runner.tbo:
        point["replay_prepare_us"] = host_us(
            lambda: runner.plugin.replay_prepare(batch.forward_mode, plan.graph_bs,
                                                 plan.num_token_non_padded, batch.spec_info),
            settings)
    point["replay_vs_eager_logits_rel"] = replay_vs_eager_logits(runner, batch)
    return point


def measure_config(model_name: str, tbo: bool, settings: Settings) -> tuple:
    """(captured batch sizes, points) of one model with TBO off or on; frees the runner."""
    harness = BenchHarness(device=settings.device, overrides=MODEL_OVERRIDES[model_name],
                           tbo=tbo, use_cuda_graph=settings.use_cuda_graph, seed=settings.seed)
    captured = list(harness.runner.batch_sizes)
    points = []
    for batch_size in settings.batch_sizes:
        start_s = time.perf_counter()
        point = {"model": model_name, "tbo": tbo} | measure_point(harness, batch_size, settings)
        points.append(point)
        print(f"  {model_name:<8} tbo={'on ' if tbo else 'off'} bs={batch_size:<3} "
              f"eager {point['eager_ms']:8.3f} ms  graph {point['graph_ms']:8.3f} ms  "
              f"x{point['speedup']:6.1f}  prep {point['prepare_replay_us']:7.1f} us  "
              f"({time.perf_counter() - start_s:.1f} s)", flush=True)
    del harness
    gc.collect()
    if settings.device.type == "cuda":
        torch.cuda.empty_cache()
    return captured, points


# --- metadata, targets, report -------------------------------------------------------------


def _command_output(args: list) -> Optional[str]:
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=10,
                                cwd=pathlib.Path(__file__).resolve().parents[1])
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else None


def environment(settings: Settings) -> dict:
    cuda = settings.device.type == "cuda"
    driver = _command_output(["nvidia-smi", "--query-gpu=driver_version",
                              "--format=csv,noheader"]) if cuda else None
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(settings.device),
        "card": (torch.cuda.get_device_name(settings.device) if cuda
                 else f"CPU ({platform.machine()}; smoke test, no CUDA graphs)"),
        "driver": (driver.splitlines()[0] if driver else None),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": (FLAGS.commit or _command_output(["git", "rev-parse", "HEAD"])
                   or "unknown"),
    }


def model_description(config: dict) -> str:
    return (f"{config['num_layers']} layers, hidden {config['hidden_size']}, "
            f"{config['num_heads']} heads x {config['head_dim']}, {config['num_experts']} "
            f"experts top-{config['top_k']} + {config['num_shared_experts']} shared, "
            f"intermediate {config['intermediate_size']}, vocab {config['vocab_size']}")


def _points(points: list, model: str, tbo: bool) -> list:
    return [p for p in points if p["model"] == model and p["tbo"] == tbo]


def _target(name: str, scope: str, met: Optional[bool], measured: str) -> dict:
    return {"target": name, "scope": scope, "met": met, "measured": measured}


def targets(points: list, models: tuple) -> list:
    """Each target per model (and TBO setting): met (bool), or None when not measured."""
    rows = []
    speedup_name = f"graph replay >= {SPEEDUP_TARGET:g}x faster than eager at bs <= " \
                   f"{SPEEDUP_MAX_BS}"
    plugin_name = f"`replay_prepare` < {REPLAY_PREPARE_TARGET_US:g} µs per step"
    prep_name = f"whole replay preparation < {PREPARE_REPLAY_TARGET_US:g} µs at bs " \
                f"{PREPARE_REPLAY_TARGET_BS}"
    for model in models:
        for tbo in (False, True):
            scope = f"{model}, TBO {'on' if tbo else 'off'}"
            small = [p for p in _points(points, model, tbo) if p["batch_size"] <= SPEEDUP_MAX_BS]
            if small:
                worst = min(small, key=lambda p: p["speedup"])
                rows.append(_target(speedup_name, scope, worst["speedup"] >= SPEEDUP_TARGET,
                                    f"min {worst['speedup']:.1f}x (bs {worst['batch_size']})"))
            else:
                rows.append(_target(speedup_name, scope, None, "no batch size <= 16 measured"))
        plugin = _points(points, model, True)
        if plugin:
            worst = max(plugin, key=lambda p: p["replay_prepare_us"])
            rows.append(_target(plugin_name, f"{model}, TBO on",
                                worst["replay_prepare_us"] < REPLAY_PREPARE_TARGET_US,
                                f"max {worst['replay_prepare_us']:.1f} µs "
                                f"(bs {worst['batch_size']})"))
        for tbo in (False, True):
            scope = f"{model}, TBO {'on' if tbo else 'off'}"
            at = [p for p in _points(points, model, tbo)
                  if p["batch_size"] == PREPARE_REPLAY_TARGET_BS]
            if at:
                us = at[0]["prepare_replay_us"]
                rows.append(_target(prep_name, scope, us < PREPARE_REPLAY_TARGET_US,
                                    f"{us:.1f} µs"))
            else:
                rows.append(_target(prep_name, scope, None,
                                    f"bs {PREPARE_REPLAY_TARGET_BS} not measured"))
    return rows


def _cell(value: Optional[float], fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown_table(points: list, model: str, batch_sizes: tuple) -> str:
    header = ("| bs | eager ms (TBO off) | graph ms (TBO off) | speedup (off) "
              "| eager ms (TBO on) | graph ms (TBO on) | speedup (on) "
              "| replay prep µs (off) | replay prep µs (on) | replay_prepare µs (on) |")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    by_key = {(p["tbo"], p["batch_size"]): p for p in points if p["model"] == model}
    for batch_size in batch_sizes:
        off, on = by_key.get((False, batch_size)), by_key.get((True, batch_size))
        cells = [str(batch_size)]
        for p in (off, on):
            cells += [_cell(p and p["eager_ms"], ".3f"), _cell(p and p["graph_ms"], ".3f"),
                      _cell(p and p["speedup"], ".1f") + ("x" if p else "")]
        cells += [_cell(off and off["prepare_replay_us"], ".1f"),
                  _cell(on and on["prepare_replay_us"], ".1f"),
                  _cell(on and on["replay_prepare_us"], ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    env, setup = result["environment"], result["settings"]
    status = {True: "met", False: "MISSED", None: "not measured"}
    lines = [
        f"## {env['date_utc'][:10]} — CUDA-graph decode benchmark on {env['card']}",
        "",
        f"- **Run:** {env['date_utc']}; {env['card']}"
        + (f", driver {env['driver']}" if env["driver"] else "")
        + f"; Python {env['python']}, torch {env['torch']} (CUDA {env['cuda']}); "
          f"commit `{env['commit'][:12]}`.",
        f"- **Setup:** {setup['dtype']}, DECODE only; runner `max_bs={MAX_BS}`, "
        f"`max_context_len={MAX_CONTEXT_LEN}`, CUDA graphs "
        f"{'on' if setup['use_cuda_graph'] else 'OFF (CPU smoke test)'}; one random batch "
        f"per size (prefixes 1 to {MAX_CONTEXT_LEN - 1} tokens). Step times: median of "
        f"{setup['iters']} back-to-back runs after {setup['warmup']} warm-up run(s), "
        f"{'CUDA events' if setup['device'] == 'cuda' else 'perf_counter'}; host costs: median "
        f"of {setup['host_calls']} calls, `perf_counter_ns`. Under TBO only even sizes are "
        f"captured (bs 1 replays the bs-2 graph).",
    ]
    for model in setup["models"]:
        lines += ["", f"### Model `{model}` ({model_description(result['models'][model])})",
                  "", markdown_table(result["points"], model, tuple(setup["batch_sizes"]))]
    lines += ["", "### Targets", ""]
    lines += [f"- {row['target']} ({row['scope']}): **{status[row['met']]}**, "
              f"{row['measured']}" for row in result["targets"]]
    return "\n".join(lines) + "\n"


# --- entry point -----------------------------------------------------------------------------


def parse_settings(device: torch.device) -> Settings:
    try:
        batch_sizes = tuple(int(bs) for bs in FLAGS.batch_sizes)
    except ValueError as error:
        raise app.UsageError(f"--batch_sizes must be integers: {error}") from error
    if not batch_sizes or any(not 1 <= bs <= MAX_BS for bs in batch_sizes):
        raise app.UsageError(f"--batch_sizes must be in [1, {MAX_BS}], got {batch_sizes}")
    models = tuple(FLAGS.models)
    unknown = [m for m in models if m not in MODEL_OVERRIDES]
    if not models or unknown:
        raise app.UsageError(f"--models must be among {list(MODEL_OVERRIDES)}, got {unknown}")
    counts = {"iters": FLAGS.iters, "warmup": FLAGS.warmup, "host_calls": FLAGS.host_calls}
    if FLAGS.quick:
        counts = {name: min(value, QUICK[name]) for name, value in counts.items()}
    return Settings(device=device, use_cuda_graph=device.type == "cuda",
                    batch_sizes=tuple(sorted(set(batch_sizes))), models=models,
                    seed=FLAGS.seed, quick=FLAGS.quick, **counts)


def run(settings: Settings) -> dict:
    start_s = time.perf_counter()
    env = environment(settings)
    print(f"CUDA-graph benchmark on {env['card']}: models {', '.join(settings.models)}, "
          f"bs {', '.join(map(str, settings.batch_sizes))}, {settings.iters} iters", flush=True)
    points, captured = [], {}
    for model in settings.models:
        for tbo in (False, True):
            sizes, config_points = measure_config(model, tbo, settings)
            captured[f"{model}/tbo={'on' if tbo else 'off'}"] = sizes
            points += config_points
    models = {name: dataclasses.asdict(ModelConfig(**MODEL_OVERRIDES[name]))
              for name in settings.models}
    settings_dict = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    settings_dict |= {"device": settings.device.type, "batch_sizes": list(settings.batch_sizes),
                      "models": list(settings.models), "dtype": DTYPE_NAME, "mode": "DECODE",
                      "max_bs": MAX_BS, "max_context_len": MAX_CONTEXT_LEN,
                      "sync_every": SYNC_EVERY, "captured_batch_sizes": captured}
    return {"environment": env, "settings": settings_dict, "models": models,
            "points": points, "targets": targets(points, settings.models),
            "wall_s": time.perf_counter() - start_s}


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    elif FLAGS.quick and FLAGS.allow_cpu:
        device = torch.device("cpu")
    else:
        print("cuda_graph.py: this benchmark needs a CUDA device (torch sees none); "
              "--quick --allow_cpu smoke-tests the script on the CPU", file=sys.stderr)
        return 2
    result = run(parse_settings(device))
    out_dir = pathlib.Path(FLAGS.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = markdown(result)
    (out_dir / JSON_NAME).write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / MARKDOWN_NAME).write_text(report)
    print(f"\nwrote {out_dir / JSON_NAME} and {out_dir / MARKDOWN_NAME} "
          f"({result['wall_s']:.0f} s)\n")
    print(report, end="")
    return 0


if __name__ == "__main__":
    app.run(main)
