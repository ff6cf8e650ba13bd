"""``edgeserve agent run``: serve models locally and send their telemetry to the fleet.

:class:`AgentRun` wires the parts together - the :class:`~.agent.Agent`, the local HTTP API, the
monitoring observer writing windows into the durable outbox, and the MQTT link flushing that
outbox - and takes them down in the right order (stop serving, close the last window, say
goodbye). Serving never waits for the network: without a broker, or while it is unreachable,
windows simply wait in the outbox. With a link, the :class:`~.updates.updater.Updater` applies desired
state from the fleet (downloads over HTTP, or in chunks over MQTT) and publishes what it did on
``reported``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import signal
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from edgeserve.auth import Authenticator
from edgeserve.cli import subscribe_qos_option
from edgeserve.console import plain
from edgeserve.contract import FileChunk, Reported, decode, encode, open_desired
from edgeserve.errors import ConfigError, ContractError, EdgeserveError
from edgeserve.mqtt import BrokerSettings
from edgeserve.signing import TrustStore

from .agent import Agent
from .cli import (
    agent,
    agent_options,
    batch_option,
    batching_of,
    limit_options,
    loop_option,
    server_limits,
    tls_options,
    tls_settings,
)
from .config import AgentConfig, load_config, open_agent
from .telemetry.link import Link, LinkSettings
from .telemetry.monitor import Monitor
from .telemetry.outbox import DEFAULT_MAX_BYTES, Outbox
from .updates.fetch import MqttTransport
from .updates.updater import Updater

__all__ = ["AgentRun", "claim_cache", "default_device_id", "run"]

log = logging.getLogger(__name__)


_OUTCOMES = {"committed": "committed", "rolled-back": "health-failed",
             "unhealthy": "health-failed", "failed": "update-failed"}
"""Reported update states worth an event, and the event's name."""


def default_device_id() -> str:
    """The host name, reduced to the characters a device id may have."""
    name = re.sub(r"[^A-Za-z0-9._:-]", "-", socket.gethostname()).strip("-.") or "device"
    return name[:128]


@dataclass
class AgentRun:
    """A running agent: serving, monitoring and (with a broker) the link to the fleet."""

    agent: Agent
    outbox: Outbox
    monitor: Monitor
    link: Link | None = None
    updater: Updater | None = None
    http: Any = None
    _chunks: queue.Queue[FileChunk] = field(default_factory=queue.Queue, repr=False)
    labels: dict[str, str] = field(default_factory=dict)
    _outcomes: dict[str, tuple[str, str | None]] = field(default_factory=dict, repr=False)
    # reports come from the updater's thread and the link's (on connect)
    _outcomes_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    fleet_keys: TrustStore = field(default_factory=TrustStore)
    """the fleet keys desired state must be signed with (pinned at enrolment)"""
    desired_refused: int = 0
    artifact_origins: tuple[str, ...] = ()
    """where HTTP downloads may come from; empty: wherever signed desired state says"""

    @classmethod
    def build(cls, agent: Agent, *, window_s: float = 60.0, outbox_path: Path | None = None,
              outbox_max_bytes: int = DEFAULT_MAX_BYTES, link: LinkSettings | None = None,
              labels: dict[str, str] | None = None, fleet_keys: TrustStore | None = None,
              artifact_origins: Sequence[str] = ()) -> AgentRun:
        """Attach monitoring (and the link) to ``agent``; nothing runs until :meth:`start`."""
        cache = agent.cache.root
        outbox = Outbox(outbox_path or cache / "telemetry" / "outbox.db", outbox_max_bytes)
        monitor = Monitor(outbox, window_s=window_s, references=agent.reference_stats,
                          health_path=cache)
        # shadow comparisons and feedback sums ride in the same windows
        monitor.add_source("shadow", agent.shadows.drain)
        if agent.feedback_log is not None:
            monitor.add_source("feedback", agent.feedback_log.drain)
        run = cls(agent, outbox, monitor, labels=dict(labels or {}),
                  fleet_keys=fleet_keys or TrustStore(),
                  artifact_origins=tuple(artifact_origins))
        if link is not None:
            run.link = Link(link, outbox, status_info=run.status_info)
            run.updater = run._attach_updates(run.link, link.device_id)
        agent.add_observer(monitor)
        return run

    def _attach_updates(self, link: Link, device_id: str) -> Updater:
        """Desired state in, reported state out, artifact chunks over MQTT when asked for."""

        def receive(timeout: float) -> FileChunk | None:
            try:
                return self._chunks.get(timeout=timeout)
            except queue.Empty:
                return None

        # the callables look up self.link when called, so they survive reconnect()
        transport = MqttTransport(
            lambda request: self.link is not None and self.link.publish(
                "files", encode(request), sub=("req",)), receive)
        updater = Updater(self.agent, device_id, self.agent.cache.root / "updates",
                          self._report, mqtt=transport, artifact_origins=self.artifact_origins)
        # what the updater had reached before this start is not news for the event log
        self._outcomes = {name: (m.state, m.target) for name, m in updater.models.items()}
        self._wire(link, updater)
        return updater

    def _on_desired(self, payload: bytes, updater: Updater, device_id: str) -> None:
        """Act only on desired state the fleet signed for this device (edgeserve.contract
        .desired); anything else is refused, counted and logged (throttled)."""
        if not len(self.fleet_keys):
            self._refuse("this agent pins no fleet key, so it cannot tell the fleet's desired "
                         "state from anyone else's: pass --fleet-key FLEET.pub.pem (printed by "
                         "'edgeserve fleet serve')")
            return
        try:
            desired = open_desired(payload, self.fleet_keys, device_id)
        except EdgeserveError as exc:
            self._refuse(str(exc))
            return
        updater.submit(desired)

    def _refuse(self, why: str) -> None:
        self.desired_refused += 1
        if self.desired_refused <= 10 or self.desired_refused % 100 == 0:
            log.warning("refused a desired-state message (#%d): %s", self.desired_refused, why)

    def _report(self, reported: Reported) -> None:
        self._log_outcomes(reported)
        if self.link is not None:
            self.link.publish("reported", encode(reported), retain=True)
            self.link.refresh_status()

    def _log_outcomes(self, reported: Reported) -> None:
        """Write what an update came to into the agent's event log, once per outcome."""
        for name, model in reported.models.items():
            outcome = (model.state, model.target)
            with self._outcomes_lock:
                seen = self._outcomes.get(name) == outcome
                self._outcomes[name] = outcome
            if seen or model.state not in _OUTCOMES:
                continue
            error = model.last_error.message if model.last_error else ""
            if model.state == "committed":
                detail = "passed its health check; the fleet counts it"
            elif model.state == "rolled-back":
                detail = f"{error}; rolled back to {model.active}"
            elif model.state == "unhealthy":
                detail = f"{error}; no earlier version to return to, so it keeps serving"
            else:
                detail = error
            self.agent.events.add(_OUTCOMES[model.state], name,
                                  model.target or model.active, detail)

    def _wire(self, link: Link, updater: Updater) -> None:
        def on_desired(payload: bytes) -> None:
            if not payload:  # a cleared retained message
                return
            self._on_desired(payload, updater, link.settings.device_id)

        def on_chunk(payload: bytes) -> None:
            try:
                self._chunks.put(decode(FileChunk, payload, "files/data"))
            except ContractError as exc:
                log.warning("ignored a bad file chunk: %s", exc)

        link.subscribe("desired", on_desired)
        link.subscribe("files", on_chunk, sub=("data",))
        link.on_connect(lambda: self._report(updater.current_report()))

    def disconnect(self, clean: bool = False) -> None:
        """Drop the link (serving and monitoring go on; windows wait in the outbox).

        ``clean`` says goodbye (retained offline status); otherwise the broker's Last Will does."""
        if self.link is not None:
            if clean:
                self.link.stop()
            else:
                self.link.kill()

    def reconnect(self) -> None:
        """A fresh link with the same settings, outbox and handlers (after :meth:`disconnect`)."""
        if self.link is None:
            return
        self.link = Link(self.link.settings, self.outbox, status_info=self.status_info)
        if self.updater is not None:
            self._wire(self.link, self.updater)
        self.link.start()

    def status_info(self) -> dict[str, Any]:
        """Profile, active model versions and labels for the birth message."""
        return {"profile": self.agent.profile.name, "labels": self.labels,
                "models": {m.name: m.version for m in self.agent.list_models() if m.active}}

    def start(self, host: str = "127.0.0.1", port: int | None = 8000, **http: Any) -> AgentRun:
        """Serve (``port`` None: no HTTP API), monitor and connect to the fleet.

        A taken port fails here, before the link connects: a device that registered with the
        fleet and then died would stay in its registry as a ghost."""
        if port is not None:
            from .server.runner import check_port_free

            check_port_free(host, port)
        for info in self.agent.list_models():
            if info.active:
                self.monitor.watch(info.name, info.version)
        self.monitor.start()
        if self.updater is not None:
            self.updater.start()
        if self.link is not None:
            self.link.start()
        if port is not None:
            from .server import start_http_server

            self.http = start_http_server(self.agent, host, port, **http)
        return self

    def stop(self) -> None:
        if self.http is not None:
            self.http.stop()
        if self.updater is not None:
            self.updater.stop()
        self.monitor.stop(flush=True)
        if self.link is not None:
            self.link.stop()
        self.outbox.close()
        self.agent.close()


def claim_cache(cache_dir: Path) -> int:
    """Lock ``CACHE/run.lock`` for this process's lifetime (returns the descriptor to keep).

    Two ``agent run`` on one cache would share one telemetry outbox and one update state, and
    the second would only find out half-way; refusing at once names the fix."""
    import fcntl

    cache_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache_dir / "run.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConfigError(f"another 'edgeserve agent run' already uses the cache {cache_dir}; "
                          "give each agent on this host its own --cache DIR and --port") from None
    return fd


def _labels(values: tuple[str, ...]) -> dict[str, str]:
    labels = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"label {item!r} is not KEY=VALUE")
        labels[key] = value
    return labels


def _origin(value: str) -> str:
    """An ``--artifact-origin``: an http(s) URL with a host and no more than a '/' path."""
    from urllib.parse import urlsplit

    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or \
            parts.path not in ("", "/") or parts.query:
        raise ValueError(f"{value!r} is not an origin; expected http(s)://HOST[:PORT]")
    return value.strip().rstrip("/")


@click.command("run")
@click.option("--host", default="127.0.0.1", show_default=True, help="Local HTTP API address.")
@click.option("--port", default=8000, show_default=True, type=int,
              help="Local HTTP API port (0: any free port; -1: no HTTP API). Several agents on "
                   "one host need one port (and one --cache) each.")
@click.option("--broker", envvar="EDGESERVE_BROKER", multiple=True, metavar="URL",
              help="mqtt[s]://[USER[:PASS]@]HOST[:PORT] of the fleet's broker; repeat it (or "
                   "give a comma list) for the nodes of a clustered broker, the next used when "
                   "one fails [env EDGESERVE_BROKER]. Without it the telemetry waits in the "
                   "outbox.")
@click.option("--device-id", envvar="EDGESERVE_DEVICE_ID", default=None,
              help="This device's id in the fleet [default: the host name].")
@click.option("--fleet", "fleet_name", envvar="EDGESERVE_FLEET", default="default",
              show_default=True, help="Fleet name (MQTT topic prefix).")
@click.option("--window", type=click.FloatRange(min=1.0), default=60.0, show_default=True,
              help="Telemetry window in seconds.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="Label for the device registry; repeatable.")
@click.option("--outbox-max-bytes", type=click.IntRange(min=4096), default=DEFAULT_MAX_BYTES,
              show_default=True, help="Disk the outbox may use; past it the oldest windows go.")
@click.option("--username", envvar="EDGESERVE_MQTT_USERNAME", default=None,
              help="MQTT user name, when the broker wants one [env EDGESERVE_MQTT_USERNAME].")
@click.option("--password", envvar="EDGESERVE_MQTT_PASSWORD", default=None,
              help="MQTT password [env EDGESERVE_MQTT_PASSWORD].")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CA certificate(s) to verify the broker (implies TLS).")
@click.option("--cert-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Client certificate (PEM).")
@click.option("--key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Private key of --cert-file.")
@click.option("--tls-insecure", is_flag=True, help="Do not check the broker's host name.")
@click.option("--mqtt-version", type=click.Choice(["auto", "5", "3.1.1"]), default="auto",
              show_default=True, help="auto = MQTT 5, falling back to 3.1.1.")
@subscribe_qos_option
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 256),
              help="Inference worker threads of the HTTP API.")
@click.option("--auth", default=None, envvar="EDGESERVE_AUTH",
              help="HTTP API auth, as for 'agent serve'.")
@click.option("--duration", type=float, default=None,
              help="Stop after SECONDS [default: until Ctrl+C or SIGTERM].")
@tls_options
@limit_options
@click.option("--fleet-key", "fleet_keys", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The fleet's public key (FLEET.pub.pem, printed by 'fleet serve'): desired "
                   "state is obeyed only when it signed it; repeatable [env "
                   "EDGESERVE_FLEET_KEYS].")
@click.option("--artifact-origin", "artifact_origins", multiple=True, metavar="URL",
              envvar="EDGESERVE_ARTIFACT_ORIGINS", type=_origin,
              help="Download artifacts only from this scheme://host[:port] (the fleet's "
                   "--public-url); repeatable [default: wherever the fleet's signed desired "
                   "state says; env EDGESERVE_ARTIFACT_ORIGINS, space-separated].")
@batch_option
@loop_option("asyncio")
@agent_options
def run(host: str, port: int, broker: tuple[str, ...], device_id: str | None, fleet_name: str,
        window: float, labels: tuple[str, ...], outbox_max_bytes: int, username: str | None,
        password: str | None, ca_file: Path | None, cert_file: Path | None,
        key_file: Path | None, tls_insecure: bool, mqtt_version: str, subscribe_qos: str,
        workers: int,
        auth: str | None, duration: float | None, tls_cert: Path | None, tls_key: Path | None,
        tls_client_ca: Path | None, insecure: bool, memory_budget: int,
        max_connections: int | None, header_timeout: float, fleet_keys: tuple[Path, ...],
        artifact_origins: tuple[str, ...], batch: tuple[str, ...], event_loop: str,
        cache_dir: Path | None, profile: str | None, trusted_keys: tuple[Path, ...]) -> None:
    """Serve installed models and send their telemetry (windows, drift, health) to the fleet."""
    from .server import check_exposure, parse_auth_option

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    link = None
    device = device_id or default_device_id()
    if broker:
        settings = BrokerSettings.from_url(
            ",".join(broker), username=username, password=password, ca_file=ca_file,
            cert_file=cert_file, key_file=key_file, tls_insecure=tls_insecure or None,
            protocol=mqtt_version, subscribe_qos=int(subscribe_qos))
        link = LinkSettings(settings, fleet_name, device)
    authenticator = parse_auth_option(auth)
    tls = tls_settings(tls_cert, tls_key, tls_client_ca)
    if port >= 0:
        check_exposure(host, authenticator, tls, insecure)
    config = load_config(cache_dir, profile, trusted_keys, fleet_keys)
    if not config.trusted_keys:
        plain("warning: no trusted keys (--trusted-key, EDGESERVE_TRUSTED_KEYS or agent.toml): "
              "this agent cannot verify or install anything the fleet sends it", err=True)
    if link is not None and not config.fleet_keys:
        plain("warning: no fleet key (--fleet-key, EDGESERVE_FLEET_KEYS or agent.toml): this "
              "agent will refuse every desired state, since it cannot tell the fleet's from "
              "anyone else's", err=True)
    batching, workers = batching_of(batch, workers)
    lock = claim_cache(config.cache_dir)
    try:
        _run(config, device, link, window, outbox_max_bytes, labels, host, port, authenticator,
             workers, duration, fleet_name, tls,
             server_limits(memory_budget, max_connections, header_timeout), artifact_origins,
             batching, event_loop)
    finally:
        os.close(lock)


def _run(config: AgentConfig, device: str, link: LinkSettings | None, window: float,
         outbox_max_bytes: int, labels: tuple[str, ...], host: str, port: int,
         authenticator: Authenticator | None, workers: int, duration: float | None,
         fleet_name: str, tls: Any = None, limits: Any = None,
         artifact_origins: tuple[str, ...] = (), batching: Any = None,
         event_loop: str = "asyncio") -> None:
    agent = open_agent(config, concurrency=workers, feedback=True, batching=batching)
    running = AgentRun.build(agent, window_s=window,
                             outbox_path=config.cache_dir / "telemetry" / "outbox.db",
                             outbox_max_bytes=outbox_max_bytes, link=link,
                             labels=_labels(labels),
                             fleet_keys=TrustStore.from_paths(config.fleet_keys),
                             artifact_origins=artifact_origins)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        running.start(host, None if port < 0 else port, auth=authenticator, workers=workers,
                      tls=tls, limits=limits, loop=event_loop)
        where = running.http.url if running.http is not None else "no HTTP API"
        target = (f"telemetry to {link.broker.url} as {device} in fleet {fleet_name}"
                  if link is not None else "no broker: telemetry waits in the outbox")
        plain(f"agent running: {where}; {target}; {window:g} s windows")
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait(duration)
    finally:
        signal.signal(signal.SIGTERM, previous)
        running.stop()


# device_agent.cli adds this command when it is imported first; when this module is imported
# first, cli's import of it finds it half-made, so the command is added here as well
agent.add_command(run)
