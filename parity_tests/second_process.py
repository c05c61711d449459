"""The suite on two processes: a second pytest process runs some of the selected test files beside
this one, and this one reports its result.

pytest runs one test at a time, so on the 2-core machine CI uses one core does the suite's work
while the other idles (the background jobs of parity_tests/background.py fill it only while a
test waits on processes of its own). The README's test line therefore hands the files named in
``SECOND`` (together about half of the suite's CPU time, measured) to a second ``python -m
pytest`` started before the first test, and waits for it at the end:

- The split is by file, so each module's fixtures are built in one process only. The second
  process gets the selected tests' node IDs, so ``-k``, ``-m`` and explicit paths select in both
  processes alike.
- Only this process measures coverage, and ``--cov-fail-under`` holds on its tests alone: the
  files in ``SECOND`` are not the ones that cover the gated split and replay-plan rules (the
  floor would fail if they were).
- The second process's outcome counts: if it fails, the session fails, and its failures are
  printed in full at the end; its summary line is printed either way.
- It is not used with one core, for a selection that lies wholly in one of the two sets, with
  ``-x`` (a failure must stop the run), or with ``TBO_PARITY_ONE_PROCESS=1`` in the
  environment, which the second process itself is started with.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

__all__ = ["SECOND", "ENV", "wanted", "start", "finish", "summary"]

ENV = "TBO_PARITY_ONE_PROCESS"
# Files whose tests run in the second process, which measures no coverage. This process keeps
# the files that cover the gated split and replay-plan rules (test_api_inputs, test_replay_plan,
# test_bad_input, test_split_rules_options and test_dp_decision reach every line and branch of
# them) and the files whose tests mostly wait on processes of their own (ranks, the CLI, pytest);
# every other file runs here, where no coverage tracer slows its Python code (on Python 3.11 the
# tracer made test_split_parity.py and test_api_inputs.py 1.65 times slower: 77 -> 127 s of CPU).
SECOND = frozenset({
    "test_split_parity.py", "test_defaults.py", "test_runner_edges.py", "test_golden_cases.py",
    "test_empty_batch.py", "test_forward_batch.py",
    "test_cuda_graph.py", "test_reference_model.py", "test_expert_ties.py",
    "test_tbo_structure.py", "test_sdpa_attention.py", "test_model_parity.py",
    "test_layout_names.py", "test_grouped_routing.py", "test_packed_layout_spec.py",
    "test_host_overhead.py", "test_upstream_classify.py", "test_tbo_policy.py",
    "test_operations.py", "test_expert_parallel_layout.py", "test_shape_letters.py",
    "test_expert_parallel_spec.py", "test_expert_parallel_edges.py", "test_packed_dispatch.py",
})


def _file(item) -> str:
    return os.path.basename(str(item.path))


def wanted(config, items) -> bool:
    """Whether this session hands part of ``items`` to a second process."""
    if os.environ.get(ENV) == "1" or (os.cpu_count() or 1) < 2:
        return False
    if config.option.collectonly or config.option.maxfail:
        return False
    files = {_file(item) for item in items}
    return bool(files & SECOND) and bool(files - SECOND)


class _Second:
    def __init__(self, nodeids: list, rootdir: str):
        self.count = len(nodeids)
        self.folder = tempfile.TemporaryDirectory(prefix="tbo-parity-second-")
        args_file = os.path.join(self.folder.name, "args")
        with open(args_file, "w") as f:
            f.write("\n".join(nodeids) + "\n")
        self.log = open(os.path.join(self.folder.name, "log"), "w+")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
             f"@{args_file}"], stdout=self.log, stderr=subprocess.STDOUT,
            env=os.environ | {ENV: "1"}, cwd=rootdir)  # node IDs are relative to the rootdir
        self.returncode: Optional[int] = None
        self.seconds = 0.0

    def wait(self, kill: bool) -> None:
        if kill and self.process.poll() is None:
            self.process.kill()
        self.returncode = self.process.wait()
        self.seconds = time.monotonic() - self.started

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def close(self) -> None:
        self.log.close()
        self.folder.cleanup()


def start(session) -> Optional[_Second]:
    """Move the tests of ``SECOND``'s files out of ``session.items`` into a second process,
    started now; None (and nothing moved) where ``wanted`` says no."""
    if not wanted(session.config, session.items):
        return None
    moved = [item for item in session.items if _file(item) in SECOND]
    session.items[:] = [item for item in session.items if _file(item) not in SECOND]
    session.testscollected = len(session.items)  # this process's progress runs to 100%
    return _Second([item.nodeid for item in moved], str(session.config.rootpath))


def finish(session, second: Optional[_Second]) -> None:
    """Wait for the second process (killed first if this session was stopped) and fail the
    session if it failed."""
    if second is None:
        return
    second.wait(kill=bool(session.shouldstop or session.shouldfail))
    if second.returncode != 0 and session.exitstatus == 0:
        session.exitstatus = 1


def summary(terminalreporter, second: Optional[_Second]) -> None:
    """The second process's summary line, and its whole output if it failed."""
    if second is None or second.returncode is None:
        return
    text = second.output()
    lines = [line for line in text.splitlines() if line.strip()]
    verdict = lines[-1].strip("= ") if lines else "no output"
    terminalreporter.section("second process", sep="-")
    if second.returncode != 0:
        terminalreporter.write(text)
    terminalreporter.write_line(
        f"{second.count} tests of {len(SECOND)} files ran in a second process "
        f"(parity_tests/second_process.py), exit status {second.returncode}: {verdict}")
    second.close()
