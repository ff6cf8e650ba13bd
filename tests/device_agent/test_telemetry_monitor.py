"""Monitoring windows from real ONNX Runtime inference through the real Agent."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeserve.device_agent.agent import Agent
from edgeserve.device_agent.observe import InferenceEvent
from edgeserve.device_agent.telemetry.health import read_health
from edgeserve.device_agent.telemetry.monitor import Monitor
from edgeserve.device_agent.telemetry.outbox import Outbox
from edgeserve.errors import EdgeserveError
from edgeserve.telemetry import ReferenceStats
from edgeserve.testing import KeyPair
from tests.integration.telemetry_models import mlp_package


@pytest.fixture(scope="module")
def toy_pkg(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, KeyPair]:
    from edgeserve.testing import make_keypair

    root = tmp_path_factory.mktemp("monitor-pkg")
    key = make_keypair(root / "keys")
    return mlp_package(root / "toy.edgepkg", key), key


@pytest.fixture
def agent(tmp_path: Path, toy_pkg: tuple[Path, KeyPair]) -> Iterator[Agent]:
    pkg, key = toy_pkg
    with Agent(tmp_path / "cache", trusted_keys=[key.public_path], warmup=False) as a:
        a.install(pkg)
        yield a


@pytest.fixture
def outbox(tmp_path: Path, resources: contextlib.ExitStack) -> Outbox:
    """The test's outbox, closed afterwards whatever happened."""
    return resources.enter_context(Outbox(tmp_path / "o.db"))


def windows_of(outbox: Outbox) -> list[dict[str, Any]]:
    return [json.loads(r.data) for r in outbox.pending(limit=10_000)]


def test_windows_count_requests_errors_and_latency(outbox: Outbox, agent: Agent) -> None:
    """Every request is counted; failed ones as errors; latency only for successes."""
    monitor = Monitor(outbox, references=agent.reference_stats)
    agent.add_observer(monitor)
    x = np.random.default_rng(2).normal(size=(1, 4)).astype(np.float32)
    for _ in range(40):
        agent.predict("toy", {"x": x})
    for _ in range(3):
        with pytest.raises(EdgeserveError):
            agent.predict("toy", {"x": np.zeros((1, 5), np.float32)})
    monitor.flush()
    model, health = windows_of(outbox)
    assert (model["model"], model["version"]) == ("toy", "1.0.0")
    assert (model["requests"], model["errors"], model["latency"]["n"]) == (43, 3, 40)
    assert model["seq"] == 1 and health["seq"] == 2
    assert "model" not in health and health["health"]["mem_total_mb"] > 0


def test_drift_is_low_in_distribution_and_high_when_inputs_shift(outbox: Outbox,
                                                                 agent: Agent) -> None:
    """Inputs like the calibration data score PSI < 0.1; shifted inputs score > 0.25."""
    monitor = Monitor(outbox, references=agent.reference_stats, bin_rows=64,
                      max_sketch_rate=None)
    assert monitor.watch("toy", "1.0.0")
    agent.add_observer(monitor)
    rng = np.random.default_rng(3)
    for row in rng.normal(size=(600, 1, 4)).astype(np.float32):
        agent.predict("toy", {"x": row})
    monitor.flush()
    for batch in rng.normal(loc=1.5, size=(60, 10, 4)).astype(np.float32):
        agent.predict("toy", {"x": batch})
    monitor.flush()
    same, _, shifted, _ = windows_of(outbox)
    assert same["drift_inputs"]["psi"] < 0.1 and same["drift_inputs"]["n"] == 600
    assert shifted["drift_inputs"]["psi"] > 0.25 and shifted["drift_inputs"]["n"] == 600
    assert shifted["drift_outputs"]["psi"] > same["drift_outputs"]["psi"]
    assert sum(shifted["inputs"]["g"][0]["c"][0]) == 600


def test_busy_versions_are_sketched_on_a_stride_from_their_first_requests(
        outbox: Outbox) -> None:
    """With max_sketch_rate=128: a burst at 1024 requests/s is sketched at ~128 samples/s within
    its first window (after a few dozen requests), the next window at that rate starts on the
    stride, and a version whose load then drops is sketched on every request again within the
    same window; requests and latency always count every request."""
    now = [0.0]
    reference = ReferenceStats.from_arrays({"x": np.random.default_rng(1).normal(size=(200, 4))},
                                           {})
    monitor = Monitor(outbox, window_s=60, references=lambda m, v: reference,
                      health=lambda: None, max_sketch_rate=128, clock=lambda: now[0])
    monitor.watch("m", "1")
    event = InferenceEvent("m", "1", {"x": np.zeros((1, 4))}, {"y": np.zeros((1, 1))}, 1.0)

    def requests(count: int, interval_s: float) -> None:
        for _ in range(count):
            monitor.on_inference(event)
            now[0] += interval_s

    requests(4096, 1 / 1024)  # 4 s at 1024/s
    monitor.flush(now[0])
    requests(1024, 1 / 1024)  # 1 s more at 1024/s
    monitor.flush(now[0])
    requests(200, 0.25)  # 50 s at 4/s, after a window at 1024/s
    monitor.flush(now[0])
    burst, steady, quiet = (w for w in windows_of(outbox) if "model" in w)
    assert burst["requests"] == burst["latency"]["n"] == 4096
    assert 4 * 128 <= burst["drift_inputs"]["n"] <= 4 * 128 + 40
    assert steady["requests"] == steady["latency"]["n"] == 1024
    assert 128 <= steady["drift_inputs"]["n"] <= 130
    assert quiet["requests"] == quiet["latency"]["n"] == 200
    assert quiet["drift_inputs"]["n"] >= 200 - 32


def test_windows_align_to_the_clock_and_health_comes_every_window(outbox: Outbox) -> None:
    """Window ends fall on multiples of window_s; an idle window still has a health window."""
    now = [1000.0]
    monitor = Monitor(outbox, window_s=60, clock=lambda: now[0])
    assert monitor.next_boundary(1000.0) == 1020.0
    event = InferenceEvent("m", "1", {"x": np.zeros((1, 2))}, {"y": np.zeros((1, 1))}, 1.5)
    monitor.on_inference(event)
    monitor.flush(1020.0)
    monitor.flush(1080.0)
    got = windows_of(outbox)
    assert [(w.get("model"), w["start"], w["end"]) for w in got] == [
        ("m", 1000.0, 1020.0), (None, 1000.0, 1020.0), (None, 1020.0, 1080.0)]
    assert "inputs" not in got[0]  # no reference: counts and latency only


def test_concurrent_requests_are_all_counted_across_window_closes(
        tmp_path: Path, resources: contextlib.ExitStack) -> None:
    """Requests from several threads while windows close are each counted exactly once, in
    the request counts and in the (batched) latency histograms."""
    outbox = resources.enter_context(Outbox(tmp_path / "o.db", synchronous="normal"))
    monitor = Monitor(outbox, health=lambda: None)
    event = InferenceEvent("m", "1", {"x": np.ones((1, 4))}, {"y": np.ones((1, 3))}, 0.7)
    stop = threading.Event()

    def closer() -> None:
        while not stop.is_set():
            monitor.flush()

    def client() -> None:
        for _ in range(2000):
            monitor.on_inference(event)

    closing = threading.Thread(target=closer)
    closing.start()
    clients = [threading.Thread(target=client) for _ in range(4)]
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    stop.set()
    closing.join()
    monitor.flush()
    windows = windows_of(outbox)
    assert sum(w.get("requests", 0) for w in windows) == 8000
    assert sum(w["latency"]["n"] for w in windows if "latency" in w) == 8000


def test_the_observer_never_raises(outbox: Outbox, agent: Agent) -> None:
    """Events the sketches cannot digest are counted as internal errors, not raised."""
    monitor = Monitor(outbox, references=agent.reference_stats, bin_rows=1)
    monitor.watch("toy", "1.0.0")
    weird = InferenceEvent("toy", "1.0.0", {"x": np.array(["a", "b"])},
                           {"y": np.zeros((2, 7))}, 1.0)
    monitor.on_inference(weird)
    monitor.flush()
    assert monitor.stats.internal_errors >= 1
    assert windows_of(outbox)[0]["requests"] == 1


def test_health_reads_memory_disk_and_load(tmp_path: Path) -> None:
    """Health has memory, free disk and CPU load on Linux; temperature only where readable."""
    health = read_health(tmp_path)
    assert health.mem_total_mb and health.mem_used_mb is not None
    assert health.disk_free_mb is not None and health.cpu_load is not None


def test_sources_fill_window_fields_even_without_requests(outbox: Outbox) -> None:
    """Drained per-version data (e.g. feedback) lands in that version's window; a version with
    data but no requests in the window still gets one."""
    from edgeserve.contract import FeedbackSummary

    monitor = Monitor(outbox, health=lambda: None)
    pending = {("m", "1"): FeedbackSummary(count=3, reward_sum=2.0, reward_sumsq=2.0),
               ("m", "2"): FeedbackSummary(count=1, reward_sum=1.0, reward_sumsq=1.0)}
    monitor.add_source("feedback", lambda: dict(pending))
    monitor.on_inference(InferenceEvent("m", "1", {}, {}, 1.0))
    monitor.flush()
    by_version = {w["version"]: w for w in windows_of(outbox) if "model" in w}
    assert by_version["1"]["requests"] == 1 and by_version["1"]["feedback"]["count"] == 3
    assert by_version["2"]["requests"] == 0 and by_version["2"]["feedback"]["count"] == 1
