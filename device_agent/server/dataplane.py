"""The Open Inference Protocol's operations, transport-free (HTTP and gRPC adapt this).

Also holds the load control both servers share in spirit: a fixed pool of inference workers and a
bounded number of requests admitted at once (running + queued); past that, requests are refused
at once with :class:`~edgeserve.errors.OverloadedError` (HTTP 503 + Retry-After, gRPC
RESOURCE_EXHAUSTED) instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from edgeserve import __version__
from edgeserve.errors import EdgeserveError, InvalidInputError, ModelNotFoundError, OverloadedError
from edgeserve.samples import batch_axis

from ..agent import Agent, PredictResult
from .codec import tensor_metadata
from .limits import MemoryBudget, small_request_cost
from .metrics import MetricsRegistry

__all__ = ["PLATFORMS", "DataPlane", "LoadGate"]

T = TypeVar("T")
PLATFORMS = {"onnx": "onnxruntime_onnx", "tflite": "litert_tflite", "coreml": "coreml_mlpackage"}
EXTENSIONS = ["binary_tensor_data", "model_repository", "statistics"]
"""What ``/v2`` and gRPC ServerMetadata advertise; each is served over both transports:
binary tensors, the repository index (``POST /v2/repository/index``, gRPC RepositoryIndex) and
per-version statistics (``GET /v2/models[/M[/versions/V]]/stats``, gRPC ModelStatistics)."""


MAX_BATCH = 1024
"""Samples a request may stack on a dynamic batch axis (what a body limit allows for)."""
_JSON_BYTES = 32
"""Characters one value may take in a JSON tensor (``-1.2345678901234567e-123,`` is 26)."""
_OVERHEAD = 4096
INLINE_BELOW_S = 1e-3
RETRY_INLINE_S = 10.0
"""How long a kind that was slow on the event loop stays on the workers before another try."""
"""A request whose kind has lately taken less than this runs on the event loop itself."""
INLINE_MAX_BYTES = 64 << 10
"""Only requests with bodies up to this size may run on the event loop."""


class LoadGate:
    """``workers`` threads run inferences; at most ``workers + queue`` requests are admitted.

    Handing a request to a worker thread and back costs the event loop about as much as a
    small model's whole inference (a future, a queue, two wake-ups and a GIL hand-over: profiled
    with py-spy, docs/benchmarks.md). So requests of a kind (one model) that take under
    :data:`INLINE_BELOW_S` run inline on the loop instead. What a kind costs is learnt from
    every run: the CPU time of its thread (on a worker the wall time would count the wait for
    the GIL), and for runs on the loop the wall time too (a runtime with its own thread pool
    uses little CPU on the caller's thread but holds the loop all the same). A kind that got
    slow on the loop stays on the workers until it is tried again :data:`RETRY_INLINE_S` later.
    """

    def __init__(self, workers: int = 2, queue: int = 64, retry_after_s: float = 1.0,
                 budget: MemoryBudget | None = None) -> None:
        self.workers = max(1, workers)
        self.capacity = self.workers + max(0, queue)
        # what the admitted requests can cost while small (limits.SMALL_BODY: not reserved one
        # by one) is kept back from ``budget`` while the gate is open
        self._budget = budget
        self._aside = self.capacity * small_request_cost() if budget is not None else 0
        if budget is not None:
            budget.set_aside(self._aside)
        self.retry_after_s = retry_after_s
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="edgeserve-infer")
        self.admitted = 0
        self.rejected = 0
        self.inline = 0
        self._lock = threading.Lock()
        self._cpu: dict[str, float] = {}
        self._wall: dict[str, tuple[float, float]] = {}

    def check(self) -> None:
        """Refuse now if a request could not be admitted (before its body is read)."""
        with self._lock:
            if self.admitted >= self.capacity:
                self.rejected += 1
                raise self._busy()

    def _busy(self) -> OverloadedError:
        return OverloadedError(
            f"server busy: {self.admitted} requests in progress or queued (limit "
            f"{self.capacity}); retry after {self.retry_after_s:g} s", self.retry_after_s)

    def admit(self) -> None:
        with self._lock:
            if self.admitted >= self.capacity:
                self.rejected += 1
                raise self._busy()
            self.admitted += 1

    def release(self) -> None:
        with self._lock:
            self.admitted -= 1

    async def run(self, fn: Callable[[], T], kind: str | None = None, size: int = 0) -> T:
        """Run ``fn`` (admission already counted by the caller): on the loop when requests of
        ``kind`` are cheap and this one is small (``size`` bytes), else on a worker."""
        if kind is not None and size <= INLINE_MAX_BYTES and self._cheap(kind):
            self.inline += 1
            start = time.perf_counter()
            try:
                return fn()
            finally:
                # On the loop the wall time is the cost (time.thread_time is a system call
                # that cost 20 % of a small request here, time.perf_counter is not)
                took = time.perf_counter() - start
                wall = self._wall.get(kind)
                self._wall[kind] = (_average(wall[0] if wall else None, took), start)
                self._cpu[kind] = _average(self._cpu.get(kind), took)
        loop = asyncio.get_running_loop()
        if kind is None:
            return await loop.run_in_executor(self.pool, fn)
        return await loop.run_in_executor(self.pool, self._timed, fn, kind)

    def _cheap(self, kind: str) -> bool:
        cpu = self._cpu.get(kind)
        if cpu is None or cpu >= INLINE_BELOW_S:
            return False
        wall = self._wall.get(kind)
        return (wall is None or wall[0] < INLINE_BELOW_S
                or time.perf_counter() - wall[1] > RETRY_INLINE_S)

    def _timed(self, fn: Callable[[], T], kind: str) -> T:
        start = time.thread_time()
        try:
            return fn()
        finally:
            self._cpu[kind] = _average(self._cpu.get(kind), time.thread_time() - start)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        aside, self._aside = self._aside, 0
        if self._budget is not None and aside:
            self._budget.give_back(aside)


def _average(mean: float | None, sample: float) -> float:
    """A moving average over the last ~10 samples, each counted as at most twice the inline
    threshold: one stall (a cache poll, a collection) does not move a kind off the loop;
    a few slow runs in a row do."""
    sample = min(sample, 2 * INLINE_BELOW_S)
    return sample if mean is None else mean + 0.1 * (sample - mean)


class DataPlane:
    """Health, metadata and inference over one :class:`Agent`."""

    def __init__(self, agent: Agent, name: str = "edgeserve") -> None:
        self.agent = agent
        self.name = name
        self._limits: dict[tuple[str, str], tuple[object, int]] = {}

    def live(self) -> bool:
        return True

    def infer(self, model: str, version: str | None, inputs: dict[str, np.ndarray],
              request_id: str | None, request_key: str | None = None) -> PredictResult:
        """Predict with exact dtypes: the Python API converts safely between dtypes, the wire
        protocols do not (as in the OIP, an INT64 tensor for an FP32 input is a client error).
        ``request_key`` (request parameter ``request_key``) keeps a user on one A/B arm."""
        return self.agent.predict(model, inputs, version, request_id, strict_dtypes=True,
                                  request_key=request_key)

    def body_limit(self, model: str, version: str | None, ceiling: int) -> int:
        """The largest request body ``model`` can need, at most ``ceiling`` bytes.

        A ``[1, 64]`` FP32 model needs a few kilobytes of JSON, not the server's 64 MiB: a body
        beyond what the model's inputs could hold (every dimension fixed, a dynamic batch axis at
        most :data:`MAX_BATCH`, each value at most ``_JSON_BYTES`` characters) is refused with
        413 before it is read, so a huge JSON list never becomes millions of Python floats.
        A model with another dynamic dimension gets the ceiling."""
        try:
            loaded = self.agent.model(model, version)  # in memory once loaded: cheap
        except EdgeserveError:
            return ceiling  # the request fails on the model, not on its size
        key = (model, loaded.record.version)
        known = self._limits.get(key)
        if known is None or known[0] is not loaded.manifest:
            known = (loaded.manifest, self._inputs_bytes(loaded.manifest.inputs))
            self._limits[key] = known
        return min(ceiling, known[1]) if known[1] else ceiling

    @staticmethod
    def _inputs_bytes(inputs: Any) -> int:
        """What a request for these inputs can need at most; 0 when some dimension is free."""
        total = _OVERHEAD
        for spec in inputs:
            axis = batch_axis(spec)
            count = 1
            for i, dim in enumerate(spec.shape):
                if isinstance(dim, int) and dim > 0:
                    count *= dim
                elif i == axis:
                    count *= MAX_BATCH
                else:
                    return 0
            total += count * _JSON_BYTES + _OVERHEAD
        return total

    def feedback(self, model: str, body: Any) -> dict[str, Any]:
        """Attach ``{"id", "reward"?, "label"?}`` to a past prediction of ``model``."""
        if not isinstance(body, dict):
            raise InvalidInputError('feedback must be a JSON object {"id": …, "reward": …, '
                                    '"label": …}')
        unknown = sorted(set(body) - {"id", "reward", "label"})
        if unknown:
            raise InvalidInputError(f"unknown feedback field(s) {unknown}; expected id, reward, "
                                    "label")
        request_id = body.get("id")
        if not isinstance(request_id, str):
            raise InvalidInputError(f"feedback 'id' must be the prediction's id (a string), got "
                                    f"{request_id!r}")
        log, reward, label = self.agent.feedback_log, body.get("reward"), body.get("label")
        # the model is checked before the feedback counts, so a wrong one leaves no trace
        # (without a log, Agent.feedback raises the error saying feedback is off)
        entry = (log.add(request_id, reward, label, model=model) if log is not None
                 else self.agent.feedback(request_id, reward, label))
        return {"accepted": True, "id": body.get("id"), "model": entry.model,
                "model_version": entry.version}

    def ready(self) -> bool:
        """Ready when every model with an active version is loaded (loading it if needed)."""
        try:
            for name in self.agent.cache.models():
                if self.agent.cache.state(name).active is not None:
                    self.agent.model(name)
        except Exception:
            return False
        return True

    def preload(self) -> list[str]:
        """Load and warm up every active version; return the failures (never raises)."""
        failures = []
        for name in self.agent.cache.models():
            if self.agent.cache.state(name).active is None:
                continue
            try:
                self.agent.model(name)
            except Exception as exc:
                failures.append(f"{name}: {exc}")
        return failures

    def server_metadata(self) -> dict[str, Any]:
        return {"name": self.name, "version": __version__, "extensions": EXTENSIONS}

    def _versions(self, model: str) -> list[str]:
        versions = [r.version for r in self.agent.cache.records(model)]
        if not versions:
            raise ModelNotFoundError(f"unknown model {model!r}")
        return versions

    def model_ready(self, model: str, version: str | None) -> bool:
        versions = self._versions(model)
        if version is not None and version not in versions:
            raise ModelNotFoundError(f"model {model!r} has no version {version!r} (installed: "
                                     f"{', '.join(versions)})")
        self.agent.model(model, version)
        return True

    def model_metadata(self, model: str, version: str | None) -> dict[str, Any]:
        versions = self._versions(model)
        if version is not None and version not in versions:
            raise ModelNotFoundError(f"model {model!r} has no version {version!r} (installed: "
                                     f"{', '.join(versions)})")
        manifest = self.agent.manifest(model, version)
        record = self.agent.cache.record(model, manifest.version)
        return {
            "name": model,
            "versions": versions,
            "platform": PLATFORMS.get(record.artifact_format, record.artifact_format),
            "inputs": [tensor_metadata(t) for t in manifest.inputs],
            "outputs": [tensor_metadata(t) for t in manifest.outputs],
            "parameters": {"version": manifest.version, "artifact": record.artifact_id,
                           "release": manifest.release},
        }

    # -- extensions: model repository index and statistics (Triton's shapes) --------------------

    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Every installed version as ``{name, version, state, reason}``: ``READY`` when it is
        loaded in memory (the servers load active versions at start), else ``UNAVAILABLE`` with
        the reason (it loads on its first request). ``ready_only`` lists only READY ones."""
        # Agent._loaded is read, never changed, here: which versions are in memory right now
        loaded = set(self.agent._loaded)
        index = []
        for name in self.agent.cache.models():
            active = self.agent.cache.state(name).active
            for record in self.agent.cache.records(name):
                ready = (name, record.version) in loaded
                if ready_only and not ready:
                    continue
                reason = "" if ready else (
                    "active, not loaded yet (loads on its first request)"
                    if record.version == active else
                    "installed, not active (loads when a request names this version)")
                index.append({"name": name, "version": record.version,
                              "state": "READY" if ready else "UNAVAILABLE", "reason": reason})
        return index

    def model_statistics(self, metrics: MetricsRegistry, model: str | None = None,
                         version: str | None = None) -> dict[str, Any]:
        """Triton's ``{"model_stats": [...]}`` for every installed version, of one model, or of
        one version; figures come from the server's :class:`MetricsRegistry` (the agent's
        inference observer). Timings are the agent's whole request latency, so they appear
        under ``success``/``fail`` and ``compute_infer``; queue and input/output copying are
        not measured apart (count 0)."""
        if model is None:
            keys = [(m, r.version) for m in self.agent.cache.models()
                    for r in self.agent.cache.records(m)]
        else:
            versions = self._versions(model)
            if version is not None and version not in versions:
                raise ModelNotFoundError(f"model {model!r} has no version {version!r} "
                                         f"(installed: {', '.join(versions)})")
            keys = [(model, v) for v in ([version] if version is not None else versions)]
        return {"model_stats": [_model_stat(m, v, metrics) for m, v in keys]}


def _duration(count: int, ns: int) -> dict[str, int]:
    return {"count": count, "ns": ns}


def _model_stat(model: str, version: str, metrics: MetricsRegistry) -> dict[str, Any]:
    s = metrics.version_stats(model, version)
    none = _duration(0, 0)
    return {
        "name": model, "version": version, "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count, "execution_count": s.execution_count,
        "inference_stats": {
            "success": _duration(s.success, s.success_ns), "fail": _duration(s.fail, s.fail_ns),
            "queue": dict(none), "compute_input": dict(none),
            "compute_infer": _duration(s.success, s.success_ns),
            "compute_output": dict(none), "cache_hit": dict(none), "cache_miss": dict(none)},
        "batch_stats": [],
    }
