"""The same offline-queue and reconnect tests, on Mosquitto and on the embedded broker
(rumqttd via iotcore) that ``edgeserve fleet serve`` starts when no broker is configured."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgeserve.contract import device_topic
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
from tests.support import wait_until


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


def test_windows_published_while_the_fleet_is_away_are_queued_for_it(
        broker: Broker, tmp_path: Path, fleet_name: str, watcher_factory: Any,
        resources: contextlib.ExitStack) -> None:
    """The fleet's persistent session collects telemetry while it is stopped; on its return
    everything is stored and acked, and the device's outbox empties."""
    db = f"sqlite:///{tmp_path}/fleet.db"
    store = resources.enter_context(Store.open(db, fleet=fleet_name))
    _service(store, fleet_name, broker.port).stop()
    watcher = watcher_factory(broker.port, device_topic(fleet_name, "dev1", "telemetry"))

    def seen() -> int:
        return len({w["seq"] for _t, p, _r in watcher.messages for w in json.loads(p)["windows"]})

    outbox = resources.enter_context(Outbox(tmp_path / "o.db"))
    outbox.append_many([window_fields(i) for i in range(300)])
    # the device must not see acks yet: an ack timeout far beyond this test, so that it sends
    # each window once
    link = Link(LinkSettings(AgentBroker(port=broker.port), fleet_name, "dev1",
                             batch_windows=50, max_unacked_windows=300, ack_timeout_s=600),
                outbox)
    resources.callback(link.stop)
    link.start()
    # another subscriber got every window: the broker has taken them all, and so queued them
    # for the fleet's session too
    wait_until(lambda: seen() == 300, 20, "the broker to take all 300 windows", progress=seen)
    assert store_counts(db)["total"] == 0
    service = _service(store, fleet_name, broker.port)
    resources.callback(service.stop)
    wait_for(lambda: outbox.floor() == outbox.next_seq(), 20, "the outbox to empty",
             progress=outbox.floor)
    assert link.stats.windows_sent == 300  # nothing was sent twice: the queue delivered
    assert link.stats.retransmits == 0
    link.stop()
    service.stop()
    counts = store_counts(db)
    assert counts["total"] == 300 and counts["acked"]["dev1"] == 300


def test_everything_arrives_exactly_once_across_a_broker_restart(
        broker: Broker, tmp_path: Path, fleet_name: str,
        resources: contextlib.ExitStack) -> None:
    """A broker restart in the middle of a flush: device and fleet reconnect by themselves and
    the store ends with every window exactly once."""
    db = f"sqlite:///{tmp_path}/fleet.db"
    store = resources.enter_context(Store.open(db, fleet=fleet_name))
    service = _service(store, fleet_name, broker.port)
    resources.callback(service.stop)
    links = []
    for d in range(5):
        outbox = resources.enter_context(Outbox(tmp_path / f"o{d}.db", synchronous="normal"))
        outbox.append_many([window_fields(i) for i in range(400)])
        settings = LinkSettings(AgentBroker(port=broker.port), fleet_name, f"dev{d}",
                                batch_windows=20, rate_windows_per_s=300, ack_timeout_s=3.0,
                                backoff_min_s=0.2, backoff_max_s=1.5)
        link = Link(settings, outbox)
        resources.callback(link.stop)
        links.append(link.start())

    def left() -> int:
        return sum(lk.outbox.next_seq() - lk.outbox.floor() for lk in links)

    wait_for(lambda: store_counts(db)["total"] >= 300, 20, "the flush to be under way",
             progress=left)
    broker.restart()
    wait_for(lambda: left() == 0, 30, "every outbox to empty", progress=left)
    for lk in links:
        lk.stop()
    service.stop()
    counts = store_counts(db)
    assert counts["total"] == 2000
    assert set(counts["devices"].values()) == {(400, 1, 400)}
    assert all(lk.stats.connects >= 2 for lk in links)


def test_the_fleet_may_start_before_its_broker(tmp_path: Path, fleet_name: str,
                                               caplog: pytest.LogCaptureFixture,
                                               resources: contextlib.ExitStack) -> None:
    """An unreachable broker is retried within connect_timeout; the fleet then subscribes."""
    proc = start_mosquitto()
    resources.callback(shutil.rmtree, proc.workdir, ignore_errors=True)
    resources.callback(proc.stop, kill=True)
    proc.stop()
    store = resources.enter_context(
        Store.open(f"sqlite:///{tmp_path}/fleet.db", fleet=fleet_name))
    service = FleetService(Ingestor(store, fleet_name), FleetBroker(port=proc.port),
                           f"edgeserve-fleet-{fleet_name}-0")
    resources.callback(service.stop)
    errors: list[BaseException] = []

    def start() -> None:
        try:
            service.start(connect_timeout=30)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    caplog.set_level(logging.WARNING, logger="edgeserve.fleet")
    thread = threading.Thread(target=start)
    thread.start()
    resources.callback(thread.join, 40)
    # the broker comes up only once the fleet has found it missing and is retrying
    wait_until(lambda: any("retrying" in r.getMessage() for r in caplog.records) or errors, 20,
               "the fleet to retry the unreachable broker")
    assert not errors, errors
    proc.start()
    wait_until(lambda: not thread.is_alive(), 40, "the fleet to connect and subscribe")
    assert not errors and service.ready.is_set()
