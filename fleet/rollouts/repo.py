"""Rollouts in the fleet store: specs, engine state, event history and queued operator actions."""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa

from edgeserve.errors import ConfigError, ModelNotFoundError

from ..store import Store
from ..tables import rollout_actions, rollout_events, rollouts
from .engine import TERMINAL, RolloutSpec, RolloutState, initial_state

__all__ = ["Action", "RolloutRecord", "Rollouts"]

Action = Literal["promote", "pause", "resume", "rollback"]


@dataclass(frozen=True)
class RolloutRecord:
    spec: RolloutSpec
    state: RolloutState
    created: float
    updated: float

    @property
    def id(self) -> str:
        return self.spec.id

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "model": self.spec.model, "version": self.spec.version,
                "strategy": self.spec.strategy, "phase": self.state.phase,
                "stage": self.state.stage + 1, "stages": self.spec.stages,
                "devices": len(self.state.assigned), "reason": self.state.reason,
                "failed_gate": self.state.failed_gate, "created": self.created,
                "updated": self.updated,
                "gates": [g.model_dump() for g in self.state.gate_results],
                "spec": self.spec.model_dump(mode="json")}


def _new_id(model: str, version: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]", "-", f"{model}-{version}")[:48]
    return f"{base}-{uuid.uuid4().hex[:6]}"


class Rollouts:
    def __init__(self, store: Store) -> None:
        self.store = store

    def create(self, spec_data: dict[str, Any], now: float | None = None) -> RolloutRecord:
        """Validate and store a new rollout; one running rollout per model at a time."""
        now = time.time() if now is None else now
        spec_data = {"id": _new_id(spec_data.get("model", "m"), spec_data.get("version", "v")),
                     **spec_data}
        try:
            spec = RolloutSpec.model_validate(spec_data)
        except ValueError as exc:
            raise ConfigError(f"invalid rollout: {exc}") from None
        busy = [r for r in self.find(active_only=True) if r.spec.model == spec.model]
        if busy:
            raise ConfigError(f"model {spec.model!r} already has rollout {busy[0].id} "
                              f"({busy[0].state.phase}); finish, roll back or wait for it first")
        state = initial_state(spec, now)
        with self.store.write() as conn:
            conn.execute(sa.insert(rollouts).values(
                id=spec.id, model=spec.model, version=spec.version, strategy=spec.strategy,
                phase=state.phase, spec=spec.model_dump_json(), state=state.model_dump_json(),
                reason=None, created=now, updated=now))
        self.add_event(spec.id, now, 0, "created", state.history[-1].detail, {})
        return RolloutRecord(spec, state, now, now)

    def _record(self, row: Any) -> RolloutRecord:
        return RolloutRecord(RolloutSpec.model_validate_json(row.spec),
                             RolloutState.model_validate_json(row.state), row.created, row.updated)

    def get(self, rollout_id: str) -> RolloutRecord:
        with self.store.read() as conn:
            row = conn.execute(sa.select(rollouts).where(rollouts.c.id == rollout_id)).first()
            if row is None:
                like = conn.execute(sa.select(rollouts).where(
                    rollouts.c.id.like(f"{rollout_id}%"))).all()
                if len(like) == 1:
                    row = like[0]
        if row is None:
            raise ModelNotFoundError(f"no rollout {rollout_id!r}; 'edgeserve fleet rollout list' "
                                     "shows them")
        return self._record(row)

    def find(self, active_only: bool = False, model: str | None = None) -> list[RolloutRecord]:
        query = sa.select(rollouts).order_by(rollouts.c.created)
        if active_only:
            query = query.where(rollouts.c.phase.not_in(sorted(TERMINAL)))
        if model is not None:
            query = query.where(rollouts.c.model == model)
        with self.store.read() as conn:
            return [self._record(row) for row in conn.execute(query)]

    def save(self, record: RolloutRecord, state: RolloutState, now: float) -> RolloutRecord:
        with self.store.write() as conn:
            conn.execute(sa.update(rollouts).where(rollouts.c.id == record.id).values(
                phase=state.phase, state=state.model_dump_json(), reason=state.reason,
                updated=now))
        return RolloutRecord(record.spec, state, record.created, now)

    def add_event(self, rollout_id: str, ts: float, stage: int, event: str, detail: str,
                  data: dict[str, Any]) -> None:
        with self.store.write() as conn:
            conn.execute(sa.insert(rollout_events).values(
                rollout_id=rollout_id, ts=ts, stage=stage, event=event, detail=detail[:4000],
                data=json.dumps(data, default=str)))

    def events(self, rollout_id: str, limit: int = 500) -> list[dict[str, Any]]:
        query = (sa.select(rollout_events).where(rollout_events.c.rollout_id == rollout_id)
                 .order_by(rollout_events.c.id.desc()).limit(limit))
        with self.store.read() as conn:
            rows = list(conn.execute(query))
        return [{"ts": r.ts, "stage": r.stage + 1, "event": r.event, "detail": r.detail,
                 "data": json.loads(r.data)} for r in reversed(rows)]

    def queue_action(self, rollout_id: str, action: Action, reason: str = "") -> RolloutRecord:
        record = self.get(rollout_id)
        if record.state.done:
            raise ConfigError(f"rollout {record.id} is already {record.state.phase}")
        with self.store.write() as conn:
            conn.execute(sa.insert(rollout_actions).values(
                rollout_id=record.id, action=action, reason=reason, created=time.time(),
                done=None))
        return record

    def take_actions(self) -> list[tuple[str, Action, str, float]]:
        """Pending operator actions, oldest first, marked done as they are handed out."""
        with self.store.write() as conn:
            rows = conn.execute(sa.select(rollout_actions).where(rollout_actions.c.done.is_(None))
                                .order_by(rollout_actions.c.id)).all()
            if rows:
                conn.execute(sa.update(rollout_actions)
                             .where(rollout_actions.c.id.in_([r.id for r in rows]))
                             .values(done=time.time()))
        return [(r.rollout_id, r.action, r.reason, r.created) for r in rows]
