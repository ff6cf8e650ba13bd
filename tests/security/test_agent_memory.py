"""The agent's servers keep to their memory budget under the largest requests they take.

Once, one 60 MB JSON float list took the agent from 130 MB to 980 MB of RSS and twelve at once
peaked at 8.2 GB: bodies were read before admission and parsed whole before any check. Here the
real CLI serves a model whose input has no fixed size (``[batch, n]``, so only the server's own
limits bound a request), and twelve concurrent requests of each kind are thrown at it: maximal
JSON bodies, the largest JSON bodies the budget can decode, maximal and budget-sized binary
bodies, and a gRPC flood. The peak RSS over idle (the kernel's high-water mark, reset before each
burst, and psutil samples) must stay within the budget, every answer must be 200, 413 or 503
(gRPC: OK or RESOURCE_EXHAUSTED), and the memory must be handed back afterwards.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pytest

from edgeserve.device_agent import Agent
from edgeserve.manifest import parse_manifest
from edgeserve.package import PackageWriter
from edgeserve.testing import make_keypair
from tests.device_agent.serving import ServedProcess, serve_cli

BUDGET = 64 << 20
MAX_BODY = 64 << 20
CONCURRENT = 12
CALL_TIMEOUT_S = 120.0


def _wide_package(root: Path) -> tuple[Path, Path]:
    """A model whose input ``x`` is ``[batch, n]`` (both free): y = mean(x, axis=1)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["y"], axes=[1], keepdims=1)], "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    key = make_keypair(root / "keys", "wide")
    manifest = parse_manifest({
        "schema": "edgeserve.manifest/1", "name": "wide", "version": "1.0.0", "release": 1,
        "source": {"framework": "onnx", "sha256": "2" * 64},
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", "n"]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 1]}],
        "artifacts": [{"id": "onnx-fp32", "format": "onnx", "precision": "fp32",
                       "path": "artifacts/wide.onnx"}]})
    writer = PackageWriter(manifest)
    writer.add_file("artifacts/wide.onnx", model.SerializeToString())
    path = root / "wide.edgepkg"
    writer.write(path, key.private)
    return path, key.public_path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedProcess]:
    root = tmp_path_factory.mktemp("memory")
    package, public = _wide_package(root)
    cache = root / "cache"
    with Agent(cache, trusted_keys=[public]) as agent:
        agent.install(package)
    with serve_cli(cache, "--memory-budget", str(BUDGET), "--max-body", str(MAX_BODY),
                   "--workers", "2") as served:
        _warm_up(served)
        yield served


# -- requests -------------------------------------------------------------------------------------


def _post(served: ServedProcess, body: bytes, headers: dict[str, str] | None = None,
          client: int = 1) -> int:
    """POST an inference body from 127.0.0.``client``; the status, or 0 when the connection
    broke before one came."""
    connection = http.client.HTTPConnection("127.0.0.1", served.http_port,
                                            timeout=CALL_TIMEOUT_S,
                                            source_address=(f"127.0.0.{client}", 0))
    try:
        connection.request("POST", "/v2/models/wide/infer", body=body,
                           headers={"content-type": "application/json", **(headers or {})})
        response = connection.getresponse()
        response.read()
        return response.status
    except (ConnectionError, OSError):
        return 0
    finally:
        connection.close()


def _json_body(values: int, text: str = "0.123456789") -> bytes:
    """A JSON request for x of shape [1, values], each value written as ``text``."""
    data = "[[" + ",".join([text] * values) + "]]"
    head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, values],
                                   "data": None}]})
    return head.replace("null", data).encode()


def _binary_body(values: int) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, values],
                                     "parameters": {"binary_data_size": values * 4}}]}).encode()
    raw = np.full(values, 0.25, dtype=np.float32).tobytes()
    return header + raw, {"inference-header-content-length": str(len(header)),
                          "content-type": "application/octet-stream"}


def _warm_up(served: ServedProcess) -> None:
    """Load the model and touch every code path once, so idle RSS is the steady state."""
    assert _post(served, _json_body(1000)) == 200
    body, headers = _binary_body(1000)
    assert _post(served, body, headers) == 200
    assert _grpc_flood(served, [1000], raw=True) == {"OK": 1}
    assert _grpc_flood(served, [1000], raw=False) == {"OK": 1}


# -- memory -------------------------------------------------------------------------------------


@dataclass
class Burst:
    statuses: list[object] = field(default_factory=list)
    peak_over_idle: int = 0
    after_over_idle: int = 0


def _hwm(pid: int) -> int:
    """The kernel's peak RSS of ``pid`` (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def _settled_rss(process: psutil.Process, seconds: float = 3.0) -> int:
    """RSS once it stops falling (freed memory is handed back right after requests end)."""
    deadline = time.monotonic() + seconds
    rss = process.memory_info().rss
    while time.monotonic() < deadline:
        time.sleep(0.2)
        rss = min(rss, process.memory_info().rss)
    return rss


def _burst(served: ServedProcess, calls: list[Callable[[], object]]) -> Burst:
    """Run ``calls`` at once; the peak RSS over idle during them and RSS over idle after."""
    process = psutil.Process(served.pid)
    idle = _settled_rss(process, 1.0)
    Path(f"/proc/{served.pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    peak = [idle]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with ThreadPoolExecutor(len(calls)) as pool:
            statuses = list(pool.map(lambda call: call(), calls))
    finally:
        done.set()
        sampler.join()
    high = max(peak[0], _hwm(served.pid))
    return Burst(statuses, high - idle, _settled_rss(process) - idle)


def _clients(call: Callable[[int], object]) -> list[Callable[[], object]]:
    """:data:`CONCURRENT` calls from four addresses, so the whole budget is in play (one
    client may hold half of it)."""
    return [lambda i=i: call(1 + i % 4) for i in range(CONCURRENT)]


def _check(burst: Burst, allowed: set[object], what: str) -> None:
    print(f"{what}: peak {burst.peak_over_idle / 2**20:.1f} MiB over idle, "
          f"{burst.after_over_idle / 2**20:.1f} MiB after; answers {burst.statuses}")
    assert set(burst.statuses) <= allowed, f"{what}: unexpected answers {burst.statuses}"
    assert burst.peak_over_idle <= BUDGET, (
        f"{what}: peak RSS {burst.peak_over_idle / 2**20:.0f} MiB over idle, budget "
        f"{BUDGET / 2**20:.0f} MiB")
    assert burst.after_over_idle <= BUDGET // 4, (
        f"{what}: {burst.after_over_idle / 2**20:.0f} MiB still held after the burst")


# -- the tests ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_twelve_maximal_json_bodies_stay_within_the_budget(server: ServedProcess) -> None:
    """Bodies just under --max-body are refused (413) before they are read; bodies the budget can
    decode (one client may hold half of it) are served a few at a time, the rest told 503."""
    maximal = _json_body((MAX_BODY - 200) // 12)
    assert len(maximal) < MAX_BODY
    burst = _burst(server, _clients(lambda client: _post(server, maximal, client=client)))
    _check(burst, {413}, "maximal JSON")
    # text 11 bytes a value: body + its text + 56 bytes a value <= 32 MiB for ~430k values
    largest = _json_body(400_000)
    burst = _burst(server, _clients(lambda client: _post(server, largest, client=client)))
    _check(burst, {200, 503}, "budget-sized JSON")
    assert 200 in burst.statuses, burst.statuses


@pytest.mark.slow
def test_twelve_maximal_binary_bodies_stay_within_the_budget(server: ServedProcess) -> None:
    """Binary bodies cost their bytes and the runtime's copy: just under --max-body is 413,
    half a client's share is served, one at a time."""
    maximal, headers = _binary_body((MAX_BODY - 200) // 4)
    burst = _burst(server, _clients(lambda client: _post(server, maximal, headers, client)))
    _check(burst, {413}, "maximal binary")
    largest, headers = _binary_body((15 << 20) // 4)
    burst = _burst(server, _clients(lambda client: _post(server, largest, headers, client)))
    _check(burst, {200, 503}, "budget-sized binary")
    assert 200 in burst.statuses, burst.statuses


def _grpc_flood(served: ServedProcess, sizes: list[int], raw: bool) -> dict[str, int]:
    """ModelInfer calls at once, one per size (FP32 values), raw or typed contents."""
    import grpc

    # tritonclient's messages: the generated OIP ones cannot share a process with them, and
    # other tests here import tritonclient.grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(served.grpc, options=[
        ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)])
    stub = pb_grpc.GRPCInferenceServiceStub(channel)

    def call(values: int) -> str:
        request = pb.ModelInferRequest(model_name="wide")
        tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, values])
        data = np.full(values, 0.5, dtype=np.float32)
        if raw:
            request.raw_input_contents.append(data.tobytes())
        else:
            tensor.contents.fp32_contents.extend(data)
        try:
            stub.ModelInfer(request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            return str(exc.code().name)
        return "OK"

    try:
        with ThreadPoolExecutor(len(sizes)) as pool:
            codes = list(pool.map(call, sizes))
    finally:
        channel.close()
    return {code: codes.count(code) for code in set(codes)}


@pytest.mark.slow
def test_a_grpc_flood_stays_within_the_budget(server: ServedProcess) -> None:
    """Forty calls at once near the largest message gRPC takes here (a sixteenth of the
    budget with two workers), raw and typed, and some past it: OK or RESOURCE_EXHAUSTED."""
    near = (BUDGET // 16 - 4096) // 4
    over = (BUDGET // 16) // 4 + 1024
    sizes = [near] * 36 + [over] * 4
    for raw in (True, False):
        burst = _burst(server, [lambda raw=raw: _grpc_flood(server, sizes, raw)])
        (codes,) = burst.statuses
        assert isinstance(codes, dict)
        _check(Burst(list(codes), burst.peak_over_idle, burst.after_over_idle),
               {"OK", "RESOURCE_EXHAUSTED"}, f"gRPC flood ({'raw' if raw else 'typed'})")
        assert codes.get("OK", 0) >= 1 and codes.get("RESOURCE_EXHAUSTED", 0) >= 4, codes


@pytest.mark.slow
def test_the_server_still_answers_after_the_bursts(server: ServedProcess) -> None:
    assert _post(server, _json_body(64)) == 200
    assert _grpc_flood(server, [64], raw=True) == {"OK": 1}
