"""A/B statistics and Thompson sampling, checked by seeded simulation."""

from __future__ import annotations

import numpy as np
import pytest

from edgeserve.fleet.experiments import (
    ArmStats,
    compare_means,
    compare_proportions,
    estimated_regret,
    proportion_interval,
    samples_per_arm,
    thompson_weights,
)


def _binary(rng: np.random.Generator, rate: float, n: int) -> ArmStats:
    s = float(rng.binomial(n, rate))
    return ArmStats(n=n, total=s, total_sq=s)


def test_false_positive_rate_on_identical_arms() -> None:
    """Over 2,000 seeded A/A tests at alpha=0.05, about 5% are (wrongly) significant."""
    rng = np.random.default_rng(11)
    n = samples_per_arm(0.5, 0.05)
    hits = sum(bool(compare_proportions(_binary(rng, 0.5, n), _binary(rng, 0.5, n)).significant)
               for _ in range(2000))  # type: ignore[union-attr]
    assert 0.03 <= hits / 2000 <= 0.07


def test_power_matches_the_power_calculation() -> None:
    """With the computed sample size, a real 5-point lift is detected about 80% of the time."""
    rng = np.random.default_rng(12)
    n = samples_per_arm(0.50, 0.05, power=0.8)
    assert 1400 <= n <= 1700  # textbook value for 50% -> 55% is ~1,565 per arm
    detected = 0
    for _ in range(1000):
        result = compare_proportions(_binary(rng, 0.50, n), _binary(rng, 0.55, n))
        assert result is not None
        detected += result.significant and result.difference > 0
    assert 0.74 <= detected / 1000 <= 0.86


def test_interval_covers_true_difference() -> None:
    """The 95% interval for the difference covers the truth about 95% of the time."""
    rng = np.random.default_rng(13)
    covered = 0
    for _ in range(1000):
        r = compare_proportions(_binary(rng, 0.3, 800), _binary(rng, 0.4, 800))
        assert r is not None
        covered += r.low <= 0.1 <= r.high
    assert 0.92 <= covered / 1000 <= 0.975


def test_welch_on_continuous_outcomes() -> None:
    """Means with different variances: a real difference is found, no difference is not."""
    rng = np.random.default_rng(14)

    def arm(mu: float, sd: float, n: int) -> ArmStats:
        x = rng.normal(mu, sd, n)
        return ArmStats(n=n, total=float(x.sum()), total_sq=float((x * x).sum()))

    n = samples_per_arm(0, 0.3, binary=False, stddev=1.25)  # ~80% power by construction
    found = 0
    for _ in range(300):
        lift = compare_means(arm(1.0, 1.0, n), arm(1.3, 1.5, n))
        assert lift is not None
        found += lift.significant and lift.difference > 0
    assert 0.72 <= found / 300 <= 0.9
    fp = sum(bool(compare_means(arm(1, 1, n), arm(1, 1, n)).significant)  # type: ignore[union-attr]
             for _ in range(500))
    assert fp / 500 <= 0.09


def test_wilson_interval_edges() -> None:
    """Wilson intervals stay within [0, 1], even for 0/n and n/n."""
    assert proportion_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12)
    assert proportion_interval(10, 10)[1] == pytest.approx(1.0, abs=1e-12)
    assert proportion_interval(0, 10)[0] >= 0 and proportion_interval(10, 10)[1] <= 1
    low, high = proportion_interval(50, 100)
    assert low < 0.5 < high


def test_thompson_sampling_finds_best_arm_with_less_regret_than_uniform() -> None:
    """Three arms 0.50/0.55/0.70: after bounded feedback >= 80% of traffic goes to the best arm."""
    rng = np.random.default_rng(21)
    true = {"v1": 0.50, "v2": 0.55, "v3": 0.70}
    stats = {a: ArmStats(0, 0.0, 0.0) for a in true}
    weights = {a: 1 / 3 for a in true}
    regret = 0.0
    for _ in range(40):  # 40 pushes of 100 feedbacks each
        arms = rng.choice(list(true), size=100, p=[weights[a] for a in true])
        for arm in arms:
            reward = float(rng.random() < true[arm])
            s = stats[arm]
            stats[arm] = ArmStats(s.n + 1, s.total + reward, s.total_sq + reward)
            regret += 0.70 - true[arm]
        weights = thompson_weights(stats, floor=0.02, seed=int(rng.integers(1 << 30)))
    uniform_regret = 4000 * (0.70 - np.mean(list(true.values())))
    assert weights["v3"] >= 0.8
    assert regret < uniform_regret / 2
    assert estimated_regret(stats) >= 0


def test_gaussian_thompson_and_floor() -> None:
    """Continuous rewards favour the higher mean; every arm keeps at least the floor."""
    stats = {"a": ArmStats(200, 200 * 1.0, 200 * 2.0), "b": ArmStats(200, 200 * 1.5, 200 * 3.25)}
    w = thompson_weights(stats, binary=False, floor=0.1, seed=1)
    assert w["b"] > 0.85 and w["a"] >= 0.1 - 1e-9
    assert abs(sum(w.values()) - 1) < 1e-9
    with pytest.raises(ValueError):
        thompson_weights(stats, floor=0.6)
