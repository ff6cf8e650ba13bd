"""The HTTP server in-process: OIP v2 JSON and binary tensors, precise errors, auth, limits."""

from __future__ import annotations

import base64
import gzip
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import numpy as np
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from edgeserve.device_agent import Agent
from edgeserve.device_agent.observe import InferenceEvent
from edgeserve.device_agent.server import (
    BasicAuth,
    BearerTokenAuth,
    HttpServerHandle,
    JwtAuth,
    start_http_server,
)

from .models import mlp_weights

X = np.random.default_rng(4).normal(size=(3, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory,
           agent_assets: dict[str, Path]) -> Iterator[tuple[Agent, HttpServerHandle]]:
    with Agent(tmp_path_factory.mktemp("http") / "cache",
               trusted_keys=[agent_assets["public_key"]]) as agent:
        agent.install(agent_assets["pkg_v1"])
        with start_http_server(agent, workers=2, queue=8, max_body_bytes=100_000) as handle:
            yield agent, handle


def _body(x: np.ndarray = X, **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                        "data": x.ravel().tolist()}], **extra}


def _post(url: str, body: Any, **kwargs: Any) -> requests.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(url, data=content, timeout=10, **kwargs)


def test_health_metadata_and_json_inference(served: tuple[Agent, HttpServerHandle]) -> None:
    """Health, server and model metadata, and a JSON inference that matches the Python API."""
    agent, handle = served
    assert requests.get(f"{handle.url}/v2/health/live", timeout=10).json() == {"live": True}
    assert requests.get(f"{handle.url}/v2/health/ready", timeout=10).status_code == 200
    assert "binary_tensor_data" in requests.get(f"{handle.url}/v2", timeout=10).json()["extensions"]
    meta = requests.get(f"{handle.url}/v2/models/toy", timeout=10).json()
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert requests.get(f"{handle.url}/v2/models/toy/versions/1.0.0/ready", timeout=10).json()["ready"]
    response = _post(f"{handle.url}/v2/models/toy/infer", _body(id="req-1"))
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["id"] == "req-1" and data["model_version"] == "1.0.0"
    out = np.array(data["outputs"][0]["data"], np.float32).reshape(data["outputs"][0]["shape"])
    np.testing.assert_array_equal(out, agent.predict("toy", {"x": X}).outputs["y"])


def test_binary_tensor_extension(served: tuple[Agent, HttpServerHandle]) -> None:
    """Binary inputs and outputs: JSON header + raw bytes, sized by binary_data_size."""
    agent, handle = served
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 4],
                                     "parameters": {"binary_data_size": X.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    response = _post(f"{handle.url}/v2/models/toy/infer", header + X.tobytes(),
                     headers={"Inference-Header-Content-Length": str(len(header))})
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    meta = json.loads(response.content[:length])
    out = np.frombuffer(response.content[length:], np.float32).reshape(meta["outputs"][0]["shape"])
    np.testing.assert_array_equal(out, agent.predict("toy", {"x": X}).outputs["y"])


@pytest.mark.parametrize(("body", "headers", "status", "message"), [
    (b"{not json", {}, 400, "not valid JSON"),
    ({"inputs": []}, {}, 400, "non-empty 'inputs'"),
    ({"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}, {},
     400, "missing input(s) ['x']"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3]}]}, {},
     400, "needs 4 values"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 5], "data": [1] * 5}]}, {},
     400, "axis 1 must be 4"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [4], "data": [1] * 4}]}, {},
     400, "expected rank 2"),
    ({"inputs": [{"name": "x", "datatype": "INT64", "shape": [1, 4], "data": [1] * 4}]}, {},
     400, "expected dtype float32"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": ["a"] * 4}]}, {},
     400, "string values"),
    ({"inputs": [{"name": "x", "datatype": "FP99", "shape": [1, 4], "data": [1] * 4}]}, {},
     400, "'datatype' must be one of"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                  "parameters": {"binary_data_size": 16}}]}, {}, 400, "runs past the end"),
    (b'{"inputs":[]}', {"Inference-Header-Content-Length": "999"}, 400,
     "Inference-Header-Content-Length is 999"),
    (_body(outputs=[{"name": "nope"}]), {}, 400, "requested output(s) ['nope']"),
    (b"x" * 100_001, {}, 413, "exceeds the limit"),
])
def test_bad_requests_get_precise_errors(served: tuple[Agent, HttpServerHandle], body: Any,
                                         headers: dict[str, str], status: int,
                                         message: str) -> None:
    """Malformed bodies, wrong tensors and oversize requests get the right status and message."""
    _, handle = served
    response = _post(f"{handle.url}/v2/models/toy/infer", body, headers=headers)
    assert response.status_code == status
    assert message in response.json()["error"]


def test_not_found_and_method_errors(served: tuple[Agent, HttpServerHandle]) -> None:
    """Unknown models, versions and paths are 404; a wrong method is 405; never a traceback."""
    _, handle = served
    assert _post(f"{handle.url}/v2/models/nope/infer", _body()).status_code == 404
    response = _post(f"{handle.url}/v2/models/toy/versions/9.9.9/infer", _body())
    assert response.status_code == 404 and "9.9.9" in response.json()["error"]
    assert requests.get(f"{handle.url}/v2/models/toy/versions/9.9.9", timeout=10).status_code == 404
    assert requests.get(f"{handle.url}/nowhere", timeout=10).status_code == 404
    for sneaky in ("...", "%2E%2E", "toy/versions/%2E%2E", "toy/versions/.hidden"):
        assert requests.get(f"{handle.url}/v2/models/{sneaky}/ready", timeout=10).status_code == 404
    response = requests.get(f"{handle.url}/v2/models/toy/infer", timeout=10)
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert "Traceback" not in response.text


def test_gzip_request_and_response(served: tuple[Agent, HttpServerHandle]) -> None:
    """gzip request bodies are accepted; gzip responses are sent when asked for."""
    _, handle = served
    big = np.random.default_rng(1).normal(size=(64, 4)).astype(np.float32)
    response = _post(f"{handle.url}/v2/models/toy/infer", gzip.compress(json.dumps(
        _body(big)).encode()), headers={"Content-Encoding": "gzip", "Accept-Encoding": "gzip"})
    assert response.status_code == 200 and response.headers.get("content-encoding") == "gzip"
    out = np.array(response.json()["outputs"][0]["data"], np.float32).reshape(64, 3)
    np.testing.assert_allclose(out, mlp_weights().forward(big), atol=1e-5)


def test_metrics_count_inferences(served: tuple[Agent, HttpServerHandle]) -> None:
    """/metrics exposes per-version inference counts and latency histograms."""
    _, handle = served
    _post(f"{handle.url}/v2/models/toy/infer", _body())
    text = requests.get(f"{handle.url}/metrics", timeout=10).text
    assert 'edgeserve_inference_total{model="toy",version="1.0.0",outcome="success"}' in text
    assert "edgeserve_inference_seconds_bucket" in text and "edgeserve_requests_total" in text


def test_full_queue_answers_503_with_retry_after(tmp_path: Path,
                                                 agent_assets: dict[str, Path]) -> None:
    """With every worker busy and no queue, a request is refused at once with 503 + Retry-After."""
    release = threading.Event()
    entered = threading.Event()

    class Blocker:
        def on_inference(self, event: InferenceEvent) -> None:
            entered.set()
            release.wait(10)

    with Agent(tmp_path / "c", trusted_keys=[agent_assets["public_key"]]) as agent:
        agent.install(agent_assets["pkg_v1"])
        with start_http_server(agent, workers=1, queue=0) as handle:
            agent.add_observer(Blocker())
            first = threading.Thread(target=_post, args=(f"{handle.url}/v2/models/toy/infer",
                                                         _body()))
            first.start()
            assert entered.wait(10)
            started = time.monotonic()
            response = _post(f"{handle.url}/v2/models/toy/infer", _body())
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
            assert time.monotonic() - started < 2
            release.set()
            first.join()
            assert _post(f"{handle.url}/v2/models/toy/infer", _body()).status_code == 200


def _rsa_pair() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_auth_schemes(tmp_path: Path, agent_assets: dict[str, Path]) -> None:
    """Bearer, JWT HS256/RS256 (expiry, audience, scope) and basic auth give 401/403/200."""
    private, public = _rsa_pair()
    now = int(time.time())
    hs = {"exp": now + 60, "aud": "edge"}
    cases = [
        (BearerTokenAuth(["s3cret"]), [("Bearer s3cret", 200), ("Bearer wrong", 401),
                                       (None, 401), (_basic("a", "b"), 401)]),
        (JwtAuth("k" * 32, "HS256", audience="edge", required_scope="infer"), [
            ("Bearer " + jwt.encode({**hs, "scope": "infer"}, "k" * 32, "HS256"), 200),
            ("Bearer " + jwt.encode({**hs, "scope": "read"}, "k" * 32, "HS256"), 403),
            ("Bearer " + jwt.encode({**hs, "scope": "infer", "exp": now - 10}, "k" * 32,
                                    "HS256"), 401),
            ("Bearer " + jwt.encode({**hs, "scope": "infer", "aud": "other"}, "k" * 32,
                                    "HS256"), 401),
            ("Bearer " + jwt.encode({"aud": "edge", "scope": "infer"}, "k" * 32, "HS256"), 401),
            ("Bearer " + jwt.encode({**hs, "scope": "infer"}, "x" * 32, "HS256"), 401)]),
        (JwtAuth(public, "RS256", audience="edge"), [
            ("Bearer " + jwt.encode(hs, private, "RS256"), 200),
            ("Bearer " + jwt.encode(hs, "k" * 32, "HS256"), 401)]),
        (BasicAuth({"ops": "pw", "svc": "sha256:" + __import__("hashlib").sha256(
            b"pw2").hexdigest()}), [(_basic("ops", "pw"), 200), (_basic("svc", "pw2"), 200),
                                    (_basic("ops", "nope"), 401), ("Basic !!!", 401)]),
    ]
    with Agent(tmp_path / "c", trusted_keys=[agent_assets["public_key"]]) as agent:
        agent.install(agent_assets["pkg_v1"])
        for auth, attempts in cases:
            with start_http_server(agent, auth=auth) as handle:
                assert requests.get(f"{handle.url}/v2/health/live", timeout=10).status_code == 200
                for header, status in attempts:
                    headers = {"Authorization": header} if header else {}
                    response = _post(f"{handle.url}/v2/models/toy/infer", _body(),
                                     headers=headers)
                    assert response.status_code == status, (type(auth).__name__, header,
                                                            response.text)
                    if status == 401:
                        assert "www-authenticate" in response.headers
                        assert "error" in response.json()


def test_a_body_beyond_what_the_model_can_take_is_refused_before_it_is_read(
        tmp_path: Path, agent_assets: dict[str, Path]) -> None:
    """A [batch, 4] model takes at most 1,024 samples: a 5 MB JSON body (well under the 64 MiB
    server limit) is a 413 naming the model's limit, declared or chunked, while the largest
    request the model can take is served. Once, a 60 MB float list took RSS to nearly 1 GB."""
    with Agent(tmp_path / "cache", trusted_keys=[agent_assets["public_key"]]) as agent:
        agent.install(agent_assets["pkg_v1"])
        with start_http_server(agent, workers=2, queue=8) as handle:
            url = f"{handle.url}/v2/models/toy/infer"
            huge = json.dumps(_body(np.zeros((300_000, 4), np.float32))).encode()
            assert len(huge) > 4_000_000
            declared = _post(url, huge)
            assert declared.status_code == 413
            assert "what this model's inputs can hold" in declared.json()["error"]

            def chunks() -> Iterator[bytes]:
                for i in range(0, len(huge), 65536):
                    yield huge[i:i + 65536]

            streamed = requests.post(url, data=chunks(), timeout=30)
            assert streamed.status_code == 413
            largest = _post(url, _body(np.random.default_rng(1).normal(size=(1024, 4))
                                       .astype(np.float32)))
            assert largest.status_code == 200, largest.text
            assert np.asarray(largest.json()["outputs"][0]["data"]).size == 1024 * 3
