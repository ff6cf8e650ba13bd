"""What the evidence says: per-arm estimates and intervals, the A/B decision, bandit weights.

Everything here is a pure function of the spec and the collected :class:`~.collect.ArmData`, so
the statistics are tested on seeded synthetic feedback and the controller, the CLI and the API
share one computation.

* Estimates and 95 % intervals per arm: Wilson for binary metrics, normal for continuous rewards,
  and for ``p95_ms`` the distribution-free order-statistic interval of the 95th percentile (ranks
  ``n·q ± z·√(n·q·(1−q))`` looked up in the arm's merged histogram).
* A/B decision (fixed horizon, once every arm has ``min_samples``): each arm against the control
  at ``alpha / (arms − 1)`` (Bonferroni) with a two-sided test — two-proportion z-test (binary),
  Welch (continuous), and for ``p95_ms`` non-overlapping ``1 − alpha/(arms − 1)`` intervals of
  the p95 (a conservative rule: its false-positive rate is well below alpha). The winner is the
  best arm significantly better than the control; the control wins when every other arm is
  significantly worse; otherwise there is no winner. On identical arms a winner is declared in at
  most ``alpha`` of tests.
* Bandit: Thompson weights per group, the posterior probability that each arm is best, and the
  estimated cumulative regret next to what a uniform split would have lost on the same samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from statistics import NormalDist
from typing import Any

from .bandit import estimated_regret, thompson_weights
from .collect import ArmData
from .spec import ExperimentSpec
from .stats import (
    ArmStats,
    Comparison,
    compare_means,
    compare_proportions,
    mean_interval,
    proportion_interval,
)

__all__ = [
    "ab_decision",
    "arm_estimate",
    "bandit_weights",
    "compare",
    "p_best",
    "quantile_interval",
    "regret",
    "uniform_regret",
]

_Z = NormalDist()
_DRAWS = 20_000


def quantile_interval(hist: Any, q: float = 0.95,
                      confidence: float = 0.95) -> tuple[float, float] | None:
    """Order-statistic confidence interval of quantile ``q`` of a merged latency histogram."""
    n = hist.count
    if n < 2:
        return None
    z = _Z.inv_cdf(0.5 + confidence / 2)
    half = z * math.sqrt(q * (1 - q) / n)
    low, high = hist.quantile(max(0.0, q - half)), hist.quantile(min(1.0, q + half))
    if low is None or high is None:
        return None
    return (float(low), float(high))


def arm_estimate(spec: ExperimentSpec, data: ArmData,
                 confidence: float = 0.95) -> tuple[int, float | None, tuple[float, float] | None]:
    """(samples, estimate, interval) of the experiment's metric for one arm."""
    if spec.metric == "p95_ms":
        p95 = data.latency.quantile(0.95)
        return data.latency.count, p95, quantile_interval(data.latency, 0.95, confidence)
    stats = data.stats(spec.metric)
    if stats.n == 0:
        return 0, None, None
    if spec.binary:
        return stats.n, stats.mean, proportion_interval(stats.total, stats.n, confidence)
    return stats.n, stats.mean, mean_interval(stats, confidence)


def compare(spec: ExperimentSpec, control: ArmData, treatment: ArmData,
            alpha: float) -> Comparison | None:
    """Treatment minus control on the metric, tested two-sided at ``alpha``."""
    if spec.metric == "p95_ms":
        confidence = 1 - alpha
        a = quantile_interval(control.latency, 0.95, confidence)
        b = quantile_interval(treatment.latency, 0.95, confidence)
        pa, pb = control.latency.quantile(0.95), treatment.latency.quantile(0.95)
        if a is None or b is None or pa is None or pb is None:
            return None
        apart = b[1] < a[0] or a[1] < b[0]
        # p-value not defined for the interval rule: 0 marks "apart", 1 "overlapping"
        return Comparison(pb - pa, b[0] - a[1], b[1] - a[0], 0.0 if apart else 1.0, apart)
    c, t = control.stats(spec.metric), treatment.stats(spec.metric)
    if spec.binary:
        return compare_proportions(c, t, alpha)
    return compare_means(c, t, alpha)


def ab_decision(spec: ExperimentSpec, arms: Mapping[str, ArmData]
                ) -> tuple[str | None, str, dict[str, Comparison | None]]:
    """(winner or None, why, comparison per treatment) at the horizon."""
    alpha = spec.alpha / (len(spec.arms) - 1)
    control = spec.control
    comparisons = {v: compare(spec, arms[control], arms[v], alpha)
                   for v in spec.arms if v != control}
    sign = 1.0 if spec.higher_is_better else -1.0
    better = {v: c for v, c in comparisons.items()
              if c is not None and c.significant and sign * c.difference > 0}
    worse = [v for v, c in comparisons.items()
             if c is not None and c.significant and sign * c.difference < 0]
    what = "lower p95" if spec.metric == "p95_ms" else f"higher {spec.metric}"
    if better:
        winner = max(better, key=lambda v: sign * better[v].difference)
        c = better[winner]
        return winner, (f"{winner} wins: {what} than {control} by {abs(c.difference):.4g} "
                        f"({_p(spec, c)})"), comparisons
    if worse and len(worse) == len(comparisons):
        return control, (f"{control} (control) wins: every other arm is significantly "
                         f"worse"), comparisons
    ps = ", ".join(f"{v}: {_p(spec, c)}" for v, c in comparisons.items() if c is not None)
    return None, f"no significant difference from {control} ({ps or 'no data'})", comparisons


def _p(spec: ExperimentSpec, c: Comparison) -> str:
    if spec.metric == "p95_ms":
        return "intervals apart" if c.significant else "intervals overlap"
    return f"p={c.p_value:.3g}"


def bandit_weights(spec: ExperimentSpec, arms: Mapping[str, ArmData],
                   seed: int | None = None) -> dict[str, float]:
    """Thompson-sampling weights with the spec's floor (initial weights before any sample)."""
    stats = {v: arms[v].stats(spec.metric) for v in spec.arms}
    if sum(s.n for s in stats.values()) == 0:
        return spec.initial_weights()
    weights = thompson_weights(stats, spec.binary, spec.floor, _DRAWS, seed)
    return {v: round(w, 6) for v, w in weights.items()}


def p_best(spec: ExperimentSpec, arms: Mapping[str, ArmData],
           seed: int | None = None) -> dict[str, float]:
    """Posterior probability that each arm is the best (no floor)."""
    stats = {v: arms[v].stats(spec.metric) for v in spec.arms}
    return thompson_weights(stats, spec.binary, 0.0, _DRAWS, seed)


def uniform_regret(arms: Mapping[str, ArmStats]) -> float:
    """What a uniform split over the same number of samples would have lost (same estimates)."""
    means = [a.mean for a in arms.values() if a.mean is not None]
    if not means:
        return 0.0
    total = sum(a.n for a in arms.values())
    return float(total * (max(means) - sum(means) / len(means)))


def regret(spec: ExperimentSpec, arms: Mapping[str, ArmData]) -> tuple[float, float]:
    """(estimated cumulative regret, a uniform split's on the same samples)."""
    stats = {v: arms[v].stats(spec.metric) for v in spec.arms}
    return estimated_regret(stats), uniform_regret(stats)
