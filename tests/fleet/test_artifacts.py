"""Publishing verified packages and serving their files to devices with resumable downloads."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette

from edgeserve.device_agent.updates.download import download_file, fetch_bytes
from edgeserve.errors import (
    ModelNotFoundError,
    PackageError,
    TamperedFileError,
    TransferError,
    UntrustedKeyError,
)
from edgeserve.fleet.artifacts import ArtifactStore
from edgeserve.fleet.web.artifacts import artifact_routes, package_base_url
from edgeserve.fleet.web.server import ServerHandle, start_server
from edgeserve.signing import TrustStore
from edgeserve.testing import KeyPair, make_manifest, write_test_package

BIG = hashlib.sha512(b"seed").digest() * 40_000  # 2.5 MB of incompressible-ish bytes


@pytest.fixture
def store(tmp_path: Path, keypair: KeyPair) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store", keypair.trust)


@pytest.fixture
def published(tmp_path: Path, keypair: KeyPair, store: ArtifactStore) -> Path:
    pkg = tmp_path / "toy-1.0.0.edgepkg"
    write_test_package(pkg, keypair, {"artifacts/model.onnx": BIG})
    store.publish(pkg)
    return pkg


@pytest.fixture
def server(store: ArtifactStore) -> Iterator[ServerHandle]:
    handle = start_server(Starlette(routes=artifact_routes(store)))
    try:
        yield handle
    finally:
        handle.stop()


def test_publish_is_verified_and_idempotent(store: ArtifactStore, published: Path) -> None:
    """A published package is listed once, even when published twice."""
    again = store.publish(published)
    assert again.version == "1.0.0" and [v.version for v in store.versions("toy")] == ["1.0.0"]
    assert store.file_path("toy", "1.0.0", "artifacts/model.onnx").read_bytes() == BIG


def test_publish_refuses_untrusted(tmp_path: Path, other_keypair: KeyPair,
                                   store: ArtifactStore) -> None:
    """A package signed by a key the fleet does not pin is refused."""
    pkg = tmp_path / "x.edgepkg"
    write_test_package(pkg, other_keypair)
    with pytest.raises(UntrustedKeyError):
        store.publish(pkg)


def test_publish_refuses_non_increasing_release(tmp_path: Path, keypair: KeyPair,
                                                store: ArtifactStore, published: Path) -> None:
    """A new version must carry a higher release number than every published one."""
    pkg = tmp_path / "toy-1.1.0.edgepkg"
    write_test_package(pkg, keypair, manifest=make_manifest(version="1.1.0", release=1))
    with pytest.raises(PackageError, match="release numbers must increase"):
        store.publish(pkg)


def test_publish_refuses_replacing_a_version(tmp_path: Path, keypair: KeyPair,
                                             store: ArtifactStore, published: Path) -> None:
    """Different content under an existing version is refused."""
    pkg = tmp_path / "toy-1.0.0b.edgepkg"
    write_test_package(pkg, keypair, {"artifacts/model.onnx": b"other"})
    with pytest.raises(PackageError, match="already published"):
        store.publish(pkg)


def test_unknown_files_are_not_served(store: ArtifactStore, published: Path) -> None:
    """Only files the manifest pins can be requested."""
    with pytest.raises(ModelNotFoundError):
        store.file_path("toy", "1.0.0", "../../etc/passwd")
    with pytest.raises(ModelNotFoundError):
        store.manifest("toy", "9.9.9")


def test_download_resumes_after_a_cut(tmp_path: Path, published: Path,
                                      server: ServerHandle, keypair: KeyPair) -> None:
    """A download that dies half-way fetches only the remaining bytes on the next attempt."""
    base = package_base_url(server.url, "toy", "1.0.0")
    manifest_bytes = fetch_bytes(base + "manifest.json")
    signature = fetch_bytes(base + "signature")
    TrustStore.verify(keypair.trust, manifest_bytes, signature)
    entry = make_manifest().model_validate_json(manifest_bytes).files["artifacts/model.onnx"]
    dest = tmp_path / "dl" / "model.onnx"

    class Cut(Exception):
        pass

    def die_half_way(done: int, total: int) -> None:
        if done > total // 2:
            raise Cut

    with pytest.raises(Cut):
        download_file(base + "files/artifacts/model.onnx", dest, entry.size, entry.sha256,
                      progress=die_half_way)
    partial = dest.with_name("model.onnx.part").stat().st_size
    assert 0 < partial < entry.size and not dest.exists()
    result = download_file(base + "files/artifacts/model.onnx", dest, entry.size, entry.sha256)
    assert result.resumed_from == partial
    assert result.bytes_transferred == entry.size - partial
    assert dest.read_bytes() == BIG


def test_download_refuses_wrong_hash(tmp_path: Path, published: Path,
                                     server: ServerHandle) -> None:
    """Bytes that do not match the manifest's sha256 are discarded, never installed."""
    base = package_base_url(server.url, "toy", "1.0.0")
    dest = tmp_path / "dl" / "model.onnx"
    with pytest.raises(TamperedFileError):
        download_file(base + "files/artifacts/model.onnx", dest, len(BIG), "0" * 64)
    assert not dest.exists() and not dest.with_name("model.onnx.part").exists()


def test_download_errors_are_transfer_errors(tmp_path: Path, server: ServerHandle) -> None:
    """A 404 or an unreachable host is a TransferError with the URL."""
    with pytest.raises(TransferError, match="HTTP 404"):
        fetch_bytes(f"{server.url}/v1/packages/none/1.0.0/manifest.json")
    with pytest.raises(TransferError, match="127.0.0.1:9"):
        fetch_bytes("http://127.0.0.1:9/x", timeout=2)
