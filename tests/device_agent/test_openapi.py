"""Acceptance: schemathesis fuzzes the server from its own OpenAPI document: no 5xx, no crash."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests

from edgeserve.device_agent import Agent
from edgeserve.device_agent.server import start_http_server

SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")


@pytest.mark.slow
def test_schemathesis_finds_no_server_errors(tmp_path: Path,
                                             agent_assets: dict[str, Path]) -> None:
    """A bounded schemathesis run (hundreds of cases, all phases) gets no 5xx and conforming
    responses, and the server still answers afterwards."""
    with Agent(tmp_path / "c", trusted_keys=[agent_assets["public_key"]]) as agent:
        agent.install(agent_assets["pkg_v1"])
        with start_http_server(agent, workers=2, queue=64) as handle:
            document = requests.get(f"{handle.url}/openapi.json", timeout=5).json()
            assert document["openapi"].startswith("3.")
            result = subprocess.run(
                [SCHEMATHESIS, "run", f"{handle.url}/openapi.json", "--max-examples", "15",
                 "--seed", "7", "--checks", "not_a_server_error,status_code_conformance,"
                 "content_type_conformance,response_schema_conformance",
                 "--request-timeout", "10"],
                capture_output=True, text=True, timeout=240, cwd=tmp_path, check=False)
            summary = result.stdout[-3000:]
            assert result.returncode == 0, summary
            assert " passed" in summary and "failures" not in summary.split("SUMMARY")[-1]
            assert requests.get(f"{handle.url}/v2/health/live", timeout=5).status_code == 200
