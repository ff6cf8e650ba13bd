"""The dashboard in a real headless browser: charts render with data, a screenshot is saved."""

from __future__ import annotations

import os
import time
from pathlib import Path

from edgeserve.fleet.rollouts.repo import Rollouts
from edgeserve.fleet.store import Store
from edgeserve.fleet.web.server import ServerHandle
from tests.browser import chromium_page
from tests.fleet.conftest import AUTH

SCREENSHOTS = Path(os.environ.get("EDGESERVE_SCREENSHOTS", "test-artifacts"))


def test_dashboard_charts_render_with_data(web_server: ServerHandle, web_store: Store) -> None:
    """Profile, latency and error charts draw real points; the rollout shows; screenshot saved."""
    repo = Rollouts(web_store)
    record = repo.create({"model": "toy", "version": "1.0.0", "stages": [100]})
    repo.add_event(record.id, time.time() - 5, 0, "gates", "", {"gates": [
        {"gate": "error_rate<=0.01", "verdict": "pass", "canary": 0.001, "bound": 0.01,
         "detail": ""}]})
    repo.add_event(record.id, time.time(), 0, "gates", "", {"gates": [
        {"gate": "error_rate<=0.01", "verdict": "pass", "canary": 0.002, "bound": 0.01,
         "detail": ""}]})
    with chromium_page({"username": AUTH[0], "password": AUTH[1]}) as page:
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(web_server.url + "/")
        for chart in ("chart-profiles", "chart-latency", "chart-errors", "chart-throughput"):
            page.wait_for_function(
                f"document.getElementById('{chart}').dataset.points > 0", timeout=15_000)
            assert page.locator(f"#{chart} canvas").count() == 1
        page.wait_for_selector(".rollout-chart canvas", timeout=15_000)
        assert page.locator(".badge.running").count() >= 1
        assert "3" in page.locator("#cards .card .v").first.inner_text()
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shot = SCREENSHOTS / "dashboard-fleet.png"
        page.screenshot(path=str(shot), full_page=True)
        assert errors == []
    assert shot.stat().st_size > 20_000
