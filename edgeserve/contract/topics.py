"""MQTT topics of contract v1: ``edgeserve/v1/{fleet}/devices/{device}/{kind}[/…]``, and the
fleet's own ``edgeserve/v1/{fleet}/fleet/status``.

Builders refuse ids that would break topic structure (``/``, ``+``, ``#``, control characters) and
the parser refuses anything that is not a v1 device topic, so neither side can be tricked into
publishing or accepting under someone else's id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

from ..errors import ContractError

__all__ = [
    "CONTRACT_VERSION",
    "SHARED_GROUP",
    "TOPIC_ROOT",
    "DeviceTopic",
    "TopicKind",
    "check_id",
    "device_topic",
    "fleet_filter",
    "fleet_status_topic",
    "parse_topic",
    "shared_filter",
    "topic_matches",
]

CONTRACT_VERSION = 1
TOPIC_ROOT = "edgeserve/v1"
SHARED_GROUP = "edgeserve-fleet"

TopicKind = Literal["status", "desired", "reported", "telemetry", "ack", "files"]
_KINDS: frozenset[str] = frozenset(get_args(TopicKind))
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise ContractError(
            f"{what} {value!r} is not valid: expected 1-128 characters from A-Z a-z 0-9 . _ : - "
            "starting with a letter or digit (no '/', '+', '#' or spaces)"
        )
    return value


@dataclass(frozen=True)
class DeviceTopic:
    fleet: str
    device_id: str
    kind: TopicKind
    rest: tuple[str, ...] = ()

    def __str__(self) -> str:
        return device_topic(self.fleet, self.device_id, self.kind, *self.rest)


def device_topic(fleet: str, device_id: str, kind: TopicKind, *rest: str) -> str:
    check_id(fleet, "fleet name")
    check_id(device_id, "device id")
    if kind not in _KINDS:
        raise ContractError(f"unknown topic kind {kind!r}; expected one of {sorted(_KINDS)}")
    if rest and kind != "files":
        raise ContractError(f"only 'files' topics take sub-levels, not {kind!r}")
    for part in rest:
        check_id(part, "files sub-topic")
    return "/".join((TOPIC_ROOT, fleet, "devices", device_id, kind, *rest))


def fleet_status_topic(fleet: str) -> str:
    """The fleet's own retained announcement: ``edgeserve/v1/{fleet}/fleet/status``."""
    check_id(fleet, "fleet name")
    return f"{TOPIC_ROOT}/{fleet}/fleet/status"


def fleet_filter(fleet: str, kind: TopicKind | Literal["+"], device_id: str = "+") -> str:
    """A subscription filter, e.g. every device's telemetry: ``edgeserve/v1/f/devices/+/telemetry``."""
    check_id(fleet, "fleet name")
    if device_id != "+":
        check_id(device_id, "device id")
    suffix = "/#" if kind == "files" else ""
    return f"{TOPIC_ROOT}/{fleet}/devices/{device_id}/{kind}{suffix}"


def shared_filter(topic_filter: str, group: str = SHARED_GROUP) -> str:
    """The MQTT 5 shared-subscription form: ``$share/{group}/{filter}``."""
    check_id(group, "shared subscription group")
    return f"$share/{group}/{topic_filter}"


def parse_topic(topic: str) -> DeviceTopic:
    """Split a v1 device topic into its parts; anything else raises :class:`ContractError`."""
    if not isinstance(topic, str) or len(topic) > 1024:
        raise ContractError("topic is not a string of at most 1024 characters")
    parts = topic.split("/")
    root = TOPIC_ROOT.split("/")
    if len(parts) < 6 or parts[:2] != root or parts[3] != "devices":
        raise ContractError(
            f"topic {topic!r} is not an edgeserve v1 device topic "
            f"(expected {TOPIC_ROOT}/{{fleet}}/devices/{{id}}/{{kind}})"
        )
    fleet, device_id, kind, rest = parts[2], parts[4], parts[5], tuple(parts[6:])
    check_id(fleet, "fleet name")
    check_id(device_id, "device id")
    if kind not in _KINDS:
        raise ContractError(f"topic {topic!r}: unknown kind {kind!r}; expected one of "
                            f"{sorted(_KINDS)}")
    if rest and kind != "files":
        raise ContractError(f"topic {topic!r}: {kind!r} topics have no sub-levels")
    for part in rest:
        check_id(part, "files sub-topic")
    return DeviceTopic(fleet, device_id, kind, rest)  # type: ignore[arg-type]


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching (``+`` one level, ``#`` the rest; ``$share/g/`` prefixes ignored)."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2] if topic_filter.count("/") >= 2 else ""
    f_parts, t_parts = topic_filter.split("/"), topic.split("/")
    for i, f in enumerate(f_parts):
        if f == "#":
            return True
        if i >= len(t_parts) or (f != "+" and f != t_parts[i]):
            return False
    return len(f_parts) == len(t_parts)
