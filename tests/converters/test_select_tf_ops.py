"""A profile that runs LiteRT never ships an artifact that needs Select TF (Flex) ops.

A transformer encoder once came out of onnx2tf with Flex ops for every TFLite precision, and
the failure read "Select TensorFlow op(s) ... not supported by this interpreter" without naming
the op. ONNX's ``Det`` is such an op (onnx2tf makes ``FlexMatrixDeterminant`` of it): pre-flight
refuses it for TFLite by name, and whatever else comes out as Flex is caught by reading the
built file's op codes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeserve.converters import convert
from edgeserve.package import open_package
from edgeserve.testing import KeyPair

pytestmark = pytest.mark.slow


def _det_model(path: Path) -> Path:
    """y = det(reshape(x, [-1, 3, 3])), one value per sample."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["m"]),
         helper.make_node("Det", ["m"], ["d"], name="determinant"),
         helper.make_node("Unsqueeze", ["d", "axes"], ["y"])], "det",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(np.array([-1, 3, 3], np.int64), "shape"),
         numpy_helper.from_array(np.array([1], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def _convert(tmp_path: Path, keypair: KeyPair) -> dict:  # type: ignore[type-arg]
    x = np.random.default_rng(5).normal(size=(64, 9)).astype(np.float32)
    result = convert(_det_model(tmp_path / "det.onnx"), profiles=["pixel-8"], name="det",
                     version="1.0.0", calibration={"x": x}, evaluation={"x": x},
                     out=tmp_path / "out", sign_key=keypair.private, show_progress=False)
    with open_package(result.package, trust=keypair.trust) as package:
        formats = {a.format for a in package.manifest.artifacts}
    assert formats == {"onnx"}, formats  # the declared fallback ships, no TFLite
    assert result.report["profiles"]["pixel-8"]["status"] == "fallback"
    assert result.ok
    return result.report


def test_pre_flight_names_the_op_that_would_need_select_tf_ops(tmp_path: Path,
                                                               keypair: KeyPair) -> None:
    report = _convert(tmp_path, keypair)
    issues = [i for i in report["preflight"] if i["target"] == "tflite"]
    assert issues and "Det (node determinant) → FlexMatrixDeterminant" in issues[0]["message"]


def test_a_built_file_with_select_tf_ops_is_failed_by_name(
        tmp_path: Path, keypair: KeyPair, monkeypatch: pytest.MonkeyPatch) -> None:
    """With pre-flight not knowing the op, onnx2tf builds the files; their op codes are read
    and each is failed naming the Flex op and the ONNX op behind it."""
    monkeypatch.setattr("edgeserve.converters.preflight.FLEX_ONLY", {})
    report = _convert(tmp_path, keypair)
    tflite = [a for a in report["artifacts"] if a["format"] == "tflite"]
    assert tflite and all(a["validation"]["status"] == "failed" for a in tflite)
    for artifact in tflite:
        assert "needs Select TF ops (FlexMatrixDeterminant)" in artifact["error"], artifact
        assert "ONNX op(s) Det" in artifact["error"]
