"""Acceptance: tritonclient (HTTP JSON, HTTP binary, gRPC) against ``edgeserve agent serve``.

The server runs as the real CLI in its own process, on an ONNX and on a TFLite artifact, and
every client gets exactly the numbers the Python API computes from the same cache.
"""

from __future__ import annotations

import contextlib
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

from edgeserve._process import popen
from edgeserve.device_agent import Agent
from edgeserve.profiles import load_profile
from tests.services import free_port

X = np.random.default_rng(9).normal(size=(6, 4)).astype(np.float32)
TOKEN = "s3cret-token"
CALL_TIMEOUT_S = 30.0  # every client call has a deadline: a hung server fails the test, not the run
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
        process = popen(args, stdout=sink, stderr=subprocess.STDOUT,
                        env={**os.environ, "EDGESERVE_TRUSTED_KEYS": ""})
    try:
        _wait_ready(process, http_port, log)
    except BaseException:  # whatever went wrong, the server does not outlive this
        process.kill()
        process.wait()
        raise
    return process, http_port, grpc_port


def _wait_ready(process: subprocess.Popen[bytes], http_port: int, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"agent serve exited: {log.read_text()[-2000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{http_port}/v2/health/ready",
                            timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
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
            process.wait()


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
