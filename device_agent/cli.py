"""``edgeserve agent``: the device-side commands."""

from __future__ import annotations

import click

from edgeserve.cli import SuggestingGroup

__all__ = ["agent"]


@click.group("agent", cls=SuggestingGroup)
def agent() -> None:
    """Run models on this device: install, predict, serve."""
