"""The same offline-queue and reconnect tests, on Mosquitto and on the embedded broker
(rumqttd via iotcore) that ``edgeserve fleet serve`` starts when no broker is configured."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgeserve.device_agent.telemetry.link import Link, LinkSettings
from edgeserve.device_agent.telemetry.outbox import Outbox
from edgeserve.fleet.broker import EmbeddedBroker
from edgeserve.fleet.connection import BrokerSettings as FleetBroker
from edgeserve.fleet.ingest import Ingestor
from edgeserve.fleet.service import FleetService
from edgeserve.fleet.store import Store
from edgeserve.mqtt import BrokerSettings as AgentBroker
from tests.integration.telemetry_support import store_counts, wait_for, window_fields
from tests.services import free_port, start_mosquitto


def two_ports() -> dict[str, int]:
    """Two distinct free ports for the embedded broker's MQTT 5 and 3.1.1 listeners."""
    first = free_port()
    second = free_port()
    while second == first:
        second = free_port()
    return {"port": first, "port_v311": second}


pytestmark = pytest.mark.integration


@dataclass
class Broker:
    """A broker a test may restart: a private Mosquitto or the embedded one."""

    kind: str
    port: int
    mosquitto: object | None = None
    embedded: EmbeddedBroker | None = None

    def restart(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded.start()
        else:
            self.mosquitto.restart()  # type: ignore[attr-defined]


@pytest.fixture(params=["mosquitto", "embedded"])
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    if request.param == "mosquitto":
        proc = start_mosquitto()
        try:
            yield Broker("mosquitto", proc.port, mosquitto=proc)
        finally:
            proc.stop(kill=True)
            shutil.rmtree(proc.workdir, ignore_errors=True)
    else:
        embedded = EmbeddedBroker(**two_ports()).start()
        try:
            yield Broker("embedded", embedded.port, embedded=embedded)
        finally:
            embedded.close()


def _service(store: Store, fleet: str, port: int) -> FleetService:
    service = FleetService(Ingestor(store, fleet), FleetBroker(port=port),
                           f"edgeserve-fleet-{fleet}-0")
    service.start()
    return service


def _link(outbox: Outbox, fleet: str, device: str, port: int) -> Link:
    settings = LinkSettings(AgentBroker(port=port), fleet, device, batch_windows=25,
                            ack_timeout_s=3.0, backoff_min_s=0.2, backoff_max_s=1.5)
    return Link(settings, outbox)


def test_windows_published_while_the_fleet_is_away_are_queued_for_it(
        broker: Broker, tmp_path: Path, fleet_name: str) -> None:
    """The fleet's persistent session collects telemetry while it is stopped; on its return
    everything is stored and acked, and the device's outbox empties."""
    db = f"sqlite:///{tmp_path}/fleet.db"
    store = Store.open(db, fleet=fleet_name)
    service = _service(store, fleet_name, broker.port)
    service.stop()
    outbox = Outbox(tmp_path / "o.db")
    outbox.append_many([window_fields(i) for i in range(300)])
    # the device must not see acks yet: give it a long ack timeout so it sends each window once
    link = Link(LinkSettings(AgentBroker(port=broker.port), fleet_name, "dev1",
                             batch_windows=50, max_unacked_windows=300, ack_timeout_s=600),
                outbox).start()
    wait_for(lambda: link.stats.windows_sent >= 300, 30, "all windows sent")
    time.sleep(0.5)  # let the broker take the last PUBACKs
    assert store_counts(db)["total"] == 0
    service = _service(store, fleet_name, broker.port)
    try:
        wait_for(lambda: outbox.floor() == outbox.next_seq(), 60, "the outbox to empty")
        assert link.stats.windows_sent == 300  # nothing was sent twice: the queue delivered
        assert link.stats.retransmits == 0
    finally:
        link.stop()
        service.stop()
    counts = store_counts(db)
    assert counts["total"] == 300 and counts["acked"]["dev1"] == 300
    store.close()


def test_everything_arrives_exactly_once_across_a_broker_restart(
        broker: Broker, tmp_path: Path, fleet_name: str) -> None:
    """A broker restart in the middle of a flush: device and fleet reconnect by themselves and
    the store ends with every window exactly once."""
    db = f"sqlite:///{tmp_path}/fleet.db"
    store = Store.open(db, fleet=fleet_name)
    service = _service(store, fleet_name, broker.port)
    links = []
    for d in range(5):
        outbox = Outbox(tmp_path / f"o{d}.db", synchronous="normal")
        outbox.append_many([window_fields(i) for i in range(400)])
        settings = LinkSettings(AgentBroker(port=broker.port), fleet_name, f"dev{d}",
                                batch_windows=20, rate_windows_per_s=300, ack_timeout_s=3.0,
                                backoff_min_s=0.2, backoff_max_s=1.5)
        links.append(Link(settings, outbox).start())
    try:
        wait_for(lambda: store_counts(db)["total"] >= 300, 60, "the flush to be under way")
        broker.restart()
        wait_for(lambda: all(lk.outbox.floor() == lk.outbox.next_seq() for lk in links), 120,
                 "every outbox to empty")
    finally:
        for lk in links:
            lk.stop()
        service.stop()
    counts = store_counts(db)
    assert counts["total"] == 2000
    assert set(counts["devices"].values()) == {(400, 1, 400)}
    assert all(lk.stats.connects >= 2 for lk in links)
    store.close()


def test_the_fleet_may_start_before_its_broker(tmp_path: Path, fleet_name: str) -> None:
    """An unreachable broker is retried within connect_timeout; the fleet then subscribes."""
    proc = start_mosquitto()
    proc.stop()
    store = Store.open(f"sqlite:///{tmp_path}/fleet.db", fleet=fleet_name)
    service = FleetService(Ingestor(store, fleet_name), FleetBroker(port=proc.port),
                           f"edgeserve-fleet-{fleet_name}-0")
    errors: list[BaseException] = []

    def start() -> None:
        try:
            service.start(connect_timeout=30)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=start)
    thread.start()
    try:
        time.sleep(1.5)
        proc.start()
        thread.join(40)
        assert not errors and service.ready.is_set()
    finally:
        service.stop()
        proc.stop(kill=True)
        shutil.rmtree(proc.workdir, ignore_errors=True)
        store.close()
