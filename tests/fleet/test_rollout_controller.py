"""The rollout controller over the real broker and store: desired state out, reports in, gates.

Devices here are a paho client that applies desired state at once and reports it; telemetry
windows are written straight into the store (the real agents' path is tested in
tests/integration/test_rollout_e2e.py). This isolates the controller's own I/O.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion

from edgeserve.contract import (
    Reported,
    Status,
    Window,
    device_topic,
    encode,
    fleet_filter,
    open_desired,
    parse_topic,
)
from edgeserve.fleet.artifacts import ArtifactStore
from edgeserve.fleet.connection import BrokerSettings
from edgeserve.fleet.registry import apply_status
from edgeserve.fleet.rollouts.controller import RolloutController
from edgeserve.fleet.rollouts.repo import Rollouts
from edgeserve.fleet.store import Store
from edgeserve.fleet.tables import device_models
from edgeserve.fleet.telemetry import store_windows, window_row
from edgeserve.signing import TrustStore
from edgeserve.telemetry import LatencyHistogram
from edgeserve.testing import KeyPair, make_keypair, publish_versions
from tests.support import wait_until

N_DEVICES = 20


class SimDevices:
    """Applies every desired state at once and reports it back, over MQTT."""

    def __init__(self, host: str, port: int, fleet: str, fleet_keys: TrustStore) -> None:
        self.fleet = fleet
        self.fleet_keys = fleet_keys
        self.active: dict[str, str] = {}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{fleet}-sim",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_desired
        ready = threading.Event()
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.connect(host, port)
        self.client.loop_start()
        self.client.subscribe(fleet_filter(fleet, "desired"), qos=1)
        assert ready.wait(5)

    def _on_desired(self, c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        device = parse_topic(msg.topic).device_id
        # what the agent does: only the fleet's signature, for this device, counts
        desired = open_desired(msg.payload, self.fleet_keys, device)
        model = desired.models.get("toy")
        if model is None:
            return
        self.active[device] = model.active
        report = Reported(device_id=device, revision=desired.revision,
                          models={"toy": {"active": model.active, "state": "committed"}})  # type: ignore[dict-item]
        c.publish(device_topic(self.fleet, device, "reported"), encode(report), qos=1,
                  retain=True)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def fleet_env(tmp_path: Path, keypair: KeyPair, mqtt_broker: tuple[str, int],
              fleet_name: str, resources: contextlib.ExitStack, request: pytest.FixtureRequest,
              ) -> tuple[Store, RolloutController, SimDevices]:
    """Store, controller and simulated devices, each stopped at teardown however far the
    setup got (last started, first stopped)."""
    store = resources.enter_context(Store.open(f"sqlite:///{tmp_path}/fleet.db",
                                               fleet=fleet_name))
    artifacts = ArtifactStore(tmp_path / "artifacts", keypair.trust)
    publish_versions(artifacts, tmp_path, keypair, ["1.0.0", "2.0.0"])
    now = time.time()
    with store.write() as conn:
        for i in range(N_DEVICES):
            apply_status(store, conn, Status(device_id=f"d{i:02d}", state="online",
                                             profile="generic-cpu", models={"toy": "1.0.0"}), now)
    host, port = mqtt_broker
    fleet_key = make_keypair(tmp_path / "keys", "fleet")
    sim = SimDevices(host, port, fleet_name, fleet_key.trust)
    resources.callback(sim.close)
    controller = RolloutController(store, artifacts, BrokerSettings(host=host, port=port),
                                   fleet_name, "http://127.0.0.1:1", fleet_key.private,
                                   tick_s=0.2,
                                   desired_connections=getattr(request, "param", 1))
    resources.callback(controller.stop)
    controller.start()
    return store, controller, sim


def _windows(store: Store, sim: SimDevices, seq: dict[str, int], bad: bool) -> None:
    """One window per device for the version it runs; the new version errs when ``bad``."""
    now = time.time()
    rows = []
    for device, version in sorted(sim.active.items()):
        hist = LatencyHistogram()
        for _ in range(50):
            hist.add(2.0)
        errors = 10 if (bad and version == "2.0.0") else 0
        seq[device] = seq.get(device, 0) + 1
        rows.append(window_row(device, Window(seq=seq[device], start=now - 1, end=now,
                                              model="toy", version=version, requests=50,
                                              errors=errors, latency=hist.to_data()), now))
    for i in range(N_DEVICES):
        device = f"d{i:02d}"
        if device not in sim.active:
            hist = LatencyHistogram()
            for _ in range(50):
                hist.add(2.0)
            seq[device] = seq.get(device, 0) + 1
            rows.append(window_row(device, Window(seq=seq[device], start=now - 1, end=now,
                                                  model="toy", version="1.0.0", requests=50,
                                                  latency=hist.to_data()), now))
    with store.write() as conn:
        store_windows(store, conn, rows, now)


def _drive(store: Store, controller: RolloutController, sim: SimDevices, rollout_id: str,
           bad: bool, deadline_s: float = 30) -> str:
    seq: dict[str, int] = {}
    end = time.monotonic() + deadline_s
    repo = Rollouts(store)
    while time.monotonic() < end:
        _windows(store, sim, seq, bad)
        phase = repo.get(rollout_id).state.phase
        if phase in ("completed", "rolled-back"):
            return phase
        time.sleep(0.2)
    return repo.get(rollout_id).state.phase


@pytest.mark.parametrize("fleet_env", [1, 3], indirect=True,
                         ids=["one connection", "three connections"])
def test_good_version_reaches_every_device(
        fleet_env: tuple[Store, RolloutController, SimDevices]) -> None:
    """A healthy version goes 10/50/100% through the controller to all 20 devices, whether
    desired states go out on one connection or are spread over three (``desired_connections``:
    each device's on one of them)."""
    store, controller, sim = fleet_env
    record = Rollouts(store).create({"model": "toy", "version": "2.0.0",
                                     "stages": [10, 50, 100], "soak_seconds": 0.5,
                                     "min_requests": 50})
    assert _drive(store, controller, sim, record.id, bad=False) == "completed"
    assert sum(1 for v in sim.active.values() if v == "2.0.0") == N_DEVICES
    with store.read() as conn:
        reported = conn.execute(sa.select(sa.func.count()).select_from(device_models)
                                .where(device_models.c.active == "2.0.0")).scalar_one()
    assert reported == N_DEVICES
    events = [e["event"] for e in Rollouts(store).events(record.id)]
    assert events.count("stage") == 2 and events[-1] == "completed"
    assert len(controller.published_per_connection) == controller.desired_connections
    assert all(n > 0 for n in controller.published_per_connection), \
        controller.published_per_connection


def test_erroring_version_is_rolled_back_by_its_gate(
        fleet_env: tuple[Store, RolloutController, SimDevices]) -> None:
    """A version that errs is stopped at the first stage by error_rate and reverted everywhere."""
    store, controller, sim = fleet_env
    record = Rollouts(store).create({"model": "toy", "version": "2.0.0",
                                     "stages": [10, 50, 100], "soak_seconds": 0.5,
                                     "min_requests": 50})
    assert _drive(store, controller, sim, record.id, bad=True) == "rolled-back"
    final = Rollouts(store).get(record.id)
    assert final.state.failed_gate == "error_rate<=0.01" and final.state.stage == 0
    assert all(v == "1.0.0" for v in sim.active.values())


def test_operator_actions_are_applied(
        fleet_env: tuple[Store, RolloutController, SimDevices]) -> None:
    """Pause and rollback queued in the store are carried out by the controller."""
    store, controller, sim = fleet_env
    repo = Rollouts(store)
    record = repo.create({"model": "toy", "version": "2.0.0", "stages": [50, 100],
                          "soak_seconds": 60, "gates": []})
    wait_until(lambda: len(sim.active) >= N_DEVICES // 2, 10, "the first stage on half the "
               "devices", progress=lambda: len(sim.active))
    repo.queue_action(record.id, "pause")
    wait_until(lambda: repo.get(record.id).state.phase == "paused", 10, "the rollout to pause")
    repo.queue_action(record.id, "rollback", "operator says no")
    assert _drive(store, controller, sim, record.id, bad=False, deadline_s=15) == "rolled-back"
    assert repo.get(record.id).state.reason == "operator says no"
    assert all(v == "1.0.0" for v in sim.active.values())


def test_reports_taken_by_a_failing_tick_are_stored_by_the_next(
        fleet_env: tuple[Store, RolloutController, SimDevices],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A tick whose write of the devices' reports fails (the database went away for a moment)
    leaves them for the next tick: the reports are retained messages the broker sends once, so
    a dropped report would leave its device unknown and the stage waiting for it forever."""
    store, controller, sim = fleet_env
    write = controller._write_reports
    failed: list[int] = []

    def once_failing(reports: Any) -> None:
        if not failed:
            failed.append(len(reports))
            raise sa.exc.OperationalError("INSERT INTO device_models", {},
                                          ConnectionError("server closed the connection"))
        write(reports)

    monkeypatch.setattr(controller, "_write_reports", once_failing)
    record = Rollouts(store).create({"model": "toy", "version": "2.0.0",
                                     "stages": [10, 50, 100], "soak_seconds": 0.5,
                                     "min_requests": 50})
    assert _drive(store, controller, sim, record.id, bad=False) == "completed"
    assert failed and failed[0] > 0
    with store.read() as conn:
        reported = conn.execute(sa.select(sa.func.count()).select_from(device_models)
                                .where(device_models.c.active == "2.0.0")).scalar_one()
    assert reported == N_DEVICES
