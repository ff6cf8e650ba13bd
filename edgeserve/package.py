"""Write, read and verify model packages (``.edgepkg``).

A package is a zip archive::

    manifest.json     canonical JSON (see edgeserve.manifest), pins every other file by sha256
    signature         ed25519 signature document over manifest.json (see edgeserve.signing)
    artifacts/...     one file per artifact (a directory for Core ML .mlpackage)
    reference/...     drift reference statistics
    samples/...       health-check inputs and expected outputs
    report.json       the converter's validation report

Reading treats the archive as hostile until proven otherwise: member names are checked before
anything is read, sizes are checked against the manifest and the configured limits before and
while bytes are decompressed (zip bombs stop at the declared size), every byte is hashed before it
is handed out, and extraction writes temp files that are renamed into place only once verified.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .errors import (
    CorruptPackageError,
    OversizeMemberError,
    PackageError,
    RollbackError,
    SchemaError,
    TamperedFileError,
    TamperedManifestError,
    UnsafeMemberError,
)
from .manifest import FileEntry, Manifest, is_safe_member_name, parse_manifest
from .signing import TrustStore, sign_manifest

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "MANIFEST_MEMBER",
    "SIGNATURE_MEMBER",
    "Package",
    "PackageLimits",
    "PackageWriter",
    "atomic_write",
    "file_sha256",
    "open_package",
    "package_summary",
]

MANIFEST_MEMBER = "manifest.json"
SIGNATURE_MEMBER = "signature"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class PackageLimits:
    """Upper bounds a reader enforces before trusting sizes inside an archive."""

    max_member_bytes: int = 4 << 30
    max_total_bytes: int = 8 << 30
    max_manifest_bytes: int = 8 << 20
    max_members: int = 10_000
    max_compression_ratio: float = 200.0


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | Iterator[bytes]) -> None:
    """Write ``path`` as temp file + fsync + rename, so a crash leaves the old file or the new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if isinstance(data, bytes):
                fh.write(data)
            else:
                for chunk in data:
                    fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).replace(path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class PackageWriter:
    """Collect files, fill in the manifest's hashes and sizes, sign, write the zip atomically."""

    def __init__(self, manifest: Manifest) -> None:
        self._manifest = manifest
        self._files: dict[str, Path | bytes] = {}

    def add_file(self, name: str, content: Path | bytes) -> None:
        if not is_safe_member_name(name) or name in (MANIFEST_MEMBER, SIGNATURE_MEMBER):
            raise PackageError(f"cannot add {name!r}: not a safe relative member name")
        if isinstance(content, Path) and content.is_dir():
            for child in sorted(content.rglob("*")):
                if child.is_file():
                    self.add_file(f"{name}/{child.relative_to(content).as_posix()}", child)
            return
        self._files[name] = content

    def _entries(self) -> dict[str, FileEntry]:
        entries = {}
        for name, content in sorted(self._files.items()):
            if isinstance(content, bytes):
                entries[name] = FileEntry(sha256=hashlib.sha256(content).hexdigest(),
                                          size=len(content))
            else:
                entries[name] = FileEntry(sha256=file_sha256(content), size=content.stat().st_size)
        return entries

    def finalize_manifest(self) -> Manifest:
        """The manifest with ``files`` and every artifact's ``size_bytes`` filled in, validated."""
        entries = self._entries()
        draft = self._manifest.model_copy(update={"files": entries})
        artifacts = [
            a.model_copy(update={"size_bytes": sum(entries[f].size
                                                   for f in draft.artifact_files(a))})
            for a in draft.artifacts
        ]
        data = draft.model_copy(update={"artifacts": artifacts}).model_dump(by_alias=True)
        return parse_manifest(data, where=f"manifest of {self._manifest.name}")

    def write(self, out: Path, signing_keys: Ed25519PrivateKey | list[Ed25519PrivateKey]) -> Manifest:
        manifest = self.finalize_manifest()
        manifest_bytes = manifest.canonical_bytes()
        signature = sign_manifest(manifest_bytes, signing_keys)
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        try:
            with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w") as zf:
                _put(zf, MANIFEST_MEMBER, manifest_bytes)
                _put(zf, SIGNATURE_MEMBER, signature.to_bytes())
                for name, content in sorted(self._files.items()):
                    if isinstance(content, bytes):
                        _put(zf, name, content)
                    else:
                        zf.write(content, _zipinfo(name).filename,
                                 compress_type=_compression_for(name))
                zf.close()
                raw.flush()
                os.fsync(raw.fileno())
            Path(tmp).replace(out)
            _fsync_dir(out.parent)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return manifest


def _compression_for(name: str) -> int:
    # Weights barely compress; JSON and samples do.
    return zipfile.ZIP_DEFLATED if name.endswith((".json", ".md", ".npz", ".txt")) \
        else zipfile.ZIP_STORED


def _zipinfo(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
    info.compress_type = _compression_for(name)
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    return info


def _put(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    zf.writestr(_zipinfo(name), data)


class Package:
    """An opened package. Use :func:`open_package`; close it (or use ``with``) when done.

    ``manifest`` is parsed and, when the package was opened with a trust store, signature-checked.
    Every read (``read_bytes``, ``extract``) verifies size and sha256 against the manifest.
    """

    def __init__(self, path: Path, zf: zipfile.ZipFile, manifest: Manifest,
                 signed_by: str | None, limits: PackageLimits, manifest_bytes: bytes = b"",
                 signature_bytes: bytes | None = None) -> None:
        self.path = path
        self.manifest = manifest
        #: the manifest exactly as signed, and the signature document (for re-verification
        #: elsewhere, e.g. a fleet serving them to devices that check them with their own keys)
        self.manifest_bytes = manifest_bytes
        self.signature_bytes = signature_bytes
        self.signed_by = signed_by
        self._zf = zf
        self._limits = limits

    def __enter__(self) -> Package:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._zf.close()

    @property
    def verified(self) -> bool:
        return self.signed_by is not None

    def _stream(self, name: str) -> Iterator[bytes]:
        """Yield a member's bytes, enforcing declared size and checking sha256 at the end."""
        entry = self.manifest.files.get(name)
        if entry is None:
            raise PackageError(f"{name!r} is not a file of package {self.manifest.name}")
        digest = hashlib.sha256()
        seen = 0
        try:
            with self._zf.open(name) as fh:
                while chunk := fh.read(_CHUNK):
                    seen += len(chunk)
                    if seen > entry.size:
                        raise OversizeMemberError(
                            f"{name}: decompresses to more than the {entry.size} bytes the "
                            "manifest declares (zip bomb or tampered member)"
                        )
                    digest.update(chunk)
                    yield chunk
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise TamperedFileError(f"{name}: member data is corrupt ({exc}); "
                                    "the package was altered or damaged in transfer") from None
        if seen != entry.size or digest.hexdigest() != entry.sha256:
            raise TamperedFileError(
                f"{name}: content does not match the manifest (size {seen} vs {entry.size}, "
                f"sha256 {digest.hexdigest()[:16]}… vs {entry.sha256[:16]}…); "
                "the file was altered after signing"
            )

    def read_bytes(self, name: str) -> bytes:
        return b"".join(self._stream(name))

    def open_member(self, name: str) -> IO[bytes]:
        """A verified in-memory copy of a member (for small files such as samples)."""
        return io.BytesIO(self.read_bytes(name))

    def verify_all(self) -> None:
        for name in self.manifest.files:
            for _ in self._stream(name):
                pass

    def extract(self, names: list[str], dest: Path) -> list[Path]:
        """Extract members under ``dest``; each appears only after its hash checked out."""
        dest = Path(dest).resolve()
        written = []
        for name in names:
            target = (dest / name).resolve()
            if not target.is_relative_to(dest):
                raise UnsafeMemberError(f"{name!r} would be written outside {dest}")
            atomic_write(target, self._stream(name))
            written.append(target)
        return written

    def extract_artifact(self, artifact_id: str, dest: Path) -> Path:
        """Extract one artifact's file(s); return the path of the artifact (file or directory)."""
        artifact = self.manifest.artifact(artifact_id)
        self.extract(self.manifest.artifact_files(artifact), dest)
        return Path(dest).resolve() / artifact.path

    def check_release(self, installed_release: int | None) -> None:
        if installed_release is not None and self.manifest.release < installed_release:
            raise RollbackError(
                f"{self.manifest.name} {self.manifest.version} has release "
                f"{self.manifest.release}, older than the installed release {installed_release}; "
                "refusing a downgrade (rollback attack protection)"
            )


def _check_names(infos: list[zipfile.ZipInfo], limits: PackageLimits) -> dict[str, zipfile.ZipInfo]:
    if len(infos) > limits.max_members:
        raise OversizeMemberError(f"package has {len(infos)} members, more than the limit "
                                  f"of {limits.max_members}")
    by_name: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename
        if not is_safe_member_name(name):
            raise UnsafeMemberError(
                f"member {name!r} is not a safe relative path (absolute, '..', backslash or "
                "drive letter); refusing the package"
            )
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise UnsafeMemberError(f"member {name!r} is a symbolic link; packages hold files only")
        if name in by_name:
            raise UnsafeMemberError(f"member {name!r} appears twice in the archive")
        by_name[name] = info
    return by_name


def _check_sizes(by_name: Mapping[str, zipfile.ZipInfo], manifest: Manifest,
                 limits: PackageLimits) -> None:
    listed = set(manifest.files)
    present = set(by_name) - {MANIFEST_MEMBER, SIGNATURE_MEMBER}
    if present - listed:
        extra = sorted(present - listed)[:5]
        raise UnsafeMemberError(f"members not listed in the manifest: {extra}")
    if listed - present:
        missing = sorted(listed - present)[:5]
        raise CorruptPackageError(f"manifest lists files the archive lacks: {missing}")
    total = 0
    for name, entry in manifest.files.items():
        info = by_name[name]
        if entry.size > limits.max_member_bytes or info.file_size > limits.max_member_bytes:
            raise OversizeMemberError(
                f"{name}: {max(entry.size, info.file_size)} bytes, over the configured limit of "
                f"{limits.max_member_bytes} bytes per member"
            )
        if info.file_size != entry.size:
            raise OversizeMemberError(
                f"{name}: archive says {info.file_size} bytes, manifest declares {entry.size}; "
                "refusing a member larger or smaller than declared"
            )
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > (1 << 20) and ratio > limits.max_compression_ratio:
            raise OversizeMemberError(f"{name}: compression ratio {ratio:.0f}:1 exceeds "
                                      f"{limits.max_compression_ratio:.0f}:1 (zip bomb?)")
        total += entry.size
    if total > limits.max_total_bytes:
        raise OversizeMemberError(f"package unpacks to {total} bytes, over the limit of "
                                  f"{limits.max_total_bytes}")


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except FileNotFoundError:
        raise PackageError(f"{path}: no such package file") from None
    except IsADirectoryError:
        raise PackageError(f"{path}: is a directory, expected a .edgepkg file") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as exc:
        with Path(path).open("rb") as fh:
            head = fh.read(4)
        if head == b"PK\x03\x04":
            raise CorruptPackageError(f"{path}: truncated or damaged zip archive ({exc}); "
                                      "download it again") from None
        raise CorruptPackageError(f"{path}: not a model package (not a zip archive)") from None


def _read_small(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    if info.file_size > limit:
        raise OversizeMemberError(f"{info.filename}: {info.file_size} bytes, over the limit "
                                  f"of {limit}")
    try:
        with zf.open(info) as fh:
            data = fh.read(limit + 1)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        if info.filename == MANIFEST_MEMBER:
            raise TamperedManifestError(f"manifest.json is corrupt in the archive ({exc})") from None
        raise CorruptPackageError(f"{info.filename}: corrupt member ({exc})") from None
    if len(data) > limit:
        raise OversizeMemberError(f"{info.filename}: larger than the limit of {limit} bytes")
    return data


def open_package(path: Path | str, trust: TrustStore | None = None,
                 limits: PackageLimits | None = None, verify_files: bool = False) -> Package:
    """Open a package. With ``trust``, the signature must verify against a pinned key.

    Without ``trust`` the manifest is parsed but unverified (``Package.verified`` is False): fine
    for ``package inspect``, never for installing. ``verify_files`` hashes every file up front.
    """
    path = Path(path)
    limits = limits or PackageLimits()
    zf = _open_zip(path)
    try:
        by_name = _check_names(zf.infolist(), limits)
        if MANIFEST_MEMBER not in by_name:
            raise CorruptPackageError(f"{path}: no manifest.json; not an edgeserve package")
        manifest_bytes = _read_small(zf, by_name[MANIFEST_MEMBER], limits.max_manifest_bytes)
        sig_info = by_name.get(SIGNATURE_MEMBER)
        signature = _read_small(zf, sig_info, 65536) if sig_info else None
        signed_by = trust.verify(manifest_bytes, signature) if trust is not None else None
        manifest = parse_manifest(manifest_bytes, where=f"{path.name}: manifest.json")
        _check_sizes(by_name, manifest, limits)
        package = Package(path, zf, manifest, signed_by, limits, manifest_bytes, signature)
        if verify_files:
            package.verify_all()
        return package
    except SchemaError as exc:
        zf.close()
        raise CorruptPackageError(f"invalid manifest: {exc}") from None
    except BaseException:
        zf.close()
        raise


def package_summary(pkg: Package) -> dict[str, Any]:
    """A JSON-friendly summary used by ``edgeserve package inspect``."""
    m = pkg.manifest
    return {
        "name": m.name,
        "version": m.version,
        "release": m.release,
        "task": m.task,
        "created": m.created.isoformat(),
        "signed_by": pkg.signed_by,
        "verified": pkg.verified,
        "inputs": [t.model_dump(exclude_defaults=True) for t in m.inputs],
        "outputs": [t.model_dump(exclude_defaults=True) for t in m.outputs],
        "artifacts": [
            {
                "id": a.id, "format": a.format, "precision": a.precision,
                "quantization": a.quantization, "size_bytes": a.size_bytes,
                "profiles": a.profiles, "status": a.validation.get("status"),
            }
            for a in m.artifacts
        ],
        "files": len(m.files),
    }
