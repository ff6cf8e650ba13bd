"""The HTTP server: a lean ASGI app speaking the Open Inference Protocol v2, run by uvicorn.

No web framework: routing is a few string splits, and inference (decode → predict → encode) runs
on the :class:`~.dataplane.LoadGate` worker pool, so the event loop only moves bytes. Every
failure becomes ``{"error": "…"}`` with the status from :mod:`edgeserve.errors`; nothing ever
answers with a traceback.

A body is read only after the request may be served: the worker queue has room, the body fits
what the model's inputs can hold, and the :class:`~.limits.MemoryBudget` has room for the body
and for what decoding it will take (a JSON tensor's text copy and Python numbers). Bodies must
keep arriving (:class:`~.limits.ServerLimits`), and the worker is taken only once the body is in.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from edgeserve.auth import Authenticator
from edgeserve.errors import (
    AuthError,
    EdgeserveError,
    InvalidInputError,
    ModelNotFoundError,
    OverloadedError,
    TooLargeError,
)

from ..agent import Agent
from .codec import decode_request, encode_response
from .dataplane import DataPlane, LoadGate
from .limits import (
    JSON_EXPANSION,
    SMALL_ANSWER,
    SMALL_BODY,
    TRIM_AT,
    ConnectionGuard,
    Hold,
    MemoryBudget,
    ServerLimits,
    json_decode_cost,
    release_memory,
)
from .metrics import MetricsRegistry
from .openapi import openapi_document

T = TypeVar("T")

__all__ = ["DEFAULT_MAX_BODY", "HttpApp", "HttpError"]

log = logging.getLogger("edgeserve.agent.http")

DEFAULT_MAX_BODY = 64 << 20
PUBLIC_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
_JSON = [(b"content-type", b"application/json")]


class HttpError(EdgeserveError):
    """An HTTP-level refusal with its own status (405, 408, 415)."""

    def __init__(self, message: str, status: int, headers: list[tuple[bytes, bytes]] | None = None
                 ) -> None:
        super().__init__(message)
        self.http_status = status
        self.headers = headers or []


@dataclass
class Response:
    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]]


def _json(status: int, data: Any) -> Response:
    return Response(status, json.dumps(data, separators=(",", ":")).encode(), list(_JSON))


def _error(exc: BaseException, auth: Authenticator | None) -> Response:
    if isinstance(exc, EdgeserveError):
        response = _json(exc.http_status, {"error": str(exc)})
        if isinstance(exc, HttpError):
            response.headers += exc.headers
        if exc.http_status == 408:  # a client too slow to finish its body loses the connection
            response.headers.append((b"connection", b"close"))
        # (other refusals keep the connection: uvicorn reads and drops the unread body, so the
        # client, still sending it, gets the answer instead of a reset)
        if isinstance(exc, OverloadedError):
            response.headers.append((b"retry-after", str(max(1, round(exc.retry_after_s))).encode()))
        if type(exc) is AuthError and auth is not None:
            response.headers.append((b"www-authenticate", auth.challenge().encode()))
        return response
    log.exception("internal error while serving a request")
    return _json(500, {"error": f"internal server error ({type(exc).__name__})"})


class HttpApp:
    """ASGI application. ``max_body_bytes`` bounds request bodies (413 past it); ``limits`` and
    ``budget`` (shared with a gRPC server) bound their memory and time."""

    def __init__(self, agent: Agent, gate: LoadGate, metrics: MetricsRegistry,
                 auth: Authenticator | None = None, max_body_bytes: int = DEFAULT_MAX_BODY,
                 limits: ServerLimits | None = None, budget: MemoryBudget | None = None,
                 guard: ConnectionGuard | None = None) -> None:
        self.plane = DataPlane(agent)
        self.gate = gate
        self.metrics = metrics
        self.auth = auth
        self.max_body = max_body_bytes
        self.limits = limits or ServerLimits()
        self.budget = budget or MemoryBudget.of(self.limits)
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            client = scope.get("client") or ("", 0)
            hold = self.budget.hold(str(client[0]))
            try:
                response = await self._handle(scope, receive, hold)
            finally:
                if hold.release() >= TRIM_AT:  # hand a big request's heap back, off the loop
                    asyncio.get_running_loop().run_in_executor(None, release_memory)
        except Exception as exc:
            response = _error(exc, self.auth)
        self.metrics.count_request("http", response.status)
        await send({"type": "http.response.start", "status": response.status,
                    "headers": [*response.headers,
                                (b"content-length", str(len(response.body)).encode())]})
        await send({"type": "http.response.body", "body": response.body})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _handle(self, scope: Scope, receive: Receive, hold: Hold) -> Response:
        path: str = scope["path"]
        method: str = scope["method"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.auth is not None and path not in PUBLIC_PATHS:
            self.auth.check(headers.get("authorization"))
        parts = [p for p in path.split("/") if p]
        if parts == ["v2", "models", "stats"]:  # statistics of every model (Triton's path)
            _allow(method, "GET")
            return _json(200, self.plane.model_statistics(self.metrics))
        if parts[:1] == ["v2"] and len(parts) >= 3 and parts[1] == "models":
            return await self._model_route(parts[2:], method, headers, receive, hold)
        if parts[:2] == ["v2", "repository"]:
            return await self._repository_route(parts[2:], method, headers, receive, hold)
        return self._simple_route(path, method)

    async def _repository_route(self, parts: list[str], method: str, headers: dict[str, str],
                                receive: Receive, hold: Hold) -> Response:
        """``POST /v2/repository/index`` (body ``{"ready": bool}`` optional, empty allowed)."""
        if parts != ["index"]:
            raise ModelNotFoundError(
                f"no such endpoint: /v2/repository/{'/'.join(parts)[:200]}; the model repository "
                "extension here is POST /v2/repository/index (models are installed with "
                "'edgeserve agent install', not loaded over the API)")
        _allow(method, "POST")
        body = await self._read_body(headers, receive, hold, _SMALL_BYTES)
        try:
            options = json.loads(body) if body.strip() else {}
        except ValueError as exc:
            raise InvalidInputError(f"repository index body is not valid JSON: {exc}") from None
        if not isinstance(options, dict) or not isinstance(options.get("ready", False), bool):
            raise InvalidInputError('repository index body must be a JSON object like '
                                    '{"ready": true} (or empty)')
        return _json(200, self.plane.repository_index(bool(options.get("ready", False))))

    def _simple_route(self, path: str, method: str) -> Response:
        routes: dict[str, Callable[[], Response]] = {
            "/v2/health/live": lambda: _json(200, {"live": self.plane.live()}),
            "/v2/health/ready": self._ready,
            "/v2": lambda: _json(200, self.plane.server_metadata()),
            "/metrics": self._metrics,
            "/openapi.json": lambda: _json(200, openapi_document(self._installed())),
        }
        handler = routes.get(path.rstrip("/") or path)
        if handler is None:
            raise ModelNotFoundError(f"no such endpoint: {path[:200]}")
        _allow(method, "GET")
        return handler()

    def _installed(self) -> dict[str, list[str]]:
        cache = self.plane.agent.cache
        return {name: [r.version for r in cache.records(name)] for name in cache.models()}

    def _ready(self) -> Response:
        ready = self.plane.ready()
        return _json(200 if ready else 503, {"ready": ready})

    def _metrics(self) -> Response:
        gauges = self.metrics.gauges
        gauges["edgeserve_requests_admitted"] = self.gate.admitted
        gauges["edgeserve_requests_rejected_total"] = self.gate.rejected
        gauges["edgeserve_requests_inline_total"] = self.gate.inline
        gauges["edgeserve_memory_budget_bytes"] = self.budget.limit
        gauges["edgeserve_memory_reserved_bytes"] = self.budget.in_use
        gauges["edgeserve_memory_reserved_peak_bytes"] = self.budget.peak
        gauges["edgeserve_memory_refused_total"] = self.budget.refused
        if self.guard is not None:
            gauges["edgeserve_http_connections_open"] = self.guard.open_connections
            gauges["edgeserve_http_connections_refused_total"] = self.guard.refused
            gauges["edgeserve_http_connections_evicted_total"] = self.guard.evicted
            gauges["edgeserve_http_header_timeouts_total"] = self.guard.timed_out
        return Response(200, self.metrics.render().encode(),
                        [(b"content-type", b"text/plain; version=0.0.4")])

    async def _model_route(self, parts: list[str], method: str, headers: dict[str, str],
                           receive: Receive, hold: Hold) -> Response:
        model, rest = parts[0], parts[1:]
        version = None
        if rest[:1] == ["versions"]:
            if len(rest) < 2:
                raise ModelNotFoundError("missing version after /versions/")
            version, rest = rest[1], rest[2:]
        if rest == []:
            _allow(method, "GET")
            return _json(200, self.plane.model_metadata(model, version))
        if rest == ["ready"]:
            _allow(method, "GET")
            return _json(200, {"name": model, "ready": self.plane.model_ready(model, version)})
        if rest == ["stats"]:
            _allow(method, "GET")
            return _json(200, self.plane.model_statistics(self.metrics, model, version))
        if rest == ["infer"]:
            _allow(method, "POST")
            return await self._infer(model, version, headers, receive, hold)
        if rest == ["feedback"] and version is None:
            _allow(method, "POST")
            body = await self._read_body(headers, receive, hold, _SMALL_BYTES)
            try:
                parsed = json.loads(body or b"null")
            except ValueError as exc:
                raise InvalidInputError(f"feedback body is not valid JSON: {exc}") from None
            return _json(200, self.plane.feedback(model, parsed))
        raise ModelNotFoundError(f"no such endpoint under model {model!r}: /{'/'.join(rest)}")

    async def _read_body(self, headers: dict[str, str], receive: Receive, hold: Hold,
                         limit: int, expansion: int = 1, floor: int = 1,
                         counted: bool = True) -> bytearray:
        """The body, at most ``limit`` bytes, reserved in ``hold`` before it is read.

        With a Content-Length, ``expansion`` times the body (what the request is expected to
        cost all told) is reserved up front, at most the client's share: a request waits or is
        refused before a byte is read, and does not reserve in pieces while others hold theirs.
        ``floor`` times the body is what it costs at least: past the client's share it is 413.
        A chunked body reserves as it arrives. The body must keep arriving. A small request
        (``counted`` False: :data:`~.limits.SMALL_BODY`) reserves nothing."""
        declared = _content_length(headers)
        if declared is not None and counted:
            if declared > limit:
                raise TooLargeError(f"request body of {declared} bytes exceeds the limit of "
                                    f"{limit} bytes{_why_limit(limit, self.max_body)}")
            hold.check(declared * floor)
            wanted = min(declared * expansion, hold.room())
            if not hold.try_take(wanted):  # (no coroutine when there is room: the usual case)
                await hold.take(wanted)
        body = bytearray()
        allowed_s = self.limits.body_deadline_s(declared or limit)
        deadline = time.monotonic() + allowed_s
        while True:
            left = deadline - time.monotonic()
            try:
                # A body that has arrived is taken without arming a timer (a small request's
                # body comes with its headers); one that is still on its way under a timeout:
                # asyncio.timeout, not wait_for, so no task per read (bench/agent.py part b)
                message, later = _now_or_later(receive())
                if later is not None:
                    async with asyncio.timeout(max(0.0, min(self.limits.read_timeout_s, left))):
                        message = await later
            except TimeoutError:
                raise HttpError(
                    f"the request body did not arrive in time: {len(body)} of "
                    f"{declared if declared is not None else 'unknown'} bytes after "
                    f"{allowed_s - left:.0f} s (a body may pause at most "
                    f"{self.limits.read_timeout_s:g} s and must average "
                    f"{self.limits.min_body_rate} bytes/s)", 408) from None
            if message["type"] == "http.disconnect":
                raise InvalidInputError("client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            if len(body) + len(chunk) > limit:
                raise TooLargeError(f"request body exceeds the limit of {limit} bytes"
                                    f"{_why_limit(limit, self.max_body)}")
            if declared is None:
                await hold.take(len(chunk) * floor)
            body += chunk
            if not message.get("more_body", False):
                return body

    async def _infer(self, model: str, version: str | None, headers: dict[str, str],
                     receive: Receive, hold: Hold) -> Response:
        header_length = headers.get("inference-header-content-length")
        if header_length is not None and not header_length.strip().isdigit():
            raise InvalidInputError("Inference-Header-Content-Length must be an integer")
        json_length = int(header_length) if header_length else None
        encoding = headers.get("content-encoding", "identity").lower() or "identity"
        if encoding not in ("identity", "gzip", "deflate"):
            raise HttpError(f"Content-Encoding {encoding!r} is not supported (gzip, deflate)",
                            415)
        self.gate.check()  # a full queue refuses before a byte of the body is read
        limit = self.plane.body_limit(model, version, self.max_body)
        declared = _content_length(headers)
        # small: kept back for by the server's set-aside (limits.SMALL_BODY), not reserved
        small = encoding == "identity" and declared is not None and declared <= min(
            SMALL_BODY, limit)
        if encoding == "identity":
            # JSON: the body, its text copy and Python numbers; binary: the body and the
            # runtime's copy of the tensors
            body = await self._read_body(headers, receive, hold, limit,
                                         JSON_EXPANSION if json_length is None else 2,
                                         2 if json_length is None else 1, counted=not small)
        else:
            body = await self._read_body(headers, receive, hold, limit)
            compressed = len(body)
            body = await asyncio.to_thread(_inflate, body, encoding, limit, hold)
            hold.give(compressed)
        if not small:
            cost = _decode_cost(body, json_length)
            if not hold.settled(cost):
                await hold.settle(cost)
        accept = headers.get("accept-encoding", "")
        self.gate.admit()
        try:
            return await self.gate.run(lambda: self._infer_sync(
                model, version, body, json_length, accept, hold, small), model, len(body))
        finally:
            self.gate.release()

    def _infer_sync(self, model: str, version: str | None, body: bytearray,
                    header_length: int | None, accept: str, hold: Hold,
                    small: bool = False) -> Response:
        request = decode_request(body, header_length)
        key = request.parameters.get("request_key")
        result = self.plane.infer(model, version, request.inputs, request.id,
                                  str(key) if key is not None else None)
        answer = _encoding_cost(result.outputs)
        if not small or answer > SMALL_ANSWER:
            hold.force(answer)
        if request.id is None and result.request_id is not None:
            request.id = result.request_id  # generated for feedback: the client needs it
        payload, json_length = encode_response(model, result.version, result.outputs, request)
        out = list(_JSON) if json_length is None else [
            (b"content-type", b"application/octet-stream"),
            (b"inference-header-content-length", str(json_length).encode())]
        if "gzip" in accept and len(payload) > 1024:
            payload = gzip.compress(payload, 1)
            out.append((b"content-encoding", b"gzip"))
        return Response(200, payload, out)


_SMALL_BYTES = 64 * 1024
"""Bodies other than inference requests: feedback (an id, a reward, a label), index options."""


def _content_length(headers: dict[str, str]) -> int | None:
    declared = headers.get("content-length")
    return int(declared) if declared is not None and declared.strip().isdigit() else None


def _decode_cost(body: bytearray, json_length: int | None) -> int:
    """What a read request costs all told: the body, and decoding it (JSON text and numbers;
    a binary request's small JSON header and the runtime's copy of its tensors)."""
    if json_length is None:
        return len(body) + json_decode_cost(body)
    head = bytes(memoryview(body)[:min(json_length, len(body))])
    return len(body) + json_decode_cost(head) + len(body) - len(head)


def _encoding_cost(outputs: Any) -> int:
    """What encoding a response may take: the arrays' bytes and, as JSON, Python numbers."""
    return sum(int(a.nbytes) + int(a.size) * 48 for a in outputs.values())


def _why_limit(limit: int, ceiling: int) -> str:
    return "" if limit >= ceiling else " (what this model's inputs can hold)"


def _allow(method: str, allowed: str) -> None:
    if method != allowed and not (allowed == "GET" and method == "HEAD"):
        raise HttpError(f"method {method} is not allowed here; use {allowed}", 405,
                        [(b"allow", allowed.encode())])


def _inflate(body: bytearray, encoding: str, limit: int, hold: Hold) -> bytearray:
    """Decompress ``body`` to at most ``limit`` bytes, reserving in ``hold`` as it grows."""
    decoder = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    out = bytearray()
    data: bytes | memoryview = memoryview(body)
    try:
        while data:
            piece = decoder.decompress(data, 1 << 20)
            data = decoder.unconsumed_tail
            if len(out) + len(piece) > limit:
                raise TooLargeError(f"decompressed body exceeds the limit of {limit} bytes")
            hold.take_blocking(len(piece))
            out += piece
            if decoder.eof:
                break
    except zlib.error as exc:
        raise InvalidInputError(f"body is not valid {encoding} data ({exc})") from None
    return out


def _now_or_later(awaitable: Awaitable[T]) -> tuple[Any, Awaitable[T] | None]:
    """``(result, None)`` when ``awaitable`` is a coroutine that finishes without suspending
    (run here, at once); else ``(None, an awaitable for its result)``."""
    if not isinstance(awaitable, Coroutine):
        return None, awaitable
    try:
        waiting = awaitable.send(None)
    except StopIteration as done:
        return done.value, None
    return None, _Resumed(awaitable, waiting)


class _Resumed(Generic[T]):
    """Awaits the rest of a coroutine that :func:`_now_or_later` started and that suspended on
    ``waiting``: what ``await coro`` would have done from there (results, exceptions and
    cancellation are passed through)."""

    __slots__ = ("coro", "waiting")

    def __init__(self, coro: Coroutine[Any, Any, T], waiting: Any) -> None:
        self.coro = coro
        self.waiting = waiting

    def __await__(self) -> Generator[Any, Any, T]:
        waiting = self.waiting
        while True:
            try:
                sent = yield waiting
            except GeneratorExit:
                self.coro.close()
                raise
            except BaseException as exc:  # cancellation, the timeout's included
                try:
                    waiting = self.coro.throw(exc)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
            else:
                try:
                    waiting = self.coro.send(sent)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
