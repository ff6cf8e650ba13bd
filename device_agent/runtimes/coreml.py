"""Core ML backend (macOS/iOS only, through coremltools). Elsewhere it says so clearly."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from edgeserve.errors import RuntimeUnavailableError
from edgeserve.profiles import HardwareProfile

from . import ArtifactSource, TensorInfo

__all__ = ["CoreMlRuntime"]

_FEATURE_DTYPES = {"FLOAT32": np.float32, "FLOAT16": np.float16, "DOUBLE": np.float64,
                   "INT32": np.int32}


class CoreMlRuntime:
    """An ``MLModel`` loaded with the profile's compute units; predictions are serialised."""

    kind = "coreml"

    def __init__(self, source: ArtifactSource, profile: HardwareProfile) -> None:
        if sys.platform != "darwin":
            raise RuntimeUnavailableError(
                f"Core ML artifacts run only on macOS/iOS; this machine is {sys.platform}. "
                "Use a profile whose artifacts include ONNX or TFLite, or install the package on "
                "an Apple device"
            )
        try:
            import coremltools as ct
        except ImportError:
            raise RuntimeUnavailableError("Core ML needs coremltools on macOS: "
                                          "pip install coremltools") from None
        if source.path is None:
            raise RuntimeUnavailableError("a Core ML artifact must be loaded from a directory")
        settings = profile.runtimes.coreml
        units = getattr(ct.ComputeUnit, settings.compute_units if settings else "ALL")
        self._model: Any = ct.models.MLModel(str(source.path), compute_units=units)
        spec = self._model.get_spec().description
        self.inputs: list[TensorInfo] = [self._feature(f) for f in spec.input]
        self.outputs: list[TensorInfo] = [self._feature(f) for f in spec.output]

    @staticmethod
    def _feature(feature: object) -> TensorInfo:
        array = getattr(getattr(feature, "type", None), "multiArrayType", None)
        dtype_name = "FLOAT32"
        shape: tuple[int | None, ...] = ()
        if array is not None:
            shape = tuple(int(d) for d in getattr(array, "shape", []))
            dtype_name = {65568: "FLOAT32", 65552: "FLOAT16", 65600: "DOUBLE",
                          131104: "INT32"}.get(int(getattr(array, "dataType", 65568)), "FLOAT32")
        return TensorInfo(str(getattr(feature, "name", "")),
                          np.dtype(_FEATURE_DTYPES[dtype_name]), shape)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self._model.predict(feeds)
        return [np.asarray(result[o.name]) for o in self.outputs]

    def close(self) -> None:
        self._model = None
