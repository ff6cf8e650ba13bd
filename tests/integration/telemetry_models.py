"""Real toy ONNX models and signed packages (with drift references) for telemetry tests and the
telemetry benchmark: an MLP classifier 4→16→3 and a small image CNN 3×32×32 → 10 classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeserve.telemetry import ReferenceStats
from edgeserve.testing import KeyPair, make_manifest, write_test_package

__all__ = ["cnn_onnx", "mlp_onnx", "mlp_package", "run_onnx"]


def mlp_onnx(seed: int = 0) -> bytes:
    """``x`` float32 [N, 4] → ``y`` float32 [N, 3] softmax."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(4, 16)).astype(np.float32)
    w2 = rng.normal(size=(16, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["z"]),
         helper.make_node("Softmax", ["z"], ["y"], axis=1)],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def cnn_onnx(seed: int = 0) -> bytes:
    """``x`` float32 [N, 3, 32, 32] → two 3×3 convolutions → global pool → ``y`` [N, 10]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.normal(size=(16, 3, 3, 3)) * 0.3).astype(np.float32), "c1"),
             numpy_helper.from_array((rng.normal(size=(32, 16, 3, 3)) * 0.1).astype(np.float32), "c2"),
             numpy_helper.from_array(rng.normal(size=(32, 10)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "c1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Conv", ["b", "c2"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["d"]),
             helper.make_node("GlobalAveragePool", ["d"], ["e"]),
             helper.make_node("Flatten", ["e"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["g"]),
             helper.make_node("Softmax", ["g"], ["y"], axis=1)]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def run_onnx(model: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def mlp_package(path: Path, key: KeyPair, version: str = "1.0.0", release: int = 1,
                reference: bool = True, samples: int = 500) -> Path:
    """A signed package of the MLP as model ``toy`` with ``reference/stats.json`` computed from
    N(0, 1) calibration inputs (the "training" distribution)."""
    model = mlp_onnx()
    files: dict[str, bytes] = {"artifacts/model.onnx": model}
    extra = {}
    if reference:
        calibration = np.random.default_rng(1).normal(size=(samples, 4)).astype(np.float32)
        stats = ReferenceStats.from_arrays({"x": calibration},
                                           {"y": run_onnx(model, calibration)},
                                           classifier_outputs=("y",))
        files["reference/stats.json"] = stats.to_json()
        extra["reference"] = "reference/stats.json"
    write_test_package(path, key, files=files,
                       manifest=make_manifest(version=version, release=release, **extra))
    return path
