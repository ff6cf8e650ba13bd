"""The Python API over real ONNX Runtime and LiteRT artifacts made in the tests."""

from __future__ import annotations

import re
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgeserve.device_agent import Agent, required_files, select_artifact
from edgeserve.device_agent.observe import InferenceEvent
from edgeserve.errors import (
    CacheError,
    ConfigError,
    InvalidInputError,
    ModelNotFoundError,
    RollbackError,
    TamperedFileError,
    UntrustedKeyError,
)
from edgeserve.package import open_package
from edgeserve.profiles import HardwareProfile, load_profile

from .models import conv_weights, mlp_weights

X = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)


@pytest.fixture
def agent(tmp_path: Path, agent_assets: dict[str, Path]) -> Agent:
    with Agent(tmp_path / "cache", trusted_keys=[agent_assets["public_key"]]) as made:
        yield made


def test_install_keeps_only_the_profile_artifact(agent: Agent,
                                                 agent_assets: dict[str, Path]) -> None:
    """generic-cpu keeps the ONNX fp32 artifact, samples and reference, not the TFLite files."""
    info = agent.install(agent_assets["pkg_v1"])
    assert (info.name, info.version, info.artifact_id, info.active) == \
        ("toy", "1.0.0", "onnx-fp32", True)
    record = agent.cache.record("toy", "1.0.0")
    assert not any(name.endswith(".tflite") for name in record.files)
    assert {"samples/inputs.npz", "samples/expected.npz", "reference/stats.json"} <= \
        set(record.files)
    assert agent.reference_stats("toy") is not None


def test_predict_matches_numpy_reference(agent: Agent, agent_assets: dict[str, Path]) -> None:
    """predict returns the model's outputs (same numbers as the weights in numpy)."""
    agent.install(agent_assets["pkg_v1"])
    result = agent.predict("toy", {"x": X}, request_id="r1")
    assert result.version == "1.0.0" and result.request_id == "r1" and result.latency_ms > 0
    np.testing.assert_allclose(result.outputs["y"], mlp_weights().forward(X), atol=1e-5)


@pytest.mark.parametrize("profile_key", ["profile_tflite", "profile_int8"])
def test_tflite_artifacts_serve_the_model_signature(tmp_path: Path, agent_assets: dict[str, Path],
                                                    profile_key: str) -> None:
    """TFLite fp32 and full-int8 (int8 I/O) artifacts take and return the model's float tensors."""
    profile = load_profile(agent_assets[profile_key])
    with Agent(tmp_path / "c", profile, [agent_assets["public_key"]]) as agent:
        info = agent.install(agent_assets["pkg_v1"])
        assert info.format == "tflite"
        out = agent.predict("toy", {"x": X}).outputs["y"]
        assert out.dtype == np.float32 and out.shape == (5, 3)
        tolerance = 1e-5 if profile.name == "test-tflite" else 0.08
        np.testing.assert_allclose(out, mlp_weights().forward(X), atol=tolerance)
        check = agent.check_samples("toy")
        assert check.ok and check.samples == 8, check.message


def test_nhwc_tflite_artifact_takes_nchw_inputs(tmp_path: Path, agent_assets: dict[str, Path],
                                                tflite_profile: HardwareProfile) -> None:
    """An NHWC TFLite artifact is fed the model's NCHW images and agrees with the ONNX artifact."""
    images = np.random.default_rng(2).normal(size=(3, 3, 8, 8)).astype(np.float32)
    trust = [agent_assets["public_key"]]
    with Agent(tmp_path / "a", tflite_profile, trust) as lite, Agent(tmp_path / "b",
                                                                     trusted_keys=trust) as ort:
        assert lite.install(agent_assets["conv"]).format == "tflite"
        assert ort.install(agent_assets["conv"]).format == "onnx"
        a = lite.predict("conv", {"image": images}).outputs["logits"]
        b = ort.predict("conv", {"image": images}).outputs["logits"]
    np.testing.assert_allclose(a, b, atol=1e-4)
    w = conv_weights()
    assert a.shape == (3, 2) and np.isfinite(w["w"]).all()


def test_bad_inputs_raise_precise_errors(agent: Agent, agent_assets: dict[str, Path]) -> None:
    """Wrong names, ranks, fixed dimensions and dtypes raise InvalidInputError naming the tensor."""
    agent.install(agent_assets["pkg_v1"])
    cases = [({"z": X}, "missing input(s) ['x']"),
             ({"x": X[0]}, "expected rank 2"),
             ({"x": np.zeros((2, 5), np.float32)}, "axis 1 must be 4"),
             ({"x": np.array([["a"] * 4])}, "expected dtype float32")]
    for inputs, message in cases:
        with pytest.raises(InvalidInputError, match=re.escape(message)):
            agent.predict("toy", inputs)
    with pytest.raises(ModelNotFoundError):
        agent.predict("nope", {"x": X})
    with pytest.raises(ModelNotFoundError):
        agent.predict("toy", {"x": X}, version="9.9.9")


def test_versions_activate_rollback_and_refuse_downgrade(tmp_path: Path, agent: Agent,
                                                         agent_assets: dict[str, Path]) -> None:
    """v2 becomes active with v1 previous; rollback swaps; an older release is refused."""
    agent.install(agent_assets["pkg_v1"])
    agent.install(agent_assets["pkg_v2"])
    assert agent.predict("toy", {"x": X}).version == "1.1.0"
    states = {v.version: (v.active, v.previous) for v in agent.list_models()}
    assert states == {"1.0.0": (False, True), "1.1.0": (True, False)}
    assert agent.rollback("toy").version == "1.0.0"
    assert agent.predict("toy", {"x": X}).version == "1.0.0"
    agent.activate("toy", "1.1.0")
    agent.remove("toy", "1.0.0")
    with pytest.raises(RollbackError, match="older than the release 2"):
        agent.install(agent_assets["pkg_v1"])
    with pytest.raises(ConfigError, match="active version"):
        agent.remove("toy", "1.1.0")
    assert agent.remove("toy") == ["1.1.0"]
    assert agent.list_models() == []


def test_untrusted_package_is_refused(tmp_path: Path, agent_assets: dict[str, Path],
                                      other_keypair: object) -> None:
    """A package signed by a key the agent does not pin is refused and nothing is cached."""
    stranger = other_keypair.public_path
    with Agent(tmp_path / "c", trusted_keys=[stranger]) as agent:
        with pytest.raises(UntrustedKeyError):
            agent.install(agent_assets["pkg_v1"])
        assert agent.list_models() == [] and agent.cache.used_bytes() == 0


def test_install_from_parts(tmp_path: Path, agent: Agent, agent_assets: dict[str, Path]) -> None:
    """Manifest + signature + the required files install the same version; a bad file is refused."""
    with open_package(agent_assets["pkg_v1"]) as pkg:
        needed = required_files(pkg.manifest, agent.profile)
        paths = pkg.extract(needed, tmp_path / "parts")
        with zipfile.ZipFile(agent_assets["pkg_v1"]) as zf:
            manifest_bytes, signature = zf.read("manifest.json"), zf.read("signature")
    assert needed == ["artifacts/toy.onnx", "reference/stats.json", "samples/expected.npz",
                      "samples/inputs.npz"]
    files = dict(zip(needed, paths, strict=True))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(TamperedFileError):
        agent.install_parts(manifest_bytes, signature, {**files, "artifacts/toy.onnx": bad})
    info = agent.install_parts(manifest_bytes, signature, files)
    assert info.artifact_id == "onnx-fp32" and info.active
    np.testing.assert_allclose(agent.predict("toy", {"x": X}).outputs["y"],
                               mlp_weights().forward(X), atol=1e-5)


def test_damaged_blob_is_never_served(tmp_path: Path, agent_assets: dict[str, Path]) -> None:
    """A blob edited by hand makes loading fail; check() drops the version and reports it."""
    trust = [agent_assets["public_key"]]
    with Agent(tmp_path / "c", trusted_keys=trust) as agent:
        agent.install(agent_assets["pkg_v1"])
        record = agent.cache.record("toy", "1.0.0")
        blob = agent.cache.blob_path(record.files["artifacts/toy.onnx"])
        blob.chmod(0o644)
        blob.write_bytes(blob.read_bytes()[:-3] + b"xyz")
    with Agent(tmp_path / "c", trusted_keys=trust) as fresh:
        with pytest.raises(CacheError, match="damaged"):
            fresh.predict("toy", {"x": X})
        report = fresh.check()
        assert report.ok and any("damaged" in r for r in report.repaired)
        assert fresh.list_models() == []
        with pytest.raises(ModelNotFoundError):
            fresh.predict("toy", {"x": X})


def test_lru_eviction_keeps_active_and_previous(tmp_path: Path,
                                                agent_assets: dict[str, Path]) -> None:
    """Over budget, the least recently used version goes; active and previous never do."""
    trust = [agent_assets["public_key"]]
    with Agent(tmp_path / "c", trusted_keys=trust, cache_bytes=1) as agent:
        agent.install(agent_assets["pkg_v1"])
        agent.install(agent_assets["pkg_v2"])
        assert {v.version for v in agent.list_models()} == {"1.0.0", "1.1.0"}
        agent.install(agent_assets["pkg_v3"])
        assert {v.version for v in agent.list_models()} == {"1.1.0", "1.2.0"}
        assert agent.predict("toy", {"x": X}).version == "1.2.0"
        assert agent.rollback("toy").version == "1.1.0"
        assert agent.cache.check().ok


def test_threads_and_observers(agent: Agent, agent_assets: dict[str, Path]) -> None:
    """Concurrent predictions are correct and each one reaches the observer, errors included."""
    agent.install(agent_assets["pkg_v1"])
    events: list[InferenceEvent] = []
    lock = threading.Lock()

    class Collect:
        def on_inference(self, event: InferenceEvent) -> None:
            with lock:
                events.append(event)

    agent.add_observer(Collect())
    expected = mlp_weights().forward(X)
    failures: list[str] = []

    def work() -> None:
        for _ in range(50):
            out = agent.predict("toy", {"x": X}).outputs["y"]
            if not np.allclose(out, expected, atol=1e-5):
                failures.append("mismatch")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with pytest.raises(InvalidInputError):
        agent.predict("toy", {"x": X[0]})
    assert not failures and len(events) == 201
    assert events[-1].error is not None and events[0].batch_size == 5
    assert events[0].extra["artifact"] == "onnx-fp32"


def test_event_batch_size_comes_from_the_first_input_unless_given() -> None:
    """An InferenceEvent's batch size is its first input's first axis (1 for a scalar, a
    non-array or no inputs) unless the caller gives one."""
    out = {"y": np.zeros((1, 3))}
    assert InferenceEvent("m", "1", {"x": np.zeros((7, 4))}, out, 1.0).batch_size == 7
    assert InferenceEvent("m", "1", {"x": np.zeros((7, 4))}, out, 1.0, None, None,
                          2).batch_size == 2
    assert InferenceEvent("m", "1", {"x": np.float32(3)}, out, 1.0).batch_size == 1
    assert InferenceEvent("m", "1", {"x": [1, 2]}, out, 1.0).batch_size == 1  # type: ignore[dict-item]
    assert InferenceEvent("m", "1", {}, None, 1.0).batch_size == 1


def test_predict_batch_splits_results(agent: Agent, agent_assets: dict[str, Path]) -> None:
    """predict_batch runs many requests at once and returns one result per request, in order."""
    agent.install(agent_assets["pkg_v1"])
    items = [{"x": X[:2]}, {"x": X[2:3]}, {"x": X[3:]}]
    results = agent.predict_batch("toy", items)
    assert [r.outputs["y"].shape[0] for r in results] == [2, 1, 2]
    np.testing.assert_allclose(np.concatenate([r.outputs["y"] for r in results]),
                               mlp_weights().forward(X), atol=1e-5)


def test_core_ml_off_macos_is_a_clear_error(tmp_path: Path) -> None:
    """A Core ML-only package on Linux is refused with an error that says why."""
    import sys

    from edgeserve.device_agent.runtimes import ArtifactSource, load_runtime
    from edgeserve.errors import RuntimeUnavailableError
    from edgeserve.testing import make_manifest

    if sys.platform == "darwin":
        pytest.skip("Core ML runs on macOS")
    manifest = make_manifest(artifacts=[{"id": "coreml-fp16", "format": "coreml",
                                         "precision": "fp16", "path": "artifacts/m.mlpackage"}])
    with pytest.raises(RuntimeUnavailableError, match="macOS"):
        select_artifact(manifest, load_profile("iphone-15-pro"), "coreml-fp16")
    with pytest.raises(RuntimeUnavailableError, match="no artifact that profile"):
        select_artifact(manifest, load_profile("iphone-15-pro"))
    with pytest.raises(RuntimeUnavailableError, match="only on macOS"):
        load_runtime("coreml", ArtifactSource(path=tmp_path), load_profile("iphone-15-pro"))


def test_tflite_runtime_fallback(tmp_path: Path, agent_assets: dict[str, Path],
                                 tflite_profile: HardwareProfile,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ai_edge_litert the agent loads TFLite through a ``tflite_runtime`` module."""
    import sys
    import types

    from ai_edge_litert import interpreter as lite

    fallback = types.ModuleType("tflite_runtime.interpreter")
    fallback.Interpreter = lite.Interpreter  # type: ignore[attr-defined]
    fallback.load_delegate = lite.load_delegate  # type: ignore[attr-defined]
    package = types.ModuleType("tflite_runtime")
    package.interpreter = fallback  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", package)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", fallback)
    from edgeserve.device_agent.runtimes.litert import import_interpreter

    assert import_interpreter()[0] is lite.Interpreter
    with Agent(tmp_path / "c", tflite_profile, [agent_assets["public_key"]]) as agent:
        agent.install(agent_assets["pkg_v1"], artifact_id="tflite-fp32")
        np.testing.assert_allclose(agent.predict("toy", {"x": X}).outputs["y"],
                                   mlp_weights().forward(X), atol=1e-5)
