"""The simulator's MQTT 3.1.1 client (``edgeserve.fleet.sim_mqtt``) against the real Mosquitto:
packet encoding, QoS 1 both ways, retained messages, the Last Will on a cut (not on DISCONNECT),
a resumed session with queued messages and DUP retransmission, keep-alive, refused CONNECTs."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from edgeserve.fleet.sim_mqtt import (
    ConnectRefused,
    MqttClient,
    MqttError,
    Will,
    decode_packets,
    encode_connect,
    encode_publish,
)

pytestmark = pytest.mark.integration


def test_packets_round_trip_at_every_length_boundary() -> None:
    """Remaining lengths of 1-4 bytes (127/128, 16383/16384, 2097151/2097152) decode back,
    also when they arrive split at any byte; a 5-byte length is refused."""
    for size in (0, 127 - 9, 128, 16383 - 9, 16384, 2097152):
        packet = encode_publish("t/x", b"p" * size, qos=1, packet_id=7)
        buffer = bytearray()
        got = []
        for i in range(0, len(packet), max(1, len(packet) // 3)):
            buffer += packet[i:i + max(1, len(packet) // 3)]
            got += decode_packets(buffer)
        assert len(got) == 1 and not buffer
        kind, flags, body = got[0]
        assert (kind, flags) == (3, 0x02) and body.endswith(b"p" * size)
    with pytest.raises(MqttError, match="malformed remaining length"):
        decode_packets(bytearray(b"\x30\xff\xff\xff\xff\x01"))
    connect = encode_connect("c", 30, False, Will("w", b"x", 1, True), "u", "p")
    assert connect[8:10] == b"\x04\xec"  # level 4; user, password, will retain, QoS 1, will


def _run(scenario: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(scenario(), 60))


async def _until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_qos1_retained_and_the_last_will(mqtt_broker: tuple[str, int], fleet_name: str) -> None:
    """A watcher gets a QoS 1 message and a retained one (flagged retained when it subscribes
    later); a cut connection publishes the Last Will, a DISCONNECT does not."""
    _host, port = mqtt_broker
    root = f"edgeserve/v1/{fleet_name}/sim"

    async def scenario() -> None:
        got: list[tuple[str, bytes, bool]] = []
        watcher = MqttClient(f"w-{uuid.uuid4().hex[:8]}", clean_session=True,
                             on_message=lambda t, p, r: got.append((t, p, r)))
        await watcher.connect("127.0.0.1", port)
        assert await watcher.subscribe([(f"{root}/#", 1)]) == [1]
        dying = MqttClient(f"d-{uuid.uuid4().hex[:8]}", clean_session=True,
                           will=Will(f"{root}/will", b"gone", 1, True))
        await dying.connect("127.0.0.1", port)
        packet = dying.publish(f"{root}/live", b"hello", qos=1)
        await dying.published(packet)
        assert not dying.inflight
        dying.publish(f"{root}/kept", b"kept", qos=1, retain=True)
        await _until(lambda: len(got) == 2, "the two messages")
        dying.abort()
        await _until(lambda: any(t.endswith("/will") for t, _p, _r in got), "the Last Will")
        assert (f"{root}/will", b"gone", False) in got
        polite = MqttClient(f"p-{uuid.uuid4().hex[:8]}", clean_session=True,
                            will=Will(f"{root}/will2", b"gone", 1, False))
        await polite.connect("127.0.0.1", port)
        await polite.disconnect()
        late: list[tuple[str, bytes, bool]] = []
        reader = MqttClient(f"r-{uuid.uuid4().hex[:8]}", clean_session=True,
                            on_message=lambda t, p, r: late.append((t, p, r)))
        await reader.connect("127.0.0.1", port)
        await reader.subscribe([(f"{root}/kept", 1)])
        await _until(lambda: bool(late), "the retained message")
        assert late == [(f"{root}/kept", b"kept", True)]
        await asyncio.sleep(0.5)
        assert not any(t.endswith("/will2") for t, _p, _r in got)  # DISCONNECT: no will
        for client in (watcher, reader):
            await client.disconnect()
        clear = MqttClient(f"c-{uuid.uuid4().hex[:8]}", clean_session=True)
        await clear.connect("127.0.0.1", port)
        for topic in ("kept", "will"):
            await clear.published(clear.publish(f"{root}/{topic}", b"", qos=1, retain=True))
        await clear.disconnect()

    _run(scenario)


def test_a_resumed_session_gets_what_was_queued_and_resends_with_dup(
        mqtt_broker: tuple[str, int], fleet_name: str) -> None:
    """clean_session=False: messages published while the client was away arrive when it
    comes back (session present); a QoS 1 message it published while disconnected goes out
    (DUP) on the resumed session and is acknowledged. A clean session ends it."""
    _host, port = mqtt_broker
    root = f"edgeserve/v1/{fleet_name}/sess"
    client_id = f"s-{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        got: list[bytes] = []
        client = MqttClient(client_id, clean_session=False,
                            on_message=lambda _t, p, _r: got.append(p))
        assert await client.connect("127.0.0.1", port) is False
        await client.subscribe([(f"{root}/in", 1)])
        client.abort()
        await _until(lambda: not client.connected, "the cut")
        other_got: list[bytes] = []
        other = MqttClient(f"o-{uuid.uuid4().hex[:8]}", clean_session=True,
                           on_message=lambda _t, p, _r: other_got.append(p))
        await other.connect("127.0.0.1", port)
        await other.subscribe([(f"{root}/out", 1)])
        for i in range(3):
            await other.published(other.publish(f"{root}/in", f"m{i}".encode(), qos=1))
        pending = client.publish(f"{root}/out", b"while away", qos=1)
        assert pending in client.inflight
        assert await client.connect("127.0.0.1", port) is True
        await _until(lambda: len(got) == 3, "the queued messages")
        assert got == [b"m0", b"m1", b"m2"]
        await client.published(pending)
        await _until(lambda: other_got == [b"while away"], "the resent message")
        await client.disconnect()
        ended = MqttClient(client_id, clean_session=True)
        await ended.connect("127.0.0.1", port)
        await ended.disconnect()
        again = MqttClient(client_id, clean_session=False)
        assert await again.connect("127.0.0.1", port) is False  # nothing kept
        await again.disconnect()
        ended = MqttClient(client_id, clean_session=True)
        await ended.connect("127.0.0.1", port)
        await ended.disconnect()
        await other.disconnect()

    _run(scenario)


def test_keepalive_pings_and_refusals(mqtt_broker: tuple[str, int]) -> None:
    """With a 1 s keep-alive and nothing to say, PINGREQs keep the connection (the broker would
    close it after 1.5 s of silence); an empty client id with a persistent session is refused
    with a clear error; a closed port is an OSError."""
    _host, port = mqtt_broker

    async def scenario() -> None:
        client = MqttClient(f"k-{uuid.uuid4().hex[:8]}", keepalive=1, clean_session=True)
        await client.connect("127.0.0.1", port)
        before = client.received_packets
        await asyncio.sleep(3.5)
        assert client.connected
        assert client.received_packets - before >= 3  # PINGRESPs
        await client.disconnect()
        with pytest.raises(ConnectRefused, match="identifier rejected"):
            await MqttClient("", clean_session=False).connect("127.0.0.1", port)
        from tests.services import free_port

        with pytest.raises(OSError):
            await MqttClient("x", clean_session=True).connect("127.0.0.1", free_port())

    _run(scenario)
