"""Runtimes behind one small Protocol: load an artifact, run it, close it.

A runtime speaks the *artifact's* tensors (its names, layout and dtypes); :mod:`..adapter` maps
them to the model's signature. Backends are imported lazily, so a board without LiteRT never
imports it and nothing here imports a heavy framework.

``run`` must be safe to call from several threads at once: ONNX Runtime sessions are; LiteRT
interpreters are not, so that backend keeps a small pool of interpreters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from edgeserve.errors import RuntimeUnavailableError
from edgeserve.profiles import HardwareProfile

__all__ = ["ArtifactSource", "Runtime", "TensorInfo", "load_runtime"]


@dataclass(frozen=True)
class TensorInfo:
    """A runtime tensor: ``shape`` uses None for dynamic axes; ``quantization`` is
    (scale, zero_point) for an affine-quantized integer tensor."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]
    quantization: tuple[float, int] | None = None


@dataclass(frozen=True)
class ArtifactSource:
    """What a runtime loads: verified bytes of a one-file artifact, or a verified directory."""

    content: bytes | None = None
    path: Path | None = None


class Runtime(Protocol):
    kind: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs in ``outputs`` order for feeds keyed by the runtime's input names."""

    def close(self) -> None:
        """Release the model (further ``run`` calls are not allowed)."""


def load_runtime(fmt: str, source: ArtifactSource, profile: HardwareProfile,
                 pool_size: int = 1) -> Runtime:
    """Load an artifact of format ``fmt`` with the runtime settings from ``profile``."""
    if fmt == "onnx":
        from .onnx import OnnxRuntime
        return OnnxRuntime(source, profile)
    if fmt == "tflite":
        from .litert import LiteRtRuntime
        return LiteRtRuntime(source, profile, pool_size=pool_size)
    if fmt == "coreml":
        from .coreml import CoreMlRuntime
        return CoreMlRuntime(source, profile)
    raise RuntimeUnavailableError(f"no runtime for artifact format {fmt!r}; "
                                  "supported: onnx, tflite, coreml")
