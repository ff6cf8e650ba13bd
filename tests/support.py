"""Test mechanics every area shares: waits that follow measured progress, cleanup on every path.

A test that sleeps a fixed time and then asserts passes or fails with the machine's load, not with
the code: :func:`wait_until` polls the condition instead and, given a ``progress`` measure, keeps
waiting for as long as that measure keeps moving, so a slow machine is not a failure and a stall
is one. "Nothing arrived" is never asserted after a sleep: wait for a later sentinel to arrive (or
a counter to move) first, then assert what must not have happened.

The ``resources`` fixture is a :class:`contextlib.ExitStack` closed at teardown, whether the test
passed or not: register every outbox, store, agent, link and client a test opens, in the order it
opens them (they are closed in reverse).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

__all__ = ["from_threads", "resources", "wait_for_count", "wait_until"]

_UNSET = object()
T = TypeVar("T")


def stop_process(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``grace_s``; always reaped."""
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_until(predicate: Callable[[], object], timeout: float, what: str, *,
               progress: Callable[[], object] | None = None, interval: float = 0.1) -> None:
    """Return once ``predicate()`` is true; fail saying ``what`` did not happen.

    Without ``progress``, ``timeout`` bounds the whole wait. With it, ``timeout`` is how long
    ``progress()`` (a count, a sequence number, any comparable value) may stay unchanged: every
    change gives the system another ``timeout`` seconds, so the wait follows the work actually
    done and only the per-test timeout bounds a slow but moving system.
    """
    last: object = progress() if progress is not None else _UNSET
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        now = time.monotonic()
        if progress is not None:
            current = progress()
            if current != last:
                last, deadline = current, now + timeout
        if now >= deadline:
            break
        time.sleep(interval)
    if predicate():  # it may have happened during the last sleep
        return
    moved = "" if progress is None else f" (no progress for {timeout:g} s; stuck at {last!r})"
    raise AssertionError(f"did not happen within {timeout:g} s: {what}{moved}")


def wait_for_count(measure: Callable[[], float], target: float, stall_s: float, what: str, *,
                   interval: float = 0.25) -> None:
    """Wait until ``measure()`` reaches ``target``, for as long as it keeps moving: fails only
    when it stood still for ``stall_s`` seconds. ``measure`` is called once per poll (it may be
    a query)."""
    seen: list[float] = []

    def reached() -> bool:
        seen.append(measure())
        return seen[-1] >= target

    wait_until(reached, stall_s, f"{what} (target {target:g})",
               progress=lambda: seen[-1] if seen else None, interval=interval)


@pytest.fixture
def resources() -> Iterator[contextlib.ExitStack]:
    """An ExitStack closed at teardown: ``resources.enter_context(Outbox(...))``,
    ``resources.callback(link.stop)``; closed in reverse order on every path."""
    with contextlib.ExitStack() as stack:
        yield stack


@pytest.fixture(autouse=True)
def _switch_interval_restored() -> Iterator[None]:
    """The simulator shortens the interpreter's GIL switch interval for the process
    (``SimFleet.start``); every later test would run with it. Each test leaves it as it was."""
    interval = sys.getswitchinterval()
    yield
    sys.setswitchinterval(interval)


def from_threads(call: Callable[[int, int], T], threads: int, per_thread: int,
                 timeout: float = 60.0) -> list[T]:
    """``call(thread, i)`` for ``i < per_thread`` on each of ``threads`` threads, released at
    once; every result (in no set order). The first error any thread met is raised."""
    results: list[T] = []
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def run(thread: int) -> None:
        try:
            start.wait(10)
            for i in range(per_thread):
                results.append(call(thread, i))
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout)
    if errors:
        raise errors[0]
    assert len(results) == threads * per_thread, (len(results), threads * per_thread)
    return results
