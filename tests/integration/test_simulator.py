"""The fleet simulator (``edgeserve.fleet.simulate``) against a real fleet on the real Mosquitto:
hundreds of simulated devices, each with a backlog, stored exactly once (also across a reconnect
storm); the fleet's registry cannot tell them from agents (birth fields, Last Will); desired
state in, reported state out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from edgeserve.contract import Window
from edgeserve.fleet.server import FleetConfig, FleetServer, fleet_public_key_path
from edgeserve.fleet.simulate import SimSettings, Simulator, raise_open_files_limit
from edgeserve.fleet.store import Store
from edgeserve.fleet.tables import device_models, devices, windows
from edgeserve.mqtt import BrokerSettings
from edgeserve.testing import KeyPair, make_manifest, write_test_package
from tests.integration.telemetry_support import FleetProcess, store_counts
from tests.natscluster import NatsCluster, nats_cluster  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

DEVICES = 300
BACKLOG = 12
STORM_BACKLOG = 6


def _registry(db: str) -> dict[str, dict[str, Any]]:
    with Store(db) as store, store.read() as conn:
        rows = conn.execute(sa.select(devices)).mappings().all()
    return {r["device_id"]: dict(r) for r in rows}


def _settings(port: int, fleet: str, count: int, **kw: Any) -> SimSettings:
    return SimSettings(BrokerSettings(host="127.0.0.1", port=port, protocol="3.1.1"), fleet,
                       count, batch_windows=5, ack_timeout_s=10.0, seed=7,
                       labels={"site": "sim"}, models={"toy": "1.0.0"}, **kw)


def test_backlogs_and_a_reconnect_storm_are_stored_exactly_once_and_wills_fire(
        tmp_path: Path, mqtt_broker: tuple[str, int], fleet_name: str) -> None:
    """300 devices with 12 windows each connect to a real ``fleet serve`` (SQLite): every
    window is stored once and acked; the registry shows them online with the birth's fields.
    Then all connections drop at once and return within 3 s with 6 more windows each: still
    exactly once, up to the last seq. Cut without DISCONNECT, every device goes offline by its
    Last Will."""
    raise_open_files_limit(DEVICES + 512)
    db = f"sqlite:///{tmp_path}/fleet.db"
    fleet = FleetProcess(fleet_name, db, f"mqtt://127.0.0.1:{mqtt_broker[1]}")
    seen: dict[str, Any] = {}

    async def scenario() -> None:
        sim = Simulator(_settings(mqtt_broker[1], fleet_name, DEVICES))
        sim.record(BACKLOG)  # recorded while offline: flushed on connect
        try:
            seen["connect_s"] = await sim.start()
            seen["first_s"] = await sim.wait_acked(90)
            seen["first"] = sim.counts()
            seen["registry"] = await asyncio.to_thread(_registry, db)
            seen["storm_s"] = await sim.storm(3.0, STORM_BACKLOG)
            seen["storm_acked_s"] = await sim.wait_acked(90)
            seen["second"] = sim.counts()
            sim.cut()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                registry = await asyncio.to_thread(_registry, db)
                if all(r["state"] == "offline" for r in registry.values()):
                    break
                await asyncio.sleep(0.5)
            seen["after_cut"] = registry
        finally:
            await sim.stop()
            await sim.forget()  # the machine's broker would keep 300 sessions otherwise

    fleet.start()
    try:
        asyncio.run(scenario())
    finally:
        stats = fleet.stop()
    print(f"\n{DEVICES} devices: connected in {seen['connect_s']:.1f} s, backlog acked in "
          f"{seen['first_s']:.1f} s; storm back in {seen['storm_s']:.1f} s, acked "
          f"{seen['storm_acked_s']:.1f} s later; fleet: {stats}")
    first, second = seen["first"], seen["second"]
    assert first["windows"] == DEVICES * BACKLOG
    assert second["windows"] == DEVICES * (BACKLOG + STORM_BACKLOG)
    assert second["connects"] == 2 * DEVICES and second["refused_messages"] == 0
    counts = store_counts(db)
    assert counts["total"] == second["windows"]
    assert len(counts["devices"]) == DEVICES
    for device, mine in second["per_device"].items():
        assert mine == {"windows": BACKLOG + STORM_BACKLOG, "acked": BACKLOG + STORM_BACKLOG}
        assert counts["devices"][device] == (mine["windows"], 1, mine["windows"]), device
        assert counts["acked"][device] == mine["windows"], device
    assert stats["rejected_total"] == 0
    assert stats["windows_stored"] == second["windows"]
    # the fleet cannot tell: the birth's fields, then the Last Will
    registry = seen["registry"]
    assert len(registry) == DEVICES
    for row in registry.values():
        assert row["state"] == "online"
        assert row["profile"] == "simulated" and row["agent_version"]
        assert json.loads(row["labels"]) == {"site": "sim"}
        assert json.loads(row["models"]) == {"toy": "1.0.0"}
    after = seen["after_cut"]
    assert {r["state"] for r in after.values()} == {"offline"}
    assert {r["reason"] for r in after.values()} == {"connection lost"}
    # a stored window is what an agent would have sent
    with Store(db) as store, store.read() as conn:
        data = conn.execute(sa.select(windows.c.data).limit(1)).scalar_one()
    assert Window.model_validate_json(data).model == "toy"


def _models(store: Store) -> dict[str, dict[str, Any]]:
    with store.read() as conn:
        rows = conn.execute(sa.select(device_models)).mappings().all()
    return {r["device_id"]: dict(r) for r in rows}


def test_desired_state_in_reported_state_out(
        tmp_path: Path, mqtt_broker: tuple[str, int], fleet_name: str, keypair: KeyPair,
        resources: contextlib.ExitStack) -> None:
    """The fleet (in process, signing with its key) sets toy 2.0.0 for three simulated devices
    that pin that key: each verifies it and reports 2.0.0 committed (1.0.0 previous, both
    hashes "installed"); 3.0.0, which they were told is bad, comes back rolled back to 2.0.0
    with the health-check error."""
    key_dir = tmp_path / "keys"
    server = FleetServer(FleetConfig(
        fleet=fleet_name, db=f"sqlite:///{tmp_path}/fleet.db",
        broker=f"mqtt://127.0.0.1:{mqtt_broker[1]}", http_port=None,
        artifacts_dir=tmp_path / "artifacts", fleet_key=key_dir / "fleet.key",
        trusted_keys=[keypair.public_path], rollout_tick_s=0.2, connect_timeout=10))
    resources.callback(server.stop)
    server.start()
    assert server.controller is not None and server.store is not None
    assert server.artifacts is not None
    for version, release in (("2.0.0", 2), ("3.0.0", 3)):
        package = tmp_path / f"toy-{version}.edgepkg"
        write_test_package(package, keypair, manifest=make_manifest(version=version,
                                                                    release=release))
        server.artifacts.publish(package)
    ids = ["sim-00001", "sim-00002", "sim-00003"]
    seen: dict[str, Any] = {}
    store = server.store
    controller = server.controller

    async def wait_models(check: Any, what: str) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + 30
        while True:
            rows = await asyncio.to_thread(_models, store)
            if all(d in rows and check(rows[d]) for d in ids):
                return rows
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: {rows}")
            await asyncio.sleep(0.2)

    async def scenario() -> None:
        sim = Simulator(_settings(mqtt_broker[1], fleet_name, 3,
                                  fleet_key=fleet_public_key_path(key_dir / "fleet.key"),
                                  bad_versions=frozenset({"toy=3.0.0"})))
        try:
            await sim.start()
            for device in ids:
                await asyncio.to_thread(controller.desired.set_model, device, "toy", "2.0.0")
            seen["committed"] = await wait_models(
                lambda r: r["active"] == "2.0.0" and r["state"] == "committed",
                "every device to report toy 2.0.0 committed")
            seen["hashes"] = {d.device_id: dict(d.hashes["toy"]) for d in sim.devices}
            for device in ids:
                await asyncio.to_thread(controller.desired.set_model, device, "toy", "3.0.0")
            seen["rolled_back"] = await wait_models(
                lambda r: r["state"] == "rolled-back",
                "every device to report toy 3.0.0 rolled back")
            seen["counts"] = sim.counts()
        finally:
            await sim.stop()
            await sim.forget()

    asyncio.run(scenario())
    published = server.artifacts.get("toy", "2.0.0").manifest_sha256
    for device in ids:
        committed = seen["committed"][device]
        assert committed["previous"] == "1.0.0" and committed["error_code"] is None
        assert seen["hashes"][device] == {"2.0.0": published}
        back = seen["rolled_back"][device]
        assert back["active"] == "2.0.0" and back["target"] == "3.0.0"
        assert back["error_code"] == "HealthCheckFailed" and back["error_version"] == "3.0.0"
        assert back["revision"] == 2
    assert seen["counts"]["refused_messages"] == 0


def test_simulated_devices_on_a_nats_cluster_across_a_storm_and_a_node_kill(
        nats_cluster: NatsCluster, tmp_path: Path, fleet_name: str,  # noqa: F811
        resources: contextlib.ExitStack) -> None:
    """On a 3-node NATS JetStream cluster's MQTT 3.1.1 listener (fleet on nodes 1-2, devices
    given nodes 2-3): 100 devices' backlogs are stored once; in a reconnect storm the devices'
    node is killed -9, they fail over to node 3, and every window is still stored exactly
    once and acked."""
    urls = nats_cluster.urls
    server = FleetServer(FleetConfig(
        fleet=fleet_name, db=f"sqlite:///{tmp_path}/fleet.db", broker=f"{urls[0]},{urls[1]}",
        http_port=None, artifacts_dir=tmp_path / "artifacts", fleet_key=tmp_path / "fleet.key",
        connect_timeout=10))
    resources.callback(server.stop)
    server.start()
    assert server.store is not None
    count = 100
    seen: dict[str, Any] = {}

    async def scenario() -> None:
        settings = SimSettings(BrokerSettings.from_url(f"{urls[1]},{urls[2]}"), fleet_name,
                               count, batch_windows=5, ack_timeout_s=5.0, seed=3,
                               backoff_min_s=0.2, backoff_max_s=1.0)
        sim = Simulator(settings)
        sim.record(BACKLOG)
        try:
            await sim.start()
            await sim.wait_acked(60)
            storm = asyncio.create_task(sim.storm(4.0, STORM_BACKLOG))
            await asyncio.sleep(1.0)
            nats_cluster.kill(nats_cluster.node_at(int(urls[1].rsplit(":", 1)[1])))
            seen["back_s"] = await storm
            seen["acked_s"] = await sim.wait_acked(90)
            seen["counts"] = sim.counts()
            # a device that came back to node 2 just before the kill, with nothing left to
            # send, may still be in its reconnect back-off once every window is acked
            await sim.wait_connected(30)
            seen["nodes"] = {d.node for d in sim.devices}
        finally:
            await sim.stop()

    asyncio.run(scenario())
    counts = store_counts(server.store.url)
    mine = seen["counts"]
    total = count * (BACKLOG + STORM_BACKLOG)
    print(f"\nNATS: {count} devices back in {seen['back_s']:.1f} s, acked {seen['acked_s']:.1f} s "
          f"later; {mine['windows_sent']} windows sent for {total}")
    assert mine["windows"] == counts["total"] == total
    assert seen["nodes"] == {1}  # node 3 (index 1 of theirs): node 2 was killed
    for device, per in mine["per_device"].items():
        assert counts["devices"][device] == (per["windows"], 1, per["windows"]), device
        assert counts["acked"][device] == per["acked"] == per["windows"], device


def test_the_cli_publishes_and_counts(mqtt_broker: tuple[str, int], fleet_name: str) -> None:
    """``fleet simulate --no-acks --json`` (no fleet needed): 50 sessions held, 20 windows each
    published and acknowledged by the broker, a storm with 3 more each; MQTT 5 is refused with
    the reason, as is a bad MODEL=VERSION."""
    from click.testing import CliRunner

    from edgeserve.cli import cli

    broker = f"mqtt://127.0.0.1:{mqtt_broker[1]}"
    result = CliRunner().invoke(cli, [
        "fleet", "simulate", "--devices", "50", "--fleet", fleet_name, "--broker", broker,
        "--windows-per-device", "20", "--batch-windows", "7", "--storm", "1s",
        "--storm-windows", "3", "--no-acks", "--forget-sessions", "--json"],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["sessions"] == 50 and report["devices"] == 50
    assert report["windows"] == 50 * 23 and report["acked"] == 0
    assert report["backlog"]["windows"] == 1000 and report["storm"]["windows"] == 150
    # nothing acked: the storm's reconnect sends each device's 20 again, then its 3 new ones
    assert report["windows_sent"] == 50 * (20 + 23)
    assert report["connects"] == 100 and report["connect_failures"] == 0
    for bad, why in ((["--mqtt-version", "5"], "speaks MQTT 3.1.1"),
                     (["--model", "toy"], "is not MODEL=VERSION")):
        refused = CliRunner().invoke(cli, ["fleet", "simulate", "--devices", "1", "--fleet",
                                           fleet_name, "--broker", broker, *bad])
        assert refused.exit_code == 2 and why in refused.output, refused.output
