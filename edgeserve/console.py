"""Output helpers every ``edgeserve`` command uses: rich tables for people, ``--json`` for tools.

Commands build plain data (dicts and lists) and hand it here with a renderer, so human and machine
output always show the same facts.

Output that is not a terminal (a pipe, a file, a CI log) has no width to fit: there the consoles
are wide (:data:`PIPE_WIDTH`), so tables keep one line per row and messages one line each
instead of being folded at 80 columns (``COLUMNS`` still wins when set). :func:`watch` refreshes
in place on a terminal and prints each new state when piped.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import click

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.table import Table

__all__ = ["PIPE_WIDTH", "console", "emit", "err_console", "escape", "format_bytes",
           "json_option", "plain", "table", "to_json", "watch"]

PIPE_WIDTH = 1000
"""Columns of a console whose output is not a terminal (see the module docstring)."""
_RULE_WIDTH = 100


def _console_class() -> type[Console]:
    """The rich console class, defined on first use: rich (~2.5 MB resident) is imported only
    by a command that prints through it, not by ``agent serve`` or ``agent run``, which print
    their few status lines with :func:`plain`."""
    from typing import Literal

    from rich.console import Console, ConsoleDimensions
    from rich.style import Style
    from rich.text import Text

    class _Console(Console):
        """A rich console that is wide when its output is not a terminal."""

        @property
        def size(self) -> ConsoleDimensions:
            size = super().size
            if self._width is None and not self.is_terminal and not os.environ.get("COLUMNS"):
                return ConsoleDimensions(PIPE_WIDTH, size.height)
            return size

        @size.setter
        def size(self, new_size: tuple[int, int]) -> None:
            self._width, self._height = new_size

        def rule(self, title: str | Text = "", *, characters: str = "─",
                 style: str | Style = "rule.line",
                 align: Literal["left", "center", "right"] = "center") -> None:
            from rich.rule import Rule

            # a rule spans the console: on a wide piped console, a sane width instead
            self.print(Rule(title, characters=characters, style=style, align=align),
                       width=None if self.is_terminal else min(self.width, _RULE_WIDTH))

    return _Console


class _LazyConsole:
    """Stands for a rich console until first used, then becomes one (its class and state are
    the real console's from then on: ``isinstance``, ``with console:`` and rich's own uses all
    see a :class:`rich.console.Console`); see :func:`_console_class`."""

    def __init__(self, **options: Any) -> None:
        self._options = options

    def _become(self) -> None:
        real = _console_class()(**self._options)
        self.__dict__.clear()
        self.__dict__.update(real.__dict__)
        self.__class__ = type(real)  # type: ignore[assignment]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_options":
            raise AttributeError(name)
        self._become()
        return getattr(self, name)

    # ``with console:`` looks both up on this class before __enter__ runs: each hands over to
    # the real console's own, becoming it first if need be
    def __enter__(self) -> Any:
        if type(self) is _LazyConsole:
            self._become()
        return type(self).__enter__(self)

    def __exit__(self, *exc: Any) -> Any:
        if type(self) is _LazyConsole:
            self._become()
        return type(self).__exit__(self, *exc)


console: Console = cast("Console", _LazyConsole(highlight=False))
err_console: Console = cast("Console", _LazyConsole(stderr=True, highlight=False))


def plain(message: str, err: bool = False) -> None:
    """Print a line of plain text (no markup, no rich): the agent's status lines."""
    click.echo(message, err=err)


def escape(text: str) -> str:
    """``text`` with rich markup escaped (rich.markup.escape, imported when used)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def _default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", by_alias=True)
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, default=_default, ensure_ascii=False)


def emit(data: Any, as_json: bool, render: Callable[[Any], None] | None = None) -> None:
    """Print ``data`` as JSON (``--json``) or through ``render`` for people."""
    if as_json or render is None:
        sys.stdout.write(to_json(data) + "\n")
        sys.stdout.flush()
    else:
        render(data)


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    from rich.table import Table

    t = Table(title=title, title_justify="left", header_style="bold")
    for column in columns:
        t.add_column(column, overflow="fold")
    for row in rows:
        t.add_row(*("" if v is None else str(v) for v in row))
    return t


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")(f)


def watch(view: Callable[[], tuple[RenderableType, bool]], interval: float) -> None:
    """Show ``view()`` (a renderable, and whether it is final) until it is final.

    On a terminal it refreshes in place; piped, each state that differs from the last one is
    printed below a time stamp, so ``--watch | tee log`` records the progress."""
    from rich.live import Live

    renderable, done = view()
    if console.is_terminal:
        with Live(renderable, console=console, refresh_per_second=4) as live:
            while not done:
                time.sleep(interval)
                renderable, done = view()
                live.update(renderable)
        return
    last = None
    while True:
        with console.capture() as captured:
            console.print(renderable)
        text = captured.get()
        if text != last:
            stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
            sys.stdout.write(f"-- {stamp} UTC --\n{text}")
            sys.stdout.flush()
            last = text
        if done:
            return
        time.sleep(interval)
        renderable, done = view()
