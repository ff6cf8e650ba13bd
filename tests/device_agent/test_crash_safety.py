"""Acceptance: ``kill -9`` at every checkpoint and at random instants of install + activation.

Afterwards the cache passes its own check (after removing the garbage a crash leaves) and serves
either the old version or the new one, with that version's exact numbers, never a broken one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgeserve._process import popen
from edgeserve.device_agent import Agent

from .models import mlp_weights

X = np.random.default_rng(5).normal(size=(4, 4)).astype(np.float32)
CHILD = """
import sys
from edgeserve.device_agent import Agent
cache, key, pkg = sys.argv[1:4]
agent = Agent(cache, trusted_keys=[key], warmup=False)
print("ready", flush=True)
sys.stdin.readline()
agent.install(pkg, activate=False)
agent.activate("toy", "1.1.0")
print("done", flush=True)
"""


def _child(cache: Path, assets: dict[str, Path], env: dict[str, str]) -> subprocess.Popen[str]:
    return popen(
        [sys.executable, "-c", CHILD, str(cache), str(assets["public_key"]),
         str(assets["pkg_v2"])], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, **env})


def _assert_consistent(cache: Path, assets: dict[str, Path]) -> str:
    expected = {"1.0.0": mlp_weights().forward(X), "1.1.0": mlp_weights(11).forward(X)}
    with Agent(cache, trusted_keys=[assets["public_key"]]) as agent:
        first = agent.check()
        assert first.ok, first.problems
        again = agent.check(repair=False)
        assert again.ok and not again.repaired and again.removed_garbage == 0
        result = agent.predict("toy", {"x": X})
        np.testing.assert_allclose(result.outputs["y"], expected[result.version], atol=1e-5)
        return result.version


@pytest.fixture
def baseline(tmp_path: Path, agent_assets: dict[str, Path]) -> Path:
    cache = tmp_path / "baseline"
    with Agent(cache, trusted_keys=[agent_assets["public_key"]]) as agent:
        agent.install(agent_assets["pkg_v1"])
    return cache


@pytest.mark.slow
def test_kill_at_every_checkpoint(tmp_path: Path, baseline: Path,
                                  agent_assets: dict[str, Path]) -> None:
    """A SIGKILL at each write checkpoint leaves a cache that checks out and serves v1 or v2."""
    trace = tmp_path / "trace.txt"
    probe = tmp_path / "probe"
    shutil.copytree(baseline, probe)
    child = _child(probe, agent_assets, {"EDGESERVE_TRACE_CHECKPOINTS": str(trace)})
    out, _ = child.communicate("go\n", timeout=60)
    assert child.returncode == 0 and "done" in out
    points = trace.read_text().splitlines()
    assert len(points) >= 8, points
    served = set()
    for k in range(1, len(points) + 1):
        cache = tmp_path / f"kill-{k}"
        shutil.copytree(baseline, cache)
        child = _child(cache, agent_assets, {"EDGESERVE_KILL_AT": str(k)})
        child.communicate("go\n", timeout=60)
        assert child.returncode == -signal.SIGKILL, (k, points[k - 1])
        served.add(_assert_consistent(cache, agent_assets))
    assert served == {"1.0.0", "1.1.0"}


@pytest.mark.slow
def test_kill_at_random_instants(tmp_path: Path, baseline: Path,
                                 agent_assets: dict[str, Path]) -> None:
    """kill -9 from outside at spread-out instants of the install never breaks the cache."""
    timing = tmp_path / "timing"
    shutil.copytree(baseline, timing)
    child = _child(timing, agent_assets, {})
    assert child.stdout is not None and child.stdin is not None
    child.stdout.readline()
    started = time.perf_counter()
    out, _ = child.communicate("go\n", timeout=60)
    duration = time.perf_counter() - started
    assert "done" in out
    rng = np.random.default_rng(0)
    for i, delay in enumerate(sorted(rng.uniform(0, duration * 1.2, size=12))):
        cache = tmp_path / f"random-{i}"
        shutil.copytree(baseline, cache)
        child = _child(cache, agent_assets, {})
        assert child.stdout is not None and child.stdin is not None
        child.stdout.readline()
        child.stdin.write("go\n")
        child.stdin.flush()
        time.sleep(float(delay))
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=60)
        _assert_consistent(cache, agent_assets)
