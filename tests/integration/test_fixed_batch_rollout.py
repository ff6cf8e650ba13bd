"""Rollouts with real agents, end to end: a plain ONNX model whose input is ``[1, 64]``
(the most common export from PyTorch and Keras), converted for real to ONNX and TFLite, rolled out
by the real fleet (its own process) over Mosquitto to four real agents.

It once failed every rollout: the agents ran the package's eight stacked health-check samples
through a batch-1 model in one call, failed their check and were rolled back. Here the rollout
goes through three stages to completion; a flaky link cuts the first artifact download after
30 %, which the device resumes (HTTP Range) within the same revision instead of failing the
rollout; and a version whose health check fails on the devices is rolled back even with no
gates and no soak, because a stage only counts devices that report the version committed.

Then what a fleet manager meets next: a rollback leaves a device the model it already ran; a
device whose profile has no artifact in the package is named when the rollout is created (and
left out with --only-fitting); a relative gate that can never have a control is refused, and a
stage that cannot finish is rolled back at its time limit with the reason.
"""

from __future__ import annotations

import contextlib
import io
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edgeserve.demo.sim import FleetChild, SimFleet, Traffic
from edgeserve.errors import ConfigError
from edgeserve.fleet.artifacts import ArtifactStore
from edgeserve.fleet.registry import list_devices
from edgeserve.fleet.rollouts.admission import create_rollout
from edgeserve.fleet.rollouts.controller import device_views
from edgeserve.fleet.rollouts.engine import RolloutSpec
from edgeserve.fleet.rollouts.repo import Rollouts
from edgeserve.fleet.store import Store
from edgeserve.manifest import parse_manifest
from edgeserve.package import PackageWriter
from edgeserve.testing import KeyPair, make_keypair
from tests.proxy import CuttingProxy
from tests.services import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "fixed64"
PROFILES = {"onnx": "fixed-onnx-e2e", "tflite": "fixed-tflite-e2e"}
COREML_ONLY = "coreml-only-e2e"
"""A device class whose only runtime is Core ML: no artifact of these packages fits it."""
DEVICES = 4
CUT_AT = 0.3


@dataclass
class Built:
    key: KeyPair
    paths: dict[str, Path]
    x: np.ndarray


def _write_profiles(directory: Path) -> Path:
    text = (Path(__file__).parents[2] / "hw-profiles" / "generic-cpu.toml").read_text()
    head = text[: text.index("[[artifacts]]")]
    directory.mkdir(parents=True, exist_ok=True)
    for fmt, name in PROFILES.items():
        (directory / f"{name}.toml").write_text(
            head.replace('"generic-cpu"', f'"{name}"')
            + f'[[artifacts]]\nformat = "{fmt}"\nprecision = "fp32"\n')
    coreml = head[: head.index("[runtimes.onnxruntime]")].replace('"generic-cpu"',
                                                                  f'"{COREML_ONLY}"')
    (directory / f"{COREML_ONLY}.toml").write_text(
        coreml + '[runtimes.coreml]\ncompute_units = "ALL"\n\n'
        '[[artifacts]]\nformat = "coreml"\nprecision = "fp16"\n')
    return directory


def _fixed_batch_onnx(path: Path, seed: int) -> Path:
    """x [1, 64] → MatMul → Relu → MatMul → Softmax → y [1, 4], as exporters write it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = {"w1": rng.normal(size=(64, 32)).astype(np.float32) * 0.2,
               "w2": rng.normal(size=(32, 4)).astype(np.float32) * 0.5}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["z"]),
             helper.make_node("Softmax", ["z"], ["y"], axis=-1)]
    graph = helper.make_graph(
        nodes, "fixed64", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(w, n) for n, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def _broken_build(good: Path, out: Path, key: KeyPair, version: str, release: int) -> Path:
    """``good`` re-signed as ``version`` with expected sample outputs that its model does not
    produce: a package whose health check fails on every device."""
    members: dict[str, bytes] = {}
    with zipfile.ZipFile(good) as zf:
        for name in zf.namelist():
            members[name] = zf.read(name)
    manifest = parse_manifest(members.pop("manifest.json"))
    members.pop("signature")
    with np.load(io.BytesIO(members["samples/expected.npz"])) as npz:
        wrong = {k: npz[k][:, ::-1].copy() for k in npz.files}
    buffer = io.BytesIO()
    np.savez(buffer, **wrong)  # type: ignore[arg-type]
    members["samples/expected.npz"] = buffer.getvalue()
    writer = PackageWriter(manifest.model_copy(update={"version": version, "release": release}))
    for name, data in members.items():
        writer.add_file(name, data)
    writer.write(out, key.private)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """1.0.0 and 2.0.0 converted for both profiles; 2.1.0 fails its health check on devices."""
    from edgeserve.converters import convert

    root = tmp_path_factory.mktemp("fixed-batch")
    previous = os.environ.get("EDGESERVE_PROFILE_PATH")
    os.environ["EDGESERVE_PROFILE_PATH"] = str(_write_profiles(root / "profiles"))
    key = make_keypair(root / "keys", "release")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 64)).astype(np.float32)
    paths = {}
    try:
        for version, release, seed in (("1.0.0", 1, 0), ("2.0.0", 2, 1)):
            source = _fixed_batch_onnx(root / f"model-{version}.onnx", seed)
            result = convert(source, out=root / "dist" / version, sign_key=key.private_path,
                             profiles=list(PROFILES.values()), name=MODEL, version=version,
                             release=release, calibration={"x": x[:200]},
                             evaluation={"x": x[200:]}, show_progress=False)
            assert result.ok and result.package is not None, result.report
            assert result.manifest is not None and result.manifest.inputs[0].shape == [1, 64]
            paths[version] = result.package
        paths["2.1.0"] = _broken_build(paths["2.0.0"], root / "dist" / "bad.edgepkg", key,
                                       "2.1.0", 3)
        yield Built(key, paths, x[200:])
    finally:
        if previous is None:
            os.environ.pop("EDGESERVE_PROFILE_PATH", None)
        else:
            os.environ["EDGESERVE_PROFILE_PATH"] = previous


@dataclass
class System:
    store: Store
    devices: SimFleet
    proxy: CuttingProxy
    artifacts: ArtifactStore


@pytest.fixture(params=sorted(PROFILES))
def system(request: pytest.FixtureRequest, tmp_path: Path, built: Built,
           mqtt_broker: tuple[str, int], fleet_name: str) -> Iterator[System]:
    """The fleet in its own process, its artifact endpoint behind a proxy that cuts the first
    download of a 2.0.0 artifact after 30 %, and four agents of one profile in this process."""
    with _system(tmp_path, built, mqtt_broker, fleet_name,
                 [PROFILES[request.param]] * DEVICES) as made:
        yield made


@pytest.fixture
def mixed(tmp_path: Path, built: Built, mqtt_broker: tuple[str, int],
          fleet_name: str) -> Iterator[System]:
    """Four ONNX agents and one whose only runtime is Core ML (the last device)."""
    with _system(tmp_path, built, mqtt_broker, fleet_name,
                 [PROFILES["onnx"]] * DEVICES + [COREML_ONLY]) as made:
        yield made


@contextlib.contextmanager
def _system(tmp_path: Path, built: Built, mqtt_broker: tuple[str, int], fleet_name: str,
            profiles: list[str]) -> Iterator[System]:
    host, port = mqtt_broker
    http_port = free_port()
    proxy = CuttingProxy(("127.0.0.1", http_port), cut_when=lambda seen, i: CUT_AT if (
        "/2.0.0/files/artifacts/" in seen.path and i == 0) else None)
    service = FleetChild(fleet_name, tmp_path, built.key.public_path, broker_port=0,
                         http_port=http_port, broker=f"mqtt://{host}:{port}", tick_s=0.25,
                         public_url=proxy.url)
    store = devices = None
    try:
        service.start()
        store = Store.open(service.db_url, migrate=False)
        artifacts = ArtifactStore(service.artifacts_dir, built.key.trust)
        for path in built.paths.values():
            artifacts.publish(path)
        traffic = Traffic(MODEL, {"x": built.x}, rate_per_s=10, feedback=False)
        devices = SimFleet.build(len(profiles), profiles, tmp_path / "devices",
                                 [built.key.public_path], f"mqtt://{host}:{port}", fleet_name,
                                 traffic=traffic, window_s=0.5, prefix=fleet_name,
                                 fleet_keys=[service.fleet_public_key]).start()
        made = System(store, devices, proxy, artifacts)
        # every device registered with its profile: what rollout admission checks
        assert devices.wait_for(lambda: {d.device_id for d in list_devices(made.store)
                                         if d.profile} >= {d.device_id for d in devices.devices},
                                30), "devices did not register"
        yield made
    finally:
        if devices is not None:
            devices.stop()
        service.stop()
        if store is not None:
            store.close()
        proxy.close()


def _rollout(system: System, version: str, timeout: float = 120, only_fitting: bool = False,
             **spec: object) -> str:
    """Create a rollout the way 'fleet rollout create' does (admission first); wait for its end."""
    repo = Rollouts(system.store)
    record, _ = create_rollout(system.store, system.artifacts,
                               {"model": MODEL, "version": version, **spec},
                               only_fitting=only_fitting)
    assert system.devices.wait_for(lambda: repo.get(record.id).state.done, timeout), \
        repo.get(record.id).state
    return record.id


def test_fixed_batch_model_rolls_out_through_three_stages(system: System) -> None:
    """[1, 64] ONNX and TFLite artifacts pass the devices' health checks and complete every
    stage; the device whose download was cut resumes it with Range, under 1.1x the file."""
    repo = Rollouts(system.store)
    first = _rollout(system, "1.0.0", stages=[100], gates=[], soak_seconds=0)
    assert repo.get(first).state.phase == "completed", repo.get(first).state.reason
    assert system.devices.versions(MODEL) == {"1.0.0": DEVICES}

    rid = _rollout(system, "2.0.0", stages=[25, 50, 100], gates=["error_rate<=0.01"],
                   min_requests=20, soak_seconds=1.0, min_devices=1)
    state = repo.get(rid).state
    assert state.phase == "completed", (state.reason, state.history[-5:])
    assert [h.event for h in state.history].count("stage") == 2
    assert system.devices.versions(MODEL) == {"2.0.0": DEVICES}
    for device in system.devices.devices:
        updater = device.run.updater
        assert updater is not None
        assert updater.current_report().models[MODEL].state == "committed"

    downloads = system.proxy.seen("/2.0.0/files/artifacts/")
    cut = downloads[0]
    assert cut.cut and cut.range is None
    same_device = [s for s in downloads if s.user_agent == cut.user_agent]
    assert "device/" in cut.user_agent and len(same_device) == 2, downloads
    resumed = same_device[1]
    assert resumed.range == f"bytes={cut.body_bytes}-", resumed
    size = system.artifacts.file_path(MODEL, "2.0.0", cut.path.split("/files/", 1)[1]).stat().st_size
    assert cut.body_bytes + resumed.body_bytes <= 1.1 * size
    assert cut.body_bytes >= 0.25 * size  # the cut really happened part-way


def test_version_failing_its_health_check_is_rolled_back_without_gates(system: System) -> None:
    """With no gates and no soak, a version every device fails its check on ends rolled back
    (named device_health), and the devices return to the version they ran."""
    repo = Rollouts(system.store)
    _rollout(system, "1.0.0", stages=[100], gates=[], soak_seconds=0)
    rid = _rollout(system, "2.1.0", stages=[100], gates=[], soak_seconds=0)
    state = repo.get(rid).state
    assert state.phase == "rolled-back", (state.phase, state.reason)
    assert state.failed_gate == "device_health" and "health check failed" in (state.reason or "")
    assert "completed" not in [h.event for h in state.history]
    assert system.devices.wait_for(lambda: system.devices.versions(MODEL) == {"1.0.0": DEVICES},
                                   30)


def test_rollback_keeps_a_model_the_rollout_did_not_bring(mixed: System, built: Built) -> None:
    """A device that already ran 2.1.0 (installed by hand) keeps serving it when the rollout
    of 2.1.0 rolls back because the others fail it; they return to 1.0.0."""
    repo = Rollouts(mixed.store)
    _rollout(mixed, "1.0.0", stages=[100], gates=[], soak_seconds=0, only_fitting=True)
    keeper = mixed.devices.devices[0]
    keeper.agent.install(built.paths["2.1.0"])
    assert keeper.active_version(MODEL) == "2.1.0"
    # the agent reports a version activated by hand; the rollout starts once the fleet knows
    probe = RolloutSpec(id="probe", model=MODEL, version="2.1.0")
    assert mixed.devices.wait_for(lambda: {v.device_id: v.active for v in device_views(
        mixed.store, probe, 0.0)}.get(keeper.device_id) == "2.1.0", 30)
    rid = _rollout(mixed, "2.1.0", stages=[100], gates=[], soak_seconds=0, only_fitting=True)
    state = repo.get(rid).state
    assert state.phase == "rolled-back" and state.failed_gate == "device_health"
    assert state.assigned[keeper.device_id] == "2.1.0"
    others = mixed.devices.devices[1:DEVICES]
    assert mixed.devices.wait_for(lambda: all(d.active_version(MODEL) == "1.0.0"
                                              for d in others), 30)
    assert keeper.active_version(MODEL) == "2.1.0"
    assert keeper.agent.predict(MODEL, {"x": np.zeros((1, 64), np.float32)}).version == "2.1.0"


def test_a_device_without_a_fitting_artifact_is_named_at_create_time(mixed: System) -> None:
    """The Core ML-only device makes 'create' refuse, naming it; --only-fitting rolls out to
    the four others and leaves it untouched."""
    with pytest.raises(ConfigError) as err:
        create_rollout(mixed.store, mixed.artifacts, {"model": MODEL, "version": "1.0.0",
                                                      "stages": [100], "gates": []})
    odd = mixed.devices.devices[-1].device_id
    assert f"{odd} (profile {COREML_ONLY}" in str(err.value) and "--only-fitting" in str(err.value)
    assert not Rollouts(mixed.store).find()
    rid = _rollout(mixed, "1.0.0", stages=[100], gates=[], soak_seconds=0, only_fitting=True)
    assert Rollouts(mixed.store).get(rid).state.phase == "completed"
    assert mixed.devices.versions(MODEL) == {"1.0.0": DEVICES, None: 1}


def test_gates_that_can_never_decide_are_refused_or_time_out(mixed: System) -> None:
    """A relative gate on a first deployment is refused at once; a stage whose gate cannot pass
    in time is rolled back at its limit with what it waited for, and removes what it brought."""
    with pytest.raises(ConfigError, match="no device in scope runs fixed64 yet"):
        create_rollout(mixed.store, mixed.artifacts, {
            "model": MODEL, "version": "1.0.0", "stages": [50, 100],
            "gates": ["p95_ms<=1.2*control"]}, only_fitting=True)
    rid = _rollout(mixed, "1.0.0", stages=[100], gates=["requests>=100000"], soak_seconds=0,
                   stage_timeout_s=5, only_fitting=True)
    state = Rollouts(mixed.store).get(rid).state
    assert state.phase == "rolled-back" and state.failed_gate == "stage_timeout"
    assert "did not complete within 5 s" in (state.reason or "")
    assert "gate requests>=100000 pending" in (state.reason or "")
    assert mixed.devices.wait_for(lambda: mixed.devices.versions(MODEL) == {None: DEVICES + 1},
                                  30)
