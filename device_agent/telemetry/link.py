"""The MQTT link: carries the outbox to the fleet and brings acks (and desired state) back.

One thread owns one paho client (callback API v2) and drives it by hand (:func:`edgeserve.mqtt.pump`,
which waits with poll(), not select(), so any descriptor number works), so that reconnecting,
back-off and sending are all decided here:

- **Session**: MQTT 5 with ``clean_start=False`` and a ``SessionExpiryInterval`` (both are needed
  for the broker to keep the session and queue acks/desired state while the device is away);
  MQTT 3.1.1 with ``clean_session=False`` when the broker refuses version 5.
- **Status**: a retained birth message on ``status`` after every connect, and a retained Last
  Will (offline) registered with the connection. Both carry the connect time as ``ts``, so the
  fleet can order them (see ``fleet/registry.py``).
- **Back-off**: after a failed or lost connection, wait ``uniform(0, min(max, min·2^attempt))``
  ("full jitter"), so a fleet that lost its broker does not come back all in the same second.
- **Fail-over**: with several broker nodes (:attr:`BrokerSettings.nodes`) each connect attempt
  tries the node last connected first, then the others in order, without waiting in between;
  the back-off is between rounds. The session (and with it the acks and desired state queued for
  the device) is resumed wherever the broker replicates it (a NATS JetStream cluster); a broker
  that does not know the session gets the subscriptions again (every connect subscribes) and the
  unacked windows again (every connect sends them).
- **Flush**: windows go oldest first, ``batch_windows`` per :class:`TelemetryBatch`, paced by a
  token bucket (``rate_windows_per_s``) and by acks: at most ``max_unacked_windows`` are in
  flight. If no ack moves for ``ack_timeout_s`` the unacked windows are sent again (the fleet
  may have lost them, e.g. it restarted with a new session); duplicates cost nothing there.
- **Fleet announcements**: the fleet publishes ``{fleet}/fleet/status`` online whenever its
  subscriptions are granted; a live announcement (not the retained copy a new subscription gets)
  of a fleet whose broker session was not resumed makes the link send its unacked windows again
  at once, instead of after ``ack_timeout_s``: whatever it sent while no fleet session existed
  (a brand-new fleet, a broker that lost the fleet's session) was dropped by the broker. A
  resumed session had them queued, so nothing is sent twice.
- **Client id**: ``{device_id}@{fleet}`` unless set, so two fleets (or a test and a real fleet)
  with the same device ids on one broker do not take over each other's sessions; a takeover
  (MQTT 5 reason 0x8E, or connections closed within seconds of connecting, again and again) is
  logged as such, naming the client id.
- **Acks**: an ``Ack(seq)`` deletes every window up to ``seq`` from the outbox. An ack above any
  sequence number this device ever used means the fleet knew this device id before (the outbox
  was wiped): the held windows are renumbered after it instead of being ignored as duplicates.
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeserve import __version__
from edgeserve.contract import (
    Ack,
    FleetStatus,
    Status,
    TopicKind,
    check_id,
    decode,
    device_topic,
    encode,
    fleet_status_topic,
    parse_topic,
)
from edgeserve.errors import ContractError
from edgeserve.mqtt import VERSIONS, BrokerSettings, new_client, pump, topic_hint

from .outbox import Outbox, Record

__all__ = ["Link", "LinkSettings", "LinkStats"]

log = logging.getLogger(__name__)

_CONNACK_TIMEOUT_S = 10.0
_PROTOCOL_REFUSED = "Unsupported protocol version"
_SESSION_TAKEN_OVER = 0x8E
_QUICK_DROP_S = 5.0


@dataclass(frozen=True)
class LinkSettings:
    """Everything the link needs to know; every field has a production default."""

    broker: BrokerSettings
    fleet: str
    device_id: str
    client_id: str | None = None
    """MQTT client id (default ``{device_id}@{fleet}``: unique per fleet and device, so fleets
    sharing a broker never take over each other's sessions; ``@`` cannot occur in either id, and
    unlike ``/`` every broker here accepts it. Broker ACLs key on the username)."""
    session_expiry_s: int = 7 * 86400
    batch_windows: int = 100
    batch_bytes: int = 256 * 1024
    rate_windows_per_s: float = 500.0
    max_unacked_windows: int = 1000
    ack_timeout_s: float = 30.0
    backoff_min_s: float = 1.0
    backoff_max_s: float = 300.0

    def __post_init__(self) -> None:
        check_id(self.fleet, "fleet name")
        check_id(self.device_id, "device id")

    @property
    def mqtt_client_id(self) -> str:
        return self.client_id or f"{self.device_id}@{self.fleet}"


@dataclass
class LinkStats:
    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    batches_sent: int = 0
    windows_sent: int = 0
    bytes_sent: int = 0
    acks: int = 0
    retransmits: int = 0
    """unacked windows sent again because no ack came for ack_timeout_s"""
    fleet_resends: int = 0
    """unacked windows sent again at once because the fleet announced itself online"""
    takeovers: int = 0
    """connections the broker closed because another client used this client id"""
    rebased: int = 0
    protocol: str | None = None
    extra: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _ConnectFailed(Exception):
    pass


class Link:
    """Start/stop a background MQTT connection that flushes ``outbox`` to the fleet."""

    def __init__(self, settings: LinkSettings, outbox: Outbox, *,
                 status_info: Callable[[], Mapping[str, Any]] | None = None,
                 rng: random.Random | None = None) -> None:
        self.settings = settings
        self.outbox = outbox
        self.status_info = status_info or dict
        self.stats = LinkStats()
        self.connected = threading.Event()
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: mqtt.Client | None = None
        # held around every use of the client's socket: the link thread's reads and writes
        # (pump) and publishes/subscribes from other threads (see edgeserve.mqtt.pump)
        self._io = threading.RLock()
        self._lost = False
        self._handlers: dict[str, Callable[[bytes], None]] = {}
        self._connect_hooks: list[Callable[[], None]] = []
        self._preferred = "5"
        self._node = 0
        """index of the broker node last connected (or tried first next time)"""
        self._connect_ts = 0.0
        acked = outbox.stats().acked_seq
        self._acked = max(acked, outbox.floor() - 1)
        self._sent = self._acked
        self._last_progress = time.monotonic()
        self._ack_timeout = settings.ack_timeout_s
        self._tokens = float(settings.batch_windows)
        self._tokens_at = time.monotonic()
        self._topics = {kind: device_topic(settings.fleet, settings.device_id, kind)
                        for kind in ("status", "telemetry", "ack")}
        self._fleet_topic = fleet_status_topic(settings.fleet)
        self._quick_drops = 0
        self._subscribing: dict[int, str] = {}
        self.granted: dict[str, int] = {}
        """the QoS the broker granted per subscribed topic (the last SUBACK)"""

    # -- public API ------------------------------------------------------------------------------

    def start(self) -> Link:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"link-{self.settings.device_id}")
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Say offline (retained), disconnect and end the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def kill(self) -> None:
        """Drop the connection without a goodbye (tests: the broker sends the Last Will)."""
        self._stop.set()
        client = self._client
        if client is not None:
            sock = client.socket()
            if sock is not None:
                sock.close()
        if self._thread is not None:
            self._thread.join(10)

    def subscribe(self, kind: TopicKind, handler: Callable[[bytes], None],
                  sub: Sequence[str] = ()) -> None:
        """Deliver payloads on this device's ``kind`` topic (e.g. ``desired``; ``sub`` levels for
        ``files``) to ``handler`` (called on the link's thread; it must not block). Subscribed on
        every connect."""
        topic = device_topic(self.settings.fleet, self.settings.device_id, kind, *sub)
        self._handlers[topic] = handler
        client = self._client
        if client is not None and self.connected.is_set():
            with self._io:
                self._subscribe(client, topic)

    def on_connect(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the link's thread) after every successful connect, e.g. to
        publish the retained ``reported`` state again."""
        self._connect_hooks.append(callback)

    def publish(self, kind: TopicKind, payload: bytes, retain: bool = False,
                sub: Sequence[str] = ()) -> bool:
        """Publish on this device's ``kind`` topic (QoS 1); False when not connected (nothing is
        kept: publish again from an :meth:`on_connect` callback)."""
        client = self._client
        if client is None:
            return False
        topic = device_topic(self.settings.fleet, self.settings.device_id, kind, *sub)
        with self._io:
            info = client.publish(topic, payload, qos=1, retain=retain)
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    def refresh_status(self) -> None:
        """Publish the birth message again (the active model versions changed)."""
        client = self._client
        if client is not None and self.connected.is_set():
            with self._io:
                client.publish(self._topics["status"], self._status("online"), qos=1,
                               retain=True)

    @property
    def acked_seq(self) -> int:
        return self._acked

    # -- the thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                attempt = self._step(attempt)
            except Exception:
                # never let the thread die: whatever broke, start over with a fresh connection
                log.exception("%s: link error; reconnecting", self.settings.device_id)
                if self._client is not None:
                    self._drop_connection()
                attempt += 1
                self._stop.wait(self._backoff(attempt))
        self._goodbye()

    def _step(self, attempt: int) -> int:
        """One turn of the loop; returns the back-off attempt count."""
        if self._client is None:
            if attempt and self._stop.wait(self._backoff(attempt)):
                return attempt
            try:
                self._connect()
            except _ConnectFailed as exc:
                self.stats.connect_failures += 1
                log.warning("%s: %s", self.settings.device_id, exc)
                return attempt + 1
        client = self._client
        assert client is not None
        busy = self._sent > self._acked or self._has_pending()
        rc = pump(client, 0.05 if busy else 0.25, self._io)
        if self._lost or rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._drop_connection()
            return 1
        self._pump()
        return 0

    def _backoff(self, attempt: int) -> float:
        s = self.settings
        return self._rng.uniform(0, min(s.backoff_max_s, s.backoff_min_s * 2 ** min(attempt, 30)))

    @property
    def broker_url(self) -> str:
        """The URL of the broker node connected (or to be tried first), without credentials."""
        return self.settings.broker.node_url(self._node)

    def _connect(self) -> None:
        """Connect to the node last used, else to the next ones in turn (one round)."""
        count = len(self.settings.broker.nodes)
        failures = []
        for step in range(count):
            if self._stop.is_set():
                break
            index = (self._node + step) % count
            why = self._connect_node(index)
            if why is None:
                if step:
                    log.warning("%s: failed over to broker %s", self.settings.device_id,
                                self.broker_url)
                return
            failures.append(f"{self.settings.broker.node_url(index)}: {why}")
        if not failures:
            raise _ConnectFailed("stopped while connecting")
        closed = any("closed before CONNACK" in failure for failure in failures)
        raise _ConnectFailed("cannot connect to " + "; ".join(failures)
                             + (topic_hint(self._topics["status"]) if closed else ""))

    def _connect_node(self, index: int) -> str | None:
        """Connect to one node (trying the other protocol when the broker refuses one); None on
        success, else why not."""
        protocols = ([self.settings.broker.protocol] if self.settings.broker.protocol != "auto"
                     else [self._preferred, "3.1.1" if self._preferred == "5" else "5"])
        last = ""
        for name in protocols:
            try:
                outcome = self._try_connect(name, index)
            except _ConnectFailed as exc:
                return str(exc)
            if outcome is None:
                self._preferred = name
                return None
            last = f"MQTT {name}: {outcome}"
            if outcome not in ("closed before CONNACK", _PROTOCOL_REFUSED):
                break
        return last

    def _try_connect(self, name: str, index: int = 0) -> str | None:
        """One attempt on node ``index``; None on success, else why it failed."""
        version = VERSIONS[name]
        s = self.settings
        host, port = s.broker.nodes[index]
        client = new_client(s.broker, s.mqtt_client_id, version)
        self._connect_ts = time.time()
        client.will_set(self._topics["status"], self._status("offline", "connection lost"),
                        qos=1, retain=True)
        result: dict[str, Any] = {}
        client.on_connect = lambda _c, _u, flags, reason, _p: result.update(
            reason=reason, session=flags.session_present)
        client.on_disconnect = lambda *_a: result.setdefault("closed", True)
        try:
            client.connect(host, port, s.broker.keepalive,
                           clean_start=(False if version == MQTTProtocolVersion.MQTTv5
                                        else mqtt.MQTT_CLEAN_START_FIRST_ONLY),
                           properties=self._connect_properties(version))
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise _ConnectFailed(f"cannot reach it: {exc}") from None
        deadline = time.monotonic() + _CONNACK_TIMEOUT_S
        while "reason" not in result and "closed" not in result:
            if time.monotonic() > deadline or self._stop.is_set():
                break
            pump(client, 0.1)
        reason = result.get("reason")
        if reason is None or reason.is_failure:
            _close(client)
            return "closed before CONNACK" if reason is None else str(reason)
        self._node = index
        self._on_connected(client, name, bool(result.get("session")))
        return None

    def _connect_properties(self, version: MQTTProtocolVersion) -> Properties | None:
        if version != MQTTProtocolVersion.MQTTv5:
            return None
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.settings.session_expiry_s
        return props

    def _on_connected(self, client: mqtt.Client, protocol: str, session: bool) -> None:
        client.on_connect = None
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        with self._io:
            self._client = client
            self._lost = False
            for topic in (self._topics["ack"], self._fleet_topic, *self._handlers):
                self._subscribe(client, topic)
            client.publish(self._topics["status"], self._status("online"), qos=1, retain=True)
        # everything not acked is sent again: the broker may have lost what was in flight
        self._acked = max(self._acked, self.outbox.floor() - 1)
        self._sent = self._acked
        self._last_progress = time.monotonic()
        self._ack_timeout = self.settings.ack_timeout_s
        self.stats.connects += 1
        self.stats.protocol = protocol
        self.connected.set()
        log.info("%s: connected to %s (MQTT %s, session %s)", self.settings.device_id,
                 self.broker_url, protocol, "resumed" if session else "new")
        for hook in self._connect_hooks:
            try:
                hook()
            except Exception:
                log.exception("%s: on_connect callback failed", self.settings.device_id)

    def _subscribe(self, client: mqtt.Client, topic: str) -> None:
        _rc, mid = client.subscribe(topic, qos=self.settings.broker.subscribe_qos)
        if mid is not None:
            self._subscribing[mid] = topic

    def _on_subscribe(self, _client: mqtt.Client, _userdata: Any, mid: int, reasons: Any,
                      _props: Any = None) -> None:
        topic = self._subscribing.pop(mid, "?")
        failed = [r for r in reasons if r.is_failure]
        if reasons and not failed:
            self.granted[topic] = int(reasons[0].value)
        if failed:
            log.error("%s: the broker refused the subscription to %s (%s)%s",
                      self.settings.device_id, topic, failed[0], topic_hint(topic))

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any,
                       _props: Any = None) -> None:
        self._lost = True
        client_id = self.settings.mqtt_client_id
        if getattr(reason, "value", None) == _SESSION_TAKEN_OVER:
            self.stats.takeovers += 1
            log.error("%s: the broker closed this connection because another client connected "
                      "with the same client id %r (session taken over); two agents, or two "
                      "fleets on one broker, use this id: give each its own device id or "
                      "--client-id", self.settings.device_id, client_id)
            return
        if time.time() - self._connect_ts < _QUICK_DROP_S:
            self._quick_drops += 1
            if self._quick_drops in (3, 10, 100):
                log.error("%s: the broker closed the connection within %.0f s of connecting %d "
                          "times in a row; if another client uses client id %r, each takes the "
                          "session over from the other%s", self.settings.device_id,
                          _QUICK_DROP_S, self._quick_drops, client_id,
                          topic_hint(self._topics["status"]))
        else:
            self._quick_drops = 0

    def _drop_connection(self) -> None:
        client, self._client = self._client, None
        self.connected.clear()
        self.stats.disconnects += 1
        if client is not None:
            with self._io:
                _close(client)
        if not self._stop.is_set():
            log.warning("%s: lost the connection to %s", self.settings.device_id,
                        self.broker_url)

    def _goodbye(self) -> None:
        client, self._client = self._client, None
        self.connected.clear()
        if client is None:
            return
        try:
            with self._io:
                info = client.publish(self._topics["status"],
                                      self._status("offline", "stopped"), qos=1, retain=True)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return  # not connected (is_published would raise): the Last Will says offline
            deadline = time.monotonic() + 2.0
            while not info.is_published() and time.monotonic() < deadline:
                if pump(client, 0.05, self._io) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
        finally:
            _close(client)

    # -- messages ----------------------------------------------------------------------------------

    def _status(self, state: str, reason: str | None = None) -> bytes:
        info = dict(self.status_info()) if state == "online" else {}
        return encode(Status(device_id=self.settings.device_id, state=state,  # type: ignore[arg-type]
                             ts=self._connect_ts, agent_version=__version__, reason=reason,
                             **info))

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == self._topics["ack"]:
            self._on_ack(bytes(message.payload))
            return
        if message.topic == self._fleet_topic:
            self._on_fleet_status(bytes(message.payload), bool(message.retain))
            return
        handler = self._handlers.get(message.topic)
        if handler is None:
            return
        try:
            handler(bytes(message.payload))
        except Exception:
            log.exception("%s: handler for %s failed", self.settings.device_id,
                          parse_topic(message.topic).kind)

    def _on_ack(self, payload: bytes) -> None:
        try:
            seq = decode(Ack, payload, where=self._topics["ack"]).seq
        except ContractError as exc:
            log.warning("%s: ignored a bad ack: %s", self.settings.device_id, exc)
            return
        if seq >= self.outbox.next_seq():
            moved = self.outbox.rebase(seq + 1)
            self.stats.rebased += moved
            self._sent = seq
            log.warning("%s: the fleet already holds windows up to %d from an earlier outbox; "
                        "renumbered %d held windows after it", self.settings.device_id, seq, moved)
        self.outbox.ack(seq)
        self.stats.acks += 1
        if seq > self._acked:
            self._acked = seq
            self._sent = max(self._sent, seq)
            self._last_progress = time.monotonic()
            self._ack_timeout = self.settings.ack_timeout_s

    def _on_fleet_status(self, payload: bytes, retained: bool) -> None:
        if not payload:
            return  # a cleared retained message
        try:
            status = decode(FleetStatus, payload, where=self._fleet_topic)
        except ContractError as exc:
            log.warning("%s: ignored a bad fleet status: %s", self.settings.device_id, exc)
            return
        # the retained copy comes with our own subscription, right after connecting, when
        # everything unacked is being sent again anyway
        if status.state != "online" or status.resumed or retained or self._sent <= self._acked:
            return
        log.info("%s: the fleet announced itself (instance %s); sending the %d unacked "
                 "window(s) again now", self.settings.device_id, status.instance,
                 self._sent - self._acked)
        self._sent = self._acked
        self._last_progress = time.monotonic()
        self._ack_timeout = self.settings.ack_timeout_s
        self.stats.fleet_resends += 1

    # -- flushing ----------------------------------------------------------------------------------

    def _has_pending(self) -> bool:
        return self.outbox.newest_seq > self._sent

    def _pump(self) -> None:
        s = self.settings
        now = time.monotonic()
        self._tokens = min(max(float(s.batch_windows), s.rate_windows_per_s),
                           self._tokens + (now - self._tokens_at) * s.rate_windows_per_s)
        self._tokens_at = now
        if self._sent > self._acked and now - self._last_progress > self._ack_timeout:
            log.warning("%s: no ack for %.0f s; sending windows after %d again",
                        s.device_id, self._ack_timeout, self._acked)
            self._sent = self._acked
            self._last_progress = now
            self._ack_timeout = min(self._ack_timeout * 2, 8 * s.ack_timeout_s)
            self.stats.retransmits += 1
        while True:
            room = min(s.batch_windows, s.max_unacked_windows - (self._sent - self._acked))
            # wait for a whole batch's worth of tokens rather than trickle out small batches
            if room <= 0 or self._tokens < room:
                return
            records = self.outbox.pending(after=self._sent, limit=room, max_bytes=s.batch_bytes)
            if not records or not self._send(records):
                return

    def _send(self, records: list[Record]) -> bool:
        client = self._client
        if client is None:
            return False
        payload = self._batch(records)
        with self._io:
            info = client.publish(self._topics["telemetry"], payload, qos=1)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False
        if self._sent == self._acked:
            self._last_progress = time.monotonic()  # the ack clock starts with the first send
        self._sent = records[-1].seq
        self._tokens -= len(records)
        self.stats.batches_sent += 1
        self.stats.windows_sent += len(records)
        self.stats.bytes_sent += len(payload)
        return True

    def _batch(self, records: list[Record]) -> bytes:
        """A :class:`TelemetryBatch` built from the stored window JSON (validated when stored)."""
        head = (f'{{"v":1,"device_id":"{self.settings.device_id}","sent":{time.time():.3f},'
                f'"floor":{min(self.outbox.floor(), records[0].seq)},"windows":[')
        return head.encode() + b",".join(r.data for r in records) + b"]}"


def _close(client: mqtt.Client) -> None:
    with contextlib.suppress(OSError, ValueError):
        client.disconnect()
        pump(client, 0.01)
    sock = client.socket()
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()
