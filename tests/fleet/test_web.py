"""The fleet's HTTP side: JSON API, Prometheus metrics, dashboard assets, auth."""

from __future__ import annotations

import pytest
import requests

from edgeserve.fleet.rollouts.repo import Rollouts
from edgeserve.fleet.store import Store
from edgeserve.fleet.web.server import ServerHandle
from tests.fleet.conftest import AUTH


def test_api_requires_credentials_but_artifacts_do_not(web_server: ServerHandle) -> None:
    """Without credentials the API and dashboard answer 401; signed artifacts stay reachable."""
    for path in ("/", "/api/v1/overview", "/metrics"):
        response = requests.get(web_server.url + path, timeout=5)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert requests.get(web_server.url + "/v1/packages/toy/1.0.0/manifest.json",
                        timeout=5).status_code == 200
    assert requests.get(web_server.url + "/healthz", timeout=5).status_code == 200


def test_overview_and_series(web_server: ServerHandle) -> None:
    """The overview counts devices by profile; the series merges latency per time bucket."""
    overview = requests.get(web_server.url + "/api/v1/overview", auth=AUTH, timeout=5).json()
    assert overview["devices"] == 3 and overview["by_profile"] == {"pixel-8": 2,
                                                                   "raspberry-pi-5": 1}
    assert overview["active_versions"] == {"toy": {"1.0.0": 3}}
    series = requests.get(web_server.url + "/api/v1/models/toy/series?bucket=60", auth=AUTH,
                          timeout=5).json()
    points = series["versions"]["1.0.0"]
    assert sum(p["requests"] for p in points) == 120
    assert all(p["p99_ms"] == pytest.approx(99.5, rel=0.015) for p in points)


def test_rollout_api_round_trip(web_server: ServerHandle, web_store: Store) -> None:
    """Rollouts can be created and steered over the API; bad input is a 400 with a message,
    and so is a scope with devices that cannot run the package (until narrowed)."""
    spec = {"model": "toy", "version": "1.0.0", "stages": [100], "gates": ["error_rate<=0.01"]}
    unfit = requests.post(web_server.url + "/api/v1/rollouts", auth=AUTH, timeout=5, json=spec)
    assert unfit.status_code == 400 and "d0 (profile pixel-8" in unfit.json()["error"]
    created = requests.post(web_server.url + "/api/v1/rollouts?only_fitting=1", auth=AUTH,
                            timeout=5, json=spec).json()
    assert created["phase"] == "running"
    assert created["admission"]["fitting"] == ["d2"] and sorted(created["admission"]["unfit"]) \
        == ["d0", "d1"]
    acted = requests.post(f"{web_server.url}/api/v1/rollouts/{created['id']}/pause", auth=AUTH,
                          timeout=5, json={"reason": "lunch"})
    assert acted.status_code == 200 and acted.json()["queued"]
    bad = requests.post(web_server.url + "/api/v1/rollouts", auth=AUTH, timeout=5,
                        json={"model": "toy", "version": "1.0.0", "stages": [5, 1]})
    assert bad.status_code == 400 and "error" in bad.json()
    missing = requests.get(web_server.url + "/api/v1/rollouts/nope", auth=AUTH, timeout=5)
    assert missing.status_code == 404
    assert [r.id for r in Rollouts(web_store).find()] == [created["id"]]


def test_prometheus_metrics(web_server: ServerHandle) -> None:
    """/metrics exposes devices online, rollouts by phase and ingestion counters."""
    text = requests.get(web_server.url + "/metrics", auth=AUTH, timeout=5).text
    assert 'edgeserve_fleet_devices{state="online"} 3' in text
    assert 'edgeserve_fleet_rollouts{phase="running"}' in text
    assert "edgeserve_fleet_ingest_messages_total 7" in text
    assert 'edgeserve_fleet_ingest_rejected_total{reason="malformed"} 2' in text


def test_dashboard_assets_are_shipped(web_server: ServerHandle) -> None:
    """The dashboard and its chart library are served locally (no CDN)."""
    page = requests.get(web_server.url + "/", auth=AUTH, timeout=5).text
    assert "/static/vendor/uPlot.iife.min.js" in page and "http" not in page.split("<body>")[1]
    js = requests.get(web_server.url + "/static/vendor/uPlot.iife.min.js", auth=AUTH, timeout=5)
    assert js.status_code == 200 and len(js.content) > 40_000
