"""ONNX Runtime backend: execution providers, threads and graph optimisation from the profile."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from edgeserve.errors import RuntimeUnavailableError
from edgeserve.profiles import HardwareProfile

from . import ArtifactSource, TensorInfo

__all__ = ["ORT_DTYPES", "OnnxRuntime", "choose_providers"]

ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(int16)": np.int16,
    "tensor(uint16)": np.uint16, "tensor(int32)": np.int32, "tensor(uint32)": np.uint32,
    "tensor(int64)": np.int64, "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
    "tensor(string)": np.object_,
}
_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
               "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def choose_providers(wanted: list[str], available: list[str]) -> list[str]:
    """The profile's providers that this ONNX Runtime build has, in the profile's order.

    The CPU provider is always last: a profile written for a Jetson still runs (slower) on a
    development machine instead of refusing to load.
    """
    chosen = [p for p in wanted if p in available and p != "CPUExecutionProvider"]
    return [*chosen, "CPUExecutionProvider"]


def _info(arg: object) -> TensorInfo:
    name = str(getattr(arg, "name", ""))
    dtype = np.dtype(ORT_DTYPES.get(str(getattr(arg, "type", "")), np.float32))
    shape = tuple(d if isinstance(d, int) else None for d in getattr(arg, "shape", []) or [])
    return TensorInfo(name, dtype, shape)


def _model_file(path: Path | None) -> Path:
    """The ONNX file of an artifact: the path itself, or the one ``.onnx`` file of an artifact
    folder (a model with external data: ``model.onnx`` beside ``model.onnx.data``, which ONNX
    Runtime finds relative to it)."""
    if path is None:
        raise RuntimeUnavailableError("no ONNX model content to load")
    if not path.is_dir():
        return path
    found = sorted(path.glob("*.onnx"))
    if len(found) != 1:
        raise RuntimeUnavailableError(
            f"the ONNX artifact folder {path.name} holds {len(found)} .onnx files "
            f"({', '.join(f.name for f in found) or 'none'}); expected exactly one model file "
            "beside its external data")
    return found[0]


class OnnxRuntime:
    """One ``InferenceSession`` (thread-safe ``run``)."""

    kind = "onnxruntime"

    def __init__(self, source: ArtifactSource, profile: HardwareProfile) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeUnavailableError("ONNX Runtime is not installed; install "
                                          "'edgeserve[agent]' (package onnxruntime)") from None
        settings = profile.runtimes.onnxruntime
        options = ort.SessionOptions()
        providers = ["CPUExecutionProvider"]
        if settings is not None:
            options.intra_op_num_threads = settings.intra_op_threads
            options.inter_op_num_threads = settings.inter_op_threads
            options.graph_optimization_level = getattr(
                ort.GraphOptimizationLevel, _OPT_LEVELS[settings.graph_optimization])
            providers = choose_providers(settings.execution_providers,
                                         ort.get_available_providers())
        options.log_severity_level = 3
        model = source.content if source.content is not None else str(_model_file(source.path))
        try:
            self._session = ort.InferenceSession(model, options, providers=providers)
        except Exception as exc:  # ORT raises its own untyped errors for bad models
            raise RuntimeUnavailableError(f"ONNX Runtime cannot load the artifact: {exc}") from None
        self.providers = self._session.get_providers()
        self.inputs = [_info(a) for a in self._session.get_inputs()]
        self.outputs = [_info(a) for a in self._session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]
        # A failing request raises (the agent turns it into an InferenceError and counts it);
        # ORT would also print it to stderr, past the application's logging, once per request.
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 4

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(self._session.run(self._output_names, feeds, self._run_options))

    def close(self) -> None:
        with contextlib.suppress(AttributeError):
            del self._session
