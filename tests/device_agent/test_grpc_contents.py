"""gRPC with the typed ``contents`` fields (not only raw bytes), metadata, errors and auth.

Runs in a child process: the generated OIP messages and tritonclient.grpc register the same
protobuf names, so they cannot share the test process (see docs/agent.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .models import mlp_weights

CHILD = r"""
import json, sys
import grpc, numpy as np
from edgeserve.device_agent import Agent
from edgeserve.device_agent.server import BearerTokenAuth, start_grpc_server
from edgeserve.device_agent.server.limits import MemoryBudget
from edgeserve.device_agent._grpc_gen import open_inference_grpc_pb2 as pb
from edgeserve.device_agent._grpc_gen import open_inference_grpc_pb2_grpc as pbg

cache, key, pkg = sys.argv[1:4]
agent = Agent(cache, trusted_keys=[key])
agent.install(pkg)
budget = MemoryBudget()
handle = start_grpc_server(agent, auth=BearerTokenAuth(["tok"]), workers=2, queue=4,
                           budget=budget)
stub = pbg.GRPCInferenceServiceStub(grpc.insecure_channel(handle.address))
auth = [("authorization", "Bearer tok")]
x = np.arange(8, dtype=np.float32).reshape(2, 4) / 8
out = {}
out["live"] = stub.ServerLive(pb.ServerLiveRequest()).live
meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="toy"), metadata=auth)
out["meta"] = [meta.platform, list(meta.inputs[0].shape), meta.properties["artifact"]]
request = pb.ModelInferRequest(model_name="toy", id="q1")
tensor = request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
tensor.contents.fp32_contents.extend(x.ravel().tolist())
response = stub.ModelInfer(request, metadata=auth)
out["id"] = response.id
out["small_peak"] = budget.peak
# a message past the stream window is counted (twice, with what decoding and the answer take)
big = pb.ModelInferRequest(model_name="toy")
big.inputs.add(name="x", datatype="FP32", shape=[20000, 4])
big.raw_input_contents.append(np.ones((20000, 4), np.float32).tobytes())
out["big_rows"] = len(np.frombuffer(stub.ModelInfer(big, metadata=auth).raw_output_contents[0],
                                    np.float32)) // 3
out["big_size"], out["big_peak"], out["big_left"] = big.ByteSize(), budget.peak, budget.in_use
out["y"] = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(2, 3).tolist()
def code(call, *args, **kwargs):
    try:
        call(*args, **kwargs)
    except grpc.RpcError as exc:
        return [exc.code().name, exc.details()]
    return ["OK", ""]
out["no_auth"] = code(stub.ModelInfer, request)
short = pb.ModelInferRequest(model_name="toy")
bad = short.inputs.add(name="x", datatype="FP32", shape=[2, 4])
bad.contents.fp32_contents.extend([1.0, 2.0])
out["short"] = code(stub.ModelInfer, short, metadata=auth)
fp16 = pb.ModelInferRequest(model_name="toy")
fp16.inputs.add(name="x", datatype="FP16", shape=[1, 4])
out["fp16"] = code(stub.ModelInfer, fp16, metadata=auth)
out["unknown"] = code(stub.ModelReady, pb.ModelReadyRequest(name="nope"), metadata=auth)
# ModelInfer is served as client-streaming (its message is read only once admitted): a call
# that ends without a message is refused by name
streamed = grpc.insecure_channel(handle.address).stream_unary(
    "/inference.GRPCInferenceService/ModelInfer",
    request_serializer=pb.ModelInferRequest.SerializeToString,
    response_deserializer=pb.ModelInferResponse.FromString)
out["empty"] = code(streamed, iter([]), metadata=auth)
# as many callers at once as the server admits (workers + queue), each its own input: every
# answer is its own
from concurrent.futures import ThreadPoolExecutor
xs = np.random.default_rng(7).normal(size=(96, 1, 4)).astype(np.float32)
def one(row):
    call = pb.ModelInferRequest(model_name="toy")
    call.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    call.raw_input_contents.append(row.tobytes())
    reply = stub.ModelInfer(call, metadata=auth)
    return np.frombuffer(reply.raw_output_contents[0], np.float32).tolist()
with ThreadPoolExecutor(6) as pool:
    out["many"] = list(pool.map(one, xs))
out["xs"] = xs.tolist()
handle.stop()
agent.close()
print(json.dumps(out))
"""


@pytest.mark.slow
def test_grpc_typed_contents_and_errors(tmp_path: Path, agent_assets: dict[str, Path]) -> None:
    """Typed fp32_contents infer correctly; bad counts, raw-only types, an element count past
    any int64, unknown models and missing credentials get the right gRPC status codes."""
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "cache"), str(agent_assets["public_key"]),
         str(agent_assets["pkg_v1"])], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["live"] is True
    assert out["meta"] == ["onnxruntime_onnx", [-1, 4], "onnx-fp32"]
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 8
    np.testing.assert_allclose(out["y"], mlp_weights().forward(x), atol=1e-5)
    assert out["id"] == "q1"
    # a small call reserves nothing (the server keeps its worst case back at start); a large
    # one is counted, and all of it is given back
    assert out["small_peak"] == 0
    assert out["big_rows"] == 20000
    assert out["big_peak"] >= 3 * out["big_size"] and out["big_left"] == 0
    assert out["no_auth"][0] == "UNAUTHENTICATED"
    assert out["short"][0] == "INVALID_ARGUMENT" and "needs 8 values" in out["short"][1]
    assert out["fp16"][0] == "INVALID_ARGUMENT" and "raw_input_contents" in out["fp16"][1]
    assert out["unknown"][0] == "NOT_FOUND"
    assert out["empty"][0] == "INVALID_ARGUMENT" and "without a request" in out["empty"][1]
    expected = mlp_weights().forward(np.array(out["xs"], np.float32).reshape(-1, 4))
    np.testing.assert_allclose(np.array(out["many"]), expected, atol=1e-5)
