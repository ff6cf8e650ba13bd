"""Cross-site and DNS-rebinding protection for the fleet's HTTP side.

A browser on the operator's machine can be made to send requests to a fleet that listens on
loopback: a page on another site posting to ``127.0.0.1:8080`` (cross-site request forgery), or
a hostile name that resolves to 127.0.0.1 (DNS rebinding). Neither can choose the headers the
browser sets, so:

* every request must name this server in ``Host`` when ``allowed_hosts`` is set (``fleet serve``
  sets loopback names when it binds to loopback, so a rebound name is refused with 421);
* a state-changing request (not GET/HEAD/OPTIONS) that carries an ``Origin`` must come from the
  same host and port it is sent to (403 otherwise). Tools (curl, the CLI, scripts) send no
  Origin and are unaffected.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["LOOPBACK_HOSTS", "SameOrigin"]

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_READS = frozenset({"GET", "HEAD", "OPTIONS"})


def _host_only(value: str) -> str:
    """``[::1]:8080`` / ``localhost:8080`` / ``LOCALHOST`` -> ``::1`` / ``localhost``."""
    parsed = urlsplit(f"//{value.strip()}")
    return (parsed.hostname or "").lower()


class SameOrigin:
    """ASGI middleware (module docstring); ``allowed_hosts`` None checks no Host header."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str] | None = None) -> None:
        self.app = app
        self.allowed = frozenset(h.lower() for h in allowed_hosts) if allowed_hosts else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                status, message = refusal
                await JSONResponse({"error": message}, status_code=status)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> tuple[int, str] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if self.allowed is not None and _host_only(host) not in self.allowed:
            return 421, (f"Host {host!r} is not this fleet's name ({', '.join(sorted(self.allowed))}"
                         "); a page on another site may be trying to reach it")
        origin = headers.get("origin")
        if scope["method"] not in _READS and origin is not None:
            parsed = urlsplit(origin)
            if origin == "null" or parsed.netloc.lower() != host.lower():
                return 403, (f"{scope['method']} {scope['path']} from origin {origin!r}, not "
                             f"{host!r}: cross-site requests may not change the fleet")
        return None
