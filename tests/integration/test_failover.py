"""Several broker URLs and fail-over, on a 3-node NATS JetStream cluster (its MQTT 3.1.1
listener) and on two independent Mosquittos.

NATS's MQTT refuses protocol version 5, so agent and fleet (``auto``) fall back to 3.1.1 there;
its sessions live in replicated JetStream streams, so a client that fails over to another node
resumes its session (subscriptions and queued QoS 1 messages). Two independent Mosquittos share
nothing: there the fleet subscribes again and the devices send their unacked windows again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from edgeserve.device_agent.telemetry.link import Link, LinkSettings
from edgeserve.device_agent.telemetry.outbox import Outbox
from edgeserve.errors import BrokerError
from edgeserve.fleet.ingest import Ingestor
from edgeserve.fleet.server import FleetConfig, FleetServer
from edgeserve.fleet.service import FleetService
from edgeserve.fleet.store import Store
from edgeserve.fleet.tables import devices
from edgeserve.mqtt import BrokerSettings
from tests.integration.telemetry_support import store_counts, wait_for, window_fields
from tests.natscluster import (  # noqa: F401 (fixtures)
    NatsCluster,
    nats_cluster,
    shared_nats_cluster,
)
from tests.services import MosquittoProcess, start_mosquitto

pytestmark = pytest.mark.integration



def _device_state(store: Store, device: str) -> str | None:
    with store.read() as conn:
        row = conn.execute(sa.select(devices.c.state)
                           .where(devices.c.device_id == device)).first()
    return None if row is None else str(row.state)


def _link(urls: list[str], fleet: str, outbox: Outbox, subscribe_qos: int = 1,
          **kw: Any) -> Link:
    settings = LinkSettings(BrokerSettings.from_url(",".join(urls), subscribe_qos=subscribe_qos),
                            fleet, "dev1",
                            batch_windows=20, rate_windows_per_s=kw.pop("rate", 200.0),
                            ack_timeout_s=3.0, backoff_min_s=0.2, backoff_max_s=1.0, **kw)
    return Link(settings, outbox)


def _service(store: Store, fleet: str, urls: list[str]) -> FleetService:
    service = FleetService(Ingestor(store, fleet), BrokerSettings.from_url(",".join(urls)),
                           f"edgeserve-fleet-{fleet}-0")
    service.start(timeout=20)
    return service


@pytest.mark.parametrize("qos", [1, 0])
def test_agent_and_fleet_speak_the_contract_over_a_nats_cluster(
        shared_nats_cluster: NatsCluster, tmp_path: Path, fleet_name: str,  # noqa: F811
        resources: contextlib.ExitStack, qos: int) -> None:
    """A fleet given two nodes and a link given two (others first), both ``auto``: MQTT 3.1.1
    on NATS; the birth message marks the device online, every window is stored and acked, a
    desired state the fleet writes reaches the device (retained), the Last Will says offline.
    The same with the device's subscriptions at QoS 0 (no JetStream consumer each)."""
    urls = shared_nats_cluster.urls
    server = FleetServer(FleetConfig(
        fleet=fleet_name, db=f"sqlite:///{tmp_path}/fleet.db", broker=f"{urls[0]},{urls[1]}",
        http_port=None, artifacts_dir=tmp_path / "artifacts", fleet_key=tmp_path / "fleet.key",
        rollout_tick_s=0.25, connect_timeout=10))
    resources.callback(server.stop)
    server.start()
    assert server.service is not None and server.store is not None
    assert server.controller is not None
    assert server.service.protocol == "3.1.1"  # NATS refused 5
    outbox = resources.enter_context(Outbox(tmp_path / "o.db"))
    outbox.append_many([window_fields(i) for i in range(50)])
    link = _link([urls[1], urls[2]], fleet_name, outbox, subscribe_qos=qos)
    desired: list[dict[str, Any]] = []
    link.subscribe("desired", lambda payload: desired.append(json.loads(payload)))
    resources.callback(link.stop)
    link.start()
    assert link.connected.wait(15), "the link did not connect to the NATS cluster"
    assert link.stats.protocol == "3.1.1"
    assert link.broker_url == urls[1]
    wait_for(lambda: _device_state(server.store, "dev1") == "online", 15,  # type: ignore[arg-type]
             "the fleet to register the birth message")
    wait_for(lambda: outbox.floor() == outbox.next_seq(), 20, "every window to be acked",
             progress=outbox.floor)
    counts = store_counts(server.store.url)
    assert counts["devices"]["dev1"] == (50, 1, 50) and counts["acked"]["dev1"] == 50
    server.controller.desired.set_model("dev1", "toy", None)
    wait_for(lambda: bool(desired), 15, "the desired state to reach the device")
    assert "dev1" in json.dumps(desired[-1])
    assert sorted(link.granted.values()) == [qos] * 3, link.granted
    link.kill()  # no goodbye: the broker (another node than the fleet's) sends the Last Will
    wait_for(lambda: _device_state(server.store, "dev1") == "offline", 15,  # type: ignore[arg-type]
             "the Last Will to mark the device offline")


def test_a_device_id_with_a_dot_is_explained_on_nats(
        shared_nats_cluster: NatsCluster, tmp_path: Path, fleet_name: str,  # noqa: F811
        resources: contextlib.ExitStack, caplog: pytest.LogCaptureFixture) -> None:
    """NATS 2.9 refuses '.' in topics (a valid device id character), even in the Last Will, so
    it closes every CONNECT of such a device: the link does not crash, and says why."""
    outbox = resources.enter_context(Outbox(tmp_path / "o.db"))
    settings = LinkSettings(BrokerSettings.from_url(shared_nats_cluster.urls[0]), fleet_name,
                            "cam.7", backoff_min_s=0.1, backoff_max_s=0.2)
    link = Link(settings, outbox)
    resources.callback(link.stop)
    with caplog.at_level(logging.WARNING, logger="edgeserve.device_agent.telemetry.link"):
        link.start()
        wait_for(lambda: "refuses '.' in topics" in caplog.text, 15,
                 "the link to explain the closed connection", interval=0.05)
    assert "MQTT 3.1.1: closed before CONNACK; if the broker is NATS" in caplog.text
    assert link.stats.connect_failures >= 1 and link.stats.connects == 0
    assert link._thread is not None and link._thread.is_alive()


def test_a_fleet_name_with_a_dot_is_explained_on_nats(
        shared_nats_cluster: NatsCluster, tmp_path: Path,  # noqa: F811
        resources: contextlib.ExitStack) -> None:
    """The fleet's Last Will (its fleet/status topic) holds the fleet name: a '.' in it makes
    NATS close the connection, and the fleet says why instead of only 'closed'."""
    store = resources.enter_context(Store.open(f"sqlite:///{tmp_path}/fleet.db", fleet="acme.eu"))
    service = FleetService(Ingestor(store, "acme.eu"),
                           BrokerSettings.from_url(shared_nats_cluster.urls[0]), "fleet-dot")
    with pytest.raises(BrokerError, match=r"closed before CONNACK.*refuses '\.' in topics"):
        service.start(timeout=10)


def _flush_across_a_kill(tmp_path: Path, fleet: str, resources: contextlib.ExitStack,
                         fleet_urls: list[str], agent_urls: list[str],
                         kill: Any, total: int = 600) -> dict[str, Any]:
    """A link flushing ``total`` windows and a fleet, each with its list of nodes; once a
    quarter is acked ``kill()`` kills -9 the node the link is on. Returns the timings."""
    db = f"sqlite:///{tmp_path}/fleet.db"
    store = resources.enter_context(Store.open(db, fleet=fleet))
    service = _service(store, fleet, fleet_urls)
    resources.callback(service.stop)
    outbox = resources.enter_context(Outbox(tmp_path / "o.db", synchronous="normal"))
    outbox.append_many([window_fields(i) for i in range(total)])
    link = _link(agent_urls, fleet, outbox)
    resources.callback(link.stop)
    link.start()
    assert link.connected.wait(15), "the link did not connect"
    first = link.broker_url
    assert first == agent_urls[0]
    wait_for(lambda: outbox.floor() > total // 4, 20, "a quarter of the windows to be acked",
             interval=0.02)
    killed_at = time.monotonic()
    kill(first)
    wait_for(lambda: link.stats.connects >= 2 and link.connected.is_set(), 30,
             "the link to fail over", interval=0.01)
    agent_s = time.monotonic() - killed_at
    assert link.broker_url != first and link.broker_url in agent_urls
    wait_for(lambda: service.node not in (None, first), 30, "the fleet to be on a live node",
             interval=0.01)
    fleet_s = time.monotonic() - killed_at
    assert service.node in fleet_urls
    wait_for(lambda: outbox.floor() == outbox.next_seq(), 60, "every window to be acked",
             progress=outbox.floor)
    drained_s = time.monotonic() - killed_at
    link.stop()
    service.stop()
    counts = store_counts(db)
    # exactly once: every sequence number from 1 to total, each stored once
    assert counts["devices"]["dev1"] == (total, 1, total), counts
    assert counts["total"] == total and counts["acked"]["dev1"] == total
    timings = {"agent_failover_s": round(agent_s, 2), "fleet_failover_s": round(fleet_s, 2),
               "drained_s": round(drained_s, 2),
               "windows_sent": link.stats.windows_sent, "retransmits": link.stats.retransmits,
               "fleet_resends": link.stats.fleet_resends}
    print(f"\nfail-over: {timings}")  # a measurement, shown with -s
    return timings


def test_agent_and_fleet_fail_over_when_their_nats_node_is_killed(
        nats_cluster: NatsCluster, tmp_path: Path, fleet_name: str,  # noqa: F811
        resources: contextlib.ExitStack) -> None:
    """Agent and fleet both on node 1 (each with another node second); node 1 is killed -9
    mid-stream: both fail over, resume their sessions on the nodes left, and the store ends with
    every window exactly once."""
    urls = nats_cluster.urls

    def kill(url: str) -> None:
        nats_cluster.kill(nats_cluster.nodes[urls.index(url)])

    timings = _flush_across_a_kill(tmp_path, fleet_name, resources, [urls[0], urls[1]],
                                   [urls[0], urls[2]], kill)
    assert nats_cluster.killed == ["n1"]
    # 0.3 s, or about 9 s when node 1 led the MQTT session stream: NATS refuses CONNECTs until
    # the two nodes left elect a new leader
    assert timings["agent_failover_s"] < 20


def test_agent_and_fleet_fail_over_to_a_standby_mosquitto(
        tmp_path: Path, fleet_name: str, resources: contextlib.ExitStack) -> None:
    """Two independent Mosquittos, the first killed -9 mid-stream: agent and fleet move to the
    second, where no session of theirs exists; the fleet subscribes again, announces itself,
    the device sends its unacked windows again, and the store has every window exactly once."""
    brokers: list[MosquittoProcess] = []
    for _ in range(2):
        proc = start_mosquitto()
        resources.callback(proc.stop, kill=True)
        brokers.append(proc)
    urls = [f"mqtt://127.0.0.1:{b.port}" for b in brokers]

    def kill(url: str) -> None:
        brokers[urls.index(url)].stop(kill=True)

    timings = _flush_across_a_kill(tmp_path, fleet_name, resources, urls, urls, kill)
    assert timings["agent_failover_s"] < 10


def test_a_missing_nats_server_fails_in_ci_and_skips_elsewhere(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """CI must never pass by skipping the cluster tests (tests.services.need)."""
    import tests.natscluster
    import tests.services

    monkeypatch.setattr(tests.natscluster, "nats_server", lambda: None)
    monkeypatch.setattr(tests.services, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="nats-server is not installed"):
        tests.natscluster.start_nats_cluster()
    monkeypatch.setattr(tests.services, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="nats-server is not installed"):
        tests.natscluster.start_nats_cluster()


def test_a_port_taken_between_picking_and_binding_is_retried(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A node that could not bind its port (another process took it after it was picked) makes
    the cluster start again with new ports, twice at most; other failures are not retried."""
    import tests.natscluster

    calls: list[int] = []
    failures = ["nats-server n2 exited: … [FTL] Error listening on router port: 54437 - listen "
                "tcp 127.0.0.1:54437: bind: address already in use"]

    def start(*_args: object) -> str:
        calls.append(1)
        if failures:
            raise RuntimeError(failures.pop())
        return "cluster"

    monkeypatch.setattr(tests.natscluster, "_start_nats_cluster", start)
    assert tests.natscluster.start_nats_cluster() == "cluster"  # type: ignore[comparison-overlap]
    assert len(calls) == 2
    failures[:] = ["the NATS cluster was not ready within 30 s"]
    with pytest.raises(RuntimeError, match="not ready"):
        tests.natscluster.start_nats_cluster()
    assert len(calls) == 3
    failures[:] = ["bind: address already in use"] * 3
    with pytest.raises(RuntimeError, match="address already in use"):
        tests.natscluster.start_nats_cluster()
    assert len(calls) == 6
