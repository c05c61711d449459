"""Re-check surviving mutants against whole test files (docs/testing.md, "The mutation run").

mutmut runs a mutant only against the tests it saw call the mutated function while it
recorded, and that record misses calls it cannot see: a jitted JAX function is called from
Python only when it is traced (once per shape, in whichever test comes first), a module-scoped
fixture is built in the first test that asks for it, and a rank or a mesh runs in a child
process. A mutant can survive the tests mutmut picked and still fail the suite.

This runs each named mutant against every test file of ``FILES`` that exercises its module,
in the ``mutants/`` tree that ``mutmut run`` left, with the mutant switched on through
``MUTANT_UNDER_TEST`` (inherited by the child processes, which run it too)::

    python parity_tests/mutation_recheck.py NAMES_FILE [--workers=N] [--seconds=S] [--files=F]

NAMES_FILE holds one mutant name a line; ``--files=a.py,b.py`` runs every mutant against those
files instead (a quicker first pass). Each output line is ``name<TAB>result``: ``killed``
(a test failed), ``survived`` (every test passed), ``timeout`` (over ``PER_MUTANT_S``) or
``not run`` (the time ``--seconds`` ran out first). pytest stops at the first failure (``-x``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import subprocess
import sys
import tempfile
import time

# Test files by the module a mutant is in (the longest matching prefix wins).
FILES = {
    "tbo_parity.torch_impl.": ["test_runner_edges.py", "test_replay_plan.py",
                               "test_cuda_graph.py", "test_sdpa_attention.py"],
    "tbo_parity.torch_impl.expert_parallel": [
        "test_expert_parallel_layout.py", "test_expert_parallel_edges.py",
        "test_packed_dispatch.py", "test_expert_parallel_spec.py", "test_expert_parallel.py"],
    "tbo_parity.reference.replay_plan": ["test_replay_plan.py", "test_runner_edges.py",
                                         "test_cuda_graph.py"],
    "tbo_parity.reference.expert_parallel": [
        "test_expert_parallel_spec.py", "test_expert_parallel_layout.py",
        "test_packed_layout_spec.py", "test_expert_parallel_edges.py",
        "test_packed_dispatch.py", "test_expert_parallel.py"],
    "tbo_parity.parity_tests.upstream.": ["test_upstream_classify.py", "test_upstream.py"],
}
PER_MUTANT_S = 600


def files_for(name: str, files: dict = FILES) -> list:
    """The test files to run the mutant ``name`` against (``files``: by module prefix)."""
    prefix = max((p for p in files if name.startswith(p)), key=len, default=None)
    if prefix is None:
        raise ValueError(f"no test files for the mutant {name!r}")
    return [f"parity_tests/{f}" for f in files[prefix]]


def recheck_files(files: list, name: str, env: dict, deadline: float) -> str:
    """The result of the test files with the mutant ``name`` on ("": none)."""
    if time.time() > deadline:
        return "not run"
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *files]
    try:
        done = subprocess.run(cmd, cwd="mutants", env=env | {"MUTANT_UNDER_TEST": name},
                              capture_output=True, text=True,
                              timeout=min(PER_MUTANT_S, max(1, deadline - time.time())))
    except subprocess.TimeoutExpired:
        return "timeout" if time.time() < deadline else "not run"
    return "survived" if done.returncode == 0 else "killed"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names_file")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seconds", type=float, default=10 ** 9)
    parser.add_argument("--files", default=None,
                        help="comma-separated test files (in parity_tests/) for every mutant, "
                             "instead of those of its module")
    args = parser.parse_args(argv)
    files = {"tbo_parity.": args.files.split(",")} if args.files else FILES
    if args.workers < 1:
        raise SystemExit("mutation_recheck: --workers must be at least 1")
    with open(args.names_file) as f:
        names = [line.strip() for line in f if line.strip()]
    for name in names:
        files_for(name, files)  # every name is checked before any test runs
    deadline = time.time() + args.seconds
    env = _environment()
    groups = sorted({tuple(files_for(name, files)) for name in names})
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:  # no mutant: all pass?
        clean = list(pool.map(lambda g: recheck_files(list(g), "", env, deadline), groups))
    if clean != ["survived"] * len(groups):
        bad = [g for g, r in zip(groups, clean) if r != "survived"]
        raise SystemExit(f"mutation_recheck: without a mutant these files fail: {bad}")
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        results = pool.map(
            lambda n: (n, recheck_files(files_for(n, files), n, env, deadline)), names)
        for name, result in results:
            print(f"{name}\t{result}", flush=True)
    return 0


def _environment() -> dict:
    """One process per test run, and one compilation cache folder for all of them
    (parity_tests/conftest.py sets the cache's other settings)."""
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR",
                           os.path.join(tempfile.gettempdir(), "tbo-parity-mutation-jax"))
    return os.environ | {"TBO_PARITY_ONE_PROCESS": "1", "OMP_NUM_THREADS": "1",
                         "JAX_COMPILATION_CACHE_DIR": cache}


if __name__ == "__main__":
    sys.exit(main())
