"""Experiments on the device: traffic splits, feedback for past predictions, shadow comparison."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from edgeserve.device_agent.agent import Agent
from edgeserve.device_agent.server import start_http_server
from edgeserve.errors import ConfigError, InvalidInputError, ModelNotFoundError
from edgeserve.testing import KeyPair
from tests.support import wait_until

from .models import build_mlp_package

RNG = np.random.default_rng(3)
XS = RNG.normal(size=(400, 1, 4)).astype(np.float32)


@pytest.fixture
def agent(tmp_path: Path, keypair: KeyPair) -> Iterator[Agent]:
    with Agent(tmp_path / "cache", "generic-cpu", [keypair.public_path], feedback=True) as a:
        a.install(build_mlp_package(tmp_path / "v1.edgepkg", keypair, "1.0.0", 1, seed=1,
                                    tflite=False))
        a.install(build_mlp_package(tmp_path / "v2.edgepkg", keypair, "2.0.0", 2, seed=2,
                                    tflite=False), activate=False)
        a.install(build_mlp_package(tmp_path / "v3.edgepkg", keypair, "3.0.0", 3, seed=1,
                                    tflite=False), activate=False)
        yield a


def test_traffic_split_by_weight_and_sticky_keys(agent: Agent) -> None:
    """Requests split ~30/70 by weight; one request key always lands on the same version."""
    agent.set_traffic("toy", {"1.0.0": 0.3, "2.0.0": 0.7})
    counts = Counter(agent.predict("toy", {"x": XS[i % 400]}).version for i in range(2000))
    assert abs(counts["2.0.0"] / 2000 - 0.7) < 0.05
    for user in ("alice", "bob", "carol"):
        seen = {agent.predict("toy", {"x": XS[0]}, request_key=user).version for _ in range(20)}
        assert len(seen) == 1
    keyed = Counter(agent.predict("toy", {"x": XS[0]}, request_key=f"user-{i}").version
                    for i in range(2000))
    assert abs(keyed["2.0.0"] / 2000 - 0.7) < 0.05
    assert agent.predict("toy", {"x": XS[0]}, version="1.0.0").version == "1.0.0"
    agent.set_traffic("toy", {})
    assert {agent.predict("toy", {"x": XS[0]}).version for _ in range(20)} == {"1.0.0"}


def test_traffic_to_missing_version_is_refused(agent: Agent) -> None:
    """A split naming a version that is not installed is a clear error."""
    with pytest.raises(ModelNotFoundError, match="not installed"):
        agent.set_traffic("toy", {"1.0.0": 1, "9.9.9": 1})


def test_feedback_is_joined_to_the_answering_version(agent: Agent) -> None:
    """Rewards and labels attach to the version that answered, once, with precise errors."""
    agent.set_traffic("toy", {"1.0.0": 1, "2.0.0": 1})
    results = [agent.predict("toy", {"x": XS[i]}) for i in range(40)]
    for r in results:
        top1 = int(np.argmax(r.outputs["y"][0]))
        assert r.request_id is not None
        agent.feedback(r.request_id, reward=1.0 if r.version == "2.0.0" else 0.0, label=top1)
    assert agent.feedback_log is not None
    sums = agent.feedback_log.drain()
    by_version = Counter(r.version for r in results)
    assert {k[1]: v.count for k, v in sums.items()} == dict(by_version)
    assert sums[("toy", "2.0.0")].reward_sum == by_version["2.0.0"]
    assert all(s.correct == s.labeled == s.count for s in sums.values())
    first = results[0].request_id
    assert first is not None
    with pytest.raises(InvalidInputError, match="already has feedback"):
        agent.feedback(first, reward=1)
    fresh = agent.predict("toy", {"x": XS[0]}).request_id
    assert fresh is not None
    with pytest.raises(InvalidInputError, match="unknown or expired"):
        agent.feedback("nope", reward=1)
    with pytest.raises(InvalidInputError, match="must be a number"):
        agent.feedback(fresh, reward="1")
    with pytest.raises(InvalidInputError, match="out of range"):
        agent.feedback(fresh, reward=float("nan"))
    with pytest.raises(InvalidInputError, match="out of range"):
        agent.feedback(fresh, label=7)
    with pytest.raises(InvalidInputError, match="not one of the model's labels"):
        agent.feedback(fresh, label="zebra")
    agent.feedback(fresh, label="b")


def test_feedback_off_is_a_clear_error(tmp_path: Path, keypair: KeyPair) -> None:
    """An agent without feedback says how to turn it on."""
    with Agent(tmp_path / "c2", "generic-cpu", [keypair.public_path]) as plain, \
            pytest.raises(ConfigError, match="feedback is off"):
        plain.feedback("x", reward=1)


def _wait_compared(agent: Agent, expected: int) -> dict[str, float]:
    """Sum drained shadow reports until ``expected`` comparisons arrived (10 s at most)."""
    total = {"compared": 0.0, "disagreements": 0.0, "max_abs_diff": 0.0, "latency_n": 0.0}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and total["compared"] < expected:
        for (model, active), report in agent.shadows.drain().items():
            assert (model, active) == ("toy", "1.0.0")
            total["compared"] += report.compared
            total["disagreements"] += report.disagreements
            total["max_abs_diff"] = max(total["max_abs_diff"], report.max_abs_diff)
            total["latency_n"] += report.latency.n if report.latency else 0
        time.sleep(0.05)
    return total


def test_shadow_measures_disagreement_off_the_answer_path(agent: Agent) -> None:
    """A different model disagrees often; an identical one never; the active version answers."""
    agent.set_shadow("toy", "2.0.0")
    answers = {agent.predict("toy", {"x": XS[i]}).version for i in range(50)}
    assert answers == {"1.0.0"}
    report = _wait_compared(agent, 50)
    assert report["compared"] == 50 and report["latency_n"] == 50
    assert report["disagreements"] > 5
    agent.set_shadow("toy", "3.0.0")  # same weights as 1.0.0
    for i in range(30):
        agent.predict("toy", {"x": XS[i]})
    same = _wait_compared(agent, 30)
    assert same["compared"] == 30
    assert same["disagreements"] == 0 and same["max_abs_diff"] < 1e-5
    agent.set_shadow("toy", None)
    agent.predict("toy", {"x": XS[0]})
    # "nothing compared" means something only once a later comparison came through the same
    # (first in, first out) queue: a sentinel answered by 2.0.0, so that its report is told
    # apart from one for the unshadowed request, which 1.0.0 answered
    agent.set_shadow("toy", "3.0.0")
    agent.predict("toy", {"x": XS[1]}, version="2.0.0")
    reports: dict[tuple[str, str], float] = {}

    def sentinel_compared() -> bool:
        for key, report in agent.shadows.drain().items():
            reports[key] = reports.get(key, 0) + report.compared
        return ("toy", "2.0.0") in reports

    wait_until(sentinel_compared, 10, "the sentinel request's shadow comparison")
    assert reports == {("toy", "2.0.0"): 1}


def test_http_feedback_endpoint(agent: Agent) -> None:
    """Over HTTP an inference without an id gets one, and feedback for it is accepted."""
    handle = start_http_server(agent, workers=1)
    try:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                            "data": XS[0].ravel().tolist()}],
                "parameters": {"request_key": "user-1"}}
        answer = requests.post(f"{handle.url}/v2/models/toy/infer", json=body, timeout=5).json()
        assert answer["id"]
        ok = requests.post(f"{handle.url}/v2/models/toy/feedback", timeout=5,
                           json={"id": answer["id"], "reward": 1, "label": 0})
        assert ok.status_code == 200 and ok.json()["model_version"] == answer["model_version"]
        for bad, message in (({"id": "missing", "reward": 1}, "unknown or expired"),
                             ({"id": answer["id"], "reward": True}, "must be a number"),
                             ({"reward": 1}, "prediction's id"),
                             ({"id": answer["id"], "score": 1}, "unknown feedback field")):
            response = requests.post(f"{handle.url}/v2/models/toy/feedback", json=bad, timeout=5)
            assert response.status_code == 400 and message in response.json()["error"]
    finally:
        handle.stop()
