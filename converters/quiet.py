"""Keep third-party chatter off the console during a conversion, without losing it.

TensorFlow, absl, LiteRT ("INFO: Created TensorFlow Lite XNNPACK delegate"), the torch exporters
and setuptools write to the process's stdout and stderr from C++ and Python alike.
:func:`captured_output` points file descriptors 1 and 2 at a log file for the length of the
conversion (so ``--json`` output stays one JSON document, and the console shows only our progress)
and hands back a console on the real stderr for that progress. :func:`plain_text` strips the
terminal colour codes tools put in messages we quote in errors and reports.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console

from edgeserve.console import err_console

__all__ = ["captured_output", "plain_text"]

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def plain_text(text: str) -> str:
    """``text`` without ANSI escape sequences (colours, cursor moves)."""
    return _ANSI.sub("", text)


def _fd_backed(stream: object, fd: int) -> bool:
    try:
        return stream.fileno() == fd  # type: ignore[attr-defined,no-any-return]
    except (AttributeError, OSError, ValueError):
        return False


@contextlib.contextmanager
def captured_output(log: Path) -> Iterator[Console]:
    """Send everything written to fds 1 and 2 to ``log`` (truncated first) until exit; yields
    the console to draw progress on: the real stderr when ``sys.stderr`` was fd 2, else the
    usual one (a caller that replaced ``sys.stderr`` keeps seeing it)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with log.open("wb") as sink:
        saved = {fd: os.dup(fd) for fd in (1, 2)}
        console = err_console
        try:
            if _fd_backed(sys.stderr, 2):
                real = os.fdopen(os.dup(saved[2]), "w", encoding="utf-8", errors="replace")
                console = Console(file=real, highlight=False, force_terminal=err_console.is_terminal,
                                  width=err_console.width)
            for fd in (1, 2):
                os.dup2(sink.fileno(), fd)
            yield console
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            if console is not err_console:
                with contextlib.suppress(Exception):
                    console.file.close()
