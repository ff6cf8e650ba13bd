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

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .._validation import validate_json
from ..errors import ContractError
from ..signing import SignatureEntry
from ..telemetry.histogram import HistogramData
from ..telemetry.sketch import DriftScore, SketchData

__all__ = [
    "DESIRED_CONTEXT",
    "MAX_PAYLOAD_BYTES",
    "Ack",
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
Id = Annotated[str, Field(pattern=_ID)]
Ver = Annotated[str, Field(pattern=_VERSION)]
Count = Annotated[int, Field(ge=0, le=2**53)]
Seconds = Annotated[float, Field(ge=0, le=1e11)]


class Message(BaseModel):
    """Base of every payload: schema version 1, unknown keys ignored, immutable."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    v: Literal[1] = 1


# -- status -------------------------------------------------------------------------------------

class Status(Message):
    """Birth message (online) and Last Will (offline), retained on ``devices/{id}/status``."""

    device_id: Id
    state: Literal["online", "offline"]
    ts: Seconds = Field(default_factory=time.time)
    agent_version: str | None = Field(default=None, max_length=64)
    profile: str | None = Field(default=None, max_length=64)
    models: dict[Id, Ver] = Field(default_factory=dict, max_length=256,
                                  description="active version per model")
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)
    reason: str | None = Field(default=None, max_length=256)


class FleetStatus(Message):
    """Retained on ``{fleet}/fleet/status``: the fleet's ingestion announces itself ``online``
    each time its subscriptions are granted (Last Will: ``offline``). A device that sees a live
    announcement without ``resumed`` sends its unacked telemetry again at once: what it sent
    while no fleet session existed was dropped by the broker."""

    state: Literal["online", "offline"]
    instance: str = Field(min_length=1, max_length=64, description="one fleet process's run")
    ts: Seconds = Field(default_factory=time.time)
    resumed: bool = Field(default=False, description="the broker kept the fleet's session, so "
                                                     "it queued what devices sent meanwhile")


# -- desired --------------------------------------------------------------------------------------

class VersionRef(Message):
    """Where a device gets one version: the package's base URL (or MQTT) and its manifest hash."""

    release: int = Field(ge=1)
    transport: Literal["http", "mqtt"] = "http"
    url: str | None = Field(default=None, max_length=2048,
                            description="base URL serving manifest.json, signature, files/...")
    manifest_sha256: str = Field(pattern=_SHA256)
    token: str | None = Field(default=None, max_length=512,
                              description="sent as 'Authorization: Bearer' to the artifact "
                                          "endpoint when the fleet protects it")

    @model_validator(mode="after")
    def _url_for_http(self) -> VersionRef:
        if self.transport == "http" and not (self.url or "").startswith(("http://", "https://")):
            raise ValueError("transport 'http' needs an http(s):// url")
        return self


class ShadowSpec(Message):
    version: Ver
    sample_rate: float = Field(default=1.0, gt=0, le=1)


class HealthPolicy(Message):
    """How a device decides to commit a new version after activation."""

    min_inferences: int = Field(default=20, ge=0, le=1_000_000)
    max_error_rate: float = Field(default=0.05, ge=0, le=1)
    max_latency_ms: float | None = Field(default=None, gt=0)
    sample_tolerance: float = Field(default=1e-2, ge=0)
    max_watch_s: float = Field(
        default=120.0, gt=0, le=30 * 86400,
        description="a device that sees fewer than min_inferences live requests in this time "
                    "decides on those it saw (the sample check has passed already), so that an "
                    "idle device does not hold a rollout stage forever")


class DesiredModel(Message):
    active: Ver
    versions: dict[Ver, VersionRef] = Field(min_length=1, max_length=16)
    traffic: dict[Ver, float] = Field(default_factory=dict, max_length=16,
                                      description="A/B weights; empty = all to active")
    shadow: ShadowSpec | None = None
    health: HealthPolicy = Field(default_factory=HealthPolicy)

    @model_validator(mode="after")
    def _versions_known(self) -> DesiredModel:
        needed = {self.active, *self.traffic, *([self.shadow.version] if self.shadow else [])}
        missing = needed - set(self.versions)
        if missing:
            raise ValueError(f"versions {sorted(missing)} are used but have no entry in 'versions'")
        if any(w < 0 for w in self.traffic.values()):
            raise ValueError("traffic weights must not be negative")
        if self.traffic and sum(self.traffic.values()) <= 0:
            raise ValueError("traffic weights must add up to more than 0")
        return self


class Desired(Message):
    """What a device should run. It travels signed by the fleet (:class:`SignedDesired`,
    retained on ``devices/{id}/desired``); the agent applies only a higher ``revision``, meant
    for it (``device_id``) and not ``expires``-d."""

    revision: int = Field(ge=0, le=2**53)
    ts: Seconds = Field(default_factory=time.time)
    models: dict[Id, DesiredModel] = Field(default_factory=dict, max_length=64)
    rollout: str | None = Field(default=None, max_length=128)
    device_id: Id | None = Field(default=None, description="the device it is for (signed)")
    expires: Seconds | None = Field(default=None, description="not to be applied after (signed)")


class SignedDesired(Message):
    """The payload on ``devices/{id}/desired``: a :class:`Desired` document, as JSON text, and
    the fleet's ed25519 signature(s) over ``DESIRED_CONTEXT + payload`` (UTF-8). Signing the
    exact bytes, not a re-encoding, keeps a newer fleet's additions verifiable by older agents."""

    payload: str = Field(min_length=2, max_length=MAX_PAYLOAD_BYTES)
    signatures: list[SignatureEntry] = Field(min_length=1, max_length=4)


# -- reported -------------------------------------------------------------------------------------

class ErrorInfo(Message):
    code: str = Field(max_length=64, description="the EdgeserveError class name")
    message: str = Field(max_length=2000)
    version: Ver | None = None


class Delivery(Message):
    """How the files of the last version a device fetched crossed the network."""

    version: Ver
    received: Count = Field(description="bytes of files (and deltas) received")
    full_bytes: Count = Field(description="what downloading every file in full would have cost")
    delta_files: Count = Field(default=0, description="files rebuilt from a delta and verified")
    reused_files: Count = Field(default=0, description="files already in the cache (nothing sent)")
    fallbacks: Count = Field(default=0, description="deltas refused (damaged, wrong base, hash "
                                                    "mismatch): fetched in full instead")
    fallbacks_total: Count = Field(default=0, description="deltas refused on this device, ever")


class ModelReport(Message):
    active: Ver | None = None
    previous: Ver | None = None
    installed: list[Ver] = Field(default_factory=list, max_length=64)
    state: Literal["idle", "downloading", "retrying", "verifying", "staged", "health-check",
                   "committed", "rolled-back", "unhealthy", "failed"] = Field(
        default="idle",
        description="retrying: a download was cut or refused for a while, the next attempt "
                    "resumes it (last_error says why and when); unhealthy: the version failed "
                    "its health check and there was no earlier version to return to, so it "
                    "still serves; failed: the target could not be delivered or verified")
    target: Ver | None = None
    progress: float = Field(default=0.0, ge=0, le=1)
    traffic: dict[Ver, float] = Field(default_factory=dict, max_length=16)
    shadow: Ver | None = None
    last_error: ErrorInfo | None = None
    active_since: Seconds | None = Field(
        default=None, description="when the active version started answering (the fleet "
                                  "judges a new version only on traffic after this)")
    delivery: Delivery | None = None


class Reported(Message):
    device_id: Id
    revision: int = Field(ge=0, le=2**53, description="last desired revision applied")
    ts: Seconds = Field(default_factory=time.time)
    models: dict[Id, ModelReport] = Field(default_factory=dict, max_length=64)


# -- telemetry ------------------------------------------------------------------------------------

class ShadowReport(Message):
    version: Ver
    compared: Count
    disagreements: Count
    max_abs_diff: float = Field(default=0.0, ge=0)
    errors: Count = 0
    latency: HistogramData | None = None


class FeedbackSummary(Message):
    """Rewards/labels received for this window's model version (per arm for experiments)."""

    count: Count
    reward_sum: float = 0.0
    reward_sumsq: float = Field(default=0.0, ge=0)
    correct: Count = 0
    labeled: Count = 0
    rewarded: Count | None = Field(
        default=None, description="feedback events that carried a reward (the rest carried "
                                  "only a label); agents that predate the field leave it unset "
                                  "and readers then use count")


class Health(Message):
    mem_used_mb: float | None = Field(default=None, ge=0)
    mem_total_mb: float | None = Field(default=None, ge=0)
    disk_free_mb: float | None = Field(default=None, ge=0)
    cpu_load: float | None = Field(default=None, ge=0)
    temp_c: float | None = Field(default=None, ge=-100, le=300)


class Window(Message):
    """One aggregation window of one model version (or device health when ``model`` is None)."""

    seq: int = Field(ge=1, le=2**53, description="per-device sequence number, from 1")
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
    health: Health | None = None
    dropped: Count = Field(default=0, description="windows the outbox dropped before this one")

    @model_validator(mode="after")
    def _sane(self) -> Window:
        if self.end < self.start:
            raise ValueError("window end is before its start")
        if self.errors > self.requests:
            raise ValueError("errors cannot exceed requests")
        if (self.model is None) != (self.version is None):
            raise ValueError("model and version go together")
        return self


class TelemetryBatch(Message):
    device_id: Id
    sent: Seconds = Field(default_factory=time.time)
    windows: list[Window] = Field(min_length=1, max_length=1000)
    floor: int | None = Field(default=None, ge=1, le=2**53,
                              description="lowest seq the device still holds: every seq below "
                                          "it was acked or dropped by its outbox and will never "
                                          "be sent, so the fleet may ack past gaps below it")


class Ack(Message):
    """``seq`` is the highest sequence number below which every window is stored."""

    seq: int = Field(ge=0, le=2**53)


# -- files ----------------------------------------------------------------------------------------

class FileRequest(Message):
    transfer: Id
    model: Id
    version: Ver
    file: str = Field(min_length=1, max_length=512, description="member path or 'manifest.json'")
    offset: int = Field(default=0, ge=0)
    length: int = Field(default=65536, ge=1, le=512 * 1024)
    base: str | None = Field(
        default=None, pattern=_SHA256,
        description="sha256 of the file the device holds: send the delta against it "
                    "(edgeserve.delta), or refuse with an error starting 'full:' when the full "
                    "file is to be fetched instead")


class FileChunk(Message):
    transfer: Id
    file: str = Field(min_length=1, max_length=512)
    offset: int = Field(ge=0)
    total: int = Field(ge=0)
    data: str = Field(max_length=700_000, description="base64 bytes")
    sha256: str = Field(pattern=_SHA256, description="of the decoded chunk")
    error: str | None = Field(default=None, max_length=1000)

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
    if "v" not in message.model_fields_set:
        raise ContractError(f"{where}: missing schema version key 'v' (expected \"v\": 1)")
    return message


def encode(message: Message) -> bytes:
    """Compact JSON bytes for publishing (``None`` fields left out)."""
    data: dict[str, Any] = message.model_dump(mode="json", exclude_none=True)
    return json.dumps(data, separators=(",", ":")).encode()
