"""How the fleet connects to its MQTT broker (settings: :mod:`edgeserve.mqtt`).

:func:`connect` opens a paho client and waits for the broker's CONNACK, trying MQTT 5 first and
MQTT 3.1.1 when the broker refuses version 5 (``protocol="auto"``).

With several broker nodes (:attr:`BrokerSettings.nodes`) it connects to the first that answers,
and the client it returns fails over by itself: when paho's automatic reconnect (``loop_start``)
cannot reach its node, or the node refuses the CONNECT, the next attempt goes to the next node
(in turn, round and round). A node that drops the connection is tried once more first.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTProtocolVersion

from edgeserve.errors import BrokerError
from edgeserve.mqtt import VERSIONS, BrokerSettings, new_client, topic_hint

__all__ = ["BrokerSettings", "BrokerUnreachableError", "connect", "fail_over"]

log = logging.getLogger(__name__)


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
    the CONNECT properties for a protocol version (None for 3.1.1). With several nodes, each is
    tried in turn: :class:`BrokerUnreachableError` when none could be reached, else
    :class:`BrokerError` naming why each refused.
    """
    unreachable: list[str] = []
    refused: list[str] = []
    for index in range(len(settings.nodes)):
        try:
            client = _connect_node(settings, index, client_id, prepare, connect_properties,
                                   timeout, manual_ack)
        except BrokerUnreachableError as exc:
            unreachable.append(str(exc))
            continue
        except BrokerError as exc:
            refused.append(str(exc))
            continue
        if index:
            log.warning("connected to broker node %s (the nodes before it failed: %s)",
                        settings.node_url(index), "; ".join(unreachable + refused))
        _follow_nodes(client, settings, index)
        return client
    if refused:
        raise BrokerError("; ".join(refused + unreachable))
    raise BrokerUnreachableError("; ".join(unreachable))


def _connect_node(settings: BrokerSettings, index: int, client_id: str,
                  prepare: Callable[[mqtt.Client], None],
                  connect_properties: Callable[[MQTTProtocolVersion], Any], timeout: float,
                  manual_ack: bool) -> mqtt.Client:
    versions = ["5", "3.1.1"] if settings.protocol == "auto" else [settings.protocol]
    last = "no attempt"
    url = settings.node_url(index)
    for name in versions:
        client = new_client(settings, client_id, VERSIONS[name], manual_ack)
        prepare(client)
        outcome = _handshake(client, settings, index, connect_properties(VERSIONS[name]),
                             timeout)
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
    will = getattr(client, "_will_topic", b"") or b""  # closed at once: NATS and a '.' in it
    hint = topic_hint(will.decode(errors="replace")) if "closed before" in last else ""
    raise BrokerError(f"the MQTT broker at {url} refused the connection ({last}); "
                      f"check --broker, credentials and TLS options{hint}")


@dataclass
class _Nodes:
    settings: BrokerSettings
    index: int
    misses: int = 0
    """nodes failed in a row since the last successful connect"""


def _follow_nodes(client: mqtt.Client, settings: BrokerSettings, index: int) -> None:
    """Make paho's automatic reconnect go to the next node when it cannot reach its own."""
    if len(settings.nodes) < 2:
        return
    nodes = _Nodes(settings, index)
    client._edgeserve_nodes = nodes  # type: ignore[attr-defined]
    inner: Any = client.on_connect

    def on_connect(c: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            nodes.misses = 0
        if inner is not None:
            inner(c, userdata, flags, reason, props)

    def on_connect_fail(c: mqtt.Client, _userdata: Any) -> None:
        fail_over(c, "unreachable")

    client.on_connect = on_connect
    client.on_connect_fail = on_connect_fail


def fail_over(client: mqtt.Client, why: str) -> None:
    """Point ``client``'s next (automatic) reconnect at the next broker node, if it has
    several; call it when the node refused the CONNECT (it is called by itself when the node
    cannot be reached). Within the first round of nodes after a lost connection the next one is
    tried after paho's shortest reconnect delay; the delay grows only between rounds."""
    nodes: _Nodes | None = getattr(client, "_edgeserve_nodes", None)
    if nodes is None:
        return
    settings, index = nodes.settings, nodes.index
    following = (index + 1) % len(settings.nodes)
    # paho's host/port setters refuse while a reconnect is under way; its reconnect() reads
    # these two attributes, and the delay before the next attempt from _reconnect_delay
    client._host, client._port = settings.nodes[following]
    nodes.index = following
    nodes.misses += 1
    if nodes.misses % len(settings.nodes):
        client._reconnect_delay = None
    log.warning("broker node %s %s; trying %s next", settings.node_url(index), why,
                settings.node_url(following))


def _close(client: mqtt.Client) -> None:
    try:
        client.disconnect()
        client.loop(timeout=0.01)
    except (OSError, ValueError):
        pass


def _handshake(client: mqtt.Client, settings: BrokerSettings, index: int, properties: Any,
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
        host, port = settings.nodes[index]
        client.connect(host, port, settings.keepalive,
                       clean_start=(False if client.protocol == mqtt.MQTTv5
                                    else mqtt.MQTT_CLEAN_START_FIRST_ONLY),
                       properties=properties)
    except (OSError, ssl.SSLError) as exc:
        client.on_connect, client.on_disconnect = previous_connect, previous_disconnect
        raise BrokerUnreachableError(f"cannot reach the MQTT broker at "
                                     f"{settings.node_url(index)}: {exc}") from None
    while outcome.reason is None and not outcome.closed and time.monotonic() < deadline:
        client.loop(timeout=0.1)
    client.on_connect, client.on_disconnect = previous_connect, previous_disconnect
    return outcome
