"""Ingestion validates every message: bad ones are counted and dropped, good ones still land."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeserve.contract import MAX_PAYLOAD_BYTES, Status, TelemetryBatch, Window, encode
from edgeserve.fleet.ingest import Ingestor
from edgeserve.fleet.registry import get_device
from edgeserve.fleet.store import Store

FLEET = "acme"


@pytest.fixture
def ingestor(tmp_path: Path) -> Iterator[Ingestor]:
    with Store.open(f"sqlite:///{tmp_path}/fleet.db", fleet=FLEET) as store:
        yield Ingestor(store, FLEET)


def good(device: str = "d1", seq: int = 1) -> bytes:
    return encode(TelemetryBatch(device_id=device, windows=[
        Window(seq=seq, start=1.0, end=2.0, model="m", version="1", requests=1)]))


T = f"edgeserve/v1/{FLEET}/devices/d1/telemetry"


@pytest.mark.parametrize(("topic", "payload", "reason"), [
    (T, b"\x00\x01not json", "malformed"),
    (T, b'{"v": 1, "device_id": "d1", "windows": [{"seq": 1', "malformed"),
    (T, b"[1, 2, 3]", "malformed"),
    (T, b"{" + b" " * MAX_PAYLOAD_BYTES + b"}", "oversize"),
    (T, b'{"v": 1, "device_id": "d1", "windows": []}', "schema"),
    (T, b'{"v": 2, "device_id": "d1", "windows": [{"seq": 1, "start": 1, "end": 2}]}', "schema"),
    (T, json.dumps({"v": 1, "device_id": "d1", "windows": [
        {"seq": 1, "start": 5, "end": 2}]}).encode(), "schema"),
    (T, json.dumps({"v": 1, "device_id": "d1", "windows": [
        {"seq": 1, "start": 1, "end": 2, "requests": 1, "errors": 2}]}).encode(), "schema"),
    (T, encode(Status(device_id="d1", state="online")), "schema"),
    (T, good("d2"), "device-mismatch"),
    (f"edgeserve/v1/{FLEET}/devices/d1/ack", good(), "topic"),
    ("edgeserve/v1/other/devices/d1/telemetry", good(), "topic"),
    ("edgeserve/v1/acme/devices/bad+id/telemetry", good(), "topic"),
    ("something/else", good(), "topic"),
])
def test_bad_payloads_are_counted_by_reason(ingestor: Ingestor, topic: str, payload: bytes,
                                            reason: str) -> None:
    """Each kind of bad message is dropped under its own reason, without raising."""
    assert ingestor.parse(topic, payload) is None
    stats = ingestor.stats.snapshot()
    assert stats["rejected"][reason] == 1
    assert stats["rejected_total"] == 1


def test_ingestion_continues_around_bad_messages(ingestor: Ingestor) -> None:
    """A group mixing garbage with good batches and a status stores the good ones."""
    messages = [(T, b"garbage"), (T, good(seq=1)), (T, b"{}"), (T, good(seq=2)),
                (f"edgeserve/v1/{FLEET}/devices/d1/status",
                 encode(Status(device_id="d1", state="online", profile="rpi5"))),
                (T, good("zz", 3))]
    parsed = [p for p in (ingestor.parse(t, m) for t, m in messages) if p is not None]
    assert ingestor.commit(parsed) == {"d1": 2}
    stats = ingestor.stats.snapshot()
    assert (stats["windows_stored"], stats["statuses"], stats["rejected_total"]) == (2, 1, 3)
    device = get_device(ingestor.store, "d1")
    assert device is not None and (device.state, device.profile) == ("online", "rpi5")


def test_an_empty_retained_status_is_not_an_error(ingestor: Ingestor) -> None:
    """Clearing a retained status (empty payload) is ignored without counting a rejection."""
    assert ingestor.parse(f"edgeserve/v1/{FLEET}/devices/d1/status", b"") is None
    assert ingestor.stats.snapshot()["rejected_total"] == 0


def _batch(device: str, seqs: list[int], floor: int | None = None) -> bytes:
    return encode(TelemetryBatch(device_id=device, floor=floor, windows=[
        Window(seq=s, start=1.0, end=2.0, model="m", version="1", requests=1) for s in seqs]))


def _commit(ingestor: Ingestor, payload: bytes, device: str = "d1") -> dict[str, int]:
    parsed = ingestor.parse(f"edgeserve/v1/{FLEET}/devices/{device}/telemetry", payload)
    assert parsed is not None
    return ingestor.commit([parsed])


def test_a_sequence_number_no_device_could_produce_is_refused_not_acked(
        ingestor: Ingestor) -> None:
    """A batch at seq = floor = 2^53 for a device acked at 3 is neither stored nor acked, so the
    device's own next windows still land; a brand-new id cannot be claimed at 2^53 either."""
    assert _commit(ingestor, _batch("d1", [1, 2, 3])) == {"d1": 3}
    assert _commit(ingestor, _batch("d1", [2**53], floor=2**53)) == {}
    assert _commit(ingestor, _batch("d1", [4])) == {"d1": 4}
    assert _commit(ingestor, _batch("d9", [2**53], floor=2**53), device="d9") == {}
    stats = ingestor.stats.snapshot()
    assert stats["rejected"]["seq-jump"] == 2 and stats["windows_stored"] == 4


def test_a_device_away_for_long_may_come_back_far_ahead(tmp_path: Path) -> None:
    """A year offline with a full outbox dropping its oldest windows moves a device's floor by
    millions: that is allowed, in proportion to the time it was away."""
    clock = [1_800_000_000.0]
    with Store.open(f"sqlite:///{tmp_path}/fleet.db", fleet=FLEET) as store:
        ingestor = Ingestor(store, FLEET, clock=lambda: clock[0])
        assert _commit(ingestor, _batch("d1", [1])) == {"d1": 1}
        clock[0] += 365 * 86400
        far = 5_000_001
        assert _commit(ingestor, _batch("d1", [far], floor=far)) == {"d1": far}
