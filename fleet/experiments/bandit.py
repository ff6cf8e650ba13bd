"""Thompson sampling over experiment arms: traffic weights from the posterior of each arm's reward.

Binary rewards use a Beta(1 + successes, 1 + failures) posterior; continuous rewards a normal
posterior of the mean (sample mean, variance / n, with the pooled variance standing in while an
arm has fewer than two samples). An arm's weight is the posterior probability that it is the best,
estimated by Monte Carlo, then mixed with a floor so every arm keeps some traffic (and keeps
being measured).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from .stats import ArmStats

__all__ = ["estimated_regret", "thompson_weights"]


def _gaussian_draws(arms: list[ArmStats], draws: int, rng: np.random.Generator) -> np.ndarray:
    n = sum(a.n for a in arms)
    pooled_mean = sum(a.total for a in arms) / n if n else 0.0
    pooled_var = (sum(a.total_sq for a in arms) / n - pooled_mean**2) if n else 1.0
    pooled_var = max(pooled_var, 1e-12)
    columns = []
    for arm in arms:
        if arm.n >= 2 and arm.variance is not None and arm.mean is not None:
            mean, sd = arm.mean, math.sqrt(max(arm.variance, 1e-12) / arm.n)
        elif arm.n == 1 and arm.mean is not None:
            mean, sd = arm.mean, math.sqrt(pooled_var)
        else:
            mean, sd = pooled_mean, math.sqrt(pooled_var) * 10
        columns.append(rng.normal(mean, sd, draws))
    return np.stack(columns, axis=1)


def thompson_weights(arms: Mapping[str, ArmStats], binary: bool = True, floor: float = 0.05,
                     draws: int = 20_000, seed: int | None = None) -> dict[str, float]:
    """Traffic weights (summing to 1): P(arm is best), mixed with ``floor`` per arm."""
    names = list(arms)
    if not names:
        return {}
    if not 0 <= floor * len(names) < 1:
        raise ValueError(f"floor {floor} is too large for {len(names)} arms")
    rng = np.random.default_rng(seed)
    stats = [arms[n] for n in names]
    if binary:
        successes = np.array([a.total for a in stats])
        failures = np.array([a.n - a.total for a in stats])
        samples = rng.beta(1 + successes, 1 + np.maximum(failures, 0), size=(draws, len(names)))
    else:
        samples = _gaussian_draws(stats, draws, rng)
    wins = np.bincount(np.argmax(samples, axis=1), minlength=len(names)) / draws
    weights = floor + (1 - floor * len(names)) * wins
    return {name: float(w) for name, w in zip(names, weights / weights.sum(), strict=True)}


def estimated_regret(arms: Mapping[str, ArmStats]) -> float:
    """Σ n_i · (best estimated mean − arm i's estimated mean): reward lost to weaker arms."""
    means = {n: a.mean for n, a in arms.items() if a.mean is not None}
    if not means:
        return 0.0
    best = max(means.values())
    return float(sum(arms[n].n * (best - m) for n, m in means.items()))
