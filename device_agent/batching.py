"""Dynamic batching: concurrent requests for one model stacked into one runtime call.

Off by default, per model (``Agent(batching={"model": BatchPolicy(...)})``, ``agent serve
--batch MODEL[:MAX_BATCH[:DELAY_US]]``). It applies only where the artifact's batch axis is
dynamic (axis 0 of every runtime input and output): requests whose other dimensions and dtypes
agree are concatenated on it, up to ``max_batch`` samples, waiting at most
``max_queue_delay_us`` for company, run once, and the outputs are split back per request.

A *fixed-batch* artifact (``[1, …]`` on every tensor: TFLite, whose shapes are static) is
batched through its package's batch-N variant (``Artifact.batch``, built by the converter when
the profile's ``[batching] static_batch`` asks): :class:`PaddedRuntime` runs a lone sample on
the batch-1 artifact and a stack of 2…N on the variant, padding a partial stack with copies of
its last sample, whose outputs are dropped.

No thread of its own (no hand-off): the first caller to arrive becomes the *leader*, waits for
the delay or a full batch, runs the batch on its own thread and hands each follower its slice;
once it has taken its batch the next caller may lead, so batches overlap on several cores.
A caller that finds the batcher idle, when no other thread has called in the last 50 ms, runs at
once without the delay: a single-threaded caller pays one lock, not the queue delay. When a
batched call fails, each of its requests is run alone, so one request's error never becomes
another's.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgeserve.errors import ConfigError, first_line
from edgeserve.manifest import Artifact, Manifest
from edgeserve.selection import batch_variant, pad_batch

from .runtimes import Runtime, TensorInfo

__all__ = ["BatchPolicy", "BatchingRuntime", "PaddedRuntime", "batchable", "parse_batch_option",
           "with_variant"]

# A caller counts as alone when no other thread has called for this long.
_SOLO_S = 0.05


@dataclass(frozen=True)
class BatchPolicy:
    """Stack up to ``max_batch`` samples, waiting at most ``max_queue_delay_us`` for them."""

    max_batch: int = 8
    max_queue_delay_us: int = 500

    def __post_init__(self) -> None:
        if not 2 <= self.max_batch <= 4096:
            raise ConfigError(f"max_batch must be between 2 and 4096, got {self.max_batch}")
        if not 0 <= self.max_queue_delay_us <= 1_000_000:
            raise ConfigError("max_queue_delay_us must be between 0 and 1,000,000 (1 s), got "
                              f"{self.max_queue_delay_us}")


def parse_batch_option(value: str) -> tuple[str, BatchPolicy]:
    """``MODEL[:MAX_BATCH[:DELAY_US]]`` → (model, policy); a clear error otherwise."""
    parts = value.split(":")
    if not parts[0] or len(parts) > 3:
        raise ConfigError(f"--batch {value!r}: expected MODEL[:MAX_BATCH[:DELAY_US]], e.g. "
                          "'digits:8:500'")
    try:
        numbers = [int(p) for p in parts[1:]]
    except ValueError:
        raise ConfigError(f"--batch {value!r}: MAX_BATCH and DELAY_US are whole numbers, e.g. "
                          "'digits:8:500'") from None
    defaults = BatchPolicy()
    return parts[0], BatchPolicy(numbers[0] if numbers else defaults.max_batch,
                                 numbers[1] if len(numbers) > 1 else defaults.max_queue_delay_us)


def batchable(runtime: Runtime) -> str | None:
    """None when ``runtime`` can be batched on axis 0, else why not."""
    for what, tensors in (("input", runtime.inputs), ("output", runtime.outputs)):
        for tensor in tensors:
            if not tensor.shape or tensor.shape[0] is not None:
                return (f"{what} {tensor.name!r} has no dynamic batch axis (shape "
                        f"{list(tensor.shape)})")
    return None


def with_variant(runtime: Runtime, manifest: Manifest, artifact: Artifact, policy: BatchPolicy,
                 installed: Callable[[str], bool], load: Callable[[Artifact], Runtime]
                 ) -> tuple[Runtime, BatchPolicy, str | None]:
    """``runtime`` (``artifact``'s) ready for ``policy``: when its batch is fixed and the package
    has a batch-N variant, a :class:`PaddedRuntime` over both (the variant loaded by ``load``),
    with ``max_batch`` capped at N, and the variant's id; otherwise ``runtime`` as it is
    (:class:`BatchingRuntime` says why it cannot batch). ``installed`` tells whether a package
    file is on the device. Raises :class:`ConfigError` when the variant cannot be used."""
    if batchable(runtime) is None:
        return runtime, policy, None
    variant = batch_variant(manifest, artifact)
    if variant is None or variant.batch is None:
        return runtime, policy, None
    if not all(installed(name) for name in manifest.artifact_files(variant)):
        raise ConfigError(f"its batch-N variant {variant.id} was not installed (installed "
                          "before this agent kept variants: install the package again)")
    try:
        many = load(variant)
    except Exception as exc:  # a bad variant costs the batching, never the model
        raise ConfigError(f"its batch-N variant {variant.id} cannot be loaded: "
                          f"{first_line(exc)}") from None
    # the two artifacts' signatures list tensors in the model's order: pair their names
    # (PaddedRuntime checks the pairs against both runtimes)
    inputs, outputs = ([(a.name, b.name) for a, b in zip(mine or model, theirs or model,
                                                        strict=False)]
                       for mine, theirs, model in ((artifact.inputs, variant.inputs,
                                                    manifest.inputs),
                                                   (artifact.outputs, variant.outputs,
                                                    manifest.outputs)))
    try:
        padded = PaddedRuntime(runtime, many, inputs, outputs)
    except ConfigError:
        many.close()
        raise
    if policy.max_batch > padded.size:
        policy = BatchPolicy(padded.size, policy.max_queue_delay_us)
    return padded, policy, variant.id


class PaddedRuntime:
    """A fixed-batch artifact with a dynamic batch axis: ``single`` (batch 1) runs one sample,
    ``batched`` (the batch-N variant, every tensor's batch fixed at one N ≥ 2) runs 2…N, a
    partial batch padded with copies of its last sample. ``inputs``/``outputs`` pair each
    tensor name of ``single`` with the variant's name for the same model tensor (the manifest's
    artifact signatures, which list tensors in the model's order); by position when omitted.
    The variant's outputs are returned in ``single``'s order."""

    def __init__(self, single: Runtime, batched: Runtime,
                 inputs: list[tuple[str, str]] | None = None,
                 outputs: list[tuple[str, str]] | None = None) -> None:
        sizes = {t.shape[0] if t.shape else None for t in [*batched.inputs, *batched.outputs]}
        size = next(iter(sizes))
        if len(sizes) != 1 or size is None or size < 2:
            raise ConfigError("the batch-N variant must fix the batch axis of every input and "
                              f"output at one size ≥ 2; it has {sorted(map(str, sizes))}")
        ins = _paired("inputs", single.inputs, batched.inputs, inputs)
        outs = _paired("outputs", single.outputs, batched.outputs, outputs)
        self.size = size
        self.single, self.batched = single, batched
        self.kind = single.kind
        self.inputs = [TensorInfo(t.name, t.dtype, (None, *t.shape[1:]), t.quantization)
                       for t in single.inputs]
        self.outputs = [TensorInfo(t.name, t.dtype, (None, *t.shape[1:]), t.quantization)
                        for t in single.outputs]
        self._names = [(a.name, b.name) for a, b in ins]
        position = {t.name: k for k, t in enumerate(batched.outputs)}
        self._order = [position[b.name] for _, b in outs]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        count = int(next(iter(feeds.values())).shape[0]) if feeds else 1
        if count <= 1:
            return self.single.run(feeds)
        parts: list[list[np.ndarray]] = []
        for start in range(0, count, self.size):
            chunk = {name: feeds[name][start:start + self.size] for name, _ in self._names}
            taken = int(next(iter(chunk.values())).shape[0])
            if taken == 1:
                parts.append(self.single.run(chunk))
                continue
            padded = {other: pad_batch(chunk[name], self.size) for name, other in self._names}
            results = self.batched.run(padded)
            parts.append([results[k][:taken] for k in self._order])
        if len(parts) == 1:
            return parts[0]
        return [np.concatenate(outs) for outs in zip(*parts, strict=True)]

    def close(self) -> None:
        try:
            self.batched.close()
        finally:
            self.single.close()


def _paired(what: str, one: list[TensorInfo], many: list[TensorInfo],
            names: list[tuple[str, str]] | None) -> list[tuple[TensorInfo, TensorInfo]]:
    """``one``'s tensors (in order) with the variant's tensor for each; ConfigError when a pair
    differs in dtype, quantization or anything of its shape but the batch."""
    if len(one) != len(many):
        raise ConfigError(f"the batch-N variant has {len(many)} {what}, the artifact {len(one)}")
    by_one = {t.name: t for t in one}
    by_many = {t.name: t for t in many}
    if names is not None and all(a in by_one and b in by_many for a, b in names) \
            and len({a for a, _ in names}) == len(one):
        wanted = dict(names)
        pairs = [(t, by_many[wanted[t.name]]) for t in one]
    else:
        pairs = list(zip(one, many, strict=True))
    for a, b in pairs:
        # the adapter (de)quantizes with the batch-1 artifact's scale and zero point
        if (a.dtype, a.shape[1:]) != (b.dtype, b.shape[1:]) or \
                not _same_quantization(a.quantization, b.quantization):
            raise ConfigError(f"the batch-N variant's {what} do not match the artifact's: "
                              f"{b.name} {list(b.shape)} ({b.dtype}, quantization "
                              f"{b.quantization}) for {a.name} {list(a.shape)} ({a.dtype}, "
                              f"quantization {a.quantization})")
    return pairs


def _same_quantization(a: tuple[float, int] | None, b: tuple[float, int] | None) -> bool:
    """Equal, or the same zero point and scales a calibration's float round-off apart (the
    batch-N variant is calibrated by its own converter run: 0.0047041294 against
    0.0047041303 measured)."""
    if a is None or b is None:
        return a is b
    return a[1] == b[1] and abs(a[0] - b[0]) <= 1e-4 * max(abs(a[0]), abs(b[0]))


class _Request:
    __slots__ = ("done", "error", "feeds", "key", "result", "size", "taken", "wake")

    def __init__(self, feeds: dict[str, np.ndarray], lock: threading.Lock) -> None:
        self.feeds = feeds
        # its own condition on the batcher's lock: a waiter is woken when *its* state changes
        # (its batch done, its turn to lead), not on every arrival (8 waiters on 2 cores spent
        # their time waking to find nothing to do)
        self.wake = threading.Condition(lock)
        first = next(iter(feeds.values()))
        self.size = int(first.shape[0])
        self.key = tuple((name, a.dtype.str, a.shape[1:]) for name, a in feeds.items())
        self.done = False
        self.taken = False  # in a batch that a leader runs
        self.result: list[np.ndarray] | None = None
        self.error: BaseException | None = None


class BatchingRuntime:
    """A :class:`Runtime` that stacks concurrent ``run`` calls (see the module docstring).

    ``on_batch(requests, samples)`` is called after every runtime call (telemetry)."""

    def __init__(self, runtime: Runtime, policy: BatchPolicy,
                 on_batch: Callable[[int, int], None] | None = None) -> None:
        why = batchable(runtime)
        if why is not None:
            raise ConfigError(f"dynamic batching needs a dynamic batch axis: {why}")
        self.runtime = runtime
        self.policy = policy
        self.kind = runtime.kind
        self.inputs: list[TensorInfo] = runtime.inputs
        self.outputs: list[TensorInfo] = runtime.outputs
        self._on_batch = on_batch
        self._delay = policy.max_queue_delay_us / 1e6
        self._lock = threading.Lock()
        self._arrival = threading.Condition(self._lock)  # the leader waits for company here
        self._queue: list[_Request] = []
        self._leading = False
        self._callers = 0
        self._last_caller = 0
        self._mixed_at = -_SOLO_S  # when a request last came from another thread than before
        self.batches = 0
        self.samples = 0

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if not feeds or any(np.ndim(a) == 0 for a in feeds.values()):
            return self.runtime.run(feeds)
        request = _Request(feeds, self._lock)
        if request.size >= self.policy.max_batch:
            self._execute([request])
            return self._result(request)
        with self._lock:
            self._callers += 1
            self._queue.append(request)
            caller = threading.get_ident()
            if caller != self._last_caller:
                self._last_caller, self._mixed_at = caller, time.monotonic()
            try:
                if self._leading:
                    self._arrival.notify()  # the leader may now have a full batch
                    while not request.done and (request.taken or self._leading
                                                or self._queue[0] is not request):
                        request.wake.wait()
                if request.done:
                    return self._result(request)
                self._leading = True
                try:
                    batch = self._collect(request)
                finally:
                    # the next leader may gather while this batch runs (batches overlap, up to
                    # the callers' concurrency)
                    self._leading = False
                    if self._queue:
                        self._queue[0].wake.notify()
            finally:
                self._callers -= 1
        self._execute(batch)
        return self._result(request)

    def _collect(self, leader: _Request) -> list[_Request]:
        """Under the lock: wait for company, then take the batch. A caller that is alone, and
        the only thread that called for a while, does not wait (a single-threaded client pays
        no delay; runtimes that hold the GIL still batch, since their callers alternate)."""
        now = time.monotonic()
        deadline = now + self._delay
        solo = now - self._mixed_at > _SOLO_S
        while True:
            batch = self._compatible(leader)
            alone = solo and self._callers <= 1 and len(self._queue) == 1
            if alone or sum(r.size for r in batch) >= self.policy.max_batch:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._arrival.wait(left)
        for request in batch:
            self._queue.remove(request)
            request.taken = True
        return batch

    def _compatible(self, leader: _Request) -> list[_Request]:
        batch, samples = [leader], leader.size
        for request in self._queue:
            if request is not leader and request.key == leader.key and \
                    samples + request.size <= self.policy.max_batch:
                batch.append(request)
                samples += request.size
        return batch

    def _execute(self, batch: list[_Request]) -> None:
        """Run ``batch`` as one call; each request gets its slice or its error (never raises)."""
        if len(batch) == 1:
            request = batch[0]
            try:
                request.result = self.runtime.run(request.feeds)
            except BaseException as exc:
                request.error = exc
        else:
            try:
                stacked = {name: np.concatenate([r.feeds[name] for r in batch])
                           for name in batch[0].feeds}
                outputs = self.runtime.run(stacked)
            except Exception:
                for request in batch:  # one bad request must not fail the others
                    self._execute([request])
                return
            offset = 0
            for request in batch:
                request.result = [o[offset:offset + request.size] for o in outputs]
                offset += request.size
        samples = sum(r.size for r in batch)
        with self._lock:
            self.batches += 1
            self.samples += samples
            for request in batch:
                request.done = True
                request.wake.notify()
        if self._on_batch is not None:
            with contextlib.suppress(Exception):  # telemetry never fails a request
                self._on_batch(len(batch), samples)

    @staticmethod
    def _result(request: _Request) -> list[np.ndarray]:
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def close(self) -> None:
        self.runtime.close()
