"""Bring any supported source to an fp32 ONNX graph (the start of the canonical reference).

========================  =====================================================================
source                    how
========================  =====================================================================
``torch.nn.Module``       Python API only, with example inputs; ``torch.onnx.export`` (TorchScript
                          exporter, opset 17, dynamic batch axis)
TorchScript file          ``torch.jit.load`` (``.pt``, ``.pth``, ``.ts``, ``.torchscript``), example
                          inputs from ``--input-shape``
``.pt2`` ExportedProgram  ``torch.export.load`` then the dynamo ONNX exporter
``.onnx``                 loaded and checked
``.keras`` / SavedModel   tf2onnx, in a child process (TensorFlow stays out of this process)
scikit-learn              an estimator object, or a ``.pkl``/``.joblib`` file of one; skl2onnx
========================  =====================================================================

The torch module (when there is one) is kept for the Core ML route, which converts from
``torch.jit.trace`` rather than from ONNX.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeserve import _process
from edgeserve.errors import ConfigError, ConversionError

from .graph import rename_outputs
from .quiet import plain_text

if TYPE_CHECKING:
    import onnx

__all__ = ["OPSET", "ImportedModel", "import_model", "torch_input_names"]

OPSET = 17
_TORCHSCRIPT = (".pt", ".pth", ".ts", ".torchscript", ".jit")
_PICKLE = (".pkl", ".pickle", ".joblib")


@dataclass
class ImportedModel:
    """An fp32 ONNX graph plus what the later routes may need from the original source."""

    model: onnx.ModelProto
    framework: str
    sha256: str
    filename: str | None = None
    torch_module: Any | None = None
    example_inputs: tuple[Any, ...] | None = None
    notes: list[str] = field(default_factory=list)


def import_model(source: Any, work: Path, *, example_inputs: Any = None,
                 input_names: Sequence[str] | None = None,
                 output_names: Sequence[str] | None = None,
                 input_shapes: Mapping[str, Sequence[int | None]] | None = None) -> ImportedModel:
    """Load ``source`` (an object or a path) and export it to ONNX under ``work``."""
    input_shapes = dict(input_shapes or {})
    if _is_torch_module(source):
        return _from_torch(source, work, example_inputs, input_names, output_names, "pytorch",
                           None, _state_digest(source))
    if _is_sklearn(source):
        return _from_sklearn(source, None, _pickle_digest(source))
    if not isinstance(source, str | Path):
        raise ConfigError(f"cannot convert an object of type {type(source).__name__}; expected a "
                          "torch.nn.Module, a scikit-learn estimator or a model file path")
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"{path}: no such model file or folder")
    if path.is_dir():
        if (path / "saved_model.pb").exists():
            return _from_tensorflow(path, work, "tensorflow-savedmodel")
        raise ConfigError(f"{path}: a folder, but not a TensorFlow SavedModel (no saved_model.pb)")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return _from_onnx(path)
    if suffix == ".keras":
        return _from_tensorflow(path, work, "keras")
    if suffix == ".pt2":
        return _from_pt2(path, work)
    if suffix in _TORCHSCRIPT:
        return _from_torchscript(path, work, example_inputs, input_names, output_names, input_shapes)
    if suffix in _PICKLE:
        return _from_sklearn_file(path)
    raise ConfigError(f"{path}: unknown model format {suffix!r}; expected .onnx, .pt/.pth "
                      "(TorchScript), .pt2, .keras, a SavedModel folder or a scikit-learn .pkl/.joblib")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_digest(path: Path) -> str:
    from edgeserve.package import file_sha256

    return file_sha256(path)


def _is_torch_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _is_sklearn(obj: Any) -> bool:
    return type(obj).__module__.startswith("sklearn.") or (
        hasattr(obj, "fit") and hasattr(obj, "get_params"))


def _state_digest(module: Any) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _pickle_digest(obj: Any) -> str:
    import pickle

    return _digest(pickle.dumps(obj))


def torch_input_names(count: int, given: Sequence[str] | None) -> list[str]:
    if given:
        if len(given) != count:
            raise ConfigError(f"{len(given)} input names given for {count} example inputs")
        return list(given)
    return ["input"] if count == 1 else [f"input_{i}" for i in range(count)]


def _as_tensors(example_inputs: Any) -> tuple[Any, ...]:
    import torch

    if example_inputs is None:
        raise ConfigError("a torch module needs example inputs (example_inputs=(tensor, ...)) to "
                          "be traced; they fix the input count, ranks and dtypes")
    items = example_inputs if isinstance(example_inputs, list | tuple) else (example_inputs,)
    return tuple(torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
                 for x in items)


def _from_torch(module: Any, work: Path, example_inputs: Any, input_names: Sequence[str] | None,
                output_names: Sequence[str] | None, framework: str, filename: str | None,
                sha256: str) -> ImportedModel:
    import onnx
    import torch

    args = _as_tensors(example_inputs)
    names = torch_input_names(len(args), input_names)
    module = module.eval()
    with torch.no_grad():
        produced = module(*args)
    count = len(produced) if isinstance(produced, list | tuple) else 1
    outs = list(output_names) if output_names else (
        ["output"] if count == 1 else [f"output_{i}" for i in range(count)])
    axes = {n: {0: "batch"} for n in [*names, *outs]}
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            # the TorchScript exporter announces its own deprecation on every call
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, buffer,  # type: ignore[arg-type]
                              input_names=names, output_names=outs, dynamic_axes=axes,
                              opset_version=OPSET, dynamo=False)
    except Exception as exc:
        raise ConversionError(f"torch → ONNX export failed: {type(exc).__name__}: {exc}") from None
    model = onnx.load_from_string(buffer.getvalue())
    return ImportedModel(model, framework, sha256, filename, module, args)


def _from_torchscript(path: Path, work: Path, example_inputs: Any, input_names: Sequence[str] | None,
                      output_names: Sequence[str] | None,
                      input_shapes: Mapping[str, Sequence[int | None]]) -> ImportedModel:
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch deprecates TorchScript
            module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    except Exception as exc:
        raise ConfigError(f"{path}: not a TorchScript file torch.jit.load can read ({exc}); save "
                          "with torch.jit.save, or export to .pt2 / .onnx") from None
    if example_inputs is None:
        if not input_shapes:
            raise ConfigError(f"{path}: a TorchScript file has no input shapes; pass "
                              "--input-shape NAME=Nx3x224x224 for each input, in order (N: a "
                              "dynamic batch; a number fixes it)")
        # a dynamic batch is traced at 1; the export keeps axis 0 dynamic either way, and the
        # reference is checked at batch 2 (reference.py)
        example_inputs = tuple(torch.zeros(*[1 if d is None else d for d in shape])
                               for shape in input_shapes.values())
        input_names = input_names or list(input_shapes)
    return _from_torch(module, work, example_inputs, input_names, output_names, "torchscript",
                       path.name, _file_digest(path))


def _from_pt2(path: Path, work: Path) -> ImportedModel:
    import onnx
    import torch

    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise ConfigError(f"{path}: not a torch.export ExportedProgram ({exc})") from None
    out = work / "pt2-export.onnx"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(program, (), str(out), dynamo=True, external_data=False,
                              opset_version=18, verbose=False)
    except Exception as exc:
        raise ConversionError(f"{path}: .pt2 → ONNX export failed: {type(exc).__name__}: "
                              f"{exc}") from None
    args = program.example_inputs[0] if program.example_inputs else None
    model = onnx.load(str(out))
    # the dynamo exporter names outputs after the op that made them (linear, add_3): name them
    # as the TorchScript route does
    count = len(model.graph.output)
    model, _ = rename_outputs(model, ["output"] if count == 1 else
                              [f"output_{i}" for i in range(count)])
    return ImportedModel(model, "pytorch-exported-program", _file_digest(path),
                         path.name, program.module(), tuple(args) if args else None)


def _from_onnx(path: Path) -> ImportedModel:
    import onnx

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ConfigError(f"{path}: not a valid ONNX model ({exc})") from None
    return ImportedModel(model, "onnx", _file_digest(path), path.name)


def _from_sklearn_file(path: Path) -> ImportedModel:
    # Unpickling runs code from the file: only convert files you trust (said in docs/converters.md).
    try:
        if path.suffix == ".joblib":
            import joblib

            estimator = joblib.load(path)
        else:
            import pickle

            with path.open("rb") as fh:
                estimator = pickle.load(fh)
    except Exception as exc:
        raise ConfigError(f"{path}: cannot unpickle a scikit-learn estimator ({exc})") from None
    if not _is_sklearn(estimator):
        raise ConfigError(f"{path}: holds a {type(estimator).__name__}, not a scikit-learn "
                          "estimator")
    return _from_sklearn(estimator, path.name, _file_digest(path))


def _from_sklearn(estimator: Any, filename: str | None, sha256: str) -> ImportedModel:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    features = getattr(estimator, "n_features_in_", None)
    if features is None:
        raise ConfigError("the scikit-learn estimator is not fitted (no n_features_in_)")
    options = {id(estimator): {"zipmap": False}} if hasattr(estimator, "predict_proba") else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = to_onnx(estimator, initial_types=[("input", FloatTensorType([None, features]))],
                            target_opset={"": OPSET, "ai.onnx.ml": 3}, options=options)
    except Exception as exc:
        raise ConversionError(f"scikit-learn → ONNX (skl2onnx) failed for "
                              f"{type(estimator).__name__}: {exc}") from None
    # classifiers output label + probabilities; skl2onnx calls anything else "variable"
    model, _ = rename_outputs(model, ["output_0" if o.name == "variable" else o.name
                                      for o in model.graph.output])
    return ImportedModel(model, "scikit-learn", sha256, filename)


def _from_tensorflow(path: Path, work: Path, framework: str) -> ImportedModel:
    import onnx

    out = work / "tf-export.onnx"
    result = _process.run(  # dies with us: an export left running can take half an hour
        [sys.executable, "-m", "edgeserve.converters._tf_export", str(path), str(out)],
        capture_output=True, text=True, check=False, timeout=1800,
        env=_quiet_tf_env())
    if result.returncode != 0 or not out.exists():
        tail = plain_text(result.stderr or result.stdout).strip().splitlines()[-3:]
        raise ConversionError(f"{path}: {framework} → ONNX (tf2onnx) failed: {' | '.join(tail)}")
    model = onnx.load(str(out))
    names = out.with_suffix(".json")
    info = json.loads(names.read_text()) if names.exists() else {}
    # the names the SavedModel signature / Keras model gives its outputs, not tf2onnx's
    # Identity:0 (the child writes them in the graph's output order)
    model, _ = rename_outputs(model, [str(n) for n in info.get("outputs", [])])
    digest = _file_digest(path) if path.is_file() else _digest((path / "saved_model.pb").read_bytes())
    return ImportedModel(model, framework, digest, path.name)


def _quiet_tf_env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env
