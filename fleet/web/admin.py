"""The fleet API's housekeeping routes (the CLI's ``packages``, ``unpublish``, ``device remove``
and ``events``), and the rule every state-changing API call follows.

``GET    /api/v1/packages``                      published versions and what uses each
``DELETE /api/v1/packages/{model}/{version}``    unpublish (409 while something uses it)
``DELETE /api/v1/devices/{device_id}``           remove a device (``?force=1``: even online)
``GET    /api/v1/events``                        fleet events (``?since=&model=&device=&rollout=
                                                 &gates=1&limit=``)

State-changing calls (anything but GET/HEAD/OPTIONS under ``/api/``) must send
``Content-Type: application/json`` (415 otherwise): a web page elsewhere can make a browser
send a form POST with the user's credentials, but not a JSON one without the API agreeing
first. Authentication, when configured, applies to all of ``/api/`` (:mod:`.app`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from edgeserve.errors import ConfigError, EdgeserveError
from edgeserve.mqtt import BrokerSettings

from ..artifacts import ArtifactStore
from ..store import Store

__all__ = ["JsonWritesOnly", "admin_routes"]

_READS = frozenset({"GET", "HEAD", "OPTIONS"})


class JsonWritesOnly:
    """415 for a state-changing ``/api/`` call without a JSON content type (a plain ASGI
    middleware: artifact downloads stream through it untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/api/") \
                and scope["method"] not in _READS:
            raw = dict(scope["headers"]).get(b"content-type", b"")
            kind = raw.decode("latin-1").split(";")[0].strip().lower()
            if kind != "application/json":
                response = JSONResponse(
                    {"error": f"{scope['method']} {scope['path']} needs Content-Type: "
                              f"application/json (got {kind or 'none'})"}, status_code=415)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _endpoint(fn: Callable[[Request], Any]) -> Callable[[Request], Awaitable[Response]]:
    """Run a blocking handler in the thread pool; an EdgeserveError is ``{"error": …}`` with
    its own HTTP status."""
    async def endpoint(request: Request) -> Response:
        try:
            data = await run_in_threadpool(fn, request)
        except EdgeserveError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.http_status)
        return JSONResponse(data)

    return endpoint


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "").lower() in ("1", "true", "yes")


def _number(request: Request, name: str) -> float | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"query parameter {name}={raw!r} is not a number") from None


def admin_routes(store: Store, artifacts: ArtifactStore, broker: BrokerSettings | None = None,
                 fleet: str | None = None) -> list[Route]:
    """The routes above. Without ``broker`` (and ``fleet``) a device removal is refused: its
    retained messages could not be cleared, and its status would register it again."""
    from ..device_removal import remove_device
    from ..events import fleet_events
    from ..packages import list_packages, unpublish

    def get_packages(request: Request) -> Any:
        rows = list_packages(store, artifacts, request.query_params.get("model"))
        for row in rows:
            row.pop("interface_changes", None)
        return rows

    def delete_package(request: Request) -> Any:
        removed = unpublish(store, artifacts, request.path_params["model"],
                            request.path_params["version"]).to_dict()
        removed.pop("interface_changes", None)
        return {**removed, "unpublished": True}

    def delete_device(request: Request) -> Any:
        if broker is None or fleet is None:
            raise ConfigError("this API has no broker to clear the device's retained messages; "
                              "use 'edgeserve fleet device remove'")
        return remove_device(store, broker, fleet, request.path_params["device_id"],
                             force=_flag(request, "force"))

    def get_events(request: Request) -> Any:
        q = request.query_params
        limit = _number(request, "limit")
        return fleet_events(store, since=_number(request, "since"), model=q.get("model"),
                            device=q.get("device"), rollout=q.get("rollout"),
                            gates=_flag(request, "gates"),
                            limit=max(1, int(limit)) if limit is not None else 100)

    return [
        Route("/api/v1/packages", _endpoint(get_packages), methods=["GET"]),
        Route("/api/v1/packages/{model}/{version}", _endpoint(delete_package),
              methods=["DELETE"]),
        Route("/api/v1/devices/{device_id}", _endpoint(delete_device), methods=["DELETE"]),
        Route("/api/v1/events", _endpoint(get_events), methods=["GET"]),
    ]
