"""``--dynamic-batch``: a batch axis the source fixed at 1 becomes dynamic only when ONNX Runtime
computes the same per sample stacked as alone; the agent then takes several samples per request
and batches concurrent requests of such a model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeserve.converters import convert
from edgeserve.testing import KeyPair
from tests.support import from_threads

from .conftest import write_profile
from .test_preflight import ONNX_ONLY

W1 = np.random.default_rng(3).standard_normal((4, 16)).astype(np.float32)
W2 = np.random.default_rng(4).standard_normal((16, 3)).astype(np.float32)


def _mlp(path: Path, mix: bool = False, baked: bool = False) -> Path:
    """``[1, 4] → [1, 3]``, batch fixed at 1. ``mix`` adds a cumulative sum over the batch axis
    (right shapes, wrong values when stacked); ``baked`` takes ``[1, 2, 2]`` and reshapes it to
    a fixed ``[1, 4]`` (an error when stacked)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = []
    first = "x"
    if mix:
        nodes += [helper.make_node("CumSum", ["x", "axis"], ["xc"]),
                  helper.make_node("Add", ["x", "xc"], ["x2"])]
        first = "x2"
    if baked:
        nodes.append(helper.make_node("Reshape", [first, "shape"], ["xr"]))
        first = "xr"
    nodes += [helper.make_node("MatMul", [first, "w1"], ["h"]),
              helper.make_node("Relu", ["h"], ["r"]),
              helper.make_node("MatMul", ["r", "w2"], ["y"])]
    inits = [numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(W2, "w2"),
             numpy_helper.from_array(np.array([1, 4], np.int64), "shape"),
             numpy_helper.from_array(np.array(0, np.int64), "axis")]
    graph = helper.make_graph(nodes, "fixed", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 2] if baked else [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _forward(x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ W1, 0) @ W2  # type: ignore[no-any-return]


@pytest.fixture
def profile(tmp_path: Path) -> Path:
    return write_profile(tmp_path / "profiles", ONNX_ONLY.format(
        name="onnx-cpu", fmt="onnx", max_bytes=10**9, unsupported="[]"))


def _convert(tmp_path: Path, source: Path, profile: Path, keypair: KeyPair,
             shape: tuple[int, ...] = (4,), **options: object) -> dict[str, object]:
    x = np.random.default_rng(0).standard_normal((24, *shape)).astype(np.float32)
    result = convert(source, profiles=[str(profile)], name="fixed", version="1.0.0",
                     evaluation={"x": x}, out=tmp_path / "out", sign_key=keypair.private,
                     show_progress=False, **options)
    assert result.ok, result.report
    return {"report": result.report, "package": result.package}


def test_a_fixed_batch_becomes_dynamic_and_the_agent_batches_it(
        tmp_path: Path, profile: Path, keypair: KeyPair) -> None:
    from edgeserve.device_agent import Agent
    from edgeserve.device_agent.batching import BatchingRuntime, BatchPolicy
    from edgeserve.profiles import load_profile

    converted = _convert(tmp_path, _mlp(tmp_path / "m.onnx"), profile, keypair,
                         dynamic_batch=True)
    report = converted["report"]
    assert isinstance(report, dict)
    assert report["model"]["inputs"][0]["shape"] == ["batch", 4]
    assert report["model"]["outputs"][0]["shape"] == ["batch", 3]
    assert any("now dynamic" in n for n in report["data"]["notes"]), report["data"]["notes"]
    with Agent(tmp_path / "cache", load_profile(profile), [keypair.public_path],
               batching={"fixed": BatchPolicy(8, 2000)}) as agent:
        agent.install(converted["package"])
        loaded = agent.model("fixed")
        assert isinstance(loaded.runtime, BatchingRuntime)
        x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
        np.testing.assert_allclose(agent.predict("fixed", {"x": x}).outputs["y"], _forward(x),
                                   rtol=1e-4, atol=1e-4)
        # concurrent one-sample requests, stacked by the batcher: each gets its own answer
        rows = np.random.default_rng(2).standard_normal((64, 1, 4)).astype(np.float32)
        answers = dict(from_threads(
            lambda thread, i: (thread + 8 * i, agent.predict("fixed", {
                "x": rows[thread + 8 * i]}).outputs["y"]), 8, 8))
        assert sorted(answers) == list(range(64))
        for i, y in answers.items():
            np.testing.assert_allclose(y, _forward(rows[i]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("kind", "why"), [("mix", "mixes samples"), ("baked", "")])
def test_a_graph_that_is_not_per_sample_keeps_batch_1_and_says_why(
        tmp_path: Path, profile: Path, keypair: KeyPair, kind: str, why: str) -> None:
    source = _mlp(tmp_path / "m.onnx", mix=kind == "mix", baked=kind == "baked")
    shape = (2, 2) if kind == "baked" else (4,)
    report = _convert(tmp_path, source, profile, keypair, shape, dynamic_batch=True)["report"]
    assert isinstance(report, dict)
    assert report["model"]["inputs"][0]["shape"] == [1, *shape]
    notes = [n for n in report["data"]["notes"] if "stays fixed at 1" in n]
    assert notes and why in notes[0], report["data"]["notes"]


def test_without_the_option_a_fixed_batch_stays_fixed(
        tmp_path: Path, profile: Path, keypair: KeyPair) -> None:
    report = _convert(tmp_path, _mlp(tmp_path / "m.onnx"), profile, keypair)["report"]
    assert isinstance(report, dict)
    assert report["model"]["inputs"][0]["shape"] == [1, 4]
    assert not any("--dynamic-batch" in n for n in report["data"]["notes"])


def test_a_profile_can_ask_for_it(tmp_path: Path, keypair: KeyPair) -> None:
    """``[batching] dynamic = true`` in a profile does what ``--dynamic-batch`` does."""
    asking = write_profile(tmp_path / "profiles", ONNX_ONLY.format(
        name="onnx-batching", fmt="onnx", max_bytes=10**9, unsupported="[]")
        + "\n[batching]\ndynamic = true\n")
    report = _convert(tmp_path, _mlp(tmp_path / "m.onnx"), asking, keypair)["report"]
    assert isinstance(report, dict)
    assert report["model"]["inputs"][0]["shape"] == ["batch", 4]
