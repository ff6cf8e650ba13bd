"""The rollout engine: a pure state machine.

``step(spec, state, event) -> (state, commands)``. It reads nothing and writes nothing: the fleet
service gathers a :class:`Snapshot` (devices in scope, what each reports, the canary and control
cohorts' model health since the stage began), feeds it in as a :class:`Tick`, persists the new
state and carries out the :class:`SetDesired` commands. Fleet managers' actions (promote, pause,
resume, roll back) are events too. Being pure, every path is unit-tested without a broker.

Strategies:

* **canary** (staged): each stage moves a percentage of the devices in scope (at least
  ``min_devices``) to the new version; a stage ends after its soak (wall time *and* inferences)
  with every gate passing, and the next begins (or waits for ``promote`` when ``auto_promote`` is
  off). Any gate failing on enough evidence, or devices failing their on-device health check,
  rolls the whole rollout back: every device moved returns to the version it ran before.
* **blue-green**: the new version first runs as a *shadow* beside the active one on the devices
  of each stage (gates see shadow disagreement, latency and errors); after the last stage passes,
  every device switches over at once, keeping the old version as the shadow so switching back is
  instant; after a final soak the old version is dropped.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgeserve.contract import HealthPolicy
from edgeserve.errors import ConfigError

from .gates import CohortMetrics, GateResult, parse_gate

__all__ = [
    "Command",
    "DeviceView",
    "Event",
    "Pause",
    "Promote",
    "Resume",
    "Rollback",
    "RolloutSpec",
    "RolloutState",
    "SetDesired",
    "Snapshot",
    "Tick",
    "initial_state",
    "stage_size",
    "step",
]

Phase = Literal["running", "paused", "awaiting-promotion", "rolling-back", "rolled-back",
                "completed"]
TERMINAL: frozenset[str] = frozenset({"rolled-back", "completed"})
_HISTORY = 200


class Selector(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    profiles: list[str] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    devices: list[str] = Field(default_factory=list)


class RolloutSpec(BaseModel):
    """What a fleet manager asked for (immutable once created)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    model: str
    version: str
    strategy: Literal["canary", "blue-green"] = "canary"
    stages: list[float] = Field(default_factory=lambda: [1.0, 10.0, 50.0, 100.0])
    min_devices: int = Field(default=1, ge=1)
    soak_seconds: float = Field(default=300.0, ge=0)
    soak_inferences: int = Field(default=0, ge=0)
    gates: list[str] = Field(default_factory=lambda: ["error_rate<=0.01", "p95_ms<=1.5*control"])
    min_requests: int = Field(default=50, ge=0)
    auto_promote: bool = True
    silent_after_s: float = Field(default=600.0, gt=0)
    max_failed_devices: int = Field(default=0, ge=0)
    stage_timeout_s: float = Field(
        default=3600.0, gt=0,
        description="a stage that has not completed this long after it began (paused time not "
                    "counted) is rolled back, naming what it still waited for")
    shadow_sample_rate: float = Field(default=1.0, gt=0, le=1)
    selector: Selector = Field(default_factory=Selector)
    health: HealthPolicy = Field(default_factory=HealthPolicy,
                                 description="how each device decides to commit the version")

    @field_validator("stages")
    @classmethod
    def _stages(cls, stages: list[float]) -> list[float]:
        if not stages or any(not 0 < s <= 100 for s in stages):
            raise ValueError("stages are percentages in (0, 100]")
        if any(b <= a for a, b in itertools.pairwise(stages)):
            raise ValueError("stages must increase")
        if stages[-1] != 100:
            raise ValueError("the last stage must be 100 (percent)")
        return stages

    @field_validator("gates")
    @classmethod
    def _gates(cls, gates: list[str]) -> list[str]:
        for gate in gates:
            try:
                parse_gate(gate)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return gates


class DeviceView(BaseModel):
    """One device in scope, as the fleet sees it now."""

    model_config = ConfigDict(frozen=True)

    device_id: str
    online: bool = True
    last_seen: float = 0.0
    active: str | None = None
    shadow: str | None = None
    state: str = Field(default="idle", description="the device's update state for the model "
                                                   "(ModelReport.state); 'committed' = healthy")
    last_error: str | None = None
    error_version: str | None = None


class Snapshot(BaseModel):
    model_config = ConfigDict(frozen=True)

    now: float
    devices: list[DeviceView] = Field(default_factory=list)
    canary: CohortMetrics = Field(default_factory=CohortMetrics)
    control: CohortMetrics | None = None


class Tick(BaseModel):
    kind: Literal["tick"] = "tick"
    snapshot: Snapshot


class Promote(BaseModel):
    kind: Literal["promote"] = "promote"
    now: float


class Pause(BaseModel):
    kind: Literal["pause"] = "pause"
    now: float


class Resume(BaseModel):
    kind: Literal["resume"] = "resume"
    now: float


class Rollback(BaseModel):
    kind: Literal["rollback"] = "rollback"
    now: float
    reason: str = "rolled back by operator"


Event = Tick | Promote | Pause | Resume | Rollback


class SetDesired(BaseModel):
    """Make ``device_id`` run ``active`` (None: remove the model) with an optional shadow."""

    model_config = ConfigDict(frozen=True)

    device_id: str
    model: str
    active: str | None
    shadow: str | None = None


Command = SetDesired


class HistoryEntry(BaseModel):
    model_config = ConfigDict(frozen=True)
    ts: float
    stage: int
    event: str
    detail: str = ""


class RolloutState(BaseModel):
    """Everything the engine remembers between events (persisted as JSON by the service)."""

    phase: Phase = "running"
    paused_from: Phase | None = None
    stage: int = 0
    stage_started: float = 0.0
    stage_deadline: float | None = None
    paused_at: float | None = None
    bg_step: Literal["shadow", "switched"] = "shadow"
    assigned: dict[str, str | None] = Field(
        default_factory=dict, description="device -> version it ran before (as it reported "
                                          "it); a rollback returns it there, None removes the "
                                          "model the rollout brought")
    failed_devices: dict[str, str] = Field(default_factory=dict)
    reason: str | None = None
    failed_gate: str | None = None
    gate_results: list[GateResult] = Field(default_factory=list)
    baseline: CohortMetrics | None = Field(
        default=None, description="the control cohort as last measured; relative gates use it "
                                  "once every device in scope has moved (no control left)")
    history: list[HistoryEntry] = Field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.phase in TERMINAL


def initial_state(spec: RolloutSpec, now: float) -> RolloutState:
    state = RolloutState(stage_started=now, stage_deadline=now + spec.stage_timeout_s)
    _log(state, now, "created", f"{spec.strategy} rollout of {spec.model} {spec.version}, "
                                f"stages {spec.stages}")
    return state


def step(spec: RolloutSpec, state: RolloutState,
         event: Event) -> tuple[RolloutState, list[Command]]:
    """Apply one event; returns the new state and the desired-state changes to make."""
    state = state.model_copy(deep=True)
    if state.done:
        return state, []
    if isinstance(event, Tick):
        return state, _tick(spec, state, event.snapshot)
    if isinstance(event, Pause):
        if state.phase in ("running", "awaiting-promotion"):
            state.paused_from, state.phase = state.phase, "paused"
            state.paused_at = event.now
            _log(state, event.now, "paused")
        return state, []
    if isinstance(event, Resume):
        if state.phase == "paused":
            state.phase, state.paused_from = state.paused_from or "running", None
            if state.stage_deadline is not None and state.paused_at is not None:
                state.stage_deadline += max(0.0, event.now - state.paused_at)
            state.paused_at = None
            _log(state, event.now, "resumed")
        return state, []
    if isinstance(event, Promote):
        if state.phase in ("running", "awaiting-promotion", "paused"):
            return state, _advance(spec, state, event.now, "promoted by operator")
        return state, []
    if state.phase != "rolling-back":
        return state, _start_rollback(spec, state, event.now, event.reason, None)
    return state, []


# -- internals ------------------------------------------------------------------------------------

def _log(state: RolloutState, now: float, event: str, detail: str = "") -> None:
    state.history.append(HistoryEntry(ts=now, stage=state.stage, event=event, detail=detail))
    del state.history[:-_HISTORY]


def _order(spec: RolloutSpec, device_id: str) -> str:
    """A stable pseudo-random order, so stages spread over profiles and sites."""
    return hashlib.sha256(f"{spec.id}/{device_id}".encode()).hexdigest()


def stage_size(spec: RolloutSpec, stage: int, in_scope: int) -> int:
    """How many of ``in_scope`` devices stage ``stage`` (0-based) moves in all."""
    if in_scope == 0:
        return 0
    wanted = math.ceil(spec.stages[stage] / 100 * in_scope)
    return min(in_scope, max(spec.min_devices, wanted))


def _desired_for(spec: RolloutSpec, state: RolloutState, device_id: str) -> SetDesired:
    previous = state.assigned.get(device_id)
    if previous == spec.version:  # it ran the version already: it simply keeps it
        return SetDesired(device_id=device_id, model=spec.model, active=spec.version)
    # a device without the model has nothing to shadow: it simply gets the new version
    if spec.strategy == "blue-green" and state.bg_step == "shadow" and previous is not None:
        return SetDesired(device_id=device_id, model=spec.model, active=previous,
                          shadow=spec.version)
    if spec.strategy == "blue-green" and state.phase != "completed":
        return SetDesired(device_id=device_id, model=spec.model, active=spec.version,
                          shadow=previous)
    return SetDesired(device_id=device_id, model=spec.model, active=spec.version)


def _assign(spec: RolloutSpec, state: RolloutState, snap: Snapshot) -> list[Command]:
    target = stage_size(spec, state.stage, len(snap.devices))
    if len(state.assigned) >= target:
        return []
    candidates = [d for d in snap.devices if d.device_id not in state.assigned]
    # online devices first, then a stable spread
    candidates.sort(key=lambda d: (not d.online, _order(spec, d.device_id)))
    commands: list[Command] = []
    for device in candidates[: target - len(state.assigned)]:
        # what it runs now, as it reported it: a rollback returns it exactly there (a model it
        # already had, even this very version, is never removed by rolling back)
        state.assigned[device.device_id] = device.active
        commands.append(_desired_for(spec, state, device.device_id))
    _log(state, snap.now, "assigned", f"{len(commands)} device(s); {len(state.assigned)} of "
                                      f"{len(snap.devices)} now in the rollout")
    return commands


def _reachable(spec: RolloutSpec, snap: Snapshot) -> dict[str, DeviceView]:
    """Devices in scope that are online and not silent past the deadline."""
    return {d.device_id: d for d in snap.devices
            if d.online and snap.now - d.last_seen <= spec.silent_after_s}


def _converged(spec: RolloutSpec, state: RolloutState, snap: Snapshot) -> tuple[int, int]:
    """(done, expected) among reachable assigned devices; silent ones don't block a stage.

    Done means the device runs what it should *and* reports it committed: a device still under
    its on-device health check (or retrying a download) has not converged, so no stage ends, and
    no rollout completes, before its devices have passed."""
    reachable = _reachable(spec, snap)
    done = expected = 0
    for device_id in state.assigned:
        device = reachable.get(device_id)
        if device is None:
            continue
        expected += 1
        done += _device_done(spec, state, device)
    return done, expected


def _device_done(spec: RolloutSpec, state: RolloutState, device: DeviceView) -> bool:
    want = _desired_for(spec, state, device.device_id)
    return device.active == want.active and device.shadow == want.shadow \
        and device.state == "committed"


def _device_failures(spec: RolloutSpec, state: RolloutState, snap: Snapshot) -> None:
    for device in snap.devices:
        if device.device_id in state.assigned and device.error_version == spec.version \
                and device.last_error and device.device_id not in state.failed_devices:
            state.failed_devices[device.device_id] = device.last_error
            _log(state, snap.now, "device-failed", f"{device.device_id}: {device.last_error}")


def _tick(spec: RolloutSpec, state: RolloutState, snap: Snapshot) -> list[Command]:
    if state.phase == "paused":
        return []
    if state.phase == "rolling-back":
        done, expected = _reverted(spec, state, snap)
        if done >= expected:
            state.phase = "rolled-back"
            _log(state, snap.now, "rolled-back", state.reason or "")
        return []
    _device_failures(spec, state, snap)
    if len(state.failed_devices) > spec.max_failed_devices:
        device, error = next(iter(state.failed_devices.items()))
        return _start_rollback(spec, state, snap.now,
                               f"on-device health check failed on {len(state.failed_devices)} "
                               f"device(s), e.g. {device}: {error}", "device_health")
    if snap.control is not None and snap.control.requests:
        state.baseline = snap.control
    control = snap.control if snap.control is not None and snap.control.requests \
        else state.baseline
    state.gate_results = [parse_gate(g).evaluate(snap.canary, control, spec.min_requests)
                          for g in spec.gates]
    failed = next((r for r in state.gate_results if r.verdict == "fail"), None)
    if failed is not None:
        return _start_rollback(spec, state, snap.now, f"gate {failed.gate} failed: "
                                                      f"{failed.detail}", failed.gate)
    commands = _assign(spec, state, snap) if state.phase == "running" else []
    if state.phase == "running" and _stage_complete(spec, state, snap):
        if spec.auto_promote or (spec.strategy == "blue-green" and state.bg_step == "switched"):
            commands += _advance(spec, state, snap.now, "soak complete, all gates passed")
        else:
            state.phase = "awaiting-promotion"
            _log(state, snap.now, "awaiting-promotion", "soak complete, all gates passed")
    elif state.phase == "running" and state.stage_deadline is not None \
            and snap.now >= state.stage_deadline:
        return commands + _start_rollback(
            spec, state, snap.now, f"stage {state.stage + 1} did not complete within "
                                   f"{spec.stage_timeout_s:g} s: {_waiting_for(spec, state, snap)}",
            "stage_timeout")
    return commands


def _waiting_for(spec: RolloutSpec, state: RolloutState, snap: Snapshot) -> str:
    """What a stage still waits for, in words (for a timeout's reason)."""
    waiting = []
    done, expected = _converged(spec, state, snap)
    if done < expected or done == 0:
        reachable = _reachable(spec, snap)
        behind = [f"{d} ({reachable[d].state})" for d in state.assigned
                  if d in reachable and not _device_done(spec, state, reachable[d])]
        waiting.append(f"{done} of {expected} reachable device(s) committed the version"
                       + (f", e.g. {', '.join(behind[:3])}" if behind else ""))
    if snap.now - state.stage_started < spec.soak_seconds:
        waiting.append("the soak time")
    if snap.canary.requests < spec.soak_inferences:
        waiting.append(f"{snap.canary.requests} of {spec.soak_inferences} soak inferences")
    waiting += [f"gate {r.gate} pending ({r.detail})" for r in state.gate_results
                if r.verdict != "pass"]
    return "; ".join(waiting) or "nothing (it completes on the next tick)"


def _stage_complete(spec: RolloutSpec, state: RolloutState, snap: Snapshot) -> bool:
    if len(state.assigned) < stage_size(spec, state.stage, len(snap.devices)):
        return False
    done, expected = _converged(spec, state, snap)
    if done < expected or done == 0:
        return False
    if snap.now - state.stage_started < spec.soak_seconds:
        return False
    if snap.canary.requests < spec.soak_inferences:
        return False
    return all(r.verdict == "pass" for r in state.gate_results)


def _advance(spec: RolloutSpec, state: RolloutState, now: float, why: str) -> list[Command]:
    state.phase = "running"
    state.paused_from = None
    state.stage_deadline = now + spec.stage_timeout_s
    if state.stage + 1 < len(spec.stages):
        state.stage += 1
        state.stage_started = now
        _log(state, now, "stage", f"stage {state.stage + 1}/{len(spec.stages)} "
                                  f"({spec.stages[state.stage]:g}%): {why}")
        return []
    if spec.strategy == "blue-green" and state.bg_step == "shadow":
        state.bg_step = "switched"
        state.stage_started = now
        _log(state, now, "switched", f"all devices answer with {spec.version}; previous kept "
                                     f"as shadow: {why}")
        return [_desired_for(spec, state, d) for d in state.assigned]
    state.phase = "completed"
    _log(state, now, "completed", why)
    if spec.strategy == "blue-green":
        return [SetDesired(device_id=d, model=spec.model, active=spec.version)
                for d in state.assigned]
    return []


def _start_rollback(spec: RolloutSpec, state: RolloutState, now: float, reason: str,
                    gate: str | None) -> list[Command]:
    state.phase = "rolling-back"
    state.reason = reason
    state.failed_gate = gate
    _log(state, now, "rolling-back", reason)
    return [SetDesired(device_id=d, model=spec.model, active=previous)
            for d, previous in state.assigned.items()]


def _reverted(spec: RolloutSpec, state: RolloutState, snap: Snapshot) -> tuple[int, int]:
    """(done, expected) among reachable assigned devices: back on what they ran before."""
    reachable = _reachable(spec, snap)
    done = expected = 0
    for device_id, previous in state.assigned.items():
        device = reachable.get(device_id)
        if device is None:
            continue
        expected += 1
        if device.active == previous and (device.shadow != spec.version
                                          or previous == spec.version):
            done += 1
    return done, expected
