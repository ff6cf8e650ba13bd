"""The fleet's artifact store: verified packages, laid out so devices fetch only what they need.

``publish`` verifies a package (signature by a key the fleet pins, every file's hash) and stores
it unpacked::

    ROOT/NAME/VERSION/manifest.json     exactly the signed bytes
    ROOT/NAME/VERSION/signature
    ROOT/NAME/VERSION/files/<member>    every file the manifest pins
    ROOT/NAME/VERSION/package.edgepkg   the original archive, for whole-package downloads

A device reads the manifest and signature, verifies them with its own pinned keys, and downloads
just the artifact its profile runs (plus reference statistics and health-check samples), each
checked against the manifest's sha256. Publishing is idempotent for the same manifest, and refuses
a different package under an existing version or a release number that does not increase.

``unpublish`` removes a version's directory and leaves a tombstone
(``ROOT/NAME/.unpublished/VERSION.json``: release and manifest digest): devices that installed it
keep its release as their high-water mark, so a later package must still have a higher release,
and the same version can only come back with the same manifest (which restores it as it was).
(Whether a rollout or a device's desired state still needs the version is the caller's check:
:mod:`..packages`.)
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from edgeserve.errors import ConfigError, EdgeserveError, ModelNotFoundError, PackageError
from edgeserve.manifest import Manifest, TensorSpec, is_safe_member_name, parse_manifest
from edgeserve.package import MANIFEST_MEMBER, SIGNATURE_MEMBER, open_package
from edgeserve.signing import TrustStore
from edgeserve.telemetry import ReferenceStats

__all__ = ["ArtifactStore", "PublishedVersion", "interface_changes"]

_TOMBSTONES = ".unpublished"


@dataclass(frozen=True)
class PublishedVersion:
    """A published version. ``interface_changes`` is filled by :meth:`ArtifactStore.publish`
    only: how the new version's inputs and outputs differ from the newest one published before
    it (empty when they agree, or for the first version)."""

    name: str
    version: str
    release: int
    manifest_sha256: str
    size_bytes: int
    artifacts: list[str]
    published_at: float = 0.0
    interface_changes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _dims(spec: TensorSpec) -> list[int | None]:
    # dynamic axes compare equal whatever they are called ("batch", "N", null)
    return [d if isinstance(d, int) else None for d in spec.shape]


def _compare(kind: str, old: list[TensorSpec], new: list[TensorSpec]) -> list[str]:
    changes = []
    before = {t.name: t for t in old}
    after = {t.name: t for t in new}
    for name in [t.name for t in old if t.name not in after]:
        changes.append(f"{kind} {name!r} is gone")
    for name in [t.name for t in new if t.name not in before]:
        changes.append(f"{kind} {name!r} is new")
    for name in [t.name for t in new if t.name in before]:
        a, b = before[name], after[name]
        if a.dtype != b.dtype:
            changes.append(f"{kind} {name!r} dtype {a.dtype} -> {b.dtype}")
        if _dims(a) != _dims(b):
            changes.append(f"{kind} {name!r} shape {a.shape} -> {b.shape}")
    return changes


def interface_changes(old: Manifest, new: Manifest) -> list[str]:
    """How ``new``'s inputs and outputs differ from ``old``'s (names, dtypes, shapes), one
    sentence each; empty when a client of ``old`` can call ``new`` unchanged."""
    return (_compare("input", old.inputs, new.inputs)
            + _compare("output", old.outputs, new.outputs))


class ArtifactStore:
    """A directory of published, verified packages (see the module docstring for the layout)."""

    def __init__(self, root: Path, trust: TrustStore, delta_fraction: float | None = None) -> None:
        self.root = Path(root)
        self.trust = trust
        self.delta_fraction = delta_fraction
        """serve a delta when it is at most this fraction of the full file (None:
        ``EDGESERVE_DELTA_FRACTION``, else 0.25; 0: never); see :mod:`.deltas`"""
        self.root.mkdir(parents=True, exist_ok=True)
        self._references: dict[tuple[str, str], ReferenceStats | None] = {}

    def _dir(self, name: str, version: str) -> Path:
        for part, what in ((name, "model name"), (version, "version")):
            if not is_safe_member_name(part) or "/" in part:
                raise ConfigError(f"{what} {part!r} is not a valid path component")
        return self.root / name / version

    def publish(self, package_path: Path) -> PublishedVersion:
        """Verify and store a package; returns what was published (idempotent)."""
        with open_package(package_path, trust=self.trust, verify_files=True) as pkg:
            manifest = pkg.manifest
            manifest_bytes = pkg.manifest_bytes
            signature = pkg.signature_bytes or b""
            digest = hashlib.sha256(manifest_bytes).hexdigest()
            target = self._dir(manifest.name, manifest.version)
            if (target / MANIFEST_MEMBER).exists():
                existing = hashlib.sha256((target / MANIFEST_MEMBER).read_bytes()).hexdigest()
                if existing == digest:
                    return self.get(manifest.name, manifest.version)
                raise PackageError(
                    f"{manifest.name} {manifest.version} is already published with a different "
                    "manifest; publish under a new version instead of replacing one"
                )
            if not self._restoring(manifest, digest):  # a restored version keeps its release
                self._check_release(manifest)
            changes = self._changes_from_newest(manifest)
            staging = Path(tempfile.mkdtemp(prefix=".publish-", dir=self.root))
            try:
                pkg.extract(sorted(manifest.files), staging / "files")
                (staging / MANIFEST_MEMBER).write_bytes(manifest_bytes)
                (staging / SIGNATURE_MEMBER).write_bytes(signature)
                shutil.copyfile(package_path, staging / "package.edgepkg")
                target.parent.mkdir(parents=True, exist_ok=True)
                staging.replace(target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        (target.parent / _TOMBSTONES / f"{manifest.version}.json").unlink(missing_ok=True)
        return replace(self.get(manifest.name, manifest.version), interface_changes=changes)

    def _changes_from_newest(self, manifest: Manifest) -> list[str]:
        published = self.versions(manifest.name)
        if not published:
            return []
        newest = self.manifest(manifest.name, published[-1].version)
        return [f"{change} (compared with {newest.version})"
                for change in interface_changes(newest, manifest)]

    def _tombstones(self, name: str) -> dict[str, dict[str, object]]:
        base = self.root / name / _TOMBSTONES
        if not base.is_dir():
            return {}
        found = {}
        for path in base.glob("*.json"):
            try:
                found[path.stem] = dict(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return found

    def _restoring(self, manifest: Manifest, digest: str) -> bool:
        """True when this exact manifest was unpublished before (it may come back as it was);
        a different package under an unpublished version is refused."""
        gone = self._tombstones(manifest.name).get(manifest.version)
        if gone is None:
            return False
        if gone.get("manifest_sha256") != digest:
            raise PackageError(
                f"{manifest.name} {manifest.version} was published before with a different "
                "manifest and unpublished; devices may hold that one, so publish this package "
                "under a new version")
        return True

    def _check_release(self, manifest: Manifest) -> None:
        released = [(v.version, v.release) for v in self.versions(manifest.name)]
        released += [(version, int(str(data.get("release", 0))))
                     for version, data in self._tombstones(manifest.name).items()
                     if version != manifest.version]
        for version, release in released:
            if release >= manifest.release:
                raise PackageError(
                    f"{manifest.name} {manifest.version} has release {manifest.release}, but "
                    f"{version} was already published with release {release}; "
                    "release numbers must increase (devices refuse older releases)"
                )

    def unpublish(self, name: str, version: str) -> PublishedVersion:
        """Remove a published version (leaving a tombstone, see the module docstring)."""
        published = self.get(name, version)
        target = self._dir(name, version)
        tombstones = target.parent / _TOMBSTONES
        tombstones.mkdir(exist_ok=True)
        (tombstones / f"{version}.json").write_text(json.dumps({
            "release": published.release, "manifest_sha256": published.manifest_sha256,
            "unpublished_at": time.time()}))
        # out of the way in one rename, so no reader sees a half-deleted version
        trash = Path(tempfile.mkdtemp(prefix=".unpublish-", dir=self.root))
        target.replace(trash / "version")
        shutil.rmtree(trash, ignore_errors=True)
        self._references.pop((name, version), None)
        self._prune_deltas()
        return published

    def _prune_deltas(self) -> None:
        """Drop cached deltas (``.deltas``, see :mod:`.deltas`) whose base or target is no
        longer a published file: none of them can be offered again."""
        cached = self.root / ".deltas"
        if not cached.is_dir():
            return
        live = {entry.sha256 for model in self.models() for v in self.versions(model)
                for entry in self.manifest(model, v.version).files.values()}
        for path in cached.iterdir():
            base, _, target = path.stem.partition("-")
            if base not in live or target not in live:
                path.unlink(missing_ok=True)

    def manifest(self, name: str, version: str) -> Manifest:
        path = self._dir(name, version) / MANIFEST_MEMBER
        if not path.exists():
            known = ", ".join(v.version for v in self.versions(name)) or "none"
            raise ModelNotFoundError(f"{name} {version} is not published (published versions: "
                                     f"{known})")
        return parse_manifest(path.read_bytes(), where=str(path))

    def get(self, name: str, version: str) -> PublishedVersion:
        manifest = self.manifest(name, version)
        path = self._dir(name, version) / MANIFEST_MEMBER
        raw = path.read_bytes()
        return PublishedVersion(
            name=manifest.name, version=manifest.version, release=manifest.release,
            manifest_sha256=hashlib.sha256(raw).hexdigest(),
            size_bytes=sum(f.size for f in manifest.files.values()),
            artifacts=[a.id for a in manifest.artifacts],
            published_at=path.stat().st_mtime,
        )

    def versions(self, name: str) -> list[PublishedVersion]:
        base = self.root / name
        if not base.is_dir():
            return []
        found = [self.get(name, d.name) for d in base.iterdir()
                 if (d / MANIFEST_MEMBER).exists()]
        return sorted(found, key=lambda v: v.release)

    def models(self) -> list[str]:
        return sorted(d.name for d in self.root.iterdir()
                      if d.is_dir() and not d.name.startswith("."))

    def file_path(self, name: str, version: str, member: str) -> Path:
        """Where a published file lives; only names the manifest pins are served."""
        base = self._dir(name, version)
        if member in (MANIFEST_MEMBER, SIGNATURE_MEMBER, "package.edgepkg"):
            path = base / member
        else:
            manifest = self.manifest(name, version)
            if member not in manifest.files:
                raise ModelNotFoundError(f"{name} {version} has no file {member!r}")
            path = base / "files" / member
        if not path.exists():
            raise ModelNotFoundError(f"{name} {version}: {member} is not published")
        return path

    def reference(self, name: str, version: str) -> ReferenceStats | None:
        """A published version's drift reference statistics (cached), None if it has none."""
        key = (name, version)
        if key not in self._references:
            try:
                manifest = self.manifest(name, version)
                member = manifest.reference or "reference/stats.json"
                path = self.file_path(name, version, member)
                self._references[key] = ReferenceStats.from_json(path.read_bytes(), str(path))
            except EdgeserveError:
                self._references[key] = None
        return self._references[key]

    def index(self) -> list[dict[str, object]]:
        return [v.to_dict() for name in self.models() for v in self.versions(name)]

    def dump_index(self) -> str:
        return json.dumps(self.index(), indent=2)
