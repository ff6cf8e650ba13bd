"""Fixtures the integration tests share (services come from tests/services.py, waits and
``resources`` from tests/support.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeserve.contract import Status, decode


class Watcher:
    """A plain paho subscriber that records what arrives on a filter; subscribed (the broker
    granted it) when constructed, so nothing published afterwards is missed."""

    def __init__(self, port: int, topic: str) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = lambda _c, _u, m: self.messages.append(
            (m.topic, bytes(m.payload), bool(m.retain)))
        granted = threading.Event()
        self.client.on_subscribe = lambda *_a: granted.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        try:
            self.client.subscribe(topic, qos=1)
            # until the SUBACK, the broker may drop what is published on the filter
            assert granted.wait(10), f"the broker did not grant a subscription to {topic}"
        except BaseException:
            self.close()
            raise

    def statuses(self) -> list[Status]:
        return [decode(Status, p) for t, p, _r in self.messages if t.endswith("/status") and p]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def watcher_factory() -> Iterator[Any]:
    """``make(port, topic) -> Watcher``; every watcher made is closed after the test."""
    made: list[Watcher] = []

    def make(port: int, topic: str) -> Watcher:
        w = Watcher(port, topic)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()
