"""The agent's serving path loads no pydantic (issue 17: it cost a device ~15 MB of RSS), and a
running ``agent serve`` no rich either (~2.5 MB; its status lines are plain text).

The documents the agent reads and writes (manifests, profiles, MQTT messages, telemetry
sketches, signatures) are msgspec structs; pydantic stays in the converter and the fleet. A fresh
interpreter imports what ``edgeserve agent serve`` and ``agent run`` import, then uses the
documents as the agent does, and must end with no ``pydantic`` module loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_PROBE = """
import json, sys
import edgeserve.cli
import edgeserve.device_agent.cli, edgeserve.device_agent.run
import edgeserve.device_agent.server, edgeserve.device_agent.server.runner
import edgeserve.device_agent.server.http, edgeserve.device_agent.server.grpc
import edgeserve.device_agent.telemetry.link, edgeserve.device_agent.agent
from edgeserve.contract import Ack, Status, TelemetryBatch, Window, decode, encode
from edgeserve.manifest import manifest_json_schema
from edgeserve.profiles import list_profiles
from edgeserve.telemetry.histogram import LatencyHistogram

profiles = list_profiles()
hist = LatencyHistogram()
hist.add(1.5)
batch = TelemetryBatch(device_id="d1", windows=[Window(seq=1, start=0, end=60, model="m",
                                                       version="1.0.0", requests=1,
                                                       latency=hist.to_data())])
assert decode(TelemetryBatch, encode(batch)) == batch
decode(Status, encode(Status(device_id="d1", state="online")))
try:
    decode(Ack, b'{"v": 1, "seq": "x"}')
except Exception:
    pass
manifest_json_schema()
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("pydantic", "pydantic_core"))))
"""


def test_serving_path_imports_no_pydantic(tmp_path: Path) -> None:
    """Importing and using the agent's serving path leaves no pydantic module loaded."""
    # cwd outside the repository: the installed package, as `edgeserve agent serve` runs it
    probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                           check=False, cwd=tmp_path, timeout=120)
    assert probe.returncode == 0, probe.stderr[-3000:]
    loaded = json.loads(probe.stdout.strip().splitlines()[-1])
    assert loaded == [], f"the agent's serving path loaded pydantic: {loaded}"


def test_probe_sees_pydantic_when_loaded(tmp_path: Path) -> None:
    """The check itself: a document used as a pydantic field (as the fleet does) loads it."""
    probe = _PROBE.replace("manifest_json_schema()\n", (
        "import pydantic\n"
        "class Spec(pydantic.BaseModel):\n"
        "    health: __import__('edgeserve.contract').contract.HealthPolicy\n"
        "assert Spec.model_validate({'health': {'min_inferences': 3}}).health.min_inferences == 3\n"))
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=False, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pydantic" in json.loads(result.stdout.strip().splitlines()[-1])


def test_a_running_agent_serve_imports_neither_pydantic_nor_rich(
        tmp_path: Path, agent_assets: dict[str, Path]) -> None:
    """The real server, started with Python's import log on, serving a model over HTTP and
    gRPC and answering a request: what it imported (the log) has no pydantic and no rich."""
    import requests

    from edgeserve.device_agent import Agent

    from .serving import serve_cli

    cache = tmp_path / "cache"
    with Agent(cache, trusted_keys=[agent_assets["public_key"]]) as agent:
        agent.install(agent_assets["pkg_v1"])
    with serve_cli(cache, env={"PYTHONPROFILEIMPORTTIME": "1"}) as server:
        reply = requests.post(f"http://{server.http}/v2/models/toy/infer", timeout=30, json={
            "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                        "data": [0.1, 0.2, 0.3, 0.4]}]})
        assert reply.status_code == 200, reply.text
    imported = _imported(server.log)
    assert "edgeserve.device_agent.server.http" in imported  # the log is the server's
    heavy = sorted(m for m in imported if m.split(".")[0] in ("pydantic", "pydantic_core", "rich"))
    assert heavy == [], f"agent serve imported {heavy}"
    assert "uvloop" in imported  # --loop auto: uvloop, installed here


def _imported(log: Path) -> set[str]:
    """The modules a process imported, from its ``-X importtime`` log."""
    return {line.rsplit("|", 1)[-1].strip() for line in log.read_text().splitlines()
            if line.startswith("import time:")}


def test_agent_serve_on_asyncios_loop_never_imports_uvloop(
        tmp_path: Path, agent_assets: dict[str, Path]) -> None:
    """``--loop asyncio`` (2.6 MB less resident): HTTP and gRPC answer on the standard
    library's loop, and uvloop is never imported."""
    import grpc
    import requests
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    from edgeserve.device_agent import Agent

    from .serving import serve_cli

    cache = tmp_path / "cache"
    with Agent(cache, trusted_keys=[agent_assets["public_key"]]) as agent:
        agent.install(agent_assets["pkg_v1"])
    with serve_cli(cache, "--loop", "asyncio", env={"PYTHONPROFILEIMPORTTIME": "1"}) as server:
        reply = requests.post(f"http://{server.http}/v2/models/toy/infer", timeout=30, json={
            "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                        "data": [0.1, 0.2, 0.3, 0.4]}]})
        assert reply.status_code == 200, reply.text
        with grpc.insecure_channel(server.grpc) as channel:
            request = pb.ModelInferRequest(model_name="toy")
            request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
            request.raw_input_contents.append(b"\0" * 16)
            answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
            assert len(answer.raw_output_contents[0]) == 12
    imported = _imported(server.log)
    assert "edgeserve.device_agent.server.grpc" in imported
    assert "uvloop" not in imported
