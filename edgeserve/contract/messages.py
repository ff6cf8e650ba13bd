"""MQTT payload schemas of contract v1.

Every payload is a JSON object with ``"v": 1``. Receivers validate with :func:`decode`, which
raises :class:`~edgeserve.errors.ContractError` (never anything else) for oversize, non-JSON,
wrong-version or wrong-shape payloads, so a bad message is dropped, counted and logged, never fatal.
Unknown keys are ignored on receipt (a newer minor sender stays readable); a breaking change bumps
``v`` and the topic root together.

| topic kind          | model              | direction      | QoS / retained |
|---------------------|--------------------|----------------|----------------|
| status              | :class:`Status`    | agent → all    | 1, retained; also the Last Will |
| desired             | :class:`Desired`   | fleet → agent  | 1, retained |
| reported            | :class:`Reported`  | agent → fleet  | 1, retained |
| telemetry           | :class:`TelemetryBatch` | agent → fleet | 1 |
| ack                 | :class:`Ack`       | fleet → agent  | 1 |
| files/req           | :class:`FileRequest` | agent → fleet | 1 |
| files/data          | :class:`FileChunk` | fleet → agent  | 1 |
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta

from .._doc import Document, field
from .._validation import validate_json
from ..errors import ContractError
from ..signing import SignatureEntry
from ..telemetry.histogram import HistogramData
from ..telemetry.sketch import DriftScore, SketchData

__all__ = [
    "DESIRED_CONTEXT",
    "MAX_PAYLOAD_BYTES",
    "Ack",
    "BatchingSummary",
    "Desired",
    "DesiredModel",
    "ErrorInfo",
    "FeedbackSummary",
    "FileChunk",
    "FileRequest",
    "FleetStatus",
    "Health",
    "HealthPolicy",
    "Message",
    "ModelReport",
    "Reported",
    "ShadowReport",
    "ShadowSpec",
    "SignedDesired",
    "Status",
    "TelemetryBatch",
    "VersionRef",
    "Window",
    "decode",
    "encode",
]

MAX_PAYLOAD_BYTES = 1 << 20
DESIRED_CONTEXT = b"edgeserve.desired/1\n"
"""Prefixed to a desired document before signing: a fleet signature can never pass for another
kind of signed thing."""
_ID = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
_VERSION = r"^[0-9A-Za-z.+-]{1,64}$"
_SHA256 = r"^[0-9a-f]{64}$"
Id = Annotated[str, Meta(pattern=_ID)]
Ver = Annotated[str, Meta(pattern=_VERSION)]
Count = Annotated[int, Meta(ge=0, le=2**53)]
Seconds = Annotated[float, Meta(ge=0, le=1e11)]


class Message(Document, forbid_unknown_fields=False):
    """Base of every payload: schema version 1, unknown keys ignored, immutable."""

    v: Literal[1] = 1


# -- status -------------------------------------------------------------------------------------

class Status(Message):
    """Birth message (online) and Last Will (offline), retained on ``devices/{id}/status``."""

    device_id: Id
    state: Literal["online", "offline"]
    ts: Seconds = field(default_factory=time.time)
    agent_version: Annotated[str, Meta(max_length=64)] | None = None
    profile: Annotated[str, Meta(max_length=64)] | None = None
    models: Annotated[dict[Id, Ver], Meta(max_length=256, description=(
        "active version per model"))] = field(default_factory=dict)
    labels: Annotated[dict[str, str], Meta(max_length=64)] = field(default_factory=dict)
    reason: Annotated[str, Meta(max_length=256)] | None = None


class FleetStatus(Message):
    """Retained on ``{fleet}/fleet/status``: the fleet's ingestion announces itself ``online``
    each time its subscriptions are granted (Last Will: ``offline``). A device that sees a live
    announcement without ``resumed`` sends its unacked telemetry again at once: what it sent
    while no fleet session existed was dropped by the broker."""

    state: Literal["online", "offline"]
    instance: Annotated[str, Meta(min_length=1, max_length=64, description="one fleet process's run")]
    ts: Seconds = field(default_factory=time.time)
    resumed: Annotated[bool, Meta(description=(
        "the broker kept the fleet's session, so it queued what devices sent meanwhile"))] = False


# -- desired --------------------------------------------------------------------------------------

class VersionRef(Message):
    """Where a device gets one version: the package's base URL (or MQTT) and its manifest hash."""

    release: Annotated[int, Meta(ge=1)]
    transport: Literal["http", "mqtt"] = "http"
    url: Annotated[str, Meta(max_length=2048, description=(
        "base URL serving manifest.json, signature, files/..."))] | None = None
    manifest_sha256: Annotated[str, Meta(pattern=_SHA256)]
    token: Annotated[str, Meta(max_length=512, description=(
        "sent as 'Authorization: Bearer' to the artifact endpoint when the fleet protects it"
    ))] | None = None

    def __post_init__(self) -> None:
        if self.transport == "http" and not (self.url or "").startswith(("http://", "https://")):
            raise ValueError("transport 'http' needs an http(s):// url")


class ShadowSpec(Message):
    version: Ver
    sample_rate: Annotated[float, Meta(gt=0, le=1)] = 1.0


class HealthPolicy(Message):
    """How a device decides to commit a new version after activation."""

    min_inferences: Annotated[int, Meta(ge=0, le=1000000)] = 20
    max_error_rate: Annotated[float, Meta(ge=0, le=1)] = 0.05
    max_latency_ms: Annotated[float, Meta(gt=0)] | None = None
    sample_tolerance: Annotated[float, Meta(ge=0)] = 0.01
    max_watch_s: Annotated[float, Meta(gt=0, le=30 * 86400, description=(
        "a device that sees fewer than min_inferences live requests in this time decides on those"
        " it saw (the sample check has passed already), so that an idle device does not hold a "
        "rollout stage forever"))] = 120.0


class DesiredModel(Message):
    active: Ver
    versions: Annotated[dict[Ver, VersionRef], Meta(min_length=1, max_length=16)]
    traffic: Annotated[dict[Ver, float], Meta(max_length=16, description=(
        "A/B weights; empty = all to active"))] = field(default_factory=dict)
    shadow: ShadowSpec | None = None
    health: HealthPolicy = field(default_factory=HealthPolicy)

    def __post_init__(self) -> None:
        needed = {self.active, *self.traffic, *([self.shadow.version] if self.shadow else [])}
        missing = needed - set(self.versions)
        if missing:
            raise ValueError(f"versions {sorted(missing)} are used but have no entry in 'versions'")
        if any(w < 0 for w in self.traffic.values()):
            raise ValueError("traffic weights must not be negative")
        if self.traffic and sum(self.traffic.values()) <= 0:
            raise ValueError("traffic weights must add up to more than 0")


class Desired(Message):
    """What a device should run. It travels signed by the fleet (:class:`SignedDesired`,
    retained on ``devices/{id}/desired``); the agent applies only a higher ``revision``, meant
    for it (``device_id``) and not ``expires``-d."""

    revision: Annotated[int, Meta(ge=0, le=2 ** 53)]
    ts: Seconds = field(default_factory=time.time)
    models: Annotated[dict[Id, DesiredModel], Meta(max_length=64)] = field(default_factory=dict)
    rollout: Annotated[str, Meta(max_length=128)] | None = None
    device_id: Annotated[Id | None, Meta(description="the device it is for (signed)")] = None
    expires: Annotated[Seconds | None, Meta(description="not to be applied after (signed)")] = None


class SignedDesired(Message):
    """The payload on ``devices/{id}/desired``: a :class:`Desired` document, as JSON text, and
    the fleet's ed25519 signature(s) over ``DESIRED_CONTEXT + payload`` (UTF-8). Signing the
    exact bytes, not a re-encoding, keeps a newer fleet's additions verifiable by older agents."""

    payload: Annotated[str, Meta(min_length=2, max_length=MAX_PAYLOAD_BYTES)]
    signatures: Annotated[list[SignatureEntry], Meta(min_length=1, max_length=4)]


# -- reported -------------------------------------------------------------------------------------

class ErrorInfo(Message):
    code: Annotated[str, Meta(max_length=64, description="the EdgeserveError class name")]
    message: Annotated[str, Meta(max_length=2000)]
    version: Ver | None = None


class Delivery(Message):
    """How the files of the last version a device fetched crossed the network."""

    version: Ver
    received: Annotated[Count, Meta(description="bytes of files (and deltas) received")]
    full_bytes: Annotated[Count, Meta(description="what downloading every file in full would have cost")]
    delta_files: Annotated[Count, Meta(description="files rebuilt from a delta and verified")] = 0
    reused_files: Annotated[Count, Meta(description="files already in the cache (nothing sent)")] = 0
    fallbacks: Annotated[Count, Meta(description=(
        "deltas refused (damaged, wrong base, hash mismatch): fetched in full instead"))] = 0
    fallbacks_total: Annotated[Count, Meta(description="deltas refused on this device, ever")] = 0


class ModelReport(Message):
    active: Ver | None = None
    previous: Ver | None = None
    installed: Annotated[list[Ver], Meta(max_length=64)] = field(default_factory=list)
    state: Annotated[Literal["idle", "downloading", "retrying", "verifying", "staged",
                             "health-check", "committed", "rolled-back", "unhealthy", "failed"],
                     Meta(description="retrying: a download was cut or refused for a while, the "
                          "next attempt resumes it (last_error says why and when); unhealthy: "
                          "the version failed its health check and there was no earlier "
                          "version to return to, so it still serves; failed: the target could "
                          "not be delivered or verified")] = "idle"
    target: Ver | None = None
    progress: Annotated[float, Meta(ge=0, le=1)] = 0.0
    traffic: Annotated[dict[Ver, float], Meta(max_length=16)] = field(default_factory=dict)
    shadow: Ver | None = None
    last_error: ErrorInfo | None = None
    active_since: Annotated[Seconds | None, Meta(description=(
        "when the active version started answering (the fleet judges a new version only on "
        "traffic after this)"))] = None
    delivery: Delivery | None = None


class Reported(Message):
    device_id: Id
    revision: Annotated[int, Meta(ge=0, le=2 ** 53, description="last desired revision applied")]
    ts: Seconds = field(default_factory=time.time)
    models: Annotated[dict[Id, ModelReport], Meta(max_length=64)] = field(default_factory=dict)


# -- telemetry ------------------------------------------------------------------------------------

class ShadowReport(Message):
    version: Ver
    compared: Count
    disagreements: Count
    max_abs_diff: Annotated[float, Meta(ge=0)] = 0.0
    errors: Count = 0
    latency: HistogramData | None = None


class FeedbackSummary(Message):
    """Rewards/labels received for this window's model version (per arm for experiments)."""

    count: Count
    reward_sum: float = 0.0
    reward_sumsq: Annotated[float, Meta(ge=0)] = 0.0
    correct: Count = 0
    labeled: Count = 0
    rewarded: Annotated[Count | None, Meta(description=(
        "feedback events that carried a reward (the rest carried only a label); agents that "
        "predate the field leave it unset and readers then use count"))] = None


class BatchingSummary(Message):
    """The agent's dynamic batching of this window's model version: runtime calls it made, the
    requests and samples they carried, and the most requests one call carried (mean batch =
    samples / calls)."""

    calls: Count
    requests: Count
    samples: Count
    largest: Count = 0


class Health(Message):
    mem_used_mb: Annotated[float, Meta(ge=0)] | None = None
    mem_total_mb: Annotated[float, Meta(ge=0)] | None = None
    disk_free_mb: Annotated[float, Meta(ge=0)] | None = None
    cpu_load: Annotated[float, Meta(ge=0)] | None = None
    temp_c: Annotated[float, Meta(ge=-100, le=300)] | None = None


class Window(Message):
    """One aggregation window of one model version (or device health when ``model`` is None)."""

    seq: Annotated[int, Meta(ge=1, le=2 ** 53, description="per-device sequence number, from 1")]
    start: Seconds
    end: Seconds
    model: Id | None = None
    version: Ver | None = None
    requests: Count = 0
    errors: Count = 0
    latency: HistogramData | None = None
    inputs: SketchData | None = None
    outputs: SketchData | None = None
    drift_inputs: DriftScore | None = None
    drift_outputs: DriftScore | None = None
    shadow: ShadowReport | None = None
    feedback: FeedbackSummary | None = None
    batching: Annotated[BatchingSummary | None, Meta(description=(
        "set when the agent batched this version's requests (agents that predate it, and "
        "fleets that predate it, leave it out and ignore it)"))] = None
    health: Health | None = None
    dropped: Annotated[Count, Meta(description="windows the outbox dropped before this one")] = 0

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise ValueError("window end is before its start")
        if self.errors > self.requests:
            raise ValueError("errors cannot exceed requests")
        if (self.model is None) != (self.version is None):
            raise ValueError("model and version go together")


class TelemetryBatch(Message):
    device_id: Id
    sent: Seconds = field(default_factory=time.time)
    windows: Annotated[list[Window], Meta(min_length=1, max_length=1000)]
    floor: Annotated[int, Meta(ge=1, le=2 ** 53, description=(
        "lowest seq the device still holds: every seq below it was acked or dropped by its outbox"
        " and will never be sent, so the fleet may ack past gaps below it"))] | None = None


class Ack(Message):
    """``seq`` is the highest sequence number below which every window is stored."""

    seq: Annotated[int, Meta(ge=0, le=2 ** 53)]


# -- files ----------------------------------------------------------------------------------------

class FileRequest(Message):
    transfer: Id
    model: Id
    version: Ver
    file: Annotated[str, Meta(min_length=1, max_length=512, description="member path or 'manifest.json'")]
    offset: Annotated[int, Meta(ge=0)] = 0
    length: Annotated[int, Meta(ge=1, le=512 * 1024)] = 65536
    base: Annotated[str, Meta(pattern=_SHA256, description=(
        "sha256 of the file the device holds: send the delta against it (edgeserve.delta), or "
        "refuse with an error starting 'full:' when the full file is to be fetched instead"))] | None = None


class FileChunk(Message):
    transfer: Id
    file: Annotated[str, Meta(min_length=1, max_length=512)]
    offset: Annotated[int, Meta(ge=0)]
    total: Annotated[int, Meta(ge=0)]
    data: Annotated[str, Meta(max_length=700000, description="base64 bytes")]
    sha256: Annotated[str, Meta(pattern=_SHA256, description="of the decoded chunk")]
    error: Annotated[str, Meta(max_length=1000)] | None = None

    def payload(self) -> bytes:
        try:
            raw = base64.b64decode(self.data, validate=True)
        except (binascii.Error, ValueError):
            raise ContractError(f"file chunk {self.file}@{self.offset}: data is not base64") from None
        if hashlib.sha256(raw).hexdigest() != self.sha256:
            raise ContractError(f"file chunk {self.file}@{self.offset}: sha256 mismatch")
        return raw

    @classmethod
    def of(cls, transfer: str, file: str, offset: int, total: int, raw: bytes) -> FileChunk:
        return cls(transfer=transfer, file=file, offset=offset, total=total,
                   data=base64.b64encode(raw).decode(), sha256=hashlib.sha256(raw).hexdigest())


M = TypeVar("M", bound=Message)


def decode(model: type[M], payload: bytes | bytearray | str, where: str = "payload",
           max_bytes: int = MAX_PAYLOAD_BYTES) -> M:
    """Validate a received payload; every problem is a :class:`ContractError`."""
    if isinstance(payload, bytearray):
        payload = bytes(payload)
    if not isinstance(payload, bytes | str):
        raise ContractError(f"{where}: payload must be bytes, got {type(payload).__name__}")
    if isinstance(payload, bytes):
        head = payload.lstrip()[:1]
    else:
        head = payload.lstrip()[:1].encode("utf-8", "replace")
    if len(payload) <= max_bytes and head != b"{":
        raise ContractError(f"{where}: expected a JSON object (starting with '{{'), "
                            f"got {payload[:20]!r}")
    message = validate_json(model, payload, where, ContractError, max_bytes=max_bytes)
    if msgspec.json.decode(payload, type=_Version).v is _ABSENT:
        raise ContractError(f"{where}: missing schema version key 'v' (expected \"v\": 1)")
    return message


_ABSENT: Any = object()


class _Version(msgspec.Struct):
    """Only the ``v`` key of a payload (whether it was given; the rest is skipped)."""

    v: Any = _ABSENT


def encode(message: Message) -> bytes:
    """Compact JSON bytes for publishing (``None`` fields left out)."""
    data: dict[str, Any] = message.model_dump(mode="json", exclude_none=True)
    return json.dumps(data, separators=(",", ":")).encode()
