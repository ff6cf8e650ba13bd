"""What installs killed mid-way leave behind cannot grow without bound.

Once, each install killed mid-way left its staging directory in ``tmp/`` (134 MB after 20
kills), only ``agent check`` removed them, and ``check --no-repair`` said ``ok: true``. Here 20
installs into one cache are each killed with SIGKILL at one of the install's checkpoints (the
places a crash must leave the cache consistent), one after the other as a device that keeps
crashing would do them: what ``tmp/`` holds never grows past one install's leftovers, goes when
the cache is next opened, and is reported while the cache is open.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

from edgeserve.device_agent import Agent
from tests.device_agent.test_crash_safety import _assert_consistent, _child, baseline

KILLS = 20


def _tmp_bytes(cache: Path) -> int:
    tmp = cache / "tmp"
    return sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) if tmp.is_dir() else 0


__all__ = ["baseline"]  # the fixture: a cache with toy 1.0.0 installed


@pytest.mark.slow
def test_twenty_killed_installs_leave_no_growing_leftovers(
        tmp_path: Path, baseline: Path, agent_assets: dict[str, Path]) -> None:
    trace = tmp_path / "trace.txt"
    probe = tmp_path / "probe"
    shutil.copytree(baseline, probe)
    child = _child(probe, agent_assets, {"EDGESERVE_TRACE_CHECKPOINTS": str(trace)})
    child.communicate("go\n", timeout=60)  # a whole install, to count its checkpoints
    assert child.returncode == 0
    points = [line.split()[1] for line in trace.read_text().splitlines()]
    # killed once the package is extracted into its staging directory (the blobs written
    # after that stay in the baseline, so a later install has fewer checkpoints to die at)
    assert points[0] == "extracted", points
    sizes = []
    for _ in range(KILLS):
        child = _child(baseline, agent_assets, {"EDGESERVE_KILL_AT": "1"})
        child.communicate("go\n", timeout=60)
        assert child.returncode == -signal.SIGKILL
        sizes.append(_tmp_bytes(baseline))
    package = agent_assets["pkg_v2"].stat().st_size
    assert max(sizes) > 0, "no kill left anything behind: the test reproduces nothing"
    assert max(sizes) <= 2 * package, (
        f"tmp/ grew to {max(sizes)} bytes over {KILLS} killed installs of a {package}-byte "
        f"package: {sizes}")
    _assert_consistent(baseline, agent_assets)
    assert _tmp_bytes(baseline) == 0


def test_leftovers_are_cleaned_at_start_and_reported_while_open(
        baseline: Path, agent_assets: dict[str, Path]) -> None:
    """Leftovers go when the cache is next opened; found while open, 'check --no-repair'
    reports them (not ok) and 'check' removes them."""
    for n in range(3):  # as three killed installs leave them
        staging = baseline / "tmp" / f"install-{n}"
        staging.mkdir(parents=True)
        (staging / "artifact.part").write_bytes(b"\0" * 100_000)
    with Agent(baseline, trusted_keys=[agent_assets["public_key"]]) as agent:
        assert agent.cache.leftovers_removed == 3
        assert not any((baseline / "tmp").iterdir())
        (baseline / "tmp" / "late").write_bytes(b"\0" * 1000)
        report = agent.check(repair=False)
        assert not report.ok and "1 leftover temporary file" in report.problems[0]
        assert agent.check().ok and not any((baseline / "tmp").iterdir())
