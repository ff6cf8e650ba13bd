"""Options several ``edgeserve fleet`` commands share (one definition each)."""

from __future__ import annotations

import os
from pathlib import Path

import click

__all__ = ["artifacts_option", "db_option", "default_artifacts_dir", "trusted_keys_option"]

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
