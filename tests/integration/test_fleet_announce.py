"""The fleet's announcement and MQTT client ids, against the real Mosquitto.

A brand-new fleet is the common case where devices are up first: what they sent before the fleet
subscribed was dropped by the broker, and once sent they waited the whole ack timeout (30 s by
default) to send it again. The fleet's retained online announcement now makes them resend at
once. Client ids are namespaced by fleet, so two fleets with the same device ids on one broker
leave each other alone, and a real session takeover is logged as one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeserve.device_agent.telemetry.link import Link, LinkSettings
from edgeserve.device_agent.telemetry.outbox import Outbox
from edgeserve.fleet.ingest import Ingestor
from edgeserve.fleet.service import FleetService
from edgeserve.fleet.store import Store
from edgeserve.mqtt import BrokerSettings
from tests.integration.telemetry_support import store_counts, wait_for, window_fields
from tests.services import clear_retained

pytestmark = pytest.mark.integration

ACK_TIMEOUT_S = 600.0
"""Far longer than any wait here: only the announcement can explain a resend."""


def _link(port: int, fleet: str, device: str, outbox: Outbox, **kw: object) -> Link:
    settings = LinkSettings(BrokerSettings(port=port), fleet, device, backoff_min_s=0.2,
                            backoff_max_s=1.0, ack_timeout_s=ACK_TIMEOUT_S, **kw)  # type: ignore[arg-type]
    return Link(settings, outbox)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.open(f"sqlite:///{tmp_path / 'fleet.db'}")
    try:
        yield opened
    finally:
        opened.close()


def stored(store: Store, device: str) -> int:
    return int(store_counts(store.url)["devices"].get(device, (0, 0, 0))[0])


def test_a_new_fleet_gets_what_devices_sent_before_it_subscribed(
        mqtt_broker: tuple[str, int], fleet_name: str, tmp_path: Path, store: Store) -> None:
    """Windows published while no fleet listened arrive as soon as the fleet announces itself
    (not after the ack timeout), each stored once; a device that connects later, which gets the
    retained announcement with its subscription, does not resend."""
    port = mqtt_broker[1]
    with Outbox(tmp_path / "early.db") as early_box, Outbox(tmp_path / "late.db") as late_box:
        early_box.append_many([window_fields(i) for i in range(20)])
        early = _link(port, fleet_name, "early", early_box).start()
        late: Link | None = None
        service = FleetService(Ingestor(store, fleet_name), BrokerSettings(port=port),
                               f"test-fleet-{fleet_name}")
        try:
            wait_for(lambda: early.stats.windows_sent >= 20, 30, "windows sent into the void")
            service.start()
            wait_for(lambda: stored(store, "early") == 20, 60,
                     "the early device's windows in the store")
            assert early.stats.fleet_resends == 1 and early.stats.retransmits == 0
            wait_for(lambda: early_box.stats().windows == 0, 30, "the acks")

            late_box.append_many([window_fields(i) for i in range(5)])
            late = _link(port, fleet_name, "late", late_box).start()
            wait_for(lambda: stored(store, "late") == 5 and
                     late_box.stats().windows == 0, 60, "the late device's windows, acked")
            assert late.stats.fleet_resends == 0 and late.stats.windows_sent == 5
            assert service.ingestor.stats.duplicates <= 20
        finally:
            service.stop()
            early.stop()
            if late is not None:
                late.stop()


def test_same_device_ids_in_two_fleets_do_not_take_over_each_other(
        mqtt_broker: tuple[str, int], fleet_name: str, tmp_path: Path) -> None:
    """Default client ids are per fleet: 'cam-1' of two fleets both connect and stay connected
    while each sends telemetry through the broker."""
    port = mqtt_broker[1]
    other_fleet = f"{fleet_name}-b"
    with Outbox(tmp_path / "a.db") as a_box, Outbox(tmp_path / "b.db") as b_box:
        a = _link(port, fleet_name, "cam-1", a_box).start()
        b = _link(port, other_fleet, "cam-1", b_box).start()
        try:
            assert a.connected.wait(10) and b.connected.wait(10)
            for box, link in ((a_box, a), (b_box, b), (a_box, a), (b_box, b)):
                box.append(window_fields(0))
                sent = link.stats.windows_sent
                wait_for(lambda link=link, sent=sent: link.stats.windows_sent > sent, 10,
                         "a window to go out")
            assert (a.stats.connects, b.stats.connects) == (1, 1)
            assert (a.stats.takeovers, b.stats.takeovers) == (0, 0)
        finally:
            a.stop()
            b.stop()
            clear_retained("127.0.0.1", port, f"edgeserve/v1/{other_fleet}/#")


def test_a_session_takeover_is_logged_as_one(mqtt_broker: tuple[str, int], fleet_name: str,
                                             tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """Two agents forced onto one client id kick each other off; the log says so by name.

    Mosquitto 2.0 closes the older connection without a DISCONNECT reason (MQTT 5 brokers such
    as EMQX send 0x8E, which the link reports directly), so here the link recognises the
    pattern: connections closed within seconds of connecting, again and again."""
    port = mqtt_broker[1]
    with caplog.at_level(logging.ERROR, logger="edgeserve.device_agent.telemetry.link"), \
            Outbox(tmp_path / "a.db") as a_box, Outbox(tmp_path / "b.db") as b_box:
        shared = f"{fleet_name}-shared-id"
        a = _link(port, fleet_name, "cam-1", a_box, client_id=shared).start()
        assert a.connected.wait(10)
        b = _link(port, fleet_name, "cam-2", b_box, client_id=shared).start()
        try:
            wait_for(lambda: "takes the session over" in caplog.text, 60,
                     "the takeover in the log")
        finally:
            a.stop()
            b.stop()
    assert f"client id {shared!r}" in caplog.text
