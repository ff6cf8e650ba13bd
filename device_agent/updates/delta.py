"""Obtain a new version's artifact as a delta against the one the device already holds.

The signed manifest pins every file's sha256; a delta (:mod:`edgeserve.delta`) is only a cheaper
way to get those bytes. The base is the same artifact (same id) of an earlier version of the
model in this device's cache, read back verified. The device asks the fleet for a delta against
it; the fleet answers with a delta (its own size and sha256, so a cut download resumes) or "full".
The delta is checked against its sha256, applied (base hash checked, rebuilt bytes checked against
the container's target), and the result checked against the signed manifest's sha256 before it
is written where the installer looks — which verifies it once more. Any failure on the way is a
*fallback*: the file is downloaded in full and the fallback counted; nothing unverified is kept.

Applying needs only zstandard and hashlib: no model parser runs on the device.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from edgeserve.errors import (
    CacheError,
    ContractError,
    DeltaError,
    EdgeserveError,
    PackageError,
    TamperedFileError,
    TransferError,
)
from edgeserve.manifest import FileEntry, Manifest, parse_manifest
from edgeserve.package import atomic_write

from ..agent import Agent
from .download import download_file, fetch_bytes

__all__ = ["Base", "DeltaStats", "NoDelta", "find_base", "http_delta", "mqtt_delta"]

log = logging.getLogger(__name__)
_LINK = re.compile(r"deltas/[0-9a-f]{64}-[0-9a-f]{64}")


@dataclass
class DeltaStats:
    """What one version's files cost: filled in by :func:`~.fetch.fetch_version`."""

    received: int = 0
    full_bytes: int = 0
    delta_files: int = 0
    reused_files: int = 0
    fallbacks: int = 0
    last_fallback: str | None = None


@dataclass(frozen=True)
class Base:
    """A verified file from the cache to rebuild a new file from."""

    sha256: str
    data: bytes
    version: str


class NoDelta(Exception):
    """The fleet offers the full file (the delta is not worth it, or it has no base to diff)."""


def _artifact_of(manifest: Manifest, member: str) -> tuple[str, str] | None:
    for artifact in manifest.artifacts:
        if member == artifact.path or member.startswith(artifact.path.rstrip("/") + "/"):
            return artifact.id, member[len(artifact.path):]
    return None


def find_base(agent: Agent, model: str, manifest: Manifest, member: str) -> Base | None:
    """The newest installed version's file for the same artifact (id) and relative path, read
    and verified from the cache; None when there is none (or it cannot be read). The artifact
    may be the version's own or one kept beside it (its batch-N variant)."""
    found = _artifact_of(manifest, member)
    if found is None:
        return None
    artifact_id, rest = found
    try:
        records = sorted(agent.cache.records(model), key=lambda r: r.release, reverse=True)
        for record in records:
            raw = agent.cache.read_verified(record.manifest_sha256, f"{model} {record.version}")
            old = parse_manifest(raw, where=f"{model} {record.version} manifest.json")
            artifact = next((a for a in old.artifacts if a.id == artifact_id), None)
            if artifact is None:
                continue
            sha = record.files.get(artifact.path + rest)
            if sha is not None:
                data = agent.cache.read_verified(sha, f"{model} {record.version} {member}")
                return Base(sha, data, record.version)
    except (EdgeserveError, OSError) as exc:
        log.info("%s: no delta base (%s)", member, exc)
    return None


def _finish(base: Base, delta: bytes, entry: FileEntry, dest: Path) -> None:
    """Apply, check against the signed manifest, then (only then) write ``dest``."""
    # imported when a delta arrives: `agent run` starts (and most runs end) without needing it
    from edgeserve.delta import apply_delta

    new = apply_delta(base.data, delta, expected_sha256=entry.sha256)
    if len(new) != entry.size or hashlib.sha256(new).hexdigest() != entry.sha256:
        raise DeltaError("rebuilt file does not match the signed manifest")
    atomic_write(dest, new)


def http_delta(url: str, member: str, entry: FileEntry, base: Base, dest: Path,
               headers: dict[str, str]) -> int:
    """Rebuild ``member`` at ``dest`` from a delta the fleet at ``url`` (a version's base URL)
    serves; returns the bytes that crossed the network. NoDelta when the fleet offers the full
    file; DeltaError (or TamperedFileError) when the delta is refused; a retryable
    TransferError when the download was cut (the next attempt resumes it)."""
    try:
        raw = fetch_bytes(f"{url}delta/{quote(member)}?base={base.sha256}", max_bytes=65536,
                          headers=headers)
    except TransferError as exc:
        if exc.retryable:
            raise
        raise NoDelta(f"no delta offer ({exc.message})") from None  # e.g. an older fleet: 404
    try:
        offer = json.loads(raw)
        method, reason = offer["method"], offer.get("reason", "")
        if method != "delta":
            raise NoDelta(reason or "the fleet sends the full file")
        link, size, sha = str(offer["url"]), int(offer["size"]), str(offer["sha256"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DeltaError(f"malformed delta offer ({exc})") from None
    if size > entry.size or not _LINK.fullmatch(link):
        raise DeltaError(f"delta offer {link!r} of {size} bytes is not one this agent takes")
    part = dest.with_name(dest.name + ".delta")
    try:
        result = download_file(url + link, part, size, sha, headers=headers)
    except TransferError as exc:
        if exc.retryable:
            raise  # cut: the next attempt resumes the delta
        raise DeltaError(f"delta download refused ({exc.message})") from None
    except TamperedFileError:
        raise DeltaError(f"delta {link[7:23]}… does not match the sha256 the fleet offered it "
                         "with; discarded") from None
    try:
        _finish(base, result.path.read_bytes(), entry, dest)
    finally:
        result.path.unlink(missing_ok=True)
    return len(raw) + result.bytes_transferred


def mqtt_delta(get: Callable[..., tuple[Path, int]], model: str, version: str, member: str,
               entry: FileEntry, base: Base, dest: Path) -> int:
    """As :func:`http_delta`, over MQTT chunks: ``get`` is :meth:`.fetch.MqttTransport.get`."""
    part = dest.with_name(dest.name + ".delta")
    try:
        path, moved = get(model, version, member, part, None, None, base=base.sha256)
    except TransferError as exc:
        if exc.message.startswith(f"fleet refused {model} {version} {member}: full:"):
            raise NoDelta(exc.message) from None
        raise DeltaError(f"delta transfer failed ({exc.message})") from None
    try:
        _finish(base, path.read_bytes(), entry, dest)
    finally:
        path.unlink(missing_ok=True)
    return moved


REFUSED = (DeltaError, PackageError, CacheError, ContractError)
"""What makes a delta attempt a fallback (PackageError covers a delta download whose sha256 is
not the offer's)."""
