"""The device registry: which devices exist, whether they are online, what they run.

Rows come from two sources: ``status`` messages (the retained birth message says online, agent
version, profile, active model versions and labels; the Last Will says offline) and telemetry
(a device that only ever sent telemetry is listed with state ``unknown``).

Status messages can arrive late or twice (retained copies, redelivery after a reconnect), so an
older ``ts`` than the one applied is ignored. An agent stamps every status of one connection -
the birth, a re-sent birth after its models changed, and the Last Will - with the time it
connected, so within a connection the latest to arrive wins (the broker delivers one topic in
order) and a Last Will is never beaten by an earlier birth.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from edgeserve.contract import Status

from .store import Store
from .tables import desired_state, device_models, devices, windows

__all__ = ["DeviceRecord", "apply_status", "delete_device_rows", "ensure_devices", "get_device",
           "list_devices", "lock_devices"]


@dataclass(frozen=True)
class DeviceRecord:
    """One row of the registry, as the CLI and the rollout engine read it."""

    device_id: str
    state: str
    first_seen: float
    last_seen: float
    agent_version: str | None
    profile: str | None
    models: dict[str, str]
    labels: dict[str, str]
    reason: str | None
    acked_seq: int
    windows_stored: int
    dropped_total: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ensure_devices(store: Store, conn: Connection, device_ids: Iterable[str], now: float) -> None:
    """Create registry rows (state ``unknown``) for devices seen for the first time."""
    rows = [{"device_id": d, "first_seen": now, "last_seen": now} for d in sorted(set(device_ids))]
    store.insert_ignore(conn, devices, rows, ["device_id"])


def lock_devices(store: Store, conn: Connection, device_ids: Iterable[str]) -> None:
    """Lock the devices' rows for this transaction, in key order (PostgreSQL; SQLite has one
    writer). Two fleet workers whose groups touch the same devices, one by a status message and
    the other by telemetry, then wait for each other instead of deadlocking: each takes its rows
    in the same order before it writes any."""
    ids = sorted(set(device_ids))
    if store.dialect != "postgresql" or not ids:
        return
    conn.execute(sa.select(devices.c.device_id).where(devices.c.device_id.in_(ids))
                 .order_by(devices.c.device_id).with_for_update())


def apply_status(store: Store, conn: Connection, status: Status, now: float) -> bool:
    """Apply a birth or Last Will message; False when a newer status was applied already."""
    ensure_devices(store, conn, [status.device_id], now)
    newer = sa.or_(devices.c.status_ts.is_(None), devices.c.status_ts <= status.ts)
    if status.state == "offline":
        values: dict[str, Any] = {"state": "offline", "reason": status.reason,
                                  "status_ts": status.ts}
    else:
        values = {"state": "online", "reason": None, "status_ts": status.ts,
                  "agent_version": status.agent_version, "profile": status.profile,
                  "models": json.dumps(status.models, sort_keys=True),
                  "labels": json.dumps(status.labels, sort_keys=True),
                  "last_seen": store.greatest(devices.c.last_seen, now)}
    result = conn.execute(sa.update(devices)
                          .where(devices.c.device_id == status.device_id, newer)
                          .values(**values))
    return bool(result.rowcount)


def _record(row: sa.Row[Any]) -> DeviceRecord:
    m = row._mapping
    return DeviceRecord(
        device_id=m["device_id"], state=m["state"], first_seen=m["first_seen"],
        last_seen=m["last_seen"], agent_version=m["agent_version"], profile=m["profile"],
        models=json.loads(m["models"] or "{}"), labels=json.loads(m["labels"] or "{}"),
        reason=m["reason"], acked_seq=int(m["acked_seq"]),
        windows_stored=int(m["windows_stored"]), dropped_total=int(m["dropped_total"]))


def list_devices(store: Store, state: str | None = None, limit: int | None = None) -> list[DeviceRecord]:
    """Every device (or those in ``state``), ordered by id."""
    query = sa.select(devices).order_by(devices.c.device_id)
    if state is not None:
        query = query.where(devices.c.state == state)
    if limit is not None:
        query = query.limit(limit)
    with store.read() as conn:
        return [_record(row) for row in conn.execute(query)]


def get_device(store: Store, device_id: str) -> DeviceRecord | None:
    with store.read() as conn:
        row = conn.execute(sa.select(devices).where(devices.c.device_id == device_id)).first()
    return None if row is None else _record(row)


def delete_device_rows(store: Store, device_id: str) -> dict[str, int]:
    """Delete every row about ``device_id`` (registry, desired state, reports, telemetry
    windows) in one transaction; returns the rows deleted per table.

    The windows go too: a device that comes back under the same id starts its sequence numbers
    afresh, and old windows under those numbers would make its new ones look like duplicates."""
    deleted = {}
    with store.write() as conn:
        for table in (desired_state, device_models, windows, devices):
            result = conn.execute(sa.delete(table).where(table.c.device_id == device_id))
            deleted[table.name] = int(result.rowcount or 0)
    return deleted
