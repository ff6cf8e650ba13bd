"""ONNX artifacts from the fp32 reference: fp32, fp16, int8 dynamic, int8 static QDQ per-channel.

Measured choices (docs/benchmarks.md): static QDQ with per-channel int8 weights and uint8
activations is the fast int8 on CPUs; ``quantize_dynamic`` is applied to MatMul/Gemm-style ops
only, because dynamically quantized convolutions (ConvInteger) ran 5× *slower* than fp32. fp16
keeps float32 inputs and outputs so the agent feeds every ONNX artifact the same tensors.

When a static int8 artifact misses its budget, :func:`worst_layers` ranks the tensors by the
signal-to-quantization-noise ratio between the fp32 and the QDQ graph (onnxruntime's
``qdq_loss_debug``), and the caller rebuilds with the worst producers left in float.
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

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
                 count: int = 3, samples: int = 16) -> list[dict[str, float | str]]:
    """The ``count`` tensors whose quantization adds the most noise (lowest SQNR in dB between
    the tensor and its quantize-dequantize), with the nodes producing them."""
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    pre = _preprocessed(reference, work)
    float_aug, qdq_aug = work / "debug-float.onnx", work / "debug-qdq.onnx"
    modify_model_output_intermediate_tensors(str(pre), str(float_aug))
    modify_model_output_intermediate_tensors(str(quantized), str(qdq_aug))
    subset = data.take(slice(0, samples))
    names = _input_names(pre)
    float_acts = collect_activations(str(float_aug), _Reader(subset, names))
    qdq_acts = collect_activations(str(qdq_aug), _Reader(subset, names))
    errors = compute_activation_error(create_activation_matching(qdq_acts, float_acts))
    producers = {out: node.name for node in onnx.load(str(pre)).graph.node for out in node.output}
    # qdq_err is the local noise of quantizing that tensor (xmodel_err accumulates everything
    # upstream, so it would blame the last layers for the first layers' noise)
    ranked = sorted(((v["qdq_err"], k) for k, v in errors.items()
                     if "qdq_err" in v and k in producers and np.isfinite(v["qdq_err"])))
    return [{"tensor": k, "node": producers[k], "sqnr_db": round(float(err), 2)}
            for err, k in ranked[:count]]
