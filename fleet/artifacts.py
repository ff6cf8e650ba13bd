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
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from edgeserve.errors import ConfigError, EdgeserveError, ModelNotFoundError, PackageError
from edgeserve.manifest import Manifest, is_safe_member_name, parse_manifest
from edgeserve.package import MANIFEST_MEMBER, SIGNATURE_MEMBER, open_package
from edgeserve.signing import TrustStore
from edgeserve.telemetry import ReferenceStats

__all__ = ["ArtifactStore", "PublishedVersion"]


@dataclass(frozen=True)
class PublishedVersion:
    name: str
    version: str
    release: int
    manifest_sha256: str
    size_bytes: int
    artifacts: list[str]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class ArtifactStore:
    """A directory of published, verified packages (see the module docstring for the layout)."""

    def __init__(self, root: Path, trust: TrustStore) -> None:
        self.root = Path(root)
        self.trust = trust
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
            self._check_release(manifest)
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
        return self.get(manifest.name, manifest.version)

    def _check_release(self, manifest: Manifest) -> None:
        for other in self.versions(manifest.name):
            if other.release >= manifest.release:
                raise PackageError(
                    f"{manifest.name} {manifest.version} has release {manifest.release}, but "
                    f"{other.version} is already published with release {other.release}; "
                    "release numbers must increase (devices refuse older releases)"
                )

    def manifest(self, name: str, version: str) -> Manifest:
        path = self._dir(name, version) / MANIFEST_MEMBER
        if not path.exists():
            known = ", ".join(v.version for v in self.versions(name)) or "none"
            raise ModelNotFoundError(f"{name} {version} is not published (published versions: "
                                     f"{known})")
        return parse_manifest(path.read_bytes(), where=str(path))

    def get(self, name: str, version: str) -> PublishedVersion:
        manifest = self.manifest(name, version)
        raw = (self._dir(name, version) / MANIFEST_MEMBER).read_bytes()
        return PublishedVersion(
            name=manifest.name, version=manifest.version, release=manifest.release,
            manifest_sha256=hashlib.sha256(raw).hexdigest(),
            size_bytes=sum(f.size for f in manifest.files.values()),
            artifacts=[a.id for a in manifest.artifacts],
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
