"""Telemetry windows in the fleet store: idempotent batch writes, acks, queries.

Exactly-once in the store rests on the primary key (device, seq): :func:`store_windows` inserts a
batch with ``ON CONFLICT DO NOTHING``, so a window delivered twice (after a reconnect, a fleet
restart or a retransmission) is stored once.

The ack a device gets is the highest *contiguous* sequence number stored (:func:`advance_acks`):
everything up to it is safe and may leave the device's outbox. A device tells the fleet, with each
batch, the lowest sequence number it still holds (``floor``): anything below that was either acked
or dropped by its full outbox, so the fleet may step over those gaps instead of waiting forever.

:func:`advance_acks` runs in its own transaction after the windows are committed. Two fleet
workers storing parts of one device's backlog at the same time then cannot both miss each other's
rows: whichever commits last sees both. The stored value only ever grows (``GREATEST``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from edgeserve.contract import Window
from edgeserve.telemetry import HistogramData

from .store import Store
from .tables import devices, windows

__all__ = ["StoredWindow", "advance_acks", "query_windows", "store_windows", "window_row"]

# How many stored sequence numbers one ack step reads at a time (a longer run takes more steps).
_ACK_SCAN = 5000
# Devices whose acks one query advances.
_ACK_GROUP = 200


def window_row(device_id: str, window: Window, received: float) -> dict[str, Any]:
    """The ``windows`` row for a validated window."""
    p50 = p95 = None
    if window.latency is not None and window.latency.n:
        p50, p95 = _quantiles(window.latency, (0.5, 0.95))
    drifts = [d.psi for d in (window.drift_inputs, window.drift_outputs) if d is not None]
    return {
        "device_id": device_id, "seq": window.seq, "window_start": window.start,
        "window_end": window.end, "model": window.model, "version": window.version,
        "requests": window.requests, "errors": window.errors, "dropped": window.dropped,
        "latency_p50_ms": p50, "latency_p95_ms": p95,
        "drift_psi": max(drifts) if drifts else None, "received": received,
        "data": window.model_dump_json(exclude_none=True),
    }


def _quantiles(data: HistogramData, qs: tuple[float, ...]) -> list[float]:
    """:meth:`LatencyHistogram.quantile` read straight off the wire form (no dict built)."""
    gamma = (1 + data.a) / (1 - data.a)
    out = []
    for q in qs:
        rank = math.floor(q * (data.n - 1))
        value = 0.0
        if rank >= data.z:
            seen = data.z
            for offset, count in enumerate(data.c):
                seen += count
                if seen > rank:
                    value = 2 * gamma ** (data.o + offset) / (gamma + 1)
                    break
            lo = data.mn if data.mn is not None else 0.0
            hi = data.mx if data.mx is not None else value
            value = min(max(value, lo), hi)
        out.append(value)
    return out


def store_windows(store: Store, conn: Connection, rows: Sequence[Mapping[str, Any]],
                  now: float) -> int:
    """Insert window rows (duplicates skipped) and update the devices' counters; returns how
    many rows were new. The devices must exist (see ``registry.ensure_devices``)."""
    inserted = store.insert_ignore(conn, windows, rows, ["device_id", "seq"],
                                   returning=("device_id", "dropped"))
    per_device: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row in cast("list[tuple[str, int]]", inserted):
        per_device[row[0]][0] += 1
        per_device[row[0]][1] += int(row[1])
    seen = {row["device_id"] for row in rows}
    updates = [{"d": d, "n": per_device[d][0] if d in per_device else 0,
                "x": per_device[d][1] if d in per_device else 0} for d in sorted(seen)]
    if updates:
        conn.execute(
            sa.update(devices)
            .where(devices.c.device_id == sa.bindparam("d"))
            .values(windows_stored=devices.c.windows_stored + sa.bindparam("n"),
                    dropped_total=devices.c.dropped_total + sa.bindparam("x"),
                    last_seen=store.greatest(devices.c.last_seen, now)),
            updates,
        )
    return len(inserted)


def advance_acks(store: Store, floors: Mapping[str, int]) -> dict[str, int]:
    """Move each device's acked sequence over what is stored; returns the new value per device.

    ``floors`` maps device → the lowest sequence number the device still holds (1 if unknown).
    The stored sequence numbers above each device's ack are read for up to :data:`_ACK_GROUP`
    devices per query (a query per device cost PostgreSQL a round trip each: with thousands of
    devices in a group, most of the ingestion time).
    """
    if not floors:
        return {}
    result: dict[str, int] = {}
    with store.write() as conn:
        current = dict(conn.execute(sa.select(devices.c.device_id, devices.c.acked_seq)
                                    .where(devices.c.device_id.in_(list(floors)))).all())
        starts = {d: max(int(current.get(d, 0)), floor - 1) for d, floor in floors.items()}
        tops = _contiguous_tops(conn, starts)
        changed = []  # in key order: the rows are locked in the order other writers use
        for device_id in sorted(floors):
            top = result[device_id] = tops[device_id]
            if top > int(current.get(device_id, 0)):
                changed.append({"d": device_id, "s": top})
        if changed:
            conn.execute(sa.update(devices)
                         .where(devices.c.device_id == sa.bindparam("d"))
                         .values(acked_seq=store.greatest(devices.c.acked_seq, sa.bindparam("s"))),
                         changed)
    return result


# PostgreSQL: every device of a group in one statement of two arrays (one plan, nothing for
# SQLAlchemy to compile per call; the OR of 200 terms below cost the workers more than the
# database did)
_RUNS_PG = sa.text(
    "SELECT w.device_id, w.seq FROM windows w "
    "JOIN unnest(CAST(:ids AS text[]), CAST(:starts AS bigint[])) AS q(d, s) "
    "ON w.device_id = q.d AND w.seq > q.s AND w.seq <= q.s + :scan "
    "ORDER BY w.device_id, w.seq")


def _contiguous_tops(conn: Connection, starts: Mapping[str, int]) -> dict[str, int]:
    """For each device, the highest sequence number stored contiguously above its start."""
    tops = dict(starts)
    order = sorted(starts)
    postgres = conn.dialect.name == "postgresql"
    for i in range(0, len(order), _ACK_GROUP):  # at most _ACK_GROUP x _ACK_SCAN rows a query
        group = order[i:i + _ACK_GROUP]
        if postgres:
            rows = conn.execute(_RUNS_PG, {"ids": group, "starts": [starts[d] for d in group],
                                           "scan": _ACK_SCAN}).all()
        else:
            rows = conn.execute(
                sa.select(windows.c.device_id, windows.c.seq)
                .where(sa.or_(*(sa.and_(windows.c.device_id == d, windows.c.seq > starts[d],
                                        windows.c.seq <= starts[d] + _ACK_SCAN)
                                for d in group)))
                .order_by(windows.c.device_id, windows.c.seq)).all()
        for device_id, seq in rows:  # in order: a device's run ends at its first gap
            if seq == tops[device_id] + 1:
                tops[device_id] = seq
        for device_id in group:  # a run as long as one scan goes on (a long backlog)
            if tops[device_id] == starts[device_id] + _ACK_SCAN:
                tops[device_id] = _contiguous_from(conn, device_id, tops[device_id])
    return tops


def _contiguous_from(conn: Connection, device_id: str, start: int) -> int:
    top = start
    while True:
        seqs = conn.execute(sa.select(windows.c.seq)
                            .where(windows.c.device_id == device_id, windows.c.seq > top)
                            .order_by(windows.c.seq).limit(_ACK_SCAN)).scalars().all()
        for seq in seqs:
            if seq != top + 1:
                return top
            top = seq
        if len(seqs) < _ACK_SCAN:
            return top


@dataclass(frozen=True)
class StoredWindow:
    """A stored window for listings: the scalar columns plus the device's full JSON."""

    device_id: str
    seq: int
    model: str | None
    version: str | None
    start: float
    end: float
    requests: int
    errors: int
    dropped: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    drift_psi: float | None
    received: float
    data: str

    def to_dict(self, with_data: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "device_id": self.device_id, "seq": self.seq, "model": self.model,
            "version": self.version, "start": self.start, "end": self.end,
            "requests": self.requests, "errors": self.errors, "dropped": self.dropped,
            "latency_p50_ms": self.latency_p50_ms, "latency_p95_ms": self.latency_p95_ms,
            "drift_psi": self.drift_psi, "received": self.received,
        }
        if with_data:
            import json

            out["window"] = json.loads(self.data)
        return out


def query_windows(store: Store, *, device: str | None = None, model: str | None = None,
                  version: str | None = None, since: float | None = None,
                  until: float | None = None, health: bool | None = None,
                  limit: int | None = 1000, newest_first: bool = False) -> list[StoredWindow]:
    """Windows matching every given filter, by window start then device and seq.

    ``health=True`` selects device-health windows only (no model), ``False`` model windows only.
    """
    query = sa.select(windows)
    conditions: list[sa.ColumnElement[bool]] = []
    if device is not None:
        conditions.append(windows.c.device_id == device)
    if model is not None:
        conditions.append(windows.c.model == model)
    if version is not None:
        conditions.append(windows.c.version == version)
    if since is not None:
        conditions.append(windows.c.window_end >= since)
    if until is not None:
        conditions.append(windows.c.window_start < until)
    if health is not None:
        conditions.append(windows.c.model.is_(None) if health else windows.c.model.is_not(None))
    if conditions:
        query = query.where(*conditions)
    order: Iterable[Any] = (windows.c.window_start, windows.c.device_id, windows.c.seq)
    query = query.order_by(*(c.desc() for c in order) if newest_first else order)
    if limit is not None:
        query = query.limit(limit)
    with store.read() as conn:
        return [_stored(row) for row in conn.execute(query)]


def _stored(row: sa.Row[Any]) -> StoredWindow:
    m = row._mapping
    return StoredWindow(
        device_id=m["device_id"], seq=int(m["seq"]), model=m["model"], version=m["version"],
        start=m["window_start"], end=m["window_end"], requests=int(m["requests"]),
        errors=int(m["errors"]), dropped=int(m["dropped"]), latency_p50_ms=m["latency_p50_ms"],
        latency_p95_ms=m["latency_p95_ms"], drift_psi=m["drift_psi"], received=m["received"],
        data=m["data"])
