"""Install a verified model version into the cache: from a whole ``.edgepkg`` or from its parts.

Both paths verify before anything is recorded: the signature over the exact manifest bytes by a
pinned key, the release number against the model's high-water mark (rollback-attack protection),
and every file against the signed manifest's sha256 and size. Only the files the device's profile
needs are kept (see :func:`~.selection.required_files`). The version record is written last, so a
crash leaves either no trace of the version (just garbage for ``check``) or the whole version.
"""

from __future__ import annotations

import hashlib
import shutil
import time
import uuid
import zipfile
from collections.abc import Mapping
from pathlib import Path

from edgeserve.errors import (
    CacheError,
    ModelNotFoundError,
    PackageError,
    RollbackError,
    UnsafeMemberError,
    VersionConflictError,
)
from edgeserve.manifest import Artifact, Manifest, parse_manifest
from edgeserve.package import MANIFEST_MEMBER, SIGNATURE_MEMBER, open_package
from edgeserve.profiles import HardwareProfile
from edgeserve.signing import TrustStore

from ._faults import checkpoint
from .cache import ModelCache, ModelState, VersionRecord
from .selection import required_files, select_artifact

__all__ = ["install_package", "install_parts"]


def _check_release(cache: ModelCache, manifest: Manifest) -> None:
    installed = [r.release for r in cache.records(manifest.name)]
    high = max([cache.floor(manifest.name), *installed], default=0)
    if high and manifest.release < high:
        raise RollbackError(
            f"{manifest.name} {manifest.version} has release {manifest.release}, older than the "
            f"release {high} already installed on this device; refusing a downgrade (rollback "
            "attack protection)")


def _existing(cache: ModelCache, manifest: Manifest, manifest_sha: str) -> VersionRecord | None:
    try:
        record = cache.record(manifest.name, manifest.version)
    except (ModelNotFoundError, CacheError):
        return None
    if record.manifest_sha256 != manifest_sha:
        raise VersionConflictError(
            f"{manifest.name} {manifest.version} is already installed from a different package "
            "(other manifest); publish the change as a new version, or remove the installed one")
    return record


def _commit(cache: ModelCache, manifest: Manifest, artifact: Artifact, blobs: dict[str, str],
            manifest_bytes: bytes, signature_bytes: bytes, signed_by: str,
            activate: bool) -> VersionRecord:
    manifest_sha = cache.put_bytes(manifest_bytes)
    signature_sha = cache.put_bytes(signature_bytes)
    size = sum(manifest.files[name].size for name in blobs)
    record = VersionRecord(
        name=manifest.name, version=manifest.version, release=manifest.release,
        artifact_id=artifact.id, artifact_format=artifact.format, manifest_sha256=manifest_sha,
        signature_sha256=signature_sha, files=blobs, size_bytes=size, signed_by=signed_by,
        installed_at=time.time())
    cache.write_record(record)
    cache.raise_floor(manifest.name, manifest.release)
    state = cache.state(manifest.name)
    if state.max_release < manifest.release:
        cache.write_state(manifest.name, ModelState(state.active, state.previous,
                                                    manifest.release))
    if activate:
        cache.activate(manifest.name, manifest.version)
    cache.evict(keep={manifest.name: {manifest.version}})
    return record


def install_package(cache: ModelCache, trust: TrustStore, profile: HardwareProfile,
                    path: Path, activate: bool, artifact_id: str | None = None) -> VersionRecord:
    """Verify and install the files of ``path`` this profile needs."""
    with cache.locked(), open_package(path, trust=trust) as package:
        with zipfile.ZipFile(path) as zf:
            manifest_bytes = zf.read(MANIFEST_MEMBER)
            signature_bytes = zf.read(SIGNATURE_MEMBER)
        signed_by = trust.verify(manifest_bytes, signature_bytes)
        manifest = parse_manifest(manifest_bytes, where=f"{path.name}: manifest.json")
        _check_release(cache, manifest)
        existing = _existing(cache, manifest, _sha(manifest_bytes))
        if existing is not None:
            if activate:
                cache.activate(manifest.name, manifest.version)
            return existing
        artifact = select_artifact(manifest, profile, artifact_id)
        names = required_files(manifest, profile, artifact.id)
        staging = cache.tmp_dir() / uuid.uuid4().hex
        try:
            package.extract(names, staging)
            checkpoint("extracted")
            blobs = {}
            for name in names:
                entry = manifest.files[name]
                blobs[name] = cache.put_file(staging / name, entry.sha256, entry.size, move=True)
            return _commit(cache, manifest, artifact, blobs, manifest_bytes, signature_bytes,
                           signed_by, activate)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def install_parts(cache: ModelCache, trust: TrustStore, profile: HardwareProfile,
                  manifest_bytes: bytes, signature_bytes: bytes, files: Mapping[str, Path],
                  activate: bool, artifact_id: str | None = None,
                  move: bool = False) -> VersionRecord:
    """Install from separately downloaded parts; ``files`` maps package member names to paths.

    It must hold every file :func:`required_files` names for this profile; each is checked
    against the signed manifest before it enters the cache.
    """
    signed_by = trust.verify(manifest_bytes, signature_bytes)
    manifest = parse_manifest(manifest_bytes, where="manifest.json")
    with cache.locked():
        _check_release(cache, manifest)
        existing = _existing(cache, manifest, _sha(manifest_bytes))
        if existing is not None:
            if activate:
                cache.activate(manifest.name, manifest.version)
            return existing
        artifact = select_artifact(manifest, profile, artifact_id)
        names = required_files(manifest, profile, artifact.id)
        unknown = sorted(set(files) - set(manifest.files))
        if unknown:
            raise UnsafeMemberError(f"files {unknown[:5]} are not part of {manifest.name} "
                                    f"{manifest.version}'s signed manifest")
        missing = [n for n in names if n not in files]
        if missing:
            raise PackageError(f"cannot install {manifest.name} {manifest.version}: missing "
                               f"file(s) {missing} (profile {profile.name} needs {names})")
        blobs = {}
        for name in names:
            entry = manifest.files[name]
            blobs[name] = cache.put_file(Path(files[name]), entry.sha256, entry.size, move=move)
        return _commit(cache, manifest, artifact, blobs, manifest_bytes, signature_bytes,
                       signed_by, activate)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

