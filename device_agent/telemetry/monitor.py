"""Monitoring: an :class:`~edgeserve.device_agent.observe.InferenceObserver` that aggregates every
inference into per-model-version windows and writes them to the outbox.

Per model version and window (default 60 s, aligned to the wall clock so windows of different
devices line up): request and error counts, a :class:`~edgeserve.telemetry.LatencyHistogram` of
successful requests, and - when the version's package has reference statistics - input and
output :class:`~edgeserve.telemetry.DistributionSketch` counts with their drift (PSI /
Jensen-Shannon) against the reference. Each window also gets one device-health window.

The hot path (:meth:`Monitor.on_inference`, on the request's thread) only counts and buffers,
a fraction of a microsecond per request: latencies join the histogram 1024 at a time (one
vectorized step), small tensors are copied into a buffer (the caller may reuse its arrays), large
ones are reduced to their few feature values at once, and the buffer is binned every ``bin_rows``
samples, because binning 64 rows costs about what binning one row costs. Busy model versions are
sketched on a stride: at most about ``max_sketch_rate`` samples per second, which keeps drift
estimates on thousands of samples per window while a fast model at high load pays the sketch
cost on a fraction of its requests. The stride starts from the previous window's request rate
and is recomputed every 32 requests from the rate since the last recomputation, so a burst is
rate-limited from its first few dozen requests and a version whose load drops is sketched more
often again within the same window. Counts and latency always cover every request; the sample
count is in each drift score (``n``), and a window with fewer sampled requests than
:data:`~edgeserve.telemetry.MIN_SAMPLES` carries its sketches but no drift score (too few to
tell drift from noise; the fleet scores merged windows). Reference statistics are looked up off the
hot path (:meth:`watch`, or the monitor thread within a second of a new version's first request).
The observer never raises: a failure in monitoring is counted, logged once, and serving goes on.

Other per-version measurements join the same windows through :meth:`Monitor.add_source`: at each
window close a source's ``drain()`` returns ``{(model, version): value}`` for one window field
(the agent's shadow runner fills ``shadow``, its feedback log ``feedback``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgeserve.contract import BatchingSummary, Health
from edgeserve.errors import SchemaError
from edgeserve.telemetry import DistributionSketch, LatencyHistogram, ReferenceStats

from ..observe import InferenceEvent
from .health import read_health
from .outbox import Outbox

__all__ = ["Monitor", "MonitorStats"]

log = logging.getLogger(__name__)

Key = tuple[str, str]
References = Callable[[str, str], ReferenceStats | None]
# Tensors up to this many elements are copied and binned later; larger ones are reduced at once.
_COPY_LIMIT = 4096
# How often (in requests) a version's sketch stride is recomputed from its recent request rate:
# often enough that a burst is rate-limited within a few dozen requests, rarely enough that the
# clock read and the arithmetic cost nothing per request.
_RESTRIDE_EVERY = 32
# Latencies are appended to a list and added to the histogram this many requests at a time (and
# at window close): one vectorized add costs ~40 ns a value against ~250 ns for add() per call.
_LATENCY_BATCH = 1024
_NEVER = 2**62


@dataclass
class MonitorStats:
    events: int = 0
    windows: int = 0
    unattributed: int = 0
    internal_errors: int = 0
    last_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _SketchBuffer:
    """Samples of one role (inputs or outputs) waiting to be binned into a sketch."""

    __slots__ = ("groups_of", "raw", "reduced", "rows", "sketch")

    def __init__(self, reference: ReferenceStats, role: Literal["input", "output"]) -> None:
        self.sketch = DistributionSketch(reference, role)
        self.groups_of: dict[str, list[int]] = {}
        for i, group in enumerate(self.sketch.groups):
            self.groups_of.setdefault(group.tensor, []).append(i)
        self.raw: dict[str, list[np.ndarray]] = {}
        self.reduced: dict[int, list[np.ndarray]] = {}
        self.rows = 0

    def add(self, tensors: Mapping[str, Any], rows: int) -> None:
        raw = self.raw
        for name, indices in self.groups_of.items():
            array = tensors.get(name)
            if array is None:
                continue
            if array.size <= _COPY_LIMIT:
                if name in raw:
                    raw[name].append(array.copy())
                else:
                    raw[name] = [array.copy()]
            else:
                for i in indices:
                    self.reduced.setdefault(i, []).append(self.sketch.groups[i].extract(array))
        self.rows += rows

    def bin(self) -> None:
        for name, arrays in self.raw.items():
            for batch in _stack(arrays):
                for i in self.groups_of[name]:
                    self.sketch.add_features(i, self.sketch.groups[i].extract(batch))
        for i, rows in self.reduced.items():
            self.sketch.add_features(i, np.concatenate(rows))
        self.raw.clear()
        self.reduced.clear()
        self.rows = 0


def _fold(acc: _Accumulator) -> None:
    """Add the buffered latencies to the histogram (call with acc.lock)."""
    if acc.pending:
        pending, acc.pending = acc.pending, []
        acc.latency.add_many(pending)


def _stack(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """One batch when the per-sample shapes agree (the usual case), else each array alone."""
    if len(arrays) == 1:
        return arrays
    try:
        return [np.concatenate(arrays)]
    except ValueError:
        return arrays


@dataclass(slots=True)
class _Accumulator:
    """One model version's counts for the current window.

    The hot path appends the latency to ``pending`` and compares ``requests`` with ``next_due``
    (the soonest of ``next_fold``, ``next_sample`` and ``next_restride``): everything else
    happens on the few requests where one of them is due."""

    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    pending: list[float] = field(default_factory=list)
    inputs: _SketchBuffer | None = None
    outputs: _SketchBuffer | None = None
    requests: int = 0
    errors: int = 0
    stride: int = 1
    next_sample: int = _NEVER
    next_restride: int = _NEVER
    next_fold: int = _LATENCY_BATCH
    next_due: int = _LATENCY_BATCH
    restrided_at: float = 0.0
    restrided_requests: int = 0
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class Monitor:
    """Aggregates inferences into windows and appends them to ``outbox`` (start/stop a thread,
    or call :meth:`flush` yourself)."""

    def __init__(self, outbox: Outbox, *, window_s: float = 60.0,
                 references: References | None = None,
                 health: Callable[[], Health | None] | None = None,
                 health_path: Path | str = ".", bin_rows: int = 64,
                 max_sketch_rate: float | None = 200.0,
                 on_window: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.outbox = outbox
        self.window_s = window_s
        self.references = references
        self.health = health if health is not None else (lambda: read_health(health_path))
        self.bin_rows = bin_rows
        self.max_sketch_rate = max_sketch_rate
        self._rates: dict[Key, float] = {}
        self._sources: list[tuple[str, Callable[[], Mapping[Key, Any]]]] = []
        self.on_window = on_window
        self.clock = clock
        self.stats = MonitorStats()
        self._accs: dict[Key, _Accumulator] = {}
        self._refs: dict[Key, ReferenceStats | None] = {}
        self._unresolved: set[Key] = set()
        self._lock = threading.Lock()
        self._start = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._batches: dict[Key, list[int]] = {}  # calls, requests, samples, largest
        self._batches_lock = threading.Lock()
        self.add_source("batching", self._drain_batches)

    # -- the hot path ----------------------------------------------------------------------------

    def on_inference(self, event: InferenceEvent) -> None:
        """Count one inference (called by the agent on the request's thread; never raises)."""
        version = event.version
        if not version:
            # a request for a model that is not installed: no version to count it against
            self.stats.unattributed += 1
            return
        key = (event.model, version)
        # This runs on every request, so it is kept to a few attribute updates, inlined (no
        # helper call), with acquire/release rather than `with` (~50 ns less); sketching,
        # restriding and histogram updates happen on the few requests where they are due.
        try:
            while True:
                acc = self._accs.get(key) or self._new(key)
                lock = acc.lock
                lock.acquire()
                try:
                    if acc.closed:
                        continue  # the window closed under us: count it in the new one
                    acc.requests += 1
                    if event.outputs is None or event.error is not None:
                        acc.errors += 1
                    else:
                        acc.pending.append(event.latency_ms)
                        if acc.requests >= acc.next_due:
                            self._due(acc, event)
                    return
                finally:
                    lock.release()
        except Exception as exc:
            self._failed(exc)

    def on_batch(self, model: str, version: str, requests: int, samples: int) -> None:
        """Count one runtime call of the agent's dynamic batching (once per call, not per
        request); it joins the version's window as ``batching``."""
        with self._batches_lock:
            tally = self._batches.get((model, version))
            if tally is None:
                tally = self._batches[(model, version)] = [0, 0, 0, 0]
            tally[0] += 1
            tally[1] += requests
            tally[2] += samples
            tally[3] = max(tally[3], requests)

    def _drain_batches(self) -> dict[Key, BatchingSummary]:
        with self._batches_lock:
            batches, self._batches = self._batches, {}
        return {key: BatchingSummary(calls=c, requests=r, samples=n, largest=m)
                for key, (c, r, n, m) in batches.items()}

    def _due(self, acc: _Accumulator, event: InferenceEvent) -> None:
        """A request at which buffered latencies are added, the stride is recomputed and/or a
        sample is sketched (call with acc.lock)."""
        if acc.requests >= acc.next_fold:
            acc.next_fold = acc.requests + _LATENCY_BATCH
            _fold(acc)
        if acc.requests >= acc.next_restride:
            self._restride(acc)
        due = acc.requests >= acc.next_sample
        if due:
            acc.next_sample = acc.requests + acc.stride
        # set before sketching: an event the sketch cannot digest must not make every later
        # request take this path
        acc.next_due = min(acc.next_fold, acc.next_sample, acc.next_restride)
        if due and acc.inputs is not None and acc.outputs is not None and \
                event.outputs is not None:
            acc.inputs.add(event.inputs, event.batch_size)
            acc.outputs.add(event.outputs, event.batch_size)
            if acc.inputs.rows >= self.bin_rows:
                acc.inputs.bin()
                acc.outputs.bin()

    def _restride(self, acc: _Accumulator) -> None:
        """Set the stride from the request rate since the last restride (call with acc.lock)."""
        limit = self.max_sketch_rate
        if limit is None:  # turned off since sampling started
            acc.stride, acc.next_restride = 1, _NEVER
            return
        now = self.clock()
        rate = (acc.requests - acc.restrided_requests) / max(now - acc.restrided_at, 1e-6)
        acc.stride = max(1, math.ceil(rate / limit))
        acc.next_sample = min(acc.next_sample, acc.requests + acc.stride)
        acc.restrided_at, acc.restrided_requests = now, acc.requests
        acc.next_restride = acc.requests + _RESTRIDE_EVERY

    def _new(self, key: Key) -> _Accumulator:
        with self._lock:
            acc = self._accs.get(key)
            if acc is None:
                acc = self._accumulator(key)
                self._accs[key] = acc
            return acc

    def _accumulator(self, key: Key) -> _Accumulator:
        """A fresh accumulator (call with ``_lock`` held); sketches if the reference is known."""
        acc = _Accumulator()
        if key not in self._refs:
            if self.references is not None:
                self._unresolved.add(key)
            return acc
        reference = self._refs[key]
        if reference is not None and reference.groups:
            acc.inputs = _SketchBuffer(reference, "input")
            acc.outputs = _SketchBuffer(reference, "output")
            self._start_sampling(acc, self._rates.get(key, 0.0))
        return acc

    def _start_sampling(self, acc: _Accumulator, rate: float) -> None:
        """Sketch ``acc``'s next request, then every ``stride``-th: the stride starts from
        ``rate`` (the previous window's) and is recomputed as requests come."""
        acc.next_sample = acc.requests + 1
        if self.max_sketch_rate is not None:
            if rate > self.max_sketch_rate:
                acc.stride = math.ceil(rate / self.max_sketch_rate)
            acc.restrided_at, acc.restrided_requests = self.clock(), acc.requests
            acc.next_restride = acc.requests + _RESTRIDE_EVERY
        acc.next_due = min(acc.next_fold, acc.next_sample, acc.next_restride)

    def _failed(self, exc: BaseException) -> None:
        self.stats.internal_errors += 1
        if self.stats.internal_errors == 1:
            log.exception("monitoring failed (serving continues; counted in internal_errors)")
        self.stats.last_error = f"{type(exc).__name__}: {exc}"

    # -- references ------------------------------------------------------------------------------

    def watch(self, model: str, version: str) -> bool:
        """Load a version's reference statistics now (not on its first request); True if it has
        a usable reference. Safe to call again."""
        key = (model, version)
        with self._lock:
            known = key in self._refs
        if not known:
            reference = self._lookup(key)
            with self._lock:
                self._refs[key] = reference
                self._unresolved.discard(key)
                acc = self._accs.get(key)
                if acc is not None and acc.inputs is None:
                    fresh = self._accumulator(key)
                    if fresh.inputs is not None:
                        with acc.lock:
                            acc.inputs, acc.outputs = fresh.inputs, fresh.outputs
                            self._start_sampling(acc, self._rates.get(key, 0.0))
        return self._refs[key] is not None

    def _lookup(self, key: Key) -> ReferenceStats | None:
        if self.references is None:
            return None
        try:
            return self.references(*key)
        except Exception as exc:
            log.warning("no drift reference for %s %s: %s", key[0], key[1], exc)
            return None

    def _resolve_pending(self) -> None:
        with self._lock:
            pending = list(self._unresolved)
        for model, version in pending:
            self.watch(model, version)

    # -- windows ---------------------------------------------------------------------------------

    def add_source(self, field_name: str, drain: Callable[[], Mapping[Key, Any]]) -> None:
        """Fill window field ``field_name`` (e.g. ``"shadow"``, ``"feedback"``) from ``drain()``,
        called at every window close; a version with data but no requests still gets a window."""
        self._sources.append((field_name, drain))

    def _drain_sources(self) -> dict[Key, dict[str, Any]]:
        extra: dict[Key, dict[str, Any]] = {}
        for field_name, drain in self._sources:
            try:
                for key, value in drain().items():
                    extra.setdefault(key, {})[field_name] = value
            except Exception as exc:
                self._failed(exc)
        return extra

    def flush(self, now: float | None = None) -> list[int]:
        """Close the current window at ``now``; returns the sequence numbers written."""
        self._resolve_pending()
        end = self.clock() if now is None else now
        with self._lock:
            accs, self._accs = self._accs, {}
            start, self._start = self._start, end
            span = max(end - start, 1e-3)
            self._rates = {key: acc.requests / span for key, acc in accs.items()}
        extra = self._drain_sources()
        for key in extra.keys() - accs.keys():
            accs[key] = _Accumulator(requests=0)
        windows = []
        for key, acc in sorted(accs.items()):
            window = self._window(key, acc, start, end, bool(extra.get(key)))
            if window is not None:
                windows.append({**window, **extra.get(key, {})})
        windows.append({"start": start, "end": max(end, start), "health": self._health()})
        try:
            seqs = self.outbox.append_many(windows)
        except SchemaError:
            # one bad window must not cost the others: store them one by one
            seqs = []
            for window in windows:
                try:
                    seqs.extend(self.outbox.append_many([window]))
                except SchemaError as exc:
                    self._failed(exc)
        self.stats.windows += len(seqs)
        if self.on_window is not None:
            self.on_window()
        return seqs

    def _window(self, key: Key, acc: _Accumulator, start: float, end: float,
                keep_empty: bool = False) -> dict[str, Any] | None:
        with acc.lock:
            acc.closed = True
            self.stats.events += acc.requests
        try:
            _fold(acc)
        except Exception as exc:
            self._failed(exc)
        if acc.requests == 0 and not keep_empty:
            return None
        window: dict[str, Any] = {"start": start, "end": max(end, start), "model": key[0],
                                  "version": key[1], "requests": acc.requests,
                                  "errors": acc.errors}
        if acc.latency.count:
            window["latency"] = acc.latency.to_data()
        for role, buffer in (("inputs", acc.inputs), ("outputs", acc.outputs)):
            if buffer is None:
                continue
            try:
                buffer.bin()
                if any(buffer.sketch.n):
                    window[role] = buffer.sketch.to_data()
                    window[f"drift_{role}"] = buffer.sketch.drift()
            except Exception as exc:
                self._failed(exc)
        return window

    def _health(self) -> Health | None:
        try:
            return self.health()
        except Exception as exc:
            self._failed(exc)
            return None

    def next_boundary(self, now: float) -> float:
        """The end of the window that contains ``now`` (windows align to multiples of window_s)."""
        return (math.floor(now / self.window_s) + 1) * self.window_s

    # -- thread ----------------------------------------------------------------------------------

    def start(self) -> Monitor:
        self._thread = threading.Thread(target=self._run, name="telemetry-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self, flush: bool = True) -> None:
        """Stop the thread; with ``flush`` write the partial window first."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if flush:
            self.flush()

    def _run(self) -> None:
        boundary = self.next_boundary(self.clock())
        while not self._stop.wait(min(1.0, max(0.0, boundary - self.clock()))):
            try:
                self._resolve_pending()
                if self.clock() >= boundary:
                    self.flush(boundary)
                    boundary = self.next_boundary(boundary)
            except Exception as exc:
                self._failed(exc)
