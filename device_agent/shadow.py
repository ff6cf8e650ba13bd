"""Shadow inference for blue-green rollouts: run a second version beside the active one.

As an observer, the runner samples successful requests of the active version, and a background
thread runs the same inputs through the shadow version — so the answer to the caller never waits
for the shadow. Outputs are compared: for classifiers a disagreement is a different top-1 class;
otherwise any element differing by more than ``atol + rtol·|active|``. Counts, the largest
difference, shadow errors and the shadow's latency histogram are drained per (model, active
version) into the next telemetry window's ``shadow`` field.

The queue is bounded: under load, samples are dropped (and counted) rather than letting the shadow
steal the active version's CPU.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeserve.contract import ShadowReport
from edgeserve.telemetry import LatencyHistogram

from .observe import InferenceEvent

__all__ = ["ShadowRunner", "disagrees"]

log = logging.getLogger(__name__)

Predict = Callable[[str, Mapping[str, np.ndarray], str], Mapping[str, np.ndarray]]


def disagrees(active: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray],
              classifier: bool, rtol: float = 1e-2, atol: float = 1e-3) -> tuple[bool, float]:
    """(outputs disagree, largest absolute difference)."""
    worst = 0.0
    differ = False
    for name, a in active.items():
        b = shadow.get(name)
        if b is None or np.shape(a) != np.shape(b):
            return True, float("inf")
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        diff = np.abs(a64 - b64)
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
        if classifier and a64.ndim >= 2 and a64.shape[-1] > 1:
            differ |= bool(np.any(a64.argmax(-1) != b64.argmax(-1)))
        else:
            differ |= bool(np.any(diff > atol + rtol * np.abs(a64)))
    return differ, worst


@dataclass
class _Stats:
    compared: int = 0
    disagreements: int = 0
    errors: int = 0
    max_abs_diff: float = 0.0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)


class ShadowRunner:
    def __init__(self, predict: Predict, is_classifier: Callable[[str, str], bool],
                 queue_size: int = 64, seed: int | None = None) -> None:
        self._predict = predict
        self._is_classifier = is_classifier
        self._shadows: dict[str, tuple[str, float]] = {}
        self._stats: dict[tuple[str, str, str], _Stats] = {}
        self._queue: queue.Queue[tuple[InferenceEvent, str]] = queue.Queue(queue_size)
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.dropped = 0

    def set(self, model: str, shadow: str | None, sample_rate: float = 1.0) -> None:
        """Shadow ``model`` with version ``shadow`` on ``sample_rate`` of requests (None: stop)."""
        with self._lock:
            if shadow is None:
                self._shadows.pop(model, None)
            else:
                self._shadows[model] = (shadow, sample_rate)
        if shadow is not None:
            self.start()

    def shadow_of(self, model: str) -> str | None:
        entry = self._shadows.get(model)
        return entry[0] if entry else None

    def on_inference(self, event: InferenceEvent) -> None:
        entry = self._shadows.get(event.model)
        if entry is None or event.outputs is None or event.version == entry[0] \
                or event.extra.get("shadow"):
            return
        if entry[1] < 1.0 and self._random.random() >= entry[1]:
            return
        try:
            self._queue.put_nowait((event, entry[0]))
        except queue.Full:
            self.dropped += 1

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="edgeserve-shadow",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                event, shadow = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self.compare(event, shadow)

    def compare(self, event: InferenceEvent, shadow: str) -> None:
        """Run one sampled request through the shadow and record the comparison."""
        assert event.outputs is not None
        key = (event.model, event.version, shadow)
        started = time.perf_counter()
        try:
            outputs = self._predict(event.model, event.inputs, shadow)
        except Exception as exc:
            with self._lock:
                self._stats.setdefault(key, _Stats()).errors += 1
            log.debug("shadow %s %s failed: %s", event.model, shadow, exc)
            return
        elapsed_ms = (time.perf_counter() - started) * 1000
        differ, worst = disagrees(event.outputs, outputs,
                                  self._is_classifier(event.model, event.version))
        with self._lock:
            stats = self._stats.setdefault(key, _Stats())
            stats.compared += 1
            stats.disagreements += int(differ)
            stats.max_abs_diff = max(stats.max_abs_diff, worst)
            stats.latency.add(elapsed_ms)

    def drain(self) -> dict[tuple[str, str], ShadowReport]:
        """Comparisons since the last drain, per (model, active version)."""
        with self._lock:
            stats, self._stats = self._stats, {}
        out: dict[tuple[str, str], ShadowReport] = {}
        for (model, active, shadow), s in stats.items():
            report: dict[str, Any] = {"version": shadow, "compared": s.compared,
                                      "disagreements": s.disagreements, "errors": s.errors,
                                      "max_abs_diff": s.max_abs_diff if np.isfinite(
                                          s.max_abs_diff) else 1e300}
            if s.latency.count:
                report["latency"] = s.latency.to_data()
            out[(model, active)] = ShadowReport.model_validate(report)
        return out
