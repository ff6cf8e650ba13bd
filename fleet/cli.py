"""``edgeserve fleet``: the fleet manager's commands."""

from __future__ import annotations

import click

from edgeserve.cli import SuggestingGroup

from .cli_experiment import experiment
from .cli_rollout import publish_command, rollout
from .cli_telemetry import devices_command, serve_command, telemetry_command

__all__ = ["fleet"]


@click.group("fleet", cls=SuggestingGroup)
def fleet() -> None:
    """Fleet service: devices, telemetry, rollouts, experiments."""


fleet.add_command(serve_command)
fleet.add_command(devices_command)
fleet.add_command(telemetry_command)
fleet.add_command(publish_command)
fleet.add_command(rollout)
fleet.add_command(experiment)
