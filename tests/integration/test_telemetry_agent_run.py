"""End to end with the commands a new user runs: ``edgeserve fleet serve`` (embedded broker,
SQLite) and ``edgeserve agent run`` (HTTP API + telemetry), read back with ``fleet devices`` and
``fleet telemetry``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeserve._process import popen
from edgeserve.device_agent.agent import Agent
from edgeserve.testing import make_keypair
from tests.integration.telemetry_models import mlp_package
from tests.integration.telemetry_support import EDGESERVE, REPO, FleetProcess, wait_for
from tests.services import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def cli(*args: str) -> Any:
    out = subprocess.run([str(EDGESERVE), *args], capture_output=True, text=True, check=True,
                         cwd=REPO, timeout=60)
    return json.loads(out.stdout)


def infer(url: str, x: np.ndarray) -> None:
    body = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    request = urllib.request.Request(f"{url}/v2/models/toy/infer", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def test_agent_run_sends_windows_the_fleet_cli_shows(tmp_path: Path, fleet_name: str,
                                                     request: pytest.FixtureRequest) -> None:
    """Requests served by `agent run` show up, counted, in `fleet telemetry`; the device is
    listed online with its profile and active version, and offline after it stops."""
    key = make_keypair(tmp_path / "keys")
    cache = tmp_path / "cache"
    with Agent(cache, trusted_keys=[key.public_path], warmup=False) as agent:
        agent.install(mlp_package(tmp_path / "toy.edgepkg", key))
    db = f"sqlite:///{tmp_path}/fleet.db"
    mqtt_port = free_port()
    fleet = FleetProcess(fleet_name, db, None,
                         extra=["--broker-port", str(mqtt_port)]).start()
    request.addfinalizer(fleet.kill)  # a no-op once fleet.stop() below has run
    http_port = free_port()
    agent_proc = popen(
        [str(EDGESERVE), "agent", "run", "--cache", str(cache), "--trusted-key",
         str(key.public_path), "--port", str(http_port), "--broker",
         f"mqtt://127.0.0.1:{mqtt_port}", "--fleet", fleet_name, "--device-id", "cam-7",
         "--window", "1", "--label", "site=lab"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    output: list[str] = []
    assert agent_proc.stdout is not None
    threading.Thread(target=lambda: output.extend(agent_proc.stdout or []), daemon=True).start()
    try:
        wait_for(lambda: any("agent running" in line for line in output), 60, "agent running")
        url = f"http://127.0.0.1:{http_port}"
        rng = np.random.default_rng(5)
        for _ in range(30):
            infer(url, rng.normal(size=(1, 4)).astype(np.float32))

        def served() -> int:
            rows = cli("fleet", "telemetry", "--db", db, "--device", "cam-7", "--model", "toy",
                       "--json")
            return sum(r["requests"] for r in rows)

        wait_for(lambda: served() == 30, 60, "30 requests in the fleet store")
        rows = cli("fleet", "telemetry", "--db", db, "--device", "cam-7", "--json", "--full")
        assert {r["version"] for r in rows if r["model"] == "toy"} == {"1.0.0"}
        assert any(r["model"] is None and r["window"]["health"]["mem_total_mb"] > 0
                   for r in rows)
        assert all(r["device_id"] == "cam-7" and r["seq"] >= 1 for r in rows)
        toy = [r for r in rows if r["model"] == "toy"]
        # sketches; no drift score: 30 requests are fewer than a score needs (MIN_SAMPLES)
        assert any("inputs" in r["window"] for r in toy)
        (device,) = cli("fleet", "devices", "--db", db, "--json")
        assert (device["device_id"], device["state"], device["profile"]) == (
            "cam-7", "online", "generic-cpu")
        assert device["models"] == {"toy": "1.0.0"} and device["labels"] == {"site": "lab"}
    finally:
        agent_proc.send_signal(signal.SIGTERM)
        try:
            agent_proc.wait(60)
        finally:
            if agent_proc.poll() is None:  # it ignored SIGTERM: the test fails, nothing stays
                agent_proc.kill()
                agent_proc.wait()
            agent_proc.stdout.close()
    # agent run serves HTTP on asyncio's loop by default (--loop): uvloop is never imported
    imported = {line.rsplit("|", 1)[-1].strip() for line in output
                if line.startswith("import time:")}
    assert "edgeserve.device_agent.server.http" in imported and "uvloop" not in imported
    wait_for(lambda: cli("fleet", "devices", "--db", db, "--json")[0]["state"] == "offline", 30,
             "the device to go offline")
    stats = fleet.stop()
    assert stats["rejected_total"] == 0
    table = subprocess.run([str(EDGESERVE), "fleet", "telemetry", "--db", db, "--limit", "5"],
                           capture_output=True, text=True, check=True, cwd=REPO,
                           env={**os.environ, "COLUMNS": "200"})
    assert "cam-7" in table.stdout and "window(s)" in table.stdout
