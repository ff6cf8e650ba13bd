"""``edgeserve fleet``: the fleet manager's commands."""

from __future__ import annotations

import click

from edgeserve.cli import SuggestingGroup

from .cli_admin import (
    broker_config_command,
    device_group,
    events_command,
    packages_command,
    unpublish_command,
)
from .cli_experiment import experiment
from .cli_rollout import publish_command, rollout
from .cli_simulate import simulate_command
from .cli_telemetry import devices_command, serve_command, telemetry_command

__all__ = ["fleet"]


@click.group("fleet", cls=SuggestingGroup)
def fleet() -> None:
    """Fleet service: devices, telemetry, rollouts, experiments."""


fleet.add_command(serve_command)
fleet.add_command(devices_command)
fleet.add_command(telemetry_command)
fleet.add_command(publish_command)
fleet.add_command(packages_command)
fleet.add_command(unpublish_command)
fleet.add_command(device_group)
fleet.add_command(broker_config_command)
fleet.add_command(events_command)
fleet.add_command(rollout)
fleet.add_command(experiment)
fleet.add_command(simulate_command)
