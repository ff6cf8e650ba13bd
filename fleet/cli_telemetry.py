"""``edgeserve fleet serve | devices | telemetry``: run ingestion, read the registry and windows."""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from edgeserve.console import console, emit, err_console, json_option, table, to_json

from .cli_options import artifacts_option, db_option, trusted_keys_option
from .store import Store, default_url

__all__ = ["devices_command", "parse_time", "serve_command", "telemetry_command"]

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}



def parse_time(text: str, now: float | None = None) -> float:
    """``30s``/``15m``/``2h``/``7d``/``1w`` ago, an ISO 8601 time (UTC if no zone) or epoch seconds."""
    now = time.time() if now is None else now
    value = text.strip()
    match = _RELATIVE.match(value)
    if match:
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a time; expected e.g. 15m, 2h, 7d (ago), "
                                 "2026-11-25T10:00 or epoch seconds") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ago(ts: float, now: float) -> str:
    seconds = max(0.0, now - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


# -- serve -----------------------------------------------------------------------------------------

@click.command("serve")
@click.option("--fleet", "fleet_name", envvar="EDGESERVE_FLEET", required=True,
              help="Fleet name: the MQTT topic prefix edgeserve/v1/FLEET/… [env EDGESERVE_FLEET].")
@click.option("--broker", envvar="EDGESERVE_BROKER", multiple=True, metavar="URL",
              help="mqtt[s]://[USER[:PASS]@]HOST[:PORT]; repeat it (or give a comma list) for "
                   "the nodes of a clustered broker, the next used when one fails [env "
                   "EDGESERVE_BROKER]. Without it an embedded broker starts (MQTT 5 on "
                   "--broker-port, 3.1.1 on the port after it).")
@db_option
@click.option("--username", envvar="EDGESERVE_MQTT_USERNAME", default=None,
              help="MQTT user name, when the broker wants one [env EDGESERVE_MQTT_USERNAME].")
@click.option("--password", envvar="EDGESERVE_MQTT_PASSWORD", default=None,
              help="MQTT password [env EDGESERVE_MQTT_PASSWORD].")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CA certificate(s) to verify the broker (implies TLS).")
@click.option("--cert-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Client certificate (PEM) for brokers that authenticate by certificate.")
@click.option("--key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Private key of --cert-file.")
@click.option("--tls-insecure", is_flag=True, help="Do not check the broker's host name.")
@click.option("--mqtt-version", type=click.Choice(["auto", "5", "3.1.1"]), default="auto",
              show_default=True, help="auto = MQTT 5, falling back to 3.1.1.")
@click.option("--worker", default="0", show_default=True,
              help="Name of this worker; workers of one fleet share the telemetry load.")
@click.option("--client-id", default=None,
              help="MQTT client id [default: edgeserve-fleet-FLEET-WORKER]; keep it stable so a "
                   "restart resumes the broker session.")
@click.option("--shared", type=click.Choice(["auto", "on", "off"]), default="auto",
              show_default=True, help="Subscribe to telemetry as a shared subscription.")
@click.option("--nats", "nats_urls", multiple=True, metavar="URL", envvar="EDGESERVE_FLEET_NATS",
              help="On a NATS cluster: take telemetry and statuses from a JetStream stream the "
                   "workers share (nats://HOST:4222; repeatable or a comma list; env "
                   "EDGESERVE_FLEET_NATS). The broker's MQTT listener still carries acks and "
                   "desired state.")
@click.option("--nats-replicas", type=click.IntRange(1, 5), default=3, show_default=True,
              help="Replicas of the JetStream stream (1 when the cluster has fewer servers).")
@click.option("--desired-connections", type=click.IntRange(1, 64), default=1,
              show_default=True,
              help="MQTT connections desired states are published over (a device's always on "
                   "the same one, spread over the broker's nodes): NATS stores retained "
                   "messages one at a time per connection, so 4 publish a rollout's stage "
                   "about twice as fast there.")
@click.option("--broker-host", default="127.0.0.1", show_default=True,
              help="Embedded broker: address to listen on.")
@click.option("--broker-port", default=1883, show_default=True, type=int,
              help="Embedded broker: MQTT 5 port (3.1.1 on the next port).")
@click.option("--http-host", default="127.0.0.1", show_default=True,
              help="Address of the HTTP side (artifacts, API, dashboard, /metrics).")
@click.option("--http-port", default=8080, show_default=True, type=int,
              help="HTTP port (0: any free port; -1: no HTTP side).")
@click.option("--public-url", default=None, metavar="URL",
              help="How devices reach the HTTP side [default: http://HTTP-HOST:HTTP-PORT].")
@artifacts_option
@trusted_keys_option
@click.option("--auth", envvar="EDGESERVE_FLEET_AUTH", default=None,
              help="HTTP auth: basic:USER:PASS, token:SECRET, jwt-hs256:SECRET[,aud=A] or "
                   "jwt-rs256:KEY.pem [default: none on loopback, a generated admin password "
                   "otherwise; env EDGESERVE_FLEET_AUTH].")
@click.option("--fleet-key", type=click.Path(dir_okay=False, path_type=Path),
              envvar="EDGESERVE_FLEET_KEY", default=None,
              help="The fleet's private key that signs desired state (made, with KEY's "
                   ".pub.pem beside it, when missing; devices pin the .pub.pem with 'agent run "
                   "--fleet-key') [default: the user data dir's edgeserve/fleet/keys/FLEET.key; "
                   "env EDGESERVE_FLEET_KEY].")
@click.option("--rollout-tick", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
              help="Seconds between rollout controller steps.")
@click.option("--connect-timeout", type=float, default=60.0, show_default=True,
              help="Keep trying an unreachable broker this long at start (seconds).")
@click.option("--delta-fraction", type=click.FloatRange(0, 1), envvar="EDGESERVE_DELTA_FRACTION",
              default=0.25, show_default=True,
              help="Send a device holding an earlier version a delta when it is at most this "
                   "fraction of the file (0: always the full file; env "
                   "EDGESERVE_DELTA_FRACTION).")
@click.option("--duration", type=float, default=None,
              help="Stop after SECONDS [default: until Ctrl+C or SIGTERM].")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True, help="How much the service logs (to stderr).")
@json_option
def serve_command(fleet_name: str, broker: tuple[str, ...], db: str | None, username: str | None,
                  password: str | None, ca_file: Path | None, cert_file: Path | None,
                  key_file: Path | None, tls_insecure: bool, mqtt_version: str, worker: str,
                  client_id: str | None, shared: str, nats_urls: tuple[str, ...],
                  nats_replicas: int, desired_connections: int, broker_host: str, broker_port: int,
                  http_host: str, http_port: int, public_url: str | None,
                  artifacts_dir: Path | None, trusted_keys: tuple[Path, ...], auth: str | None,
                  fleet_key: Path | None, rollout_tick: float, connect_timeout: float,
                  delta_fraction: float, duration: float | None,
                  log_level: str, as_json: bool) -> None:
    """Run the fleet: telemetry ingestion, artifact endpoint, API and dashboard, rollouts."""
    from edgeserve.auth import parse_auth_option
    from edgeserve.contract import check_id

    from .server import FleetConfig, FleetServer, fleet_public_key_path

    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_id(fleet_name, "fleet name")
    check_id(worker, "worker name")
    if log_level != "debug":
        logging.getLogger("alembic").setLevel(logging.WARNING)
    log = logging.getLogger("edgeserve.fleet")
    nats = _nats_urls(nats_urls)
    if nats and not broker:
        raise click.BadParameter("--nats takes telemetry from the NATS cluster whose MQTT "
                                 "listener the devices use: give that listener as --broker "
                                 "too (the embedded broker is not part of NATS)",
                                 param_hint="--nats")
    keys = list(trusted_keys) or [Path(p) for p in os.environ.get(
        "EDGESERVE_FLEET_TRUSTED_KEYS", "").split(os.pathsep) if p]
    config = FleetConfig(
        fleet=fleet_name, db=db, broker=",".join(broker) or None,
        broker_options={"username": username, "password": password, "ca_file": ca_file,
                        "cert_file": cert_file, "key_file": key_file,
                        "tls_insecure": tls_insecure or None, "protocol": mqtt_version},
        embedded_host=broker_host, embedded_port=broker_port, http_host=http_host,
        http_port=None if http_port < 0 else http_port, public_url=public_url,
        artifacts_dir=artifacts_dir, trusted_keys=keys, auth=parse_auth_option(auth),
        worker=worker, client_id=client_id, shared=shared,  # type: ignore[arg-type]
        nats=nats, nats_replicas=nats_replicas, desired_connections=desired_connections,
        connect_timeout=connect_timeout, rollout_tick_s=rollout_tick, fleet_key=fleet_key,
        delta_fraction=delta_fraction)
    server = FleetServer(config).start()
    assert server.service is not None and server.store is not None
    log.info("fleet %s ready: store %s, broker %s (MQTT %s), telemetry on %s", fleet_name,
             _redacted(server.store.url), server.broker_url, server.service.protocol,
             server.service.telemetry_filter)
    # stderr, so that --json keeps stdout for the final statistics
    if server.http_url:
        err_console.print(f"dashboard and API: {server.http_url}/  (devices fetch artifacts "
                          f"from {server.public_url}/v1/packages)")
    if server.broker_settings is not None and server.broker_settings.username is None:
        err_console.print("note: the broker let the fleet in without credentials, so anyone who "
                          "reaches it may publish as any device; for a fleet beyond this "
                          "machine, run it hardened ('edgeserve fleet broker-config', "
                          "docs/security.md)", soft_wrap=True, highlight=False)
    if server.fleet_key_path is not None:
        err_console.print(f"desired state is signed with {server.fleet_key_path}; devices pin "
                          f"{fleet_public_key_path(server.fleet_key_path)} "
                          "(agent run --fleet-key)", soft_wrap=True)
    if server.generated_password:
        err_console.print(f"HTTP login: admin / {server.generated_password} (generated: the "
                          "HTTP side listens beyond localhost; pass --auth to choose)")
    previous = signal.signal(signal.SIGTERM, lambda *_: server.request_stop())
    try:
        server.run(duration)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        stats = server.service.ingestor.stats.snapshot()
        server.stop()
    log.info("stopped: %s", stats)
    if as_json:
        click.echo(to_json(stats))


def _nats_urls(values: tuple[str, ...]) -> list[str]:
    """``--nats`` values (repeated, comma lists) as NATS client URLs; a bad one is refused."""
    from urllib.parse import urlsplit

    urls = [u.strip() for value in values for u in value.split(",") if u.strip()]
    for url in urls:
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in ("nats", "tls") or not parts.hostname or port == -1:
            raise click.BadParameter(f"{url!r} is not a NATS URL: expected nats://HOST[:PORT] "
                                     "(or tls://HOST[:PORT])", param_hint="--nats")
    return urls


def _redacted(url: str) -> str:
    from .store import redact_url

    return redact_url(url)


# -- devices ---------------------------------------------------------------------------------------

@click.command("devices")
@db_option
@click.option("--state", type=click.Choice(["online", "offline", "unknown"]), default=None,
              help="Only devices in this state.")
@json_option
def devices_command(db: str | None, state: str | None, as_json: bool) -> None:
    """List the fleet's devices: online/offline, last seen, profile, active versions."""
    from .registry import list_devices

    with Store.open(db, create=False) as store:
        rows = [d.to_dict() for d in list_devices(store, state=state)]
    now = time.time()

    def render(data: list[dict[str, Any]]) -> None:
        if not data:
            console.print(f"no devices{f' {state}' if state else ''} in {db or default_url()}")
            return
        console.print(table(f"{len(data)} device(s)", [
            "device", "state", "last seen", "profile", "agent", "models", "windows", "acked",
            "dropped", "labels"], [
            (d["device_id"], d["state"], _ago(d["last_seen"], now), d["profile"],
             d["agent_version"], ", ".join(f"{m}={v}" for m, v in sorted(d["models"].items())),
             d["windows_stored"], d["acked_seq"], d["dropped_total"],
             ", ".join(f"{k}={v}" for k, v in sorted(d["labels"].items())))
            for d in data]))

    emit(rows, as_json, render)


# -- telemetry -------------------------------------------------------------------------------------

@click.command("telemetry")
@db_option
@click.option("--device", default=None, help="Only this device.")
@click.option("--model", default=None, help="Only this model.")
@click.option("--version", "version", default=None, help="Only this model version.")
@click.option("--since", default=None, help="Windows ending after: 15m, 2h, 7d, ISO time, epoch.")
@click.option("--until", default=None, help="Windows starting before (same forms as --since).")
@click.option("--health", "kind", flag_value="health", help="Only device-health windows.")
@click.option("--models", "kind", flag_value="models", help="Only model windows.")
@click.option("--limit", type=click.IntRange(1, 1_000_000), default=100, show_default=True,
              help="Show the newest N matching windows (in time order).")
@click.option("--full", is_flag=True, help="With --json: include each window's full payload.")
@json_option
def telemetry_command(db: str | None, device: str | None, model: str | None,
                      version: str | None, since: str | None, until: str | None,
                      kind: str | None, limit: int, full: bool, as_json: bool) -> None:
    """Show stored telemetry windows: device, seq, model, version, requests, errors, latency."""
    from .telemetry import query_windows

    with Store.open(db, create=False) as store:
        found = query_windows(
            store, device=device, model=model, version=version,
            since=parse_time(since) if since else None,
            until=parse_time(until) if until else None,
            health=None if kind is None else kind == "health", limit=limit, newest_first=True)
    rows = [w.to_dict(with_data=full) for w in reversed(found)]

    def render(data: list[dict[str, Any]]) -> None:
        if not data:
            console.print("no telemetry windows match")
            return
        console.print(table(f"{len(data)} window(s)", [
            "device", "seq", "model", "version", "start (UTC)", "s", "requests", "errors",
            "p50 ms", "p95 ms", "drift psi", "dropped"], [
            (w["device_id"], w["seq"], w["model"] or "(health)", w["version"],
             _when(w["start"]), f"{w['end'] - w['start']:.0f}", w["requests"], w["errors"],
             _num(w["latency_p50_ms"]), _num(w["latency_p95_ms"]), _num(w["drift_psi"]),
             w["dropped"] or "")
            for w in data]))

    emit(rows, as_json, render)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
