"""Cohort drift from merged sketches: exact over all samples, unlike per-window PSI averages."""

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


def _drift(windows: list[dict[str, object]], with_reference: bool) -> float:
    acc = Accumulator(references=(lambda m, v: REFERENCE) if with_reference else None)
    for data in windows:
        acc.add_window(data, shadow_mode=False)
    value = acc.metrics().drift_psi
    assert value is not None
    return value


def test_merged_sketches_see_no_drift_where_small_windows_would() -> None:
    """60 in-distribution windows of 10 samples: merged PSI is small; the window mean is not."""
    same = _windows(0.0)
    assert _drift(same, with_reference=True) < 0.1
    assert _drift(same, with_reference=False) > 0.5  # the bias this avoids


def test_merged_sketches_still_catch_a_shift() -> None:
    """A one-sigma shift in the inputs gives a high merged PSI."""
    assert _drift(_windows(1.0), with_reference=True) > 0.5
