"""Prometheus metrics of the servers, in the text exposition format (no client library needed).

Inference figures come from an :class:`~..observe.InferenceObserver`, so they count every path
(HTTP, gRPC, in-process) the same way; the servers add their own request counters. The same
observer keeps the per-version figures of the statistics extension (Triton's ``model_stats``):
one bookkeeping for ``/metrics``, ``/v2/models/…/stats`` and gRPC ``ModelStatistics``.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

from ..observe import InferenceEvent

__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS_S", "MetricsRegistry", "VersionStats"]

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _labels(**labels: str) -> str:
    inner = ",".join(f'{k}="{v.replace(chr(92), "/").replace(chr(34), "")}"'
                     for k, v in labels.items())
    return "{" + inner + "}"


def _histogram(name: str, key: tuple[str, str], bounds: tuple[float, ...], buckets: list[int],
               total_sum: str) -> list[str]:
    """One model version's histogram lines (cumulative buckets, sum, count)."""
    model, version = key
    lines, total = [], 0
    for bound, n in zip((*bounds, float("inf")), buckets, strict=True):
        total += n
        le = "+Inf" if bound == float("inf") else f"{bound:g}"
        lines.append(f"{name}_bucket{_labels(model=model, version=version, le=le)} {total}")
    lines.append(f"{name}_sum{_labels(model=model, version=version)} {total_sum}")
    lines.append(f"{name}_count{_labels(model=model, version=version)} {total}")
    return lines


@dataclass
class VersionStats:
    """Cumulative figures of one model version since the server started.

    ``inference_count`` counts samples (a batch of 8 is 8), ``execution_count`` runtime calls;
    the ``*_ns`` totals are the agent's request latency (inputs checked and adapted, the
    runtime's run, outputs adapted) of successful and failed requests."""

    success: int = 0
    success_ns: int = 0
    fail: int = 0
    fail_ns: int = 0
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0


class _Record:
    """One model version's figures: the statistics extension's and the latency histogram's,
    updated together (one lookup per request on every transport's path)."""

    __slots__ = ("buckets", "seconds", "stats")

    def __init__(self) -> None:
        self.stats = VersionStats()
        self.buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.seconds = 0.0


class MetricsRegistry:
    """Counters and latency histograms per model version, plus HTTP/gRPC request counts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[tuple[str, str], _Record] = {}
        self._requests: dict[tuple[str, str], int] = defaultdict(int)
        self._batches: dict[tuple[str, str], list[int]] = {}
        self._batch_sum: dict[tuple[str, str], int] = defaultdict(int)
        self.gauges: dict[str, float] = {}

    def on_batch(self, model: str, version: str, requests: int, samples: int) -> None:
        """One runtime call of a dynamically batched model: ``requests`` stacked, ``samples``
        on the batch axis."""
        key = (model, version)
        with self._lock:
            buckets = self._batches.get(key)
            if buckets is None:
                buckets = self._batches[key] = [0] * (len(BATCH_BUCKETS) + 1)
            buckets[bisect.bisect_left(BATCH_BUCKETS, requests)] += 1
            self._batch_sum[key] += requests

    def on_inference(self, event: InferenceEvent) -> None:
        # Requests for unknown models share one label, so clients cannot create series at will.
        key = (event.model if event.version else "_unknown", event.version)
        seconds = event.latency_ms / 1000.0
        ns = int(event.latency_ms * 1e6)
        with self._lock:
            record = self._records.get(key)
            if record is None:
                record = self._records[key] = _Record()
            record.buckets[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
            record.seconds += seconds
            stats = record.stats
            if event.error is None:
                stats.success += 1
                stats.success_ns += ns
                stats.execution_count += 1
                stats.inference_count += event.batch_size
            else:
                stats.fail += 1
                stats.fail_ns += ns
            stats.last_inference_ms = int(time.time() * 1000)

    def version_stats(self, model: str, version: str) -> VersionStats:
        """A copy of one version's figures (zeros when it has not run since the start)."""
        with self._lock:
            record = self._records.get((model, version))
            return VersionStats(**record.stats.__dict__) if record is not None else VersionStats()

    def count_request(self, protocol: str, code: int | str) -> None:
        with self._lock:
            self._requests[(protocol, str(code))] += 1

    def render(self) -> str:
        lines = ["# HELP edgeserve_inference_total Inferences by model, version and outcome.",
                 "# TYPE edgeserve_inference_total counter"]
        with self._lock:
            records = sorted(self._records.items())
            for (model, version), record in records:
                for outcome, n in (("error", record.stats.fail),
                                   ("success", record.stats.success)):
                    if n:
                        lines.append(f"edgeserve_inference_total"
                                     f"{_labels(model=model, version=version, outcome=outcome)} "
                                     f"{n}")
            lines += ["# HELP edgeserve_inference_seconds Inference latency in the agent.",
                      "# TYPE edgeserve_inference_seconds histogram"]
            for key, record in records:
                lines += _histogram("edgeserve_inference_seconds", key, LATENCY_BUCKETS_S,
                                    record.buckets, f"{record.seconds:.6f}")
            if self._batches:
                lines += ["# HELP edgeserve_batch_requests Requests stacked into one runtime "
                          "call (dynamic batching).", "# TYPE edgeserve_batch_requests histogram"]
            for key, buckets in sorted(self._batches.items()):
                lines += _histogram("edgeserve_batch_requests", key, BATCH_BUCKETS, buckets,
                                    str(self._batch_sum[key]))
            lines += ["# HELP edgeserve_requests_total Server requests by protocol and status.",
                      "# TYPE edgeserve_requests_total counter"]
            for (protocol, code), n in sorted(self._requests.items()):
                lines.append(f"edgeserve_requests_total{_labels(protocol=protocol, code=code)} {n}")
            for name, value in sorted(self.gauges.items()):
                lines += [f"# TYPE {name} gauge", f"{name} {value:g}"]
        return "\n".join(lines) + "\n"
