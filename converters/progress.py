"""Progress display for long conversions: one rich bar per step, on stderr (stdout stays clean
for ``--json``). Disabled, it does nothing, so library callers and tests see no output.

A finished step stays listed with a mark that tells the truth about it: ✓ when it did what it
says, ⚠ when part of it failed or was skipped (:meth:`Step.warn`), ✗ when it failed
(:meth:`Step.fail`, or an exception). :meth:`Progress.note` lists something that was not done
at all (e.g. an artifact skipped in pre-flight) with a ⚠ mark.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

from edgeserve.console import err_console

__all__ = ["Progress", "Step"]

_MARKS = {"ok": "[green]✓[/]", "warn": "[yellow]⚠[/]", "fail": "[red]✗[/]"}


class Step:
    """The outcome of one step: ok unless :meth:`warn` or :meth:`fail` says otherwise."""

    def __init__(self) -> None:
        self.outcome = "ok"
        self.detail = ""

    def warn(self, detail: str = "") -> None:
        """Part of the step failed or was skipped."""
        if self.outcome == "ok":
            self.outcome, self.detail = "warn", detail

    def fail(self, detail: str = "") -> None:
        """The step did not do what it says."""
        self.outcome, self.detail = "fail", detail


class Progress:
    """``with Progress() as p: with p.step("onnx2tf") as s: …`` — a finished step stays listed."""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self._rich = RichProgress(SpinnerColumn(), TextColumn("{task.description}"),
                                  BarColumn(bar_width=24), TimeElapsedColumn(),
                                  console=console or err_console, transient=False,
                                  disable=not enabled)

    def __enter__(self) -> Progress:
        self._rich.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._rich.__exit__(kind, exc, tb)

    @contextmanager
    def step(self, description: str) -> Iterator[Step]:
        task = self._rich.add_task(escape(description), total=1)
        step = Step()
        try:
            yield step
        except BaseException:
            # completed: the step has ended (the spinner stops); the mark says how
            self._rich.update(task, completed=1,
                              description=f"{_MARKS['fail']} {escape(description)}")
            raise
        detail = f" ({escape(step.detail)})" if step.detail else ""
        self._rich.update(task, completed=1,
                          description=f"{_MARKS[step.outcome]} {escape(description)}{detail}")

    def note(self, description: str) -> None:
        """A listed line for something skipped, marked ⚠."""
        task = self._rich.add_task(f"{_MARKS['warn']} {escape(description)}", total=1)
        self._rich.update(task, completed=1)
