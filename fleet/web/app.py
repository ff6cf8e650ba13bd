"""The fleet's HTTP application: artifacts for devices, JSON API, dashboard, Prometheus metrics.

Authentication, when configured, guards everything people and tools use (``/``, ``/static``,
``/api``, ``/metrics``); the artifact endpoint stays open by default because what it serves is
signed and every device verifies it (pass ``protect_artifacts`` to guard it too). State-changing
API calls must also be JSON (:class:`~.admin.JsonWritesOnly`).
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Protocol

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from edgeserve.errors import AuthError
from edgeserve.mqtt import BrokerSettings

from ..artifact_tokens import ArtifactTokens
from ..artifacts import ArtifactStore
from ..store import Store
from .admin import JsonWritesOnly, admin_routes
from .api import ExperimentsProvider, api_routes
from .artifacts import artifact_routes
from .metrics import StatsProvider, render_metrics
from .origin import SameOrigin

__all__ = ["Authenticator", "create_app", "static_dir"]


class Authenticator(Protocol):
    def check(self, authorization: str | None) -> str: ...

    def challenge(self) -> str: ...


def static_dir() -> Path:
    return Path(str(resources.files("edgeserve.fleet.web") / "static"))


class _AuthMiddleware(BaseHTTPMiddleware):
    def __init__(self, app: object, authenticator: Authenticator, protect_artifacts: bool,
                 tokens: ArtifactTokens | None = None) -> None:
        super().__init__(app)  # type: ignore[arg-type]
        self.authenticator = authenticator
        self.protect_artifacts = protect_artifacts
        self.tokens = tokens

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        path = request.url.path
        if path == "/healthz" or (path.startswith("/v1/packages") and not self.protect_artifacts):
            return await call_next(request)
        if self._device_token_opens(path, request.headers.get("authorization")):
            return await call_next(request)
        try:
            self.authenticator.check(request.headers.get("authorization"))
        except AuthError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.http_status,
                                headers={"WWW-Authenticate": self.authenticator.challenge()})
        return await call_next(request)


    def _device_token_opens(self, path: str, authorization: str | None) -> bool:
        """A device's download token (from its signed desired state) opens the files of the
        one version it names: ``/v1/packages/NAME/VERSION/...``."""
        parts = path.split("/")
        if self.tokens is None or len(parts) < 6 or parts[1:3] != ["v1", "packages"] \
                or not authorization or not authorization.startswith("Bearer "):
            return False
        return self.tokens.check(authorization[7:].strip(), parts[3], parts[4]) is not None


def create_app(store: Store, artifacts: ArtifactStore, *,
               authenticator: Authenticator | None = None, protect_artifacts: bool = False,
               stats: StatsProvider | None = None,
               experiments: ExperimentsProvider | None = None,
               broker: BrokerSettings | None = None, fleet: str | None = None,
               allowed_hosts: Iterable[str] | None = None,
               artifact_tokens: ArtifactTokens | None = None) -> Starlette:
    """The fleet's HTTP app. ``broker`` and ``fleet`` let the API remove devices (their
    retained MQTT messages are cleared through that broker); ``allowed_hosts`` are the names it
    answers to (see :mod:`.origin`)."""
    static = static_dir()

    async def index(request: Request) -> Response:
        return FileResponse(static / "index.html", media_type="text/html")

    async def metrics(request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        text = await run_in_threadpool(render_metrics, store, stats)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    routes = [
        Route("/", index),
        Route("/healthz", health),
        Route("/metrics", metrics),
        Mount("/static", StaticFiles(directory=static), name="static"),
        *api_routes(store, experiments, artifacts.reference, artifacts),
        *admin_routes(store, artifacts, broker, fleet),
        *artifact_routes(artifacts),
    ]
    # first: a cross-site or rebound request is refused before anything else reads it
    middleware = [Middleware(SameOrigin, allowed_hosts=allowed_hosts)]
    if authenticator:
        middleware.append(Middleware(_AuthMiddleware, authenticator=authenticator,
                                     protect_artifacts=protect_artifacts,
                                     tokens=artifact_tokens))
    # after authentication: an anonymous caller learns nothing about content types
    middleware.append(Middleware(JsonWritesOnly))
    return Starlette(routes=routes, middleware=middleware)
