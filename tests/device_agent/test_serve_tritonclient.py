"""Acceptance: tritonclient (HTTP JSON, HTTP binary, gRPC) against ``edgeserve agent serve``.

The server runs as the real CLI in its own process, on an ONNX and on a TFLite artifact, and
every client gets exactly the numbers the Python API computes from the same cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests

from edgeserve.device_agent import Agent
from edgeserve.profiles import load_profile
from tests.services import free_port

X = np.random.default_rng(9).normal(size=(6, 4)).astype(np.float32)
TOKEN = "s3cret-token"
EDGESERVE = str(Path(sys.executable).parent / "edgeserve")


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


def _serve(cache: Path, profile: str, auth: str | None) -> tuple[subprocess.Popen[bytes], int,
                                                                  int]:
    log = cache.parent / "serve.log"
    http_port, grpc_port = free_port(), free_port()
    args = [EDGESERVE, "agent", "serve", "--cache", str(cache), "--profile", profile,
            "--port", str(http_port), "--grpc-port", str(grpc_port), "--workers", "2"]
    if auth:
        args += ["--auth", auth]
    with log.open("wb") as sink:
        process = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT,
                                   env={**os.environ, "EDGESERVE_TRUSTED_KEYS": ""})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"agent serve exited: {log.read_text()[-2000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{http_port}/v2/health/ready",
                            timeout=1).status_code == 200:
                return process, http_port, grpc_port
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("agent serve did not become ready in 60 s")


@pytest.fixture(scope="module", params=["onnx", "tflite"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           agent_assets: dict[str, Path]) -> Iterator[Served]:
    tflite = request.param == "tflite"
    profile = str(agent_assets["profile_tflite"]) if tflite else "generic-cpu"
    cache = tmp_path_factory.mktemp(f"serve-{request.param}") / "cache"
    with Agent(cache, load_profile(profile), [agent_assets["public_key"]]) as agent:
        info = agent.install(agent_assets["pkg_v1"])
        expected = agent.predict("toy", {"x": X}).outputs["y"]
    auth = f"token:{TOKEN}" if tflite else None
    process, http_port, grpc_port = _serve(cache, profile, auth)
    try:
        yield Served(f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", expected,
                     {"authorization": f"Bearer {TOKEN}"} if tflite else {}, info.artifact_id)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.mark.slow
@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_http(served: Served, binary: bool) -> None:
    """tritonclient.http in JSON and binary mode gets the Python API's numbers exactly."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(served.http)
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

    client = grpcclient.InferenceServerClient(served.grpc)
    assert client.is_server_live()
    assert client.is_model_ready("toy", headers=served.headers)
    meta = client.get_model_metadata("toy", headers=served.headers, as_json=True)
    assert meta["inputs"][0]["datatype"] == "FP32"
    tensor = grpcclient.InferInput("x", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    result = client.infer("toy", [tensor], headers=served.headers,
                          outputs=[grpcclient.InferRequestedOutput("y")])
    np.testing.assert_array_equal(result.as_numpy("y"), served.expected)
    with pytest.raises(InferenceServerException, match="NOT_FOUND|unknown model"):
        client.infer("nope", [tensor], headers=served.headers)
    wrong = grpcclient.InferInput("x", [6, 5], "FP32")
    wrong.set_data_from_numpy(np.zeros((6, 5), np.float32))
    with pytest.raises(InferenceServerException, match="axis 1 must be 4"):
        client.infer("toy", [wrong], headers=served.headers)
    if served.auth:
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED|credentials"):
            client.infer("toy", [tensor])
