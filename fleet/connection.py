"""How the fleet reaches its MQTT broker: URL, credentials, TLS, protocol version.

``mqtt://[user[:password]@]host[:port]`` (default port 1883) or ``mqtts://…`` (TLS, default port
8883). Options given separately (``--username``, ``--ca-file`` …) override the URL's.
:func:`connect` opens a paho client and waits for the broker's CONNACK, trying MQTT 5 first and
MQTT 3.1.1 when the broker refuses version 5 (``protocol="auto"``).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edgeserve.errors import BrokerError, ConfigError

__all__ = ["BrokerSettings", "BrokerUnreachableError", "Protocol", "connect"]

Protocol = Literal["auto", "5", "3.1.1"]
_VERSIONS: dict[str, MQTTProtocolVersion] = {"5": MQTTProtocolVersion.MQTTv5,
                                            "3.1.1": MQTTProtocolVersion.MQTTv311}


class BrokerUnreachableError(BrokerError):
    """No TCP/TLS connection to the broker (worth retrying, unlike a refused CONNECT)."""


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

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> BrokerSettings:
        """Parse ``mqtt[s]://[user[:pass]@]host[:port]``; non-None ``overrides`` win."""
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
        settings = cls(host=parts.hostname, port=port, tls=tls,
                       username=unquote(parts.username) if parts.username else None,
                       password=unquote(parts.password) if parts.password else None)
        given = {k: v for k, v in overrides.items() if v is not None}
        if given.get("ca_file") or given.get("cert_file"):
            given.setdefault("tls", True)
        return replace(settings, **given).checked()

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
        return self

    @property
    def url(self) -> str:
        """The broker URL without credentials (for logs and messages)."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


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
        client = new_client(settings, client_id, _VERSIONS[name], manual_ack)
        prepare(client)
        outcome = _handshake(client, settings, connect_properties(_VERSIONS[name]), timeout)
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
