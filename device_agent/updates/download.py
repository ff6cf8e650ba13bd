"""Resumable, verified HTTP downloads for model updates (standard library only).

A file is written to ``DEST.part`` and renamed to ``DEST`` only after its size and sha256 match
what the signed manifest pins. If the process dies or the connection drops, the next attempt
sends ``Range: bytes=N-`` and fetches only the rest; a server that ignores the range (200) makes it
start over, and a ``.part`` file larger than expected is discarded. ``bytes_transferred`` says how
much actually crossed the network, so resumption is measurable.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from edgeserve.errors import TamperedFileError, TransferError

__all__ = ["DownloadResult", "download_file", "fetch_bytes"]

_CHUNK = 256 * 1024
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    size: int
    bytes_transferred: int
    resumed_from: int


def _retryable(status: int) -> bool:
    """Server errors, timeouts and rate limits pass; other client errors (404, 403) do not."""
    return status >= 500 or status in (408, 425, 429)


def _request(url: str, headers: Mapping[str, str]) -> urllib.request.Request:
    if not url.startswith(("http://", "https://")):
        raise TransferError(f"cannot download {url!r}: only http(s) URLs are supported",
                            retryable=False)
    return urllib.request.Request(url, headers=dict(headers))


def fetch_bytes(url: str, max_bytes: int = 8 << 20, timeout: float = 30.0,
                headers: Mapping[str, str] | None = None) -> bytes:
    """GET a small document (manifest, signature) with a size limit."""
    try:
        with urllib.request.urlopen(_request(url, headers or {}), timeout=timeout) as response:
            data: bytes = response.read(max_bytes + 1)
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the response and its socket
        raise TransferError(f"GET {url}: HTTP {exc.code} {exc.reason}",
                            retryable=_retryable(exc.code)) from None
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise TransferError(f"GET {url}: {getattr(exc, 'reason', exc)}") from None
    if len(data) > max_bytes:
        raise TransferError(f"GET {url}: response larger than {max_bytes} bytes")
    return data


def _hash_existing(path: Path) -> tuple[hashlib._Hash, int]:
    digest = hashlib.sha256()
    size = 0
    if path.exists():
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    return digest, size


def download_file(url: str, dest: Path, size: int, sha256: str,
                  progress: Progress | None = None, timeout: float = 30.0,
                  headers: Mapping[str, str] | None = None) -> DownloadResult:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), verified against size and sha256."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digest, have = _hash_existing(part)
    if have > size:
        part.unlink()
        digest, have = hashlib.sha256(), 0
    resumed_from = have
    transferred = 0
    if have < size:
        request_headers = dict(headers or {})
        if have:
            request_headers["Range"] = f"bytes={have}-"
        try:
            with urllib.request.urlopen(_request(url, request_headers),
                                        timeout=timeout) as response:
                if have and response.status != 206:
                    # the server sent the whole file: start over
                    digest, have, resumed_from = hashlib.sha256(), 0, 0
                mode = "ab" if have else "wb"
                with part.open(mode) as fh:
                    while chunk := response.read(_CHUNK):
                        if have + len(chunk) > size:
                            raise TransferError(f"GET {url}: more than the {size} bytes the "
                                                "manifest declares")
                        fh.write(chunk)
                        digest.update(chunk)
                        have += len(chunk)
                        transferred += len(chunk)
                        if progress is not None:
                            progress(have, size)
                    fh.flush()
                    os.fsync(fh.fileno())
        except urllib.error.HTTPError as exc:
            exc.close()  # it holds the response and its socket
            raise TransferError(f"GET {url}: HTTP {exc.code} {exc.reason}",
                                retryable=_retryable(exc.code)) from None
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise TransferError(f"GET {url}: {getattr(exc, 'reason', exc)} after {have} of "
                                f"{size} bytes; the next attempt resumes") from None
    if have != size:
        raise TransferError(f"GET {url}: got {have} of {size} bytes; the next attempt resumes")
    if digest.hexdigest() != sha256:
        part.unlink(missing_ok=True)
        raise TamperedFileError(f"{url}: sha256 {digest.hexdigest()[:16]}… does not match the "
                                f"signed manifest's {sha256[:16]}…; discarded")
    part.replace(dest)
    return DownloadResult(dest, size, transferred, resumed_from)
