"""The embedded MQTT broker ``edgeserve fleet serve`` starts when no ``--broker`` is given.

It is rumqttd (Rust) compiled into the ``iotcore`` wheel, run as a child process that exits with
its parent. Why this one (measured, see docs/telemetry.md): it speaks MQTT 5 (session expiry,
shared subscriptions) as well as 3.1.1, queues QoS 1 messages for offline persistent sessions of
anonymous clients, leaves the retain flag of queued messages alone, and moved about 4x as many
2 KB QoS 1 messages per second as amqtt (pure Python, 3.1.1 only, in the fleet's own process and
GIL), while using the second core instead of the ingestion's.

rumqttd serves one protocol version per listener, so there are two: MQTT 5 on ``port`` and MQTT
3.1.1 on ``port + 1`` (agents try 5 and fall back to 3.1.1 by themselves). Both listen on
127.0.0.1 unless told otherwise. It keeps sessions and retained messages in memory only: a
restart forgets them, and the agents' outboxes re-send what the fleet has not acked.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from edgeserve.contract import MAX_PAYLOAD_BYTES
from edgeserve.errors import BrokerError, ConfigError

__all__ = ["EmbeddedBroker"]

log = logging.getLogger(__name__)

_CONFIG = """\
id = 0

[router]
id = 0
max_connections = {max_connections}
max_outgoing_packet_count = 200
max_segment_size = {segment_bytes}
max_segment_count = 10

[v5.1]
name = "v5-1"
listen = "{host}:{port}"
next_connection_delay_ms = 1
    [v5.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = {max_payload}
    max_inflight_count = {max_inflight}

[v4.1]
name = "v4-1"
listen = "{host}:{port_v311}"
next_connection_delay_ms = 1
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = {max_payload}
    max_inflight_count = {max_inflight}
    dynamic_filters = true
"""


class EmbeddedBroker:
    """Start/stop an in-package MQTT broker (MQTT 5 on ``port``, 3.1.1 on ``port_v311``)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883, port_v311: int | None = None,
                 max_connections: int = 10_000, max_inflight: int = 1000,
                 segment_bytes: int = 100 * 2**20) -> None:
        self.host = host
        self.port = port
        self.port_v311 = port + 1 if port_v311 is None else port_v311
        self._dir = tempfile.TemporaryDirectory(prefix="edgeserve-broker-")
        self.config_path = Path(self._dir.name) / "rumqttd.toml"
        self.config_path.write_text(_CONFIG.format(
            host=host, port=port, port_v311=self.port_v311, max_connections=max_connections,
            # room for the largest contract payload plus topic and MQTT headers
            max_payload=MAX_PAYLOAD_BYTES + 65536, max_inflight=max_inflight,
            segment_bytes=segment_bytes))
        self._broker: object | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        try:
            from iotcore import Broker
        except ImportError:
            raise ConfigError("the embedded MQTT broker needs the 'iotcore' package (pip install "
                              "'edgeserve[fleet]'), or pass --broker mqtt://HOST:PORT") from None
        broker = Broker(config_path=str(self.config_path))
        try:
            broker.start(timeout=timeout)
        except OSError as exc:
            raise ConfigError(f"cannot start the embedded MQTT broker on {self.host}:{self.port} "
                              f"and :{self.port_v311}: {exc}; another broker may be running "
                              f"there (then pass --broker mqtt://{self.host}:{self.port}), or "
                              "choose --broker-port") from None
        except RuntimeError as exc:
            raise BrokerError(f"the embedded MQTT broker did not start: {exc}") from None
        self._broker = broker
        log.info("embedded MQTT broker listening on %s:%d (MQTT 5) and :%d (MQTT 3.1.1)",
                 self.host, self.port, self.port_v311)
        return self

    def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            broker.stop()  # type: ignore[attr-defined]

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
