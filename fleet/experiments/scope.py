"""Which devices an experiment covers, and the group each belongs to.

A device is in scope when it matches the selector (profiles, labels, device ids; empty = every
device) and runs the model (its birth message or its reports name it): an experiment splits the
traffic a device already serves, it does not put a model on devices that never had it. Groups
exist for per-group bandits (``group_by`` = a label key, or ``profile``); otherwise every device
is in group ``"*"``.
"""

from __future__ import annotations

import sqlalchemy as sa

from ..registry import DeviceRecord, list_devices
from ..store import Store
from ..tables import device_models
from .spec import ALL, ExperimentSpec

__all__ = ["device_groups", "group_of", "matches"]


def matches(spec: ExperimentSpec, device: DeviceRecord) -> bool:
    selector = spec.selector
    if selector.devices and device.device_id not in selector.devices:
        return False
    if selector.profiles and device.profile not in selector.profiles:
        return False
    return all(device.labels.get(k) == v for k, v in selector.labels.items())


def group_of(spec: ExperimentSpec, device: DeviceRecord) -> str:
    if spec.group_by is None:
        return ALL
    if spec.group_by == "profile":
        return device.profile or "(none)"
    return device.labels.get(spec.group_by) or "(none)"


def device_groups(store: Store, spec: ExperimentSpec) -> dict[str, str]:
    """Device id → group for every device in the experiment's scope."""
    with store.read() as conn:
        reporting = set(conn.execute(sa.select(device_models.c.device_id)
                                     .where(device_models.c.model == spec.model)).scalars())
    return {d.device_id: group_of(spec, d) for d in list_devices(store)
            if matches(spec, d) and (spec.model in d.models or d.device_id in reporting)}
