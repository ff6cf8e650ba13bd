"""The on-device agent: a crash-safe local model cache, runtimes (ONNX Runtime, LiteRT, Core ML),
offline inference in process, from the CLI and over HTTP/gRPC, monitoring and a durable outbox.
Never imports torch, TensorFlow or coremltools."""

from __future__ import annotations

from .agent import Agent, InstalledVersion, LoadedModel, PredictResult
from .cache import CacheCheck, ModelCache
from .observe import InferenceEvent, InferenceObserver
from .samples import SampleCheck
from .selection import required_files, select_artifact

__all__ = [
    "Agent",
    "CacheCheck",
    "InferenceEvent",
    "InferenceObserver",
    "InstalledVersion",
    "LoadedModel",
    "ModelCache",
    "PredictResult",
    "SampleCheck",
    "required_files",
    "select_artifact",
]
