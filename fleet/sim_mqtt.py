"""A small MQTT 3.1.1 client on asyncio, one :class:`asyncio.Protocol` per connection: what the
fleet simulator (:mod:`.simulate`) needs to hold thousands of device sessions in one process.

paho runs one client object with its own buffers and a thread (or a loop turn) each; the asyncio
libraries measured (``gmqtt``, ``aiomqtt``, see docs/scale-out.md) hold idle sessions well but
hide what the simulator must control: cutting a connection without DISCONNECT (so the broker
sends the Last Will), the session flag, and which PUBLISH is resent with DUP. This client speaks
exactly the part of MQTT 3.1.1 (OASIS standard, 2014) that the device contract uses:

- CONNECT with client id, ``clean_session``, keep-alive, Last Will (topic, payload, QoS,
  retain), user name and password; CONNACK with its return code and session-present flag;
- PUBLISH at QoS 0 and 1 (PUBACK); unacknowledged QoS 1 messages are sent again with DUP set
  after a reconnect that resumed the session, in their original order with their packet ids
  (section 4.4); incoming QoS 1 is acknowledged after the handler ran, QoS 2 is completed
  (PUBREC/PUBREL/PUBCOMP) for brokers that do not downgrade;
- SUBSCRIBE/SUBACK (granted QoS or 0x80 refused), PINGREQ/PINGRESP on the keep-alive, and
  DISCONNECT.

Nothing here is specific to edgeserve: topics and payloads are the caller's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

__all__ = ["ConnectRefused", "MqttClient", "MqttError", "Will", "decode_packets",
           "encode_connect", "encode_publish", "encode_subscribe"]

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14
_MAX_REMAINING = 268_435_455
_CONNACK_CODES = {
    1: "unacceptable protocol version", 2: "identifier rejected", 3: "server unavailable",
    4: "bad user name or password", 5: "not authorized",
}


class MqttError(Exception):
    """A protocol violation, a lost connection or a timeout."""


class ConnectRefused(MqttError):
    """The broker answered CONNECT with a non-zero return code."""

    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(f"the broker refused the connection: "
                         f"{_CONNACK_CODES.get(code, 'unknown reason')} (CONNACK code {code})")


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


# -- encoding -------------------------------------------------------------------------------------

def _length(n: int) -> bytes:
    if not 0 <= n <= _MAX_REMAINING:
        raise MqttError(f"packet of {n} bytes is larger than MQTT allows ({_MAX_REMAINING})")
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _utf8(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) > 65535:
        raise MqttError(f"string of {len(raw)} bytes is longer than MQTT allows (65535)")
    return len(raw).to_bytes(2, "big") + raw


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([kind << 4 | flags]) + _length(len(body)) + body


def encode_connect(client_id: str, keepalive: int, clean_session: bool, will: Will | None = None,
                   username: str | None = None, password: str | None = None) -> bytes:
    if not 0 <= keepalive <= 65535:
        raise MqttError(f"keep-alive {keepalive} s is out of range (0-65535)")
    flags = 0x02 if clean_session else 0
    payload = _utf8(client_id)
    if will is not None:
        if will.qos not in (0, 1, 2):
            raise MqttError(f"Last Will QoS {will.qos} is not 0, 1 or 2")
        flags |= 0x04 | will.qos << 3 | (0x20 if will.retain else 0)
        payload += _utf8(will.topic) + _utf8(will.payload)
    if username is not None:
        flags |= 0x80
        payload += _utf8(username)
        if password is not None:
            flags |= 0x40
            payload += _utf8(password)
    header = _utf8("MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big")
    return _packet(CONNECT, 0, header + payload)


def encode_publish(topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                   dup: bool = False, packet_id: int = 0) -> bytes:
    if qos not in (0, 1, 2):
        raise MqttError(f"QoS {qos} is not 0, 1 or 2")
    flags = (0x08 if dup else 0) | qos << 1 | (0x01 if retain else 0)
    body = _utf8(topic) + (packet_id.to_bytes(2, "big") if qos else b"") + payload
    return _packet(PUBLISH, flags, body)


def encode_subscribe(packet_id: int, filters: Sequence[tuple[str, int]]) -> bytes:
    if not filters:
        raise MqttError("SUBSCRIBE needs at least one topic filter")
    body = packet_id.to_bytes(2, "big") + b"".join(_utf8(f) + bytes([q]) for f, q in filters)
    return _packet(SUBSCRIBE, 0x02, body)


def decode_packets(buffer: bytearray) -> list[tuple[int, int, bytes]]:
    """Take every complete packet off the front of ``buffer``: ``(type, flags, body)``."""
    out: list[tuple[int, int, bytes]] = []
    while len(buffer) >= 2:
        length = shift = 0
        i = 1
        while True:
            if i >= len(buffer):
                return out  # the length itself is not complete yet
            byte = buffer[i]
            length += (byte & 0x7F) << shift
            shift += 7
            i += 1
            if not byte & 0x80:
                break
            if shift > 21:
                raise MqttError("malformed remaining length (more than 4 bytes)")
        if len(buffer) < i + length:
            return out
        out.append((buffer[0] >> 4, buffer[0] & 0x0F, bytes(buffer[i:i + length])))
        del buffer[:i + length]
    return out


# -- the client -----------------------------------------------------------------------------------

MessageHandler = Callable[[str, bytes, bool], None]
"""``(topic, payload, retained)``; called on the event loop, must not block."""


class _Wire(asyncio.Protocol):
    """One TCP connection; forwards to its client only while it is the client's current one."""

    def __init__(self, client: MqttClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's or uvloop's (not a subclass of asyncio.Transport, the same methods)
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        if self.client._wire is not self:
            return
        self.buffer += data
        try:
            packets = decode_packets(self.buffer)
        except MqttError as exc:
            self.client._lost(self, exc)
            return
        for kind, flags, body in packets:
            if self.client._wire is not self:
                return
            self.client._on_packet(kind, flags, body)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._lost(self, exc)


class MqttClient:
    """One MQTT 3.1.1 session: :meth:`connect` (again after a loss), publish, subscribe.

    Session state that MQTT keeps across connections (the QoS 1 messages not yet acknowledged,
    the packet id counter) lives here, so a reconnect with ``clean_session=False`` that finds
    its session resumes it (unacknowledged messages go again with DUP set).
    """

    def __init__(self, client_id: str, *, on_message: MessageHandler | None = None,
                 on_lost: Callable[[MqttClient, BaseException | None], None] | None = None,
                 keepalive: int = 60, clean_session: bool = False, will: Will | None = None,
                 username: str | None = None, password: str | None = None) -> None:
        self.client_id = client_id
        self.on_message = on_message
        self.on_lost = on_lost
        self.keepalive = keepalive
        self.clean_session = clean_session
        self.will = will
        self.username = username
        self.password = password
        self.session_present = False
        self.inflight: dict[int, bytes] = {}
        """QoS 1 PUBLISH packets sent and not yet acknowledged (by packet id, in send order)"""
        self._wire: _Wire | None = None
        self._next_id = 0
        self._connack: asyncio.Future[tuple[bool, int]] | None = None
        self._waiters: dict[int, asyncio.Future[bytes]] = {}
        self._ping: asyncio.TimerHandle | None = None
        self._last_out = 0.0
        self._ping_sent = 0.0
        self.sent_packets = 0
        self.received_packets = 0

    @property
    def open(self) -> bool:
        """A connection is open or being opened."""
        return self._wire is not None

    @property
    def connected(self) -> bool:
        return self._wire is not None and self._connack is not None and self._connack.done() \
            and not self._connack.cancelled() and self._connack.exception() is None

    async def connect(self, host: str, port: int, timeout: float = 10.0,
                      ssl_context: ssl.SSLContext | None = None) -> bool:
        """Open a connection and wait for CONNACK; returns whether the broker kept the session.
        Raises :class:`ConnectRefused`, :class:`MqttError` (timeout, closed) or ``OSError``."""
        if self._wire is not None:
            raise MqttError(f"{self.client_id}: already connected")
        loop = asyncio.get_running_loop()
        wire = _Wire(self)
        self._wire = wire
        self._connack = loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(lambda: wire, host, port, ssl=ssl_context)
                self._write(encode_connect(self.client_id, self.keepalive, self.clean_session,
                                           self.will, self.username, self.password))
                session, code = await self._connack
        except BaseException as exc:
            self._close_wire(wire)
            if isinstance(exc, TimeoutError):
                raise MqttError(f"{self.client_id}: no CONNACK from {host}:{port} within "
                                f"{timeout:g} s") from None
            raise
        if code:
            self._close_wire(wire)
            raise ConnectRefused(code)
        self.session_present = session
        if session:
            for packet in list(self.inflight.values()):  # DUP flag: the first byte's bit 3
                self._write(bytes([packet[0] | 0x08]) + packet[1:])
        else:
            self.inflight.clear()
            for waiter in self._waiters.values():
                if not waiter.done():
                    waiter.set_exception(MqttError("the broker did not keep the session"))
            self._waiters.clear()
        self._schedule_ping()
        return session

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
                ) -> int:
        """Queue a PUBLISH; returns its packet id (0 at QoS 0). QoS 1 messages stay in
        :attr:`inflight` until acknowledged, across reconnects of a resumed session."""
        if qos == 0:
            self._write(encode_publish(topic, payload, 0, retain))
            return 0
        if qos != 1:
            raise MqttError("this client publishes at QoS 0 or 1 only")
        packet_id = self._new_id()
        packet = encode_publish(topic, payload, 1, retain, packet_id=packet_id)
        self.inflight[packet_id] = packet
        if self._wire is not None:
            self._write(packet)
        return packet_id

    async def published(self, packet_id: int, timeout: float = 10.0) -> None:
        """Wait for the PUBACK of ``packet_id`` (returns at once if it came already)."""
        if packet_id == 0 or packet_id not in self.inflight:
            return
        await self._wait(packet_id, timeout)

    async def subscribe(self, filters: Sequence[tuple[str, int]], timeout: float = 10.0
                        ) -> list[int]:
        """Subscribe and wait for SUBACK; returns the granted QoS per filter (0x80 = refused)."""
        packet_id = self._new_id()
        self._write(encode_subscribe(packet_id, filters))
        body = await self._wait(packet_id, timeout)
        return list(body[2:])

    def abort(self) -> None:
        """Cut the connection without DISCONNECT: the broker publishes the Last Will."""
        wire = self._wire
        if wire is not None and wire.transport is not None:
            wire.transport.abort()

    async def disconnect(self) -> None:
        """Send DISCONNECT (no Last Will) and close."""
        wire = self._wire
        if wire is None or wire.transport is None:
            return
        self._write(_packet(DISCONNECT, 0, b""))
        wire.transport.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                while self._wire is wire:
                    await asyncio.sleep(0.01)
        self._close_wire(wire)

    # -- internals --------------------------------------------------------------------------------

    def _new_id(self) -> int:
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self.inflight and self._next_id not in self._waiters:
                return self._next_id
        raise MqttError(f"{self.client_id}: all 65535 packet ids are in flight")

    async def _wait(self, packet_id: int, timeout: float) -> bytes:
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiters[packet_id] = waiter
        try:
            async with asyncio.timeout(timeout):
                return await waiter
        except TimeoutError:
            raise MqttError(f"{self.client_id}: no answer to packet {packet_id} within "
                            f"{timeout:g} s") from None
        finally:
            self._waiters.pop(packet_id, None)

    def _write(self, data: bytes) -> None:
        wire = self._wire
        if wire is None or wire.transport is None or wire.transport.is_closing():
            return  # QoS 1 messages stay in inflight; the rest is lost with the connection
        wire.transport.write(data)
        self.sent_packets += 1
        self._last_out = asyncio.get_running_loop().time()

    def _schedule_ping(self) -> None:
        if self.keepalive:
            loop = asyncio.get_running_loop()
            self._ping = loop.call_later(self.keepalive / 2, self._keepalive)

    def _keepalive(self) -> None:
        wire = self._wire
        if wire is None:
            return
        now = asyncio.get_running_loop().time()
        if self._ping_sent and now - self._ping_sent > self.keepalive:
            self._lost(wire, MqttError(f"{self.client_id}: no PINGRESP within {self.keepalive} s"))
            return
        if not self._ping_sent and now - self._last_out >= self.keepalive / 2:
            self._write(_packet(PINGREQ, 0, b""))
            self._ping_sent = now
        self._schedule_ping()

    def _on_packet(self, kind: int, flags: int, body: bytes) -> None:
        self.received_packets += 1
        if kind == PUBLISH:
            self._on_publish(flags, body)
        elif kind == PUBACK:
            packet_id = int.from_bytes(body[:2], "big")
            self.inflight.pop(packet_id, None)
            self._resolve(packet_id, body)
        elif kind == SUBACK:
            self._resolve(int.from_bytes(body[:2], "big"), body)
        elif kind == CONNACK:
            if self._connack is not None and not self._connack.done() and len(body) == 2:
                self._connack.set_result((bool(body[0] & 0x01), body[1]))
        elif kind == PINGRESP:
            self._ping_sent = 0.0
        elif kind == PUBREL:
            self._write(_packet(PUBCOMP, 0, body[:2]))
        elif kind in (PUBREC, PUBCOMP):
            pass  # this client does not publish at QoS 2
        else:
            assert self._wire is not None
            self._lost(self._wire, MqttError(f"unexpected MQTT packet type {kind} from the broker"))

    def _on_publish(self, flags: int, body: bytes) -> None:
        qos = (flags >> 1) & 0x03
        size = int.from_bytes(body[:2], "big")
        topic = body[2:2 + size].decode("utf-8", "replace")
        start = 2 + size + (2 if qos else 0)
        packet_id = body[2 + size:start]
        if self.on_message is not None:
            self.on_message(topic, body[start:], bool(flags & 0x01))
        if qos == 1:
            self._write(_packet(PUBACK, 0, packet_id))
        elif qos == 2:
            self._write(_packet(PUBREC, 0, packet_id))

    def _resolve(self, packet_id: int, body: bytes) -> None:
        waiter = self._waiters.get(packet_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(body)

    def _lost(self, wire: _Wire, exc: BaseException | None) -> None:
        if self._wire is not wire:
            return
        self._close_wire(wire)
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(MqttError(f"{self.client_id}: connection closed before "
                                                  "CONNACK"))
            return  # connect() reports it
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(MqttError(f"{self.client_id}: connection lost"))
        if self.on_lost is not None:
            self.on_lost(self, exc)

    def _close_wire(self, wire: _Wire) -> None:
        if self._wire is wire:
            self._wire = None
        if self._ping is not None:
            self._ping.cancel()
            self._ping = None
        self._ping_sent = 0.0
        if wire.transport is not None and not wire.transport.is_closing():
            wire.transport.abort()
