"""`tbo-parity`: check the PyTorch implementation against the JAX spec.

    tbo-parity run [--cases_per_mode=1000] [--seed=0] [--device=cpu] [--dtype=float32]
                   [--nomodel]
    tbo-parity verify [--max_seqs=5] [--max_len=12] [--max_bs=256] [--max_draft=8]
                      [--max_graph_bs=256] [--workers=N]

`run` does two things and prints one table:

1. *Split parity*: splits generated batches of every mode on both sides (and through
   TboForwardBatchPreparer) and counts disagreements.
2. *Model parity*: runs the small MoE model on each named scenario three ways (JAX spec,
   PyTorch plain, PyTorch two-batch overlap) and reports the max relative errors between them
   against the bound of the dtype (float32 1e-5, bfloat16 2e-2).
3. *Graph replay parity* (``--device=cuda`` only; one line says it was skipped otherwise):
   a padded DECODE and TARGET_VERIFY batch replayed from CUDA graphs, plain and with TBO,
   against the eager forward and the JAX spec.

It exits 1 on any mismatch, after printing the first mismatching split case as a literal to
paste into a test.

`verify` checks *every* batch within small bounds instead of a sample
(parity_tests/exhaustive.py): the JAX spec vmapped over all of them, the implementation batch
by batch in worker processes, every index and child field compared and the spec's invariants
asserted. It prints a row per family, the batches per second of each side, and exits 1 with the
first counterexample as a `SplitCase(...)` literal on any disagreement.
"""

from __future__ import annotations

import sys
import time

from absl import app, flags, logging

from parity_tests.cases import MODES, random_cases
from parity_tests.split_parity import preparer_mismatches, split_mismatches

FLAGS = flags.FLAGS
flags.DEFINE_integer("cases_per_mode", 1000, "Generated batches per forward mode.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of the batch generator.")
flags.DEFINE_enum("device", "cpu", ["cpu", "cuda"], "Where the PyTorch model runs.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "The PyTorch model's dtype.")
flags.DEFINE_bool("model", True, "Also check model outputs (JAX vs torch plain vs torch TBO).")
# verify: the bounds of the exhaustive check (parity_tests/exhaustive.py)
flags.DEFINE_integer("max_seqs", 5, "verify: EXTEND batches of 1..max_seqs sequences.",
                     lower_bound=1, upper_bound=7)
flags.DEFINE_integer("max_len", 12, "verify: EXTEND lengths 1..max_len.", lower_bound=1,
                     upper_bound=64)
flags.DEFINE_integer("max_bs", 256, "verify: DECODE/TARGET_VERIFY batch sizes 0..max_bs.",
                     lower_bound=1, upper_bound=4096)
flags.DEFINE_integer("max_draft", 8, "verify: draft token counts 1..max_draft.", lower_bound=1,
                     upper_bound=64)
flags.DEFINE_integer("max_graph_bs", 256, "verify: captured graph sizes 1..max_graph_bs, each "
                     "with every real batch size 0..size.", lower_bound=1, upper_bound=2048)
flags.DEFINE_integer("workers", None, "verify: processes running the implementation "
                     "(default: one per CPU; 1 runs it in this process).", lower_bound=1)

COMMANDS = ("run", "verify")
VERIFY_FLAGS = ("max_seqs", "max_len", "max_bs", "max_draft", "max_graph_bs", "workers")
RUN_FLAGS = ("cases_per_mode", "seed", "device", "dtype", "model")


def check_mode(mode: str, count: int, seed: int) -> dict:
    """Split parity over `count` generated batches of one mode; the first mismatch kept."""
    start = time.perf_counter()
    mismatches, first = 0, None
    for case in random_cases(seed, mode, count):
        wrong = split_mismatches(case) or preparer_mismatches(case)
        if wrong:
            mismatches += 1
            first = first or (case, wrong)
    return {"mode": mode, "cases": count, "mismatches": mismatches,
            "seconds": time.perf_counter() - start, "first": first}


def check_models(device: str, dtype: str) -> list:
    """Model parity on every named scenario (one row each)."""
    import torch

    from parity_tests import model_parity as mp

    # bf16 routes densely (top_k = num_experts): see parity_tests/test_model_parity.py.
    routing = {"num_experts": 4, "top_k": 4} if dtype == "bfloat16" else {}
    ref_cfg, _, weights, model = mp.make_models(seed=0, dtype=mp.TORCH_DTYPES[dtype],
                                                device=torch.device(device), **routing)
    scenarios = {name: mp.build_world(case, ref_cfg) for name, case in mp.CASES.items()}
    scenarios.update({name: mp.pad_world(mp.build_world(case, ref_cfg), padding)
                      for name, (case, padding) in mp.PADDED.items()})
    rows = []
    for name, world in scenarios.items():
        start = time.perf_counter()
        result = mp.compare_case(world, ref_cfg, weights, model, dtype)
        rows.append({"mode": name, "kind": f"model {dtype}", "cases": 1,
                     "mismatches": 0 if result["ok"] else 1,
                     "seconds": time.perf_counter() - start, **result})
    return rows


GRAPH_BATCH_SIZE = 5  # replayed in the graph of 8: padded, and under TBO child B holds padding


def graph_skip_reason(device: str) -> str:
    """Why graph-replay rows are not run (empty when they are)."""
    import torch

    if device != "cuda":
        return "--device=cpu (CUDA graphs need --device=cuda)"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return ""


def check_graphs(dtype: str) -> list:
    """CUDA-graph replay parity: a padded DECODE and TARGET_VERIFY batch, plain and TBO, each
    replayed and compared with the eager forward and the JAX spec (graph_parity.check_step)."""
    from parity_tests.graph_parity import SCENARIOS, GraphHarness, check_step

    rows = []
    for tbo in (False, True):
        h = GraphHarness(device="cuda", dtype_name=dtype, tbo=tbo, max_bs=8)
        for name in ("decode", "verify-tree"):
            start = time.perf_counter()
            world = h.world(SCENARIOS[name], GRAPH_BATCH_SIZE, seed=11)
            report = check_step(h, world)
            label = f"{name} {'tbo' if tbo else 'plain'} bs {GRAPH_BATCH_SIZE}->{report['graph_bs']}"
            rows.append({"mode": label, "kind": f"graph {dtype}", "cases": 1,
                         "mismatches": 0 if report["ok"] else 1,
                         "seconds": time.perf_counter() - start, **report})
    return rows


def format_graph_table(rows: list) -> str:
    """Graph rows: replay vs eager, replay vs the JAX spec, eager vs the spec (max relative
    error, held to graph_parity.BOUNDS: float32 1e-5; bfloat16 2e-2 against eager and
    5.3e-2 against the float32 spec)."""
    lines = [f"{'graph replay':<40} {'cases':>6} {'mismatches':>10} {'time':>7}  "
             f"{'rep~eager':>9} {'rep~jax':>9} {'eager~jax':>9}"]
    for row in rows:
        errors = " ".join(f"{row[k]:>9.1e}" for k in
                          ("replay_vs_eager", "replay_vs_spec", "eager_vs_spec"))
        label = f"{row['kind']} {row['mode']}"
        lines.append(f"{label:<40} {row['cases']:>6} {row['mismatches']:>10} "
                     f"{row['seconds']:>6.1f}s  {errors}")
    return "\n".join(lines)


def format_table(rows: list) -> str:
    header = (f"{'check':<40} {'cases':>6} {'mismatches':>10} {'time':>7}  "
              f"{'plain~jax':>9} {'tbo~plain':>9} {'tbo~jax':>9}")
    lines = [header]
    for row in rows:
        errors = [f"{row[k]:>9.1e}" if k in row else f"{'-':>9}"
                  for k in ("plain_vs_jax", "tbo_vs_plain", "tbo_vs_jax")]
        label = f"{row.get('kind', 'split')} {row['mode']}"
        lines.append(f"{label:<40} {row['cases']:>6} {row['mismatches']:>10} "
                     f"{row['seconds']:>6.1f}s  " + " ".join(errors))
    return "\n".join(lines)


def run_parity(count: int, seed: int, *, model: bool = False, device: str = "cpu",
               dtype: str = "float32") -> int:
    rows = [check_mode(mode, count, seed) for mode in MODES]
    graph_rows = []
    if model:
        rows += check_models(device, dtype)
        skip = graph_skip_reason(device)
        if not skip:
            graph_rows = check_graphs(dtype)
    print(format_table(rows))
    if graph_rows:
        print()
        print(format_graph_table(graph_rows))
    elif model:
        print(f"\ngraph replay parity: skipped, {skip}; on a CPU the same replay path runs "
              f"without graphs in parity_tests/test_cuda_graph.py")
    rows += graph_rows
    failed = [row for row in rows if row["mismatches"]]
    for row in [row for row in failed if row.get("first")][:1]:
        case, wrong = row["first"]
        print(f"\nfirst mismatch ({row['mode']}):\n    {case!r}")
        for line in wrong:
            print(f"    {line}")
    print("\nFAIL" if failed else "\nOK: spec and implementation agree")
    return 1 if failed else 0


def run_verify(bounds, workers: int) -> int:
    """The exhaustive check (parity_tests/exhaustive.py): a row per family as it completes."""
    from parity_tests import exhaustive

    print(f"every batch within: EXTEND 1..{bounds.max_seqs} sequences of 1..{bounds.max_len} "
          f"tokens at thresholds {', '.join(map(str, bounds.thresholds))} (cached prefixes "
          f"{' and '.join(map(str, bounds.prefixes))} at {exhaustive.spec.DEFAULT_THRESHOLD}); "
          f"DECODE/TARGET_VERIFY batch sizes 0..{bounds.max_bs}, drafts 1..{bounds.max_draft}; "
          f"graph replay of sizes 1..{bounds.max_graph_bs} with every real batch size")
    print(exhaustive.HEADER, flush=True)
    reports = exhaustive.verify(
        bounds, workers, on_report=lambda r: print(exhaustive.format_row(r), flush=True))
    print(exhaustive.LEGEND)
    total = sum(r.batches for r in reports)
    failed = [r for r in reports if r.disagreements or r.invariant_failures]
    if not failed:
        print(f"\nOK: {total:,} batches, 0 disagreements, 0 invariant failures")
        return 0
    case, wrong = next(r.first for r in failed if r.first)
    print(f"\nFAIL: {sum(r.disagreements for r in reports):,} disagreements, "
          f"{sum(r.invariant_failures for r in reports):,} invariant failures; the first:\n"
          f"    {case!r}")
    for line in wrong:
        print(f"    {line}")
    return 1


def _check_command_flags(command: str) -> None:
    """A flag of the other command means nothing here: say so instead of ignoring it."""
    foreign = VERIFY_FLAGS if command == "run" else RUN_FLAGS
    given = [name for name in foreign if FLAGS[name].present]
    if given:
        raise app.UsageError(f"--{given[0]} does not apply to `tbo-parity {command}`")


def _main(argv) -> int:
    commands = argv[1:]
    if len(commands) != 1 or commands[0] not in COMMANDS:
        raise app.UsageError(f"usage: tbo-parity {{{'|'.join(COMMANDS)}}} [flags]")
    _check_command_flags(commands[0])
    if commands[0] == "verify":
        import os

        from parity_tests.exhaustive import Bounds

        logging.set_verbosity(logging.WARNING)
        bounds = Bounds(FLAGS.max_seqs, FLAGS.max_len, FLAGS.max_bs, FLAGS.max_draft,
                        FLAGS.max_graph_bs)
        return run_verify(bounds, FLAGS.workers or os.cpu_count() or 1)
    if FLAGS.model and FLAGS.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise app.UsageError("--device=cuda, but torch sees no CUDA device")
    logging.set_verbosity(logging.WARNING)  # keep JAX's backend probing out of the table
    return run_parity(FLAGS.cases_per_mode, FLAGS.seed, model=FLAGS.model, device=FLAGS.device,
                      dtype=FLAGS.dtype)


def main():
    app.run(lambda argv: sys.exit(_main(argv)))


if __name__ == "__main__":
    main()
