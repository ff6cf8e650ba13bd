"""Cohort model health for rollout gates, aggregated from stored telemetry windows.

The canary cohort is the devices a rollout moved, measured on the new version; the control cohort
is the devices in scope it has not moved yet (or, once every device moved, nobody: relative gates
then stay pending unless a control window exists). Latency histograms are merged exactly (so p95
is the cohort's p95, not an average of window p95s), counts are summed, and shadow comparisons
are summed. Drift is computed from the windows' input/output sketches merged per version against
that version's reference statistics (given a ``references`` lookup): a noise-corrected PSI
(:meth:`~edgeserve.telemetry.DistributionSketch.drift`) over all the cohort's samples, not an
average of per-window scores. Each window's score is corrected for its own few samples, so their
average reads a real drift low, and windows under ``MIN_SAMPLES`` sampled requests carry none.
Without a reference it falls back to the request-weighted mean of the window scores that exist
(None when no window has one).

For blue-green's shadow phase the canary numbers come from the shadow reports inside the active
version's windows: the shadow's own latency and errors, and how often it disagreed.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import sqlalchemy as sa

from edgeserve.errors import EdgeserveError
from edgeserve.telemetry import DistributionSketch, LatencyHistogram, ReferenceStats, SketchData

from ..store import Store
from ..tables import windows
from .gates import CohortMetrics

__all__ = ["Accumulator", "References", "cohort_metrics"]

References = Callable[[str, str], ReferenceStats | None]
"""(model, version) → the version's reference statistics, or None."""


@dataclass
class Accumulator:
    requests: int = 0
    errors: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    drift_weighted: float = 0.0
    drift_weight: int = 0
    js_weighted: float = 0.0
    compared: int = 0
    disagreements: int = 0
    reward_sum: float = 0.0
    reward_n: int = 0
    correct: int = 0
    labeled: int = 0
    references: References | None = None
    sketches: dict[tuple[str, str], tuple[DistributionSketch, DistributionSketch]] = field(
        default_factory=dict)

    def add_window(self, data: dict[str, object], shadow_mode: bool) -> None:
        if shadow_mode:
            self._add_shadow(data)
            return
        self._add_sketches(data)
        requests = int(data.get("requests", 0) or 0)  # type: ignore[call-overload]
        self.requests += requests
        self.errors += int(data.get("errors", 0) or 0)  # type: ignore[call-overload]
        latency = data.get("latency")
        if isinstance(latency, dict):
            self.latency.merge(LatencyHistogram.from_data(latency))
        drift = [d for d in (data.get("drift_inputs"), data.get("drift_outputs"))
                 if isinstance(d, dict)]
        if drift and requests:
            self.drift_weighted += max(float(d.get("psi", 0.0)) for d in drift) * requests
            self.js_weighted += max(float(d.get("js", 0.0)) for d in drift) * requests
            self.drift_weight += requests
        shadow = data.get("shadow")
        if isinstance(shadow, dict):
            self.compared += int(shadow.get("compared", 0))
            self.disagreements += int(shadow.get("disagreements", 0))
        feedback = data.get("feedback")
        if isinstance(feedback, dict):
            self.reward_sum += float(feedback.get("reward_sum", 0.0))
            self.reward_n += int(feedback.get("count", 0))
            self.correct += int(feedback.get("correct", 0))
            self.labeled += int(feedback.get("labeled", 0))

    def _add_sketches(self, data: dict[str, object]) -> None:
        model, version = data.get("model"), data.get("version")
        if self.references is None or not isinstance(model, str) or not isinstance(version, str):
            return
        if not (isinstance(data.get("inputs"), dict) or isinstance(data.get("outputs"), dict)):
            return
        key = (model, version)
        if key not in self.sketches:
            reference = self.references(model, version)
            if reference is None or not reference.groups:
                return
            self.sketches[key] = (DistributionSketch(reference, "input"),
                                  DistributionSketch(reference, "output"))
        for sketch, role in zip(self.sketches[key], ("inputs", "outputs"), strict=True):
            wire = data.get(role)
            if isinstance(wire, dict):
                # a window binned against another reference is skipped
                with contextlib.suppress(EdgeserveError, ValueError):
                    sketch.merge_data(SketchData.model_validate(wire))

    def _merged_drift(self) -> tuple[float, float] | None:
        """(psi, js) from the merged sketches, weighted by samples across versions."""
        total = psi_sum = js_sum = 0.0
        for inputs, outputs in self.sketches.values():
            scores = [d for d in (inputs.drift(), outputs.drift()) if d is not None]
            if not scores:
                continue
            n = max(d.n for d in scores)
            psi_sum += max(d.psi for d in scores) * n
            js_sum += max(d.js for d in scores) * n
            total += n
        return (psi_sum / total, js_sum / total) if total else None

    def _add_shadow(self, data: dict[str, object]) -> None:
        shadow = data.get("shadow")
        if not isinstance(shadow, dict):
            return
        compared = int(shadow.get("compared", 0))
        self.requests += compared + int(shadow.get("errors", 0))
        self.errors += int(shadow.get("errors", 0))
        self.compared += compared
        self.disagreements += int(shadow.get("disagreements", 0))
        latency = shadow.get("latency")
        if isinstance(latency, dict):
            self.latency.merge(LatencyHistogram.from_data(latency))

    def metrics(self) -> CohortMetrics:
        merged = self._merged_drift()
        psi: float | None
        js: float | None
        if merged is not None:
            psi, js = merged
        else:
            psi = self.drift_weighted / self.drift_weight if self.drift_weight else None
            js = self.js_weighted / self.drift_weight if self.drift_weight else None
        return CohortMetrics(
            requests=self.requests, errors=self.errors,
            p50_ms=self.latency.quantile(0.5), p95_ms=self.latency.quantile(0.95),
            p99_ms=self.latency.quantile(0.99),
            drift_psi=psi, drift_js=js,
            shadow_compared=self.compared, shadow_disagreements=self.disagreements,
            reward=self.reward_sum / self.reward_n if self.reward_n else None,
            accuracy=self.correct / self.labeled if self.labeled else None)


def cohort_metrics(store: Store, model: str, since: float,
                   devices: Collection[str] | Mapping[str, float],
                   version: str | None = None, exclude_version: str | None = None,
                   shadow_of: str | None = None,
                   references: References | None = None) -> CohortMetrics:
    """Health of ``model`` on ``devices`` from windows ending after ``since``.

    ``devices`` may map each device to its own start time (windows starting before it are
    skipped: a canary device is judged only once its new version answers).

    ``version`` selects windows of that version; ``exclude_version`` all other versions;
    ``shadow_of`` reads the shadow reports inside the windows of that (active) version.
    """
    if not devices:
        return CohortMetrics()
    query = sa.select(windows.c.device_id, windows.c.data).where(
        windows.c.model == model, windows.c.window_end >= since)
    if shadow_of is not None:
        query = query.where(windows.c.version == shadow_of)
    elif version is not None:
        query = query.where(windows.c.version == version)
    elif exclude_version is not None:
        query = query.where(windows.c.version != exclude_version)
    starts = dict(devices) if isinstance(devices, Mapping) else dict.fromkeys(devices, since)
    query = query.add_columns(windows.c.window_start)
    acc = Accumulator(references=references)
    with store.read() as conn:
        for row in conn.execute(query):
            start = starts.get(row.device_id)
            if start is not None and row.window_start >= start:
                acc.add_window(json.loads(row.data), shadow_of is not None)
    return acc.metrics()
