"""Rollouts end to end: real agents (cache, runtimes, monitor, outbox, link, updater) serving
held-out digits, the real fleet (ingestion, store, artifact endpoint, controller) on Mosquitto,
and models made by the converter.

All devices share this test's process and two cores with whatever else runs, so tail latency is
mostly scheduling noise here: the latency gate compares medians (p50), which a 3x-slower model
moves reliably; production fleets would gate on p95 over many devices.

A good version goes through every stage with no manual step; an erroring, a 3x-slower and a
disagreeing version are each stopped at the first stage by a named gate and rolled back, so that
at the end no device runs them; a device offline during a rollout converges when it returns.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edgeserve.demo.sim import FleetChild, SimFleet, Traffic
from edgeserve.fleet.artifacts import ArtifactStore
from edgeserve.fleet.rollouts.repo import Rollouts
from edgeserve.fleet.store import Store
from edgeserve.testing import KeyPair, make_keypair
from tests.services import free_port

# five versions converted, then five rollouts with soaks: minutes; the default timeout is 300 s
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

MODEL = "digits"
PROFILE = "onnx-only-e2e"
DEVICES = 10


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
    """v1, a better v2, and three broken versions, each converted and signed for real."""
    from edgeserve.converters import convert
    from edgeserve.demo.models import (
        erroring_variant,
        ink,
        scrambled_variant,
        slow_variant,
        train_digits,
    )

    root = tmp_path_factory.mktemp("e2e-models")
    previous = os.environ.get("EDGESERVE_PROFILE_PATH")
    os.environ["EDGESERVE_PROFILE_PATH"] = str(_profile_dir(root))
    key = make_keypair(root / "keys", "release")
    v1 = train_digits(seed=0, epochs=4)
    v2 = train_digits(seed=1, epochs=6)
    limit = float(np.quantile(ink(v1.x_test), 0.8))
    calm = ink(v1.x_train) <= limit
    builds = {
        "1.0.0": (v1, 1, v1.x_train),
        "2.0.0": (v2, 2, v1.x_train),
        "2.1.0": (erroring_variant(v2, limit), 3, v1.x_train[calm]),
        "2.2.0": (slow_variant(v2), 4, v1.x_train),
        "2.3.0": (scrambled_variant(seed=2), 5, v1.x_train),
    }
    paths = {}
    for version, (model, release, calibration) in builds.items():
        keep = ink(v1.x_test) <= limit if version == "2.1.0" else slice(None)
        result = convert(model.module, example_inputs=(v1.x_train[:1],), out=root / "dist",
                         sign_key=key.private_path, profiles=[PROFILE], name=MODEL,
                         version=version, release=release,
                         calibration={"input": calibration[:256]},
                         evaluation={"input": v1.x_test[keep], "labels": v1.y_test[keep]})
        assert result.ok, result.report
        paths[version] = result.package
    try:
        yield Packages(key, paths, v1.x_test, v1.y_test)
    finally:
        if previous is None:
            os.environ.pop("EDGESERVE_PROFILE_PATH", None)
        else:
            os.environ["EDGESERVE_PROFILE_PATH"] = previous


@pytest.fixture
def system(tmp_path: Path, packages: Packages, mqtt_broker: tuple[str, int],
           fleet_name: str) -> Iterator[tuple[Store, SimFleet]]:
    """The fleet service in its own process (as in production), devices in this one."""
    host, port = mqtt_broker
    # each piece is stopped (last started, first stopped) however far the setup got
    with contextlib.ExitStack() as stack:
        service = FleetChild(fleet_name, tmp_path, packages.key.public_path, broker_port=0,
                             http_port=free_port(), broker=f"mqtt://{host}:{port}",
                             tick_s=0.25).start()
        stack.callback(service.stop)
        store = Store.open(service.db_url, migrate=False)
        stack.callback(store.close)
        artifacts = ArtifactStore(service.artifacts_dir, packages.key.trust)
        for path in packages.paths.values():
            artifacts.publish(path)
        traffic = Traffic(MODEL, {"input": packages.x_test}, packages.y_test, rate_per_s=12)
        devices = SimFleet.build(DEVICES, [PROFILE], tmp_path / "devices",
                                 [packages.key.public_path], f"mqtt://{host}:{port}", fleet_name,
                                 traffic=traffic, window_s=0.5, prefix=fleet_name,
                                 fleet_keys=[service.fleet_public_key])
        stack.callback(devices.stop)
        devices.start()
        yield store, devices


def _rollout(store: Store, devices: SimFleet, version: str, timeout: float = 90,
             **spec: object) -> str:
    repo = Rollouts(store)
    record = repo.create({"model": MODEL, "version": version, "stages": [10, 50, 100],
                          "soak_seconds": 2.0, "min_requests": 120, "min_devices": 2,
                          "gates": ["error_rate<=0.02", "p50_ms<=3*control"], **spec})
    devices.wait_for(lambda: repo.get(record.id).state.done, timeout)
    return record.id


def test_good_version_completes_and_bad_ones_are_rolled_back(
        system: tuple[Store, SimFleet]) -> None:
    """v2 reaches every device; erroring, slow and disagreeing versions are stopped at stage 1."""
    store, devices = system
    repo = Rollouts(store)
    first = _rollout(store, devices, "1.0.0", stages=[100], gates=[])
    assert repo.get(first).state.phase == "completed", repo.get(first).state.reason
    assert devices.wait_for(lambda: devices.versions(MODEL) == {"1.0.0": DEVICES}, 30)

    good = _rollout(store, devices, "2.0.0")
    state = repo.get(good).state
    assert state.phase == "completed", state.reason
    assert [h.event for h in state.history].count("stage") == 2  # 10% -> 50% -> 100%, no manual step
    assert devices.wait_for(lambda: devices.versions(MODEL) == {"2.0.0": DEVICES}, 30)

    for version, gate, extra in (
            ("2.1.0", {"error_rate<=0.02", "device_health"}, {}),
            ("2.2.0", {"p50_ms<=3*control"}, {}),
            ("2.3.0", {"disagreement<=0.05"},
             {"strategy": "blue-green", "stages": [10, 100], "gates": ["disagreement<=0.05"]})):
        rid = _rollout(store, devices, version, **extra)
        state = repo.get(rid).state
        assert state.phase == "rolled-back", (version, state.phase, state.reason)
        assert state.failed_gate in gate, (version, state.failed_gate, state.reason)
        assert state.stage == 0, (version, state.stage)
        assert devices.wait_for(lambda v=version: devices.versions(MODEL) == {"2.0.0": DEVICES}
                                and not any(d.agent.shadows.shadow_of(MODEL) == v
                                            for d in devices.devices), 30), version
    served = sum(d.counts.requests for d in devices.devices)
    assert served > 1000


def test_offline_device_converges_on_reconnect(system: tuple[Store, SimFleet]) -> None:
    """A device offline for a whole rollout gets its desired version when it comes back."""
    store, devices = system
    repo = Rollouts(store)
    _rollout(store, devices, "1.0.0", stages=[100], gates=[])
    assert devices.wait_for(lambda: devices.versions(MODEL) == {"1.0.0": DEVICES}, 30)
    away = devices.devices[0]
    away.go_offline()
    rid = _rollout(store, devices, "2.0.0", stages=[50, 100], silent_after_s=3.0)
    state = repo.get(rid).state
    assert state.phase == "completed", state.reason
    assert away.active_version(MODEL) == "1.0.0"
    away.come_back()
    assert devices.wait_for(lambda: away.active_version(MODEL) == "2.0.0", 30)
