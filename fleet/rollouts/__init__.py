"""Rollouts: gates over cohort model health and the pure rollout state machine."""

from __future__ import annotations

from .engine import (
    Command,
    DeviceView,
    Event,
    Pause,
    Promote,
    Resume,
    Rollback,
    RolloutSpec,
    RolloutState,
    SetDesired,
    Snapshot,
    Tick,
    initial_state,
    step,
)
from .gates import METRICS, CohortMetrics, Gate, GateResult, parse_gate

__all__ = [
    "METRICS",
    "CohortMetrics",
    "Command",
    "DeviceView",
    "Event",
    "Gate",
    "GateResult",
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
    "parse_gate",
    "step",
]
