"""Dynamic batching: concurrent requests stacked into one runtime call give each caller exactly
the outputs it would have got alone (ONNX Runtime and LiteRT), and the stacking really happens."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from edgeserve.device_agent import Agent
from edgeserve.device_agent.batching import BatchingRuntime, BatchPolicy, parse_batch_option
from edgeserve.device_agent.server.metrics import MetricsRegistry
from edgeserve.errors import ConfigError
from edgeserve.profiles import HardwareProfile
from edgeserve.testing import KeyPair, make_manifest, write_test_package
from tests.support import from_threads

THREADS = 8
PER_THREAD = 12


def _concurrent_requests(agent: Agent, model: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Requests of 1-3 images from 8 threads at once; (input, output) pairs."""
    rngs = [np.random.default_rng(seed) for seed in range(THREADS)]

    def call(thread: int, _: int) -> tuple[np.ndarray, np.ndarray]:
        rng = rngs[thread]
        images = rng.normal(size=(int(rng.integers(1, 4)), 3, 8, 8)).astype(np.float32)
        return images, np.array(agent.predict(model, {"image": images}).outputs["logits"])

    return from_threads(call, THREADS, PER_THREAD)


@pytest.mark.parametrize("runtime", ["onnx", "tflite"])
def test_batched_outputs_equal_unbatched_ones(runtime: str, tmp_path: Path,
                                              agent_assets: dict[str, Path],
                                              tflite_profile: HardwareProfile) -> None:
    profile = tflite_profile if runtime == "tflite" else "generic-cpu"
    trust = [agent_assets["public_key"]]
    policy = BatchPolicy(max_batch=8, max_queue_delay_us=5000)
    metrics = MetricsRegistry()
    with Agent(tmp_path / "batched", profile, trust, concurrency=THREADS,
               batching={"conv": policy}, observers=[metrics]) as batched, \
            Agent(tmp_path / "plain", profile, trust, concurrency=THREADS) as plain:
        assert batched.install(agent_assets["conv"]).format == runtime
        plain.install(agent_assets["conv"])
        pairs = _concurrent_requests(batched, "conv")
        loaded = batched.model("conv")
        assert isinstance(loaded.runtime, BatchingRuntime)
        assert loaded.extra["batching"] == {"max_batch": 8, "max_queue_delay_us": 5000}
        for images, out in pairs:
            alone = plain.predict("conv", {"image": images}).outputs["logits"]
            assert out.shape == alone.shape
            np.testing.assert_array_equal(out, alone)  # bit-identical, not merely close
        stacked = loaded.runtime
        assert stacked.samples == sum(len(images) for images, _ in pairs)
        # 96 requests from 8 threads: stacking happened (fewer runtime calls than requests)
        assert stacked.batches < len(pairs), (stacked.batches, len(pairs))
        text = metrics.render()
        assert 'edgeserve_batch_requests_count{model="conv",version="1.0.0"} ' \
            f"{stacked.batches}" in text, text


def test_a_lone_caller_is_not_delayed(tmp_path: Path, agent_assets: dict[str, Path]) -> None:
    """One thread calling in a loop never waits for company: a 1 s queue delay would show."""
    import time

    with Agent(tmp_path / "a", trusted_keys=[agent_assets["public_key"]],
               batching={"conv": BatchPolicy(max_batch=8, max_queue_delay_us=1_000_000)}) as a:
        a.install(agent_assets["conv"])
        images = np.zeros((1, 3, 8, 8), np.float32)
        a.predict("conv", {"image": images})
        started = time.monotonic()
        for _ in range(20):
            a.predict("conv", {"image": images})
        assert time.monotonic() - started < 5.0  # 20 x 1 s if each waited


def test_a_fixed_batch_artifact_is_served_unbatched(tmp_path: Path, keypair: KeyPair,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A [1, 4] model cannot be stacked: it is served as before, and the log says why."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    manifest = make_manifest("fixed", inputs=[{"name": "x", "dtype": "float32", "shape": [1, 4]}],
                             outputs=[{"name": "y", "dtype": "float32", "shape": [1, 3]}])
    package = tmp_path / "fixed.edgepkg"
    write_test_package(package, keypair, {"artifacts/model.onnx": model.SerializeToString()},
                       manifest)
    with caplog.at_level(logging.WARNING), \
            Agent(tmp_path / "a", trusted_keys=[keypair.public_path],
                  batching={"fixed": BatchPolicy()}) as agent:
        agent.install(package)
        x = np.ones((1, 4), np.float32)
        np.testing.assert_array_equal(agent.predict("fixed", {"x": x}).outputs["y"], x @ w)
        assert not isinstance(agent.model("fixed").runtime, BatchingRuntime)
    assert any("dynamic batching is off" in r.message and "[1, 4]" in r.message
               for r in caplog.records), caplog.text


@pytest.mark.parametrize(("text", "expected"), [
    ("conv", ("conv", BatchPolicy())),
    ("conv:16", ("conv", BatchPolicy(16, 500))),
    ("conv:4:2000", ("conv", BatchPolicy(4, 2000))),
])
def test_batch_option(text: str, expected: tuple[str, BatchPolicy]) -> None:
    assert parse_batch_option(text) == expected


@pytest.mark.parametrize(("text", "needle"), [
    (":8", "expected MODEL"), ("conv:eight", "whole numbers"), ("conv:1", "between 2"),
    ("conv:8:-1", "max_queue_delay_us"), ("conv:8:1:2", "expected MODEL"),
])
def test_bad_batch_option_is_a_clear_error(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_batch_option(text)
