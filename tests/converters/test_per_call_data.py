"""Conversion data in either form of the shared samples rule, the batch axis anywhere.

Data had to be stacked on a leading batch axis, so three real models could not even start
("expects rank 3 with samples on the first axis"), and recurrent state shaped ``[layers, batch,
hidden]`` could not be given at all without editing the graph. Each input's array may now be
samples stacked on the model's batch axis, wherever that axis is, or one call's full feed per
sample (``array[i]`` has exactly the input's shape).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeserve.converters import convert
from edgeserve.errors import ConfigError
from edgeserve.manifest import TensorSpec
from edgeserve.package import open_package
from edgeserve.testing import KeyPair

rng = np.random.default_rng(11)
N = 48


def _recurrent(path: Path, batch: str | int) -> Path:
    """state' = tanh(state + x W) over 2 layers, y = mean over layers: ``state`` is
    ``[2, batch, 8]``, its batch axis second."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]),
         helper.make_node("Unsqueeze", ["xw", "zero"], ["xw1"]),
         helper.make_node("Add", ["state", "xw1"], ["pre"]),
         helper.make_node("Tanh", ["pre"], ["next_state"]),
         helper.make_node("ReduceMean", ["next_state"], ["y"], axes=[0], keepdims=0)], "recurrent",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, batch, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 8]),
         helper.make_tensor_value_info("next_state", TensorProto.FLOAT, [2, batch, 8])],
        [numpy_helper.from_array(rng.normal(size=(4, 8)).astype(np.float32), "w"),
         numpy_helper.from_array(np.array([0], np.int64), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def _check(result: object, keypair: KeyPair) -> None:
    report = result.report  # type: ignore[attr-defined]
    failed = {a["id"]: a.get("error") or a["validation"].get("reasons")
              for a in report["artifacts"] if a["validation"]["status"] == "failed"}
    assert not failed, failed
    assert report["profiles"]["generic-cpu"]["status"] == "passed", report["profiles"]
    with open_package(result.package, trust=keypair.trust) as package:  # type: ignore[attr-defined]
        assert {"onnx-fp32", "onnx-int8-static"} <= {a.id for a in package.manifest.artifacts}


@pytest.mark.slow
def test_state_stacked_on_its_second_axis_converts(tmp_path: Path, keypair: KeyPair) -> None:
    """``state`` given as (n, 2, 8): samples on its batch axis, which is axis 1 of the model's
    ``[2, batch, 8]``; int8 calibration and validation run it as such."""
    x = rng.normal(size=(N, 4)).astype(np.float32)
    state = rng.uniform(-1, 1, (N, 2, 8)).astype(np.float32)
    result = convert(_recurrent(tmp_path / "rnn.onnx", "batch"), profiles=["generic-cpu"],
                     name="rnn", version="1.0.0", calibration={"x": x, "state": state},
                     evaluation={"x": x, "state": state}, out=tmp_path / "out",
                     sign_key=keypair.private, show_progress=False, task="other")
    _check(result, keypair)


@pytest.mark.slow
def test_one_calls_full_feed_per_sample_converts(tmp_path: Path, keypair: KeyPair) -> None:
    """A model fixed at batch 1 whose ``state`` ``[2, 1, 8]`` has no batch axis the rule can
    name: each sample is one call's feed, (n, 1, 4) and (n, 2, 1, 8)."""
    x = rng.normal(size=(N, 1, 4)).astype(np.float32)
    state = rng.uniform(-1, 1, (N, 2, 1, 8)).astype(np.float32)
    result = convert(_recurrent(tmp_path / "rnn1.onnx", 1), profiles=["generic-cpu"],
                     name="rnn1", version="1.0.0", calibration={"x": x, "state": state},
                     evaluation={"x": x, "state": state}, out=tmp_path / "out",
                     sign_key=keypair.private, show_progress=False, task="other")
    _check(result, keypair)
    import io

    with open_package(result.package, trust=keypair.trust) as package:
        samples = np.load(io.BytesIO(package.read_bytes("samples/inputs.npz")))
        assert samples["state"].shape[1:] == (2, 1, 8)  # stored as given: whole feeds


def test_data_that_fits_neither_form_names_both() -> None:
    from edgeserve.converters.data import load_dataset

    spec = [TensorSpec(name="state", dtype="float32", shape=[2, "batch", 8])]
    with pytest.raises(ConfigError, match=r"\(n, 2, 8\): samples stacked on its batch axis 1, or "
                                          r"\(n, 2, batch, 8\): one call's full input"):
        load_dataset({"state": np.zeros((4, 3, 8), np.float32)}, spec)
    data = load_dataset({"state": np.zeros((4, 2, 1, 8), np.float32)}, spec)
    assert data.sample(0)["state"].shape == (2, 1, 8) and data.whole_feeds
    stacked = load_dataset({"state": np.zeros((4, 2, 8), np.float32)}, spec)
    assert stacked.sample(3)["state"].shape == (2, 1, 8) and not stacked.whole_feeds
