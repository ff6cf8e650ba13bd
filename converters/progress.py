"""Progress display for long conversions: one rich bar per step, on stderr (stdout stays clean
for ``--json``). Disabled, it does nothing, so library callers and tests see no output."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

from rich.progress import BarColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

from edgeserve.console import err_console

__all__ = ["Progress"]


class Progress:
    """``with Progress() as p: with p.step("onnx2tf"): …`` — a finished step stays listed."""

    def __init__(self, enabled: bool = True) -> None:
        self._rich = RichProgress(SpinnerColumn(), TextColumn("{task.description}"),
                                  BarColumn(bar_width=24), TimeElapsedColumn(),
                                  console=err_console, transient=False, disable=not enabled)

    def __enter__(self) -> Progress:
        self._rich.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._rich.__exit__(kind, exc, tb)

    @contextmanager
    def step(self, description: str) -> Iterator[None]:
        task = self._rich.add_task(description, total=1)
        try:
            yield
        except BaseException:
            self._rich.update(task, description=f"[red]✗[/] {description}")
            raise
        self._rich.update(task, completed=1, description=f"[green]✓[/] {description}")
