"""The hook between inference and monitoring.

The inference service calls every registered :class:`InferenceObserver` once per request, after
the runtime returns (or fails), on the request's thread. Observers must be cheap and must not
raise: monitoring (``device_agent.telemetry``), shadow comparison and experiment bookkeeping are
observers, so serving never depends on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["InferenceEvent", "InferenceObserver"]


@dataclass(frozen=True, slots=True)
class InferenceEvent:
    """One request as the model saw it. ``outputs`` is None when it failed."""

    model: str
    version: str
    inputs: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray] | None
    latency_ms: float
    error: BaseException | None = None
    request_id: str | None = None
    batch_size: int = 1
    extra: Mapping[str, object] = field(default_factory=dict)


@runtime_checkable
class InferenceObserver(Protocol):
    def on_inference(self, event: InferenceEvent) -> None:
        """Called after every inference; must return quickly and never raise."""
