"""Model deltas end to end: real agents on Mosquitto, the fleet service in its own process, and
models made by the converter.

v1 of the digits CNN is rolled out; then v1.1, whose classification head alone was retrained.
Every device holds v1's artifact, so it asks for a delta, rebuilds v1.1's artifact, checks it
against the signed manifest, activates and commits it; the fleet counts what it sent and the
rollout API reports the bytes saved. When the fleet's cached delta is damaged, every device
refuses it, downloads the artifact in full and counts the fallback; nothing unverified is
installed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edgeserve.contract import Delivery
from edgeserve.demo.sim import FleetChild, SimDevice, SimFleet, Traffic
from edgeserve.fleet.artifacts import ArtifactStore
from edgeserve.fleet.deltas import DeltaCache
from edgeserve.fleet.rollouts.repo import Rollouts
from edgeserve.fleet.store import Store
from edgeserve.fleet.transfers import TransferLog
from edgeserve.testing import KeyPair, make_keypair
from tests.core.test_cli import run
from tests.services import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = "digits"
PROFILE = "onnx-only-delta"
DEVICES = 3


@dataclass
class Packages:
    key: KeyPair
    paths: dict[str, Path]
    x_test: np.ndarray
    y_test: np.ndarray


def _profile_dir(root: Path) -> Path:
    text = (Path(__file__).parents[2] / "hw-profiles" / "generic-cpu.toml").read_text()
    head = text[: text.index("[[artifacts]]")].replace('"generic-cpu"', f'"{PROFILE}"')
    directory = root / "profiles"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{PROFILE}.toml").write_text(
        head + '[[artifacts]]\nformat = "onnx"\nprecision = "fp32"\n')
    return directory


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Packages]:
    """v1 and a head-retrained v1.1, converted and signed for real."""
    from edgeserve.converters import convert
    from edgeserve.demo.models import retrain_head, train_digits

    root = tmp_path_factory.mktemp("delta-models")
    previous = os.environ.get("EDGESERVE_PROFILE_PATH")
    os.environ["EDGESERVE_PROFILE_PATH"] = str(_profile_dir(root))
    key = make_keypair(root / "keys", "release")
    v1 = train_digits(seed=0, epochs=4)
    paths = {}
    for release, (version, model) in enumerate((("1.0.0", v1), ("1.1.0", retrain_head(v1))),
                                               start=1):
        result = convert(model.module, example_inputs=(v1.x_train[:1],), out=root / "dist",
                         sign_key=key.private_path, profiles=[PROFILE], name=MODEL,
                         version=version, release=release,
                         calibration={"input": v1.x_train[:256]},
                         evaluation={"input": v1.x_test, "labels": v1.y_test})
        assert result.ok, result.report
        paths[version] = result.package
    try:
        yield Packages(key, paths, v1.x_test, v1.y_test)
    finally:
        if previous is None:
            os.environ.pop("EDGESERVE_PROFILE_PATH", None)
        else:
            os.environ["EDGESERVE_PROFILE_PATH"] = previous


@dataclass
class System:
    service: FleetChild
    store: Store
    artifacts: ArtifactStore
    devices: SimFleet


@contextlib.contextmanager
def _system(root: Path, packages: Packages, broker: tuple[str, int], fleet_name: str,
            labels: dict[str, str] | None) -> Iterator[System]:
    """The fleet service in its own process, devices (labelled ``labels``) in this one."""
    host, port = broker
    with contextlib.ExitStack() as stack:
        service = FleetChild(fleet_name, root, packages.key.public_path, broker_port=0,
                             http_port=free_port(), broker=f"mqtt://{host}:{port}",
                             tick_s=0.25).start()
        stack.callback(service.stop)
        store = Store.open(service.db_url, migrate=False)
        stack.callback(store.close)
        artifacts = ArtifactStore(service.artifacts_dir, packages.key.trust)
        for path in packages.paths.values():
            artifacts.publish(path)
        traffic = Traffic(MODEL, {"input": packages.x_test}, packages.y_test, rate_per_s=5)
        devices = SimFleet([
            SimDevice(f"{fleet_name}-{i:03d}", PROFILE, root / "devices",
                      [packages.key.public_path], f"mqtt://{host}:{port}", fleet_name,
                      window_s=0.5, labels=labels, traffic=traffic, seed=i,
                      fleet_keys=[service.fleet_public_key]) for i in range(DEVICES)])
        stack.callback(devices.stop)
        devices.start()
        yield System(service, store, artifacts, devices)


@pytest.fixture
def system(tmp_path: Path, packages: Packages, mqtt_broker: tuple[str, int],
           fleet_name: str) -> Iterator[System]:
    with _system(tmp_path, packages, mqtt_broker, fleet_name, None) as built:
        yield built


@pytest.fixture
def mqtt_system(tmp_path: Path, packages: Packages, mqtt_broker: tuple[str, int],
                fleet_name: str) -> Iterator[System]:
    """Devices labelled transport=mqtt: the fleet tells them to fetch in chunks over MQTT."""
    with _system(tmp_path, packages, mqtt_broker, fleet_name, {"transport": "mqtt"}) as built:
        yield built


def _roll_out(system: System, version: str) -> str:
    repo = Rollouts(system.store)
    record = repo.create({"model": MODEL, "version": version, "stages": [100], "gates": [],
                          "soak_seconds": 0.5, "min_devices": 1})
    system.devices.wait_for(lambda: repo.get(record.id).state.done, 120)
    state = repo.get(record.id).state
    assert state.phase == "completed", state.reason
    assert system.devices.wait_for(
        lambda: system.devices.versions(MODEL) == {version: DEVICES}, 60)
    return record.id


def _deliveries(system: System) -> list[Delivery]:
    found = []
    for device in system.devices.devices:
        updater = device.run.updater
        assert updater is not None
        delivery = updater.current_report().models[MODEL].delivery
        assert delivery is not None and delivery.version == "1.1.0"
        found.append(delivery)
    return found


def _artifact(system: System, version: str) -> str:
    (artifact,) = system.artifacts.manifest(MODEL, version).artifacts
    return artifact.path


def _installed_verified(system: System) -> None:
    """Every device's v1.1 artifact is exactly the bytes the signed manifest pins."""
    path = _artifact(system, "1.1.0")
    signed = system.artifacts.manifest(MODEL, "1.1.0").files[path].sha256
    for device in system.devices.devices:
        cache = device.agent.cache
        blob = cache.blob_path(cache.record(MODEL, "1.1.0").files[path])
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == signed


def _artifact_kinds(system: System) -> list[str]:
    log = TransferLog(system.service.artifacts_dir)
    path = _artifact(system, "1.1.0")
    return [str(e["kind"]) for e in log.entries(MODEL, "1.1.0") if e["file"] == path]


def test_head_retrained_version_is_rolled_out_by_delta(system: System) -> None:
    """Every device gets v1.1's artifact as a delta, verifies, activates and commits it; the
    fleet counts the bytes and the rollout API reports what was saved."""
    _roll_out(system, "1.0.0")
    rid = _roll_out(system, "1.1.0")
    _installed_verified(system)
    full = system.artifacts.manifest(MODEL, "1.1.0").files[_artifact(system, "1.1.0")].size
    for delivery in _deliveries(system):
        assert delivery.delta_files == 1 and delivery.fallbacks == 0, delivery
        assert delivery.received < delivery.full_bytes / 2, delivery
    assert _artifact_kinds(system) == ["delta"] * DEVICES
    with urllib.request.urlopen(f"{system.service.http_url}/api/v1/rollouts/{rid}",
                                timeout=10) as response:
        transfer = json.loads(response.read())["transfer"]
    assert transfer["delta_transfers"] == DEVICES
    assert transfer["delta_full_bytes"] == DEVICES * full
    assert transfer["delta_bytes_sent"] < 0.05 * DEVICES * full, transfer
    assert transfer["saved"] > 0.9 * DEVICES * full, transfer
    assert transfer["fallbacks"] == 0
    status = run("fleet", "rollout", "status", rid, "--db", system.service.db_url,
                 "--artifacts", str(system.service.artifacts_dir), "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)[0]["transfer"] == transfer
    shown = run("fleet", "rollout", "status", rid, "--db", system.service.db_url,
                "--artifacts", str(system.service.artifacts_dir))
    assert f"{DEVICES} file(s) as deltas" in shown.stdout and "saved" in shown.stdout


def test_damaged_delta_falls_back_to_the_full_artifact(system: System) -> None:
    """The fleet's cached delta is damaged: every device refuses it by hash, downloads the
    artifact in full, counts the fallback, and installs only the signed bytes."""
    _roll_out(system, "1.0.0")
    path = _artifact(system, "1.1.0")
    base = system.artifacts.manifest(MODEL, "1.0.0").files[_artifact(system, "1.0.0")].sha256
    offer = DeltaCache(system.artifacts).offer(MODEL, "1.1.0", path, base)
    assert offer.path is not None
    damaged = bytearray(offer.path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    offer.path.write_bytes(bytes(damaged))
    _roll_out(system, "1.1.0")
    _installed_verified(system)
    for delivery in _deliveries(system):
        assert delivery.fallbacks == 1 and delivery.delta_files == 0, delivery
        assert delivery.received >= delivery.full_bytes, delivery
    kinds = _artifact_kinds(system)
    assert kinds.count("full") == DEVICES and kinds.count("delta") == DEVICES
    summary = TransferLog(system.service.artifacts_dir).summary(MODEL, "1.1.0")
    assert summary.fallbacks == DEVICES


def test_head_retrained_version_is_delivered_by_delta_over_mqtt(mqtt_system: System) -> None:
    """Devices that fetch over MQTT chunks get the same delta through the fleet's file
    answers, verify, activate and commit v1.1; the fleet counts the delta chunks."""
    system = mqtt_system
    _roll_out(system, "1.0.0")
    rid = _roll_out(system, "1.1.0")
    _installed_verified(system)
    for delivery in _deliveries(system):
        assert delivery.delta_files == 1 and delivery.fallbacks == 0, delivery
        assert delivery.received < delivery.full_bytes / 2, delivery
    full = system.artifacts.manifest(MODEL, "1.1.0").files[_artifact(system, "1.1.0")].size
    with urllib.request.urlopen(f"{system.service.http_url}/api/v1/rollouts/{rid}",
                                timeout=10) as response:
        transfer = json.loads(response.read())["transfer"]
    assert transfer["delta_transfers"] == DEVICES, transfer
    assert transfer["saved"] > 0.9 * DEVICES * full, transfer
