"""``edgeserve convert``: model file in, validated and signed package out."""

from __future__ import annotations

import click

__all__ = ["convert"]


@click.command("convert")
def convert() -> None:
    """Convert a trained model into a validated, signed package (being built: issue #3)."""
    from edgeserve.errors import ConfigError

    raise ConfigError("'edgeserve convert' is not available in this build yet (issue #3)")
