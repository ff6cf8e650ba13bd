"""HTTP routes serving published packages to devices, with Range requests for resumable downloads.

``GET /v1/packages``                                   index of published versions
``GET /v1/packages/{name}/{version}/manifest.json``    the signed manifest bytes
``GET /v1/packages/{name}/{version}/signature``
``GET /v1/packages/{name}/{version}/files/{member}``   one pinned file (Range: bytes=N-)
``GET /v1/packages/{name}/{version}/package.edgepkg``  the whole archive

Only files the manifest pins are served; devices verify everything themselves.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from edgeserve.errors import EdgeserveError

from ..artifacts import ArtifactStore

__all__ = ["artifact_routes", "package_base_url"]


def package_base_url(public_url: str, name: str, version: str) -> str:
    """The base URL a desired-state ``VersionRef`` points devices at."""
    return f"{public_url.rstrip('/')}/v1/packages/{name}/{version}/"


def artifact_routes(store: ArtifactStore) -> list[Route]:
    async def index(request: Request) -> Response:
        return JSONResponse(store.index())

    async def member(request: Request) -> Response:
        name = request.path_params["name"]
        version = request.path_params["version"]
        path = request.path_params["path"]
        member = path[len("files/"):] if path.startswith("files/") else path
        try:
            file = store.file_path(name, version, member)
        except EdgeserveError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.http_status)
        media = "application/json" if file.suffix == ".json" else "application/octet-stream"
        return FileResponse(file, media_type=media)

    return [
        Route("/v1/packages", index),
        Route("/v1/packages/{name}/{version}/{path:path}", member),
    ]
