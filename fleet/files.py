"""Chunked artifact transfer over MQTT, fleet side: answer a device's ``FileRequest``.

For devices with only an MQTT connection. The device asks for ``length`` bytes at ``offset`` of one
published file; the fleet answers with a ``FileChunk`` (base64 data + its sha256) on the device's
``files/data`` topic, or a chunk carrying ``error`` when the file is unknown. The device drives the
transfer (and its resumption); the fleet keeps no per-transfer state.

Only a version the requesting device's desired state names is served (:class:`FileGate`): anyone
else on the broker asking for model bytes gets a short refusal, not the model. Each device's
requests are rate-limited (a token bucket), and what is over the limit is dropped unanswered, so
small requests cannot be turned into a flood of large answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from edgeserve.contract import Desired, FileChunk, FileRequest
from edgeserve.errors import EdgeserveError

from .artifacts import ArtifactStore
from .deltas import DeltaCache
from .transfers import TransferLog

__all__ = ["MAX_CHUNK", "FileGate", "answer_file_request", "refusal"]

MAX_CHUNK = 256 * 1024


def answer_file_request(store: ArtifactStore, request: FileRequest,
                        deltas: DeltaCache | None = None, transfers: TransferLog | None = None,
                        device: str | None = None) -> FileChunk:
    """Read the requested range of a published file (never more than ``MAX_CHUNK`` bytes).

    With ``request.base``, the range is of the file's delta against that base (see
    :mod:`.deltas`); when the full file is the better deal the answer is a refusal whose error
    starts with ``full:``, and the device asks again without a base. ``transfers`` counts what
    is sent."""
    kind, full_bytes = "full", 0
    try:
        path = store.file_path(request.model, request.version, request.file)
        full_bytes = path.stat().st_size
        if request.base is not None:
            offer = (deltas or DeltaCache(store)).safe_offer(request.model, request.version,
                                                             request.file, request.base)
            if offer.path is None:
                return refusal(request, f"full: {offer.reason}")
            path, kind = offer.path, "delta"
        total = path.stat().st_size
        with path.open("rb") as fh:
            fh.seek(min(request.offset, total))
            data = fh.read(min(request.length, MAX_CHUNK))
    except (EdgeserveError, OSError) as exc:
        return refusal(request, str(exc))
    if transfers is not None and request.file not in _NOT_COUNTED:
        transfers.record(request.model, request.version, request.file, device, kind, len(data),
                         full_bytes if request.offset == 0 else 0)
    return FileChunk.of(request.transfer, request.file, request.offset, total, data)


_NOT_COUNTED = frozenset({"manifest.json", "signature", "package.edgepkg"})


def refusal(request: FileRequest, why: str) -> FileChunk:
    """A chunk that carries no data, only why."""
    empty = FileChunk.of(request.transfer, request.file, request.offset, 0, b"")
    return empty.model_copy(update={"error": why[:1000]})


class FileGate:
    """Who may fetch what over MQTT: a device, the versions its desired state names, at most
    ``rate`` requests per second (``burst`` at once)."""

    def __init__(self, desired_of: Callable[[str], Desired | None], rate: float = 20.0,
                 burst: float = 40.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.desired_of = desired_of
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self.refused = 0
        self.dropped = 0

    def admit(self, device_id: str, request: FileRequest) -> tuple[bool, str | None]:
        """(answer at all, why not to serve the bytes): over the rate → (False, None); not in
        the device's desired state → (True, reason); allowed → (True, None)."""
        if not self._take(device_id):
            self.dropped += 1
            return False, None
        desired = self.desired_of(device_id)
        model = desired.models.get(request.model) if desired is not None else None
        if model is None or request.version not in model.versions:
            self.refused += 1
            return True, (f"{request.model} {request.version} is not in the desired state of "
                          f"device {device_id}; the fleet serves a device only what it should run")
        return True, None

    def _take(self, device_id: str) -> bool:
        now = self.clock()
        tokens, at = self._buckets.get(device_id, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1:
            self._buckets[device_id] = (tokens, now)
            return False
        self._buckets[device_id] = (tokens - 1, now)
        return True
