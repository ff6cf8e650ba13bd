"""The test services themselves (tests/services.py): a private PostgreSQL where none listens, a
Mosquitto that never comes up is not left running, retained messages are cleared."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeserve.contract import TOPIC_ROOT, device_topic
from tests.services import (
    MosquittoProcess,
    clear_retained,
    free_port,
    port_open,
    postgres_at,
    unique_name,
)

pytestmark = pytest.mark.integration


@pytest.mark.slow
def test_a_private_postgresql_is_started_where_none_listens() -> None:
    """Pointed at a port nothing listens on, the fixture's resolver starts its own cluster
    (initdb, as the postgres user under root), serves queries from it, and removes it after."""
    import psycopg

    unused = free_port()
    with postgres_at(f"postgresql://postgres@127.0.0.1:{unused}/test") as url:
        assert f":{unused}/" not in url
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (x int)")
            conn.execute("INSERT INTO t VALUES (41), (1)")
            assert conn.execute("SELECT sum(x), current_database() FROM t").fetchone() == (
                42, "test")
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        owners = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "postgres"
                  and any(c.laddr.port == port for c in _listening(p))]
        assert owners, "no postgres process listens on the private port"
    assert not port_open("127.0.0.1", port)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in owners)


def _listening(process: psutil.Process) -> list[Any]:
    try:
        return [c for c in process.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        return []


@pytest.mark.slow
def test_a_mosquitto_that_never_listens_is_killed() -> None:
    """start() gives up after its deadline when the port never opens, and the process it
    started is gone (not left holding its config and port)."""
    if not shutil.which("mosquitto") and not Path("/usr/sbin/mosquitto").exists():
        pytest.skip("mosquitto is not installed")
    workdir = Path(tempfile.mkdtemp(prefix="es-mosq-"))
    workdir.chmod(0o755)  # run as root, mosquitto reads its config as the mosquitto user
    try:
        # it listens on one port while start() waits for another: "slow to come up", forever
        config = workdir / "mosquitto.conf"
        config.write_text(f"listener {free_port()} 127.0.0.1\nallow_anonymous true\n")
        config.chmod(0o644)
        proc = MosquittoProcess(free_port(), workdir, config)
        with pytest.raises(RuntimeError, match="did not start listening"):
            proc.start()
        assert proc.process is None
        assert not _running_with(str(config))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _running_with(argument: str) -> list[psutil.Process]:
    """Live processes with ``argument`` on their command line."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        if argument in (process.info["cmdline"] or []) and \
                process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


def test_retained_messages_under_a_fleet_are_cleared(mqtt_broker: tuple[str, int]) -> None:
    """clear_retained empties every retained topic under a fleet's filter and nothing beside
    it; a later subscriber then receives none (checked after a sentinel, not after a sleep)."""
    host, port = mqtt_broker
    mine, other = unique_name("fleet"), unique_name("fleet")
    topics = [device_topic(mine, f"d{i}", kind) for i in range(3) for kind in ("status", "desired")]
    kept = device_topic(other, "d0", "status")
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    publisher.connect(host, port)
    publisher.loop_start()
    try:
        for topic in [*topics, kept]:
            publisher.publish(topic, b"{}", qos=1, retain=True).wait_for_publish(10)
        assert sorted(clear_retained(host, port, f"{TOPIC_ROOT}/{mine}/#")) == sorted(topics)
        assert clear_retained(host, port, f"{TOPIC_ROOT}/{mine}/#") == []
        assert clear_retained(host, port, f"{TOPIC_ROOT}/{other}/#") == [kept]
    finally:
        publisher.disconnect()
        publisher.loop_stop()
