"""Acceptance: 300 devices × 200 windows recorded offline reconnect together; the store ends up
with exactly 60,000 windows (none lost, none duplicated), on SQLite and on PostgreSQL, also when
the broker restarts, the fleet is SIGKILLed and an agent process is SIGKILLed mid-flush."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.integration.telemetry_support import FleetProcess, Swarm, fill_outboxes, store_counts
from tests.services import MosquittoProcess
from tests.support import wait_for_count

DEVICES = 300
WINDOWS = 200
PROCESSES = 3
# a 60,000-window storm waits up to 240 s for the swarm; the default timeout is 300 s
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="session")
def offline_outboxes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 outboxes of 200 windows each, recorded once (tests copy them)."""
    root = tmp_path_factory.mktemp("storm-outboxes")
    fill_outboxes(root, [f"dev{i:03d}" for i in range(DEVICES)], WINDOWS)
    return root


def _groups() -> list[list[str]]:
    ids = [f"dev{i:03d}" for i in range(DEVICES)]
    return [ids[i::PROCESSES] for i in range(PROCESSES)]


def _assert_exact(db: str) -> None:
    counts = store_counts(db)
    assert counts["total"] == DEVICES * WINDOWS
    assert len(counts["devices"]) == DEVICES
    assert set(counts["devices"].values()) == {(WINDOWS, 1, WINDOWS)}
    assert set(counts["acked"].values()) == {WINDOWS}


def _storm(tmp_path: Path, outboxes: Path, db: str, port: int, fleet: str) -> None:
    work = tmp_path / "outboxes"
    shutil.copytree(outboxes, work)
    fleet_proc = FleetProcess(fleet, db, f"mqtt://127.0.0.1:{port}")
    swarm = Swarm(work, port, fleet, _groups())
    try:  # started inside: the finally stops whatever did start
        fleet_proc.start()
        swarm.start()
        results = swarm.wait(timeout=240)
    finally:
        swarm.terminate()
        stats = fleet_proc.stop() if fleet_proc.process else {}
    assert all(r["done"] for r in results)
    assert stats["windows_stored"] == DEVICES * WINDOWS
    assert stats["rejected_total"] == 0
    _assert_exact(db)


def test_reconnect_storm_sqlite(tmp_path: Path, offline_outboxes: Path,
                                mqtt_broker: tuple[str, int], fleet_name: str) -> None:
    """300×200 windows flushed at once land exactly once in SQLite, and every device is acked."""
    _storm(tmp_path, offline_outboxes, f"sqlite:///{tmp_path}/fleet.db", mqtt_broker[1],
           fleet_name)


def test_reconnect_storm_postgresql(tmp_path: Path, offline_outboxes: Path,
                                    mqtt_broker: tuple[str, int], fleet_name: str,
                                    postgres_url: str) -> None:
    """The same storm lands exactly once in PostgreSQL."""
    _storm(tmp_path, offline_outboxes, postgres_url, mqtt_broker[1], fleet_name)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_storm_survives_broker_restart_fleet_kill_and_agent_kill(
        tmp_path: Path, offline_outboxes: Path, private_mosquitto: MosquittoProcess,
        fleet_name: str, database: str, request: pytest.FixtureRequest) -> None:
    """During one flush: the broker restarts, the fleet is SIGKILLed and restarted, an agent
    process (100 devices) is SIGKILLed and restarted - the store still holds exactly 60,000."""
    work = tmp_path / "outboxes"
    shutil.copytree(offline_outboxes, work)
    db = (f"sqlite:///{tmp_path}/fleet.db" if database == "sqlite"
          else request.getfixturevalue("postgres_url"))
    port = private_mosquitto.port
    total = DEVICES * WINDOWS

    def stored() -> int:  # waits follow it: they fail when it stops moving, not at a fixed time
        return int(store_counts(db)["total"])

    fleet_proc = FleetProcess(fleet_name, db, f"mqtt://127.0.0.1:{port}")
    swarm = Swarm(work, port, fleet_name, _groups())
    try:  # started inside: the finally stops whatever did start
        fleet_proc.start()
        swarm.start()
        wait_for_count(stored, total * 0.15, 60, "15% stored")
        private_mosquitto.restart()
        wait_for_count(stored, total * 0.35, 60, "35% stored")
        fleet_proc.kill()
        fleet_proc.start()
        wait_for_count(stored, total * 0.55, 60, "55% stored")
        swarm.kill(0)
        swarm.restart(0)
        results = swarm.wait(timeout=240)
    finally:
        swarm.terminate()
        stats = fleet_proc.stop() if fleet_proc.process else {}
    assert all(r["done"] for r in results)
    assert stats["rejected_total"] == 0
    _assert_exact(db)
