"""Desired state only the fleet can write (real Mosquitto, a real fleet process, real agents).

An attacker on the broker once retained ``{"v":1,"revision":1e15,"models":{}}`` on a device's
desired topic: the device deleted its model, every later real revision was "stale", and the
rollout ran forever. Now desired state is signed by the fleet's own key, bound to one device and
expiring; devices pin the fleet key and refuse everything else.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeserve.contract import device_topic, encode, sign_desired
from edgeserve.demo.sim import FleetChild, SimFleet
from edgeserve.fleet.artifacts import ArtifactStore
from edgeserve.fleet.desired import DesiredStates
from edgeserve.fleet.registry import list_devices
from edgeserve.fleet.rollouts.admission import create_rollout
from edgeserve.fleet.rollouts.repo import Rollouts
from edgeserve.fleet.store import Store
from edgeserve.fleet.tables import desired_state
from edgeserve.testing import KeyPair, make_keypair
from tests.device_agent.models import build_mlp_package
from tests.services import free_port
from tests.support import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

X = np.random.default_rng(3).normal(size=(1, 4)).astype(np.float32)


@dataclass
class Fleet:
    service: FleetChild
    store: Store
    devices: SimFleet
    port: int
    fleet: str


@pytest.fixture
def fleet(tmp_path: Path, keypair: KeyPair, mqtt_broker: tuple[str, int],
          fleet_name: str) -> Iterator[Fleet]:
    """A fleet (its own process, signing key made on start), two agents pinning its key, and
    toy 1.0.0 rolled out to both."""
    host, port = mqtt_broker
    with contextlib.ExitStack() as stack:
        service = FleetChild(fleet_name, tmp_path, keypair.public_path, broker_port=0,
                             http_port=free_port(), broker=f"mqtt://{host}:{port}",
                             tick_s=0.25).start()
        stack.callback(service.stop)
        store = Store.open(service.db_url, migrate=False)
        stack.callback(store.close)
        artifacts = ArtifactStore(service.artifacts_dir, keypair.trust)
        for version, release in (("1.0.0", 1), ("2.0.0", 2)):
            artifacts.publish(build_mlp_package(tmp_path / f"toy-{version}.edgepkg", keypair,
                                                version, release, seed=release, tflite=False))
        devices = SimFleet.build(2, ["generic-cpu"], tmp_path / "devices", [keypair.public_path],
                                 f"mqtt://{host}:{port}", fleet_name, window_s=0.5,
                                 prefix=fleet_name, fleet_keys=[service.fleet_public_key])
        stack.callback(devices.stop)
        devices.start()
        made = Fleet(service, store, devices, port, fleet_name)
        wait_until(lambda: len([d for d in list_devices(store) if d.profile]) == 2, 30,
                   "the devices to register")
        _roll_out(made, artifacts, "1.0.0")
        yield made


def _roll_out(fleet: Fleet, artifacts: ArtifactStore, version: str) -> None:
    record, _ = create_rollout(fleet.store, artifacts, {
        "model": "toy", "version": version, "stages": [100], "gates": [], "soak_seconds": 0,
        "health": {"min_inferences": 0}})  # idle devices: the samples decide
    repo = Rollouts(fleet.store)
    wait_until(lambda: repo.get(record.id).state.done, 60, f"the rollout of {version}")
    assert repo.get(record.id).state.phase == "completed", repo.get(record.id).state.reason


def _publish_retained(port: int, topic: str, payload: bytes) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_forged_replayed_and_foreign_desired_states_change_nothing(
        fleet: Fleet, tmp_path: Path, keypair: KeyPair) -> None:
    """An unsigned document with a huge revision, one signed by another key, and the fleet's own
    document for the other device are all refused; the model keeps serving and the next real
    rollout still reaches the device."""
    victim, other = fleet.devices.devices
    topic = device_topic(fleet.fleet, victim.device_id, "desired")
    rogue = make_keypair(tmp_path / "rogue", "rogue")
    desired = DesiredStates(fleet.store, ArtifactStore(fleet.service.artifacts_dir,
                                                       keypair.trust), "http://unused")
    theirs = desired.get(other.device_id)
    assert theirs is not None
    attacks = [
        json.dumps({"v": 1, "revision": 10**15, "models": {}}).encode(),
        encode(sign_desired(theirs.model_copy(update={
            "revision": 10**15, "models": {}, "device_id": victim.device_id,
            "expires": 2e9}), rogue.private)),
    ]
    for payload in attacks:
        before = victim.run.desired_refused
        _publish_retained(fleet.port, topic, payload)
        wait_until(lambda before=before: victim.run.desired_refused > before, 30, "the refusal")
    refused = victim.run.desired_refused
    # the fleet's own signed document for the other device, replayed here
    got: list[bytes] = []
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    watcher.on_message = lambda _c, _u, m: got.append(bytes(m.payload))
    watcher.connect("127.0.0.1", fleet.port)
    watcher.loop_start()
    try:
        watcher.subscribe(device_topic(fleet.fleet, other.device_id, "desired"), qos=1)
        wait_until(lambda: bool(got), 30, "the other device's retained desired state")
    finally:
        watcher.disconnect()
        watcher.loop_stop()
    _publish_retained(fleet.port, topic, got[0])
    wait_until(lambda: victim.run.desired_refused > refused, 30, "the replay's refusal")
    assert victim.active_version("toy") == "1.0.0"
    assert victim.agent.predict("toy", {"x": X}).version == "1.0.0"
    assert victim.run.updater is not None and victim.run.updater.revision < 10**15
    _roll_out(fleet, ArtifactStore(fleet.service.artifacts_dir, keypair.trust), "2.0.0")
    assert fleet.devices.versions("toy") == {"2.0.0": 2}


def test_a_device_ahead_of_the_fleet_is_noticed_and_overtaken(fleet: Fleet,
                                                              keypair: KeyPair) -> None:
    """A fleet store older than a device's state (its revisions restarted lower): the fleet
    says so and continues above the device's revision, which the device then applies."""
    device = fleet.devices.devices[0]
    assert device.run.updater is not None
    applied = device.run.updater.revision
    artifacts = ArtifactStore(fleet.service.artifacts_dir, keypair.trust)
    desired = DesiredStates(fleet.store, artifacts, fleet.service.http_url)
    current = desired.get(device.device_id)
    assert current is not None
    with fleet.store.write() as conn:  # as if restored from a backup taken before the rollout
        conn.execute(desired_state.update().where(desired_state.c.device_id == device.device_id)
                     .values(revision=0, doc=current.model_copy(update={"revision": 0})
                             .model_dump_json(exclude_none=True)))
    # the device reports its state again when it reconnects
    device.go_offline()
    device.come_back()
    wait_until(lambda: (desired.get(device.device_id) or current).revision > applied, 30,
               "the fleet to continue above the device's revision")
    wait_until(lambda: device.run.updater is not None
               and device.run.updater.revision == applied + 1, 30,
               "the device to apply the fleet's next revision")
    assert device.active_version("toy") == "1.0.0"
