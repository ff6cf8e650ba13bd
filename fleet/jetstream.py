"""Telemetry and device statuses from a NATS JetStream stream: fleet workers as competing consumers.

NATS's MQTT listener has no ``$share/`` (2.9), so on a NATS cluster several fleet workers cannot
split an MQTT subscription. They split a JetStream consumer instead: every message devices publish
over MQTT to ``edgeserve/v1/{fleet}/devices/+/telemetry`` or ``…/status`` is also a NATS message on
the subject ``edgeserve.v1.{fleet}.devices.*.telemetry`` (``/`` becomes ``.``), and a stream on
those subjects keeps it. All workers pull from one durable consumer of that stream, so each
message goes to one worker; one that does not acknowledge it within ``ack_wait_s`` (killed -9,
say) sees it handed to another worker. The stream is a work queue (a message is deleted once
acknowledged), replicated on up to three nodes, so a node killed mid-storm loses nothing.

Exactly once, as over MQTT: a worker stores a group in one transaction, publishes the devices'
acks, and only then acknowledges the group's JetStream messages; a message redelivered after a
crash lands on rows already stored (the primary key) and is acked again.

The feed runs nats-py on an asyncio loop of its own thread and hands messages to the service's
ingest queue (a plain :class:`queue.Queue`) with a callable :meth:`JetStreamFeed.ack` for after
the commit. It pulls only while the service's queue holds less than two groups, so a slow
database holds messages in the stream, where a crash cannot lose them, not in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from edgeserve.contract import TOPIC_ROOT
from edgeserve.errors import BrokerError

__all__ = ["CONSUMER", "JetStreamFeed", "JetStreamSettings", "stream_name", "stream_subjects"]

log = logging.getLogger(__name__)

CONSUMER = "edgeserve-fleet"
"""The durable consumer every worker of a fleet pulls from."""


@dataclass(frozen=True)
class JetStreamSettings:
    servers: tuple[str, ...]
    """NATS client URLs (``nats://host:4222``); the client fails over between them and the
    servers the cluster announces"""
    replicas: int = 3
    """stream and consumer replicas; fewer when the cluster has fewer servers"""
    ack_wait_s: float = 10.0
    """a message a worker took but did not acknowledge within this goes to another worker (a
    worker holds at most three groups of messages, each committed in well under a second; a
    copy delivered twice is stored once)"""
    max_ack_pending: int = 20_000
    max_age_s: float = 7 * 86400.0
    """what no worker acknowledged is dropped after this (devices resend unacked windows)"""
    username: str | None = None
    password: str | None = None


def stream_name(fleet: str) -> str:
    """``EDGESERVE_{fleet}``, with every character a stream name may not hold replaced."""
    return "EDGESERVE_" + re.sub(r"[^A-Za-z0-9_-]", "_", fleet)


def stream_subjects(fleet: str) -> list[str]:
    if "." in fleet:
        raise BrokerError(f"fleet name {fleet!r} has a '.', which NATS takes as a subject "
                          "separator; use a fleet name without '.' on NATS")
    root = TOPIC_ROOT.replace("/", ".")
    return [f"{root}.{fleet}.devices.*.telemetry", f"{root}.{fleet}.devices.*.status"]


@dataclass(frozen=True)
class Delivery:
    """One message taken from the stream: its MQTT topic, payload and the handle to ack it."""

    topic: str
    payload: bytes
    handle: Any


class JetStreamFeed:
    """Pulls a fleet's device messages from JetStream into ``put``; start/stop; thread-safe ack."""

    def __init__(self, settings: JetStreamSettings, fleet: str, client_name: str,
                 put: Callable[[Delivery], None], backlog: Callable[[], int],
                 batch: int = 400) -> None:
        self.settings = settings
        self.fleet = fleet
        self.client_name = client_name
        self.subjects = stream_subjects(fleet)
        self.stream = stream_name(fleet)
        self.put = put
        self.backlog = backlog
        self.batch = batch
        self.resumed = False
        """the consumer existed before this worker started: the stream kept what devices sent"""
        self.replicas = settings.replicas
        self.delivered = 0
        self.redelivered = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopping: asyncio.Event | None = None
        self._nc: Any = None

    @property
    def describe(self) -> str:
        return f"jetstream:{self.stream}/{CONSUMER}"

    def start(self, timeout: float = 60.0) -> JetStreamFeed:
        self._thread = threading.Thread(target=self._run, name="fleet-jetstream", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise BrokerError(f"NATS at {', '.join(self.settings.servers)} did not answer within "
                              f"{timeout:.0f} s")
        if self._error is not None:
            self.stop()
            raise BrokerError(f"NATS JetStream at {', '.join(self.settings.servers)}: "
                              f"{self._error}") from self._error
        return self

    def stop(self) -> None:
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopping.set)
        if self._thread is not None:
            self._thread.join(15)

    def ack(self, handles: Sequence[Any]) -> None:
        """Acknowledge messages (after their group is committed and the devices are acked)."""
        loop = self._loop
        if not handles or loop is None or loop.is_closed():
            return

        async def ack_all() -> None:
            for handle in handles:
                try:
                    await handle.ack()
                except Exception as exc:  # a lost ack: the message comes again, stored once
                    log.warning("acknowledging a JetStream message failed: %s", exc)
                    return

        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(ack_all(), loop)

    # -- the loop thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()
            else:
                log.exception("the JetStream feed stopped")
        finally:
            loop.close()

    async def _main(self) -> None:
        import nats
        from nats.errors import TimeoutError as NatsTimeout

        self._stopping = asyncio.Event()

        async def on_disconnected() -> None:
            log.warning("disconnected from NATS; reconnecting")

        async def on_reconnected() -> None:
            log.info("reconnected to NATS at %s", self._nc.connected_url.netloc
                     if self._nc and self._nc.connected_url else "?")

        async def on_error(exc: Exception) -> None:
            log.warning("NATS: %s", exc)

        self._nc = await nats.connect(
            list(self.settings.servers), name=self.client_name, max_reconnect_attempts=-1,
            reconnect_time_wait=0.5, connect_timeout=5, allow_reconnect=True,
            user=self.settings.username, password=self.settings.password,
            disconnected_cb=on_disconnected, reconnected_cb=on_reconnected, error_cb=on_error)
        try:
            js = self._nc.jetstream(timeout=10)
            await self._ensure(js)
            subscription = await js.pull_subscribe_bind(CONSUMER, self.stream)
            log.info("pulling %s from NATS JetStream (%d replica%s, consumer %s)",
                     " and ".join(self.subjects), self.replicas,
                     "" if self.replicas == 1 else "s", "resumed" if self.resumed else "new")
            self._ready.set()
            while not self._stopping.is_set():
                if self.backlog() >= 2 * self.batch:
                    await asyncio.sleep(0.01)
                    continue
                try:
                    messages = await subscription.fetch(self.batch, timeout=1.0)
                except (TimeoutError, NatsTimeout):
                    continue
                except Exception as exc:  # a node going away, a leader election: try again
                    log.warning("fetching from JetStream failed: %s; retrying", exc)
                    await asyncio.sleep(0.5)
                    continue
                for message in messages:
                    self.delivered += 1
                    metadata = message.metadata
                    if metadata is not None and metadata.num_delivered > 1:
                        self.redelivered += 1
                    self.put(Delivery(message.subject.replace(".", "/"), message.data, message))
        finally:
            with contextlib.suppress(Exception):
                await self._nc.drain()

    async def _ensure(self, js: Any) -> None:
        """Make (or find) the fleet's stream and the shared consumer."""
        from nats.js.api import RetentionPolicy, StorageType, StreamConfig
        from nats.js.errors import NotFoundError

        try:
            await js.stream_info(self.stream)
        except NotFoundError:
            for replicas in dict.fromkeys((self.settings.replicas, 1)):
                config = StreamConfig(
                    name=self.stream, subjects=self.subjects,
                    retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
                    num_replicas=replicas, max_age=self.settings.max_age_s,
                    description=f"edgeserve fleet {self.fleet}: device telemetry and status")
                try:
                    await js.add_stream(config)
                    self.replicas = replicas
                    break
                except Exception as exc:
                    if "already in use" in str(exc).lower():
                        break  # another worker made it at the same moment
                    if replicas == 1 or "insufficient resources" not in str(exc).lower():
                        raise
                    log.warning("NATS cannot keep %d replicas (%s); making the stream with 1",
                                replicas, exc)
        try:
            await js.consumer_info(self.stream, CONSUMER)
            self.resumed = True
        except NotFoundError:
            await self._add_consumer(js)

    async def _add_consumer(self, js: Any) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        config = ConsumerConfig(
            durable_name=CONSUMER, ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL, ack_wait=self.settings.ack_wait_s,
            max_ack_pending=self.settings.max_ack_pending, max_waiting=512,
            description="edgeserve fleet workers (competing consumers)")
        try:
            await js.add_consumer(self.stream, config)
        except Exception as exc:
            try:  # another worker made it at the same moment
                await js.consumer_info(self.stream, CONSUMER)
            except Exception:
                raise exc from None
