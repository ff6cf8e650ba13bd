"""Removing a device from the fleet: its retained MQTT messages, then its rows in the store.

A device's ``status``, ``reported`` and ``desired`` messages are retained by the broker; as long
as its ``status`` is retained, a fleet service that (re)subscribes receives it and registers the
device again. So removal first clears those topics (an empty retained message each), then
deletes every row about the device, then clears ``desired`` once more in case the rollout
controller published a pending revision in between.

An online device (its agent is running) or one a running rollout has assigned is refused unless
``force``: the agent would register again at its next connect, and the rollout would wait for it.
"""

from __future__ import annotations

import uuid
from typing import Any

from edgeserve.contract import TopicKind, device_topic
from edgeserve.errors import BrokerError, InUseError, ModelNotFoundError

from .connection import BrokerSettings, connect
from .registry import delete_device_rows, get_device
from .rollouts.repo import Rollouts
from .store import Store

__all__ = ["RETAINED_KINDS", "remove_device"]

RETAINED_KINDS: tuple[TopicKind, ...] = ("status", "reported", "desired")


class _Cleaner:
    """One short-lived MQTT connection that publishes empty retained messages."""

    def __init__(self, settings: BrokerSettings, fleet: str, timeout: float) -> None:
        self.fleet = fleet
        self.timeout = timeout
        client_id = f"edgeserve-admin-{fleet}-{uuid.uuid4().hex[:8]}"
        self.client = connect(settings, client_id, lambda c: None, lambda v: None,
                              timeout=timeout)
        self.client.loop_start()

    def clear(self, device_id: str, kinds: tuple[TopicKind, ...] = RETAINED_KINDS) -> list[str]:
        topics = [device_topic(self.fleet, device_id, kind) for kind in kinds]
        sent = [self.client.publish(topic, b"", qos=1, retain=True) for topic in topics]
        for topic, info in zip(topics, sent, strict=True):
            info.wait_for_publish(self.timeout)
            if not info.is_published():
                raise BrokerError(f"the broker did not confirm clearing {topic} within "
                                  f"{self.timeout:g} s; run the removal again")
        return topics

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _check_removable(store: Store, device_id: str, force: bool) -> None:
    record = get_device(store, device_id)
    if record is None:
        raise ModelNotFoundError(f"no device {device_id!r} in the fleet store; 'edgeserve "
                                 "fleet devices' lists them")
    if force:
        return
    if record.state == "online":
        raise InUseError(f"device {device_id} is online (its agent is running and would "
                         "register again): stop the agent first, or pass --force")
    rollouts = [r.id for r in Rollouts(store).find(active_only=True)
                if device_id in r.state.assigned]
    if rollouts:
        raise InUseError(f"device {device_id} is part of running rollout(s) "
                         f"{', '.join(rollouts)}, which would wait for it: let them finish or "
                         "roll them back first, or pass --force")


def remove_device(store: Store, broker: BrokerSettings, fleet: str, device_id: str,
                  force: bool = False, timeout: float = 15.0) -> dict[str, Any]:
    """Clear the device's retained topics and delete its rows (see the module docstring).

    Returns ``{"device_id", "cleared_topics", "deleted_rows": {table: count}}``."""
    _check_removable(store, device_id, force)
    cleaner = _Cleaner(broker, fleet, timeout)
    try:
        topics = cleaner.clear(device_id)
        rows = delete_device_rows(store, device_id)
        cleaner.clear(device_id, ("desired",))
    finally:
        cleaner.close()
    return {"device_id": device_id, "cleared_topics": topics, "deleted_rows": rows}
