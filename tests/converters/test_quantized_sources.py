"""Sources that are already quantized: detected, said so in the report, never quantized again.

A QDQ model (int8 weights behind DequantizeLinear, as ONNX Runtime's quantize_static writes it)
was once quantized a second time into an invalid graph ("two nodes with same node name ...
DequantizeLinear"), turned by onnx2tf into Select TF ops LiteRT cannot load, and shipped as an
"fp32" artifact. Here a small CNN is quantized by ONNX Runtime itself, QDQ and QOperator.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest

from edgeserve.converters import convert
from edgeserve.converters.dequantize import dequantize, quantization_of
from edgeserve.testing import KeyPair

rng = np.random.default_rng(3)
IMAGES = rng.normal(size=(48, 3, 16, 16)).astype(np.float32)


def _cnn(path: Path) -> Path:
    """Conv-ReLU-Conv-ReLU-pool-Gemm with a dynamic batch, random weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                     ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [init("w1", 8, 3, 3, 3), init("b1", 8), init("w2", 16, 8, 3, 3), init("b2", 16),
         init("w3", 10, 16), init("b3", 10)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def _quantized(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """(the float CNN, the same quantized by ONNX Runtime: "qdq" static or "qop" dynamic)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    source = _cnn(tmp_path / "cnn.onnx")
    out = tmp_path / f"cnn-{kind}.onnx"
    if kind == "qop":
        quantize_dynamic(str(source), str(out), weight_type=QuantType.QInt8)
        return source, out

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.left = iter(range(32))

        def get_next(self) -> dict[str, np.ndarray] | None:
            i = next(self.left, None)
            return None if i is None else {"image": IMAGES[i:i + 1]}

    quantize_static(str(source), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    return source, out


def _run(path: Path | object, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    data = str(path) if isinstance(path, Path) else path.SerializeToString()  # type: ignore[attr-defined]
    return np.asarray(ort.InferenceSession(data).run(None, {"image": x})[0])


def test_a_qdq_graph_dequantizes_to_the_float_model_it_stands_for(tmp_path: Path) -> None:
    """No Q/DQ left; the float graph is as close to the original float model as the QDQ graph
    is (the quantizer folds each ReLU into uint8's zero point: dropping the pair would lose it,
    so the range is kept as a Clip)."""
    import onnx

    source, qdq = _quantized(tmp_path, "qdq")
    model = onnx.load(str(qdq))
    found = quantization_of(model)
    assert found is not None and found.format == "QDQ" and found.ops["DequantizeLinear"] >= 6
    floated, removed = dequantize(model)
    onnx.checker.check_model(floated, full_check=True)
    ops = collections.Counter(n.op_type for n in floated.graph.node)
    assert quantization_of(floated) is None and removed == sum(found.ops.values())
    assert ops["Clip"] >= 2, ops
    x = IMAGES[:16]
    reference, fake_quant, back = _run(source, x), _run(qdq, x), _run(floated, x)
    assert np.abs(back - reference).max() <= 2 * np.abs(fake_quant - reference).max() + 1e-6
    assert quantization_of(model) == found  # the given model is left as it was


@pytest.mark.slow
def test_a_qdq_source_converts_with_its_own_int8_and_a_float_reference(
        tmp_path: Path, keypair: KeyPair) -> None:
    """Every artifact for a phone and an SBC passes; the report names the source's
    quantization; the static int8 ONNX artifact is the source's own graph; TFLite needs no
    Select TF ops (it loads in LiteRT) and the fp32 artifacts hold no Q/DQ."""
    import onnx

    _, qdq = _quantized(tmp_path, "qdq")
    result = convert(qdq, profiles=["pixel-8", "raspberry-pi-5"], name="qdq", version="1.0.0",
                     calibration={"image": IMAGES}, evaluation={"image": IMAGES},
                     out=tmp_path / "out", sign_key=keypair.private, show_progress=False)
    report = result.report
    assert {p: v["status"] for p, v in report["profiles"].items()} == \
        {"pixel-8": "passed", "raspberry-pi-5": "passed"}, report["profiles"]
    assert report["model"]["source"]["quantization"].startswith("QDQ")
    artifacts = {a["id"]: a for a in report["artifacts"]}
    assert all(a["validation"]["status"] == "passed" for a in artifacts.values()), artifacts
    assert "source's own quantization" in artifacts["onnx-int8-static"]["notes"][0]
    from edgeserve.package import open_package

    work = tmp_path / "unpacked"
    with open_package(result.package, trust=keypair.trust) as package:
        paths = [package.extract_artifact(a.id, work) for a in package.manifest.artifacts
                 if a.format == "onnx"]
    source_ops = collections.Counter(n.op_type for n in onnx.load(str(qdq)).graph.node)
    assert len(paths) == 2
    for path in paths:
        ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
        if "int8-static" in path.name:
            assert ops["DequantizeLinear"] == source_ops["DequantizeLinear"], path
        else:
            assert not ops["DequantizeLinear"] and not ops["QuantizeLinear"], (path, ops)


@pytest.mark.slow
def test_a_qoperator_source_is_not_quantized_again(tmp_path: Path, keypair: KeyPair) -> None:
    """MatMulInteger / ConvInteger graphs cannot be undone op by op: the static int8 artifact
    is refused with the reason and the profile's declared fallback ships; nothing fails."""
    _, qop = _quantized(tmp_path, "qop")
    result = convert(qop, profiles=["raspberry-pi-5"], name="qop", version="1.0.0",
                     calibration={"image": IMAGES}, evaluation={"image": IMAGES},
                     out=tmp_path / "out", sign_key=keypair.private, show_progress=False)
    report = result.report
    assert report["model"]["source"]["quantization"].startswith("QOperator")
    static = next(a for a in report["artifacts"] if a["id"] == "onnx-int8-static")
    assert "already int8" in static["error"] and "refused" in static["error"]
    assert report["profiles"]["raspberry-pi-5"]["status"] == "fallback"
    assert result.ok
