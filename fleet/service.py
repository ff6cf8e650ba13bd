"""The fleet's MQTT adapter for ingestion: subscribe, hand messages to the :class:`Ingestor`, ack.

Threads: paho's network thread receives messages into a queue; one worker thread takes them in
groups (up to ``group_messages`` or ``group_wait`` seconds), validates them, stores the group in
one transaction, publishes each device's ack, and only then acknowledges the MQTT messages
(``manual_ack``). So a message the fleet had not committed when it was killed is still the
broker's: the persistent session (clean start off, session expiry set) hands it over again after
a restart, and the primary key makes the second copy a no-op.

Once its subscriptions are granted (after every connect), the service announces itself on the
retained ``{fleet}/fleet/status`` (``online``; the Last Will says ``offline``): devices that sent
telemetry while no fleet was subscribed, which the broker dropped, send it again at once.

Telemetry and devices' ``status`` are subscribed as shared subscriptions
(``$share/edgeserve-fleet/…``) when the broker says it supports them (MQTT 5
``SharedSubscriptionAvailable``, absent = yes), so several fleet workers split the load: each
status message reaches one worker, not all of them (a reconnect storm of 10,000 devices sends
some 30,000 births and Last Wills). Brokers do not deliver retained messages to shared
subscriptions, so a worker that starts a *new* session (not a resumed one: that one was
subscribed all along) sweeps the retained statuses once: it subscribes the plain filter at QoS 0
and unsubscribes as soon as the broker grants it (the broker sends the retained messages with
the grant). A status seen twice is harmless: the newest time stamp wins.

A shared worker's session expires ``shared_session_expiry_s`` (10 min) after it disconnects,
not 7 days: brokers go on routing a share to a disconnected member's session, so a worker gone
for good would strand its part of the telemetry until the session expires. Nothing is lost when
it does: devices send unacked windows again, and the next new session sweeps the statuses.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgeserve.contract import (
    Ack,
    FleetStatus,
    device_topic,
    encode,
    fleet_filter,
    fleet_status_topic,
    shared_filter,
)
from edgeserve.errors import BrokerError, StoreError
from edgeserve.mqtt import topic_hint

from .connection import BrokerSettings, BrokerUnreachableError, connect, fail_over
from .ingest import Ingestor, Parsed
from .jetstream import Delivery, JetStreamFeed, JetStreamSettings

__all__ = ["FleetService", "SharedMode"]

log = logging.getLogger(__name__)

SharedMode = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class _Received:
    mid: int
    qos: int
    topic: str
    payload: bytes
    connection: int = 0
    """which connection brought it: packet ids (``mid``) mean something only on that one"""
    handle: Any = None
    """a JetStream message to acknowledge instead (``--nats``)"""


class FleetService:
    """Runs ingestion for one fleet over one broker connection (start/stop; thread-safe stats)."""

    def __init__(self, ingestor: Ingestor, broker: BrokerSettings, client_id: str, *,
                 shared: SharedMode = "auto", session_expiry_s: int = 7 * 86400,
                 shared_session_expiry_s: int = 600, jetstream: JetStreamSettings | None = None,
                 receive_maximum: int = 1000, group_messages: int = 400,
                 group_wait_s: float = 0.02, stats_interval_s: float = 30.0) -> None:
        self.ingestor = ingestor
        self.broker = broker
        self.client_id = client_id
        self.shared = shared
        self.session_expiry_s = session_expiry_s
        self.shared_session_expiry_s = shared_session_expiry_s
        self.jetstream = jetstream
        self.feed: JetStreamFeed | None = None
        self.receive_maximum = receive_maximum
        self.group_messages = group_messages
        self.group_wait_s = group_wait_s
        self.stats_interval_s = stats_interval_s
        self.ready = threading.Event()
        self.protocol: str | None = None
        self.telemetry_filter: str | None = None
        self._queue: queue.Queue[_Received] = queue.Queue()
        self._stop = threading.Event()
        self._client: mqtt.Client | None = None
        self._worker: threading.Thread | None = None
        self._shared_available = True
        self._pending_subs: dict[int, str] = {}
        self._sweep_mid: int | None = None
        self.sweeps = 0
        self.instance = uuid.uuid4().hex[:12]
        self.announcements = 0
        self.errors = 0
        self.worker_restarts = 0
        self._resumed = False
        self._connection = 0

    @property
    def node(self) -> str | None:
        """The URL of the broker node the client is connected to (None while it is not)."""
        client = self._client
        if client is None or not client.is_connected():
            return None
        return f"{'mqtts' if self.broker.tls else 'mqtt'}://{client.host}:{client.port}"

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0, connect_timeout: float = 0.0) -> None:
        """Connect, subscribe and start the worker; returns when subscriptions are granted.

        An unreachable broker is retried (jittered back-off) for ``connect_timeout`` seconds,
        so the fleet may start before its broker; a refused connection fails at once.
        """
        if self.jetstream is not None:
            self.feed = JetStreamFeed(self.jetstream, self.ingestor.fleet, self.client_id,
                                      self._from_stream, self._queue.qsize,
                                      batch=self.group_messages)
            self.feed.start(timeout=max(timeout, connect_timeout))
            self.telemetry_filter = self.feed.describe
        # Messages may arrive during the handshake (a resumed session's queue): they wait in
        # the queue until the worker, which needs the connected client to ack them, starts.
        try:
            self._client = self._connect(connect_timeout)
        except BaseException:
            if self.feed is not None:
                self.feed.stop()
            raise
        self._worker = threading.Thread(target=self._work, name="fleet-ingest", daemon=True)
        self._worker.start()
        self.protocol = "5" if self._client.protocol == mqtt.MQTTv5 else "3.1.1"
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.loop_start()
        if not self.ready.wait(timeout):
            self.stop()
            raise BrokerError(f"the broker at {self.broker.url} did not grant the fleet's "
                              f"subscriptions within {timeout:.0f} s")

    def _connect(self, connect_timeout: float) -> mqtt.Client:
        deadline = time.monotonic() + connect_timeout
        delay = 0.5
        while True:
            try:
                return connect(self.broker, self.client_id, self._prepare,
                               self._connect_properties, manual_ack=True)
            except BrokerUnreachableError as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("%s; retrying", exc)
                time.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, 10.0)

    def _restart_worker_if_dead(self) -> None:
        if self._stop.is_set() or self._worker is None or self._worker.is_alive():
            return
        self.worker_restarts += 1
        log.error("the ingest worker died; restarting it (restart #%d)", self.worker_restarts)
        self._worker = threading.Thread(target=self._work, name="fleet-ingest", daemon=True)
        self._worker.start()

    def request_stop(self) -> None:
        """Make :meth:`run` return (safe from a signal handler)."""
        self._stop.set()

    def stop(self) -> None:
        """Stop the worker (after its current group) and disconnect."""
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout=30)
        if self.feed is not None:
            self.feed.stop()
        if self._client is not None:
            if self._client.is_connected():
                info = self._client.publish(*self._status("offline"))
                if info.rc == mqtt.MQTT_ERR_SUCCESS:
                    info.wait_for_publish(2.0)
            self._client.disconnect()
            self._client.loop_stop()

    def _status(self, state: str) -> tuple[str, bytes, int, bool]:
        """(topic, payload, qos, retain) of this process's fleet announcement."""
        # on JetStream the stream kept what devices sent meanwhile when the consumer existed
        resumed = self.feed.resumed if self.feed is not None else self._resumed
        status = FleetStatus(state=state, instance=self.instance,  # type: ignore[arg-type]
                             resumed=resumed)
        return fleet_status_topic(self.ingestor.fleet), encode(status), 1, True

    def run(self, duration_s: float | None = None) -> None:
        """Block until :meth:`stop` is called from another thread, or ``duration_s`` passed."""
        deadline = None if duration_s is None else time.monotonic() + duration_s
        last = self.ingestor.stats.snapshot()
        next_log = time.monotonic() + self.stats_interval_s
        while not self._stop.is_set():
            remaining = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if remaining <= 0:
                break
            self._stop.wait(remaining)
            self._restart_worker_if_dead()
            if time.monotonic() >= next_log:
                next_log += self.stats_interval_s
                now = self.ingestor.stats.snapshot()
                if now != last:
                    log.info("ingest: %s", now)
                    last = now

    # -- MQTT callbacks ----------------------------------------------------------------------------

    def _prepare(self, client: mqtt.Client) -> None:
        client.will_set(*self._status("offline"))
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect

    def _connect_properties(self, version: int) -> Properties | None:
        if version != mqtt.MQTTv5:
            return None
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        # MQTT 5 with shared subscriptions (auto: most MQTT 5 brokers have them): a short expiry
        props.SessionExpiryInterval = (self.session_expiry_s if self.shared == "off"
                                       else self.shared_session_expiry_s)
        props.ReceiveMaximum = self.receive_maximum
        return props

    def _on_connect(self, client: mqtt.Client, _userdata: Any, flags: Any, reason: Any,
                    props: Any) -> None:
        if reason.is_failure:
            log.warning("broker refused the connection: %s", reason)
            fail_over(client, f"refused the connection ({reason})")
            return
        self._resumed = bool(flags.session_present)
        self._connection += 1
        self._shared_available = bool(getattr(props, "SharedSubscriptionAvailable", 1))
        status = fleet_filter(self.ingestor.fleet, "status")
        if self.feed is not None:
            log.info("connected to %s:%s (MQTT %s, session %s); telemetry and statuses from %s",
                     client.host, client.port, "5" if client.protocol == mqtt.MQTTv5 else "3.1.1",
                     "resumed" if flags.session_present else "new", self.feed.describe)
            if not flags.session_present:
                # the stream holds what was published since it was made: learn older statuses
                _rc, self._sweep_mid = client.subscribe(status, qos=0)
            self._subscribed(client)
            return
        use_shared = self.shared == "on" or (self.shared == "auto" and self._shared_available
                                             and client.protocol == mqtt.MQTTv5)
        telemetry = fleet_filter(self.ingestor.fleet, "telemetry")
        self.telemetry_filter = shared_filter(telemetry) if use_shared else telemetry
        if use_shared and client.protocol != mqtt.MQTTv5:
            log.warning("telemetry is subscribed as a shared subscription over MQTT 3.1.1 "
                        "(--shared on): Mosquitto serves that, but a broker without $share/ "
                        "(NATS) takes it as a literal topic and delivers nothing; use --shared "
                        "auto there")
        log.info("connected to %s:%s (MQTT %s, session %s); telemetry on %s", client.host,
                 client.port,
                 "5" if client.protocol == mqtt.MQTTv5 else "3.1.1",
                 "resumed" if flags.session_present else "new", self.telemetry_filter)
        for topic in (shared_filter(status) if use_shared else status, self.telemetry_filter):
            if topic.startswith("$share/") and client.protocol == mqtt.MQTTv5:
                # retain handling 2: no retained messages (Mosquitto 2.0 sends them to shared
                # subscriptions too, on every subscribe, up to its queue limit); the sweep does
                _rc, mid = client.subscribe(topic, options=SubscribeOptions(
                    qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND))
            else:
                _rc, mid = client.subscribe(topic, qos=1)
            self._pending_subs[mid or 0] = topic
        if use_shared and not flags.session_present:
            # retained statuses are not delivered to shared subscriptions: take them once
            _rc, self._sweep_mid = client.subscribe(status, qos=0)

    def _on_subscribe(self, client: mqtt.Client, _userdata: Any, mid: int, reasons: Any,
                      _props: Any) -> None:
        if mid == self._sweep_mid:
            # the broker has sent the retained statuses with the grant
            self._sweep_mid = None
            client.unsubscribe(fleet_filter(self.ingestor.fleet, "status"))
            self.sweeps += 1
            return
        topic = self._pending_subs.pop(mid, "?")
        failed = [r for r in reasons if r.is_failure]
        if failed and topic.startswith("$share/") and self.shared == "auto":
            plain = topic.split("/", 2)[2]
            log.warning("broker refused the shared subscription (%s); subscribing to %s",
                        failed[0], plain)
            if plain.endswith("/telemetry"):
                self.telemetry_filter = plain
            _rc, new_mid = client.subscribe(plain, qos=1)
            self._pending_subs[new_mid or 0] = plain
            return
        if failed:
            log.error("broker refused the subscription to %s: %s%s", topic, failed[0],
                      topic_hint(topic))
            return
        if not self._pending_subs:
            self._subscribed(client)

    def _subscribed(self, client: mqtt.Client) -> None:
        self.ready.set()
        client.publish(*self._status("online"))
        self.announcements += 1

    def _from_stream(self, delivery: Delivery) -> None:
        self._queue.put(_Received(0, 0, delivery.topic, delivery.payload, -1, delivery.handle))

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._queue.put(_Received(message.mid, message.qos, message.topic,
                                  bytes(message.payload), self._connection))

    def _on_disconnect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any,
                       _props: Any) -> None:
        if not self._stop.is_set():
            log.warning("disconnected from %s:%s (%s); reconnecting", client.host, client.port,
                        reason)

    # -- worker ------------------------------------------------------------------------------------

    def _take_group(self) -> list[_Received]:
        try:
            group = [self._queue.get(timeout=0.2)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.group_wait_s
        while len(group) < self.group_messages:
            remaining = deadline - time.monotonic()
            try:
                group.append(self._queue.get(timeout=remaining) if remaining > 0
                             else self._queue.get_nowait())
            except queue.Empty:
                break
        return group

    def _work(self) -> None:
        while not self._stop.is_set():
            group = self._take_group()
            if not group:
                continue
            try:
                acks = self._commit(self._parse(group))
            except Exception:
                # a bug on some input: store what can be stored, drop the rest, go on
                log.exception("ingesting a group of %d messages failed; retrying them one by one",
                              len(group))
                acks = self._one_by_one(group)
            if acks is None:
                return
            self._publish_acks(acks)
            client = self._client
            # acked even when dropped: a message that can never be stored must not come back
            # from the broker after a restart and stop ingestion again
            # a message of an earlier connection is not acked on this one, where its packet id
            # may name another message not stored yet; a resumed session delivers it again
            # (stored once: the primary key), a new one never will
            for message in group:
                if message.qos > 0 and client is not None and (
                        message.connection == self._connection):
                    client.ack(message.mid, message.qos)
            if self.feed is not None:
                self.feed.ack([m.handle for m in group if m.handle is not None])

    def _parse(self, group: list[_Received]) -> list[Parsed]:
        parsed = []
        for message in group:
            try:
                item = self.ingestor.parse(message.topic, message.payload)
            except Exception as exc:
                self._drop(message, exc)
                continue
            if item is not None:
                parsed.append(item)
        return parsed

    def _one_by_one(self, group: list[_Received]) -> dict[str, int] | None:
        acks: dict[str, int] = {}
        for message in group:
            try:
                found = self._commit(self._parse([message]))
            except Exception as exc:
                self._drop(message, exc)
                continue
            if found is None:
                return None
            for device_id, seq in found.items():
                acks[device_id] = max(acks.get(device_id, 0), seq)
        return acks

    def _drop(self, message: _Received, exc: Exception) -> None:
        self.errors += 1
        if self.errors <= 20 or self.errors % 1000 == 0:
            log.error("dropped a message on %s that raised %s (#%d)", message.topic[:200],
                      type(exc).__name__, self.errors, exc_info=exc)
        self.ingestor.reject("error", message.topic, f"{type(exc).__name__}: {exc}")

    @property
    def healthy(self) -> bool:
        """The ingest worker is alive (it restarts by itself from :meth:`run` when it died)."""
        return self._worker is not None and self._worker.is_alive()

    def _commit(self, parsed: list[Parsed]) -> dict[str, int] | None:
        delay = 0.5
        while True:
            try:
                return self.ingestor.commit(parsed) if parsed else {}
            except StoreError as exc:
                log.error("storing telemetry failed, retrying in %.1f s: %s", delay, exc)
                if self._stop.wait(delay):
                    return None
                delay = min(delay * 2, 30.0)

    def _publish_acks(self, acks: dict[str, int]) -> None:
        client = self._client
        if client is None:
            return
        for device_id, seq in acks.items():
            topic = device_topic(self.ingestor.fleet, device_id, "ack")
            client.publish(topic, encode(Ack(seq=seq)), qos=1)
