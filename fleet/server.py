"""The whole fleet service in one object: what ``edgeserve fleet serve`` and the demo run.

Parts, started in order and stopped in reverse:

* the store (SQLite by default, PostgreSQL by URL; migrated on open),
* an embedded MQTT broker when no broker URL is given,
* telemetry ingestion (:class:`~.service.FleetService`),
* the artifact store and the HTTP side (artifacts with Range for devices; API, dashboard and
  Prometheus metrics for people and tools),
* the rollout controller (desired state out, reports and chunked-file requests in),
* the experiment controller (A/B splits and bandit weights into desired state, decisions,
  promotion of winners through the rollout engine).

HTTP authentication: given with ``auth``; when the HTTP side listens beyond loopback without
one, a random password for user ``admin`` is generated and shown once, so a dashboard is never
open to the network by accident.
"""

from __future__ import annotations

import logging
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeserve.auth import Authenticator, BasicAuth, is_loopback
from edgeserve.signing import TrustStore, load_private_key, write_keypair

from .artifact_tokens import ArtifactTokens
from .artifacts import ArtifactStore
from .broker import EmbeddedBroker
from .cli_options import default_artifacts_dir
from .connection import BrokerSettings
from .experiments.controller import ExperimentController, reports
from .ingest import Ingestor
from .jetstream import JetStreamSettings
from .rollouts.controller import RolloutController
from .service import FleetService, SharedMode
from .store import Store
from .web.app import create_app
from .web.origin import LOOPBACK_HOSTS
from .web.server import ServerHandle, start_server

__all__ = ["FleetConfig", "FleetServer", "default_fleet_key", "fleet_public_key_path"]

log = logging.getLogger(__name__)



def default_fleet_key(fleet: str) -> Path:
    """Where ``fleet serve`` keeps a fleet's desired-state signing key by default."""
    from platformdirs import user_data_dir

    return Path(user_data_dir("edgeserve", appauthor=False)) / "fleet" / "keys" / f"{fleet}.key"


def fleet_public_key_path(private: Path) -> Path:
    """``fleet.key`` -> ``fleet.pub.pem``: what devices pin."""
    return private.with_name(private.stem + ".pub.pem")


@dataclass
class FleetConfig:
    """Everything ``fleet serve`` needs (CLI options map one to one)."""

    fleet: str
    db: str | None = None
    broker: str | None = None
    broker_options: dict[str, Any] = field(default_factory=dict)
    embedded_host: str = "127.0.0.1"
    embedded_port: int = 1883
    http_host: str = "127.0.0.1"
    http_port: int | None = 8080
    public_url: str | None = None
    artifacts_dir: Path | None = None
    trusted_keys: list[Path] = field(default_factory=list)
    auth: Authenticator | None = None
    worker: str = "0"
    client_id: str | None = None
    shared: SharedMode = "auto"
    nats: list[str] = field(default_factory=list)
    """NATS client URLs: take telemetry and statuses from a JetStream stream that the fleet's
    workers share (a NATS cluster's MQTT listener has no ``$share/``)"""
    nats_replicas: int = 3
    desired_connections: int = 1
    """MQTT connections the rollout controller publishes desired states over (NATS: 4)"""
    connect_timeout: float = 60.0
    rollout_tick_s: float = 1.0
    experiment_tick_s: float = 1.0
    fleet_key: Path | None = None
    """the fleet's private signing key for desired state (created when missing; default: the
    user data directory's edgeserve/fleet/keys/FLEET.key)"""
    delta_fraction: float | None = None
    """serve a delta to a device holding an earlier version when it is at most this fraction
    of the file (None: ``EDGESERVE_DELTA_FRACTION``, else 0.25; 0: never)"""


class FleetServer:
    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.store: Store | None = None
        self.embedded: EmbeddedBroker | None = None
        self.service: FleetService | None = None
        self.controller: RolloutController | None = None
        self.experiments: ExperimentController | None = None
        self.http: ServerHandle | None = None
        self.artifacts: ArtifactStore | None = None
        self.broker_url: str | None = None
        self.broker_settings: BrokerSettings | None = None
        self.generated_password: str | None = None
        self.fleet_key_path: Path | None = None
        self._stop = threading.Event()

    @property
    def http_url(self) -> str | None:
        return self.http.url if self.http is not None else None

    @property
    def public_url(self) -> str:
        if self.config.public_url:
            return self.config.public_url.rstrip("/")
        if self.http is not None:
            return self.http.url
        return "http://127.0.0.1:8080"

    def start(self) -> FleetServer:
        c = self.config
        try:
            self.store = Store.open(c.db, fleet=c.fleet)
            broker = c.broker
            if broker is None:
                self.embedded = EmbeddedBroker(c.embedded_host, c.embedded_port).start()
                broker = self.embedded.url
            settings = self.broker_settings = BrokerSettings.from_url(broker,
                                                                      **c.broker_options)
            self.broker_url = settings.url  # without credentials: it is logged and printed
            self.service = FleetService(Ingestor(self.store, c.fleet), settings,
                                        c.client_id or f"edgeserve-fleet-{c.fleet}-{c.worker}",
                                        shared=c.shared, jetstream=JetStreamSettings(
                                            tuple(c.nats), replicas=c.nats_replicas,
                                            username=c.broker_options.get("username"),
                                            password=c.broker_options.get("password"))
                                        if c.nats else None)
            self.service.start(connect_timeout=c.connect_timeout)
            self.artifacts = self._artifacts()
            fleet_key = self._fleet_key()
            if c.http_port is not None:
                self._start_http(ArtifactTokens.from_key(fleet_key))
            self.controller = RolloutController(
                self.store, self.artifacts, settings, c.fleet, self.public_url, fleet_key,
                client_id=f"edgeserve-rollouts-{c.fleet}-{c.worker}", tick_s=c.rollout_tick_s,
                desired_connections=c.desired_connections)
            self.controller.start()
            self.experiments = ExperimentController(
                self.store, self.artifacts, self.public_url, c.fleet, tick_s=c.experiment_tick_s,
                publish=self.controller.publish_pending).start()
        except BaseException:
            self.stop()
            raise
        return self

    def _fleet_key(self) -> Ed25519PrivateKey:
        """The key that signs desired state; made (with its .pub.pem) on the first start."""
        path = self.config.fleet_key or default_fleet_key(self.config.fleet)
        public = fleet_public_key_path(path)
        if not path.exists():
            write_keypair(path, public)
            log.info("made the fleet's desired-state signing key %s; devices pin %s "
                     "(agent run --fleet-key)", path, public)
        self.fleet_key_path = path
        return load_private_key(path)

    def _artifacts(self) -> ArtifactStore:
        trust = TrustStore.from_paths(self.config.trusted_keys) if self.config.trusted_keys \
            else TrustStore()
        return ArtifactStore(self.config.artifacts_dir or default_artifacts_dir(), trust,
                             self.config.delta_fraction)

    def _start_http(self, tokens: ArtifactTokens) -> None:
        c = self.config
        auth = c.auth
        if auth is None and not is_loopback(c.http_host):
            self.generated_password = secrets.token_urlsafe(12)
            auth = BasicAuth({"admin": self.generated_password})
        assert self.store is not None and self.artifacts is not None and self.service is not None
        service = self.service
        store = self.store
        app = create_app(store, self.artifacts, authenticator=auth,
                         stats=service.ingestor.stats.snapshot,
                         experiments=lambda: reports(store), broker=self.broker_settings,
                         fleet=c.fleet,
                         allowed_hosts=self._allowed_hosts(),
                         # with auth on, devices fetch artifacts with the download token of
                         # their signed desired state, and nobody else without credentials
                         protect_artifacts=auth is not None, artifact_tokens=tokens)
        self.http = start_server(app, c.http_host, c.http_port or 0)

    def _allowed_hosts(self) -> set[str] | None:
        """Bound to loopback: answer only to loopback names and the public URL's host (a name
        that rebinds to 127.0.0.1 is refused); otherwise any Host."""
        if not is_loopback(self.config.http_host):
            return None
        public = urlsplit(self.config.public_url or "").hostname
        return {*LOOPBACK_HOSTS, *([public] if public else [])}

    def run(self, duration_s: float | None = None) -> None:
        """Block until :meth:`request_stop` or ``duration_s``."""
        assert self.service is not None
        self.service.run(duration_s)

    def request_stop(self) -> None:
        if self.service is not None:
            self.service.request_stop()

    def stop(self) -> None:
        for part in (self.experiments, self.controller, self.http, self.service):
            if part is not None:
                try:
                    part.stop()
                except Exception:
                    log.exception("stopping %s failed", type(part).__name__)
        if self.embedded is not None:
            self.embedded.close()
        if self.store is not None:
            self.store.close()
        self.experiments = None
        self.controller = self.http = self.service = None
        self.embedded = None
        self.store = None
