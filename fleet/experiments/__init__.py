"""Experiments: A/B tests with fixed-horizon significance tests, and Thompson-sampling bandits."""

from __future__ import annotations

from .bandit import estimated_regret, thompson_weights
from .stats import (
    ArmStats,
    Comparison,
    compare_means,
    compare_proportions,
    mean_interval,
    proportion_interval,
    samples_per_arm,
)

__all__ = [
    "ArmStats",
    "Comparison",
    "compare_means",
    "compare_proportions",
    "estimated_regret",
    "mean_interval",
    "proportion_interval",
    "samples_per_arm",
    "thompson_weights",
]
