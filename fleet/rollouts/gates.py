"""Rollout gates: small expressions comparing the canary cohort's model health with a bound.

A gate is written the way a fleet manager thinks about it::

    error_rate<=0.01           absolute bound
    p95_ms<=1.2*control        relative to the control cohort (devices still on the old version)
    drift_psi<0.25
    disagreement<=0.05         shadow / canary outputs disagreeing with the active model
    requests>=200              minimum evidence before anything can pass

A gate *fails* only on enough evidence (the canary has ``min_requests``), so a stage is never
rolled back because of three unlucky requests, and it *passes* only when its bound holds.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from edgeserve.errors import ConfigError

__all__ = ["METRICS", "CohortMetrics", "Gate", "GateResult", "parse_gate"]

Metric = Literal["error_rate", "p50_ms", "p95_ms", "p99_ms", "drift_psi", "drift_js",
                 "disagreement", "requests", "reward", "accuracy"]
METRICS: dict[str, str] = {
    "error_rate": "errors / requests of the model version",
    "p50_ms": "median latency (ms)",
    "p95_ms": "95th percentile latency (ms)",
    "p99_ms": "99th percentile latency (ms)",
    "drift_psi": "max PSI of input/output features against the package's reference",
    "drift_js": "max Jensen-Shannon divergence against the reference",
    "disagreement": "fraction of shadow comparisons whose outputs disagree",
    "requests": "inferences counted (a minimum-evidence gate)",
    "reward": "mean feedback reward",
    "accuracy": "fraction of labelled feedback that was correct",
}
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt,
}
_NUMBER = r"[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?"
_GATE = re.compile(
    rf"^\s*(?P<metric>[a-z0-9_]+)\s*(?P<op><=|>=|<|>)\s*"
    rf"(?:(?P<factor>{_NUMBER})\s*\*\s*control|control\s*\*\s*(?P<factor2>{_NUMBER})"
    rf"|(?P<control>control)|(?P<value>{_NUMBER}))\s*$"
)


class CohortMetrics(BaseModel):
    """Model health of one cohort over the current stage (aggregated from telemetry windows)."""

    model_config = ConfigDict(frozen=True)

    requests: int = Field(default=0, ge=0)
    errors: int = Field(default=0, ge=0)
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    drift_psi: float | None = None
    drift_js: float | None = None
    shadow_compared: int = Field(default=0, ge=0)
    shadow_disagreements: int = Field(default=0, ge=0)
    reward: float | None = None
    accuracy: float | None = None

    def value(self, metric: str) -> float | None:
        if metric == "error_rate":
            return self.errors / self.requests if self.requests else None
        if metric == "requests":
            return float(self.requests)
        if metric == "disagreement":
            return (self.shadow_disagreements / self.shadow_compared
                    if self.shadow_compared else None)
        value = getattr(self, metric, None)
        return None if value is None else float(value)


class GateResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    gate: str
    verdict: Literal["pass", "fail", "pending"]
    canary: float | None
    bound: float | None
    detail: str


@dataclass(frozen=True)
class Gate:
    metric: str
    op: str
    value: float | None = None
    factor: float | None = None

    @property
    def text(self) -> str:
        rhs = f"{self.factor:g}*control" if self.factor is not None else f"{self.value:g}"
        return f"{self.metric}{self.op}{rhs}"

    def bound(self, control: CohortMetrics | None) -> float | None:
        if self.factor is None:
            return self.value
        base = control.value(self.metric) if control else None
        return None if base is None else self.factor * base

    def evaluate(self, canary: CohortMetrics, control: CohortMetrics | None,
                 min_requests: int) -> GateResult:
        """pass / fail on enough evidence, pending otherwise (no data, or control unknown)."""
        value = canary.value(self.metric)
        bound = self.bound(control)
        if self.metric == "requests":
            assert bound is not None
            ok = _OPS[self.op](float(canary.requests), bound)
            # too few requests means "wait", never "fail"
            return GateResult(gate=self.text, verdict="pass" if ok else "pending",
                              canary=float(canary.requests), bound=bound,
                              detail=f"{canary.requests} requests, need {self.op}{bound:g}")
        if value is None or bound is None or math.isnan(value):
            missing = "canary has no data" if value is None else "control has no data"
            return GateResult(gate=self.text, verdict="pending", canary=value, bound=bound,
                              detail=missing)
        if canary.requests < min_requests:
            return GateResult(gate=self.text, verdict="pending", canary=value, bound=bound,
                              detail=f"{canary.requests}/{min_requests} requests so far")
        ok = _OPS[self.op](value, bound)
        detail = f"canary {self.metric}={value:.4g} {'within' if ok else 'violates'} " \
                 f"{self.op}{bound:.4g}"
        return GateResult(gate=self.text, verdict="pass" if ok else "fail", canary=value,
                          bound=bound, detail=detail)


def parse_gate(text: str) -> Gate:
    """Parse ``metric<op>number`` or ``metric<op>factor*control``; errors name what is allowed."""
    match = _GATE.match(text or "")
    if not match:
        raise ConfigError(
            f"gate {text!r} is not of the form METRIC OP BOUND, e.g. 'error_rate<=0.01' or "
            "'p95_ms<=1.2*control' (OP one of <= < >= >)"
        )
    metric = match["metric"]
    if metric not in METRICS:
        known = ", ".join(sorted(METRICS))
        raise ConfigError(f"gate {text!r}: unknown metric {metric!r}; known metrics: {known}")
    factor = match["factor"] or match["factor2"]
    if match["control"]:
        factor = "1"
    if factor is not None and metric == "requests":
        raise ConfigError(f"gate {text!r}: 'requests' takes an absolute minimum, not a "
                          "multiple of control")
    return Gate(metric=metric, op=match["op"],
                value=None if factor is not None else float(match["value"]),
                factor=float(factor) if factor is not None else None)
