"""The local model cache: content-addressed blobs, version records, active/previous pointers.

Layout under the cache root::

    cache.json                     {"schema": "edgeserve.cache/1"}
    lock                           flock(2) file: one writer at a time, across processes
    blobs/sha256/ab/abcd…          immutable files named by their sha256
    models/NAME/VERSION.json       one record per installed version (written last = installed)
    models/NAME/state.json         {"active", "previous", "max_release"} (replaced atomically)
    floors.json                    {NAME: release}: the rollback floor of every model ever
                                   installed, kept whatever is removed (replaced atomically)
    tmp/                           staging; anything here after a crash is garbage

Crash safety comes from ordering, not from journaling: a blob is written as temp file + fsync +
rename and only then referenced; a version record is written only after every blob it names is
in place; activation is one atomic replace of ``state.json``. A process killed at any instant
therefore leaves either the old state or the new one, plus garbage (temp files, unreferenced
blobs) that :meth:`ModelCache.check` removes. A cache damaged by hand (a blob edited or deleted,
a record made unreadable) is repaired where it can be (the broken version is dropped and the
pointers fall back) and reported; a damaged blob is never handed to a runtime because every
read goes through :meth:`ModelCache.read_verified`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeserve.errors import CacheError, ConfigError, ModelNotFoundError, TamperedFileError
from edgeserve.package import atomic_write

from ._faults import checkpoint

__all__ = ["CACHE_SCHEMA", "CacheCheck", "ModelCache", "ModelState", "VersionRecord"]

CACHE_SCHEMA = "edgeserve.cache/1"
_CHUNK = 1 << 20
# Names and versions become path components: only what manifests allow, never "." or "..".
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SAFE_VERSION = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+-]{0,127}$")


@dataclass(frozen=True)
class VersionRecord:
    """One installed version: which blobs make it up and what was verified at install time.

    ``files`` maps package member names (``artifacts/model.onnx``, ``samples/inputs.npz``…) to
    sha256 digests; ``manifest_sha256``/``signature_sha256`` name the blobs holding the exact
    signed bytes.
    """

    name: str
    version: str
    release: int
    artifact_id: str
    artifact_format: str
    manifest_sha256: str
    signature_sha256: str
    files: dict[str, str]
    size_bytes: int
    signed_by: str
    installed_at: float
    last_used: float = 0.0

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> VersionRecord:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("record is not a JSON object")
        return cls(**data)

    def blobs(self) -> set[str]:
        return {self.manifest_sha256, self.signature_sha256, *self.files.values()}


@dataclass(frozen=True)
class ModelState:
    """Which version serves (``active``), which one a rollback returns to, the release high-water."""

    active: str | None = None
    previous: str | None = None
    max_release: int = 0


@dataclass
class CacheCheck:
    """What :meth:`ModelCache.check` found and what it did about it."""

    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    removed_garbage: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems, "repaired": self.repaired,
                "removed_garbage": self.removed_garbage}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ModelCache:
    """A crash-safe cache directory. Mutations hold an exclusive file lock (see :meth:`locked`)."""

    def __init__(self, root: Path | str, budget_bytes: int | None = None) -> None:
        self.root = Path(root).expanduser()
        self.budget_bytes = budget_bytes
        try:
            for sub in ("blobs/sha256", "models", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            marker = self.root / "cache.json"
            if not marker.exists():
                atomic_write(marker, json.dumps({"schema": CACHE_SCHEMA}).encode())
        except OSError as exc:
            raise CacheError(f"cannot use {self.root} as the model cache: {exc}") from None
        self._check_schema(marker)
        self._local = threading.local()
        self.leftovers_removed = self._clean_leftovers()

    def _clean_leftovers(self) -> int:
        """Remove what interrupted installs left in ``tmp/`` (each one killed mid-way left a
        staging directory behind, 134 MB after 20 kills). Only when no other process holds the
        cache lock: an install in progress stages there under that lock."""
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return 0  # someone is installing: the next start cleans up
            try:
                return self._clean_tmp()
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            return 0
        finally:
            os.close(fd)

    def _check_schema(self, marker: Path) -> None:
        try:
            schema = json.loads(marker.read_bytes()).get("schema")
        except (OSError, ValueError, AttributeError):
            schema = None
        if schema != CACHE_SCHEMA:
            raise CacheError(f"{self.root} is not an edgeserve model cache (cache.json says "
                             f"{schema!r}, expected {CACHE_SCHEMA!r}); choose another --cache")

    # -- locking -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the cache's exclusive lock (blocks while another process or thread mutates it).

        Re-entrant within a thread, so an install can activate without deadlocking on itself.
        """
        depth = getattr(self._local, "depth", 0)
        if depth:
            self._local.depth = depth + 1
            try:
                yield
            finally:
                self._local.depth = depth
            return
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._local.depth = 1
            yield
        finally:
            self._local.depth = 0
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # -- blobs -------------------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / "sha256" / sha256[:2] / sha256

    def has_blob(self, sha256: str) -> bool:
        return self.blob_path(sha256).is_file()

    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    def put_bytes(self, data: bytes) -> str:
        """Store bytes as a blob (idempotent); return their sha256."""
        digest = hashlib.sha256(data).hexdigest()
        if not self.has_blob(digest):
            atomic_write(self.blob_path(digest), data)
            checkpoint("blob-written")
        return digest

    def put_file(self, path: Path, expected_sha256: str, expected_size: int,
                 move: bool = False) -> str:
        """Store a file as a blob after checking it against the manifest's hash and size.

        With ``move`` the file is renamed into place when it is on the same file system (the
        caller's copy is consumed); otherwise it is copied through a temp file.
        """
        size = path.stat().st_size
        actual = _sha256_file(path)
        if size != expected_size or actual != expected_sha256:
            raise TamperedFileError(
                f"{path.name}: {size} bytes with sha256 {actual[:16]}…, but the signed manifest "
                f"says {expected_size} bytes with sha256 {expected_sha256[:16]}…"
            )
        target = self.blob_path(actual)
        if target.is_file():
            return actual
        target.parent.mkdir(parents=True, exist_ok=True)
        if move:
            with contextlib.suppress(OSError):
                _fsync_file(path)
                path.replace(target)
                _fsync_dir(target.parent)
                checkpoint("blob-written")
                return actual
        with path.open("rb") as fh:
            atomic_write(target, iter(lambda: fh.read(_CHUNK), b""))
        checkpoint("blob-written")
        return actual

    def read_verified(self, sha256: str, what: str) -> bytes:
        """A blob's bytes, re-hashed: damaged or missing blobs raise, they are never served."""
        path = self.blob_path(sha256)
        try:
            data = path.read_bytes()
        except OSError:
            raise CacheError(f"{what}: blob {sha256[:16]}… is missing from the cache; run "
                             "'edgeserve agent check' and reinstall the package") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise CacheError(f"{what}: blob {sha256[:16]}… is damaged (its content no longer "
                             "matches its hash); run 'edgeserve agent check' and reinstall")
        return data

    # -- records and state -------------------------------------------------------------------------

    def _model_dir(self, name: str) -> Path:
        if not _SAFE_NAME.match(name):
            raise ModelNotFoundError(f"{name[:80]!r} is not a valid model name")
        return self.root / "models" / name

    def _record_path(self, name: str, version: str) -> Path:
        if not _SAFE_VERSION.match(version):
            raise ModelNotFoundError(f"{version[:80]!r} is not a valid version")
        return self._model_dir(name) / f"{version}.json"

    def models(self) -> list[str]:
        base = self.root / "models"
        return sorted(p.name for p in base.iterdir() if p.is_dir() and _SAFE_NAME.match(p.name))

    def records(self, name: str) -> list[VersionRecord]:
        """Readable records of a model, oldest release first (unreadable ones are skipped)."""
        directory = self._model_dir(name)
        if not directory.is_dir():
            return []
        found = []
        for path in directory.glob("*.json"):
            if path.name == "state.json":
                continue
            with contextlib.suppress(OSError, ValueError, TypeError):
                found.append(VersionRecord.from_json(path.read_bytes()))
        return sorted(found, key=lambda r: (r.release, r.installed_at))

    def record(self, name: str, version: str) -> VersionRecord:
        path = self._record_path(name, version)
        try:
            return VersionRecord.from_json(path.read_bytes())
        except FileNotFoundError:
            known = ", ".join(r.version for r in self.records(name)) or "none"
            raise ModelNotFoundError(f"model {name!r} has no installed version {version!r} "
                                     f"(installed: {known})") from None
        except (OSError, ValueError, TypeError) as exc:
            raise CacheError(f"record of {name} {version} is unreadable ({exc}); run "
                             "'edgeserve agent check'") from None

    def write_record(self, record: VersionRecord) -> None:
        missing = [s for s in record.blobs() if not self.has_blob(s)]
        if missing:
            raise CacheError(f"refusing to record {record.name} {record.version}: "
                             f"{len(missing)} blob(s) are not in the cache")
        atomic_write(self._record_path(record.name, record.version), record.to_json())
        checkpoint("record-written")

    def state(self, name: str) -> ModelState:
        path = self._model_dir(name) / "state.json"
        try:
            data = json.loads(path.read_bytes())
            return ModelState(active=data.get("active"), previous=data.get("previous"),
                              max_release=int(data.get("max_release", 0)))
        except FileNotFoundError:
            return ModelState()
        except (OSError, ValueError, TypeError, AttributeError):
            return ModelState()

    # -- rollback floors ---------------------------------------------------------------------------

    def floor(self, name: str) -> int:
        """The highest release of ``name`` this cache ever installed: anything older is refused.

        Kept in ``floors.json`` for the life of the cache, so removing a model (by hand, or
        because desired state dropped it) does not reopen the door to an older signed release,
        as TUF and Uptane keep their version counters."""
        return max(self._floors().get(name, 0), self.state(name).max_release)

    def raise_floor(self, name: str, release: int) -> None:
        """Make ``release`` the floor of ``name`` if it is higher (call under :meth:`locked`)."""
        floors = self._floors()
        if floors.get(name, 0) < release:
            floors[name] = release
            atomic_write(self.root / "floors.json", json.dumps(floors, sort_keys=True).encode())

    def _floors(self) -> dict[str, int]:
        try:
            data = json.loads((self.root / "floors.json").read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # unreadable floors must not silently become "no floor": refuse until repaired
            raise CacheError(f"{self.root / 'floors.json'} is unreadable ({exc}); it holds the "
                             "rollback protection, restore it or remove the whole cache") from None
        return {str(k): int(v) for k, v in data.items() if isinstance(v, int)} \
            if isinstance(data, dict) else {}

    def write_state(self, name: str, state: ModelState) -> None:
        data = {"active": state.active, "previous": state.previous,
                "max_release": state.max_release}
        atomic_write(self._model_dir(name) / "state.json", json.dumps(data).encode())
        checkpoint("state-written")

    def state_mtime(self, name: str) -> float:
        try:
            return (self._model_dir(name) / "state.json").stat().st_mtime
        except OSError:
            return 0.0

    # -- pointer changes ---------------------------------------------------------------------------

    def activate(self, name: str, version: str) -> ModelState:
        """Make ``version`` active; the old active one becomes previous. One atomic replace."""
        with self.locked():
            record = self.record(name, version)
            state = self.state(name)
            if state.active == version:
                return state
            new = ModelState(active=version,
                             previous=state.active if state.active else state.previous,
                             max_release=max(state.max_release, record.release))
            self.write_state(name, new)
            return new

    def rollback(self, name: str) -> ModelState:
        """Swap active and previous (a second rollback undoes the first)."""
        with self.locked():
            state = self.state(name)
            if state.previous is None:
                raise ModelNotFoundError(f"model {name!r} has no previous version to roll back "
                                         f"to (active: {state.active})")
            self.record(name, state.previous)
            new = ModelState(active=state.previous, previous=state.active,
                             max_release=state.max_release)
            self.write_state(name, new)
            return new

    def remove(self, name: str, version: str | None = None, force: bool = False) -> list[str]:
        """Remove one version (or every version) of a model; return the versions removed.

        The active version is only removed with ``force`` (or when the whole model goes).
        """
        with self.locked():
            records = self.records(name)
            if not records and not self._model_dir(name).exists():
                raise ModelNotFoundError(f"model {name!r} is not installed")
            self.raise_floor(name, max([self.state(name).max_release,
                                        *(r.release for r in records)]))
            if version is None:
                shutil.rmtree(self._model_dir(name), ignore_errors=True)
                self._gc_blobs()
                return [r.version for r in records]
            self.record(name, version)
            state = self.state(name)
            if state.active == version and not force:
                raise ConfigError(f"{name} {version} is the active version; roll back or activate "
                                  "another version first (or remove the whole model)")
            new = ModelState(active=None if state.active == version else state.active,
                             previous=None if state.previous == version else state.previous,
                             max_release=state.max_release)
            if new != state:
                self.write_state(name, new)
            self._record_path(name, version).unlink(missing_ok=True)
            self._gc_blobs()
            return [version]

    def touch(self, name: str, version: str) -> None:
        """Record that a version was used now (drives LRU eviction); best effort."""
        with contextlib.suppress(CacheError, ModelNotFoundError, OSError):
            record = self.record(name, version)
            updated = VersionRecord(**{**record.__dict__, "last_used": time.time()})
            atomic_write(self._record_path(name, version), updated.to_json())

    # -- budget ------------------------------------------------------------------------------------

    def used_bytes(self) -> int:
        total = 0
        for path in (self.root / "blobs" / "sha256").glob("*/*"):
            with contextlib.suppress(OSError):
                total += path.stat().st_size
        return total

    def evict(self, keep: Mapping[str, set[str]] | None = None) -> list[tuple[str, str]]:
        """Drop least-recently-used versions until under the byte budget.

        Active and previous versions (and any listed in ``keep``) are never evicted. Caller holds
        the lock. Returns the (model, version) pairs removed.
        """
        if self.budget_bytes is None or self.used_bytes() <= self.budget_bytes:
            return []
        keep = keep or {}
        candidates = []
        for name in self.models():
            state = self.state(name)
            protected = {state.active, state.previous, *keep.get(name, set())}
            candidates += [r for r in self.records(name) if r.version not in protected]
        candidates.sort(key=lambda r: (r.last_used or r.installed_at))
        evicted = []
        for record in candidates:
            if self.used_bytes() <= self.budget_bytes:
                break
            self._record_path(record.name, record.version).unlink(missing_ok=True)
            self._gc_blobs()
            evicted.append((record.name, record.version))
        return evicted

    # -- integrity ---------------------------------------------------------------------------------

    def _referenced(self) -> set[str]:
        refs: set[str] = set()
        for name in self.models():
            for record in self.records(name):
                refs |= record.blobs()
        return refs

    def _gc_blobs(self) -> int:
        refs = self._referenced()
        removed = 0
        for path in (self.root / "blobs" / "sha256").glob("*/*"):
            if path.name not in refs:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def _leftovers(self) -> tuple[int, int]:
        """(entries, bytes) in ``tmp/`` and stray ``.*.tmp`` files."""
        paths = [*self.tmp_dir().iterdir(), *self.root.rglob(".*.tmp")]
        size = 0
        for path in paths:
            files = path.rglob("*") if path.is_dir() else [path]
            for item in files:
                with contextlib.suppress(OSError):
                    size += item.stat().st_size if item.is_file() else 0
        return len(paths), size

    def _clean_tmp(self) -> int:
        removed = 0
        for path in self.tmp_dir().iterdir():
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            removed += 1
        for path in self.root.rglob(".*.tmp"):
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    def _check_record(self, path: Path, deep: bool) -> str | None:
        """Why the record at ``path`` cannot be served, or None when it is sound."""
        try:
            record = VersionRecord.from_json(path.read_bytes())
        except (OSError, ValueError, TypeError) as exc:
            return f"record {path.relative_to(self.root)} is unreadable ({exc})"
        if path.stem != record.version or path.parent.name != record.name:
            return f"record {path.relative_to(self.root)} names {record.name} {record.version}"
        for digest in sorted(record.blobs()):
            blob = self.blob_path(digest)
            if not blob.is_file():
                return f"{record.name} {record.version}: blob {digest[:16]}… is missing"
            if deep and _sha256_file(blob) != digest:
                return f"{record.name} {record.version}: blob {digest[:16]}… is damaged"
        return None

    def check(self, repair: bool = True, deep: bool = True) -> CacheCheck:
        """Verify every record, blob and pointer; with ``repair``, fix what can be fixed.

        Repairs: temp files and unreferenced blobs are deleted; a broken version's record is
        deleted (it is reinstalled from its package); pointers to missing versions fall back to
        the previous version or to none. ``problems`` lists what remains wrong afterwards (empty
        after a successful repair) and ``repaired`` what was fixed.
        """
        result = CacheCheck()
        with self.locked():
            if repair:
                result.removed_garbage += self._clean_tmp()
            else:
                count, size = self._leftovers()
                if count:
                    result.problems.append(f"{count} leftover temporary file(s) of interrupted "
                                           f"installs ({size} bytes); 'agent check' removes "
                                           "them")
            for name in self.models():
                self._check_model(name, repair, deep, result)
            if repair:
                result.removed_garbage += self._gc_blobs()
        return result

    def _check_model(self, name: str, repair: bool, deep: bool, result: CacheCheck) -> None:
        directory = self._model_dir(name)
        for path in sorted(directory.glob("*.json")):
            if path.name == "state.json":
                continue
            problem = self._check_record(path, deep)
            if problem is None:
                continue
            if repair:
                path.unlink(missing_ok=True)
                result.repaired.append(f"{problem}: dropped the version (reinstall it)")
            else:
                result.problems.append(problem)
        state = self.state(name)
        versions = {r.version for r in self.records(name)}
        fixed = _fallback_state(state, versions)
        if fixed != state:
            message = (f"{name}: active/previous pointed at missing versions "
                       f"({state.active}/{state.previous}); now {fixed.active}/{fixed.previous}")
            if repair:
                self.write_state(name, fixed)
                result.repaired.append(message)
            else:
                result.problems.append(message)


def _fallback_state(state: ModelState, versions: set[str]) -> ModelState:
    active = state.active if state.active in versions else None
    previous = state.previous if state.previous in versions else None
    if state.active is not None and active is None and previous is not None:
        active, previous = previous, None
    return ModelState(active=active, previous=previous, max_release=state.max_release)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
