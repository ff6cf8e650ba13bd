"""Cohort drift from merged sketches: over all samples, not an average of per-window scores."""

from __future__ import annotations

import json

import numpy as np

from edgeserve.contract import Window, encode
from edgeserve.fleet.rollouts.metrics import Accumulator
from edgeserve.telemetry import DistributionSketch, ReferenceStats

RNG = np.random.default_rng(4)
REFERENCE = ReferenceStats.from_arrays({"x": RNG.normal(0, 1, (3000, 8))},
                                       {"y": RNG.normal(0, 1, (3000, 3))})


def _windows(shift: float, count: int = 60, per_window: int = 10) -> list[dict[str, object]]:
    out = []
    for seq in range(1, count + 1):
        inputs = DistributionSketch(REFERENCE, "input")
        outputs = DistributionSketch(REFERENCE, "output")
        inputs.update({"x": RNG.normal(shift, 1, (per_window, 8))})
        outputs.update({"y": RNG.normal(0, 1, (per_window, 3))})
        window = Window(seq=seq, start=seq, end=seq + 1, model="m", version="1.0.0",
                        requests=per_window, inputs=inputs.to_data(), outputs=outputs.to_data(),
                        drift_inputs=inputs.drift(), drift_outputs=outputs.drift())
        out.append(json.loads(encode(window)))
    return out


def _drift(windows: list[dict[str, object]], with_reference: bool) -> float | None:
    acc = Accumulator(references=(lambda m, v: REFERENCE) if with_reference else None)
    for data in windows:
        acc.add_window(data, shadow_mode=False)
    value: float | None = acc.metrics().drift_psi
    return value


def test_merged_sketches_see_no_drift_where_small_windows_have_no_score() -> None:
    """60 in-distribution windows of 10 samples: merged PSI is small; the windows are too small
    for a score of their own, so without the reference there is no drift number at all (it used
    to be their mean plug-in PSI, > 0.5)."""
    same = _windows(0.0)
    merged = _drift(same, with_reference=True)
    assert merged is not None and merged < 0.1
    assert all("drift_inputs" not in w for w in same)
    assert _drift(same, with_reference=False) is None


def test_merged_sketches_still_catch_a_shift() -> None:
    """A one-sigma shift in the inputs gives a high merged PSI."""
    merged = _drift(_windows(1.0), with_reference=True)
    assert merged is not None and merged > 0.5
