"""Applying desired state on a device: fetch over HTTP, verify, activate, health-check, roll back."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from starlette.applications import Starlette

from edgeserve.contract import Desired, Reported
from edgeserve.device_agent.agent import Agent
from edgeserve.device_agent.updates.updater import RetryPolicy, Updater
from edgeserve.fleet.artifacts import ArtifactStore
from edgeserve.fleet.web.artifacts import artifact_routes, package_base_url
from edgeserve.fleet.web.server import ServerHandle, start_server
from edgeserve.testing import KeyPair

from ..proxy import CuttingProxy
from .models import build_mlp_package

X = np.random.default_rng(5).normal(size=(1, 4)).astype(np.float32)


@pytest.fixture
def fleet(tmp_path: Path, keypair: KeyPair) -> Iterator[tuple[ArtifactStore, ServerHandle]]:
    store = ArtifactStore(tmp_path / "artifacts", keypair.trust)
    for version, release, seed in (("1.0.0", 1, 1), ("2.0.0", 2, 2)):
        pkg = build_mlp_package(tmp_path / f"toy-{version}.edgepkg", keypair, version, release,
                                seed=seed, tflite=False)
        store.publish(pkg)
    server = start_server(Starlette(routes=artifact_routes(store)))
    try:
        yield store, server
    finally:
        server.stop()


@pytest.fixture
def agent(tmp_path: Path, keypair: KeyPair) -> Iterator[Agent]:
    with Agent(tmp_path / "cache", "generic-cpu", [keypair.public_path]) as a:
        yield a


def desired(store: ArtifactStore, server: ServerHandle, revision: int, active: str,
            min_inferences: int = 5, base_url: str | None = None, **health: object) -> Desired:
    versions = {}
    for v in store.versions("toy"):
        versions[v.version] = {"release": v.release, "manifest_sha256": v.manifest_sha256,
                               "url": package_base_url(base_url or server.url, "toy",
                                                       v.version)}
    return Desired.model_validate({"v": 1, "revision": revision, "models": {"toy": {
        "active": active, "versions": versions,
        "health": {"min_inferences": min_inferences, **health}}}})


def test_update_commits_after_healthy_inferences(tmp_path: Path, agent: Agent,
                                                 fleet: tuple[ArtifactStore, ServerHandle]) -> None:
    """A new version is fetched, staged, activated, watched over N inferences, then committed."""
    store, server = fleet
    reports: list[Reported] = []
    updater = Updater(agent, "dev1", tmp_path / "updater", reports.append)
    updater.apply(desired(store, server, 1, "1.0.0", min_inferences=0))
    assert agent.active_version("toy") == "1.0.0"
    report = updater.apply(desired(store, server, 2, "2.0.0"))
    assert report.models["toy"].state == "health-check" and report.models["toy"].active == "2.0.0"
    for _ in range(5):
        agent.predict("toy", {"x": X})
    updater.check_watches()
    final = updater.current_report()
    assert final.revision == 2 and final.models["toy"].state == "committed"
    assert final.models["toy"].previous == "1.0.0"
    assert {"downloading", "staged", "health-check", "committed"} <= \
        {r.models["toy"].state for r in reports}
    assert updater.bytes_downloaded > 0


def test_stale_revision_is_ignored(tmp_path: Path, agent: Agent,
                                   fleet: tuple[ArtifactStore, ServerHandle]) -> None:
    """A replayed or older desired revision changes nothing, even after a restart."""
    store, server = fleet
    updater = Updater(agent, "dev1", tmp_path / "updater")
    updater.apply(desired(store, server, 5, "2.0.0", min_inferences=0))
    restarted = Updater(agent, "dev1", tmp_path / "updater")
    assert restarted.revision == 5
    restarted.apply(desired(store, server, 4, "1.0.0", min_inferences=0))
    assert agent.active_version("toy") == "2.0.0"


def test_wrong_manifest_hash_is_refused_and_old_version_serves(
        tmp_path: Path, agent: Agent, fleet: tuple[ArtifactStore, ServerHandle]) -> None:
    """A manifest that is not the one desired state names is refused; the active one keeps serving."""
    store, server = fleet
    updater = Updater(agent, "dev1", tmp_path / "updater")
    updater.apply(desired(store, server, 1, "1.0.0", min_inferences=0))
    bad = desired(store, server, 2, "2.0.0").model_dump(mode="json")
    bad["models"]["toy"]["versions"]["2.0.0"]["manifest_sha256"] = hashlib.sha256(b"x").hexdigest()
    report = updater.apply(Desired.model_validate(bad))
    assert report.models["toy"].state == "failed"
    assert report.models["toy"].last_error is not None
    assert report.models["toy"].last_error.code == "TamperedManifestError"
    assert agent.active_version("toy") == "1.0.0"
    assert agent.predict("toy", {"x": X}).version == "1.0.0"


def test_unhealthy_version_rolls_back_by_itself(tmp_path: Path, agent: Agent,
                                                fleet: tuple[ArtifactStore, ServerHandle]) -> None:
    """A version over its latency budget on live requests is rolled back and the reason reported."""
    store, server = fleet
    updater = Updater(agent, "dev1", tmp_path / "updater")
    updater.apply(desired(store, server, 1, "1.0.0", min_inferences=0))
    updater.apply(desired(store, server, 2, "2.0.0", min_inferences=3, max_latency_ms=1e-6))
    for _ in range(3):
        agent.predict("toy", {"x": X})
    updater.check_watches()
    report = updater.current_report().models["toy"]
    assert report.state == "rolled-back" and agent.active_version("toy") == "1.0.0"
    assert report.last_error is not None and "p95 latency" in report.last_error.message


def test_release_older_than_installed_is_refused(tmp_path: Path, keypair: KeyPair, agent: Agent,
                                                 fleet: tuple[ArtifactStore, ServerHandle]) -> None:
    """A downgrade to a lower release number than installed is refused (rollback attack)."""
    store, server = fleet
    updater = Updater(agent, "dev1", tmp_path / "updater")
    updater.apply(desired(store, server, 1, "2.0.0", min_inferences=0))
    report = updater.apply(desired(store, server, 2, "1.0.0", min_inferences=0))
    assert report.models["toy"].last_error is not None
    assert report.models["toy"].last_error.code == "RollbackError"
    assert agent.active_version("toy") == "2.0.0"


def test_tampered_artifact_is_refused_and_reported(tmp_path: Path, agent: Agent,
                                                   fleet: tuple[ArtifactStore, ServerHandle]) -> None:
    """An artifact altered on the server fails its hash; the device keeps serving v1."""
    store, server = fleet
    updater = Updater(agent, "dev1", tmp_path / "updater")
    updater.apply(desired(store, server, 1, "1.0.0", min_inferences=0))
    path = store.file_path("toy", "2.0.0", "artifacts/toy.onnx")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    report = updater.apply(desired(store, server, 2, "2.0.0"))
    error = report.models["toy"].last_error
    assert error is not None and error.code == "TamperedFileError" and error.version == "2.0.0"
    assert agent.predict("toy", {"x": X}).version == "1.0.0"


def test_package_signed_by_unknown_key_is_refused(tmp_path: Path, keypair: KeyPair,
                                                  other_keypair: KeyPair, agent: Agent,
                                                  fleet: tuple[ArtifactStore, ServerHandle]) -> None:
    """A version signed by a key the device does not pin is refused before any download."""
    store, server = fleet
    rogue = ArtifactStore(store.root, other_keypair.trust)
    rogue.publish(build_mlp_package(tmp_path / "toy-3.edgepkg", other_keypair, "3.0.0", 3,
                                    seed=3, tflite=False))
    updater = Updater(agent, "dev1", tmp_path / "updater")
    updater.apply(desired(store, server, 1, "1.0.0", min_inferences=0))
    report = updater.apply(desired(store, server, 2, "3.0.0"))
    error = report.models["toy"].last_error
    assert error is not None and error.code == "UntrustedKeyError"
    # refused after manifest and signature: no artifact byte was fetched
    assert not (tmp_path / "updater" / "downloads" / "toy" / "3.0.0" / "files").exists()
    assert agent.active_version("toy") == "1.0.0"


def test_cut_download_is_retried_and_resumed_within_the_same_revision(
        tmp_path: Path, agent: Agent, fleet: tuple[ArtifactStore, ServerHandle]) -> None:
    """A download cut after 30 % is reported as retrying (not failed), the revision stays open,
    and the next attempt asks only for the rest with Range and then commits."""
    store, server = fleet
    artifact = "files/artifacts/toy.onnx"
    with CuttingProxy((server.host, server.port),
                      cut_when=lambda seen, i: 0.3 if artifact in seen.path and i == 0
                      else None) as proxy:
        reports: list[Reported] = []
        updater = Updater(agent, "dev1", tmp_path / "updater", reports.append,
                          retry=RetryPolicy(min_s=0.05, max_s=0.1))
        first = updater.apply(desired(store, server, 1, "1.0.0", min_inferences=0,
                                      base_url=proxy.url))
        toy = first.models["toy"]
        assert toy.state == "retrying" and first.revision == 0, toy
        assert toy.last_error is not None and toy.last_error.code == "TransferError"
        assert updater.pending_retry_s is not None
        again = updater.apply(desired(store, server, 1, "1.0.0", min_inferences=0,
                                      base_url=proxy.url))
        assert again.revision == 1 and again.models["toy"].state == "committed"
        requests = proxy.seen(artifact)
        size = store.file_path("toy", "1.0.0", "artifacts/toy.onnx").stat().st_size
        assert [r.cut for r in requests] == [True, False]
        assert requests[0].range is None and requests[1].range == f"bytes={requests[0].body_bytes}-"
        assert sum(r.body_bytes for r in requests) <= 1.1 * size
        assert "failed" not in {r.models["toy"].state for r in reports if "toy" in r.models}


def test_the_worker_retries_by_itself(tmp_path: Path, agent: Agent,
                                      fleet: tuple[ArtifactStore, ServerHandle]) -> None:
    """Submitted to the running worker, a cut download completes with no new desired state."""
    store, server = fleet
    with CuttingProxy((server.host, server.port),
                      cut_when=lambda seen, i: 0.3 if "toy.onnx" in seen.path and i < 2
                      else None) as proxy:
        updater = Updater(agent, "dev1", tmp_path / "updater",
                          retry=RetryPolicy(min_s=0.05, max_s=0.1))
        updater.start()
        try:
            updater.submit(desired(store, server, 1, "1.0.0", min_inferences=0,
                                   base_url=proxy.url))
            deadline = time.monotonic() + 30.0
            while updater.revision != 1 and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            updater.stop()
        assert updater.revision == 1, updater.current_report()
        assert agent.active_version("toy") == "1.0.0"
        assert updater.delivery_retries == 2


def test_a_download_that_keeps_failing_gives_up_at_the_deadline(
        tmp_path: Path, agent: Agent, fleet: tuple[ArtifactStore, ServerHandle]) -> None:
    """Past the delivery deadline the version is reported failed and the revision closes."""
    store, server = fleet
    with CuttingProxy((server.host, server.port),
                      cut_when=lambda seen, i: 0.3 if "toy.onnx" in seen.path else None) as proxy:
        updater = Updater(agent, "dev1", tmp_path / "updater",
                          retry=RetryPolicy(min_s=0.01, max_s=0.01, deadline_s=0.0))
        report = updater.apply(desired(store, server, 1, "1.0.0", min_inferences=0,
                                       base_url=proxy.url))
    toy = report.models["toy"]
    assert report.revision == 1 and toy.state == "failed"
    assert toy.last_error is not None and "gave up after 1 attempts" in toy.last_error.message


def test_a_missing_file_is_not_retried(tmp_path: Path, agent: Agent,
                                       fleet: tuple[ArtifactStore, ServerHandle]) -> None:
    """HTTP 404 cannot get better by asking again: failed at once, revision applied."""
    store, server = fleet
    store.file_path("toy", "1.0.0", "artifacts/toy.onnx").unlink()
    updater = Updater(agent, "dev1", tmp_path / "updater")
    report = updater.apply(desired(store, server, 1, "1.0.0", min_inferences=0))
    toy = report.models["toy"]
    assert report.revision == 1 and toy.state == "failed"
    assert toy.last_error is not None and "404" in toy.last_error.message
    assert updater.pending_retry_s is None


def test_first_version_failing_its_health_check_keeps_serving_reported_unhealthy(
        tmp_path: Path, agent: Agent, fleet: tuple[ArtifactStore, ServerHandle],
        caplog: pytest.LogCaptureFixture) -> None:
    """With no earlier version, a failed health check leaves the version serving, reports it
    unhealthy, and the log says exactly that (no 'rolled back to None')."""
    store, server = fleet
    updater = Updater(agent, "dev1", tmp_path / "updater")
    updater.apply(desired(store, server, 1, "1.0.0", min_inferences=3, max_latency_ms=1e-6))
    for _ in range(3):
        agent.predict("toy", {"x": X})
    with caplog.at_level("WARNING"):
        updater.check_watches()
    report = updater.current_report().models["toy"]
    assert report.state == "unhealthy" and report.active == "1.0.0"
    assert report.last_error is not None and report.last_error.version == "1.0.0"
    assert agent.predict("toy", {"x": X}).version == "1.0.0"
    assert "reported unhealthy" in caplog.text and "None" not in caplog.text


def test_an_idle_device_decides_its_health_watch_at_the_time_limit(
        tmp_path: Path, agent: Agent, fleet: tuple[ArtifactStore, ServerHandle]) -> None:
    """A device that sees no live requests commits on its sample check after max_watch_s."""
    store, server = fleet
    updater = Updater(agent, "dev1", tmp_path / "updater")
    report = updater.apply(desired(store, server, 1, "1.0.0", min_inferences=50,
                                   max_watch_s=0.2))
    assert report.models["toy"].state == "health-check"
    updater.check_watches()
    assert updater.current_report().models["toy"].state == "health-check"
    time.sleep(0.25)
    updater.check_watches()
    assert updater.current_report().models["toy"].state == "committed"


def test_downloads_come_only_from_the_artifact_origins(
        tmp_path: Path, agent: Agent, fleet: tuple[ArtifactStore, ServerHandle]) -> None:
    """With --artifact-origin, desired state naming any other host (here the same server under
    another name) is refused for good, nothing fetched; the origin itself is served, whatever
    its spelling (case, trailing slash, default port)."""
    store, server = fleet
    port = server.url.rsplit(":", 1)[1].rstrip("/")
    elsewhere = f"http://localhost:{port}"
    fenced = Updater(agent, "dev1", tmp_path / "fenced", artifact_origins=[server.url])
    report = fenced.apply(desired(store, server, 1, "1.0.0", min_inferences=0,
                                  base_url=elsewhere))
    toy = report.models["toy"]
    assert toy.state == "failed" and toy.last_error is not None
    assert "not one of this agent's artifact origins" in toy.last_error.message
    assert fenced.pending_retry_s is None and fenced.bytes_downloaded == 0
    assert "toy" not in agent.cache.models()
    spelled = server.url.upper().replace("HTTP://", "http://") + "/"
    allowed = Updater(agent, "dev1", tmp_path / "allowed", artifact_origins=[spelled])
    report = allowed.apply(desired(store, server, 1, "1.0.0", min_inferences=0))
    assert report.models["toy"].state == "committed", report.models["toy"]
    assert agent.active_version("toy") == "1.0.0"
