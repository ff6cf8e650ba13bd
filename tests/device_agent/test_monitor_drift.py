"""The drift the device puts in each window, from real ONNX Runtime inference through the Agent,
against a 64-sample reference (the smallest the converter makes): no false alarm on traffic from
the calibration distribution, a clear one on shifted traffic, none at all below the minimum."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from edgeserve.device_agent.agent import Agent
from edgeserve.device_agent.telemetry.monitor import Monitor
from edgeserve.device_agent.telemetry.outbox import Outbox
from edgeserve.telemetry import MIN_SAMPLES
from edgeserve.testing import make_keypair
from tests.integration.telemetry_models import mlp_package


def test_window_drift_against_a_64_sample_reference(tmp_path: Path,
                                                    resources: contextlib.ExitStack) -> None:
    """Windows of 50 and 200 calibration-like requests: PSI < 0.1 for inputs and outputs;
    200 requests shifted by one sigma: PSI > 0.25; 20 requests: sketches but no drift score."""
    key = make_keypair(tmp_path / "keys")
    agent = resources.enter_context(Agent(tmp_path / "cache", trusted_keys=[key.public_path],
                                          warmup=False))
    agent.install(mlp_package(tmp_path / "toy.edgepkg", key, samples=64))
    outbox = resources.enter_context(Outbox(tmp_path / "o.db"))
    monitor = Monitor(outbox, references=agent.reference_stats, bin_rows=64,
                      max_sketch_rate=None)
    assert monitor.watch("toy", "1.0.0")
    agent.add_observer(monitor)
    rng = np.random.default_rng(21)
    # the package's calibration inputs are N(0, 1)
    plan = [(20, 0.0)] + [(MIN_SAMPLES, 0.0)] * 4 + [(200, 0.0)] * 2 + [(200, 1.0)] * 2
    for count, shift in plan:
        for row in rng.normal(shift, 1, (count, 1, 4)).astype(np.float32):
            agent.predict("toy", {"x": row})
        monitor.flush()
    found: list[dict[str, Any]] = [w for w in (json.loads(r.data) for r in
                                               outbox.pending(limit=100)) if "model" in w]
    assert [w["requests"] for w in found] == [count for count, _ in plan]
    tiny, *same, shift_a, shift_b = found
    assert "inputs" in tiny and "drift_inputs" not in tiny and "drift_outputs" not in tiny
    for window in same:
        assert window["drift_inputs"]["psi"] < 0.1 and window["drift_outputs"]["psi"] < 0.1
    for window in (shift_a, shift_b):
        assert window["drift_inputs"]["psi"] > 0.25
