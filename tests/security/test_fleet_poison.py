"""One rogue MQTT message must not stop the fleet's ingestion (real Mosquitto, real store).

A payload of 50,000 nested ``[`` once made ``json.loads`` raise ``RecursionError`` in the ingest
thread, which died; the message was never acked, so the broker handed it over again after every
restart and ingestion stayed dead. Every per-message failure is now counted, logged and acked.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeserve.contract import TelemetryBatch, Window, device_topic, encode
from edgeserve.fleet.ingest import Ingestor
from edgeserve.fleet.service import FleetService
from edgeserve.fleet.store import Store
from edgeserve.mqtt import BrokerSettings
from tests.integration.telemetry_support import store_counts, wait_for, window_fields

pytestmark = pytest.mark.integration

POISON = [
    ("status", b"[" * 50_000),
    ("status", b'{"v":1,"x":' * 20_000 + b"1" + b"}" * 20_000),
    ("telemetry", b"[" * 50_000 + b"]" * 50_000),
    ("telemetry", b'{"v":1,"device_id":"d1","sent":1,"windows":' + b"[" * 30_000),
    ("telemetry", b"\xff\xfe" * 1000),
    ("reported", b"[" * 50_000),
]


def _good_batch(device: str, seqs: range) -> bytes:
    windows = [Window(seq=s, **window_fields(s)) for s in seqs]
    return encode(TelemetryBatch(device_id=device, sent=1.0, floor=seqs[0], windows=windows))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.open(f"sqlite:///{tmp_path / 'fleet.db'}")
    try:
        yield opened
    finally:
        opened.close()


class Publisher:
    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_poison_messages_are_counted_acked_and_ingestion_goes_on(
        mqtt_broker: tuple[str, int], fleet_name: str, store: Store) -> None:
    """Deeply nested, truncated and binary payloads are dropped and counted; good telemetry
    sent after them is stored; after a restart on the same session nothing comes back and
    ingestion still works."""
    port = mqtt_broker[1]
    client_id = f"edgeserve-fleet-{fleet_name}-0"
    service = FleetService(Ingestor(store, fleet_name), BrokerSettings(port=port), client_id)
    service.start()
    publisher = Publisher(port)
    try:
        for kind, payload in POISON:
            publisher.send(device_topic(fleet_name, "d1", kind), payload)  # type: ignore[arg-type]
        publisher.send(device_topic(fleet_name, "d1", "telemetry"), _good_batch("d1", range(1, 6)))
        wait_for(lambda: store_counts(store.url)["total"] == 5, 30, "the good windows")
        rejected = service.ingestor.stats.snapshot()["rejected"]
        assert rejected["malformed"] + rejected["schema"] >= 4, rejected
        assert service.healthy and service.worker_restarts == 0
        service.stop()
        # same client id, persistent session: nothing unacked is handed over again
        service = FleetService(Ingestor(store, fleet_name), BrokerSettings(port=port), client_id)
        service.start()
        publisher.send(device_topic(fleet_name, "d1", "telemetry"),
                       _good_batch("d1", range(6, 9)))
        wait_for(lambda: store_counts(store.url)["total"] == 8, 30, "windows after the restart")
        assert service.ingestor.stats.snapshot()["rejected_total"] == 0
    finally:
        service.stop()
        publisher.close()


def test_a_bug_on_one_message_drops_only_that_message(
        mqtt_broker: tuple[str, int], fleet_name: str, store: Store,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a message makes the ingestor raise, it is dropped as 'error' and acked, and the
    other messages of its group are stored."""
    port = mqtt_broker[1]
    ingestor = Ingestor(store, fleet_name)
    real = ingestor.parse

    def parse_with_a_bug(topic: str, payload: bytes) -> object:
        if b'"device_id":"evil"' in payload.replace(b" ", b""):
            raise IndexError("a bug that only this payload reaches")
        return real(topic, payload)

    monkeypatch.setattr(ingestor, "parse", parse_with_a_bug)
    service = FleetService(ingestor, BrokerSettings(port=port), f"fleet-{fleet_name}-bug")
    service.start()
    publisher = Publisher(port)
    try:
        publisher.send(device_topic(fleet_name, "evil", "telemetry"), _good_batch("evil", range(1, 3)))
        publisher.send(device_topic(fleet_name, "d2", "telemetry"), _good_batch("d2", range(1, 4)))
        wait_for(lambda: store_counts(store.url)["total"] == 3, 30, "d2's windows")
        assert ingestor.stats.snapshot()["rejected"]["error"] == 1
        assert service.errors == 1 and service.healthy
    finally:
        service.stop()
        publisher.close()


def test_the_broker_password_is_not_logged(tmp_path: Path, mqtt_broker: tuple[str, int],
                                           fleet_name: str) -> None:
    """fleet serve with credentials in --broker logs and prints the broker without them."""
    import subprocess
    import sys

    host, port = mqtt_broker
    result = subprocess.run(
        [str(Path(sys.executable).with_name("edgeserve")), "fleet", "serve", "--fleet",
         fleet_name, "--broker", f"mqtt://fleet-user:s3cr3t-pw@{host}:{port}", "--db",
         f"sqlite:///{tmp_path}/fleet.db", "--artifacts", str(tmp_path / "artifacts"),
         "--fleet-key", str(tmp_path / "fleet.key"), "--http-port", "-1", "--duration", "1"],
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"mqtt://{host}:{port}" in result.stderr
    assert "s3cr3t-pw" not in result.stdout + result.stderr
