"""A device updating a model it holds gets a delta, verifies what it rebuilds, or falls back.

The fleet side is the real artifact endpoint over HTTP (and its delta cache on disk); the device
side is the real agent and updater. Damage is done to the fleet's cached delta files, as a bad
disk or a bad actor with access to the fleet's store would."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from starlette.applications import Starlette

from edgeserve.contract import Desired
from edgeserve.delta import make_delta
from edgeserve.device_agent.agent import Agent
from edgeserve.device_agent.updates.updater import RetryPolicy, Updater
from edgeserve.fleet.artifacts import ArtifactStore
from edgeserve.fleet.deltas import DeltaCache
from edgeserve.fleet.transfers import TransferLog
from edgeserve.fleet.web.artifacts import artifact_routes, package_base_url
from edgeserve.fleet.web.server import ServerHandle, start_server
from edgeserve.testing import KeyPair
from tests.deltas import big_mlp_weights, fine_tuned, head_retrained, mlp_package
from tests.proxy import CuttingProxy

MEMBER = "artifacts/model.onnx"
W1 = big_mlp_weights()
WEIGHTS = {"1.0.0": W1, "1.1.0": head_retrained(W1), "1.2.0": fine_tuned(W1)}
X = np.random.default_rng(5).normal(size=(2, 256)).astype(np.float32)


@pytest.fixture
def fleet(tmp_path: Path, keypair: KeyPair) -> Iterator[tuple[ArtifactStore, ServerHandle]]:
    store = ArtifactStore(tmp_path / "artifacts", keypair.trust)
    for release, (version, w) in enumerate(WEIGHTS.items(), start=1):
        store.publish(mlp_package(tmp_path / f"toy-{version}.edgepkg", keypair, w, version,
                                  release))
    server = start_server(Starlette(routes=artifact_routes(store)))
    try:
        yield store, server
    finally:
        server.stop()


@pytest.fixture
def agent(tmp_path: Path, keypair: KeyPair) -> Iterator[Agent]:
    with Agent(tmp_path / "cache", "generic-cpu", [keypair.public_path]) as a:
        yield a


def _desired(store: ArtifactStore, server: ServerHandle, revision: int, active: str,
             base_url: str | None = None) -> Desired:
    versions = {v.version: {"release": v.release, "manifest_sha256": v.manifest_sha256,
                            "url": package_base_url(base_url or server.url, "toy", v.version)}
                for v in store.versions("toy")}
    return Desired.model_validate({"v": 1, "revision": revision, "models": {"toy": {
        "active": active, "versions": versions, "health": {"min_inferences": 0}}}})


def _sha(store: ArtifactStore, version: str) -> str:
    return store.manifest("toy", version).files[MEMBER].sha256


def _installed_sha(agent: Agent, version: str) -> str:
    record = agent.cache.record("toy", version)
    return hashlib.sha256(agent.cache.blob_path(record.files[MEMBER]).read_bytes()).hexdigest()


def _update(agent: Agent, tmp_path: Path, store: ArtifactStore, server: ServerHandle,
            version: str) -> Updater:
    updater = Updater(agent, "dev1", tmp_path / "updater")
    updater.apply(_desired(store, server, 1, "1.0.0"))
    report = updater.apply(_desired(store, server, 2, version))
    assert report.models["toy"].state == "committed", report.models["toy"]
    assert agent.active_version("toy") == version
    assert _installed_sha(agent, version) == _sha(store, version)
    expected = WEIGHTS[version].forward(X)
    np.testing.assert_allclose(agent.predict("toy", {"x": X}).outputs["y"], expected, atol=1e-5)
    return updater


def _prepared(store: ArtifactStore, version: str) -> tuple[Path, Path]:
    """The fleet's cached delta (and its record) from 1.0.0 to ``version``, computed now."""
    offer = DeltaCache(store).offer("toy", version, MEMBER, _sha(store, "1.0.0"))
    assert offer.method == "delta" and offer.path is not None
    return offer.path, offer.path.with_suffix(".json")


def _rewrite(delta_path: Path, data: bytes) -> None:
    """Replace a cached delta and its record coherently: the download verifies, applying must
    refuse it."""
    delta_path.write_bytes(data)
    meta_path = delta_path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    meta_path.write_text(json.dumps(meta))


def test_head_retrained_version_arrives_as_a_delta(
        tmp_path: Path, agent: Agent, fleet: tuple[ArtifactStore, ServerHandle]) -> None:
    """Only the head changed: the device gets a small delta, rebuilds, verifies and activates."""
    store, server = fleet
    updater = _update(agent, tmp_path, store, server, "1.1.0")
    delivery = updater.current_report().models["toy"].delivery
    assert delivery is not None and delivery.version == "1.1.0"
    assert delivery.delta_files == 1 and delivery.fallbacks == 0
    full = store.manifest("toy", "1.1.0").files[MEMBER].size
    assert delivery.received < 0.05 * full, delivery
    summary = TransferLog(store.root).summary("toy", "1.1.0")
    assert summary.delta_transfers == 1 and summary.delta_full_bytes == full
    assert summary.saved > 0.9 * full
    entries = TransferLog(store.root).entries("toy", "1.1.0")
    assert {e["device"] for e in entries} == {"dev1"}


def test_fine_tuned_version_is_sent_in_full(
        tmp_path: Path, agent: Agent, fleet: tuple[ArtifactStore, ServerHandle]) -> None:
    """Every weight changed: the fleet offers the full file, which is no fallback."""
    store, server = fleet
    updater = _update(agent, tmp_path, store, server, "1.2.0")
    delivery = updater.current_report().models["toy"].delivery
    assert delivery is not None and delivery.delta_files == 0 and delivery.fallbacks == 0
    assert delivery.received >= store.manifest("toy", "1.2.0").files[MEMBER].size
    summary = TransferLog(store.root).summary("toy", "1.2.0")
    assert summary.delta_transfers == 0 and summary.full_transfers >= 1


def _falls_back(tmp_path: Path, agent: Agent, store: ArtifactStore,
                server: ServerHandle, delta_sent: bool = True) -> None:
    updater = _update(agent, tmp_path, store, server, "1.1.0")
    delivery = updater.current_report().models["toy"].delivery
    assert delivery is not None
    assert delivery.fallbacks == 1 and delivery.fallbacks_total == 1 and delivery.delta_files == 0
    assert updater.delta_fallbacks == 1
    full = store.manifest("toy", "1.1.0").files[MEMBER].size
    assert delivery.received >= full  # the whole file came after the refused delta
    summary = TransferLog(store.root).summary("toy", "1.1.0")
    assert summary.full_transfers >= 1 and summary.fallbacks == (1 if delta_sent else 0)


def test_corrupted_cached_delta_falls_back_to_full(
        tmp_path: Path, agent: Agent, fleet: tuple[ArtifactStore, ServerHandle]) -> None:
    """A delta file damaged on the fleet's disk fails its sha256: full download, counted."""
    store, server = fleet
    delta_path, _ = _prepared(store, "1.1.0")
    data = bytearray(delta_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    delta_path.write_bytes(bytes(data))
    _falls_back(tmp_path, agent, store, server)


def test_damaged_but_consistent_delta_is_refused_when_applied(
        tmp_path: Path, agent: Agent, fleet: tuple[ArtifactStore, ServerHandle]) -> None:
    """A damaged delta whose offer matches it passes the download, and is refused by hash."""
    store, server = fleet
    delta_path, _ = _prepared(store, "1.1.0")
    data = bytearray(delta_path.read_bytes())
    data[-20] ^= 0x01
    _rewrite(delta_path, bytes(data))
    _falls_back(tmp_path, agent, store, server)


def test_truncated_delta_is_refused(
        tmp_path: Path, agent: Agent, fleet: tuple[ArtifactStore, ServerHandle]) -> None:
    """A delta cut short (and offered at its cut size) is refused: full download."""
    store, server = fleet
    delta_path, _ = _prepared(store, "1.1.0")
    _rewrite(delta_path, delta_path.read_bytes()[:-100])
    _falls_back(tmp_path, agent, store, server)


def test_delta_against_the_wrong_base_is_refused(
        tmp_path: Path, agent: Agent, fleet: tuple[ArtifactStore, ServerHandle]) -> None:
    """A well-formed delta to the right target, but made from another file (v1 with one byte
    changed), is refused."""
    store, server = fleet
    delta_path, _ = _prepared(store, "1.1.0")
    other = bytearray(store.file_path("toy", "1.0.0", MEMBER).read_bytes())
    other[1000] ^= 0x01
    target = store.file_path("toy", "1.1.0", MEMBER).read_bytes()
    _rewrite(delta_path, make_delta(bytes(other), target, "onnx"))
    _falls_back(tmp_path, agent, store, server)


def test_delta_building_other_bytes_is_refused(
        tmp_path: Path, agent: Agent, fleet: tuple[ArtifactStore, ServerHandle]) -> None:
    """A valid delta from the right base to another file (not the signed one) is refused: the
    signed version is installed, never the other bytes."""
    store, server = fleet
    delta_path, _ = _prepared(store, "1.1.0")
    base = store.file_path("toy", "1.0.0", MEMBER).read_bytes()
    wrong = bytearray(store.file_path("toy", "1.1.0", MEMBER).read_bytes())
    wrong[-50] ^= 0x01  # a byte of the new head: a model the release key never signed
    wrong = bytes(wrong)
    _rewrite(delta_path, make_delta(base, wrong, "onnx"))
    _falls_back(tmp_path, agent, store, server)


def test_old_fleet_without_deltas_still_serves(
        tmp_path: Path, agent: Agent, keypair: KeyPair) -> None:
    """A fleet that knows no deltas answers the offer with 404: the device downloads in full
    and counts no fallback."""
    from starlette.routing import Route

    store = ArtifactStore(tmp_path / "artifacts", keypair.trust)
    for release, (version, w) in enumerate(list(WEIGHTS.items())[:2], start=1):
        store.publish(mlp_package(tmp_path / f"toy-{version}.edgepkg", keypair, w, version,
                                  release))
    routes = [r for r in artifact_routes(store)
              if isinstance(r, Route) and "delta" not in r.path]
    server = start_server(Starlette(routes=routes))
    try:
        updater = _update(agent, tmp_path, store, server, "1.1.0")
    finally:
        server.stop()
    delivery = updater.current_report().models["toy"].delivery
    assert delivery is not None and delivery.fallbacks == 0 and delivery.delta_files == 0


def test_unpublishing_drops_its_cached_deltas(fleet: tuple[ArtifactStore, ServerHandle]) -> None:
    """Deltas to (or from) a version that is unpublished are removed with it; others stay."""
    store, _ = fleet
    to_head, _ = _prepared(store, "1.1.0")
    DeltaCache(store).offer("toy", "1.2.0", MEMBER, _sha(store, "1.1.0"))  # computed, cached
    assert len(list((store.root / ".deltas").iterdir())) == 4
    store.unpublish("toy", "1.2.0")
    assert sorted(p.name for p in (store.root / ".deltas").iterdir()) == sorted(
        [to_head.name, to_head.with_suffix(".json").name])


def test_delta_gone_between_offer_and_download_falls_back(
        tmp_path: Path, agent: Agent, fleet: tuple[ArtifactStore, ServerHandle]) -> None:
    """The offer names a delta the fleet no longer has (404): a fallback, not a failed update."""
    store, server = fleet
    delta_path, _ = _prepared(store, "1.1.0")
    delta_path.unlink()  # the record stays: the offer still names the delta
    _falls_back(tmp_path, agent, store, server, delta_sent=False)


def test_unchanged_artifact_is_taken_from_the_cache(
        tmp_path: Path, agent: Agent, keypair: KeyPair,
        fleet: tuple[ArtifactStore, ServerHandle]) -> None:
    """A version whose artifact is byte-identical to the installed one downloads no artifact."""
    store, server = fleet
    store.publish(mlp_package(tmp_path / "toy-1.3.0.edgepkg", keypair, W1, "1.3.0", 4))
    WEIGHTS["1.3.0"] = W1
    try:
        updater = _update(agent, tmp_path, store, server, "1.3.0")
    finally:
        del WEIGHTS["1.3.0"]
    delivery = updater.current_report().models["toy"].delivery
    assert delivery is not None and delivery.reused_files == 1 and delivery.delta_files == 0
    assert not [e for e in TransferLog(store.root).entries("toy", "1.3.0") if e["file"] == MEMBER]


def test_cut_delta_download_resumes_with_range(
        tmp_path: Path, agent: Agent, fleet: tuple[ArtifactStore, ServerHandle]) -> None:
    """A delta download cut half-way is retried and resumed with Range, not started over."""
    store, server = fleet
    updater = Updater(agent, "dev1", tmp_path / "updater", retry=RetryPolicy(0.05, 0.1))
    updater.apply(_desired(store, server, 1, "1.0.0"))
    with CuttingProxy((server.host, server.port),
                      cut_when=lambda seen, i: 0.5 if "/deltas/" in seen.path and i == 0
                      else None) as proxy:
        first = updater.apply(_desired(store, server, 2, "1.1.0", proxy.url))
        assert first.models["toy"].state == "retrying", first.models["toy"]
        again = updater.apply(_desired(store, server, 2, "1.1.0", proxy.url))
        requests = proxy.seen("/deltas/")
    assert again.models["toy"].state == "committed", again.models["toy"]
    assert [r.cut for r in requests] == [True, False]
    assert requests[0].range is None and requests[1].range == f"bytes={requests[0].body_bytes}-"
    delivery = again.models["toy"].delivery
    assert delivery is not None and delivery.delta_files == 1 and delivery.fallbacks == 0
    assert delivery.received < 0.05 * delivery.full_bytes
    assert _installed_sha(agent, "1.1.0") == _sha(store, "1.1.0")


def test_after_a_refused_delta_a_cut_full_download_is_resumed(
        tmp_path: Path, agent: Agent, fleet: tuple[ArtifactStore, ServerHandle]) -> None:
    """A refused delta, then a cut full download: the next attempt resumes the full file (no
    second try at the bad delta), and the report counts the fallback once over both attempts."""
    store, server = fleet
    delta_path, _ = _prepared(store, "1.1.0")
    data = bytearray(delta_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    delta_path.write_bytes(bytes(data))
    updater = Updater(agent, "dev1", tmp_path / "updater", retry=RetryPolicy(0.05, 0.1))
    updater.apply(_desired(store, server, 1, "1.0.0"))
    full = f"files/{MEMBER}"
    with CuttingProxy((server.host, server.port),
                      cut_when=lambda seen, i: 0.3 if full in seen.path and i == 0
                      else None) as proxy:
        first = updater.apply(_desired(store, server, 2, "1.1.0", proxy.url))
        assert first.models["toy"].state == "retrying", first.models["toy"]
        again = updater.apply(_desired(store, server, 2, "1.1.0", proxy.url))
        deltas, files = proxy.seen("/deltas/"), proxy.seen(full)
    assert again.models["toy"].state == "committed", again.models["toy"]
    assert len(deltas) == 1 and [r.cut for r in files] == [True, False]
    assert files[1].range == f"bytes={files[0].body_bytes}-"
    delivery = again.models["toy"].delivery
    assert delivery is not None
    assert delivery.fallbacks == 1 and delivery.fallbacks_total == 1 and delivery.delta_files == 0
    size = store.manifest("toy", "1.1.0").files[MEMBER].size
    # the bytes before the cut are not counted (the cut download raises): the rest, and the delta
    assert 0.6 * size < delivery.received <= 1.2 * size
    assert _installed_sha(agent, "1.1.0") == _sha(store, "1.1.0")
