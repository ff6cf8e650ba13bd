"""The fleet's HTTP side refuses what a browser can be tricked into sending: a state-changing
request from another site's page (CSRF), and any request under a name that rebinds to loopback.
Once, POST /api/v1/rollouts with text/plain, a foreign Origin and a foreign Host returned 200."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from edgeserve.fleet.artifacts import ArtifactStore
from edgeserve.fleet.rollouts.repo import Rollouts
from edgeserve.fleet.store import Store
from edgeserve.fleet.web.app import create_app
from edgeserve.fleet.web.origin import LOOPBACK_HOSTS
from edgeserve.fleet.web.server import ServerHandle, start_server
from edgeserve.testing import KeyPair, make_manifest, write_test_package

SPEC = {"model": "toy", "version": "1.0.0", "stages": [100], "gates": []}


@pytest.fixture
def server(tmp_path: Path, keypair: KeyPair, web_store: Store) -> Iterator[ServerHandle]:
    """The fleet's app as `fleet serve` starts it on loopback: no auth, loopback names only."""
    artifacts = ArtifactStore(tmp_path / "artifacts", keypair.trust)
    package = tmp_path / "toy.edgepkg"
    write_test_package(package, keypair, manifest=make_manifest(artifacts=[{
        "id": "onnx-fp32", "format": "onnx", "precision": "fp32", "path": "artifacts/model.onnx",
        "profiles": ["generic-cpu", "pixel-8", "raspberry-pi-5"]}]))
    artifacts.publish(package)
    handle = start_server(create_app(web_store, artifacts, allowed_hosts=LOOPBACK_HOSTS))
    try:
        yield handle
    finally:
        handle.stop()


def test_cross_site_and_rebound_requests_are_refused(server: ServerHandle,
                                                     web_store: Store) -> None:
    """A foreign Origin (403), a text/plain body (415) and a rebound Host name (421) change
    nothing; the same call from a tool (JSON, no Origin) works."""
    url = f"{server.url}/api/v1/rollouts?only_fitting=1"
    forged = requests.post(url, data='{"model": "toy"}', timeout=5, headers={
        "Content-Type": "application/json", "Origin": "https://evil.example"})
    assert forged.status_code == 403 and "cross-site" in forged.json()["error"]
    plain = requests.post(url, data="x", timeout=5, headers={"Content-Type": "text/plain"})
    assert plain.status_code == 415
    rebound = requests.get(f"{server.url}/api/v1/devices", timeout=5,
                           headers={"Host": f"evil.example:{server.port}"})
    assert rebound.status_code == 421 and "not this fleet's name" in rebound.json()["error"]
    assert not Rollouts(web_store).find()
    same_site = requests.post(url, json=SPEC, timeout=5,
                              headers={"Origin": f"http://127.0.0.1:{server.port}"})
    tool = requests.post(url, json=SPEC, timeout=5)
    assert same_site.status_code == 200, same_site.text
    assert tool.status_code == 400 and "already has rollout" in tool.json()["error"]
