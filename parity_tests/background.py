"""Processes the suite runs on a second core: subprocesses that tests read, started before the
tests that read them.

Some tests wait on processes of their own (expert-parallel ranks, a mesh of CPU devices, the
console command). While such a test waits, the pytest process idles, and on a 2-core machine
so does a core, while the tests after it would keep it busy. Such work is registered as a
*job*: a function without arguments that starts the processes, waits for them and returns what
the tests read (``job``). Before the first test runs (conftest.py) the jobs that the selected
tests read are queued in the order of their first reader, and one background thread runs them,
one at a time, beside the tests and at the lowest priority, so that they slow no test down. A
test takes a job's value with ``result``, waiting for it if it is still running; a job nothing
has started when its first reader asks (the queue is behind, or the session did not start it)
runs in that test. An exception raised by a job is raised by ``result``, in every test that
asks. What each test asserts is unchanged: only when its processes start is.

A job runs beside other tests, and they monkeypatch modules and may change the environment or
the working directory: a job binds what it calls when it is registered, and starts its
processes with ``command``, or with ``environ()`` and ``cwd()``, the session's as it started.
At the end of the session, a job still running is stopped (``stopping`` is set; ``command``
then kills its process) and those not started are dropped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Callable, Optional

__all__ = ["job", "reads", "result", "command", "environ", "cwd", "stopping", "start", "stop"]

stopping = threading.Event()  # set at the end of the session: a running job must end
NICE = 19  # the background thread's, and so its processes': the lowest priority


class _Job:
    def __init__(self, name: str, run: Callable, wanted_by: Callable):
        self.name, self.run, self.wanted_by = name, run, wanted_by
        self.claimed = False  # started, by the thread or by a test (under _lock)
        self.done = threading.Event()
        self.value = self.error = None

    def execute(self) -> None:
        try:
            self.value = self.run()
        except BaseException as error:  # noqa: B036 (handed to every test that asks)
            self.error = error
        finally:
            self.done.set()


_JOBS: dict = {}
_lock = threading.Lock()
_queue: list = []
_session: dict = {}  # pid, environ and cwd of the session that started the thread


def job(name: str, wanted_by: Callable) -> Callable:
    """Decorator: register ``run()`` as the job ``name``; ``wanted_by(item)`` says whether the
    collected test ``item`` reads it."""
    def register(run: Callable) -> Callable:
        if name in _JOBS and _JOBS[name].run is not run:
            raise ValueError(f"a background job named {name!r} is registered already")
        _JOBS[name] = _Job(name, run, wanted_by)
        return run

    return register


def reads(module: str, *tests: str, fixture: Optional[str] = None,
          param=None) -> Callable:
    """A ``wanted_by``: tests of ``module`` (a module's ``__name__``) named ``tests`` (any, if
    none is named), or using ``fixture`` (with the parameter ``param``, if given)."""
    def wanted_by(item) -> bool:
        if getattr(getattr(item, "module", None), "__name__", None) != module:
            return False
        if tests and getattr(item, "originalname", None) not in tests:
            return False
        if fixture is None:
            return True
        if fixture not in getattr(item, "fixturenames", ()):
            return False
        callspec = getattr(item, "callspec", None)
        return param is None or (callspec is not None and callspec.params.get(fixture) == param)

    return wanted_by


def environ() -> dict:
    """The environment the session started with (the current one outside a session)."""
    return dict(_session.get("environ", os.environ))


def cwd() -> str:
    """The working directory the session started in (the current one outside a session)."""
    return _session.get("cwd") or os.getcwd()


def command(args, *, timeout: Optional[float] = None, env: Optional[dict] = None,
            stdout=subprocess.PIPE, **popen_kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(args, capture_output=True, text=True, timeout=timeout)`` in the
    session's environment (``env`` added to it) and working directory, killed if the session
    ends first."""
    process = subprocess.Popen(args, stdout=stdout, stderr=subprocess.PIPE, text=True,
                               env=environ() | (env or {}), cwd=popen_kwargs.pop("cwd", cwd()),
                               **popen_kwargs)
    waited = 0.0
    while True:
        try:
            out, err = process.communicate(timeout=0.2)
            return subprocess.CompletedProcess(args, process.returncode, out, err)
        except subprocess.TimeoutExpired:
            waited += 0.2
            if stopping.is_set() or (timeout is not None and waited >= timeout):
                process.kill()
                process.communicate()
                if stopping.is_set():
                    raise RuntimeError(f"{args}: stopped at the end of the session")
                raise subprocess.TimeoutExpired(args, timeout) from None


def _claim(j: _Job) -> bool:
    with _lock:
        if j.claimed:
            return False
        j.claimed = True
        return True


def _claim_next() -> Optional[_Job]:
    """The first queued job nothing has started, claimed; None if there is none."""
    with _lock:
        while _queue and not stopping.is_set():
            j = _queue.pop(0)
            if not j.claimed:
                j.claimed = True
                return j
    return None


def _lower_priority() -> None:
    """This thread's processes, forked from it, inherit its nice value (per thread on Linux):
    they take the core the tests leave idle, and yield the tests' core to them."""
    if sys.platform.startswith("linux"):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)


def _work() -> None:
    _lower_priority()
    while (j := _claim_next()) is not None:
        j.execute()


def start(items) -> None:
    """Queue the jobs that the collected tests ``items`` read, in the order of their first
    reader, and start the thread that runs them."""
    stopping.clear()
    for name, j in list(_JOBS.items()):  # a new session computes every value anew
        _JOBS[name] = _Job(name, j.run, j.wanted_by)
    order = []
    for item in items:
        order += [j for j in _JOBS.values() if j not in order and j.wanted_by(item)]
    _session.update(pid=os.getpid(), environ=dict(os.environ), cwd=os.getcwd())
    if not order:
        return
    with _lock:
        _queue[:] = order
    _session["thread"] = threading.Thread(target=_work, name="parity-tests-background",
                                          daemon=True)
    _session["thread"].start()


def stop() -> None:
    """End of the session: drop the jobs not started, stop a running one and wait for it."""
    stopping.set()
    with _lock:
        _queue.clear()
    if _session.get("pid") != os.getpid():
        return
    for j in _JOBS.values():
        if j.claimed:
            j.done.wait()
    thread = _session.pop("thread", None)
    if thread is not None:
        thread.join()  # no thread left behind: the process may fork next


def result(name: str):
    """The value of the job ``name``: run here if nothing has started it (or this process was
    forked from the session's, and has no thread); if it is running, the queued jobs after it
    run here meanwhile (the test would only wait), then its value is waited for."""
    j = _JOBS[name]
    if _session.get("pid") not in (None, os.getpid()):  # forked: a value or a run of its own
        if not j.done.is_set():
            j = _JOBS[name] = _Job(name, j.run, j.wanted_by)
            j.claimed = True
            j.execute()
    elif _claim(j):
        j.execute()
    else:
        while not j.done.is_set() and (other := _claim_next()) is not None:
            other.execute()
    j.done.wait()
    if j.error is not None:
        raise j.error
    return j.value
