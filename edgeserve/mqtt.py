"""How agents and the fleet reach an MQTT broker: URL, credentials, TLS, protocol version.

``mqtt://[user[:password]@]host[:port]`` (default port 1883) or ``mqtts://…`` (TLS, default port
8883). Options given separately (``--username``, ``--ca-file`` …) override the URL's. Several
URLs (a comma list, or ``--broker`` repeated) name the nodes of one broker cluster, or standby
brokers: clients connect to the first that answers and fail over to the next when theirs dies
(:attr:`BrokerSettings.nodes`); all of them share one scheme, credentials and TLS files. This module
only describes the broker and builds paho clients (callback API v2); the agent's link and the
fleet's services drive their connections (:func:`pump` is one turn of such a loop). It needs
paho-mqtt (the ``agent`` and ``fleet`` extras).
"""

from __future__ import annotations

import re
import select
import ssl
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from .errors import ConfigError

__all__ = ["VERSIONS", "BrokerSettings", "Protocol", "new_client", "pump", "topic_hint"]

Protocol = Literal["auto", "5", "3.1.1"]
VERSIONS: dict[str, MQTTProtocolVersion] = {"5": MQTTProtocolVersion.MQTTv5,
                                            "3.1.1": MQTTProtocolVersion.MQTTv311}


@dataclass(frozen=True)
class BrokerSettings:
    """Where and how to connect. ``protocol`` "auto" = MQTT 5, falling back to 3.1.1."""

    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls_insecure: bool = False
    protocol: Protocol = "auto"
    keepalive: int = 30
    fallbacks: tuple[tuple[str, int], ...] = ()
    """Further nodes (host, port) after ``host:port``, tried in order when it fails."""
    subscribe_qos: int = 1
    """A device's subscriptions' QoS. 0 loses nothing of the contract (what a device is sent is
    retained state, or the answer to a request it repeats until answered: acks, file chunks)
    and, on NATS, spares each subscription its JetStream consumer (docs/scale-out.md)."""

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> BrokerSettings:
        """Parse ``mqtt[s]://[user[:pass]@]host[:port]``, or several such URLs separated by
        commas (or spaces): the nodes of one broker, tried in order. Non-None ``overrides``
        win."""
        urls = [part for part in re.split(r"[,\s]+", url.strip()) if part]
        if not urls:
            raise ConfigError("no broker URL given; expected mqtt://HOST[:PORT] or several "
                              "separated by commas")
        return cls.from_urls(urls, **overrides)

    @classmethod
    def from_urls(cls, urls: Sequence[str], **overrides: Any) -> BrokerSettings:
        """The nodes of one broker (``--broker`` repeated), each ``mqtt[s]://…``; they must
        agree on the scheme and on any credentials they carry."""
        if not urls:
            raise ConfigError("no broker URL given; expected mqtt://HOST[:PORT]")
        nodes = [cls._parse(url) for url in urls]
        first = nodes[0]
        credentials: tuple[str | None, str | None, str] | None = None
        seen: set[tuple[str, int]] = set()
        for url, node in zip(urls, nodes, strict=True):
            if node.tls != first.tls:
                raise ConfigError(f"broker URL {url!r} does not use the scheme of {urls[0]!r}; "
                                  "give every node of one broker mqtt:// or every one mqtts://")
            if node.username is not None:
                if credentials is None:
                    credentials = (node.username, node.password, url)
                elif credentials[:2] != (node.username, node.password):
                    raise ConfigError(f"broker URL {url!r} carries other credentials than "
                                      f"{credentials[2]!r}; every node takes the same ones (or "
                                      "give them once, with --username/--password)")
            if (node.host, node.port) in seen:
                raise ConfigError(f"broker {node.host}:{node.port} is given twice")
            seen.add((node.host, node.port))
        settings = replace(first, fallbacks=tuple((n.host, n.port) for n in nodes[1:]))
        if credentials is not None:
            settings = replace(settings, username=credentials[0], password=credentials[1])
        given = {k: v for k, v in overrides.items() if v is not None}
        if given.get("ca_file") or given.get("cert_file"):
            given.setdefault("tls", True)
        return replace(settings, **given).checked()

    @classmethod
    def _parse(cls, url: str) -> BrokerSettings:
        parts = urlsplit(url.strip())
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
            raise ConfigError(f"broker URL {url!r} is not valid; expected mqtt://HOST[:PORT] or "
                              "mqtts://HOST[:PORT] (user:password@ optional)")
        if parts.path not in ("", "/"):
            raise ConfigError(f"broker URL {url!r} has a path; expected mqtt://HOST[:PORT]")
        tls = parts.scheme in ("mqtts", "ssl")
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError:
            raise ConfigError(f"broker URL {url!r} has an invalid port") from None
        return cls(host=parts.hostname, port=port, tls=tls,
                   username=unquote(parts.username) if parts.username else None,
                   password=unquote(parts.password) if parts.password else None)

    def checked(self) -> BrokerSettings:
        for what in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, what)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{what.replace('_', ' ')} {path} does not exist or is not a "
                                  "file; expected a PEM file")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("a client certificate needs both --cert-file and --key-file")
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise ConfigError(f"MQTT version {self.protocol!r} is not supported; expected auto, "
                              "5 or 3.1.1")
        if self.subscribe_qos not in (0, 1):
            raise ConfigError(f"subscription QoS {self.subscribe_qos!r} is not supported; "
                              "expected 0 or 1")
        return self

    @property
    def nodes(self) -> tuple[tuple[str, int], ...]:
        """Every node (host, port), in the order they are tried."""
        return ((self.host, self.port), *self.fallbacks)

    def starting_at(self, index: int) -> BrokerSettings:
        """The same nodes, tried from node ``index`` on (to spread connections over them)."""
        nodes = self.nodes
        index %= len(nodes)
        (host, port), *rest = nodes[index:] + nodes[:index]
        return replace(self, host=host, port=port, fallbacks=tuple(rest))

    def node_url(self, index: int) -> str:
        """The URL of node ``index`` without credentials (for logs and messages)."""
        host, port = self.nodes[index % len(self.nodes)]
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{port}"

    @property
    def url(self) -> str:
        """The broker URL(s) without credentials (for logs and messages), comma-separated."""
        return ",".join(self.node_url(i) for i in range(len(self.nodes)))


def topic_hint(topic: str) -> str:
    """What may be wrong with ``topic`` on brokers stricter than MQTT itself ("" if nothing):
    NATS's MQTT listener (2.9) refuses ``.`` in a topic level - it refuses such a subscription
    and closes the connection of a client publishing to one."""
    if "." in topic:
        return (f"; if the broker is NATS: its MQTT listener refuses '.' in topics ({topic}), "
                "so fleet names and device ids used with it must not contain dots")
    return ""


def new_client(settings: BrokerSettings, client_id: str, version: MQTTProtocolVersion,
               manual_ack: bool = False) -> mqtt.Client:
    """A configured, unconnected paho client (callback API v2)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=version,
                         clean_session=False if version != mqtt.MQTTv5 else None,
                         manual_ack=manual_ack)
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls:
        client.tls_set(ca_certs=str(settings.ca_file) if settings.ca_file else None,
                       certfile=str(settings.cert_file) if settings.cert_file else None,
                       keyfile=str(settings.key_file) if settings.key_file else None,
                       cert_reqs=ssl.CERT_REQUIRED)
        if settings.tls_insecure:
            client.tls_insecure_set(True)
    return client


def pump(client: mqtt.Client, timeout: float,
         lock: AbstractContextManager[Any] | None = None) -> MQTTErrorCode:
    """One turn of a client's network loop on the caller's thread: wait up to ``timeout``
    seconds for its socket, then read, write and keep alive - what ``client.loop()`` does, but
    waiting with ``poll()``.

    Without paho's own thread (``loop_start``), ``client.publish`` from another thread writes
    to the socket at once, and two threads writing at the same time can interleave two
    packets' bytes when a send is partial. Give ``lock`` (an ``RLock``) and hold it around
    every ``publish``/``subscribe`` made from other threads: the reads, writes and callbacks
    here run with it held; the wait does not.

    ``client.loop()`` waits with ``select()``, which cannot watch a descriptor numbered 1024 or
    more: in a process with that many files and sockets open (an app or gateway embedding the
    agent, a simulation of hundreds of devices) every connection attempt then fails as "closed
    before CONNACK". Where ``poll()`` does not exist (Windows), this is ``client.loop()``.
    """
    sock = client.socket()
    if sock is None:
        return MQTTErrorCode.MQTT_ERR_NO_CONN
    if not hasattr(select, "poll"):
        return client.loop(timeout)
    readable = writable = False
    # bytes TLS has decrypted already are not visible to poll(): read them without waiting
    if getattr(sock, "pending", lambda: 0)() > 0:
        readable = True
    else:
        poller = select.poll()
        want_write = client.want_write()
        poller.register(sock, select.POLLIN | (select.POLLOUT if want_write else 0))
        try:
            events = poller.poll(max(0.0, timeout) * 1000.0)
        except (OSError, ValueError):  # the socket was closed under us
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        for _, mask in events:
            # a hang-up or error is "readable": the read finds it and reports the lost connection
            readable = bool(mask & (select.POLLIN | select.POLLERR | select.POLLHUP))
            writable = bool(mask & select.POLLOUT)
    with lock if lock is not None else nullcontext():
        if readable:
            rc = client.loop_read()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or client.socket() is None:
                return rc
        if writable or client.want_write():
            rc = client.loop_write()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or client.socket() is None:
                return rc
        return client.loop_misc()
