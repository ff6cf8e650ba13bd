"""The experiment controller: the I/O around the pure experiment engine.

Once per tick, for every experiment that is not stopped, it (1) carries out a queued stop, or
(2) brings the evidence up to date from the stored windows (:class:`~.collect.Evidence`: only
what arrived since the previous tick is read), advances the engine (A/B decision, bandit
weights), writes desired state so that every device in scope carries its group's weights — a
new device, or one whose desired state someone else changed, is brought back in line on the
next tick — and stores the state with a fresh status report (what the dashboard reads).

Desired revisions are published retained by the rollout controller; ``publish`` (its
``publish_pending``) is called right after a push so devices see new weights within the tick.

While a rollout of the same model runs (one created by hand; ``create`` refuses to start an
experiment during one) the controller writes no desired state for it and says so in the status.

Stopping removes the split from every device of the model (each keeps its active version); with
``promote`` the winner — the A/B decision's, or for a bandit the arm that is best with
probability >= 1 - alpha — is handed to the rollout engine as a new staged rollout.

One controller runs per fleet: on PostgreSQL it holds an advisory lock for its lifetime.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa

from edgeserve.contract import DesiredModel
from edgeserve.errors import EdgeserveError

from ..artifacts import ArtifactStore
from ..desired import DesiredStates
from ..leader import LeaderLoop
from ..rollouts.repo import Rollouts
from ..store import Store
from ..tables import device_models
from .collect import Collected, Evidence, collect
from .engine import advance, bandit_winner
from .repo import ExperimentRecord, Experiments, StopRequest
from .report import build_report
from .scope import device_groups
from .spec import Decision, ExperimentSpec, ExperimentState

__all__ = ["ExperimentController", "reports", "status"]

log = logging.getLogger(__name__)


def _same(traffic: Mapping[str, float], weights: Mapping[str, float]) -> bool:
    return set(traffic) == set(weights) and all(abs(traffic[v] - weights[v]) <= 1e-9
                                                for v in weights)


def status(store: Store, record: ExperimentRecord, now: float | None = None) -> dict[str, Any]:
    """A fresh status report (the stored one for a stopped experiment)."""
    now = time.time() if now is None else now
    if record.state.done and record.state.report is not None:
        return record.state.report
    groups = device_groups(store, record.spec)
    evidence = collect(store, record.spec, record.state.joined, groups)
    return build_report(record, evidence, groups, now)


def reports(store: Store, stopped: int = 5) -> list[dict[str, Any]]:
    """Status of every running experiment and the last ``stopped`` stopped ones (the API's
    ``GET /api/v1/experiments``): the controller's stored report, computed here when missing."""
    records = Experiments(store).find()
    running = [r for r in records if not r.state.done]
    done = [r for r in records if r.state.done][-stopped:] if stopped else []
    return [r.state.report if r.state.report is not None else status(store, r)
            for r in running + done]


class ExperimentController:
    def __init__(self, store: Store, artifacts: ArtifactStore, public_url: str, fleet: str,
                 tick_s: float = 1.0, publish: Callable[[], int] | None = None,
                 seed: int | None = None) -> None:
        self.store = store
        self.fleet = fleet
        self.desired = DesiredStates(store, artifacts, public_url)
        self.experiments = Experiments(store)
        self.tick_s = tick_s
        self.publish = publish
        self.seed = seed
        self._loop = LeaderLoop(store, "edgeserve-experiments", fleet, self.tick, tick_s)
        self._evidence: dict[str, Evidence] = {}  # per running experiment, kept up to date

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> ExperimentController:
        self._loop.start()
        return self

    def stop(self) -> None:
        self._loop.stop()

    # -- one tick ---------------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> int:
        """Advance every experiment once; returns the number of desired-state writes."""
        now = time.time() if now is None else now
        writes = 0
        records = self.experiments.find(active_only=True)
        for gone in self._evidence.keys() - {r.id for r in records}:
            del self._evidence[gone]
        for record in records:
            try:
                writes += self._step(record, now)
            except EdgeserveError as exc:
                log.error("experiment %s: %s", record.id, exc)
        if writes and self.publish is not None:
            self.publish()
        return writes

    def _step(self, record: ExperimentRecord, now: float) -> int:
        spec = record.spec
        groups = device_groups(self.store, spec)
        joined = self._joined(spec, record.state, groups, now)
        tracker = self._evidence.get(record.id)
        if tracker is None:
            tracker = self._evidence[record.id] = Evidence(spec)
        evidence = tracker.update(self.store, joined.joined, groups)
        state, _ = advance(spec, joined, evidence, now, self.seed)
        if record.stop_request is not None:  # after advance: an A/B test at its horizon decides
            return self._finish(record_with(record, state), record.stop_request, groups,
                                evidence, now)
        rollouts = Rollouts(self.store).find(active_only=True, model=spec.model)
        # a rollout of the model owns its desired state until it ends: no tug of war
        state.blocked = f"rollout {rollouts[0].id} of {spec.model} is running" if rollouts \
            else None
        writes = 0 if rollouts else self._sync(spec, state, groups)
        state.report = build_report(record_with(record, state), evidence, groups, now)
        self.experiments.save(record, state, now)
        return writes

    def _joined(self, spec: ExperimentSpec, state: ExperimentState, groups: Mapping[str, str],
                now: float) -> ExperimentState:
        """Note devices that now report the split applied (their evidence counts from now)."""
        waiting = [d for d in groups if d not in state.joined]
        if not waiting:
            return state
        with self.store.read() as conn:
            rows = conn.execute(sa.select(device_models.c.device_id, device_models.c.traffic)
                                .where(device_models.c.model == spec.model,
                                       device_models.c.device_id.in_(waiting))).all()
        arrived = {r.device_id for r in rows if set(json.loads(r.traffic or "{}")) == set(spec.arms)}
        if not arrived:
            return state
        return state.model_copy(update={"joined": {**state.joined,
                                                   **dict.fromkeys(sorted(arrived), now)}})

    def _reported_active(self, model: str) -> dict[str, str | None]:
        with self.store.read() as conn:
            return {r.device_id: r.active for r in conn.execute(
                sa.select(device_models.c.device_id, device_models.c.active)
                .where(device_models.c.model == model))}

    def _sync(self, spec: ExperimentSpec, state: ExperimentState,
              groups: Mapping[str, str]) -> int:
        """Make every device's desired traffic for the model equal its group's weights."""
        current = dict(self.desired.all())
        reported = self._reported_active(spec.model)
        writes = 0
        for device_id, group in sorted(groups.items()):
            weights = state.weights.get(group)
            desired = current.get(device_id)
            model = desired.models.get(spec.model) if desired is not None else None
            if not weights or (model is not None and _same(model.traffic, weights)):
                continue
            active = next((v for v in (model.active if model else None,
                                       reported.get(device_id)) if v in spec.arms),
                          spec.control)
            self.desired.set_model(device_id, spec.model, active, traffic=weights,
                                   health=model.health if model is not None else None)
            writes += 1
        return writes + self._clear(spec, current, keep=groups)

    def _clear(self, spec: ExperimentSpec, current: Mapping[str, Any],
               keep: Mapping[str, str]) -> int:
        """Remove the model's split from devices outside ``keep`` (each keeps its active)."""
        writes = 0
        for device_id, desired in sorted(current.items()):
            model: DesiredModel | None = desired.models.get(spec.model)
            if device_id in keep or model is None or not model.traffic:
                continue
            self.desired.set_model(device_id, spec.model, model.active,
                                   shadow=model.shadow.version if model.shadow else None,
                                   shadow_rate=model.shadow.sample_rate if model.shadow else 1.0,
                                   traffic=None, health=model.health)
            writes += 1
        return writes

    def _winner(self, record: ExperimentRecord, evidence: Collected) -> tuple[str | None, str]:
        state, spec = record.state, record.spec
        if spec.kind == "bandit":
            return bandit_winner(spec, evidence.pooled() if evidence.groups else {})
        if state.decision is None:
            return None, "the A/B test has not reached its horizon (no decision yet)"
        return state.decision.winner, state.decision.detail

    def _finish(self, record: ExperimentRecord, request: StopRequest,
                groups: Mapping[str, str], evidence: Collected, now: float) -> int:
        spec = record.spec
        state = record.state.model_copy(deep=True)
        winner, why = self._winner(record, evidence) if evidence.groups else (None, "no data")
        writes = self._clear(spec, dict(self.desired.all()), keep={})
        reason = request.reason or "stopped by operator"
        if request.promote:
            reason += "; " + self._promote(spec, state, winner, why, request)
        if spec.kind == "bandit":
            state.decision = Decision(ts=now, winner=winner, detail=why, samples={
                v: a.samples(spec.metric) for v, a in evidence.pooled().items()})
        state.phase, state.stopped, state.reason = "stopped", now, reason
        state.report = build_report(record_with(record, state), evidence, groups, now)
        self.experiments.save(record, state, now)
        self.experiments.clear_stop(record.id)
        log.info("experiment %s stopped: %s", record.id, reason)
        return writes

    def _promote(self, spec: ExperimentSpec, state: ExperimentState, winner: str | None,
                 why: str, request: StopRequest) -> str:
        if winner is None:
            return f"nothing promoted: {why}"
        try:
            rollout = Rollouts(self.store).create({
                "model": spec.model, "version": winner,
                "selector": spec.selector.model_dump(), **request.rollout})
        except EdgeserveError as exc:
            return f"promoting {winner} failed: {exc}"
        state.rollout = rollout.id
        return f"promoting {winner} with rollout {rollout.id} ({why})"


def record_with(record: ExperimentRecord, state: ExperimentState) -> ExperimentRecord:
    return ExperimentRecord(record.spec, state, record.created, record.updated,
                            record.stop_request)
