"""Drift scores estimate drift, not sample size.

With the real ReferenceStats (decile bins of a calibration sample) and DistributionSketch: traffic
from the calibration distribution reads ~0 PSI at the reference sizes the converter makes (64 to
2000 samples) and the window sizes gates and dashboards use (50 to 1000 samples); a shift of one
standard deviation reads well above 0.25; a large sample recovers the true binned PSI; and below
the minimum count the score is None, not a number.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeserve.telemetry import (
    MIN_SAMPLES,
    DistributionSketch,
    ReferenceStats,
    jensen_shannon,
    noise_floor,
    psi,
)
from edgeserve.telemetry.sketch import chi2_quantile

FEATURES = 4
SEEDS = 40
REFERENCE_SIZES = (64, 2000)
WINDOW_SIZES = (50, 200, 1000)


def _reference(rng: np.random.Generator, samples: int, features: int = FEATURES) -> ReferenceStats:
    return ReferenceStats.from_arrays({"x": rng.normal(0, 1, (samples, features))}, {})


def _sketch(reference: ReferenceStats, rng: np.random.Generator, samples: int,
            shift: float) -> DistributionSketch:
    live = DistributionSketch(reference, "input")
    features = len(reference.groups[0].features)
    live.update({"x": rng.normal(shift, 1, (samples, features))})
    return live


def _scores(reference_size: int, window: int, shift: float,
            features: int = FEATURES) -> tuple[np.ndarray, np.ndarray]:
    """(psi, js) of ``SEEDS`` independent references and windows."""
    psis, jss = [], []
    for seed in range(SEEDS):
        rng = np.random.default_rng([reference_size, window, seed])
        score = _sketch(_reference(rng, reference_size, features), rng, window, shift).drift()
        assert score is not None and score.n == window
        psis.append(score.psi)
        jss.append(score.js)
    return np.asarray(psis), np.asarray(jss)


def _binned_psi(shift: float) -> float:
    """The population PSI of N(shift, 1) against N(0, 1) over N(0, 1)'s deciles."""
    normal = NormalDist()
    edges = [-np.inf] + [normal.inv_cdf(k / 10) for k in range(1, 10)] + [np.inf]
    p = np.diff([normal.cdf(e - shift) if np.isfinite(e) else float(e > 0) for e in edges])
    return float(((p - 0.1) * np.log(p / 0.1)).sum())


@pytest.mark.parametrize("reference_size", REFERENCE_SIZES)
@pytest.mark.parametrize("window", WINDOW_SIZES)
def test_same_distribution_reads_no_drift(reference_size: int, window: int) -> None:
    """Unchanged data: mean PSI ~0 and 95th percentile < 0.1 (the plug-in PSI read 0.4-0.8 at
    50 samples and 0.2 at any window size against a 64-sample reference)."""
    psis, jss = _scores(reference_size, window, 0.0)
    assert psis.mean() < 0.01 and np.quantile(psis, 0.95) < 0.1, psis
    assert (psis > 0).mean() <= 0.15, psis  # 5 % nominal false-alarm rate
    assert jss.mean() < 0.002 and np.quantile(jss, 0.95) < 0.01, jss


@pytest.mark.parametrize("reference_size", REFERENCE_SIZES)
@pytest.mark.parametrize("window", WINDOW_SIZES)
def test_one_sigma_shift_reads_clear_drift(reference_size: int, window: int) -> None:
    """A one-sigma shift of the inputs reads well above 0.25 at the same sizes."""
    psis, jss = _scores(reference_size, window, 1.0)
    assert psis.mean() > 0.4 and np.median(psis) > 0.25, psis
    if window >= 200:
        assert np.quantile(psis, 0.05) > 0.25, psis
    assert jss.mean() > 0.05, jss


@pytest.mark.parametrize("shift", [0.5, 1.0])
def test_large_samples_recover_the_binned_psi(shift: float) -> None:
    """With 2000 reference and 5000 live samples the score is the population's binned PSI
    (within sampling noise): a correction for noise, not a scale change."""
    psis, _ = _scores(2000, 5000, shift, features=1)
    assert psis.mean() == pytest.approx(_binned_psi(shift), abs=0.04)


@pytest.mark.parametrize("reference_size", REFERENCE_SIZES)
@pytest.mark.parametrize("window", [50, 1000])
def test_noise_floor_is_the_5_percent_quantile_of_same_distribution_psi(
        reference_size: int, window: int) -> None:
    """The plug-in PSI of same-distribution samples exceeds noise_floor(level=0.05) in about
    5 % of cases (the χ² approximation, including the reference's own sampling noise)."""
    exceeded = []
    for seed in range(300):
        rng = np.random.default_rng([7, reference_size, window, seed])
        reference = _reference(rng, reference_size, 1)
        live = _sketch(reference, rng, window, 0.0).feature_counts(0, 0)
        ref = np.asarray(reference.groups[0].ref_counts[0])
        bins = int(((live + ref) > 0).sum())
        exceeded.append(float(psi(live, ref)) > float(noise_floor(window, reference_size, bins)))
    assert 0.01 <= np.mean(exceeded) <= 0.09


def test_below_the_minimum_count_drift_is_unavailable() -> None:
    """Fewer than MIN_SAMPLES live samples, or a reference smaller than that: None, not 0."""
    rng = np.random.default_rng(11)
    reference = _reference(rng, 64)
    for window in (1, 10, MIN_SAMPLES - 1):
        assert _sketch(reference, rng, window, 0.0).drift() is None
        assert _sketch(reference, rng, window, 3.0).drift() is None
    assert _sketch(reference, rng, MIN_SAMPLES, 0.0).drift() is not None
    assert _sketch(_reference(rng, MIN_SAMPLES - 1), rng, 1000, 1.0).drift() is None
    assert DistributionSketch(reference, "input").drift() is None


def test_features_with_many_bins_need_five_samples_per_bin() -> None:
    """A 32-class top-1 feature needs 160 samples (5 per occupied class), not MIN_SAMPLES:
    unscored at 100, scored at 200."""
    rng = np.random.default_rng(12)
    logits = rng.normal(0, 1, (3000, 32))
    reference = ReferenceStats.from_arrays({}, {"y": logits}, classifier_outputs=("y",))
    outputs = DistributionSketch(reference, "output")
    outputs.add_features(0, reference.groups[0].extract(rng.normal(0, 1, (100, 32))))
    assert outputs.drift() is None
    outputs.add_features(0, reference.groups[0].extract(rng.normal(0, 1, (100, 32))))
    score = outputs.drift()
    assert score is not None and score.n == 200 and score.psi < 0.1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 500), st.integers(0, 500)), min_size=2, max_size=12),
       st.randoms(use_true_random=False))
def test_psi_and_js_are_symmetric_bounded_divergences(pairs: list[tuple[int, int]],
                                                      shuffle: object) -> None:
    """For any counts: PSI ≥ 0 and JS in [0, 1], both 0 on equal counts, symmetric, blind to
    the order of bins and to bins empty on both sides, and finite (no ε blow-up)."""
    a = np.array([x for x, _ in pairs])
    b = np.array([y for _, y in pairs])
    order = list(range(len(pairs)))
    shuffle.shuffle(order)  # type: ignore[attr-defined]
    for stat in (psi, jensen_shannon):
        value = float(stat(a, b))
        assert np.isfinite(value) and value >= 0
        assert float(stat(a, a)) == pytest.approx(0, abs=1e-12)
        assert float(stat(b, a)) == pytest.approx(value, abs=1e-12)
        assert float(stat(a[order], b[order])) == pytest.approx(value, abs=1e-12)
        padded = float(stat(np.append(a, 0), np.append(b, 0)))
        assert padded == pytest.approx(value, abs=1e-12)
    assert float(jensen_shannon(a, b)) <= 1


@settings(max_examples=100, deadline=None)
@given(st.integers(MIN_SAMPLES, 3000), st.floats(-2, 2), st.integers(0, 2**32 - 1))
def test_drift_score_is_never_above_the_plug_in_psi(window: int, shift: float, seed: int) -> None:
    """The corrected score is the plug-in PSI minus a positive floor, clamped at 0."""
    rng = np.random.default_rng(seed)
    reference = _reference(rng, 200, 3)
    live = _sketch(reference, rng, window, shift)
    score = live.drift()
    assert score is not None
    group = reference.groups[0]
    raw = [float(psi(live.feature_counts(0, f), group.ref_counts[f])) for f in range(3)]
    assert 0 <= score.psi <= max(raw) + 1e-6
    assert 0 <= score.psi_mean <= score.psi and 0 <= score.js <= 1
    assert score.worst in group.features


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.floats(0.5, 1 - 1e-6))
def test_chi2_quantile_matches_scipy(df: int, p: float) -> None:
    """Exact for 1-2 degrees of freedom; Wilson–Hilferty within 1 % up to p = 0.99 and never
    more than 6 % above the exact quantile beyond."""
    stats = pytest.importorskip("scipy.stats")
    exact = float(stats.chi2.ppf(p, df))
    approx = float(chi2_quantile(df, p))
    if df <= 2 or p <= 0.99:
        assert approx == pytest.approx(exact, rel=0.01 if df > 2 else 1e-9)
    else:
        assert exact * 0.99 <= approx <= exact * 1.06
