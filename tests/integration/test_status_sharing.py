"""Several fleet workers share devices' ``status`` messages, not only telemetry (issue 18).

Each live status message reaches one worker of the ``$share/`` group, where before every worker
handled every birth and Last Will (three quarters of a worker's messages in a 10,000-device
reconnect storm, which made its acks late). Retained statuses are not delivered to shared
subscriptions, so a worker starting a new session sweeps them once (QoS 0, unsubscribed when
granted); a worker resuming its session does not. More retained statuses than Mosquitto's
default queue of 1,000 messages are used, so the sweep must not depend on that limit.
"""

from __future__ import annotations

import contextlib
import time

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion

from edgeserve.contract import Status, device_topic, encode
from edgeserve.fleet.connection import BrokerSettings
from edgeserve.fleet.ingest import Ingestor
from edgeserve.fleet.service import FleetService
from edgeserve.fleet.store import Store
from edgeserve.fleet.tables import devices
from edgeserve.testing import end_mqtt_sessions
from tests.support import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RETAINED = 2500
LIVE = 400


def _publish(port: int, messages: list[tuple[str, bytes]], retain: bool) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(100)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        sent = [client.publish(topic, payload, qos=1, retain=retain) for topic, payload in messages]
        for info in sent:
            info.wait_for_publish(30)
    finally:
        client.disconnect()
        client.loop_stop()


def _states(store: Store) -> dict[str, str]:
    with store.read() as conn:
        return {r.device_id: r.state for r in conn.execute(
            sa.select(devices.c.device_id, devices.c.state))}


def test_workers_split_statuses_and_a_new_session_sweeps_the_retained_ones(
        mqtt_broker: tuple[str, int], fleet_name: str, tmp_path: object,
        resources: contextlib.ExitStack) -> None:
    _host, port = mqtt_broker
    ids = [f"d{i:05d}" for i in range(RETAINED)]
    born = time.time() - 60
    _publish(port, [(device_topic(fleet_name, d, "status"),
                     encode(Status(device_id=d, state="online", ts=born))) for d in ids],
             retain=True)
    store = resources.enter_context(Store.open(f"sqlite:///{tmp_path}/fleet.db", fleet=fleet_name))
    client_ids = [f"edgeserve-fleet-{fleet_name}-{w}" for w in range(2)]
    resources.callback(end_mqtt_sessions, port, client_ids)
    workers = []
    for client_id in client_ids:
        worker = FleetService(Ingestor(store, fleet_name), BrokerSettings(port=port), client_id,
                              shared="on")
        resources.callback(worker.stop)
        worker.start()
        workers.append(worker)

    # both workers started new sessions: each swept every retained status
    wait_until(lambda: len(_states(store)) == RETAINED, 60, "the retained statuses to be learned",
               progress=lambda: len(_states(store)))
    wait_until(lambda: all(w.ingestor.stats.statuses == RETAINED for w in workers), 30,
               "both sweeps to finish", progress=lambda: [w.ingestor.stats.statuses
                                                         for w in workers])
    assert [w.sweeps for w in workers] == [1, 1]
    assert set(_states(store).values()) == {"online"}

    # live statuses: each reaches exactly one worker
    before = sum(w.ingestor.stats.statuses for w in workers)
    gone = ids[:LIVE]
    _publish(port, [(device_topic(fleet_name, d, "status"),
                     encode(Status(device_id=d, state="offline"))) for d in gone], retain=True)
    wait_until(lambda: sum(1 for s in _states(store).values() if s == "offline") == LIVE, 30,
               "the Last Wills to be applied")
    time.sleep(1.0)  # a copy to a second worker would arrive by now
    handled = [w.ingestor.stats.statuses for w in workers]
    assert sum(handled) - before == LIVE, handled
    assert all(h > RETAINED for h in handled), f"one worker took every status: {handled}"

    # a restarted worker resumes its session: subscribed all along, it does not sweep again
    workers[0].stop()
    again = FleetService(Ingestor(store, fleet_name), BrokerSettings(port=port), client_ids[0],
                         shared="on")
    resources.callback(again.stop)
    again.start()
    time.sleep(1.0)
    assert again.sweeps == 0
    assert again.ingestor.stats.statuses == 0
