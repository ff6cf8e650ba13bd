"""Telemetry primitives: histogram accuracy and merging, sketches, drift, wire size."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeserve.contract import TelemetryBatch, Window, decode, encode
from edgeserve.telemetry import (
    DistributionSketch,
    LatencyHistogram,
    ReferenceStats,
    jensen_shannon,
    psi,
    sketch_from_data,
)


@pytest.mark.parametrize("dist", ["lognormal", "uniform", "pareto", "bimodal"])
def test_histogram_quantiles_within_one_percent(dist: str) -> None:
    """p50/p95/p99 are within 1% relative error of the exact order statistics."""
    rng = np.random.default_rng(7)
    values = {
        "lognormal": rng.lognormal(0.5, 1.0, 20_000),
        "uniform": rng.uniform(0.05, 500, 20_000),
        "pareto": rng.pareto(1.5, 20_000) + 0.01,
        "bimodal": np.concatenate([rng.normal(2, 0.1, 10_000), rng.normal(40, 3, 10_000)]).clip(
            0.01),
    }[dist]
    hist = LatencyHistogram()
    for v in values:
        hist.add(float(v))
    ordered = np.sort(values)
    for q in (0.5, 0.95, 0.99):
        exact = ordered[int(np.floor(q * (len(values) - 1)))]
        estimate = hist.quantile(q)
        assert estimate is not None
        assert abs(estimate - exact) / exact <= 0.01, (q, estimate, exact)


def test_histogram_merge_equals_single() -> None:
    """Merging per-window histograms equals one histogram over all values (also over the wire)."""
    rng = np.random.default_rng(1)
    parts = [rng.lognormal(1, 0.5, 1000) for _ in range(5)]
    whole, merged = LatencyHistogram(), LatencyHistogram()
    for part in parts:
        h = LatencyHistogram()
        for v in part:
            h.add(float(v))
            whole.add(float(v))
        merged.merge(LatencyHistogram.from_data(json.loads(json.dumps(h.to_dict()))))
    for q in (0.5, 0.95, 0.99):
        assert merged.quantile(q) == whole.quantile(q)
    assert merged.count == whole.count == 5000


def test_histogram_add_many_equals_add_one_by_one() -> None:
    """add_many (the monitor's batched path) gives the same counts, zeros, min and max as add,
    and refuses non-finite values without changing the histogram."""
    values = np.concatenate([np.random.default_rng(4).lognormal(0, 2, 5000), [0.0, 1e-7, 3.0]])
    one_by_one, batched = LatencyHistogram(), LatencyHistogram()
    for v in values:
        one_by_one.add(float(v))
    batched.add_many(values[:1000].tolist())
    batched.add_many(values[1000:].tolist())
    batched.add_many([])
    assert batched.to_data().c == one_by_one.to_data().c
    assert (batched.count, batched.zero_count, batched.min, batched.max) == (
        one_by_one.count, one_by_one.zero_count, one_by_one.min, one_by_one.max)
    assert batched.sum == pytest.approx(one_by_one.sum, rel=1e-12)
    with pytest.raises(ValueError, match="finite"):
        batched.add_many([1.0, float("nan")])
    assert batched.count == len(values)


def test_histogram_empty_and_zero() -> None:
    """An empty histogram has no quantiles; zeros are counted, not lost."""
    h = LatencyHistogram()
    assert h.quantile(0.5) is None
    h.add(0.0)
    assert h.quantile(0.5) == 0.0 and h.count == 1


def _reference(rng: np.random.Generator, n_features: int = 100) -> tuple[ReferenceStats, dict]:
    x = rng.normal(0, 1, (2000, n_features)).astype(np.float32)
    logits = rng.normal(0, 1, (2000, 10)).astype(np.float32)
    ref = ReferenceStats.from_arrays({"x": x}, {"y": logits}, classifier_outputs=("y",))
    return ref, {"x": x, "y": logits}


def test_reference_is_decile_binned() -> None:
    """Reference bins hold ~10% of the calibration samples each."""
    ref, _ = _reference(np.random.default_rng(0), 8)
    group = ref.groups[0]
    counts = np.asarray(group.ref_counts[0])
    assert len(counts) == 10 and counts.min() >= 150 and counts.max() <= 250


def test_no_drift_on_same_distribution_and_drift_on_shift() -> None:
    """Same-distribution traffic scores low PSI/JS; shifted traffic scores high."""
    rng = np.random.default_rng(3)
    ref, _ = _reference(rng, 16)
    same = DistributionSketch(ref, "input")
    shifted = DistributionSketch(ref, "input")
    same.update({"x": rng.normal(0, 1, (3000, 16))})
    shifted.update({"x": rng.normal(1.5, 1, (3000, 16))})
    d_same, d_shift = same.drift(), shifted.drift()
    assert d_same is not None and d_shift is not None
    assert d_same.psi < 0.05 and d_shift.psi > 0.5
    assert d_shift.js > d_same.js


def test_sketch_merge_over_wire() -> None:
    """Sketches merged from wire form equal one sketch over all samples."""
    rng = np.random.default_rng(5)
    ref, _ = _reference(rng, 12)
    whole = DistributionSketch(ref, "input")
    merged = DistributionSketch(ref, "input")
    for _ in range(4):
        batch = rng.normal(0.3, 1, (500, 12))
        part = DistributionSketch(ref, "input")
        part.update({"x": batch})
        whole.update({"x": batch})
        merged.merge_data(sketch_from_data(ref, "input", json.loads(
            part.to_data().model_dump_json())).to_data())
    assert [c.tolist() for c in merged.counts] == [c.tolist() for c in whole.counts]


def test_window_of_100_feature_model_fits_in_a_few_kb() -> None:
    """A full window (latency, 100 input features, 10-class outputs, drift) is under 6 KB."""
    rng = np.random.default_rng(9)
    ref, _ = _reference(rng, 100)
    inputs, outputs = DistributionSketch(ref, "input"), DistributionSketch(ref, "output")
    hist = LatencyHistogram()
    for _ in range(600):
        x = rng.normal(0, 1, (1, 100))
        inputs.update({"x": x})
        outputs.update({"y": rng.normal(0, 1, (1, 10))})
        hist.add(float(rng.lognormal(0, 0.3)))
    window = Window(seq=1, start=0, end=60, model="m", version="1.0.0", requests=600,
                    latency=hist.to_data(), inputs=inputs.to_data(), outputs=outputs.to_data(),
                    drift_inputs=inputs.drift(), drift_outputs=outputs.drift())
    raw = encode(TelemetryBatch(device_id="d", windows=[window]))
    assert len(raw) < 6 * 1024, len(raw)
    assert decode(TelemetryBatch, raw).windows[0] == window


def test_psi_and_js_properties() -> None:
    """PSI and JS are zero for identical counts and grow with difference; JS stays in [0, 1]."""
    a = np.array([10, 10, 10, 10])
    b = np.array([40, 0, 0, 0])
    assert psi(a, a) == pytest.approx(0, abs=1e-9)
    assert jensen_shannon(a, a) == pytest.approx(0, abs=1e-9)
    assert psi(a, b) > 1
    assert 0 < jensen_shannon(a, b) <= 1


def test_image_tensor_uses_channel_features() -> None:
    """A large NCHW tensor is summarised per channel, not per pixel."""
    rng = np.random.default_rng(2)
    images = rng.uniform(0, 1, (50, 3, 32, 32)).astype(np.float32)
    ref = ReferenceStats.from_arrays({"img": images}, {}, layouts={"img": "NCHW"})
    assert ref.groups[0].reduce == "channel" and len(ref.groups[0].features) == 3
