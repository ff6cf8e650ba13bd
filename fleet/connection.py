"""How the fleet connects to its MQTT broker (settings: :mod:`edgeserve.mqtt`).

:func:`connect` opens a paho client and waits for the broker's CONNACK, trying MQTT 5 first and
MQTT 3.1.1 when the broker refuses version 5 (``protocol="auto"``).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTProtocolVersion

from edgeserve.errors import BrokerError
from edgeserve.mqtt import VERSIONS, BrokerSettings, new_client

__all__ = ["BrokerSettings", "BrokerUnreachableError", "connect"]


class BrokerUnreachableError(BrokerError):
    """No TCP/TLS connection to the broker (worth retrying, unlike a refused CONNECT)."""


@dataclass
class _Outcome:
    reason: Any = None
    closed: bool = False


def connect(settings: BrokerSettings, client_id: str, prepare: Callable[[mqtt.Client], None],
            connect_properties: Callable[[MQTTProtocolVersion], Any], timeout: float = 15.0,
            manual_ack: bool = False) -> mqtt.Client:
    """Connect (persistent session) and return the client once CONNACK said success.

    ``prepare`` sets callbacks and the Last Will on each new client; ``connect_properties`` gives
    the CONNECT properties for a protocol version (None for 3.1.1).
    """
    versions = ["5", "3.1.1"] if settings.protocol == "auto" else [settings.protocol]
    last = "no attempt"
    for name in versions:
        client = new_client(settings, client_id, VERSIONS[name], manual_ack)
        prepare(client)
        outcome = _handshake(client, settings, connect_properties(VERSIONS[name]), timeout)
        if outcome.reason is not None and not outcome.reason.is_failure:
            # client.loop() made a wake-up socket pair; loop_start() makes its own and would
            # leak this one (an unclosed-socket ResourceWarning), so close it now.
            client._reset_sockets(sockpair_only=True)
            return client
        _close(client)
        last = (f"MQTT {name}: " + ("connection closed before CONNACK" if outcome.reason is None
                                    else str(outcome.reason)))
        refused = outcome.reason is not None and str(outcome.reason) in (
            "Not authorized", "Bad user name or password", "Client identifier not valid",
            "Banned")
        if refused:
            break
    raise BrokerError(f"the MQTT broker at {settings.url} refused the connection ({last}); "
                      "check --broker, credentials and TLS options")


def _close(client: mqtt.Client) -> None:
    try:
        client.disconnect()
        client.loop(timeout=0.01)
    except (OSError, ValueError):
        pass


def _handshake(client: mqtt.Client, settings: BrokerSettings, properties: Any,
               timeout: float) -> _Outcome:
    outcome = _Outcome()
    previous_connect: Any = client.on_connect
    previous_disconnect: Any = client.on_disconnect

    def on_connect(c: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        outcome.reason = reason
        if previous_connect is not None:
            previous_connect(c, userdata, flags, reason, props)

    def on_disconnect(c: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        outcome.closed = True
        if previous_disconnect is not None:
            previous_disconnect(c, userdata, flags, reason, props)

    client.on_connect, client.on_disconnect = on_connect, on_disconnect
    deadline = time.monotonic() + timeout
    try:
        client.connect(settings.host, settings.port, settings.keepalive,
                       clean_start=(False if client.protocol == mqtt.MQTTv5
                                    else mqtt.MQTT_CLEAN_START_FIRST_ONLY),
                       properties=properties)
    except (OSError, ssl.SSLError) as exc:
        client.on_connect, client.on_disconnect = previous_connect, previous_disconnect
        raise BrokerUnreachableError(f"cannot reach the MQTT broker at {settings.url}: {exc}"
                                     ) from None
    while outcome.reason is None and not outcome.closed and time.monotonic() < deadline:
        client.loop(timeout=0.1)
    client.on_connect, client.on_disconnect = previous_connect, previous_disconnect
    return outcome
