"""``edgeserve fleet packages | unpublish | device add | device remove | broker-config | events``:
housekeeping and enrolment.

They read and change the fleet store (``--db``), the artifact store (``--artifacts``) and, for
``device remove``, the broker's retained messages; a running ``fleet serve`` sees the result at
once (the same operations are in the HTTP API, :mod:`.web.admin`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from edgeserve.cli import SuggestingGroup
from edgeserve.console import console, emit, format_bytes, json_option, table
from edgeserve.errors import ConfigError, StoreError
from edgeserve.signing import TrustStore

from .artifacts import ArtifactStore
from .cli_options import (
    artifacts_option,
    broker_options,
    broker_settings,
    db_option,
    default_artifacts_dir,
)
from .store import Store

if TYPE_CHECKING:
    from .enrolment import BrokerFiles

__all__ = ["broker_config_command", "device_group", "events_command", "packages_command",
           "unpublish_command"]


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _artifacts(artifacts_dir: Path | None) -> ArtifactStore:
    # reading and removing need no keys: what was stored was verified when it was published
    return ArtifactStore(artifacts_dir or default_artifacts_dir(), TrustStore())


def _store_if_any(db: str | None) -> Store | None:
    """The fleet store; None when no --db is given and the default one was never created
    (no fleet has run here, so nothing can use a package)."""
    try:
        return Store.open(db, create=False, migrate=False)
    except StoreError:
        if db is None:
            return None
        raise


# -- packages --------------------------------------------------------------------------------------

@click.command("packages")
@click.option("--model", default=None, help="Only this model's versions.")
@artifacts_option
@db_option
@json_option
def packages_command(model: str | None, artifacts_dir: Path | None, db: str | None,
                     as_json: bool) -> None:
    """List published packages: versions, releases, sizes, and what still uses each (running
    rollouts and experiments, devices whose desired state names it)."""
    from .packages import list_packages

    artifacts = _artifacts(artifacts_dir)
    store = _store_if_any(db)
    try:
        if store is not None:
            rows = list_packages(store, artifacts, model)
        else:
            rows = [{**v.to_dict(), "in_use": None} for name in
                    ([model] if model else artifacts.models()) for v in artifacts.versions(name)]
    finally:
        if store is not None:
            store.close()
    for row in rows:
        row.pop("interface_changes", None)

    def render(data: list[dict[str, Any]]) -> None:
        if not data:
            console.print(f"no packages published in {artifacts.root}")
            return
        console.print(table(f"{len(data)} published version(s) in {artifacts.root}", [
            "model", "version", "release", "size", "artifacts", "published (UTC)", "used by"], [
            (d["name"], d["version"], d["release"], format_bytes(d["size_bytes"]),
             ", ".join(d["artifacts"]), _when(d["published_at"]), _users(d)) for d in data]))

    emit(rows, as_json, render)


def _users(row: dict[str, Any]) -> str:
    if row.get("in_use") is None:
        return "-"
    parts = [*row["rollouts"], *row["experiments"]]
    if row["devices"]:
        parts.append(f"{len(row['devices'])} device(s)")
    return ", ".join(parts) or "nothing"


@click.command("unpublish")
@click.argument("model", help="The model.")
@click.argument("version", help="The published version to remove.")
@artifacts_option
@db_option
@json_option
def unpublish_command(model: str, version: str, artifacts_dir: Path | None, db: str | None,
                      as_json: bool) -> None:
    """Remove a published version. Refused while a running rollout or experiment, or a
    device's desired state, still uses it (the error names them). Its release stays taken:
    later packages of the model still need a higher one."""
    from .packages import unpublish

    artifacts = _artifacts(artifacts_dir)
    store = _store_if_any(db)
    try:
        if store is not None:
            removed = unpublish(store, artifacts, model, version)
        else:
            removed = artifacts.unpublish(model, version)
    finally:
        if store is not None:
            store.close()
    data = removed.to_dict()
    data.pop("interface_changes", None)
    emit(data, as_json, lambda d: console.print(
        f"unpublished [bold]{d['name']} {d['version']}[/] (release {d['release']}) from "
        f"{artifacts.root}"))


# -- devices ---------------------------------------------------------------------------------------

@click.group("device", cls=SuggestingGroup)
def device_group() -> None:
    """One device of the fleet ('edgeserve fleet devices' lists them all)."""


@device_group.command("remove")
@click.argument("device_id", help="The device to remove.")
@click.option("--fleet", "fleet_name", envvar="EDGESERVE_FLEET", default=None,
              help="The fleet (MQTT topic prefix) [default: the one the store belongs to; env "
                   "EDGESERVE_FLEET].")
@click.option("--force", is_flag=True,
              help="Remove it even while it is online or part of a running rollout (an agent "
                   "that is still running registers again when it reconnects).")
@broker_options
@db_option
@json_option
def device_remove(device_id: str, fleet_name: str | None, force: bool, db: str | None,
                  as_json: bool, **broker: Any) -> None:
    """Remove a device: clear its retained MQTT messages (status, reported, desired) and delete
    its rows from the store (registry, desired state, reports, telemetry windows)."""
    from .device_removal import remove_device

    settings = broker_settings(broker)
    with Store.open(db, create=False, migrate=False) as store:
        owner = store.fleet()
        fleet = fleet_name or owner
        if fleet is None:
            raise ConfigError("the store names no fleet yet; pass --fleet NAME")
        if owner is not None and fleet != owner:
            raise ConfigError(f"the store belongs to fleet {owner!r}, not {fleet!r}; pass the "
                              "--db of that fleet")
        result = remove_device(store, settings, fleet, device_id, force=force)
    emit(result, as_json, lambda d: console.print(
        f"removed device [bold]{d['device_id']}[/]: cleared {len(d['cleared_topics'])} retained "
        f"topic(s), deleted " + ", ".join(f"{n} {t}" for t, n in d["deleted_rows"].items()
                                          if n) + " row(s)"))


def _default_broker_dir() -> Path:
    from platformdirs import user_data_dir

    return Path(user_data_dir("edgeserve", appauthor=False)) / "fleet" / "broker"


_broker_dir_option = click.option(
    "--broker-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="The broker configuration 'fleet broker-config' wrote [default: the user data dir's "
         "edgeserve/fleet/broker].")


@device_group.command("add")
@click.argument("device_id", help="The new device's id (its broker user name).")
@click.option("--cert", "by_certificate", is_flag=True,
              help="Issue a client certificate from the fleet CA (common name = the device id) "
                   "instead of a password; the device connects to the certificate listener.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="With --cert: where to write ID.crt and ID.key [default: the broker "
                   "configuration's devices/ folder].")
@click.option("--profile", default=None, help="Its hardware profile, for the command printed.")
@click.option("--fleet", "fleet_name", envvar="EDGESERVE_FLEET", default="default",
              show_default=True, help="The fleet, for the command printed.")
@click.option("--broker-url", default=None, metavar="URL",
              help="How the device reaches the broker, for the command printed "
                   "[default: mqtts://HOST:PORT of the configuration].")
@_broker_dir_option
@json_option
def device_add(device_id: str, by_certificate: bool, out_dir: Path | None, profile: str | None,
               fleet_name: str, broker_url: str | None, broker_dir: Path | None,
               as_json: bool) -> None:
    """Enrol a device: broker credentials of its own, which the generated ACL restricts to that
    device's topics. A password (user = device id, shown once; reload the broker after with
    kill -HUP), or with --cert a client certificate and key (no reload needed)."""
    from .enrolment import BrokerFiles, add_device, add_device_certificate

    directory = broker_dir or _default_broker_dir()
    files = BrokerFiles(directory.resolve())
    if out_dir is not None and not by_certificate:
        raise click.UsageError("--out is where --cert writes the certificate; give --cert too")
    data: dict[str, Any] = {"device_id": device_id, "username": device_id,
                            "ca_file": str(files.ca)}
    if by_certificate:
        issued = add_device_certificate(directory, device_id, out_dir)
        data.update(cert_file=str(issued.cert_file), key_file=str(issued.key_file),
                    not_after=issued.not_after.isoformat())
        login = f"--cert-file {issued.cert_file} --key-file {issued.key_file}"
        prefix = ""
    else:
        data["password"] = add_device(directory, device_id)
        login = f"--username {device_id}"
        prefix = "EDGESERVE_MQTT_PASSWORD=… "
    url = broker_url or _broker_url(files, by_certificate)
    data["agent_command"] = (
        f"{prefix}edgeserve agent run --broker {url} {login} --ca-file {files.ca} --fleet "
        f"{fleet_name} --device-id {device_id}" + (f" --profile {profile}" if profile else "")
        + " --trusted-key RELEASE.pub.pem --fleet-key FLEET.pub.pem")
    emit(data, as_json, _print_enrolled)


def _print_enrolled(d: dict[str, Any]) -> None:
    if "password" in d:
        how = (f"broker user {d['username']}, password [bold]{d['password']}[/] (shown once; "
               "reload the broker: kill -HUP)")
    else:
        how = (f"client certificate {d['cert_file']} (until {d['not_after'][:10]}) and its key "
               f"{d['key_file']}: copy both to the device, keep the key secret")
    console.print(f"enrolled [bold]{d['device_id']}[/]: {how}\non the device: "
                  f"{d['agent_command']}", soft_wrap=True, highlight=False)


def _broker_url(files: BrokerFiles, by_certificate: bool) -> str:
    settings = files.settings()
    hosts = settings.get("hosts") or ["BROKER-HOST"]
    port = settings.get("cert_port") if by_certificate else settings.get("port")
    return f"mqtts://{hosts[0]}:{port}"  # type: ignore[index]


@click.command("broker-config")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Where to write it [default: the user data dir's "
                                 "edgeserve/fleet/broker].")
@click.option("--host", "hosts", multiple=True, required=True,
              help="A name or address devices use to reach the broker (in its TLS "
                   "certificate); repeatable.")
@click.option("--port", type=click.IntRange(1, 65535), default=8883, show_default=True,
              help="The broker's TLS port.")
@click.option("--cert-port", type=click.IntRange(0, 65535), default=8884, show_default=True,
              help="The TLS port for devices with client certificates ('device add --cert'); "
                   "0: no such listener.")
@click.option("--fleet-port", type=click.IntRange(1, 65535), default=8885, show_default=True,
              help="The TLS port for the fleet service's own clients (user edgeserve-fleet).")
@click.option("--bind", default="0.0.0.0", show_default=True,
              help="The address the broker listens on.")
@json_option
def broker_config_command(out_dir: Path | None, hosts: tuple[str, ...], port: int,
                          cert_port: int, fleet_port: int, bind: str, as_json: bool) -> None:
    """Write a hardened Mosquitto configuration: a TLS listener (certificates from a fleet CA
    made here), no anonymous clients, a password file and an ACL that gives each device exactly
    its own topics. Then enrol devices with 'fleet device add'."""
    from .enrolment import FLEET_USER, broker_config

    files = broker_config(out_dir or _default_broker_dir(), list(hosts), port, bind,
                          cert_port or None, fleet_port)
    data = {"config": str(files.config), "ca_file": str(files.ca), "fleet_user": FLEET_USER,
            "fleet_password_file": str(files.fleet_password), "port": port,
            "cert_port": cert_port or None, "fleet_port": fleet_port}
    emit(data, as_json, lambda d: console.print(
        f"wrote {d['config']}: start the broker with 'mosquitto -c {d['config']}' (its user must "
        f"read the directory); run the fleet with --broker mqtts://{FLEET_USER}@HOST:{fleet_port} "
        f"--ca-file {d['ca_file']} and EDGESERVE_MQTT_PASSWORD from {d['fleet_password_file']}; "
        "enrol devices with 'edgeserve fleet device add ID' (a password) or 'device add ID "
        "--cert' (a client certificate" + (f", port {d['cert_port']})" if d["cert_port"]
                                           else ": needs --cert-port)"),
        soft_wrap=True, highlight=False))


# -- events ----------------------------------------------------------------------------------------

@click.command("events")
@click.option("--since", default=None, help="Events after: 15m, 2h, 7d (ago), ISO time, epoch.")
@click.option("--model", default=None, help="Only this model's events.")
@click.option("--device", default=None, help="Only this device's events.")
@click.option("--rollout", "rollout_id", default=None, help="Only this rollout's events.")
@click.option("--gates", is_flag=True,
              help="Include the periodic gate evaluations of rollouts (left out by default).")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True,
              help="Show the newest N events (in time order).")
@db_option
@json_option
def events_command(since: str | None, model: str | None, device: str | None,
                   rollout_id: str | None, gates: bool, limit: int, db: str | None,
                   as_json: bool) -> None:
    """Show what happened in the fleet: rollout milestones (created, stages, promotions, device
    failures, completions, rollbacks) and how devices' updates ended (committed, rolled back,
    unhealthy, failed)."""
    from .cli_telemetry import parse_time
    from .events import fleet_events

    with Store.open(db, create=False, migrate=False) as store:
        rows = fleet_events(store, since=parse_time(since) if since else None, model=model,
                            device=device, rollout=rollout_id, gates=gates, limit=limit)

    def render(data: list[dict[str, Any]]) -> None:
        if not data:
            console.print("no events match")
            return
        console.print(table(f"{len(data)} event(s)", [
            "time (UTC)", "source", "event", "model", "version", "rollout", "device", "detail"],
            [(_when(e["ts"]), e["source"], e["event"], e["model"], e["version"], e["rollout"],
              e["device"], e["detail"]) for e in data]))

    emit(rows, as_json, render)
