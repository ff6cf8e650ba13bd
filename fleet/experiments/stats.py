"""Statistics for A/B tests: estimates, confidence intervals, tests and sample-size planning.

A/B tests here are *fixed-horizon*: the sample size per arm comes from a power calculation
(:func:`samples_per_arm`), interim numbers are shown but no decision is taken before every arm has
that many samples, and the test is then run once. That keeps the false-positive rate at ``alpha``
(peeking and stopping at the first significant look would inflate it several-fold).

Binary metrics (reward in {0, 1}, accuracy) use the two-proportion z-test; continuous ones (reward,
latency means) use Welch's z-approximation, sound at the sample sizes a power calculation gives.
Everything is standard library (``statistics.NormalDist``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

__all__ = [
    "ArmStats",
    "Comparison",
    "compare_means",
    "compare_proportions",
    "mean_interval",
    "proportion_interval",
    "samples_per_arm",
]

_Z = NormalDist()


@dataclass(frozen=True)
class ArmStats:
    """Sufficient statistics of one arm: count, sum and sum of squares of the outcome."""

    n: int
    total: float
    total_sq: float

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    @property
    def variance(self) -> float | None:
        if self.n < 2:
            return None
        mean = self.total / self.n
        return max(self.total_sq / self.n - mean * mean, 0.0) * self.n / (self.n - 1)


@dataclass(frozen=True)
class Comparison:
    """Treatment minus control: difference, its confidence interval, and the test's p-value."""

    difference: float
    low: float
    high: float
    p_value: float
    significant: bool

    def to_dict(self) -> dict[str, float | bool]:
        return {"difference": self.difference, "ci_low": self.low, "ci_high": self.high,
                "p_value": self.p_value, "significant": self.significant}


def proportion_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion (well-behaved near 0 and 1 and for small n)."""
    if n == 0:
        return (0.0, 1.0)
    z = _Z.inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(arm: ArmStats, confidence: float = 0.95) -> tuple[float, float] | None:
    if arm.n < 2 or arm.mean is None or arm.variance is None:
        return None
    z = _Z.inv_cdf(0.5 + confidence / 2)
    half = z * math.sqrt(arm.variance / arm.n)
    return (arm.mean - half, arm.mean + half)


def _two_sided(z: float) -> float:
    return 2 * (1 - _Z.cdf(abs(z)))


def compare_proportions(control: ArmStats, treatment: ArmStats,
                        alpha: float = 0.05) -> Comparison | None:
    """Two-proportion z-test (pooled) with an unpooled Wald interval for the difference."""
    if control.n == 0 or treatment.n == 0:
        return None
    p1, p2 = control.total / control.n, treatment.total / treatment.n
    pooled = (control.total + treatment.total) / (control.n + treatment.n)
    se_pooled = math.sqrt(pooled * (1 - pooled) * (1 / control.n + 1 / treatment.n))
    se = math.sqrt(p1 * (1 - p1) / control.n + p2 * (1 - p2) / treatment.n)
    diff = p2 - p1
    p_value = 1.0 if se_pooled == 0 else _two_sided(diff / se_pooled)
    z = _Z.inv_cdf(1 - alpha / 2)
    return Comparison(diff, diff - z * se, diff + z * se, p_value, p_value < alpha)


def compare_means(control: ArmStats, treatment: ArmStats, alpha: float = 0.05) -> Comparison | None:
    """Welch's test (normal approximation) on the difference of means."""
    if control.variance is None or treatment.variance is None:
        return None
    assert control.mean is not None and treatment.mean is not None
    se = math.sqrt(control.variance / control.n + treatment.variance / treatment.n)
    diff = treatment.mean - control.mean
    p_value = 1.0 if se == 0 else _two_sided(diff / se)
    z = _Z.inv_cdf(1 - alpha / 2)
    return Comparison(diff, diff - z * se, diff + z * se, p_value, p_value < alpha)


def samples_per_arm(baseline: float, effect: float, alpha: float = 0.05, power: float = 0.8,
                    binary: bool = True, stddev: float | None = None) -> int:
    """Samples per arm to detect ``effect`` (absolute) at ``alpha`` (two-sided) with ``power``.

    Binary: ``baseline`` is the control rate. Continuous: pass ``stddev`` of the outcome.
    """
    if effect == 0:
        raise ValueError("effect must be non-zero")
    z_a, z_b = _Z.inv_cdf(1 - alpha / 2), _Z.inv_cdf(power)
    if binary:
        p1, p2 = baseline, baseline + effect
        if not (0 < p1 < 1 and 0 < p2 < 1):
            raise ValueError("rates must stay within (0, 1)")
        p_bar = (p1 + p2) / 2
        top = z_a * math.sqrt(2 * p_bar * (1 - p_bar)) + z_b * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))
        return math.ceil(top * top / (effect * effect))
    if stddev is None or stddev <= 0:
        raise ValueError("continuous outcomes need a positive stddev")
    return math.ceil(2 * ((z_a + z_b) * stddev / effect) ** 2)
