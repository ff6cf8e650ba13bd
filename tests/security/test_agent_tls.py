"""The agent's servers speak TLS (optionally requiring client certificates), and refuse to listen
beyond loopback without authentication unless told --insecure: once, 'agent serve --host
0.0.0.0' without auth started silently and served every model, and tokens travelled in clear."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from edgeserve.device_agent import Agent
from edgeserve.device_agent.server import BearerTokenAuth, TlsSettings, start_http_server
from tests.tls import make_certificates


@pytest.fixture
def agent(tmp_path: Path, agent_assets: dict[str, Path]) -> Agent:
    opened = Agent(tmp_path / "cache", trusted_keys=[agent_assets["public_key"]])
    opened.install(agent_assets["pkg_v1"])
    return opened


def test_https_with_and_without_client_certificates(tmp_path: Path, agent: Agent) -> None:
    """HTTPS answers with the server's certificate; plain HTTP to it does not; with a client CA
    a request without a client certificate is refused at the handshake, one with it served."""
    certs = make_certificates(tmp_path / "tls")
    with agent, start_http_server(agent, tls=TlsSettings(certs.server_cert,
                                                         certs.server_key)) as handle:
        assert handle.url.startswith("https://")
        live = requests.get(f"{handle.url}/v2/health/live", verify=str(certs.ca), timeout=10)
        assert live.json() == {"live": True}
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{handle.port}/v2/health/live", timeout=10)
    mutual = TlsSettings(certs.server_cert, certs.server_key, certs.ca)
    with Agent(agent.cache.root, trusted_keys=[]) as again, \
            start_http_server(again, tls=mutual, auth=BearerTokenAuth(["tok"])) as handle:
        # TLS 1.3 checks the client's certificate after the handshake: an SSL error, or the
        # connection closed before any answer
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{handle.url}/v2/health/live", verify=str(certs.ca), timeout=10)
        served = requests.get(f"{handle.url}/v2/models/toy", verify=str(certs.ca), timeout=10,
                              cert=(str(certs.client_cert), str(certs.client_key)),
                              headers={"Authorization": "Bearer tok"})
        assert served.status_code == 200 and served.json()["name"] == "toy"


GRPC_CHILD = r"""
import json, sys
from pathlib import Path
import grpc
from edgeserve.device_agent import Agent
from edgeserve.device_agent.server import TlsSettings, start_grpc_server
from edgeserve.device_agent._grpc_gen import open_inference_grpc_pb2 as pb
from edgeserve.device_agent._grpc_gen import open_inference_grpc_pb2_grpc as pbg
cache, ca, cert, key = sys.argv[1:5]
agent = Agent(cache, trusted_keys=[])
handle = start_grpc_server(agent, tls=TlsSettings(Path(cert), Path(key)))
secure = grpc.secure_channel(handle.address.replace("127.0.0.1", "localhost"),
                             grpc.ssl_channel_credentials(Path(ca).read_bytes()))
out = {"secure": pbg.GRPCInferenceServiceStub(secure).ServerLive(
    pb.ServerLiveRequest(), timeout=10).live}
try:
    pbg.GRPCInferenceServiceStub(grpc.insecure_channel(handle.address)).ServerLive(
        pb.ServerLiveRequest(), timeout=5)
    out["plain"] = "OK"
except grpc.RpcError as exc:
    out["plain"] = exc.code().name
handle.stop()
agent.close()
print(json.dumps(out))
"""


@pytest.mark.slow
def test_grpc_over_tls(tmp_path: Path, agent: Agent) -> None:
    """gRPC over TLS answers a client that trusts the CA; a plaintext client gets nothing."""
    certs = make_certificates(tmp_path / "tls")
    agent.close()
    result = subprocess.run([sys.executable, "-c", GRPC_CHILD, str(agent.cache.root),
                             str(certs.ca), str(certs.server_cert), str(certs.server_key)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out == {"secure": True, "plain": "UNAVAILABLE"}


@pytest.mark.parametrize("command", [["agent", "serve"], ["agent", "run", "--duration", "1"]])
def test_listening_beyond_loopback_needs_auth_or_insecure(tmp_path: Path,
                                                          command: list[str]) -> None:
    """--host 0.0.0.0 without --auth is refused before anything listens, naming --auth, TLS
    and --insecure."""
    result = subprocess.run([str(Path(sys.executable).with_name("edgeserve")), *command,
                             "--host", "0.0.0.0", "--port", "0", "--cache",
                             str(tmp_path / "cache")], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    assert "--auth" in result.stderr and "--insecure" in result.stderr
    assert "--tls-cert" in result.stderr and "Traceback" not in result.stderr
