"""Prometheus metrics of the servers, in the text exposition format (no client library needed).

Inference figures come from an :class:`~..observe.InferenceObserver`, so they count every path
(HTTP, gRPC, in-process) the same way; the servers add their own request counters.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

from ..observe import InferenceEvent

__all__ = ["LATENCY_BUCKETS_S", "MetricsRegistry"]

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _labels(**labels: str) -> str:
    inner = ",".join(f'{k}="{v.replace(chr(92), "/").replace(chr(34), "")}"'
                     for k, v in labels.items())
    return "{" + inner + "}"


class MetricsRegistry:
    """Counters and latency histograms per model version, plus HTTP/gRPC request counts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._infer: dict[tuple[str, str, str], int] = defaultdict(int)
        self._buckets: dict[tuple[str, str], list[int]] = {}
        self._sum: dict[tuple[str, str], float] = defaultdict(float)
        self._requests: dict[tuple[str, str], int] = defaultdict(int)
        self.gauges: dict[str, float] = {}

    def on_inference(self, event: InferenceEvent) -> None:
        # Requests for unknown models share one label, so clients cannot create series at will.
        model = event.model if event.version else "_unknown"
        key = (model, event.version)
        seconds = event.latency_ms / 1000.0
        with self._lock:
            self._infer[(model, event.version,
                         "success" if event.error is None else "error")] += 1
            buckets = self._buckets.get(key)
            if buckets is None:
                buckets = self._buckets[key] = [0] * (len(LATENCY_BUCKETS_S) + 1)
            buckets[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
            self._sum[key] += seconds

    def count_request(self, protocol: str, code: int | str) -> None:
        with self._lock:
            self._requests[(protocol, str(code))] += 1

    def render(self) -> str:
        lines = ["# HELP edgeserve_inference_total Inferences by model, version and outcome.",
                 "# TYPE edgeserve_inference_total counter"]
        with self._lock:
            for (model, version, outcome), n in sorted(self._infer.items()):
                lines.append(f"edgeserve_inference_total"
                             f"{_labels(model=model, version=version, outcome=outcome)} {n}")
            lines += ["# HELP edgeserve_inference_seconds Inference latency in the agent.",
                      "# TYPE edgeserve_inference_seconds histogram"]
            for (model, version), buckets in sorted(self._buckets.items()):
                total = 0
                for bound, n in zip((*LATENCY_BUCKETS_S, float("inf")), buckets, strict=True):
                    total += n
                    le = "+Inf" if bound == float("inf") else f"{bound:g}"
                    lines.append(f"edgeserve_inference_seconds_bucket"
                                 f"{_labels(model=model, version=version, le=le)} {total}")
                lines.append(f"edgeserve_inference_seconds_sum"
                             f"{_labels(model=model, version=version)} "
                             f"{self._sum[(model, version)]:.6f}")
                lines.append(f"edgeserve_inference_seconds_count"
                             f"{_labels(model=model, version=version)} {total}")
            lines += ["# HELP edgeserve_requests_total Server requests by protocol and status.",
                      "# TYPE edgeserve_requests_total counter"]
            for (protocol, code), n in sorted(self._requests.items()):
                lines.append(f"edgeserve_requests_total{_labels(protocol=protocol, code=code)} {n}")
            for name, value in sorted(self.gauges.items()):
                lines += [f"# TYPE {name} gauge", f"{name} {value:g}"]
        return "\n".join(lines) + "\n"
