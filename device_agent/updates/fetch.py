"""Fetch one model version named by desired state, verify it, and stage it in the cache.

Order matters for safety and bandwidth: the manifest is checked against the hash desired state
names, then its signature against the device's pinned keys, and only then are the (large) files
this profile needs downloaded — each resumable and checked against the manifest — and handed to
the agent, which re-verifies everything and refuses an older release than the one installed.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from edgeserve import __version__
from edgeserve.contract import FileChunk, FileRequest, VersionRef
from edgeserve.errors import TamperedManifestError, TransferError
from edgeserve.manifest import Manifest, parse_manifest
from edgeserve.package import atomic_write

from ..agent import Agent, InstalledVersion
from ..selection import required_files
from .chunked import ChunkedDownload, fetch_chunked
from .delta import REFUSED, DeltaStats, NoDelta, find_base, http_delta, mqtt_delta
from .download import download_file, fetch_bytes

__all__ = ["MqttTransport", "Progress", "check_origin", "fetch_version", "url_origin", "user_agent"]

Progress = Callable[[int, int], None]
log = logging.getLogger(__name__)


class MqttTransport:
    """Send file requests and wait for chunks; the MQTT link provides both callables."""

    def __init__(self, send: Callable[[FileRequest], object],
                 receive: Callable[[float], FileChunk | None], timeout: float = 10.0) -> None:
        self.send, self.receive, self.timeout = send, receive, timeout

    def get(self, model: str, version: str, member: str, dest: Path, size: int | None,
            sha256: str | None, base: str | None = None) -> tuple[Path, int]:
        download = ChunkedDownload(model, version, member, dest, size, sha256, base=base)
        result = fetch_chunked(download, self.send, self.receive, self.timeout)
        return result.path, result.bytes_transferred


def _check_manifest(manifest_bytes: bytes, ref: VersionRef, where: str) -> None:
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    if digest != ref.manifest_sha256:
        raise TamperedManifestError(
            f"{where}: manifest sha256 {digest[:16]}… is not the {ref.manifest_sha256[:16]}… that "
            "desired state names; refusing it"
        )


def user_agent(device_id: str | None) -> dict[str, str]:
    """The ``User-Agent`` of a device's requests: the fleet's logs (and a proxy's) can tell
    which device asked, and which agent version."""
    device = f" device/{device_id}" if device_id else ""
    return {"User-Agent": f"edgeserve-agent/{__version__}{device}"}


def url_origin(url: str) -> str:
    """``scheme://host[:port]`` of ``url``, lower-cased, default ports left out."""
    parts = urlsplit(url.strip())
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    if ":" in host:
        host = f"[{host}]"
    default = {"http": 80, "https": 443}.get(scheme)
    return f"{scheme}://{host}" + ("" if port in (None, default) else f":{port}")


def check_origin(url: str, origins: Sequence[str], where: str) -> None:
    """Refuse (for good) a download from anywhere but ``origins`` (none given: anywhere)."""
    if origins and url_origin(url) not in {url_origin(o) for o in origins}:
        raise TransferError(f"{where}: desired state names {url_origin(url)}, which is not one "
                            f"of this agent's artifact origins ({', '.join(origins)}); refused",
                            retryable=False)


def _signed_manifest(model: str, version: str, ref: VersionRef, work: Path,
                     headers: dict[str, str], mqtt: MqttTransport | None,
                     origins: Sequence[str]) -> tuple[bytes, bytes, int]:
    """The manifest and signature bytes (checked by the caller), and the bytes they took."""
    where = f"{model} {version}"
    if ref.transport == "mqtt":
        if mqtt is None:
            raise TransferError(f"{where}: desired state asks for MQTT transfer, but this agent "
                                "has no MQTT link", retryable=False)
        path, moved = mqtt.get(model, version, "manifest.json", work / "manifest.json", None,
                               ref.manifest_sha256)
        manifest_bytes = path.read_bytes()
        path, n = mqtt.get(model, version, "signature", work / "signature", None, None)
        return manifest_bytes, path.read_bytes(), moved + n
    assert ref.url is not None
    check_origin(ref.url, origins, where)
    manifest_bytes = fetch_bytes(ref.url + "manifest.json", headers=headers)
    signature = fetch_bytes(ref.url + "signature", max_bytes=65536, headers=headers)
    return manifest_bytes, signature, len(manifest_bytes) + len(signature)


def fetch_version(agent: Agent, model: str, version: str, ref: VersionRef, work_dir: Path,
                  progress: Progress | None = None, mqtt: MqttTransport | None = None,
                  device_id: str | None = None,
                  origins: Sequence[str] = (),
                  stats: DeltaStats | None = None) -> tuple[InstalledVersion, int]:
    """Download, verify and stage (not activate) ``model`` ``version``.

    Returns the installed version and the bytes that crossed the network. Partial downloads stay
    in ``work_dir`` so a later attempt resumes them. With ``origins``, HTTP downloads come only
    from those (``scheme://host[:port]``). An artifact file the cache holds an earlier version
    of is asked for as a delta (:mod:`.delta`); ``stats`` (when given) says how each file came,
    adding to what earlier attempts at the same version put there.
    """
    stats = stats if stats is not None else DeltaStats()
    headers = user_agent(device_id)
    if ref.token:  # the fleet protects its artifact endpoint: this version's download token
        headers["Authorization"] = f"Bearer {ref.token}"
    work = Path(work_dir) / model / version
    work.mkdir(parents=True, exist_ok=True)
    where = f"{model} {version}"
    manifest_bytes, signature, moved = _signed_manifest(model, version, ref, work, headers, mqtt,
                                                        origins)
    _check_manifest(manifest_bytes, ref, where)
    agent.trust.verify(manifest_bytes, signature)
    manifest = parse_manifest(manifest_bytes, where=f"{where} manifest.json")
    names = required_files(manifest, agent.profile)
    total = sum(manifest.files[n].size for n in names)
    stats.full_bytes = total
    done = 0
    files: dict[str, Path] = {}
    for name in names:
        entry = manifest.files[name]
        dest = work / "files" / name

        def report(got: int, size: int, base: int = done) -> None:
            if progress is not None:
                progress(base + got, total)

        if dest.exists() and dest.stat().st_size == entry.size:
            files[name] = dest  # completed earlier; the agent re-verifies its hash
        elif _by_delta(agent, model, version, ref, manifest, name, dest, headers, mqtt, stats):
            files[name] = dest
        elif ref.transport == "mqtt":
            assert mqtt is not None
            files[name], n = mqtt.get(model, version, name, dest, entry.size, entry.sha256)
            stats.received += n
        else:
            result = download_file(f"{ref.url}files/{name}", dest, entry.size, entry.sha256,
                                   progress=report, headers=headers)
            files[name] = result.path
            stats.received += result.bytes_transferred
        done += entry.size
        report(0, entry.size)
    installed = agent.install_parts(manifest_bytes, signature, files, activate=False, move=True)
    shutil.rmtree(work, ignore_errors=True)
    return installed, moved + stats.received


def _by_delta(agent: Agent, model: str, version: str, ref: VersionRef, manifest: Manifest,
              name: str, dest: Path, headers: dict[str, str], mqtt: MqttTransport | None,
              stats: DeltaStats) -> bool:
    """Put ``name`` at ``dest`` without downloading it whole: from the cache when an earlier
    version has the very same file, else as a delta against that version's file. False: fetch
    it in full (the fleet offers no delta, or the delta was refused: a counted fallback)."""
    entry = manifest.files[name]
    if dest.with_name(dest.name + ".part").exists():
        return False  # a full download is under way (e.g. after a refused delta): resume it
    base = find_base(agent, model, manifest, name)
    if base is None:
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    if base.sha256 == entry.sha256:
        atomic_write(dest, base.data)  # the agent re-verifies it like any download
        stats.reused_files += 1
        return True
    try:
        if ref.transport == "mqtt":
            assert mqtt is not None
            stats.received += mqtt_delta(mqtt.get, model, version, name, entry, base, dest)
        else:
            assert ref.url is not None
            stats.received += http_delta(ref.url, name, entry, base, dest, headers)
    except NoDelta as why:
        log.info("%s %s %s: full download (%s)", model, version, name, why)
        return False
    except REFUSED as exc:
        stats.fallbacks += 1
        stats.last_fallback = str(exc)
        dest.unlink(missing_ok=True)
        log.warning("%s %s %s: delta against %s refused (%s); downloading it in full", model,
                    version, name, base.version, exc)
        return False
    stats.delta_files += 1
    return True
