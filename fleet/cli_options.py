"""Options several ``edgeserve fleet`` commands share (one definition each)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import click

__all__ = ["artifacts_option", "db_option", "default_artifacts_dir", "parse_duration", "parse_labels",
           "trusted_keys_option"]

db_option = click.option(
    "--db", envvar="EDGESERVE_FLEET_DB", default=None, metavar="URL",
    help="Fleet store: sqlite:///PATH or postgresql://USER@HOST/DB "
         "[default: SQLite in the user data directory; env EDGESERVE_FLEET_DB].")

artifacts_option = click.option(
    "--artifacts", "artifacts_dir", type=click.Path(file_okay=False, path_type=Path),
    default=None, metavar="DIR",
    help="Artifact store directory [default: the user data directory; env "
         "EDGESERVE_FLEET_ARTIFACTS].")

trusted_keys_option = click.option(
    "--trusted-key", "trusted_keys", multiple=True, type=click.Path(exists=True, path_type=Path),
    help="Public key (PEM, or a directory of them) packages must be signed with; repeatable "
         "[env EDGESERVE_FLEET_TRUSTED_KEYS, separated by ':'].")


def default_artifacts_dir() -> Path:
    from platformdirs import user_data_dir

    return Path(os.environ.get("EDGESERVE_FLEET_ARTIFACTS")
                or Path(user_data_dir("edgeserve")) / "fleet" / "artifacts")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``5m``, ``2h`` or ``1d``."""
    match = _DURATION.match(text)
    if not match:
        raise click.BadParameter(f"{text!r} is not a duration; expected e.g. 30, 30s, 5m, 2h")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def parse_labels(pairs: tuple[str, ...]) -> dict[str, str]:
    """``("site=a", "tier=edge")`` → ``{"site": "a", "tier": "edge"}`` (``--label`` options)."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"label {pair!r} is not KEY=VALUE", param_hint="--label")
        key, value = pair.split("=", 1)
        out[key] = value
    return out
