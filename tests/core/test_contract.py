"""MQTT contract v1: topics, payload round trips and precise rejection of bad payloads."""

from __future__ import annotations

import json

import pytest

from edgeserve.contract import (
    Ack,
    Desired,
    FileChunk,
    Reported,
    Status,
    TelemetryBatch,
    Window,
    decode,
    device_topic,
    encode,
    fleet_filter,
    parse_topic,
    shared_filter,
    topic_matches,
)
from edgeserve.errors import ContractError
from edgeserve.telemetry import LatencyHistogram

SHA = "0" * 64


def test_topic_round_trip() -> None:
    """Built topics parse back into their parts."""
    topic = device_topic("factory-1", "cam-07", "telemetry")
    assert topic == "edgeserve/v1/factory-1/devices/cam-07/telemetry"
    parsed = parse_topic(topic)
    assert (parsed.fleet, parsed.device_id, parsed.kind) == ("factory-1", "cam-07", "telemetry")
    assert str(parsed) == topic


@pytest.mark.parametrize("bad", ["a/b", "+", "#", "", "dev ice", "x" * 200])
def test_bad_ids_refused(bad: str) -> None:
    """Ids that would break topic structure are refused when building."""
    with pytest.raises(ContractError, match="not valid"):
        device_topic("f", bad, "status")


@pytest.mark.parametrize("topic", ["edgeserve/v2/f/devices/d/status", "edgeserve/v1/f/devices/d",
                                   "edgeserve/v1/f/devices/d/bogus", "other/v1/f/devices/d/ack",
                                   "edgeserve/v1/f/devices/d/status/extra"])
def test_bad_topics_refused(topic: str) -> None:
    """Topics outside the v1 device tree are refused with a contract error."""
    with pytest.raises(ContractError):
        parse_topic(topic)


def test_filters_match() -> None:
    """Fleet filters (plain and shared) match device topics as MQTT would."""
    flt = fleet_filter("f", "telemetry")
    assert topic_matches(flt, device_topic("f", "d1", "telemetry"))
    assert not topic_matches(flt, device_topic("f", "d1", "status"))
    assert topic_matches(shared_filter(flt), device_topic("f", "d9", "telemetry"))
    assert topic_matches(fleet_filter("f", "files"), device_topic("f", "d", "files", "data"))


def _window(seq: int) -> Window:
    hist = LatencyHistogram()
    for v in (1.0, 2.0, 3.0):
        hist.add(v)
    return Window(seq=seq, start=1.0, end=61.0, model="m", version="1.0.0", requests=3,
                  errors=0, latency=hist.to_data())


def test_payload_round_trips() -> None:
    """Every message kind survives encode → decode unchanged."""
    messages = [
        Status(device_id="d1", state="online", profile="pixel-8", models={"m": "1.0.0"}),
        Desired(revision=3, models={"m": {"active": "1.0.0", "versions": {"1.0.0": {
            "release": 1, "url": "http://h/p/", "manifest_sha256": SHA}}}}),
        Reported(device_id="d1", revision=3, models={"m": {"active": "1.0.0"}}),
        TelemetryBatch(device_id="d1", windows=[_window(1), _window(2)]),
        Ack(seq=2),
        FileChunk.of("t1", "artifacts/a.onnx", 0, 3, b"abc"),
    ]
    for message in messages:
        assert decode(type(message), encode(message)) == message


def test_file_chunk_checks_hash() -> None:
    """A chunk whose data does not match its sha256 is refused."""
    chunk = FileChunk.of("t1", "f", 0, 3, b"abc")
    bad = chunk.model_copy(update={"data": "eHl6"})
    with pytest.raises(ContractError, match="sha256"):
        bad.payload()
    assert chunk.payload() == b"abc"


@pytest.mark.parametrize(("payload", "match"), [
    (b"not json", "expected a JSON object"),
    (b"{", "not valid JSON"),
    (b'{"v": 2, "seq": 1}', "v"),
    (b'{"seq": 1}', "missing schema version"),
    (b'{"v": 1, "seq": -1}', "seq"),
    (b'{"v": 1, "seq": "x"}', "seq"),
    (b"\xff\xfe", "expected a JSON object"),
])
def test_bad_ack_payloads(payload: bytes, match: str) -> None:
    """Malformed ack payloads give contract errors that say what was wrong."""
    with pytest.raises(ContractError, match=match):
        decode(Ack, payload, "ack")


def test_oversize_payload() -> None:
    """Payloads over the size limit are refused before parsing."""
    with pytest.raises(ContractError, match="larger than the limit"):
        decode(Ack, b"{" + b" " * 2000 + b"}", "ack", max_bytes=1000)


def test_window_sanity() -> None:
    """A window with more errors than requests is refused."""
    data = json.loads(encode(TelemetryBatch(device_id="d", windows=[_window(1)])))
    data["windows"][0]["errors"] = 10
    with pytest.raises(ContractError, match="errors cannot exceed requests"):
        decode(TelemetryBatch, json.dumps(data).encode())


def test_desired_versions_must_be_declared() -> None:
    """Traffic or shadow versions need a download reference."""
    payload = {"v": 1, "revision": 1, "models": {"m": {
        "active": "1.0.0", "traffic": {"2.0.0": 1},
        "versions": {"1.0.0": {"release": 1, "url": "http://h/", "manifest_sha256": SHA}}}}}
    with pytest.raises(ContractError, match="no entry in 'versions'"):
        decode(Desired, json.dumps(payload).encode())
