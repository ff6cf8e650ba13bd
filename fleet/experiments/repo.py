"""Experiments in the fleet store: specs, controller state and queued stop requests.

The CLI and the API create experiments and queue stops here; the experiment controller (inside
``edgeserve fleet serve``) carries them out, because only it writes desired state. One running
experiment per model at a time, and none while a rollout of that model runs (both would write
the model's desired state on the same devices).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa

from edgeserve.errors import ConfigError, ModelNotFoundError

from ..rollouts.repo import Rollouts
from ..store import Store
from ..tables import experiments
from .spec import ExperimentSpec, ExperimentState, plan

__all__ = ["ExperimentRecord", "Experiments", "StopRequest"]


@dataclass(frozen=True)
class StopRequest:
    """A queued stop; with ``promote`` the winner gets a rollout (``rollout``: spec overrides,
    e.g. stages or soak)."""

    promote: bool
    reason: str
    ts: float
    rollout: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExperimentRecord:
    spec: ExperimentSpec
    state: ExperimentState
    created: float
    updated: float
    stop_request: StopRequest | None = None

    @property
    def id(self) -> str:
        return self.spec.id


def _new_id(model: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]", "-", model)[:40]
    return f"exp-{base}-{uuid.uuid4().hex[:6]}"


def _stop_request(raw: str | None) -> StopRequest | None:
    if not raw:
        return None
    data = json.loads(raw)
    return StopRequest(bool(data.get("promote")), str(data.get("reason", "")),
                       float(data.get("ts", 0.0)), dict(data.get("rollout") or {}))


class Experiments:
    def __init__(self, store: Store) -> None:
        self.store = store

    def create(self, spec_data: dict[str, Any], now: float | None = None) -> ExperimentRecord:
        """Validate and store a new experiment (the controller starts it on its next tick)."""
        now = time.time() if now is None else now
        spec_data = {"id": _new_id(str(spec_data.get("model", "m"))), **spec_data}
        if spec_data.get("min_samples") is None:
            spec_data.pop("min_samples", None)
            if spec_data.get("mde") is not None:  # the fixed horizon from the power calculation
                planned = plan(_validate({**spec_data, "min_samples": 1})).samples_per_arm
                spec_data["min_samples"] = planned
        spec = _validate(spec_data)
        busy = self.find(active_only=True, model=spec.model)
        if busy:
            raise ConfigError(f"model {spec.model!r} already has experiment {busy[0].id} "
                              f"({busy[0].state.phase}); stop it first")
        rollouts = Rollouts(self.store).find(active_only=True, model=spec.model)
        if rollouts:
            raise ConfigError(f"model {spec.model!r} has rollout {rollouts[0].id} "
                              f"({rollouts[0].state.phase}); an experiment cannot start until "
                              "it is finished or rolled back")
        state = ExperimentState(started=now)
        with self.store.write() as conn:
            conn.execute(sa.insert(experiments).values(
                id=spec.id, model=spec.model, kind=spec.kind, phase=state.phase,
                spec=spec.model_dump_json(), state=state.model_dump_json(), stop_request=None,
                created=now, updated=now))
        return ExperimentRecord(spec, state, now, now)

    def _record(self, row: Any) -> ExperimentRecord:
        return ExperimentRecord(ExperimentSpec.model_validate_json(row.spec),
                                ExperimentState.model_validate_json(row.state), row.created,
                                row.updated, _stop_request(row.stop_request))

    def get(self, experiment_id: str) -> ExperimentRecord:
        """By id or a unique prefix of it."""
        with self.store.read() as conn:
            row = conn.execute(sa.select(experiments)
                               .where(experiments.c.id == experiment_id)).first()
            if row is None:
                like = conn.execute(sa.select(experiments).where(
                    experiments.c.id.like(f"{experiment_id}%"))).all()
                if len(like) == 1:
                    row = like[0]
        if row is None:
            raise ModelNotFoundError(f"no experiment {experiment_id!r}; 'edgeserve fleet "
                                     "experiment list --all' shows them")
        return self._record(row)

    def find(self, active_only: bool = False, model: str | None = None) -> list[ExperimentRecord]:
        query = sa.select(experiments).order_by(experiments.c.created)
        if active_only:
            query = query.where(experiments.c.phase != "stopped")
        if model is not None:
            query = query.where(experiments.c.model == model)
        with self.store.read() as conn:
            return [self._record(row) for row in conn.execute(query)]

    def save(self, record: ExperimentRecord, state: ExperimentState,
             now: float | None = None) -> ExperimentRecord:
        now = time.time() if now is None else now
        with self.store.write() as conn:
            conn.execute(sa.update(experiments).where(experiments.c.id == record.id).values(
                phase=state.phase, state=state.model_dump_json(), updated=now))
        return ExperimentRecord(record.spec, state, record.created, now, record.stop_request)

    def request_stop(self, experiment_id: str, promote: bool = False, reason: str = "",
                     rollout: dict[str, Any] | None = None) -> ExperimentRecord:
        """Queue a stop (and optionally the winner's promotion) for the controller."""
        record = self.get(experiment_id)
        if record.state.done:
            raise ConfigError(f"experiment {record.id} is already stopped")
        request = StopRequest(promote, reason, time.time(), dict(rollout or {}))
        with self.store.write() as conn:
            conn.execute(sa.update(experiments).where(experiments.c.id == record.id)
                         .values(stop_request=json.dumps(asdict(request))))
        return ExperimentRecord(record.spec, record.state, record.created, record.updated,
                                request)

    def clear_stop(self, experiment_id: str) -> None:
        with self.store.write() as conn:
            conn.execute(sa.update(experiments).where(experiments.c.id == experiment_id)
                         .values(stop_request=None))


def _validate(data: dict[str, Any]) -> ExperimentSpec:
    try:
        return ExperimentSpec.model_validate(data)
    except ValueError as exc:
        raise ConfigError(f"invalid experiment: {_first_error(exc)}") from None


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = str(first.get("msg", exc)).removeprefix("Value error, ")
        return f"{where}: {message}" if where else message
    return str(exc)
