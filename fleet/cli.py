"""``edgeserve fleet``: the fleet manager's commands."""

from __future__ import annotations

import click

from edgeserve.cli import SuggestingGroup

__all__ = ["fleet"]


@click.group("fleet", cls=SuggestingGroup)
def fleet() -> None:
    """Fleet service: devices, telemetry, rollouts, experiments."""
