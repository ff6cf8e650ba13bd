"""A mergeable latency histogram with bounded relative error (the DDSketch idea).

Values fall into logarithmic buckets ``(γ^(i-1), γ^i]`` with ``γ = (1+α)/(1-α)``; answering a
quantile with the bucket's midpoint ``2γ^i/(γ+1)`` is then within ``α`` (1%) of the true order
statistic, whatever the distribution. Two histograms with the same ``α`` merge by adding counts, so
devices can send per-window histograms and the fleet can combine any set of them exactly.

The wire form is compact: a base bucket index and a dense run of counts (a typical window spans a
few dozen buckets), see :class:`HistogramData`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from math import ceil as _ceil
from math import log as _log
from typing import Annotated, Any

import numpy as np
from msgspec import Meta

from .._doc import Document, field

__all__ = ["DEFAULT_RELATIVE_ACCURACY", "HistogramData", "LatencyHistogram"]

DEFAULT_RELATIVE_ACCURACY = 0.01
_MIN_VALUE = 1e-6  # below this (ms) a value counts as zero
_MAX_BUCKETS = 4096


class HistogramData(Document):
    """Wire form of a :class:`LatencyHistogram` (milliseconds)."""

    a: Annotated[float, Meta(gt=0, lt=0.5, description="relative accuracy α")] = \
        DEFAULT_RELATIVE_ACCURACY
    o: Annotated[int, Meta(ge=-100_000, le=100_000, description="index of c[0]'s bucket")] = 0
    c: Annotated[list[int], Meta(max_length=_MAX_BUCKETS, description="bucket counts from o")] = \
        field(default_factory=list)
    z: Annotated[int, Meta(ge=0, description="values below 1e-6 ms")] = 0
    n: Annotated[int, Meta(ge=0)] = 0
    s: Annotated[float, Meta(ge=0, description="sum of values")] = 0.0
    mn: Annotated[float, Meta(ge=0)] | None = None
    mx: Annotated[float, Meta(ge=0)] | None = None

    def __post_init__(self) -> None:
        if self.c and min(self.c) < 0:  # min(): a window's few hundred buckets, at C speed
            raise ValueError("bucket counts must not be negative")
        if sum(self.c) + self.z != self.n:
            raise ValueError(f"n={self.n} but buckets hold {sum(self.c) + self.z} values")


class LatencyHistogram:
    """Add values (ms), merge histograms, read quantiles within ``relative_accuracy``."""

    __slots__ = ("_counts", "_gamma", "_log_gamma", "alpha", "count", "max", "min", "sum",
                 "zero_count")

    def __init__(self, relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY) -> None:
        if not 0 < relative_accuracy < 0.5:
            raise ValueError("relative_accuracy must be in (0, 0.5)")
        self.alpha = relative_accuracy
        self._gamma = (1 + relative_accuracy) / (1 - relative_accuracy)
        self._log_gamma = math.log(self._gamma)
        self._counts: dict[int, int] = {}
        self.zero_count = 0
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = 0.0

    def add(self, value_ms: float) -> None:
        # On the request path of some observers (update health checks): comparisons instead of
        # min()/max() and module-level log/ceil halve its cost (~0.55 → ~0.25 µs). Same results,
        # NaN included (never becomes min or max).
        self.count += 1
        self.sum += value_ms
        if value_ms < self.min:  # noqa: PLR1730 - min() is the slow part, see above
            self.min = value_ms
        if value_ms > self.max:  # noqa: PLR1730
            self.max = value_ms
        if value_ms <= _MIN_VALUE:
            self.zero_count += 1
            return
        index = _ceil(_log(value_ms) / self._log_gamma)
        counts = self._counts
        counts[index] = counts.get(index, 0) + 1

    def add_many(self, values_ms: Sequence[float]) -> None:
        """Add values in one vectorized step (for callers that buffer values on a hot path).

        The same counts as :meth:`add` one by one, except that a value within a rounding error
        of a bucket boundary may land in the neighbouring bucket (still within ``α``), and the
        sum may differ in its last digits. Values must be finite, as for :meth:`add`."""
        if not len(values_ms):
            return
        values = np.asarray(values_ms, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError("latency values must be finite")
        self.count += values.size
        self.sum += float(values.sum())
        self.min = min(self.min, float(values.min()))
        self.max = max(self.max, float(values.max()))
        positive = values[values > _MIN_VALUE]
        self.zero_count += values.size - positive.size
        if positive.size:
            indices = np.ceil(np.log(positive) / self._log_gamma).astype(np.int64)
            low = int(indices.min())
            # finite values span at most ~36,000 buckets, so a dense count is cheap
            counts = np.bincount(indices - low).tolist()
            for offset in np.flatnonzero(counts).tolist():
                self._counts[low + offset] = self._counts.get(low + offset, 0) + counts[offset]

    def merge(self, other: LatencyHistogram) -> None:
        if abs(other.alpha - self.alpha) > 1e-12:
            raise ValueError(f"cannot merge histograms of accuracy {self.alpha} and {other.alpha}")
        for index, count in other._counts.items():
            self._counts[index] = self._counts.get(index, 0) + count
        self.zero_count += other.zero_count
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def quantile(self, q: float) -> float | None:
        """The value at rank ``q·(n-1)`` (0-based), within the relative accuracy; None if empty."""
        if self.count == 0:
            return None
        if not 0.0 <= q <= 1.0:
            raise ValueError("q must be within [0, 1]")
        rank = math.floor(q * (self.count - 1))
        if rank < self.zero_count:
            return 0.0
        seen = self.zero_count
        for index in sorted(self._counts):
            seen += self._counts[index]
            if seen > rank:
                value = 2 * self._gamma**index / (self._gamma + 1)
                return min(max(value, self.min), self.max)
        return self.max  # pragma: no cover - counts always add up

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None

    def summary(self) -> dict[str, float | int | None]:
        return {"count": self.count, "mean": self.mean, "p50": self.quantile(0.5),
                "p95": self.quantile(0.95), "p99": self.quantile(0.99),
                "max": self.max if self.count else None}

    def to_data(self) -> HistogramData:
        if not self._counts:
            return HistogramData(a=self.alpha, z=self.zero_count, n=self.count, s=self.sum,
                                 mn=self.min if self.count else None,
                                 mx=self.max if self.count else None)
        low, high = min(self._counts), max(self._counts)
        dense = [self._counts.get(i, 0) for i in range(low, high + 1)]
        return HistogramData(a=self.alpha, o=low, c=dense, z=self.zero_count, n=self.count,
                             s=round(self.sum, 6), mn=self.min, mx=self.max)

    def to_dict(self) -> dict[str, Any]:
        return self.to_data().model_dump(exclude_defaults=True)

    @classmethod
    def from_data(cls, data: HistogramData | dict[str, Any]) -> LatencyHistogram:
        if not isinstance(data, HistogramData):
            data = HistogramData.model_validate(data)
        hist = cls(data.a)
        hist._counts = {data.o + i: c for i, c in enumerate(data.c) if c}
        hist.zero_count = data.z
        hist.count = data.n
        hist.sum = data.s
        hist.min = data.mn if data.mn is not None else math.inf
        hist.max = data.mx if data.mx is not None else 0.0
        return hist
