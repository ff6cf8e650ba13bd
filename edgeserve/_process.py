"""Child processes that die with their parent.

A child must not outlive the process that started it: a ``fleet serve`` left behind by a killed
demo keeps its ports (and its embedded broker) for as long as the machine runs. ``stop()`` paths
handle an orderly exit, but a parent killed with SIGKILL (an OOM kill, a test runner's timeout)
runs no code at all, so the kernel has to do it: on Linux ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` in
the child asks for SIGTERM when the parent dies. It survives ``exec``, so it works for any program,
and a grandchild is covered when its own parent asked for it too (the chain unwinds link by link).

Two limits of the kernel's rule:

* the signal is sent when the *thread* that started the child exits, not the whole process:
  start long-lived children from a thread that lives as long as they should (normally the main
  thread), never from a short-lived worker thread;
* it is cleared when the child changes credentials (``setuid``, a set-user-ID binary): start such
  a child as its final user (``Popen``'s ``user=``/``group=``, applied before the hook runs)
  instead of letting it drop privileges itself.

Elsewhere (macOS, Windows) these helpers only start the child; there it relies on ``stop()``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["DIES_WITH_PARENT", "die_with_parent", "popen", "run"]

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                      ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl  # type: ignore[no-any-return]


# Resolved once, in the parent: between fork and exec the child only calls it (no imports, no
# library loading, which could deadlock on a lock another thread held at fork time).
_PRCTL = _load_prctl()
DIES_WITH_PARENT = _PRCTL is not None
"""Whether children started here are killed when their parent dies (Linux)."""


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """In a child: receive ``sig`` when the parent dies; exit now if it already has.

    Call it first thing in a ``multiprocessing`` target (pass ``os.getpid()`` of the parent in
    the arguments); :func:`popen` and :func:`run` call it for you between fork and exec."""
    if _PRCTL is None:
        return
    _PRCTL(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent_pid:
        # the parent died before the line above, so no signal will ever come
        os._exit(1)


def _dying(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with a ``preexec_fn`` that also calls :func:`die_with_parent`."""
    if _PRCTL is None:
        return kwargs
    given: Callable[[], object] | None = kwargs.get("preexec_fn")
    parent = os.getpid()

    def preexec() -> None:
        if given is not None:
            given()
        die_with_parent(parent)

    return {**kwargs, "preexec_fn": preexec}


def popen(args: Any, **kwargs: Any) -> subprocess.Popen[Any]:
    """:class:`subprocess.Popen` whose child is killed (SIGTERM) when this process dies."""
    return subprocess.Popen(args, **_dying(kwargs))


def run(args: Any, **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """:func:`subprocess.run` whose child is killed (SIGTERM) when this process dies."""
    return subprocess.run(args, **_dying(kwargs))  # noqa: PLW1510 (the caller chooses check=)
