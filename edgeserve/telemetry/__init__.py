"""Telemetry primitives shared by the agent and the fleet: latency histograms, distribution
sketches of inputs and outputs, and drift scores against a package's reference statistics."""

from __future__ import annotations

from .histogram import DEFAULT_RELATIVE_ACCURACY, HistogramData, LatencyHistogram
from .sketch import (
    MIN_SAMPLES,
    REFERENCE_SCHEMA,
    DistributionSketch,
    DriftScore,
    FeatureGroup,
    ReferenceStats,
    SketchData,
    SketchGroupData,
    extract_features,
    jensen_shannon,
    noise_floor,
    plan_group,
    psi,
    sketch_from_data,
)

__all__ = [
    "DEFAULT_RELATIVE_ACCURACY",
    "MIN_SAMPLES",
    "REFERENCE_SCHEMA",
    "DistributionSketch",
    "DriftScore",
    "FeatureGroup",
    "HistogramData",
    "LatencyHistogram",
    "ReferenceStats",
    "SketchData",
    "SketchGroupData",
    "extract_features",
    "jensen_shannon",
    "noise_floor",
    "plan_group",
    "psi",
    "sketch_from_data",
]
