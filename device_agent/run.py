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
import queue
import re
import signal
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from edgeserve.console import console
from edgeserve.contract import Desired, FileChunk, Reported, decode, encode
from edgeserve.errors import ConfigError, ContractError
from edgeserve.mqtt import BrokerSettings

from .agent import Agent
from .cli import agent_options
from .config import load_config, open_agent
from .telemetry.link import Link, LinkSettings
from .telemetry.monitor import Monitor
from .telemetry.outbox import DEFAULT_MAX_BYTES, Outbox
from .updates.fetch import MqttTransport
from .updates.updater import Updater

__all__ = ["AgentRun", "default_device_id", "run"]

log = logging.getLogger(__name__)


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

    @classmethod
    def build(cls, agent: Agent, *, window_s: float = 60.0, outbox_path: Path | None = None,
              outbox_max_bytes: int = DEFAULT_MAX_BYTES, link: LinkSettings | None = None,
              labels: dict[str, str] | None = None) -> AgentRun:
        """Attach monitoring (and the link) to ``agent``; nothing runs until :meth:`start`."""
        cache = agent.cache.root
        outbox = Outbox(outbox_path or cache / "telemetry" / "outbox.db", outbox_max_bytes)
        monitor = Monitor(outbox, window_s=window_s, references=agent.reference_stats,
                          health_path=cache)
        # shadow comparisons and feedback sums ride in the same windows
        monitor.add_source("shadow", agent.shadows.drain)
        if agent.feedback_log is not None:
            monitor.add_source("feedback", agent.feedback_log.drain)
        run = cls(agent, outbox, monitor, labels=dict(labels or {}))
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
                          self._report, mqtt=transport)
        self._wire(link, updater)
        return updater

    def _report(self, reported: Reported) -> None:
        if self.link is not None:
            self.link.publish("reported", encode(reported), retain=True)
            self.link.refresh_status()

    def _wire(self, link: Link, updater: Updater) -> None:
        def on_desired(payload: bytes) -> None:
            if not payload:  # a cleared retained message
                return
            try:
                updater.submit(decode(Desired, payload, "desired"))
            except ContractError as exc:
                log.warning("ignored a bad desired-state message: %s", exc)

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


def _labels(values: tuple[str, ...]) -> dict[str, str]:
    labels = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"label {item!r} is not KEY=VALUE")
        labels[key] = value
    return labels


@click.command("run")
@click.option("--host", default="127.0.0.1", show_default=True, help="Local HTTP API address.")
@click.option("--port", default=8000, show_default=True, type=int,
              help="Local HTTP API port (0: any free port; -1: no HTTP API).")
@click.option("--broker", envvar="EDGESERVE_BROKER", default=None, metavar="URL",
              help="mqtt[s]://[USER[:PASS]@]HOST[:PORT] of the fleet's broker. Without it the "
                   "telemetry waits in the outbox.")
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
@click.option("--username", envvar="EDGESERVE_MQTT_USERNAME", default=None)
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
              show_default=True)
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 256),
              help="Inference worker threads of the HTTP API.")
@click.option("--auth", default=None, envvar="EDGESERVE_AUTH",
              help="HTTP API auth, as for 'agent serve'.")
@click.option("--duration", type=float, default=None,
              help="Stop after SECONDS [default: until Ctrl+C or SIGTERM].")
@agent_options
def run(host: str, port: int, broker: str | None, device_id: str | None, fleet_name: str,
        window: float, labels: tuple[str, ...], outbox_max_bytes: int, username: str | None,
        password: str | None, ca_file: Path | None, cert_file: Path | None,
        key_file: Path | None, tls_insecure: bool, mqtt_version: str, workers: int,
        auth: str | None, duration: float | None, cache_dir: Path | None, profile: str | None,
        trusted_keys: tuple[Path, ...]) -> None:
    """Serve installed models and send their telemetry (windows, drift, health) to the fleet."""
    from .server import parse_auth_option

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    link = None
    device = device_id or default_device_id()
    if broker is not None:
        settings = BrokerSettings.from_url(
            broker, username=username, password=password, ca_file=ca_file,
            cert_file=cert_file, key_file=key_file, tls_insecure=tls_insecure or None,
            protocol=mqtt_version)
        link = LinkSettings(settings, fleet_name, device)
    authenticator = parse_auth_option(auth)
    config = load_config(cache_dir, profile, trusted_keys)
    agent = open_agent(config, concurrency=workers, feedback=True)
    running = AgentRun.build(agent, window_s=window,
                             outbox_path=config.cache_dir / "telemetry" / "outbox.db",
                             outbox_max_bytes=outbox_max_bytes, link=link,
                             labels=_labels(labels))
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        running.start(host, None if port < 0 else port, auth=authenticator, workers=workers)
        where = running.http.url if running.http is not None else "no HTTP API"
        target = (f"telemetry to {link.broker.url} as {device} in fleet {fleet_name}"
                  if link is not None else "no broker: telemetry waits in the outbox")
        console.print(f"agent running: {where}; {target}; {window:g} s windows")
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait(duration)
    finally:
        signal.signal(signal.SIGTERM, previous)
        running.stop()
