"""Options several ``edgeserve fleet`` commands share (one definition each)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from edgeserve.mqtt import BrokerSettings

__all__ = ["artifacts_option", "broker_options", "broker_settings", "db_option",
           "default_artifacts_dir", "parse_duration", "parse_labels", "trusted_keys_option"]

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


def broker_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--broker`` and its credentials/TLS options, for commands that talk to the broker
    directly (``fleet device remove``); :func:`broker_settings` turns them into settings."""
    options = [
        click.option("--broker", envvar="EDGESERVE_BROKER", multiple=True, metavar="URL",
                     help="mqtt[s]://[USER[:PASS]@]HOST[:PORT] of the fleet's broker; repeat "
                          "it (or give a comma list) for the nodes of a clustered broker "
                          "[env EDGESERVE_BROKER; default: mqtt://127.0.0.1:1883]."),
        click.option("--username", envvar="EDGESERVE_MQTT_USERNAME", default=None,
                     help="MQTT user name [env EDGESERVE_MQTT_USERNAME]."),
        click.option("--password", envvar="EDGESERVE_MQTT_PASSWORD", default=None,
                     help="MQTT password [env EDGESERVE_MQTT_PASSWORD]."),
        click.option("--ca-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="CA certificate(s) to verify the broker (implies TLS)."),
        click.option("--cert-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Client certificate (PEM) for brokers that authenticate by one."),
        click.option("--key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Private key of --cert-file."),
        click.option("--tls-insecure", is_flag=True, help="Do not check the broker's host name."),
        click.option("--mqtt-version", type=click.Choice(["auto", "5", "3.1.1"]),
                     default="auto", show_default=True,
                     help="auto = MQTT 5, falling back to 3.1.1."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def broker_settings(options: dict[str, Any], subscribe_qos: int = 1) -> BrokerSettings:
    """The ``BrokerSettings`` for the values of :func:`broker_options` (popped from
    ``options``); ``subscribe_qos`` for the device links a simulator opens."""
    from edgeserve.mqtt import BrokerSettings

    return BrokerSettings.from_url(
        ",".join(options.pop("broker") or ("mqtt://127.0.0.1:1883",)), username=options.pop("username"),
        password=options.pop("password"), ca_file=options.pop("ca_file"),
        cert_file=options.pop("cert_file"), key_file=options.pop("key_file"),
        tls_insecure=options.pop("tls_insecure") or None, protocol=options.pop("mqtt_version"),
        subscribe_qos=subscribe_qos)
