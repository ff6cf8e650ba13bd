"""The README's main command, as a new user runs it: ``edgeserve demo --no-wait``.

While the demo runs, a headless Chromium (Playwright driving the system's Chromium) opens its
dashboard, waits until the charts draw real data and saves a screenshot. At the end the demo must
exit 0 and its summary must show v2 promoted to 100 %, v3 rolled back by a named gate, and every
window recorded offline received once.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgeserve._process import popen
from tests.browser import chromium_page
from tests.services import free_port

# the demo alone takes ~2.5 min on two cores; the default per-test timeout is 300 s
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

EDGESERVE = Path(sys.executable).with_name("edgeserve")
SCREENSHOTS = Path(os.environ.get("EDGESERVE_SCREENSHOTS", "test-artifacts"))


def _wait(lines: list[str], pattern: str, timeout: float, process: subprocess.Popen[str]) -> str:
    deadline = time.monotonic() + timeout
    regex = re.compile(pattern)
    while time.monotonic() < deadline:
        for line in list(lines):
            match = regex.search(line)
            if match:
                return match.group(1) if match.groups() else line
        if process.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"no line matching {pattern!r} in:\n" + "".join(lines[-40:]))


def test_demo_runs_end_to_end_and_its_dashboard_renders(tmp_path: Path) -> None:
    """The demo succeeds, and its dashboard shows charts with data while it runs."""
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}
    process = popen(
        [str(EDGESERVE), "demo", "--no-wait", "--out", str(tmp_path / "demo"), "--devices", "12",
         "--http-port", str(free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    assert process.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(process.stdout or []), daemon=True)
    reader.start()
    try:
        url = _wait(lines, r"dashboard: (http://\S+)", 400, process)
        _wait(lines, r"(deploy 1\.0\.0: completed)", 120, process)
        with chromium_page() as page:
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url)
            # enough windows for lines, not single dots; drift needs the reference resolved
            for chart, points in (("chart-profiles", 1), ("chart-latency", 15),
                                  ("chart-errors", 5), ("chart-throughput", 5),
                                  ("chart-drift", 3)):
                page.wait_for_function(
                    f"document.getElementById('{chart}').dataset.points >= {points}",
                    timeout=90_000)
            page.wait_for_selector(".rollout-chart canvas", timeout=60_000)
            assert page.locator(".rollout").count() >= 1
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shot = SCREENSHOTS / "dashboard-demo.png"
            page.screenshot(path=str(shot), full_page=True)
            assert errors == []
        assert shot.stat().st_size > 50_000
        assert process.wait(timeout=600) == 0, "".join(lines[-60:])
    finally:
        if process.poll() is None:
            # Ctrl-C: the demo stops its devices and its fleet service (children it started
            # die with it anyway, even on the SIGKILL that follows if it does not exit)
            process.send_signal(signal.SIGINT)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        # on every path, a skip (no Chromium) included: a pipe left open is finalized by
        # whichever later test's garbage collection finds it, and errors there as a
        # ResourceWarning ("unclosed file <_io.FileIO ... mode='rb'>")
        reader.join(10)
        process.stdout.close()
    output = "".join(lines)
    assert re.search(r"rollout 2\.0\.0\s*│\s*promoted to 100%", output), output[-3000:]
    assert re.search(r"rollout 3\.0\.0\s*│\s*rolled back by gate \S+", output), output[-3000:]
    match = re.search(r"(\d+) recorded while offline, (\d+) received, every one stored once",
                      output)
    assert match and match.group(1) == match.group(2) and int(match.group(1)) > 0, output[-3000:]
    assert re.search(r"devices now\s*│\s*2\.0\.0 on 12 \(of 12\)", output), output[-3000:]
