"""Every drift number the fleet stores or shows reads ~0 on unchanged traffic and high on a shift.

The paths: the ``drift_psi`` column of a stored window (``window_row``, through the ingestor into
SQLite and PostgreSQL), the cohort drift the gates read (``Accumulator``, merged sketches and the
no-reference fallback) and the dashboard's per-version series (``model_series``). Windows are built
as the device builds them: real sketches against a real reference, and their drift scores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeserve.contract import TelemetryBatch, Window, encode
from edgeserve.fleet.ingest import Ingestor
from edgeserve.fleet.rollouts.metrics import Accumulator
from edgeserve.fleet.store import Store
from edgeserve.fleet.telemetry import query_windows, window_row
from edgeserve.fleet.web.api import model_series
from edgeserve.telemetry import DistributionSketch, ReferenceStats

FLEET = "acme"
WEIGHTS = np.random.default_rng(0).normal(0, 1, (4, 3))
SEEDS = 20


def _traffic(rng: np.random.Generator, samples: int, shift: float) -> tuple[np.ndarray, ...]:
    """Inputs x ~ N(shift, 1) and a classifier's logits y = x·W."""
    x = rng.normal(shift, 1, (samples, 4))
    return x, x @ WEIGHTS


def _reference(rng: np.random.Generator, samples: int) -> ReferenceStats:
    x, y = _traffic(rng, samples, 0.0)
    return ReferenceStats.from_arrays({"x": x}, {"y": y}, classifier_outputs=("y",))


def _window(reference: ReferenceStats, rng: np.random.Generator, samples: int, shift: float,
            seq: int = 1, version: str = "1.0.0") -> Window:
    """A window as the device's monitor makes it (see device_agent/telemetry/monitor.py)."""
    inputs = DistributionSketch(reference, "input")
    outputs = DistributionSketch(reference, "output")
    x, y = _traffic(rng, samples, shift)
    inputs.update({"x": x})
    outputs.update({"y": y})
    return Window(seq=seq, start=1000.0 + 10 * seq, end=1010.0 + 10 * seq, model="m",
                  version=version, requests=samples, inputs=inputs.to_data(),
                  outputs=outputs.to_data(), drift_inputs=inputs.drift(),
                  drift_outputs=outputs.drift())


def _stored_psi(reference_size: int, window: int, shift: float) -> np.ndarray:
    values = []
    for seed in range(SEEDS):
        rng = np.random.default_rng([reference_size, window, seed])
        row = window_row("d", _window(_reference(rng, reference_size), rng, window, shift), 0.0)
        assert row["drift_psi"] is not None
        values.append(row["drift_psi"])
    return np.asarray(values)


@pytest.mark.parametrize("reference_size", [64, 2000])
@pytest.mark.parametrize("window", [50, 200, 1000])
def test_stored_window_drift_is_low_on_unchanged_traffic_and_high_on_a_shift(
        reference_size: int, window: int) -> None:
    """The stored per-window drift_psi: < 0.1 (mean and 95th percentile) on traffic from the
    calibration distribution, > 0.25 (median) when the inputs shift by one sigma."""
    same = _stored_psi(reference_size, window, 0.0)
    assert same.mean() < 0.02 and np.quantile(same, 0.95) < 0.1, same
    shifted = _stored_psi(reference_size, window, 1.0)
    assert np.median(shifted) > 0.25 and shifted.mean() > 0.4, shifted


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    url = (f"sqlite:///{tmp_path}/fleet.db" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    s = Store.open(url, fleet=FLEET)
    request.addfinalizer(s.close)
    return s


def _ingest(store: Store, windows: list[Window], device: str = "d1") -> None:
    ingestor = Ingestor(store, FLEET, clock=lambda: 5000.0)
    parsed = ingestor.parse(f"edgeserve/v1/{FLEET}/devices/{device}/telemetry",
                            encode(TelemetryBatch(device_id=device, windows=windows)))
    assert parsed is not None
    assert ingestor.commit([parsed])


def test_too_few_samples_store_null_drift_not_a_number(store: Store) -> None:
    """A 10-sample window from the calibration distribution used to store PSI ≈ 4.8 against a
    64-sample reference; now its drift_psi is NULL, and a 200-sample window's is < 0.1."""
    rng = np.random.default_rng(3)
    reference = _reference(rng, 64)
    small, large = _window(reference, rng, 10, 0.0, 1), _window(reference, rng, 200, 0.0, 2)
    assert small.drift_inputs is None and small.drift_outputs is None and small.inputs
    _ingest(store, [small, large])
    stored = {w.seq: w.drift_psi for w in query_windows(store, device="d1")}
    assert stored[1] is None
    assert stored[2] is not None and stored[2] < 0.1


def _cohort(windows: list[Window], reference: ReferenceStats | None) -> float | None:
    acc = Accumulator(references=None if reference is None else (lambda m, v: reference))
    for window in windows:
        acc.add_window(json.loads(encode(window)), shadow_mode=False)
    value: float | None = acc.metrics().drift_psi
    return value


def _numbers(values: list[float | None]) -> list[float]:
    assert None not in values, values
    return [v for v in values if v is not None]


@pytest.mark.parametrize("reference_size", [64, 2000])
@pytest.mark.parametrize(("windows", "per_window"), [(60, 10), (5, 50), (5, 200)])
def test_cohort_drift_for_gates(reference_size: int, windows: int, per_window: int) -> None:
    """The gates' cohort drift, from merged sketches and from the no-reference fallback: < 0.1
    on unchanged traffic, > 0.25 on a shift; the fallback has nothing to say when no window had
    enough samples for a score of its own."""
    same_merged, same_fallback, shift_merged = [], [], []
    for seed in range(10):
        rng = np.random.default_rng([reference_size, windows, per_window, seed])
        reference = _reference(rng, reference_size)
        same = [_window(reference, rng, per_window, 0.0, s) for s in range(1, windows + 1)]
        shifted = [_window(reference, rng, per_window, 1.0, s) for s in range(1, windows + 1)]
        same_merged.append(_cohort(same, reference))
        same_fallback.append(_cohort(same, None))
        shift_merged.append(_cohort(shifted, reference))
    assert max(_numbers(same_merged)) < 0.1, same_merged
    assert min(_numbers(shift_merged)) > 0.25, shift_merged
    if per_window < 50:
        assert same_fallback == [None] * 10
    else:
        assert max(_numbers(same_fallback)) < 0.1, same_fallback


def test_dashboard_series_shows_merged_drift(store: Store) -> None:
    """model_series (the dashboard's drift chart): per 10 s bucket, many small windows of the
    calibration distribution read < 0.1, shifted ones > 0.25, and a bucket of one small window
    shows no drift at all (null) rather than a small-sample artefact."""
    rng = np.random.default_rng(8)
    reference = _reference(rng, 64)
    windows = []
    for seq in range(1, 61):  # one window per second: 10 windows (100 samples) per bucket
        shift = 1.0 if seq > 30 else 0.0
        window = _window(reference, rng, 10, shift, seq, version="2.0.0")
        windows.append(window.model_copy(update={"start": 1000.0 + seq,
                                                 "end": 1000.5 + seq}))
    windows.append(_window(reference, rng, 10, 0.0, 61, version="2.0.0").model_copy(
        update={"start": 1200.0, "end": 1200.5}))
    _ingest(store, windows)
    series = model_series(store, "m", 0.0, 10.0, references=lambda m, v: reference)
    drift = {int(p["t"]): p["drift_psi"] for p in series["versions"]["2.0.0"]}
    assert all(drift[t] is not None and drift[t] < 0.1 for t in (1010, 1020, 1030)), drift
    assert all(drift[t] is not None and drift[t] > 0.25 for t in (1040, 1050, 1060)), drift
    assert drift[1210] is None
