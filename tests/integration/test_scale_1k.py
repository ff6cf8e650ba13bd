"""Issue 18, acceptance 3: the scale scenarios at 1,000 simulated devices on Mosquitto with
``$share/``, fast enough for CI.

A reconnect storm with a fleet worker killed -9: 1,000 devices (``edgeserve.fleet.simulate``,
one asyncio process) against two ``edgeserve fleet serve`` worker processes (``--worker 0/1``,
``--shared on``) on one PostgreSQL schema and the machine's Mosquitto. Every window the
simulator numbered is stored exactly once and acked. Then, with two workers again, a staged
rollout (1/10/50/100 %, gates on) over 1,000 devices recording a 2-second window every 2 s
completes although its leader is killed -9 when the 10 % stage opens, and a version the devices
fail is rolled back on every device that took it.

The killed worker is started again 2 s later (as a supervisor would): Mosquitto 2.0 keeps a
dead worker's persistent session in the ``$share/`` group and goes on routing its share of the
telemetry and statuses there, to be delivered when that worker comes back (a shared worker's
session expires 10 minutes after it disconnects, so a worker gone for good strands its share
that long; the devices send unacked windows again meanwhile).

Mosquitto queues at most ``max_queued_messages`` (1,000 by default) for an offline session, so
some of what waited for the killed worker may be dropped. The test does not depend on that
limit: each device's storm backlog is one batch (``batch_windows`` covers it, 1,000 telemetry
messages in all), and a device sends its unacked windows again after ``ack_timeout_s`` (what a
real agent does); the copies reach a live worker or land on a row already stored (a no-op by
the primary key). That is why the machine's broker (default config) is used, not a private one
with a higher limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion

from edgeserve.fleet.artifacts import ArtifactStore
from edgeserve.fleet.rollouts.admission import create_rollout
from edgeserve.fleet.rollouts.repo import Rollouts
from edgeserve.fleet.server import fleet_public_key_path
from edgeserve.fleet.simulate import SimSettings, Simulator, raise_open_files_limit
from edgeserve.fleet.store import Store
from edgeserve.fleet.tables import device_models, devices
from edgeserve.fleet.testing import leader_process
from edgeserve.mqtt import BrokerSettings
from edgeserve.signing import TrustStore
from edgeserve.testing import KeyPair, end_mqtt_sessions, publish_versions
from tests.integration.telemetry_support import (
    FleetProcess,
    ingest_stored,
    store_counts,
    stored_by_workers,
)
from tests.services import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(120)]

DEVICES = 1000
BACKLOG = 5
STORM_BACKLOG = 5
STORM_S = 4.0
KILL_AFTER_S = 1.5
RESTART_AFTER_S = 2.0
ROLLOUT_WORKERS = 2
WINDOW_S = 2.0
GATES = ["error_rate<=0.05", "p95_ms<=1.5*control"]


def _clear_device_topics(port: int, sim: Simulator) -> None:
    """Delete the retained messages on every simulated device's topics (birth or Will, reported,
    desired). The teardown of ``mqtt_broker`` finds retained messages by subscribing to the
    fleet's topics, and Mosquitto queues at most 1,000 messages for that subscriber: with more,
    its end marker would be dropped."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        sent = [client.publish(d.topics[kind], b"", qos=1, retain=True)
                for d in sim.devices for kind in ("status", "reported", "desired")]
        for info in sent:
            info.wait_for_publish(20)
    finally:
        client.disconnect()
        client.loop_stop()


def test_storm_with_a_worker_killed_stores_every_window_once(
        mqtt_broker: tuple[str, int], postgres_url: str, fleet_name: str,
        resources: contextlib.ExitStack) -> None:
    """1,000 devices connect with 5 windows each in their backlog; both workers store part of
    them. Then every connection drops at once, each device records 5 more windows and comes
    back within 4 s; 1.5 s into that storm worker 1 is killed -9. Every device is acked up to
    its last seq, the windows table holds seqs 1..N once per device (N what the simulator
    numbered), and the surviving worker stored part of the storm too."""
    port = mqtt_broker[1]
    raise_open_files_limit(DEVICES + 512)
    broker = f"mqtt://127.0.0.1:{port}"
    http_ports = [free_port(), free_port()]
    resources.callback(end_mqtt_sessions, port,
                       [f"edgeserve-fleet-{fleet_name}-{i}" for i in range(2)])
    workers = [FleetProcess(fleet_name, postgres_url, broker,
                            extra=["--worker", str(i), "--shared", "on",
                                   "--http-port", str(http_ports[i]),
                                   "--connect-timeout", "20"])
               for i in range(2)]
    for worker in workers:
        resources.callback(worker.kill)
        worker.start()  # one at a time: the first creates the schema
    seen: dict[str, Any] = {}

    async def scenario() -> None:
        settings = SimSettings(BrokerSettings(host="127.0.0.1", port=port, protocol="3.1.1"),
                               fleet_name, DEVICES, batch_windows=10, ack_timeout_s=4.0,
                               seed=18, backoff_min_s=0.2, backoff_max_s=2.0,
                               models={"toy": "1.0.0"})
        sim = Simulator(settings)
        sim.record(BACKLOG)
        try:
            seen["connect_s"] = await sim.start()
            seen["backlog_s"] = await sim.wait_acked(40)
            seen["before"] = await stored_by_workers(http_ports, DEVICES * BACKLOG)
            storm = asyncio.create_task(sim.storm(STORM_S, STORM_BACKLOG))
            await asyncio.sleep(KILL_AFTER_S)
            seen["at_kill"] = await asyncio.to_thread(ingest_stored, http_ports[1])
            await asyncio.to_thread(workers[1].kill)
            await asyncio.sleep(RESTART_AFTER_S)
            await asyncio.to_thread(workers[1].start)
            seen["storm_s"] = await storm
            seen["acked_s"] = await sim.wait_acked(40)
            seen["counts"] = sim.counts()
        finally:
            await sim.stop()
            await sim.forget()  # the machine's broker would keep 1,000 sessions otherwise
            await asyncio.to_thread(_clear_device_topics, port, sim)

    begun = time.monotonic()
    asyncio.run(scenario())
    stats = [worker.stop() for worker in workers]
    counts = store_counts(postgres_url)
    mine = seen["counts"]
    print(f"\n{DEVICES} devices: connected in {seen['connect_s']:.1f} s, backlog acked in "
          f"{seen['backlog_s']:.1f} s (workers stored {seen['before']}); storm back in "
          f"{seen['storm_s']:.1f} s, all acked {seen['acked_s']:.1f} s later; worker 1 had "
          f"stored {seen['at_kill']} when killed; {mine['windows_sent']} windows sent for "
          f"{mine['windows']}, {mine['resends']} resends; workers at the end: {stats}; "
          f"{time.monotonic() - begun:.1f} s")
    total = DEVICES * (BACKLOG + STORM_BACKLOG)
    # the load was shared: each worker stored part of the first backlog
    assert all(n > 0 for n in seen["before"]), seen["before"]
    assert sum(seen["before"]) == DEVICES * BACKLOG
    assert mine["windows"] == total and mine["acked"] == total
    assert mine["refused_messages"] == 0
    assert counts["total"] == total
    assert len(counts["devices"]) == DEVICES
    for device, per in mine["per_device"].items():
        assert per == {"windows": BACKLOG + STORM_BACKLOG, "acked": BACKLOG + STORM_BACKLOG}
        assert counts["devices"][device] == (per["windows"], 1, per["windows"]), device
        assert counts["acked"][device] == per["windows"], device
    # new rows: worker 0 all along, worker 1 before its kill (at least what it had at the last
    # look) and after its restart; together exactly the rows in the table
    assert all(s["rejected_total"] == 0 for s in stats), stats
    assert stats[0]["windows_stored"] >= seen["before"][0]
    stored_after = stats[0]["windows_stored"] + stats[1]["windows_stored"]
    assert stored_after + seen["at_kill"] <= total
    assert stored_after + seen["before"][1] <= total


def _online(store: Store) -> int:
    with store.read() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(devices)
                                .where(devices.c.state == "online")).scalar_one())


def _models(store: Store) -> dict[str, dict[str, Any]]:
    with store.read() as conn:
        rows = conn.execute(sa.select(device_models).where(device_models.c.model == "toy"))
        return {r.device_id: dict(r._mapping) for r in rows}


def test_gated_staged_rollout_survives_its_leader_and_a_bad_version_is_rolled_back(
        tmp_path: Path, mqtt_broker: tuple[str, int], postgres_url: str, fleet_name: str,
        keypair: KeyPair, resources: contextlib.ExitStack) -> None:
    """Two workers, 1,000 devices on toy 1.0.0 recording a 2-second window every 2 s (an
    agent with ``window_s`` 2), desired state verified with the fleet's key. toy 2.0.0 goes out
    in stages of 1/10/50/100 % with gates on (error rate, p95 against the control, 50 canary
    requests at least); when the 10 % stage opens the leader (the worker holding the rollout
    controller's advisory lock) is killed -9, and the other worker takes over: each stage is
    opened exactly once and the rollout completes on every device. Then toy 3.0.0, which the
    devices fail their health check on, is rolled back at its first stage: every device that
    took it reports it rolled back, and every device ends on 2.0.0."""
    port = mqtt_broker[1]
    raise_open_files_limit(DEVICES + 512)
    artifacts, fleet_key = tmp_path / "artifacts", tmp_path / "keys" / "fleet.key"
    published = ArtifactStore(artifacts, TrustStore.from_paths([keypair.public_path]))
    publish_versions(published, tmp_path, keypair, ["2.0.0", "3.0.0"])
    resources.callback(end_mqtt_sessions, port,
                       [f"edgeserve-{k}-{fleet_name}-{i}" for i in range(ROLLOUT_WORKERS)
                        for k in ("fleet", "rollouts")])
    workers = [FleetProcess(fleet_name, postgres_url, f"mqtt://127.0.0.1:{port}",
                            extra=["--worker", str(i), "--shared", "on", "--http-port", "-1",
                                   "--artifacts", str(artifacts), "--fleet-key", str(fleet_key),
                                   "--trusted-key", str(keypair.public_path),
                                   "--rollout-tick", "0.2", "--connect-timeout", "20"])
               for i in range(ROLLOUT_WORKERS)]
    for worker in workers:
        resources.callback(worker.kill)
        worker.start()
    store = resources.enter_context(Store(postgres_url))
    repo = Rollouts(store)
    seen: dict[str, Any] = {}

    async def until(check: Any, timeout: float, what: str) -> float:
        begun = time.monotonic()
        while not await asyncio.to_thread(check):
            if time.monotonic() - begun > timeout:
                raise AssertionError(f"{what} within {timeout:g} s")
            await asyncio.sleep(0.25)
        return time.monotonic() - begun

    def create(version: str) -> str:
        record, _ = create_rollout(store, published, {
            "model": "toy", "version": version, "stages": [1, 10, 50, 100], "gates": GATES,
            "min_requests": 50, "soak_seconds": 0, "min_devices": 1})
        return record.id

    async def scenario() -> None:
        settings = SimSettings(BrokerSettings(host="127.0.0.1", port=port, protocol="3.1.1"),
                               fleet_name, DEVICES, batch_windows=10, ack_timeout_s=10.0,
                               seed=19, backoff_min_s=0.2, backoff_max_s=2.0,
                               models={"toy": "1.0.0"}, bad_versions=frozenset({"toy=3.0.0"}),
                               fleet_key=fleet_public_key_path(fleet_key), window_s=WINDOW_S)
        sim = Simulator(settings)
        producing: asyncio.Future[int] | None = None
        try:
            await sim.start()
            await until(lambda: _online(store) == DEVICES, 30, "every device online")
            producing = asyncio.ensure_future(sim.produce(DEVICES / WINDOW_S, 300))
            good = await asyncio.to_thread(create, "2.0.0")
            await until(lambda: repo.get(good).state.stage >= 1, 60, "the 10 % stage to open")
            seen["leader"] = await asyncio.to_thread(
                leader_process, postgres_url, "edgeserve-rollouts", fleet_name,
                [w.process.pid if w.process else None for w in workers])
            assert seen["leader"] is not None, "no worker holds the rollout controller's lock"
            await asyncio.to_thread(workers[seen["leader"]].kill)
            seen["good_s"] = await until(lambda: repo.get(good).state.done and all(
                d.models.get("toy") == "2.0.0" for d in sim.devices), 90,
                "rollout of toy 2.0.0 to end on every device")
            seen["good"] = good
            seen["bad"] = bad = await asyncio.to_thread(create, "3.0.0")
            await until(lambda: repo.get(bad).state.done, 60, "rollout of toy 3.0.0 to end")
            # the devices told to go back to 2.0.0 report it
            await until(lambda: all(r["active"] == "2.0.0" and r["state"] == "committed"
                                    for r in _models(store).values())
                        and len(_models(store)) == DEVICES, 30,
                        "every device to report toy 2.0.0 committed again")
            seen["tried"] = {d.device_id for d in sim.devices
                             if "3.0.0" in d.hashes.get("toy", {})}
            seen["final"] = {d.device_id: d.models.get("toy") for d in sim.devices}
            seen["counts"] = sim.counts()
        finally:
            if producing is not None:
                producing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await producing
            await sim.stop()
            await sim.forget()
            await asyncio.to_thread(_clear_device_topics, port, sim)

    asyncio.run(scenario())
    survivor = workers[1 - seen["leader"]]
    survivor.stop()
    good, bad = repo.get(seen["good"]).state, repo.get(seen["bad"]).state
    stages = [h for h in good.history if h.event == "stage"]
    print(f"\ngated rollout of 2.0.0 over {DEVICES} devices, leader (worker {seen['leader']}) "
          f"killed at 10 %: {good.phase} in {seen['good_s']:.1f} s after the 10 % stage; "
          f"stages opened {[round(h.ts - good.history[0].ts, 1) for h in stages]} s; 3.0.0: "
          f"{bad.phase}, tried by {len(seen['tried'])} devices ({bad.reason})")
    assert good.phase == "completed", (good.reason, good.history[-5:])
    # each stage opened once, in order, across the fail-over: none skipped, none repeated
    assert [h.stage for h in stages] == [1, 2, 3], good.history
    assert good.gate_results and all(r.verdict == "pass" for r in good.gate_results), (
        good.gate_results)
    assert bad.phase == "rolled-back", (bad.reason, bad.history[-5:])
    assert bad.stage == 0  # stopped at 1 %: the first failure rolls it back
    # stage 1 % of 1,000: 10 devices took it (fetched, failed the health check) and no more
    assert 1 <= len(seen["tried"]) <= 10, seen["tried"]
    assert set(seen["final"].values()) == {"2.0.0"}
    assert seen["counts"]["refused_messages"] == 0
