"""The MQTT contract (v1) between device agents and the fleet: topics and payload schemas.

Written once here; the agent and the fleet only import it. See docs/mqtt.md for the reference
that dashboard builders read.
"""

from __future__ import annotations

from .messages import (
    MAX_PAYLOAD_BYTES,
    Ack,
    Desired,
    DesiredModel,
    ErrorInfo,
    FeedbackSummary,
    FileChunk,
    FileRequest,
    Health,
    HealthPolicy,
    Message,
    ModelReport,
    Reported,
    ShadowReport,
    ShadowSpec,
    Status,
    TelemetryBatch,
    VersionRef,
    Window,
    decode,
    encode,
)
from .topics import (
    CONTRACT_VERSION,
    SHARED_GROUP,
    TOPIC_ROOT,
    DeviceTopic,
    TopicKind,
    check_id,
    device_topic,
    fleet_filter,
    parse_topic,
    shared_filter,
    topic_matches,
)

__all__ = [
    "CONTRACT_VERSION",
    "MAX_PAYLOAD_BYTES",
    "SHARED_GROUP",
    "TOPIC_ROOT",
    "Ack",
    "Desired",
    "DesiredModel",
    "DeviceTopic",
    "ErrorInfo",
    "FeedbackSummary",
    "FileChunk",
    "FileRequest",
    "Health",
    "HealthPolicy",
    "Message",
    "ModelReport",
    "Reported",
    "ShadowReport",
    "ShadowSpec",
    "Status",
    "TelemetryBatch",
    "TopicKind",
    "VersionRef",
    "Window",
    "check_id",
    "decode",
    "device_topic",
    "encode",
    "fleet_filter",
    "parse_topic",
    "shared_filter",
    "topic_matches",
]
