"""CLI output that is not a terminal: tables keep one line per row, and ``--watch`` prints each
change instead of drawing a live display nobody sees."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.table import Table

from edgeserve.console import console, watch
from edgeserve.profiles import list_profiles

EDGESERVE = str(Path(sys.executable).parent / "edgeserve")


def test_piped_tables_are_not_folded() -> None:
    """``profiles list`` into a pipe (no COLUMNS) prints each profile on one line, its name
    and its artifact list together, and the status-like lines are not wrapped either."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    result = subprocess.run([EDGESERVE, "profiles", "list"], capture_output=True, text=True,
                            timeout=60, env=env, check=True, stdin=subprocess.DEVNULL)
    rows = [line for line in result.stdout.splitlines() if line.startswith("│")]
    profiles = list_profiles()
    assert len(rows) == len(profiles)
    for profile in profiles:
        (row,) = [r for r in rows if f"│ {profile.name} " in r]
        assert ", ".join(t.key for t in profile.artifacts) in row


def test_rules_stay_readable_when_piped(capsys: pytest.CaptureFixture[str]) -> None:
    """A rule on the wide piped console is drawn at a readable width, not a thousand columns."""
    console.rule("section")
    line = capsys.readouterr().out.strip()
    assert "section" in line and len(line) <= 100


def test_watch_prints_each_change_when_piped(capsys: pytest.CaptureFixture[str]) -> None:
    """Piped, ``watch`` prints a state when it differs from the last one printed, under a time
    stamp, and returns once the view says it is final."""
    states = iter([("stage 1", False), ("stage 1", False), ("stage 2", False),
                   ("completed", True), ("never shown", True)])

    def view() -> tuple[Table, bool]:
        text, done = next(states)
        table = Table("rollout")
        table.add_row(text)
        return table, done

    watch(view, interval=0.01)
    out = capsys.readouterr().out
    assert out.count(" UTC --") == 3
    assert [s for s in ("stage 1", "stage 2", "completed") if s in out] == ["stage 1", "stage 2",
                                                                           "completed"]
    assert out.count("stage 1") == 1 and "never shown" not in out


def test_the_consoles_load_rich_on_first_use_and_then_are_rich_consoles() -> None:
    """``agent serve`` must not pay for rich (docs/benchmarks.md, footprint): importing the
    consoles loads none of it; used any way the code base uses them (a ``with`` block, a
    status, a progress bar given the untouched console), they become real rich consoles."""
    import subprocess
    import sys

    probe = """
import sys
from edgeserve.console import console, err_console
assert "rich" not in sys.modules, "importing the consoles loaded rich"
from rich.progress import Progress
with Progress(console=err_console, transient=True) as progress:  # untouched until here
    progress.update(progress.add_task("x", total=1), completed=1)
with console:
    console.print("[bold]first[/] line")
with console.status("working"):
    pass
from rich.console import Console
assert isinstance(console, Console) and isinstance(err_console, Console)
print("done")
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["first line", "done"]
