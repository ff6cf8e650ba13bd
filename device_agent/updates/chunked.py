"""Chunked artifact transfer over MQTT, device side: a resumable, verified download.

:class:`ChunkedDownload` is transport-free: it says which :class:`FileRequest` to send next and
accepts :class:`FileChunk` answers, appending verified bytes to ``DEST.part``. :func:`fetch_chunked`
drives it over any pair of callables (publish a request; wait for the next chunk), retrying a
request that got no answer. After a crash the part file's size is the resume offset, so only the
rest crosses the network; the whole file is checked against the signed manifest's sha256 before
it is renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from edgeserve.contract import FileChunk, FileRequest
from edgeserve.errors import ContractError, TamperedFileError, TransferError

from .download import DownloadResult

__all__ = ["ChunkedDownload", "fetch_chunked"]


class ChunkedDownload:
    """One file's transfer. ``size``/``sha256`` come from the signed manifest; for the manifest
    and signature themselves they may be None (the size is then learnt from the first chunk and
    the content is verified by the caller: a hash from desired state, or the signature check)."""

    def __init__(self, model: str, version: str, file: str, dest: Path, size: int | None,
                 sha256: str | None, chunk_bytes: int = 64 * 1024,
                 base: str | None = None) -> None:
        self.model, self.version, self.file = model, version, file
        self.base = base
        """ask for the file's delta against this sha256 (:mod:`.delta`) instead of the file"""
        self.dest = Path(dest)
        self.part = self.dest.with_name(self.dest.name + ".part")
        self.size, self.sha256 = size, sha256
        self.chunk_bytes = chunk_bytes
        self.transfer = uuid.uuid4().hex[:16]
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        if self.part.exists() and (size is None or self.part.stat().st_size > size):
            self.part.unlink()
        self.resumed_from = self.offset
        self.transferred = 0

    @property
    def offset(self) -> int:
        return self.part.stat().st_size if self.part.exists() else 0

    @property
    def complete(self) -> bool:
        return self.size is not None and self.offset >= self.size

    def request(self) -> FileRequest:
        left = self.chunk_bytes if self.size is None else max(self.size - self.offset, 1)
        return FileRequest(transfer=self.transfer, model=self.model, version=self.version,
                           file=self.file, offset=self.offset,
                           length=min(self.chunk_bytes, left), base=self.base)

    def accept(self, chunk: FileChunk) -> bool:
        """Append a chunk if it is the one expected; True when the file is complete."""
        if chunk.transfer != self.transfer or chunk.file != self.file:
            return self.complete  # an answer to someone else's (or an old) request
        if chunk.error:
            raise TransferError(f"fleet refused {self.model} {self.version} {self.file}: "
                                f"{chunk.error}")
        if chunk.offset != self.offset:
            return self.complete  # a duplicate or late answer; the next request re-asks
        if self.size is None:
            self.size = chunk.total
        if chunk.total != self.size:
            raise TamperedFileError(f"{self.file}: fleet reports {chunk.total} bytes, the signed "
                                    f"manifest {self.size}")
        data = chunk.payload()
        if self.offset + len(data) > self.size:
            raise TamperedFileError(f"{self.file}: chunk runs past the declared {self.size} bytes")
        if not data and not self.complete:
            raise TransferError(f"{self.file}: empty chunk at offset {chunk.offset}")
        with self.part.open("ab") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        self.transferred += len(data)
        return self.complete

    def finish(self) -> DownloadResult:
        assert self.size is not None
        if not self.part.exists():  # a zero-byte file
            self.part.write_bytes(b"")
        digest = hashlib.sha256()
        with self.part.open("rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
        if self.sha256 is not None and digest.hexdigest() != self.sha256:
            self.part.unlink(missing_ok=True)
            raise TamperedFileError(f"{self.file}: sha256 does not match the signed manifest; "
                                    "discarded")
        self.part.replace(self.dest)
        return DownloadResult(self.dest, self.size, self.transferred, self.resumed_from)


def fetch_chunked(download: ChunkedDownload, send: Callable[[FileRequest], object],
                  receive: Callable[[float], FileChunk | None], timeout: float = 10.0,
                  retries: int = 5) -> DownloadResult:
    """Request chunks one at a time until complete; re-ask a request that gets no answer."""
    misses = 0
    while not download.complete:
        send(download.request())
        chunk = receive(timeout)
        if chunk is None:
            misses += 1
            if misses > retries:
                raise TransferError(f"{download.file}: no answer from the fleet after "
                                    f"{retries} retries at offset {download.offset}; resumes later")
            continue
        misses = 0
        try:
            download.accept(chunk)
        except ContractError as exc:
            raise TransferError(f"{download.file}: bad chunk ({exc})") from None
    return download.finish()
