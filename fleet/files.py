"""Chunked artifact transfer over MQTT, fleet side: answer a device's ``FileRequest``.

For devices with only an MQTT connection. The device asks for ``length`` bytes at ``offset`` of one
published file; the fleet answers with a ``FileChunk`` (base64 data + its sha256) on the device's
``files/data`` topic, or a chunk carrying ``error`` when the file is unknown. The device drives the
transfer (and its resumption); the fleet keeps no per-transfer state.
"""

from __future__ import annotations

from edgeserve.contract import FileChunk, FileRequest
from edgeserve.errors import EdgeserveError

from .artifacts import ArtifactStore

__all__ = ["MAX_CHUNK", "answer_file_request"]

MAX_CHUNK = 256 * 1024


def answer_file_request(store: ArtifactStore, request: FileRequest) -> FileChunk:
    """Read the requested range of a published file (never more than ``MAX_CHUNK`` bytes)."""
    try:
        path = store.file_path(request.model, request.version, request.file)
        total = path.stat().st_size
        with path.open("rb") as fh:
            fh.seek(min(request.offset, total))
            data = fh.read(min(request.length, MAX_CHUNK))
    except (EdgeserveError, OSError) as exc:
        empty = FileChunk.of(request.transfer, request.file, request.offset, 0, b"")
        return empty.model_copy(update={"error": str(exc)[:1000]})
    return FileChunk.of(request.transfer, request.file, request.offset, total, data)
