"""What an experiment is (its immutable spec) and what the controller remembers (its state).

An experiment compares *arms* — versions of one model — on the devices in its scope. The first
arm is the control. ``kind`` is ``ab`` (a fixed split, one significance test once every arm has
``min_samples``) or ``bandit`` (Thompson sampling moves traffic to the better arms as evidence
arrives). ``metric`` is what is compared: ``reward`` (feedback rewards, 0/1 when ``binary``),
``accuracy`` (feedback labels against the answer) or ``p95_ms`` (latency, A/B only).
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgeserve.errors import ConfigError

from ..rollouts.engine import Selector
from .stats import samples_per_arm

__all__ = [
    "Decision",
    "ExperimentSpec",
    "ExperimentState",
    "Kind",
    "Metric",
    "Phase",
    "Plan",
    "Push",
    "Selector",
    "parse_arms",
    "plan",
]

Kind = Literal["ab", "bandit"]
Metric = Literal["reward", "accuracy", "p95_ms"]
Phase = Literal["running", "decided", "stopped"]
ALL = "*"
"""The group name of an experiment that is not run per device group."""

_VERSION = re.compile(r"^[0-9A-Za-z.+-]{1,64}$")
_HISTORY = 200


def parse_arms(text: str) -> dict[str, float]:
    """``"1.0.0:50,2.0.0:50"`` → {version: weight}; a bare version weighs 1 (equal split)."""
    arms: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        version, _, weight = part.partition(":")
        version = version.strip()
        if not _VERSION.match(version):
            raise ConfigError(f"arm {part!r}: {version!r} is not a version (letters, digits, "
                              "'.', '+', '-')")
        try:
            value = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise ConfigError(f"arm {part!r}: weight {weight!r} is not a number; expected "
                              "VERSION:WEIGHT, e.g. 1.0.0:50") from None
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"arm {part!r}: weight must be a finite number >= 0")
        if version in arms:
            raise ConfigError(f"arm {version!r} is listed twice")
        arms[version] = value
    return arms


class ExperimentSpec(BaseModel):
    """What a fleet manager asked for (immutable once created)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    model: str = Field(min_length=1, max_length=128)
    kind: Kind = "ab"
    arms: dict[str, float] = Field(description="version -> initial (A/B: fixed) weight; the "
                                               "first arm is the control")
    metric: Metric = "reward"
    binary: bool = Field(default=True, description="rewards are 0/1 (Beta-Bernoulli, "
                                                   "two-proportion test) or continuous")
    min_samples: int = Field(default=1000, ge=1, description="A/B: samples per arm before the "
                                                             "one decision; bandit: before a "
                                                             "winner may be declared")
    alpha: float = Field(default=0.05, gt=0, lt=0.5)
    power: float = Field(default=0.8, gt=0, lt=1)
    mde: float | None = Field(default=None, description="minimum detectable effect (absolute) "
                                                        "the sample size was planned for")
    baseline: float | None = Field(default=None, description="expected control rate (binary) "
                                                             "or mean, for the power calculation")
    stddev: float | None = Field(default=None, gt=0, description="continuous outcomes' standard "
                                                                 "deviation, for the power "
                                                                 "calculation")
    floor: float = Field(default=0.05, ge=0, lt=0.5, description="bandit: least weight per arm")
    push_every_s: float = Field(default=10.0, gt=0, description="bandit: at most one weight push "
                                                                "per this many seconds")
    group_by: str | None = Field(default=None, description="bandit: one bandit per value of this "
                                                           "device label ('profile' = hardware "
                                                           "profile)")
    selector: Selector = Field(default_factory=Selector)

    @field_validator("arms")
    @classmethod
    def _arms(cls, arms: dict[str, float]) -> dict[str, float]:
        if len(arms) < 2:
            raise ValueError("an experiment needs at least two arms")
        if len(arms) > 16:
            raise ValueError("at most 16 arms (a device's traffic split holds 16 versions)")
        for version, weight in arms.items():
            if not _VERSION.match(version):
                raise ValueError(f"{version!r} is not a version")
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"arm {version}: weight must be a finite number >= 0")
        if sum(arms.values()) <= 0:
            raise ValueError("arm weights must add up to more than 0")
        return arms

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentSpec:
        if self.metric == "p95_ms" and self.kind == "bandit":
            raise ValueError("a bandit needs a reward or accuracy metric; compare p95_ms with "
                             "an A/B test")
        if self.metric == "accuracy" and not self.binary:
            raise ValueError("accuracy is binary (right or wrong)")
        if self.metric == "p95_ms" and self.binary:
            raise ValueError("p95_ms is continuous: pass binary=False (--continuous)")
        if self.kind == "bandit" and self.floor * len(self.arms) >= 1:
            raise ValueError(f"floor {self.floor} is too large for {len(self.arms)} arms "
                             f"(floor x arms must stay below 1)")
        if self.kind == "ab" and any(w <= 0 for w in self.arms.values()):
            raise ValueError("every A/B arm needs a weight above 0")
        if self.group_by is not None and self.kind != "bandit":
            raise ValueError("group_by runs one bandit per group; an A/B test is scoped with "
                             "the selector instead")
        if self.mde is not None and self.mde == 0:
            raise ValueError("mde must not be 0")
        if self.binary and self.baseline is not None and not 0 < self.baseline < 1:
            raise ValueError("a binary baseline is a rate within (0, 1)")
        return self

    @property
    def control(self) -> str:
        return next(iter(self.arms))

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "p95_ms"

    def initial_weights(self) -> dict[str, float]:
        total = sum(self.arms.values())
        return {v: w / total for v, w in self.arms.items()}


class Plan(BaseModel):
    """The fixed-horizon design: samples per arm for ``power`` to detect ``mde`` at ``alpha``."""

    model_config = ConfigDict(frozen=True)

    samples_per_arm: int | None = None
    mde: float | None = None
    baseline: float | None = None
    power: float
    alpha: float
    comparisons: int = Field(description="tests against the control (alpha is split among "
                                         "them, Bonferroni)")


def _detectable(spec: ExperimentSpec, baseline: float, alpha: float) -> float | None:
    """The smallest effect (absolute) that ``min_samples`` per arm detects with the planned
    power, by bisection on :func:`samples_per_arm`; None when no effect is detectable."""
    if spec.binary:
        sign = 1.0 if baseline <= 0.5 else -1.0
        largest = (1 - baseline if sign > 0 else baseline) - 1e-6
    elif spec.stddev is not None:
        sign, largest = 1.0, 100 * spec.stddev
    else:
        return None

    def needed(magnitude: float) -> int:
        return samples_per_arm(baseline, sign * magnitude, alpha, spec.power, spec.binary,
                               spec.stddev)

    if largest <= 0 or needed(largest) > spec.min_samples:
        return None
    low, high = 0.0, largest
    for _ in range(50):
        mid = (low + high) / 2
        if mid <= 0:
            break
        low, high = (mid, high) if needed(mid) > spec.min_samples else (low, mid)
    return high


def plan(spec: ExperimentSpec) -> Plan:
    """The sample-size plan shown in status: from ``mde`` when given, else the effect that
    ``min_samples`` can detect."""
    comparisons = len(spec.arms) - 1
    alpha = spec.alpha / comparisons
    baseline = spec.baseline if spec.baseline is not None else (0.5 if spec.binary else 0.0)
    if spec.metric == "p95_ms":
        return Plan(power=spec.power, alpha=spec.alpha, comparisons=comparisons)
    if spec.mde is not None:
        try:
            n = samples_per_arm(baseline, spec.mde, alpha, spec.power, spec.binary, spec.stddev)
        except ValueError as exc:
            raise ConfigError(f"cannot plan the sample size: {exc}") from None
        return Plan(samples_per_arm=n, mde=spec.mde, baseline=baseline, power=spec.power,
                    alpha=spec.alpha, comparisons=comparisons)
    return Plan(samples_per_arm=spec.min_samples, mde=_detectable(spec, baseline, alpha),
                baseline=baseline, power=spec.power, alpha=spec.alpha, comparisons=comparisons)


class Push(BaseModel):
    """One change of the fleet's weights (what the devices in each group were sent)."""

    ts: float
    weights: dict[str, dict[str, float]]
    samples: int = Field(description="samples (all arms) the weights were computed from")


class Decision(BaseModel):
    """An A/B test's one decision at its horizon (or a bandit's winner when stopped)."""

    ts: float
    winner: str | None
    detail: str
    samples: dict[str, int] = Field(default_factory=dict)


class ExperimentState(BaseModel):
    """Everything the controller remembers between ticks (persisted as JSON)."""

    phase: Phase = "running"
    started: float
    weights: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="group -> version -> weight, as last pushed")
    joined: dict[str, float] = Field(
        default_factory=dict, description="device -> when it first reported the split applied; "
                                          "its windows count from then on")
    last_push: float = 0.0
    pushes: int = 0
    history: list[Push] = Field(default_factory=list)
    decision: Decision | None = None
    stopped: float | None = None
    reason: str | None = None
    rollout: str | None = Field(default=None, description="the rollout promoting the winner")
    blocked: str | None = Field(default=None, description="why no desired state is written now "
                                                          "(a rollout of the model runs)")
    report: dict[str, Any] | None = Field(default=None, description="the last computed status "
                                                                     "(read by the dashboard)")

    @property
    def done(self) -> bool:
        return self.phase == "stopped"

    def record_push(self, now: float, weights: dict[str, dict[str, float]], samples: int) -> None:
        self.weights = weights
        self.last_push = now
        self.pushes += 1
        self.history.append(Push(ts=now, weights=weights, samples=samples))
        del self.history[:-_HISTORY]
