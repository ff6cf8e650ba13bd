"""An experiment's status as one JSON-ready dict: what ``experiment status``, the API and the
dashboard show.

The shape the dashboard renders: ``{id, state, kind, model, metric, result, arms: [{version, n,
mean, ci: [lo, hi], weight}]}``; extended with the plan (power-calculation sample size), the
comparisons against the control, the decision, bandit figures (probability of being best,
regret against a uniform split), per-group arms, and windows whose feedback was rejected.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from .analysis import ab_decision, arm_estimate, compare, p_best, regret
from .collect import ArmData, Collected
from .engine import bandit_winner, horizon_reached
from .repo import ExperimentRecord
from .spec import ExperimentSpec, plan

__all__ = ["build_report", "pooled_weights"]


def pooled_weights(spec: ExperimentSpec, weights: Mapping[str, Mapping[str, float]],
                   device_groups: Mapping[str, str]) -> dict[str, float]:
    """The fleet-wide share of traffic per arm: group weights averaged over devices."""
    if not weights:
        return spec.initial_weights()
    sizes = Counter(device_groups.values())
    devices = {g: sizes.get(g, 0) for g in weights}
    if not sum(devices.values()):
        devices = dict.fromkeys(weights, 1)
    total = sum(devices.values())
    return {v: sum(devices[g] * weights[g].get(v, 0.0) for g in weights) / total
            for v in spec.arms}


def _arms(spec: ExperimentSpec, arms: Mapping[str, ArmData],
          weights: Mapping[str, float]) -> list[dict[str, Any]]:
    rows = []
    for version in spec.arms:
        data = arms.get(version, ArmData())
        n, mean, ci = arm_estimate(spec, data)
        rows.append({"version": version, "n": n, "mean": mean,
                     "ci": list(ci) if ci is not None else None,
                     "weight": weights.get(version), "requests": data.requests,
                     "feedback": data.feedback, "control": version == spec.control})
    return rows


def _comparisons(spec: ExperimentSpec, arms: Mapping[str, ArmData]) -> list[dict[str, Any]]:
    alpha = spec.alpha / (len(spec.arms) - 1)
    out = []
    for version in spec.arms:
        if version == spec.control:
            continue
        c = compare(spec, arms[spec.control], arms[version], alpha)
        out.append({"version": version, "vs": spec.control,
                    **(c.to_dict() if c is not None else {"difference": None})})
    return out


def _ab(spec: ExperimentSpec, record: ExperimentRecord, pooled: dict[str, ArmData],
        report: dict[str, Any]) -> None:
    state = record.state
    report["comparisons"] = _comparisons(spec, pooled)
    report["interim"] = state.decision is None
    if state.decision is not None:
        samples = ", ".join(f"{v} {n}" for v, n in state.decision.samples.items())
        report["winner"] = state.decision.winner
        report["decision"] = state.decision.model_dump()
        report["result"] = f"{state.decision.detail} [decided at {samples} samples]"
        return
    least = min(a.samples(spec.metric) for a in pooled.values())
    report["result"] = (f"collecting: {least}/{spec.min_samples} samples in the smallest arm; "
                        "fixed horizon, no decision before")
    if horizon_reached(spec, pooled):  # the controller decides on its next tick
        winner, detail, _ = ab_decision(spec, pooled)
        report["winner"], report["result"] = winner, detail


def _bandit(spec: ExperimentSpec, collected: Collected, pooled: dict[str, ArmData],
            weights: Mapping[str, Mapping[str, float]], report: dict[str, Any]) -> None:
    lost, uniform = regret(spec, pooled)
    probabilities = p_best(spec, pooled, seed=0)
    winner, why = bandit_winner(spec, pooled)
    best = max(probabilities, key=lambda v: probabilities[v])
    report.update(regret=lost, uniform_regret=uniform, p_best=probabilities, winner=winner)
    report["result"] = (f"{why}; regret {lost:.1f} vs {uniform:.1f} for a uniform split"
                        if pooled[best].samples(spec.metric) else "waiting for feedback")
    if spec.group_by is not None:
        report["groups"] = [{"group": g, "arms": _arms(spec, arms, weights.get(g, {}))}
                            for g, arms in sorted(collected.groups.items())]


def build_report(record: ExperimentRecord, collected: Collected,
                 device_groups: Mapping[str, str], now: float) -> dict[str, Any]:
    """The status of ``record`` given the evidence (see the module docstring for the shape)."""
    spec, state = record.spec, record.state
    pooled = collected.pooled() if collected.groups else {v: ArmData() for v in spec.arms}
    weights = pooled_weights(spec, state.weights, device_groups)
    report: dict[str, Any] = {
        "id": spec.id, "state": state.phase, "kind": spec.kind, "model": spec.model,
        "metric": spec.metric, "binary": spec.binary, "started": state.started, "updated": now,
        "devices": len(device_groups), "group_by": spec.group_by,
        "arms": _arms(spec, pooled, weights), "weights": state.weights,
        "plan": plan(spec).model_dump(), "min_samples": spec.min_samples, "mde": spec.mde,
        "horizon_reached": horizon_reached(spec, pooled), "winner": None,
        "pushes": state.pushes, "last_push": state.last_push or None,
        "rejected": {"windows": collected.rejected, "reason": collected.rejected_reason},
        "rollout": state.rollout, "reason": state.reason, "stopped": state.stopped,
        "selector": spec.selector.model_dump(),
    }
    if spec.kind == "ab":
        _ab(spec, record, pooled, report)
    else:
        _bandit(spec, collected, pooled, state.weights, report)
    if state.done:
        report["result"] = f"stopped: {state.reason or 'by operator'} — {report['result']}"
    elif state.blocked:
        report["result"] = f"not pushing ({state.blocked}) — {report['result']}"
    report["blocked"] = state.blocked
    return report
