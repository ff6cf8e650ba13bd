"""The experiment engine: state + evidence → new state (weights to push, the A/B decision).

Pure like the rollout engine: the controller collects the evidence (:func:`~.collect.collect`),
calls :func:`advance`, persists the state and writes desired state so that every device in
scope carries the weights of its group.

* A/B: the weights are the spec's split, always. Once every arm has ``min_samples`` the test is
  run once (:func:`~.analysis.ab_decision`) and the phase becomes ``decided``; the split stays
  until the experiment is stopped, and later samples change nothing (fixed horizon).
* Bandit: Thompson weights per group, recomputed from all the evidence, pushed at most once per
  ``push_every_s`` (a group seen for the first time gets weights at once) and only when some arm's
  weight moved by more than :data:`MIN_CHANGE` (Monte Carlo noise is not worth a push).
"""

from __future__ import annotations

from collections.abc import Mapping

from .analysis import ab_decision, bandit_weights, p_best
from .collect import ArmData, Collected
from .spec import ALL, Decision, ExperimentSpec, ExperimentState

__all__ = ["MIN_CHANGE", "advance", "bandit_winner", "horizon_reached"]

MIN_CHANGE = 0.01


def horizon_reached(spec: ExperimentSpec, arms: Mapping[str, ArmData]) -> bool:
    return all(arms[v].samples(spec.metric) >= spec.min_samples for v in spec.arms)


def bandit_winner(spec: ExperimentSpec, arms: Mapping[str, ArmData],
                  seed: int | None = 0) -> tuple[str | None, str]:
    """The arm to promote when a bandit stops: the likely best one, if the evidence is strong
    (posterior probability of being best >= 1 - alpha, and at least ``min_samples``)."""
    probabilities = p_best(spec, arms, seed)
    best = max(probabilities, key=lambda v: probabilities[v])
    p, n = probabilities[best], arms[best].samples(spec.metric)
    if p >= 1 - spec.alpha and n >= spec.min_samples:
        return best, f"{best} is best with probability {p:.3f} ({n} samples)"
    return None, (f"no clear winner: {best} leads with probability {p:.3f} (needs "
                  f"{1 - spec.alpha:.3g}) on {n} samples (needs {spec.min_samples})")


def _changed(old: Mapping[str, Mapping[str, float]], new: Mapping[str, Mapping[str, float]],
             tolerance: float) -> bool:
    if set(old) != set(new):
        return True
    return any(set(old[g]) != set(new[g])
               or any(abs(old[g][v] - new[g][v]) > tolerance for v in new[g]) for g in new)


def _samples(spec: ExperimentSpec, collected: Collected) -> int:
    return sum(a.samples(spec.metric) for arms in collected.groups.values()
               for a in arms.values())


def advance(spec: ExperimentSpec, state: ExperimentState, collected: Collected, now: float,
            seed: int | None = None) -> tuple[ExperimentState, bool]:
    """The next state, and whether the weights changed (devices need new desired state)."""
    state = state.model_copy(deep=True)
    if state.done:
        return state, False
    groups = collected.groups or ({ALL: {v: ArmData() for v in spec.arms}}
                                  if spec.group_by is None else {})
    if spec.kind == "ab":
        want = {g: spec.initial_weights() for g in groups}
        changed = _changed(state.weights, want, 1e-9)
        pooled = collected.pooled() if collected.groups else groups.get(ALL, {})
        if state.phase == "running" and pooled and horizon_reached(spec, pooled):
            winner, detail, _ = ab_decision(spec, pooled)
            state.decision = Decision(ts=now, winner=winner, detail=detail, samples={
                v: pooled[v].samples(spec.metric) for v in spec.arms})
            state.phase = "decided"
    else:
        due = state.pushes == 0 or now - state.last_push >= spec.push_every_s
        want = {g: (bandit_weights(spec, arms, seed) if due or g not in state.weights
                    else state.weights[g]) for g, arms in groups.items()}
        changed = _changed(state.weights, want, MIN_CHANGE)
    if changed:
        state.record_push(now, want, _samples(spec, collected))
    return state, changed
