"""The fleet's event log, read from what the store keeps anyway: no second bookkeeping.

Two sources, merged in time order:

* ``rollout`` events: the ``rollout_events`` table the controller writes (created, assigned,
  stage, awaiting-promotion, paused, resumed, device-failed, rolling-back, rolled-back,
  switched, completed), each with its rollout, model and version. The controller also writes a
  ``gates`` row every couple of seconds with the gate values (the dashboard's charts); those
  are left out unless asked for.
* ``device`` events: the latest report of each device per model (``device_models``) when it
  says how an update ended - ``committed`` (passed its health check), ``rolled-back`` or
  ``unhealthy`` (health failures), ``failed`` (delivery or verification) - stamped with the
  time that report arrived.
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa

from .store import Store
from .tables import device_models, rollout_events, rollouts

__all__ = ["DEVICE_OUTCOMES", "fleet_events", "rollout_history"]

DEVICE_OUTCOMES = ("committed", "rolled-back", "unhealthy", "failed")


def _history_row(row: Any) -> dict[str, Any]:
    return {"ts": row.ts, "stage": row.stage + 1, "event": row.event, "detail": row.detail,
            "data": json.loads(row.data)}


def rollout_history(store: Store, rollout_id: str, gate_ticks: int = 50) -> list[dict[str, Any]]:
    """Every milestone of one rollout, plus its newest ``gate_ticks`` ``gates`` rows, in order
    (the shape of :meth:`~.rollouts.repo.Rollouts.events`)."""
    events = rollout_events.c
    milestones = (sa.select(rollout_events).where(events.rollout_id == rollout_id,
                                                  events.event != "gates"))
    ticks = (sa.select(rollout_events).where(events.rollout_id == rollout_id,
                                             events.event == "gates")
             .order_by(events.id.desc()).limit(max(0, gate_ticks)))
    with store.read() as conn:
        rows = [*conn.execute(milestones), *conn.execute(ticks)]
    return [_history_row(r) for r in sorted(rows, key=lambda r: r.id)]


def _rollout_events(store: Store, since: float | None, model: str | None, rollout: str | None,
                    gates: bool, limit: int) -> list[dict[str, Any]]:
    e, r = rollout_events.c, rollouts.c
    query = (sa.select(e.ts, e.event, e.detail, e.stage, e.rollout_id, r.model, r.version)
             .select_from(rollout_events.join(rollouts, rollouts.c.id == e.rollout_id))
             .order_by(e.id.desc()).limit(limit))
    if not gates:
        query = query.where(e.event != "gates")
    if since is not None:
        query = query.where(e.ts >= since)
    if model is not None:
        query = query.where(r.model == model)
    if rollout is not None:
        query = query.where(e.rollout_id == rollout)
    with store.read() as conn:
        rows = list(conn.execute(query))
    out = []
    for row in rows:
        # device-failed rows say "DEVICE: error"; the device gets its own field
        device = row.detail.split(":", 1)[0] if row.event == "device-failed" else None
        out.append({"ts": row.ts, "source": "rollout", "event": row.event,
                    "rollout": row.rollout_id, "model": row.model, "version": row.version,
                    "device": device, "detail": row.detail, "stage": row.stage + 1})
    return out


def _device_events(store: Store, since: float | None, model: str | None, device: str | None,
                   limit: int) -> list[dict[str, Any]]:
    m = device_models.c
    query = (sa.select(m.device_id, m.model, m.active, m.target, m.state, m.error_message,
                       m.error_version, m.updated)
             .where(m.state.in_(DEVICE_OUTCOMES)).order_by(m.updated.desc()).limit(limit))
    if since is not None:
        query = query.where(m.updated >= since)
    if model is not None:
        query = query.where(m.model == model)
    if device is not None:
        query = query.where(m.device_id == device)
    with store.read() as conn:
        rows = list(conn.execute(query))
    return [{"ts": row.updated, "source": "device", "event": row.state, "rollout": None,
             "model": row.model,
             "version": row.active if row.state == "committed"
             else row.error_version or row.target,
             "device": row.device_id,
             "detail": row.error_message or ("passed its health check"
                                             if row.state == "committed" else ""),
             "stage": None}
            for row in rows]


def fleet_events(store: Store, *, since: float | None = None, model: str | None = None,
                 device: str | None = None, rollout: str | None = None, gates: bool = False,
                 limit: int = 100) -> list[dict[str, Any]]:
    """The newest ``limit`` events matching the filters, oldest first.

    ``device`` keeps that device's reports and the rollout events naming it; ``rollout`` keeps
    that rollout's events only."""
    found = _rollout_events(store, since, model, rollout, gates, limit)
    if device is not None:
        found = [e for e in found if e["device"] == device]
    if rollout is None:
        found += _device_events(store, since, model, device, limit)
    found.sort(key=lambda e: e["ts"])
    return found[-limit:]
