"""HTTP routes serving published packages to devices, with Range requests for resumable downloads.

``GET /v1/packages``                                   index of published versions
``GET /v1/packages/{name}/{version}/manifest.json``    the signed manifest bytes
``GET /v1/packages/{name}/{version}/signature``
``GET /v1/packages/{name}/{version}/files/{member}``   one pinned file (Range: bytes=N-)
``GET /v1/packages/{name}/{version}/package.edgepkg``  the whole archive
``GET /v1/packages/{name}/{version}/delta/{member}?base=SHA256``
                                                       an offer: the delta of ``member`` against
                                                       the file the device holds, or "full"
``GET /v1/packages/{name}/{version}/deltas/{base}-{target}``
                                                       that delta (Range: bytes=N-)

Only files the manifest pins (and deltas the fleet computed between them) are served; devices
verify everything themselves. Every file and delta sent is counted (:mod:`..transfers`).
"""

from __future__ import annotations

import re
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from edgeserve.errors import EdgeserveError

from ..artifacts import ArtifactStore
from ..deltas import DeltaCache
from ..transfers import TransferLog

__all__ = ["artifact_routes", "package_base_url", "requesting_device"]

_RANGE = re.compile(r"bytes=(\d+)-")
_DEVICE = re.compile(r"\bdevice/([A-Za-z0-9][A-Za-z0-9._:-]{0,127})")


def package_base_url(public_url: str, name: str, version: str) -> str:
    """The base URL a desired-state ``VersionRef`` points devices at."""
    return f"{public_url.rstrip('/')}/v1/packages/{name}/{version}/"


def requesting_device(user_agent: str | None) -> str | None:
    """The device id an agent puts in its ``User-Agent`` (``edgeserve-agent/X device/ID``)."""
    found = _DEVICE.search(user_agent or "")
    return found.group(1) if found else None


def _sent(request: Request, size: int) -> tuple[int, bool]:
    """Bytes a response to ``request`` sends of a ``size``-byte file, and whether it starts at 0."""
    found = _RANGE.fullmatch(request.headers.get("range", "").strip())
    start = int(found.group(1)) if found else 0
    return max(0, size - start), start == 0


def artifact_routes(store: ArtifactStore, deltas: DeltaCache | None = None,
                    transfers: TransferLog | None = None) -> list[Route]:
    deltas = deltas or DeltaCache(store)
    transfers = transfers or TransferLog(store.root)

    async def index(request: Request) -> Response:
        return JSONResponse(store.index())

    def _count(request: Request, name: str, version: str, member: str, kind: str, file: Path,
               full_bytes: int) -> None:
        sent, first = _sent(request, file.stat().st_size)
        transfers.record(name, version, member, requesting_device(request.headers.get(
            "user-agent")), kind, sent, full_bytes if first else 0)

    async def member(request: Request) -> Response:
        name = request.path_params["name"]
        version = request.path_params["version"]
        path = request.path_params["path"]
        is_file = path.startswith("files/")
        member = path[len("files/"):] if is_file else path
        try:
            file = store.file_path(name, version, member)
        except EdgeserveError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.http_status)
        if is_file and request.method == "GET":
            _count(request, name, version, member, "full", file, file.stat().st_size)
        media = "application/json" if file.suffix == ".json" else "application/octet-stream"
        return FileResponse(file, media_type=media)

    async def delta_offer(request: Request) -> Response:
        name, version = request.path_params["name"], request.path_params["version"]
        member = request.path_params["member"]
        base = request.query_params.get("base", "")
        try:
            offer = await run_in_threadpool(deltas.safe_offer, name, version, member, base)
        except EdgeserveError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.http_status)
        data = offer.to_dict()
        if offer.path is not None:
            data["url"] = f"deltas/{offer.path.stem}"
        return JSONResponse(data)

    async def delta_file(request: Request) -> Response:
        name, version = request.path_params["name"], request.path_params["version"]
        base, _, target = request.path_params["pair"].partition("-")
        try:
            file = deltas.delta_path(base, target)
            manifest = store.manifest(name, version)
        except EdgeserveError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.http_status)
        member = next((m for m, e in manifest.files.items() if e.sha256 == target), None)
        if member is None:
            return JSONResponse({"error": f"{name} {version} has no file with that sha256"},
                                status_code=404)
        _count(request, name, version, member, "delta", file, manifest.files[member].size)
        return FileResponse(file, media_type="application/octet-stream")

    return [
        Route("/v1/packages", index),
        Route("/v1/packages/{name}/{version}/delta/{member:path}", delta_offer),
        Route("/v1/packages/{name}/{version}/deltas/{pair}", delta_file),
        Route("/v1/packages/{name}/{version}/{path:path}", member),
    ]
