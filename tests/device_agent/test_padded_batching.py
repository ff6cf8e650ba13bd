"""Batching a fixed-batch artifact through its batch-N variant (:class:`PaddedRuntime`), on real
ONNX Runtime sessions: the variant's tensors are found by the manifest's names whatever their
order, partial and oversized stacks are split and padded, and a variant that cannot serve costs
the batching, never the model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from edgeserve.device_agent import Agent
from edgeserve.device_agent.batching import BatchingRuntime, BatchPolicy, PaddedRuntime
from edgeserve.device_agent.runtimes import ArtifactSource
from edgeserve.device_agent.runtimes.onnx import OnnxRuntime
from edgeserve.device_agent.telemetry.monitor import Monitor
from edgeserve.device_agent.telemetry.outbox import Outbox
from edgeserve.errors import ConfigError
from edgeserve.profiles import load_profile
from edgeserve.testing import KeyPair, make_manifest, write_test_package
from tests.support import from_threads

W = np.random.default_rng(5).standard_normal((4, 3)).astype(np.float32)
V = np.random.default_rng(6).standard_normal((4, 3)).astype(np.float32)


def _two_heads(batch: int, names: tuple[str, str] = ("a", "b"), swap: bool = False,
               features: int = 4) -> bytes:
    """x [batch, features] -> a = x W, b = tanh(x V): two outputs of one shape; ``swap`` lists
    them the other way round (as another exporter run may)."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.resize(W, (features, 3)).astype(np.float32)
    v = np.resize(V, (features, 3)).astype(np.float32)
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [batch, 3]) for n in names]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], [names[0]]),
         helper.make_node("MatMul", ["x", "v"], ["xv"]),
         helper.make_node("Tanh", ["xv"], [names[1]])], "heads",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, features])],
        outputs[::-1] if swap else outputs,
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(v, "v")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString()


def _runtime(content: bytes) -> OnnxRuntime:
    return OnnxRuntime(ArtifactSource(content=content), load_profile("generic-cpu"))


def test_the_variant_is_read_by_name_in_chunks_of_n_with_padding() -> None:
    single = _runtime(_two_heads(1))
    variant = _runtime(_two_heads(4, ("head_b", "head_a")[::-1], swap=True))
    # the manifest pairs a<->head_a, b<->head_b; the variant lists head_b first
    padded = PaddedRuntime(single, variant, [("x", "x")], [("a", "head_a"), ("b", "head_b")])
    assert padded.size == 4 and [t.shape for t in padded.inputs] == [(None, 4)]
    assert [t.name for t in padded.outputs] == ["a", "b"]
    rng = np.random.default_rng(1)
    for count in (1, 2, 3, 4, 5, 8, 9):  # alone, partial, full, and more than one stack
        x = rng.standard_normal((count, 4)).astype(np.float32)
        a, b = padded.run({"x": x})
        assert a.shape == b.shape == (count, 3)
        alone = [single.run({"x": x[i:i + 1]}) for i in range(count)]
        np.testing.assert_allclose(a, np.concatenate([o[0] for o in alone]), rtol=1e-6)
        np.testing.assert_allclose(b, np.concatenate([o[1] for o in alone]), rtol=1e-6)
        np.testing.assert_allclose(b, np.tanh(x @ V), rtol=1e-5, atol=1e-6)
    padded.close()


@pytest.mark.parametrize(("variant", "why"), [
    (lambda: _two_heads(4, features=5), "do not match"),          # other features
    (lambda: _two_heads(1), "one size ≥ 2"),                      # not a batch-N graph
])
def test_a_variant_that_does_not_fit_is_refused(variant: object, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        PaddedRuntime(_runtime(_two_heads(1)), _runtime(variant()))  # type: ignore[operator]


def _package(tmp_path: Path, keypair: KeyPair, variant: bytes) -> Path:
    spec = {"name": "x", "dtype": "float32", "shape": [1, 4]}
    outs = [{"name": n, "dtype": "float32", "shape": [1, 3]} for n in ("a", "b")]
    manifest = make_manifest(
        "heads", inputs=[spec], outputs=outs, labels=None, artifacts=[
            {"id": "onnx-fp32", "format": "onnx", "precision": "fp32",
             "path": "artifacts/onnx-fp32.onnx", "profiles": ["generic-cpu"]},
            {"id": "onnx-fp32-b4", "format": "onnx", "precision": "fp32", "batch": 4,
             "path": "artifacts/onnx-fp32-b4.onnx", "profiles": ["generic-cpu"],
             "inputs": [{**spec, "shape": [4, 4]}],
             "outputs": [{"name": f"head_{n}", "dtype": "float32", "shape": [4, 3]}
                         for n in ("a", "b")]}])
    package = tmp_path / "heads.edgepkg"
    write_test_package(package, keypair, {"artifacts/onnx-fp32.onnx": _two_heads(1),
                                          "artifacts/onnx-fp32-b4.onnx": variant}, manifest)
    return package


def test_an_agent_batches_concurrent_requests_on_the_variant(tmp_path: Path,
                                                             keypair: KeyPair) -> None:
    package = _package(tmp_path, keypair, _two_heads(4, ("head_a", "head_b"), swap=True))
    with Outbox(tmp_path / "outbox.db") as outbox, \
            Agent(tmp_path / "a", trusted_keys=[keypair.public_path], concurrency=8,
                  batching={"heads": BatchPolicy(16, 5000)}) as agent:
        monitor = Monitor(outbox)
        agent.add_observer(monitor)
        assert agent.install(package).artifact_id == "onnx-fp32"
        loaded = agent.model("heads")
        assert loaded.extra["batch_variant"] == "onnx-fp32-b4"
        assert loaded.extra["batching"]["max_batch"] == 4  # type: ignore[index]  # capped at N
        runtime = loaded.runtime
        assert isinstance(runtime, BatchingRuntime) and isinstance(runtime.runtime, PaddedRuntime)
        rows = np.random.default_rng(2).standard_normal((64, 1, 4)).astype(np.float32)
        answers = dict(from_threads(
            lambda thread, i: (thread + 8 * i, agent.predict("heads", {
                "x": rows[thread + 8 * i]}).outputs), 8, 8))
        assert sorted(answers) == list(range(64))
        for i, out in answers.items():
            np.testing.assert_allclose(out["a"], rows[i] @ W, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(out["b"], np.tanh(rows[i] @ V), rtol=1e-5, atol=1e-6)
        assert runtime.samples == 64 and runtime.batches < 64
        # the telemetry window reports the batching: what the runtime saw, call for call
        monitor.flush()
        windows = [json.loads(r.data) for r in outbox.pending(limit=100)]
        (window,) = [w for w in windows if w.get("model") == "heads"]
        assert window["requests"] == 64
        batching = {k: v for k, v in window["batching"].items() if k != "v"}
        assert batching == {"calls": runtime.batches, "requests": 64, "samples": 64,
                            "largest": batching["largest"]}
        assert 2 <= window["batching"]["largest"] <= 4


def test_a_broken_variant_costs_the_batching_not_the_model(
        tmp_path: Path, keypair: KeyPair, caplog: pytest.LogCaptureFixture) -> None:
    """Signed, so installed, but not a model: the batch-1 artifact serves, unbatched."""
    package = _package(tmp_path, keypair, b"not an onnx model" * 10)
    with caplog.at_level(logging.WARNING), \
            Agent(tmp_path / "a", trusted_keys=[keypair.public_path],
                  batching={"heads": BatchPolicy()}) as agent:
        agent.install(package)
        x = np.ones((1, 4), np.float32)
        np.testing.assert_allclose(agent.predict("heads", {"x": x}).outputs["a"], x @ W,
                                   rtol=1e-6)
        assert not isinstance(agent.model("heads").runtime, BatchingRuntime)
    assert "onnx-fp32-b4 cannot be loaded" in caplog.text, caplog.text


def test_a_variant_cannot_be_installed_as_the_artifact(tmp_path: Path, keypair: KeyPair) -> None:
    """Named by hand (``agent install --artifact``), a batch-N variant would fail every request
    of one sample: refused, naming the artifacts that can be chosen."""
    package = _package(tmp_path, keypair, _two_heads(4, ("head_a", "head_b")))
    with Agent(tmp_path / "a", trusted_keys=[keypair.public_path]) as agent, \
            pytest.raises(ConfigError, match=r"onnx-fp32-b4 is a batch-4 variant.*one of onnx-fp32$"):
        agent.install(package, artifact_id="onnx-fp32-b4")


@pytest.mark.parametrize(("one", "other", "same"), [
    (None, None, True),
    ((0.004704130347818136, 5), (0.004704129416495562, 5), True),  # measured: two calibrations
    ((0.0047, 5), (0.0047, 6), False),                               # another zero point
    ((0.0047, 5), (0.0048, 5), False),                               # another scale
    ((0.0047, 5), None, False),                                      # int8 against float
])
def test_a_variant_must_share_the_artifacts_quantization(
        one: tuple[float, int] | None, other: tuple[float, int] | None, same: bool) -> None:
    """The adapter (de)quantizes with the batch-1 artifact's scale and zero point: a variant
    calibrated apart is taken only when they agree to the calibration's round-off."""
    from edgeserve.device_agent.batching import _same_quantization

    assert _same_quantization(one, other) is same
    assert _same_quantization(other, one) is same
