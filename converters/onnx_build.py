"""ONNX artifacts from the fp32 reference: fp32, fp16, int8 dynamic, int8 static QDQ per-channel.

Measured choices (docs/benchmarks.md): static QDQ with per-channel int8 weights and uint8
activations is the fast int8 on CPUs; ``quantize_dynamic`` is applied to MatMul/Gemm-style ops
only, because dynamically quantized convolutions (ConvInteger) ran 5× *slower* than fp32. fp16
keeps float32 inputs and outputs so the agent feeds every ONNX artifact the same tensors.

When a static int8 artifact misses its budget, :func:`worst_layers` ranks its quantized tensors
by per-channel signal-to-quantization-noise ratio (each fp32 activation through the scale and
zero point the QDQ graph gives it), and the caller rebuilds with the nodes around the worst ones
left in float.
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeserve.errors import ConversionError

from .data import Dataset

__all__ = ["COMPUTE_OPS", "DYNAMIC_OPS", "build_onnx", "opset_of", "worst_layers"]

DYNAMIC_OPS = ["MatMul", "Gemm", "Gather", "Attention", "LSTM", "GRU", "EmbedLayerNormalization"]
# The ops whose int8 kernels carry the speed-up; quantizing only these keeps element-wise
# chains (hand-written softmax, layer norm) in float — the last retry of a failing static build.
COMPUTE_OPS = ["Conv", "ConvTranspose", "MatMul", "Gemm"]
_CALIBRATION_LIMIT = 256


class _Reader:
    """ORT CalibrationDataReader over a dataset, one sample per call (batch of one)."""

    def __init__(self, data: Dataset, names: Sequence[str]) -> None:
        self._data = data
        self._names = list(names)
        self._it: Iterator[int] = iter(range(min(len(data), _CALIBRATION_LIMIT)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        i = next(self._it, None)
        if i is None:
            return None
        return {k: v for k, v in self._data.sample(i).items() if k in self._names}

    def rewind(self) -> None:
        self._it = iter(range(min(len(self._data), _CALIBRATION_LIMIT)))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        self.rewind()
        while (item := self.get_next()) is not None:
            yield item


def opset_of(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _input_names(path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def build_onnx(reference: Path, out: Path, precision: str, quantization: str,
               calibration: Dataset | None, exclude: Sequence[str] = (),
               op_types: Sequence[str] | None = None, calibrate: str = "minmax") -> list[str]:
    """Write one ONNX artifact to ``out``; returns notes for the report."""
    if precision == "fp32":
        shutil.copyfile(reference, out)
        return []
    if precision == "fp16":
        return _fp16(reference, out)
    if precision == "int8" and quantization == "dynamic":
        return _dynamic(reference, out)
    if precision == "int8" and quantization == "static":
        if calibration is None:
            raise ConversionError("int8 static needs calibration data")
        return _static(reference, out, calibration, exclude, op_types, calibrate)
    raise ConversionError(f"no ONNX builder for precision {precision!r} with quantization "
                          f"{quantization!r}; ONNX artifacts are fp32, fp16, int8 dynamic or static")


def _fp16(reference: Path, out: Path) -> list[str]:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # ONNX Runtime's converter, not onnxconverter-common's: the latter left Cast nodes typed
    # fp16 where a float consumer expected float32 (magika, MiniLM would not load)
    model = onnx.load(str(reference))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns about every value it clamps to the fp16 range
        converted = convert_float_to_float16(model, keep_io_types=True)
    onnx.save(converted, str(out))
    return ["float32 inputs and outputs kept (cast inside the graph)"]


def _preprocessed(reference: Path, work: Path) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = work / f"{reference.stem}.preq.onnx"
    if pre.exists():
        return pre
    source = reference
    if opset_of(reference) < 13:
        # per-channel QDQ needs DequantizeLinear's axis attribute (opset 13)
        import onnx
        from onnx import version_converter

        source = work / f"{reference.stem}.opset13.onnx"
        onnx.save(version_converter.convert_version(onnx.load(str(reference)), 13), str(source))
    try:
        # ONNX Runtime's symbolic shape inference dumps sym_shape_infer_temp.onnx (and its
        # external data) into the current directory when it gives up: keep that in `work`.
        with contextlib.chdir(work):
            quant_pre_process(str(source.resolve()), str(pre.resolve()),
                              skip_symbolic_shape=False)
    except Exception:
        # symbolic shape inference fails on some graphs; quantization works without it
        quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
    return pre


def _dynamic(reference: Path, out: Path) -> list[str]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    pre = _preprocessed(reference, out.parent)
    # per-channel: per-tensor int8 weights took all-MiniLM-L6-v2's embedding cosine from 0.99
    # down to 0.957; Gather quantizes embedding tables (MiniLM 0.65× → 0.25× the fp32 bytes)
    quantize_dynamic(str(pre), str(out), op_types_to_quantize=DYNAMIC_OPS, per_channel=True,
                     weight_type=QuantType.QInt8)
    return ["per-channel int8 weights for MatMul/Gemm/Gather-style ops; convolutions stay "
            "float (dynamic ConvInteger is slower than fp32 on CPUs)"]


def _static(reference: Path, out: Path, calibration: Dataset, exclude: Sequence[str],
            op_types: Sequence[str] | None, calibrate: str) -> list[str]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    pre = _preprocessed(reference, out.parent)
    names = _input_names(pre)
    notes = [f"QDQ, per-channel int8 weights, uint8 activations, {calibrate} calibration on "
             f"{min(len(calibration), _CALIBRATION_LIMIT)} samples"]
    options = {"ActivationSymmetric": False, "WeightSymmetric": True}
    method = CalibrationMethod.Percentile if calibrate == "percentile" else CalibrationMethod.MinMax

    def run() -> None:
        quantize_static(str(pre), str(out), _Reader(calibration, names),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(exclude) or None,
                        op_types_to_quantize=list(op_types) if op_types else None,
                        calibrate_method=method, extra_options=options)

    try:
        run()
    except ValueError:
        # ORT 1.32's int32-bias weight-scale adjustment compares arrays as scalars for some
        # graphs (magika); without the adjustment quantization works
        options["QDQDisableWeightAdjustForInt32Bias"] = True
        run()
        notes.append("int32-bias weight-scale adjustment disabled (ONNX Runtime failed with it)")
    if exclude:
        notes.append(f"kept in float: {', '.join(exclude)}")
    if op_types:
        notes.append(f"only {', '.join(op_types)} quantized")
    return notes


def worst_layers(reference: Path, quantized: Path, data: Dataset, work: Path,
                 count: int = 3, samples: int = 16) -> list[dict[str, Any]]:
    """The ``count`` activations whose quantization adds the most noise, noisiest first.

    Each activation of the fp32 graph (run on ``samples`` samples) is put through the quantizer
    the QDQ graph gives it (its scale and zero point), so upstream noise cannot blame a
    downstream tensor. The noise is measured per channel (signal-to-quantization-noise ratio, dB,
    of each channel against its own RMS, on axis 1 and on the last axis, the worse view): one
    outlier channel — a transformer's hidden dimension, a CNN channel with a large bias — sets a
    per-tensor scale that rounds every other channel to zero while the whole tensor's SQNR
    still looks fine.
    """
    import onnx
    from onnx import numpy_helper

    pre = _preprocessed(reference, work)
    qdq = onnx.load(str(quantized)).graph
    constants = {i.name: numpy_helper.to_array(i) for i in qdq.initializer}
    float_model = onnx.load(str(pre))
    graph = float_model.graph
    producers = {out: node.name for node in graph.node for out in node.output}
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.name)
    quantizers: dict[str, tuple[float, int, Any]] = {}
    for node in qdq.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in producers or \
                len(node.input) < 3 or node.input[2] not in constants:
            continue
        scale, zero = constants.get(node.input[1]), constants[node.input[2]]
        if scale is not None and scale.size == 1 and zero.dtype.kind in "iu":
            quantizers[node.input[0]] = (float(scale), int(zero), np.iinfo(zero.dtype))
    noise = _channel_sqnr(float_model, quantizers, data.take(slice(0, samples)), work)
    ranked = sorted((db, tensor) for tensor, db in noise.items() if np.isfinite(db))
    # a tensor stays float only when neither its producer nor its consumers quantize it
    return [{"tensor": k, "node": producers[k], "consumers": consumers.get(k, []),
             "sqnr_db": round(float(err), 2)} for err, k in ranked[:count]]


def _channel_sqnr(model: Any, quantizers: Mapping[str, tuple[float, int, Any]],
                  data: Dataset, work: Path) -> dict[str, float]:
    """Per-channel SQNR (dB) of fake-quantizing each named fp32 activation with its scale and
    zero point: the mean over channels of the noise power relative to that channel's signal
    power (over all samples), on axis 1 and on the last axis (NCHW channels, hidden
    dimensions), the worse view. Accumulated sample by sample (ONNX Runtime's debug helper
    keeps every activation and flattens them, losing the channel axis)."""
    import onnx
    import onnxruntime as ort

    model = onnx.shape_inference.infer_shapes(model)
    typed = {v.name: v for v in [*model.graph.value_info, *model.graph.output]}
    present = {o.name for o in model.graph.output}
    names = [t for t in quantizers if t in typed]
    model.graph.output.extend(typed[t] for t in names if t not in present)
    augmented = work / "debug-float.onnx"
    onnx.save(model, str(augmented))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(augmented), options, providers=["CPUExecutionProvider"])
    augmented.unlink(missing_ok=True)
    sums: dict[tuple[str, int], list[np.ndarray]] = {}  # (tensor, axis) -> [signal, noise]
    for feeds in _Reader(data, [i.name for i in session.get_inputs()]):
        for name, value in zip(names, session.run(names, feeds), strict=True):
            x = np.asarray(value, dtype=np.float64)
            if x.size == 0 or not np.isfinite(x).all():
                continue
            scale, zero, limits = quantizers[name]
            q = np.clip(np.round(x / scale) + zero, limits.min, limits.max)
            error = (x - (q - zero) * scale) ** 2
            for axis in ({1 % x.ndim, x.ndim - 1} if x.ndim >= 2 else {-1}):
                other = tuple(a for a in range(x.ndim) if a != axis) if axis >= 0 else None
                signal = np.asarray(np.sum(x ** 2, axis=other)).reshape(-1)
                noise = np.asarray(np.sum(error, axis=other)).reshape(-1)
                acc = sums.setdefault((name, axis), [np.zeros_like(signal), np.zeros_like(noise)])
                if acc[0].shape == signal.shape:
                    acc[0] += signal
                    acc[1] += noise
    result: dict[str, float] = {}
    for (name, _axis), (signal, noise) in sums.items():
        live = signal > 1e-12 * max(float(signal.max(initial=0.0)), 1e-30)
        if live.any():
            db = -10 * float(np.log10(max(float(np.mean(noise[live] / signal[live])), 1e-30)))
            result[name] = min(result.get(name, np.inf), db)
    return result
