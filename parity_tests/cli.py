"""`tbo-parity`: check the PyTorch implementation against the JAX spec.

    tbo-parity run [--cases_per_mode=1000] [--seed=0]

`run` splits generated batches of every mode on both sides (and through
TboForwardBatchPreparer), prints a table of cases, mismatches and time per mode, and exits 1
on any mismatch after printing the first mismatching case as a literal to paste into a test.
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

COMMANDS = ("run",)


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


def format_table(rows: list) -> str:
    lines = [f"{'check':<24} {'cases':>7} {'mismatches':>10} {'time':>8}"]
    for row in rows:
        lines.append(f"{'split ' + row['mode']:<24} {row['cases']:>7} {row['mismatches']:>10} "
                     f"{row['seconds']:>7.1f}s")
    return "\n".join(lines)


def run_parity(count: int, seed: int) -> int:
    rows = [check_mode(mode, count, seed) for mode in MODES]
    print(format_table(rows))
    failed = [row for row in rows if row["mismatches"]]
    for row in failed[:1]:
        case, wrong = row["first"]
        print(f"\nfirst mismatch ({row['mode']}):\n    {case!r}")
        for line in wrong:
            print(f"    {line}")
    print("\nFAIL" if failed else "\nOK: spec and implementation agree")
    return 1 if failed else 0


def _main(argv) -> int:
    commands = argv[1:]
    if len(commands) != 1 or commands[0] not in COMMANDS:
        raise app.UsageError(f"usage: tbo-parity {{{'|'.join(COMMANDS)}}} [flags]")
    logging.set_verbosity(logging.WARNING)  # keep JAX's backend probing out of the table
    return run_parity(FLAGS.cases_per_mode, FLAGS.seed)


def main():
    app.run(lambda argv: sys.exit(_main(argv)))


if __name__ == "__main__":
    main()
