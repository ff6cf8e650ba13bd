"""No process a test starts may outlive it (a pytest plugin, loaded by tests/conftest.py).

A ``fleet serve`` left behind holds its ports and its broker for as long as the machine runs, and
makes later tests (and later runs) fail in ways that point nowhere near the culprit. So:

* after each test, any process it started that is still alive after a short grace period is
  killed and the test errors at teardown, naming it. Processes that a session, module or class
  fixture started (even one first requested inside the test) are not the test's, nor are the
  children of processes that were running before it (a PostgreSQL backend per connection);
* at the end of the session the same check runs over every descendant of pytest (processes
  started by session fixtures or at collection), and a survivor fails the run;
* pytest makes itself a *child subreaper* (Linux): a grandchild whose parent died is re-parented
  to pytest instead of to PID 1, so it is still seen as ours (the demo's ``fleet serve`` after a
  SIGKILLed demo was exactly such an orphan).

Processes are found with psutil; the check costs about 2 ms per test. Zombies (exited, not yet
reaped) hold nothing and are ignored, as is multiprocessing's own helper process, which lives as
long as pytest does. ``EDGESERVE_TEST_PROCESS_GRACE`` sets the grace period (seconds, default 5).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Generator, Iterator

import psutil
import pytest

__all__ = ["SESSION_SERVICE", "leftover_processes"]

GRACE_S = float(os.environ.get("EDGESERVE_TEST_PROCESS_GRACE", "5"))
# helpers that multiprocessing starts once and that exit with pytest
_OWNED_BY_PYTHON = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")
# in the command line of a service a session fixture starts and stops (tests/services.py's
# private PostgreSQL, in every one of its processes' titles): it outlives the test that first
# asked for it on purpose
SESSION_SERVICE = "edgeserve-test-session-service"
_PR_SET_CHILD_SUBREAPER = 36
# started by fixtures that outlive a test: checked at the end of the session only
_LONG_LIVED: set[int] = set()


def _become_subreaper() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _alive_descendants() -> list[psutil.Process]:
    alive = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            if any(owned in part for part in process.cmdline()
                   for owned in (*_OWNED_BY_PYTHON, SESSION_SERVICE)):
                continue
        except psutil.Error:  # gone meanwhile
            continue
        alive.append(process)
    return alive


def _describe(process: psutil.Process) -> str:
    try:
        return f"pid {process.pid}: {' '.join(process.cmdline())[:300]}"
    except psutil.Error:
        return f"pid {process.pid}"


def leftover_processes(candidates: list[psutil.Process], grace_s: float = GRACE_S) -> list[str]:
    """Wait up to ``grace_s`` for ``candidates`` to exit; kill the rest and describe them."""
    if not candidates:
        return []
    _, alive = psutil.wait_procs(candidates, timeout=grace_s)
    alive = [p for p in alive if _still_running(p)]
    described = [_describe(p) for p in alive]
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return described


def _still_running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _started_by_test(before: set[int]) -> list[psutil.Process]:
    """Processes started since ``before``, except those that are not the test's to stop."""
    new = {p.pid: p for p in _alive_descendants()
           if p.pid not in before and p.pid not in _LONG_LIVED}
    ours = os.getpid()
    started = []
    for process in new.values():
        try:
            parent = process.ppid()
        except psutil.Error:
            continue
        # a child of a process that predates the test is that process's business
        if parent == ours or parent in new:
            started.append(process)
    return started


def pytest_configure(config: pytest.Config) -> None:
    _become_subreaper()


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[object]) -> Generator[None, None, None]:
    if fixturedef.scope == "function":
        yield
        return
    before = {p.pid for p in _alive_descendants()}
    yield
    _LONG_LIVED.update(p.pid for p in _alive_descendants() if p.pid not in before)


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test(request: pytest.FixtureRequest) -> Iterator[None]:
    # Autouse and function-scoped: set up after any session or module fixture this test uses
    # and torn down after the test's own fixtures.
    before = {p.pid for p in _alive_descendants()}
    yield
    left = leftover_processes(_started_by_test(before))
    if left:
        pytest.fail(f"{request.node.nodeid} left {len(left)} process(es) running (now killed):\n"
                    + "\n".join(f"  {line}" for line in left), pytrace=False)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    left = leftover_processes(_alive_descendants())
    if not left:
        return
    message = (f"{len(left)} process(es) started by the test run were still running at the "
               "end (now killed):\n" + "\n".join(f"  {line}" for line in left))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_sep("=", "processes left running", red=True)
        reporter.write_line(message)
    else:
        sys.stderr.write(message + "\n")
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
