"""Core ML artifacts (mlprogram) with coremltools 9, and their checks off macOS.

Route: a torch module (the source's own, or the ONNX reference rebuilt as torch by
:mod:`.onnx_torch`) → ``torch.jit.trace`` at batch 1 → ``coremltools.convert`` to an fp16
mlprogram for the profile's deployment target, float32 inputs declared explicitly (an iOS16+ fp16
program otherwise makes its inputs fp16), fresh ``TensorType`` objects for every call (reusing
them breaks the second conversion). When tracing fails, ``torch.export`` is tried. Compressed
variants start from the fp16 program: int8 linear weights, 6- and 4-bit k-means palettization.

``MLModel.predict`` exists only on macOS. Elsewhere :func:`check_coreml` reloads the saved package
(spec + milproto program), checks its I/O signature, and compares every weight of the fp32
reference with the weights stored in the program (after expanding int8/palettized constants);
the artifact is then reported "not-executed (needs macOS)", never "passed".
"""

from __future__ import annotations

import contextlib
import io
import platform
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeserve.errors import ConversionError
from edgeserve.manifest import TensorSpec

__all__ = ["WEIGHT_COSINE", "build_coreml", "check_coreml", "coreml_weights", "on_macos"]

# The cosine every reference weight must keep in the Core ML program, by compression.
WEIGHT_COSINE = {"none": 0.99999, "weight-int8": 0.999, "palettize-6": 0.995, "palettize-4": 0.97}
_MIN_WEIGHT = 16


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """coremltools prints tqdm bars for every pass and warns about the torch version: mute both."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def on_macos() -> bool:
    return platform.system() == "Darwin"


def _static(spec: TensorSpec) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else 1 for d in spec.shape)


def _tensor_types(inputs: Sequence[TensorSpec]) -> list[Any]:
    import coremltools as ct

    return [ct.TensorType(name=s.name, shape=_static(s),
                          dtype=np.int32 if s.dtype.startswith("int") else np.float32)
            for s in inputs]


def _base_program(module: Any, examples: tuple[Any, ...], inputs: Sequence[TensorSpec],
                  outputs: Sequence[TensorSpec], target: str) -> tuple[Any, str]:
    import coremltools as ct
    import torch

    deployment = getattr(ct.target, target)
    errors = []
    with _quiet():
        try:
            traced = torch.jit.trace(module.eval(), examples,  # type: ignore[no-untyped-call]
                                     check_trace=False)
            model = ct.convert(traced, inputs=_tensor_types(inputs),
                               outputs=[ct.TensorType(name=s.name) for s in outputs],
                               convert_to="mlprogram", minimum_deployment_target=deployment,
                               compute_precision=ct.precision.FLOAT16)
            return model, "torch.jit.trace"
        except Exception as exc:
            errors.append(f"jit.trace: {type(exc).__name__}: {str(exc)[:300]}")
        try:
            exported = torch.export.export(module.eval(), examples).run_decompositions({})
            model = ct.convert(exported, convert_to="mlprogram",
                               minimum_deployment_target=deployment,
                               compute_precision=ct.precision.FLOAT16)
            return model, "torch.export"
        except Exception as exc:
            errors.append(f"torch.export: {type(exc).__name__}: {str(exc)[:300]}")
    raise ConversionError("torch → Core ML failed on both routes: " + "; ".join(errors))


def _compress(model: Any, quantization: str) -> Any:
    import coremltools.optimize.coreml as cto

    with _quiet():
        if quantization == "weight-int8":
            config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(
                mode="linear_symmetric", weight_threshold=_MIN_WEIGHT))
            return cto.linear_quantize_weights(model, config)
        if quantization in ("palettize-6", "palettize-4"):
            config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(
                mode="kmeans", nbits=int(quantization[-1]), weight_threshold=_MIN_WEIGHT))
            return cto.palettize_weights(model, config)
    raise ConversionError(f"no Core ML builder for quantization {quantization!r}; Core ML "
                          "artifacts are fp16, weight-int8, palettize-6 or palettize-4")


def build_coreml(module: Any, examples: tuple[Any, ...], inputs: Sequence[TensorSpec],
                 outputs: Sequence[TensorSpec], targets: Mapping[str, tuple[str, str]],
                 work: Path) -> tuple[dict[str, Path], dict[str, str], list[str]]:
    """Build each ``targets[id] = (quantization, deployment_target)``; (paths, errors, notes)."""
    paths: dict[str, Path] = {}
    errors: dict[str, str] = {}
    bases: dict[str, Any] = {}
    notes: list[str] = []
    for artifact_id, (quantization, target) in targets.items():
        try:
            if target not in bases:
                bases[target], route = _base_program(module, examples, inputs, outputs, target)
                notes.append(f"converted from {route}")
            model = bases[target] if quantization == "none" else _compress(bases[target],
                                                                         quantization)
            path = work / f"{artifact_id}.mlpackage"
            with _quiet():
                model.save(str(path))
            paths[artifact_id] = path
        except ConversionError as exc:
            errors[artifact_id] = str(exc)
        except Exception as exc:
            errors[artifact_id] = f"Core ML build failed: {type(exc).__name__}: {str(exc)[:400]}"
    return paths, errors, notes


def _program(path: Path) -> tuple[Any, Any]:
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    with _quiet():
        spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
        weights = path / "Data" / "com.apple.CoreML" / "weights"
        program = load(spec, specification_version=spec.specificationVersion,
                       file_weights_dir=str(weights))
    return spec, program


def coreml_weights(path: Path) -> tuple[list[np.ndarray], dict[str, int]]:
    """Float weights stored in the program (compressed ones expanded) and its op histogram."""
    _, program = _program(path)
    weights: list[np.ndarray] = []
    ops: dict[str, int] = {}
    consumed_by_constexpr: set[str] = set()
    for function in program.functions.values():
        for op in function.operations:
            if op.op_type.startswith("constexpr"):
                consumed_by_constexpr.update(v.name for v in op.inputs.values()
                                             if hasattr(v, "name"))
    for function in program.functions.values():
        for op in function.operations:
            ops[op.op_type] = ops.get(op.op_type, 0) + 1
            value = None
            if op.op_type.startswith("constexpr"):
                value = op.materialized_val_inference()
            elif op.op_type == "const" and op.outputs[0].name not in consumed_by_constexpr:
                value = op.outputs[0].val
            if isinstance(value, np.ndarray) and value.dtype.kind == "f" \
                    and value.size >= _MIN_WEIGHT:
                weights.append(value.astype(np.float32))
    return weights, ops


def _best_match(weight: np.ndarray, stored: Sequence[np.ndarray]) -> float:
    best = -1.0
    a = weight.astype(np.float64).ravel()
    views = [a]
    if weight.ndim == 2:
        views.append(weight.T.astype(np.float64).ravel())
    for candidate in stored:
        if candidate.size != weight.size:
            continue
        b = candidate.astype(np.float64).ravel()
        for view in views:
            denominator = float(np.linalg.norm(view) * np.linalg.norm(b))
            cos = 1.0 if denominator == 0 and not view.any() and not b.any() else \
                float(view @ b / max(denominator, 1e-30))
            best = max(best, cos)
    return best


def check_coreml(path: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 reference_weights: Mapping[str, np.ndarray], quantization: str) -> dict[str, Any]:
    """Structural and weight checks of a saved mlpackage (works on any OS)."""
    spec, _ = _program(path)
    problems: list[str] = []
    described = {i.name: i for i in spec.description.input}
    for tensor in inputs:
        found = described.get(tensor.name)
        if found is None:
            problems.append(f"input {tensor.name!r} missing (has {sorted(described)})")
            continue
        shape = tuple(found.type.multiArrayType.shape)
        if shape != _static(tensor):
            problems.append(f"input {tensor.name!r} shape {shape} != {_static(tensor)}")
        if found.type.multiArrayType.dataType != 65568 and tensor.dtype.startswith("float"):
            problems.append(f"input {tensor.name!r} is not float32")
    if len(spec.description.output) != len(outputs):
        problems.append(f"{len(spec.description.output)} outputs, the model has {len(outputs)}")
    stored, ops = coreml_weights(path)
    threshold = WEIGHT_COSINE.get(quantization, 0.97)
    matched, worst, unmatched = 0, 1.0, []
    for name, weight in reference_weights.items():
        cos = _best_match(weight, stored)
        if cos >= threshold:
            matched += 1
            worst = min(worst, cos)
        else:
            unmatched.append(f"{name} (best cosine {cos:.5f})")
    if unmatched:
        problems.append(f"{len(unmatched)} reference weight(s) not found in the program within "
                        f"cosine {threshold}: {', '.join(unmatched[:5])}")
    return {"structure_ok": not any("input" in p or "outputs" in p for p in problems),
            "weights_checked": len(reference_weights), "weights_matched": matched,
            "weight_cosine_min": round(worst, 6), "ops": dict(sorted(ops.items())),
            "problems": problems}
