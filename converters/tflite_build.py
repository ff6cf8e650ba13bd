"""TFLite / LiteRT artifacts with onnx2tf 1.28.8, run as a child process.

One onnx2tf run over the prepared static graph (batch 1) writes every variant asked for: fp32,
fp16, dynamic-range int8, integer int8 with float I/O (``static``) and full-integer int8 with int8
(or uint8) I/O. Known traps handled here (measured, see docs/converters.md):

* onnx2tf overwrites its ``-i`` file in place — it only ever sees a scratch copy;
* it downloads sample images for 4-D 3-channel inputs (as calibration data without ``-cind``, and
  as test data for its own dummy inference even with it) — calibration arrays are always passed
  (``-cind``, in the TF input layout), and the sample file it looks for in its working directory
  is written there from our own data first (:func:`_offline_sample_file`);
* it shells out to ``onnxsim`` — the venv's ``bin/`` is put on the child's PATH;
* ops TFLite lacks (``Erf`` in GELU, …) are decomposed (``-rtpo``) instead of becoming Flex ops;
* 4-D image inputs become NHWC (the layout TFLite delegates want); every other input keeps its
  shape (``-kat``). The artifact's own tensor specs record the layout and int8 quantization.

A variant onnx2tf did not write (e.g. full-integer quantization failed inside TensorFlow) is
reported as missing by :func:`build_tflite`; silently wrong conversions are caught by validation.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeserve import _process
from edgeserve.errors import ConversionError
from edgeserve.manifest import QuantParams, TensorSpec

from .data import Dataset
from .quiet import plain_text

__all__ = ["TfliteOutput", "build_tflite", "channels_last", "variant_of"]

_SUFFIX = {"fp32": "float32", "fp16": "float16", "int8-dynamic": "dynamic_range_quant",
           "int8-static": "integer_quant", "int8-full-integer": "full_integer_quant"}
_PSEUDO_OPS = {"Erf", "Asin", "Acos", "Atan", "GatherND", "MatMulInteger"}
_SAFE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CALIBRATION_LIMIT = 100
_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
           np.dtype(np.int8): "int8", np.dtype(np.uint8): "uint8", np.dtype(np.int32): "int32",
           np.dtype(np.int64): "int64", np.dtype(np.bool_): "bool", np.dtype(np.int16): "int16"}


@dataclass
class TfliteOutput:
    """Files onnx2tf wrote by variant, the artifact signature per variant, and its log tail."""

    files: dict[str, Path] = field(default_factory=dict)
    inputs: dict[str, list[TensorSpec]] = field(default_factory=dict)
    outputs: dict[str, list[TensorSpec]] = field(default_factory=dict)
    model_output_layouts: dict[str, str] = field(default_factory=dict)
    log_tail: str = ""
    """what onnx2tf said went wrong (plain text, see :func:`_log_summary`)"""


def variant_of(precision: str, quantization: str) -> str:
    if precision in ("fp32", "fp16"):
        return precision
    if precision == "int8" and quantization in ("dynamic", "static", "full-integer"):
        return f"int8-{quantization}"
    raise ConversionError(f"no TFLite builder for precision {precision!r} with quantization "
                          f"{quantization!r}; TFLite artifacts are fp32, fp16, int8 dynamic, "
                          "static or full-integer")


def channels_last(rank: int) -> tuple[str, str]:
    """(channels-first, channels-last) layout names for a rank-3/4/5 tensor."""
    spatial = {3: "W", 4: "HW", 5: "DHW"}[rank]
    return f"NC{spatial}", f"N{spatial}C"


def _is_image(spec: TensorSpec) -> bool:
    return spec.layout == "NCHW" and len(spec.shape) == 4


def _scratch_model(static: Path, work: Path, inputs: Sequence[TensorSpec],
                   outputs: Sequence[TensorSpec]) -> tuple[Path, dict[str, str]]:
    """A renamed copy (input/output names onnx2tf keeps intact); returns new → original names."""
    import onnx

    model = onnx.load(str(static))
    mapping: dict[str, str] = {}
    renames: dict[str, str] = {}
    for prefix, specs in (("input", inputs), ("output", outputs)):
        for i, spec in enumerate(specs):
            new = spec.name if _SAFE.match(spec.name) and not spec.name.startswith("serving") \
                else f"{prefix}_{i}"
            renames[spec.name] = new
            mapping[new] = spec.name
    for value in [*model.graph.input, *model.graph.output]:
        value.name = renames.get(value.name, value.name)
    for node in model.graph.node:
        for seq in (node.input, node.output):
            for k, name in enumerate(seq):
                if name in renames:
                    seq[k] = renames[name]
    path = work / "onnx2tf-input.onnx"
    onnx.save(model, str(path))
    return path, mapping


def _command(src: Path, out: Path, inputs: Sequence[TensorSpec], renames: Mapping[str, str],
             variants: set[str], io_dtype: str, calibration: Dataset | None, work: Path) -> list[str]:
    back = {orig: new for new, orig in renames.items()}
    cmd = [str(Path(sys.executable).parent / "onnx2tf"), "-i", str(src), "-o", str(out), "-coion",
           "-v", "error"]
    import onnx

    # TFLite has no builtin for these: onnx2tf would emit Flex (Select TF) ops that LiteRT
    # cannot run; its pseudo-op decompositions are approximations that validation measures
    pseudo = sorted({n.op_type for n in onnx.load(str(src)).graph.node} & _PSEUDO_OPS)
    if pseudo:
        cmd += ["-rtpo", *pseudo]
    keep = [back[s.name] for s in inputs if not _is_image(s)]
    if keep:
        cmd += ["-kat", *keep]
    if variants & {"int8-static", "int8-full-integer"}:
        if calibration is None:
            raise ConversionError("TFLite int8 (integer) needs calibration data")
        cmd += ["-oiqt", "-qt", "per-channel", "-iqd", io_dtype, "-oqd", io_dtype]
        for spec in inputs:
            array = calibration.stacked(spec.name)[:_CALIBRATION_LIMIT].astype(np.float32)
            if array.ndim != len(spec.shape):
                raise ConversionError(
                    f"TFLite int8 calibration takes samples stacked on a first batch axis; input "
                    f"{spec.name!r} {list(spec.shape)} has none, so its data are whole feeds")
            if _is_image(spec):
                array = array.transpose(0, 2, 3, 1)
            npy = work / f"calib-{back[spec.name]}.npy"
            np.save(npy, array)
            cmd += ["-cind", back[spec.name], str(npy), "0", "1"]
    elif "int8-dynamic" in variants:
        cmd += ["-odrqt"]
    return cmd


_SAMPLE_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"


def _offline_sample_file(work: Path, inputs: Sequence[TensorSpec], data: Dataset | None) -> None:
    """The 20×128×128×3 file onnx2tf would download, made from our own images (or zeros)."""
    images = [s for s in inputs if _is_image(s) and s.shape[1] == 3]
    sample = np.zeros((20, 128, 128, 3), dtype=np.float32)
    if images and data is not None:
        array = data.stacked(images[0].name)[:20].transpose(0, 2, 3, 1)
        rows = np.linspace(0, array.shape[1] - 1, 128).round().astype(int)
        cols = np.linspace(0, array.shape[2] - 1, 128).round().astype(int)
        resized = array[:, rows][:, :, cols]
        sample[:len(resized)] = resized
    np.save(work / _SAMPLE_FILE, sample)


def _spec_from_detail(detail: Mapping[str, object], name: str, layout: str | None) -> TensorSpec:
    dtype = _DTYPES.get(np.dtype(detail["dtype"]), "float32")  # type: ignore[call-overload]
    scale, zero = detail["quantization"]  # type: ignore[misc]
    scale, zero = float(scale), int(zero)  # type: ignore[has-type]
    quant = QuantParams(scale=scale, zero_point=zero) \
        if dtype in ("int8", "uint8", "int16") and scale else None
    shape = [int(d) for d in detail["shape"]]  # type: ignore[attr-defined]
    return TensorSpec(name=name, dtype=dtype, shape=shape, layout=layout, quantization=quant)  # type: ignore[arg-type]


def _static_shape(spec: TensorSpec, batch: int = 1) -> list[int]:
    shape = [d if isinstance(d, int) else 1 for d in spec.shape]
    if batch > 1 and shape:
        shape[0] = batch
    return shape


def _read_signature(path: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                    renames: Mapping[str, str], result: TfliteOutput, variant: str,
                    batch: int = 1) -> None:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    back = {orig: new for new, orig in renames.items()}
    found_in = {d["name"]: d for d in interp.get_input_details()}
    found_out = {d["name"]: d for d in interp.get_output_details()}
    specs_in = []
    for i, spec in enumerate(inputs):
        detail = found_in.get(back[spec.name]) or list(interp.get_input_details())[i]
        layout = "NHWC" if _is_image(spec) else spec.layout
        specs_in.append(_spec_from_detail(detail, str(detail["name"]), layout))
    specs_out = []
    for i, spec in enumerate(outputs):
        detail = found_out.get(back[spec.name]) or list(interp.get_output_details())[i]
        shape, want = [int(d) for d in detail["shape"]], _static_shape(spec, batch)
        layout = spec.layout
        if shape != want and len(want) in (3, 4, 5) and shape == [want[0], *want[2:], want[1]]:
            first, last = channels_last(len(want))
            result.model_output_layouts[spec.name] = spec.layout or first
            layout = last
        specs_out.append(_spec_from_detail(detail, str(detail["name"]), layout))
    result.inputs[variant] = specs_in
    result.outputs[variant] = specs_out


def select_tf_ops(path: Path) -> list[str]:
    """The Select TF (Flex) ops a ``.tflite`` file needs: custom op codes named ``Flex…``, which
    only a LiteRT built with the Flex delegate runs (not the ``ai-edge-litert`` wheel, not the
    Android/iOS builtin runtimes)."""
    from ai_edge_litert import schema_py_generated as schema

    buffer = Path(path).read_bytes()
    model = schema.Model.GetRootAs(buffer, 0)
    found = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        custom = code.CustomCode() if code is not None else None
        if custom and custom.startswith(b"Flex"):
            found.append(custom.decode())
    return sorted(set(found))


def _log_summary(log: str) -> str:
    """What onnx2tf said went wrong: its ``ERROR:`` lines when there are any (a traceback's tail
    only names the import that failed), else the last lines; colour codes removed."""
    lines = [line.rstrip() for line in plain_text(log).strip().splitlines() if line.strip()]
    errors = list(dict.fromkeys(line.strip() for line in lines if "ERROR" in line))
    return " | ".join(errors[-3:]) if errors else "\n".join(lines[-8:])


def build_tflite(static: Path, work: Path, inputs: Sequence[TensorSpec],
                 outputs: Sequence[TensorSpec], variants: set[str], io_dtype: str = "int8",
                 calibration: Dataset | None = None, timeout: float = 3600,
                 batch: int = 1) -> TfliteOutput:
    """Run onnx2tf once for ``variants`` (keys of ``variant_of``); missing files are absent.
    ``batch``: the batch ``static`` is fixed at (a batch-N variant's graph)."""
    work.mkdir(parents=True, exist_ok=True)
    src, renames = _scratch_model(static, work, inputs, outputs)
    out = work / "onnx2tf-out"
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    cmd = _command(src, out, inputs, renames, variants, io_dtype, calibration, work)
    _offline_sample_file(work, inputs, calibration)
    try:
        # dies with us: onnx2tf left running by a killed converter takes minutes of CPU
        proc = _process.run(cmd, capture_output=True, text=True, check=False, timeout=timeout,
                            cwd=work, env=env)
    except subprocess.TimeoutExpired:
        raise ConversionError(f"onnx2tf did not finish within {timeout:.0f} s") from None
    result = TfliteOutput(log_tail=_log_summary(proc.stderr + proc.stdout))
    for variant in variants:
        path = out / f"{src.stem}_{_SUFFIX[variant]}.tflite"
        if path.exists():
            result.files[variant] = path
            _read_signature(path, inputs, outputs, renames, result, variant, batch)
    return result
