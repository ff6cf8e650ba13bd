"""Real toy models for the agent's tests: the same weights as ONNX (onnx.helper) and as TFLite
(TensorFlow's converter: fp32, and full-integer int8 with int8 I/O), packaged in the converter's
layout (artifact-specific tensor names, NHWC layout for TFLite images, samples and reference)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeserve.manifest import parse_manifest
from edgeserve.package import PackageWriter
from edgeserve.telemetry import ReferenceStats
from edgeserve.testing import KeyPair, write_test_profile

__all__ = ["MlpWeights", "build_conv_package", "build_mlp_package", "conv_weights", "mlp_weights",
           "write_profile"]

RNG_SEED = 7


@dataclass(frozen=True)
class MlpWeights:
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray

    def forward(self, x: np.ndarray) -> np.ndarray:
        h = np.maximum(x @ self.w1 + self.b1, 0)
        z = h @ self.w2 + self.b2
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def mlp_weights(seed: int = RNG_SEED) -> MlpWeights:
    rng = np.random.default_rng(seed)
    return MlpWeights(rng.normal(size=(4, 16)).astype(np.float32),
                      rng.normal(size=16).astype(np.float32) * 0.1,
                      rng.normal(size=(16, 3)).astype(np.float32),
                      rng.normal(size=3).astype(np.float32) * 0.1)


def conv_weights(seed: int = RNG_SEED) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=(4, 3, 3, 3)).astype(np.float32) * 0.5,
            "b": rng.normal(size=4).astype(np.float32) * 0.1,
            "w2": rng.normal(size=(4, 2)).astype(np.float32),
            "b2": rng.normal(size=2).astype(np.float32) * 0.1}


def onnx_mlp(w: MlpWeights) -> bytes:
    """The MLP ``w`` (any width) as ONNX: x @ w1 + b1, relu, @ w2 + b2, softmax."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((w.w1, "w1"), (w.b1, "b1"), (w.w2, "w2"), (w.b2, "b2"))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]),
             helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]),
             helper.make_node("MatMul", ["h2", "w2"], ["z0"]),
             helper.make_node("Add", ["z0", "b2"], ["z"]),
             helper.make_node("Softmax", ["z"], ["y"], axis=-1)]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", w.w1.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", w.w2.shape[1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def onnx_conv(w: dict[str, np.ndarray]) -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    inits = [numpy_helper.from_array(a, n) for n, a in w.items()]
    nodes = [helper.make_node("Conv", ["image", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "w2"], ["m"]),
             helper.make_node("Add", ["m", "b2"], ["logits"])]
    graph = helper.make_graph(
        nodes, "conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def tflite_mlp(w: MlpWeights, int8: bool, calibration: np.ndarray) -> bytes:
    import tensorflow as tf

    class Mlp(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def serve(self, x: Any) -> Any:
            h = tf.nn.relu(tf.matmul(x, w.w1) + w.b1)
            return tf.nn.softmax(tf.matmul(h, w.w2) + w.b2)

    module = Mlp()
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.serve.get_concrete_function()], module)
    if int8:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([row[None]] for row in calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return bytes(converter.convert())


def tflite_conv(w: dict[str, np.ndarray]) -> bytes:
    import tensorflow as tf
    hwio = np.ascontiguousarray(w["w"].transpose(2, 3, 1, 0))

    class Conv(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32, name="image")])
        def serve(self, image: Any) -> Any:
            c = tf.nn.relu(tf.nn.conv2d(image, hwio, 1, "SAME") + w["b"])
            return tf.matmul(tf.reduce_mean(c, axis=[1, 2]), w["w2"]) + w["b2"]

    module = Conv()
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.serve.get_concrete_function()], module)
    return bytes(converter.convert())


def _tflite_io(content: bytes) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_content=content)
    return it.get_input_details(), it.get_output_details()


def _spec(detail: dict[str, Any], shape: list[Any], layout: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": detail["name"], "dtype": np.dtype(detail["dtype"]).name,
                            "shape": shape}
    scale, zero = detail["quantization"]
    if scale:
        spec["quantization"] = {"scale": float(scale), "zero_point": int(zero)}
    if layout:
        spec["layout"] = layout
    return spec


def _run_tflite(content: bytes, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_content=content)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    rows = []
    for row in x:
        sample = row[None]
        scale, zero = inp["quantization"]
        if scale:
            sample = np.clip(np.round(sample / scale) + zero, -128, 127).astype(np.int8)
        it.resize_tensor_input(inp["index"], list(sample.shape))
        it.allocate_tensors()
        it.set_tensor(inp["index"], sample)
        it.invoke()
        y = it.get_tensor(out["index"])
        oscale, ozero = out["quantization"]
        rows.append((y.astype(np.float32) - ozero) * oscale if oscale else y)
    return np.concatenate(rows).astype(np.float32)


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def build_mlp_package(out: Path, key: KeyPair, version: str = "1.0.0", release: int = 1,
                      name: str = "toy", seed: int = RNG_SEED, tflite: bool = True,
                      cache: dict[str, bytes] | None = None) -> Path:
    """An MLP package with onnx-fp32, tflite-fp32 and tflite-int8 (int8 I/O) artifacts."""
    w = mlp_weights(seed)
    rng = np.random.default_rng(seed + 1)
    calib = rng.normal(size=(64, 4)).astype(np.float32)
    samples = calib[:8]
    expected = w.forward(samples)
    files: dict[str, bytes] = {"artifacts/toy.onnx": onnx_mlp(w)}
    artifacts: list[dict[str, Any]] = [{
        "id": "onnx-fp32", "format": "onnx", "precision": "fp32", "path": "artifacts/toy.onnx",
        "profiles": ["generic-cpu"], "validation": {"sample_max_abs_error": 1e-6}}]
    if tflite:
        memo = cache if cache is not None else {}
        for int8 in (False, True):
            tag = f"{seed}-{int8}"
            if tag not in memo:
                memo[tag] = tflite_mlp(w, int8, calib)
            content = memo[tag]
            ins, outs = _tflite_io(content)
            got = _run_tflite(content, samples)
            path = f"artifacts/toy_{'int8' if int8 else 'fp32'}.tflite"
            files[path] = content
            artifacts.append({
                "id": "tflite-int8" if int8 else "tflite-fp32", "format": "tflite",
                "precision": "int8" if int8 else "fp32",
                "quantization": "full-integer" if int8 else "none", "path": path,
                "inputs": [_spec(ins[0], ["batch", 4])], "outputs": [_spec(outs[0], ["batch", 3])],
                "validation": {"sample_max_abs_error": float(np.abs(got - expected).max())}})
    files["samples/inputs.npz"] = _npz(x=samples)
    files["samples/expected.npz"] = _npz(y=expected)
    files["reference/stats.json"] = ReferenceStats.from_arrays(
        {"x": calib}, {"y": w.forward(calib)}, classifier_outputs=("y",)).to_json()
    manifest = parse_manifest({
        "schema": "edgeserve.manifest/1", "name": name, "version": version, "release": release,
        "task": "classification",
        "source": {"framework": "onnx", "sha256": "0" * 64},
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4], "layout": "NC"}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 3]}],
        "labels": ["a", "b", "c"], "artifacts": artifacts,
        "reference": "reference/stats.json", "samples": "samples/inputs.npz",
    })
    writer = PackageWriter(manifest)
    for member, content in files.items():
        writer.add_file(member, content)
    writer.write(out, key.private)
    return out


def build_conv_package(out: Path, key: KeyPair, tflite_content: bytes | None = None) -> Path:
    """An image model: NCHW ONNX artifact and an NHWC TFLite artifact with the same weights."""
    w = conv_weights()
    x = np.random.default_rng(3).normal(size=(4, 3, 8, 8)).astype(np.float32)
    content = tflite_content or tflite_conv(w)
    ins, outs = _tflite_io(content)
    manifest = parse_manifest({
        "schema": "edgeserve.manifest/1", "name": "conv", "version": "1.0.0", "release": 1,
        "source": {"framework": "onnx", "sha256": "1" * 64},
        "inputs": [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 8, 8],
                    "layout": "NCHW"}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 2]}],
        "artifacts": [
            {"id": "onnx-fp32", "format": "onnx", "precision": "fp32",
             "path": "artifacts/conv.onnx"},
            {"id": "tflite-fp32", "format": "tflite", "precision": "fp32",
             "path": "artifacts/conv.tflite",
             "inputs": [_spec(ins[0], ["batch", 8, 8, 3], "NHWC")],
             "outputs": [_spec(outs[0], ["batch", 2])]}],
    })
    writer = PackageWriter(manifest)
    writer.add_file("artifacts/conv.onnx", onnx_conv(w))
    writer.add_file("artifacts/conv.tflite", content)
    writer.add_file("samples/inputs.npz", _npz(image=x))
    writer.write(out, key.private)
    return out


def write_profile(directory: Path, name: str, artifacts: str) -> Path:
    """A profile TOML (generic CPU hardware, one runtime thread) whose artifact list is
    ``artifacts`` (TOML text)."""
    return write_test_profile(directory, name, artifacts, memory_mb=2048, runtimes="""\
[runtimes.onnxruntime]
execution_providers = ["CPUExecutionProvider"]
intra_op_threads = 1

[runtimes.litert]
delegates = ["xnnpack"]
threads = 1
""")
