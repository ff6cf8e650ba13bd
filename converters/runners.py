"""Run a built artifact on this CPU with the model's tensors in, the model's tensors out.

An artifact may differ from the model's signature (``Artifact.inputs``/``outputs``): NHWC instead
of NCHW, int8 tensors with a scale and zero point. The runner adapts positionally — artifact
tensor *i* is model tensor *i* — by transposing between the two layouts and (de)quantizing, which
is exactly what the device agent does with the manifest.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from edgeserve.errors import ConversionError
from edgeserve.manifest import TensorSpec
from edgeserve.samples import run_samples
from edgeserve.selection import pad_batch

from .signature import ModelSignature

__all__ = ["LiteRtRunner", "OrtRunner", "Runner", "layout_permutation", "measure_latency",
           "run_dataset"]


class Runner(Protocol):
    """Runs batches given and returned in the model's own tensor signature."""

    batch_one: bool
    max_batch: int
    """the most samples one call takes (≤ 0: any number)"""

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...


def layout_permutation(source: str | None, target: str | None) -> list[int] | None:
    """Axes permutation taking a ``source`` layout array to ``target`` (None when equal/unknown)."""
    if not source or not target or source == target or sorted(source) != sorted(target):
        return None
    return [source.index(axis) for axis in target]


def _quantize(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    q = spec.quantization
    assert q is not None
    info = np.iinfo(np.dtype(spec.dtype))
    return np.clip(np.round(x / q.scale + q.zero_point), info.min, info.max).astype(spec.dtype)


def _dequantize(y: np.ndarray, spec: TensorSpec) -> np.ndarray:
    q = spec.quantization
    assert q is not None
    return ((y.astype(np.float32) - q.zero_point) * q.scale).astype(np.float32)


def to_artifact(x: np.ndarray, model: TensorSpec, artifact: TensorSpec) -> np.ndarray:
    perm = layout_permutation(model.layout, artifact.layout)
    if perm is not None:
        x = np.transpose(x, perm)
    if artifact.quantization is not None:
        return _quantize(x, artifact)
    return np.ascontiguousarray(x.astype(artifact.dtype, copy=False))


def from_artifact(y: np.ndarray, model: TensorSpec, artifact: TensorSpec) -> np.ndarray:
    if artifact.quantization is not None:
        y = _dequantize(y, artifact)
    perm = layout_permutation(artifact.layout, model.layout)
    return np.transpose(y, perm) if perm is not None else y


class OrtRunner:
    """ONNX Runtime on the CPU, one intra-op thread (comparable latency numbers)."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(path), options,
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ConversionError(f"{path.name}: ONNX Runtime cannot load it: {exc}") from None
        self._inputs = [i.name for i in self._session.get_inputs()]
        first = self._session.get_inputs()[0].shape
        self.batch_one = bool(first) and first[0] == 1
        self.max_batch = 1 if self.batch_one else 0

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        outputs = self._session.run(None, {k: feeds[k] for k in self._inputs})
        return [np.asarray(o) for o in outputs]


class LiteRtRunner:
    """``ai_edge_litert`` interpreter; artifact tensors mapped to model tensors by position.
    ``batch`` > 1: the artifact's batch is fixed at that size (a batch-N variant); a call with
    fewer samples is padded with copies of its last one, whose outputs are dropped."""

    def __init__(self, path: Path, model_inputs: Sequence[TensorSpec],
                 model_outputs: Sequence[TensorSpec], artifact_inputs: Sequence[TensorSpec],
                 artifact_outputs: Sequence[TensorSpec], threads: int = 1,
                 batch: int = 1) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.batch_one = batch == 1
        self.max_batch = batch
        try:
            self._interp = Interpreter(model_path=str(path), num_threads=threads)
            self._interp.allocate_tensors()
        except Exception as exc:
            raise ConversionError(f"{path.name}: LiteRT cannot load it: {exc}") from None
        details_in = {d["name"]: d for d in self._interp.get_input_details()}
        details_out = {d["name"]: d for d in self._interp.get_output_details()}
        self._in = [(m, a, details_in[a.name]["index"])
                    for m, a in zip(model_inputs, artifact_inputs, strict=True)]
        self._out = [(m, a, details_out[a.name]["index"])
                     for m, a in zip(model_outputs, artifact_outputs, strict=True)]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        count = None  # samples given, when fewer than a batch-N variant takes (padded)
        for model, artifact, index in self._in:
            x = feeds[model.name]
            if self.max_batch > 1 and x.shape[0] < self.max_batch:
                count = x.shape[0]
                x = pad_batch(x, self.max_batch)
            self._interp.set_tensor(index, to_artifact(x, model, artifact))
        self._interp.invoke()
        outputs = [from_artifact(self._interp.get_tensor(index), model, artifact)
                   for model, artifact, index in self._out]
        return outputs if count is None else [y[:count] for y in outputs]


def run_dataset(runner: Runner, inputs: Mapping[str, np.ndarray], signature: ModelSignature,
                batch: int = 64) -> list[np.ndarray]:
    """Every sample through ``runner``, outputs joined with samples first, in the signature's
    output order: run as :mod:`edgeserve.samples` says (the rule the package's health-check
    samples and the device agent follow too), never more than one sample per call for an
    artifact whose batch is fixed at one."""
    size = 1 if runner.batch_one else runner.max_batch if runner.max_batch > 0 else batch
    joined = run_samples(runner.run, signature.inputs, signature.outputs, inputs,
                         max_batch=size, where="data")
    return [joined[name] for name in signature.output_names]


def measure_latency(runner: Runner, sample: Mapping[str, np.ndarray], repeats: int = 30,
                    warmup: int = 3) -> float:
    """Median wall time of one batch-1 inference, in milliseconds."""
    for _ in range(warmup):
        runner.run(sample)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.run(sample)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))
