"""Fault injection for the crash-safety tests: die with SIGKILL at the n-th checkpoint.

``EDGESERVE_KILL_AT=N`` makes the N-th :func:`checkpoint` call of the process send itself SIGKILL
(exactly what ``kill -9`` does); ``EDGESERVE_TRACE_CHECKPOINTS=FILE`` appends each checkpoint's
name to FILE, so a test can count the points of an install first and then kill at each one. Unset
(always, outside tests) a checkpoint costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

__all__ = ["checkpoint"]

_count = 0


def checkpoint(name: str) -> None:
    """A point where a crash must leave the cache consistent."""
    global _count
    kill_at = os.environ.get("EDGESERVE_KILL_AT")
    trace = os.environ.get("EDGESERVE_TRACE_CHECKPOINTS")
    if kill_at is None and trace is None:
        return
    _count += 1
    if trace:
        with open(trace, "a", encoding="utf-8") as fh:  # noqa: PTH123 - tiny, test-only append
            fh.write(f"{_count} {name}\n")
    if kill_at is not None and _count == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)
