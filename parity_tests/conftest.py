"""Hypothesis profiles. "default" is what CI runs (2,000 examples per test, unless a test sets
fewer and says why: 2,000 EXTEND batches for the split properties, 1,000 per uniform mode, whose
every batch size the exhaustive check covers); "quick" is for local iteration:
HYPOTHESIS_PROFILE=quick pytest.

Also: the suite's process settings (below), its second process (parity_tests/second_process.py)
and its background jobs (parity_tests/background.py).
"""

import os
import shutil
import tempfile

# Set before torch and jax are imported, and inherited by every process the tests start; a
# value already in the environment is kept. The suite's tensors are tiny and it compiles some
# 2,000 small XLA programs, each run a few times, on 2 cores:
# - one torch thread: a second one costs more than it brings on tensors this small (a third
#   less CPU time in test_cuda_graph.py and test_reference_model.py), and the second core runs
#   the suite's second process;
# - JAX's quick compile (jax_disable_most_optimizations: XLA's backend optimisation level 0,
#   no expensive LLVM passes), as parity_tests/model_parity.py already asks for the spec
#   model: compiling, not running, is where the suite spends its JAX time;
# - one JAX compilation cache for the session (jax_compilation_cache_dir), in a temporary
#   folder that every process the session starts shares and that the session deletes at its
#   end: a program compiled once (the spec model at one shape, say) is loaded, not compiled
#   again, by the second process, `tbo-parity run`'s subprocess, the launched ranks and a
#   mutation run's forked workers. XLA keys each entry by the program and its compile options,
#   so a changed program is compiled afresh, never served stale. Each process also keeps its
#   own in-memory cache, so a cache entry is read at most once per process.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # cache every program
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # else the caller's (a mutation run's) folder
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="tbo-parity-jax-")
    os.environ["TBO_PARITY_JAX_CACHE_OWNER"] = str(os.getpid())  # who deletes it

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from tbo_parity.parity_tests import background, second_process  # noqa: E402

_SECOND = pytest.StashKey()  # the second process of this session, or None

settings.register_profile(
    "default", max_examples=2000, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("quick", parent=settings.get_profile("default"), max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    """Before the first test: hand some test files to a second process
    (parity_tests/second_process.py), then start the background jobs that the tests left here
    read (parity_tests/background.py). Not at collection: a process that only collects (a fork
    server) must start neither."""
    if not session.config.option.collectonly:
        session.config.stash[_SECOND] = second_process.start(session)
        background.start(session.items)


def pytest_sessionfinish(session):
    background.stop()
    second_process.finish(session, session.config.stash.get(_SECOND, None))


def pytest_unconfigure(config):
    """Delete the session's JAX compilation cache, if this process made it (above)."""
    if os.environ.get("TBO_PARITY_JAX_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_terminal_summary(terminalreporter, config):
    second_process.summary(terminalreporter, config.stash.get(_SECOND, None))
