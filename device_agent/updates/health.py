"""On-device health watch over a newly activated version's first inferences.

After activation (and a passing sample check) the new version serves live traffic under watch:
once it has answered ``min_inferences`` requests, its error rate and p95 latency are compared with
the desired state's :class:`~edgeserve.contract.HealthPolicy`. A device that gets fewer requests
than that within ``max_watch_s`` decides on the ones it saw (none: the sample check stands), so an
idle device neither holds a rollout stage forever nor commits a version that failed live
requests. The observer only counts (it runs on request threads); the updater's worker acts on the
verdict.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from edgeserve.contract import HealthPolicy
from edgeserve.telemetry import LatencyHistogram

from ..observe import InferenceEvent

__all__ = ["HealthVerdict", "HealthWatch"]


@dataclass(frozen=True)
class HealthVerdict:
    healthy: bool
    inferences: int
    errors: int
    p95_ms: float | None
    reason: str


class HealthWatch:
    """Counts one (model, version)'s inferences; ``verdict`` is None until there are enough."""

    def __init__(self, model: str, version: str, policy: HealthPolicy,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.model, self.version, self.policy = model, version, policy
        self._clock = clock
        self._started = clock()
        self._lock = threading.Lock()
        self._count = 0
        self._errors = 0
        self._latency = LatencyHistogram()
        self.decided = threading.Event()

    def on_inference(self, event: InferenceEvent) -> None:
        if event.model != self.model or event.version != self.version or self.decided.is_set():
            return
        with self._lock:
            self._count += 1
            self._errors += event.error is not None
            self._latency.add(event.latency_ms)
            if self._count >= self.policy.min_inferences:
                self.decided.set()

    def verdict(self) -> HealthVerdict | None:
        waited = self._clock() - self._started
        with self._lock:
            if self._count < self.policy.min_inferences and waited < self.policy.max_watch_s:
                return None
            rate = self._errors / self._count if self._count else 0.0
            p95 = self._latency.quantile(0.95) if self._count else None
        problems = []
        if rate > self.policy.max_error_rate:
            problems.append(f"error rate {rate:.3f} > {self.policy.max_error_rate:g}")
        if self.policy.max_latency_ms is not None and p95 is not None \
                and p95 > self.policy.max_latency_ms:
            problems.append(f"p95 latency {p95:.2f} ms > {self.policy.max_latency_ms:g} ms")
        over = f"over the first {self._count} inferences"
        if self._count < self.policy.min_inferences:
            over += (f" (fewer than {self.policy.min_inferences} in {waited:.0f} s; decided on "
                     "those and the sample check)")
        reason = ("; ".join(problems) + f" {over}") if problems else f"healthy {over}"
        return HealthVerdict(not problems, self._count, self._errors, p95, reason)
