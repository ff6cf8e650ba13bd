"""Experiments: A/B tests with fixed-horizon significance tests, and Thompson-sampling bandits.

``spec`` (what was asked), ``repo`` (the store), ``scope`` (devices and groups), ``collect``
(per-arm evidence from telemetry windows), ``analysis`` and ``stats`` (estimates, intervals,
tests), ``bandit`` (Thompson weights), ``engine`` (pure state transitions), ``report`` (status
as JSON) and ``controller`` (the I/O loop inside ``edgeserve fleet serve``).
"""

from __future__ import annotations

from .analysis import ab_decision, arm_estimate, bandit_weights, compare, p_best, quantile_interval
from .bandit import estimated_regret, thompson_weights
from .collect import ArmData, Collected, check_feedback, collect
from .controller import ExperimentController, reports, status
from .engine import advance, bandit_winner, horizon_reached
from .repo import ExperimentRecord, Experiments, StopRequest
from .spec import ExperimentSpec, ExperimentState, parse_arms, plan
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
    "ArmData",
    "ArmStats",
    "Collected",
    "Comparison",
    "ExperimentController",
    "ExperimentRecord",
    "ExperimentSpec",
    "ExperimentState",
    "Experiments",
    "StopRequest",
    "ab_decision",
    "advance",
    "arm_estimate",
    "bandit_weights",
    "bandit_winner",
    "check_feedback",
    "collect",
    "compare",
    "compare_means",
    "compare_proportions",
    "estimated_regret",
    "horizon_reached",
    "mean_interval",
    "p_best",
    "parse_arms",
    "plan",
    "proportion_interval",
    "quantile_interval",
    "reports",
    "samples_per_arm",
    "status",
    "thompson_weights",
]
