"""Two ``edgeserve agent run`` on one host, as the quickstart's commands lead people to: the
second one fails on a taken port or a shared cache *before* it tells the fleet it exists, with
an error naming the port or cache and the option that fixes it; with its own ``--port`` and
``--cache`` it runs. Real processes, the real broker."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from edgeserve._process import popen
from edgeserve.contract import Status, decode, fleet_filter
from edgeserve.testing import make_keypair
from tests.services import free_port, retained_messages
from tests.support import stop_process, wait_until

EDGESERVE = str(Path(sys.executable).parent / "edgeserve")
ENV = {**os.environ, "EDGESERVE_TRUSTED_KEYS": ""}


def _retained_statuses(host: str, port: int, fleet: str) -> dict[str, Status]:
    """The retained status of every device of ``fleet`` on the broker, by device id."""
    found = retained_messages(host, port, fleet_filter(fleet, "status"))
    statuses = (decode(Status, payload, topic) for topic, payload in found.items())
    return {status.device_id: status for status in statuses}


@pytest.fixture
def first_agent(tmp_path: Path, agent_assets: dict[str, Path], mqtt_broker: tuple[str, int],
                fleet_name: str) -> Iterator[int]:
    """``agent run`` as device ``first`` on a fixed port with its own cache; yields the port."""
    port = free_port()
    log = tmp_path / "first.log"
    args = [EDGESERVE, "agent", "run", "--broker", f"mqtt://{mqtt_broker[0]}:{mqtt_broker[1]}",
            "--fleet", fleet_name, "--device-id", "first", "--port", str(port), "--cache",
            str(tmp_path / "cache-1"), "--trusted-key", str(agent_assets["public_key"])]
    with log.open("wb") as sink:
        process = popen(args, stdout=sink, stderr=subprocess.STDOUT, env=ENV)
    try:
        def listening() -> bool:
            assert process.poll() is None, f"the first agent exited: {log.read_text()[-2000:]}"
            with contextlib.suppress(requests.ConnectionError):
                return requests.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=1).ok
            return False

        wait_until(listening, 60, "the first agent listens")
        wait_until(lambda: "first" in _retained_statuses(*mqtt_broker, fleet_name), 30,
                   "the first agent registered (retained status)")
        yield port
    finally:
        stop_process(process, 20)
    assert "warning: no trusted keys" not in log.read_text()


def _second(tmp_path: Path, broker: tuple[str, int], fleet: str, port: int, cache: str,
            *extra: str) -> subprocess.CompletedProcess[str]:
    args = [EDGESERVE, "agent", "run", "--broker", f"mqtt://{broker[0]}:{broker[1]}", "--fleet",
            fleet, "--device-id", "second", "--port", str(port), "--cache",
            str(tmp_path / cache), *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=ENV,
                          check=False)


@pytest.mark.slow
def test_second_agent_on_a_taken_port_fails_before_registering(
        tmp_path: Path, first_agent: int, mqtt_broker: tuple[str, int], fleet_name: str) -> None:
    """The second agent on the first one's port exits 2 naming the port and --port, warns once
    each that it has no trusted key and no fleet key, and the fleet never hears of it."""
    result = _second(tmp_path, mqtt_broker, fleet_name, first_agent, "cache-2")
    assert result.returncode == 2, result.stderr
    assert f"127.0.0.1:{first_agent}" in result.stderr and "--port" in result.stderr
    assert "Traceback" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 2 and "no trusted keys" in warnings[0]
    assert "no fleet key" in warnings[1]
    assert set(_retained_statuses(*mqtt_broker, fleet_name)) == {"first"}


@pytest.mark.slow
def test_second_agent_on_the_same_cache_is_refused(
        tmp_path: Path, first_agent: int, mqtt_broker: tuple[str, int], fleet_name: str) -> None:
    """A second agent on the first one's cache (another port) exits 2 naming the cache and
    --cache, before it registers."""
    result = _second(tmp_path, mqtt_broker, fleet_name, 0, "cache-1")
    assert result.returncode == 2, result.stderr
    assert str(tmp_path / "cache-1") in result.stderr and "--cache" in result.stderr
    assert set(_retained_statuses(*mqtt_broker, fleet_name)) == {"first"}


@pytest.mark.slow
def test_second_agent_with_its_own_port_and_cache_runs(
        tmp_path: Path, first_agent: int, mqtt_broker: tuple[str, int], fleet_name: str,
        agent_assets: dict[str, Path]) -> None:
    """With its own --port and --cache, as docs/agent.md says, the second agent serves and
    registers beside the first, and stops cleanly after --duration."""
    fleet_key = make_keypair(tmp_path / "fleet-keys", "fleet")
    result = _second(tmp_path, mqtt_broker, fleet_name, free_port(), "cache-2", "--duration",
                     "3", "--trusted-key", str(agent_assets["public_key"]), "--fleet-key",
                     str(fleet_key.public_path))
    assert result.returncode == 0, result.stderr
    assert "agent running: http://127.0.0.1:" in result.stdout
    assert "warning:" not in result.stderr
    statuses = _retained_statuses(*mqtt_broker, fleet_name)
    assert statuses["first"].state == "online"
    assert statuses["second"].state == "offline" and statuses["second"].reason == "stopped"
