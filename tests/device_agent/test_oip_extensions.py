"""The extensions ``GET /v2`` advertises answer: tritonclient's repository index and statistics
calls over HTTP and gRPC against ``edgeserve agent serve`` (one real server process, two
installed versions), with counts that follow the requests actually made."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests

from edgeserve.device_agent import Agent
from tests.device_agent.serving import serve_cli

CALL_TIMEOUT_S = 30.0
X = np.random.default_rng(3).normal(size=(5, 4)).astype(np.float32)


@dataclass
class Served:
    http: str
    grpc: str


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory,
           agent_assets: dict[str, Path]) -> Iterator[Served]:
    """``agent serve`` (HTTP + gRPC) over a cache with toy 1.0.0 (staged) and 1.1.0 (active)."""
    cache = tmp_path_factory.mktemp("oip-ext") / "cache"
    with Agent(cache, trusted_keys=[agent_assets["public_key"]]) as agent:
        agent.install(agent_assets["pkg_v1"])
        agent.install(agent_assets["pkg_v2"])
    with serve_cli(cache) as server:
        yield Served(server.http, server.grpc)


def _stats_by_version(stats: dict) -> dict[str, dict]:  # type: ignore[type-arg]
    return {s["version"]: s for s in stats["model_stats"]}


@pytest.mark.slow
def test_tritonclient_http_repository_index_and_statistics(served: Served) -> None:
    """Over HTTP the index lists both versions (the active one READY) and the statistics count
    this test's successful samples, executions and failures for the version that served."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    with contextlib.closing(httpclient.InferenceServerClient(
            served.http, connection_timeout=10, network_timeout=CALL_TIMEOUT_S)) as client:
        assert {"model_repository", "statistics"} <= set(
            client.get_server_metadata()["extensions"])
        index = client.get_model_repository_index()
        assert {(m["name"], m["version"], m["state"]) for m in index} == {
            ("toy", "1.1.0", "READY"), ("toy", "1.0.0", "UNAVAILABLE")}
        assert next(m for m in index if m["version"] == "1.0.0")["reason"]
        ready = requests.post(f"http://{served.http}/v2/repository/index", json={"ready": True},
                              timeout=CALL_TIMEOUT_S).json()
        assert [(m["version"], m["state"]) for m in ready] == [("1.1.0", "READY")]

        before = _stats_by_version(client.get_inference_statistics("toy"))["1.1.0"]
        tensor = httpclient.InferInput("x", list(X.shape), "FP32")
        tensor.set_data_from_numpy(X)
        for _ in range(3):
            client.infer("toy", [tensor], model_version="1.1.0")
        wrong = httpclient.InferInput("x", [2, 5], "FP32")
        wrong.set_data_from_numpy(np.zeros((2, 5), np.float32))
        with pytest.raises(InferenceServerException):
            client.infer("toy", [wrong], model_version="1.1.0")

        after = _stats_by_version(client.get_inference_statistics("toy"))["1.1.0"]
        assert after["inference_count"] - before["inference_count"] == 3 * len(X)
        assert after["execution_count"] - before["execution_count"] == 3
        success, fail = after["inference_stats"]["success"], after["inference_stats"]["fail"]
        assert success["count"] - before["inference_stats"]["success"]["count"] == 3
        assert fail["count"] - before["inference_stats"]["fail"]["count"] == 1
        assert success["ns"] > before["inference_stats"]["success"]["ns"]
        assert after["last_inference"] >= int(time.time() * 1000) - 60_000

        one = client.get_inference_statistics("toy", "1.0.0")["model_stats"]
        assert [(s["name"], s["version"]) for s in one] == [("toy", "1.0.0")]
        every = client.get_inference_statistics()["model_stats"]
        assert {(s["name"], s["version"]) for s in every} == {("toy", "1.0.0"),
                                                              ("toy", "1.1.0")}
        with pytest.raises(InferenceServerException, match="unknown model"):
            client.get_inference_statistics("nope")


@pytest.mark.slow
def test_tritonclient_grpc_repository_index_and_statistics(served: Served) -> None:
    """Over gRPC, RepositoryIndex and ModelStatistics answer tritonclient with the same facts,
    and a request counted over HTTP shows up there too (one bookkeeping for both)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    t = CALL_TIMEOUT_S
    with contextlib.closing(grpcclient.InferenceServerClient(served.grpc)) as client:
        assert {"model_repository", "statistics"} <= set(
            client.get_server_metadata(as_json=True, client_timeout=t)["extensions"])
        index = client.get_model_repository_index(as_json=True, client_timeout=t)["models"]
        assert {(m["name"], m["version"], m["state"]) for m in index} == {
            ("toy", "1.1.0", "READY"), ("toy", "1.0.0", "UNAVAILABLE")}

        def count() -> int:
            stats = client.get_inference_statistics("toy", "1.1.0", as_json=True,
                                                    client_timeout=t)
            (entry,) = stats["model_stats"]
            return int(entry.get("inference_count", 0))

        before = count()
        tensor = grpcclient.InferInput("x", list(X.shape), "FP32")
        tensor.set_data_from_numpy(X)
        client.infer("toy", [tensor], client_timeout=t)
        requests.post(f"http://{served.http}/v2/models/toy/infer", timeout=t, json={
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                        "data": [0.0, 1.0, 2.0, 3.0]}]}).raise_for_status()
        assert count() - before == len(X) + 1
        stats = client.get_inference_statistics("toy", as_json=True, client_timeout=t)
        assert {s["version"] for s in stats["model_stats"]} == {"1.0.0", "1.1.0"}
        with pytest.raises(InferenceServerException, match="NOT_FOUND|unknown model"):
            client.get_inference_statistics("nope", client_timeout=t)
