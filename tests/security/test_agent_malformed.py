"""Inputs no model takes are refused with a client error, never a server error or a traceback.

Once, a JSON body nested 10,000 deep answered 500 and logged a full traceback per request; NaN
and booleans passed as FP32 values; and a gRPC shape of ``[2^32, 2^32]`` with empty raw contents
wrapped to 0 elements in int64, passed the size check and came back INTERNAL.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from edgeserve.device_agent import Agent
from edgeserve.device_agent.server import HttpServerHandle, start_http_server
from tests.device_agent.serving import ServedProcess, serve_cli


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, agent_assets: dict[str, Path]) -> Path:
    root = tmp_path_factory.mktemp("malformed") / "cache"
    with Agent(root, trusted_keys=[agent_assets["public_key"]]) as agent:
        agent.install(agent_assets["pkg_v1"])
    return root


@pytest.fixture
def served(cache: Path, agent_assets: dict[str, Path]) -> Iterator[HttpServerHandle]:
    with Agent(cache, trusted_keys=[agent_assets["public_key"]]) as agent, \
            start_http_server(agent, workers=2, queue=8) as handle:
        yield handle


def _post(url: str, body: bytes) -> requests.Response:
    return requests.post(url, data=body, timeout=30,
                         headers={"content-type": "application/json"})


def test_deep_nesting_nan_and_booleans_are_400s_without_a_traceback(
        served: HttpServerHandle, caplog: pytest.LogCaptureFixture) -> None:
    """Nesting 10,000 deep (anywhere in the body), NaN, infinity and booleans in an FP32 tensor:
    each a 400 naming the problem; many of them log no traceback and at most a few lines."""
    url = f"{served.url}/v2/models/toy/infer"
    caplog.set_level(logging.INFO)
    deep = b"[" * 10_000 + b"]" * 10_000
    bodies = [b'{"inputs": ' + deep + b"}",
              b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": '
              + deep + b"}]}",
              b'{"parameters": {"a": ' + b'{"b": ' * 5_000 + b"1" + b"}" * 5_000 + b"}}"]
    for body in bodies * 20:
        answer = _post(url, body)
        assert answer.status_code == 400, answer.text
        assert "nested too deeply" in answer.json()["error"]
    for values, why in (([float("nan"), 0, 0, 0], "NaN or infinity"),
                        ([float("-inf"), 0, 0, 0], "NaN or infinity"),
                        ([True, False, True, False], "boolean")):
        body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                       "data": values}]}, allow_nan=True).encode()
        answer = _post(url, body)
        assert answer.status_code == 400 and why in answer.json()["error"], answer.text
    # the server is fine afterwards
    good = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                   "data": [0.1, 0.2, 0.3, 0.4]}]}).encode()
    assert _post(url, good).status_code == 200
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.fixture(scope="module")
def grpc_server(cache: Path) -> Iterator[ServedProcess]:
    with serve_cli(cache, "--workers", "2") as served:
        yield served


def test_grpc_shapes_whose_element_count_overflows_are_invalid_argument(
        grpc_server: ServedProcess) -> None:
    """Shapes whose product wraps in int64 (or is past any tensor) with empty or short raw
    contents: INVALID_ARGUMENT naming the element count; the server serves on."""
    import grpc

    # tritonclient's messages (same wire format): the generated OIP ones cannot share a process
    # with them, and other tests here import tritonclient.grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(grpc_server.grpc) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for shape, raw in (([2**32, 2**32], b""), ([2**62, 4], b""), ([-1, 4], b"\0" * 16),
                           ([2**31, 2**31, 4], b"\0" * 16), ([1, 2**63 - 1], b"")):
            request = pb.ModelInferRequest(model_name="toy")
            request.inputs.add(name="x", datatype="FP32", shape=shape)
            request.raw_input_contents.append(raw)
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(request, timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (shape, refused.value)
            details = refused.value.details() or ""
            assert "element" in details or "shape" in details, (shape, details)
        request = pb.ModelInferRequest(model_name="toy")
        request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        request.raw_input_contents.append(b"\0" * 16)
        assert stub.ModelInfer(request, timeout=30).outputs[0].name == "y"
    assert "Traceback" not in grpc_server.log.read_text()
