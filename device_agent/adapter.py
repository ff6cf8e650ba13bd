"""Map the model's signature (what callers use) onto an artifact's own tensors and back.

An artifact may name its tensors differently (TFLite ``serving_default_x:0``), use another layout
(NHWC instead of NCHW) or take integer tensors with affine quantization. The manifest lists an
artifact's tensors in the same order as the model's, so the mapping is positional. Callers always
see the model's signature: inputs are validated against it (names, dtype kind, rank, fixed
dimensions) with errors that name the tensor and the expectation, then transposed and quantized for
the runtime; outputs are dequantized, transposed back and renamed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edgeserve.errors import InvalidInputError, RuntimeUnavailableError
from edgeserve.manifest import Artifact, Manifest, TensorSpec

from .runtimes import Runtime, TensorInfo

__all__ = ["IOAdapter", "TensorPlan", "format_shape", "numpy_dtype"]

_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "int8": np.int8,
           "uint8": np.uint8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
           "bool": np.bool_, "string": np.object_}


def numpy_dtype(name: str) -> np.dtype:
    return np.dtype(_DTYPES[name])


def format_shape(shape: list[int | str | None] | tuple[int | str | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _permutation(src: str | None, dst: str | None) -> tuple[int, ...] | None:
    """Axes that turn layout ``src`` into ``dst`` (None when equal, unknown or incompatible)."""
    if not src or not dst or src == dst or sorted(src) != sorted(dst):
        return None
    return tuple(src.index(axis) for axis in dst)


@dataclass(frozen=True)
class TensorPlan:
    """How one tensor travels between the model signature and the runtime."""

    spec: TensorSpec
    dtype: np.dtype
    runtime_name: str
    runtime_dtype: np.dtype
    to_runtime: tuple[int, ...] | None
    from_runtime: tuple[int, ...] | None
    quant: tuple[float, int] | None
    direct: bool


def _plan(spec: TensorSpec, art: TensorSpec, info: TensorInfo) -> TensorPlan:
    dtype = numpy_dtype(spec.dtype)
    quant = None
    if info.dtype.kind in "iu" and dtype.kind == "f":
        if art.quantization is not None:
            quant = (art.quantization.scale, art.quantization.zero_point)
        else:
            quant = info.quantization
        if quant is None:
            raise RuntimeUnavailableError(
                f"tensor {spec.name!r}: the artifact takes {info.dtype} but declares no "
                "quantization (scale, zero_point) to convert from the model's float tensor")
    to_rt = _permutation(spec.layout, art.layout)
    from_rt = _permutation(art.layout, spec.layout)
    direct = to_rt is None and quant is None and info.dtype == dtype
    return TensorPlan(spec, dtype, info.name, info.dtype, to_rt, from_rt, quant, direct)


def _match(specs: list[TensorSpec], infos: list[TensorInfo], what: str) -> list[TensorInfo]:
    """The runtime tensor for each artifact spec: by name, else by position."""
    by_name = {i.name: i for i in infos}
    if all(s.name in by_name for s in specs):
        return [by_name[s.name] for s in specs]
    if len(specs) == len(infos):
        return list(infos)
    raise RuntimeUnavailableError(
        f"the artifact's {what} {[i.name for i in infos]} do not match the manifest's "
        f"{[s.name for s in specs]}")


class IOAdapter:
    """Validate and convert tensors for one (manifest, artifact, runtime) triple."""

    def __init__(self, manifest: Manifest, artifact: Artifact, runtime: Runtime) -> None:
        art_in = artifact.inputs or manifest.inputs
        art_out = artifact.outputs or manifest.outputs
        if len(art_in) != len(manifest.inputs) or len(art_out) != len(manifest.outputs):
            raise RuntimeUnavailableError(
                f"artifact {artifact.id} lists {len(art_in)} inputs / {len(art_out)} outputs, "
                f"the model {len(manifest.inputs)} / {len(manifest.outputs)}")
        rt_in = _match(art_in, runtime.inputs, "inputs")
        rt_out = _match(art_out, runtime.outputs, "outputs")
        self.inputs = [_plan(s, a, i) for s, a, i in zip(manifest.inputs, art_in, rt_in,
                                                         strict=True)]
        self.outputs = [_plan(s, a, i) for s, a, i in zip(manifest.outputs, art_out, rt_out,
                                                          strict=True)]
        order = {info.name: k for k, info in enumerate(runtime.outputs)}
        self._output_index = [order[p.runtime_name] for p in self.outputs]
        self._names = {p.spec.name for p in self.inputs}
        # Fast paths for the common case (same names, dtypes and layout): each request then
        # costs a few dictionary operations, not a loop of conversions.
        self._fast_check = [(p.spec.name, p.dtype, len(p.spec.shape),
                             tuple((i, d) for i, d in enumerate(p.spec.shape)
                                   if isinstance(d, int)), p) for p in self.inputs]
        self._inputs_direct = all(p.direct and p.runtime_name == p.spec.name for p in self.inputs)
        self._outputs_direct = all(p.direct for p in self.outputs)
        self._output_names = [p.spec.name for p in self.outputs]
        self._output_identity = self._output_index == list(range(len(self.outputs)))

    def check(self, inputs: Mapping[str, object], strict: bool = False) -> dict[str, np.ndarray]:
        """Inputs as arrays of the model's dtypes; raises InvalidInputError naming the tensor.

        ``strict`` refuses arrays of any other dtype instead of converting them safely.
        """
        if len(inputs) != len(self._fast_check):
            self._name_error(inputs)
        arrays = {}
        # Written for the interpreter: no zip or generator per request (bench/agent.py part a).
        for name, dtype, rank, fixed, plan in self._fast_check:
            value = inputs.get(name)
            if value is None:
                self._name_error(inputs)
            if type(value) is np.ndarray and value.dtype == dtype and value.ndim == rank:
                shape = value.shape
                for axis, size in fixed:
                    if shape[axis] != size:
                        break
                else:
                    arrays[name] = value
                    continue
            arrays[name] = _check_tensor(plan, value, strict)
        return arrays

    def _name_error(self, inputs: Mapping[str, object]) -> None:
        expected = sorted(self._names)
        missing = [n for n in expected if n not in inputs]
        unknown = sorted(n for n in inputs if n not in self._names)
        parts = []
        if missing:
            parts.append(f"missing input(s) {missing}")
        if unknown:
            parts.append(f"unknown input(s) {unknown}")
        raise InvalidInputError(f"{'; '.join(parts)}; the model takes {expected}")

    def to_runtime(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The runtime's feeds; may be ``arrays`` itself (runtimes never change their feeds)."""
        if self._inputs_direct:
            return arrays if type(arrays) is dict else dict(arrays)
        feeds = {}
        for plan in self.inputs:
            value = arrays[plan.spec.name]
            if not plan.direct:
                if plan.to_runtime is not None:
                    value = np.ascontiguousarray(value.transpose(plan.to_runtime))
                if plan.quant is not None:
                    scale, zero = plan.quant
                    info = np.iinfo(plan.runtime_dtype)
                    value = np.clip(np.round(value / scale) + zero, info.min, info.max)
                value = value.astype(plan.runtime_dtype, copy=False)
            feeds[plan.runtime_name] = value
        return feeds

    def from_runtime(self, results: list[np.ndarray]) -> dict[str, np.ndarray]:
        names = self._output_names
        if self._outputs_direct and self._output_identity and len(results) == len(names):
            return {names[0]: results[0]} if len(names) == 1 else dict(zip(names, results, strict=False))
        outputs = {}
        for plan, index in zip(self.outputs, self._output_index, strict=True):
            value = results[index]
            if not plan.direct:
                if plan.quant is not None:
                    scale, zero = plan.quant
                    value = (value.astype(np.float32) - zero) * np.float32(scale)
                if plan.from_runtime is not None and value.ndim == len(plan.from_runtime):
                    value = np.ascontiguousarray(value.transpose(plan.from_runtime))
                value = value.astype(plan.dtype, copy=False)
            outputs[plan.spec.name] = value
        return outputs

    def warmup_inputs(self) -> dict[str, np.ndarray]:
        """Zeros of the model's input shapes (dynamic axes as 1) for warming a runtime up."""
        return {p.spec.name: np.zeros([d if isinstance(d, int) else 1 for d in p.spec.shape],
                                      dtype=p.dtype) for p in self.inputs}


def _check_tensor(plan: TensorPlan, value: object, strict: bool = False) -> np.ndarray:
    spec = plan.spec
    if not isinstance(value, np.ndarray):
        try:
            value = np.asarray(value, dtype=plan.dtype if plan.dtype.kind != "O" else None)
        except (ValueError, TypeError) as exc:
            raise InvalidInputError(f"input {spec.name!r}: cannot be read as a {spec.dtype} "
                                    f"tensor ({exc})") from None
    if value.dtype != plan.dtype:
        if strict and not (plan.dtype.kind == "O" and value.dtype.kind in "OSU"):
            raise InvalidInputError(f"input {spec.name!r}: expected dtype {spec.dtype}, got "
                                    f"{value.dtype}")
        value = _cast(spec, plan.dtype, value)
    if value.ndim != len(spec.shape):
        raise InvalidInputError(
            f"input {spec.name!r}: expected rank {len(spec.shape)} shape "
            f"{format_shape(spec.shape)}, got shape {list(value.shape)}")
    for axis, (want, got) in enumerate(zip(spec.shape, value.shape, strict=True)):
        if isinstance(want, int) and want != got:
            raise InvalidInputError(
                f"input {spec.name!r}: axis {axis} must be {want} (shape "
                f"{format_shape(spec.shape)}), got shape {list(value.shape)}")
    return value


def _cast(spec: TensorSpec, dtype: np.dtype, value: np.ndarray) -> np.ndarray:
    """Allow lossless-kind casts (int → float, float64 → float32); refuse the rest."""
    if dtype.kind == "O":
        if value.dtype.kind in "OSU":
            return value.astype(object)
    elif value.dtype.kind in "biuf" and np.can_cast(value.dtype, dtype, casting="same_kind"):
        return value.astype(dtype)
    raise InvalidInputError(f"input {spec.name!r}: expected dtype {spec.dtype}, got "
                            f"{value.dtype} (which cannot be converted safely)")
