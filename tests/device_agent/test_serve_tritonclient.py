"""Acceptance: tritonclient (HTTP JSON, HTTP binary, gRPC) against ``edgeserve agent serve``.

The server runs as the real CLI in its own process, on an ONNX and on a TFLite artifact, and
every client gets exactly the numbers the Python API computes from the same cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edgeserve.device_agent import Agent
from edgeserve.profiles import load_profile
from tests.device_agent.serving import serve_cli

X = np.random.default_rng(9).normal(size=(6, 4)).astype(np.float32)
TOKEN = "s3cret-token"
CALL_TIMEOUT_S = 30.0  # every client call has a deadline: a hung server fails the test, not the run


@dataclass
class Served:
    http: str
    grpc: str
    expected: np.ndarray
    auth: dict[str, str]
    artifact: str

    @property
    def headers(self) -> dict[str, str]:
        # A fresh dict per call: tritonclient.http writes into the headers it is given.
        return dict(self.auth)


@pytest.fixture(scope="module", params=["onnx", "tflite"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           agent_assets: dict[str, Path]) -> Iterator[Served]:
    tflite = request.param == "tflite"
    profile = str(agent_assets["profile_tflite"]) if tflite else "generic-cpu"
    cache = tmp_path_factory.mktemp(f"serve-{request.param}") / "cache"
    with Agent(cache, load_profile(profile), [agent_assets["public_key"]]) as agent:
        info = agent.install(agent_assets["pkg_v1"])
        expected = agent.predict("toy", {"x": X}).outputs["y"]
    auth = ["--auth", f"token:{TOKEN}"] if tflite else []
    with serve_cli(cache, "--profile", profile, "--workers", "2", *auth) as server:
        yield Served(server.http, server.grpc, expected,
                     {"authorization": f"Bearer {TOKEN}"} if tflite else {}, info.artifact_id)


@pytest.mark.slow
@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_http(served: Served, binary: bool) -> None:
    """tritonclient.http in JSON and binary mode gets the Python API's numbers exactly."""
    import tritonclient.http as httpclient

    with contextlib.closing(httpclient.InferenceServerClient(
            served.http, connection_timeout=10, network_timeout=CALL_TIMEOUT_S)) as client:
        assert client.is_server_live(headers=served.headers)
        assert client.is_model_ready("toy", headers=served.headers)
        meta = client.get_model_metadata("toy", headers=served.headers)
        assert meta["inputs"][0]["shape"] == [-1, 4]
        tensor = httpclient.InferInput("x", list(X.shape), "FP32")
        tensor.set_data_from_numpy(X, binary_data=binary)
        result = client.infer("toy", [tensor], headers=served.headers, request_id="abc",
                              outputs=[httpclient.InferRequestedOutput("y", binary_data=binary)])
        np.testing.assert_array_equal(result.as_numpy("y"), served.expected)
        assert result.get_response()["id"] == "abc"
        default = client.infer("toy", [tensor], headers=served.headers, model_version="1.0.0")
        np.testing.assert_array_equal(default.as_numpy("y"), served.expected)


@pytest.mark.slow
def test_tritonclient_grpc(served: Served) -> None:
    """tritonclient.grpc (raw tensor contents) gets the Python API's numbers exactly."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    # gRPC calls wait forever unless given a deadline: every call here has one
    t = CALL_TIMEOUT_S
    with contextlib.closing(grpcclient.InferenceServerClient(served.grpc)) as client:
        assert client.is_server_live(client_timeout=t)
        assert client.is_model_ready("toy", headers=served.headers, client_timeout=t)
        meta = client.get_model_metadata("toy", headers=served.headers, as_json=True,
                                         client_timeout=t)
        assert meta["inputs"][0]["datatype"] == "FP32"
        tensor = grpcclient.InferInput("x", list(X.shape), "FP32")
        tensor.set_data_from_numpy(X)
        result = client.infer("toy", [tensor], headers=served.headers, client_timeout=t,
                              outputs=[grpcclient.InferRequestedOutput("y")])
        np.testing.assert_array_equal(result.as_numpy("y"), served.expected)
        with pytest.raises(InferenceServerException, match="NOT_FOUND|unknown model"):
            client.infer("nope", [tensor], headers=served.headers, client_timeout=t)
        wrong = grpcclient.InferInput("x", [6, 5], "FP32")
        wrong.set_data_from_numpy(np.zeros((6, 5), np.float32))
        with pytest.raises(InferenceServerException, match="axis 1 must be 4"):
            client.infer("toy", [wrong], headers=served.headers, client_timeout=t)
        if served.auth:
            with pytest.raises(InferenceServerException, match="UNAUTHENTICATED|credentials"):
                client.infer("toy", [tensor], client_timeout=t)
