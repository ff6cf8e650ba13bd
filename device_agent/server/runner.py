"""Start the HTTP and gRPC servers in-process (tests, ``agent serve``, ``agent run``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import importlib.util
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeserve.auth import Authenticator, is_loopback
from edgeserve.errors import ConfigError

from ..agent import Agent
from ..config import EVENT_LOOPS
from .dataplane import DataPlane, LoadGate
from .http import DEFAULT_MAX_BODY, HttpApp
from .limits import ConnectionGuard, MemoryBudget, ServerLimits, guarded_protocol, tune_allocator
from .metrics import MetricsRegistry

__all__ = ["EVENT_LOOPS", "GrpcServerHandle", "HttpServerHandle", "TlsSettings", "check_exposure",
           "check_port_free", "event_loop", "grpc_message_cap", "start_grpc_server",
           "start_http_server"]

log = logging.getLogger(__name__)


@dataclass
class HttpServerHandle:
    """A running HTTP server: ``url`` (http://host:port), ``port``, ``stop()``."""

    url: str
    port: int
    gate: LoadGate
    metrics: MetricsRegistry
    server: Any
    thread: threading.Thread | None
    preload_failures: list[str] = field(default_factory=list)
    budget: MemoryBudget | None = None
    guard: ConnectionGuard | None = None

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)
        self.gate.close()

    def __enter__(self) -> HttpServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class TlsSettings:
    """TLS for the agent's servers: its certificate and key (PEM), and optionally the CA whose
    client certificates it requires (mutual TLS)."""

    certfile: Path
    keyfile: Path
    client_ca: Path | None = None

    def __post_init__(self) -> None:
        for what in ("certfile", "keyfile", "client_ca"):
            path = getattr(self, what)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"TLS {what} {path} does not exist or is not a file; expected "
                                  "a PEM file")


def check_exposure(host: str, auth: Authenticator | None, tls: TlsSettings | None,
                   insecure: bool) -> None:
    """Refuse to serve beyond loopback without authentication (unless ``insecure``): every
    model would answer anyone who reaches the address. Without TLS, credentials travel in clear,
    which is said too."""
    if is_loopback(host) or insecure:
        return
    if auth is None:
        raise ConfigError(f"listening on {host} without --auth serves every model to anyone who "
                          "reaches this address: pass --auth (with --tls-cert/--tls-key, so the "
                          "credentials do not travel in clear), or --insecure to do it anyway")
    if tls is None:
        log.warning("listening on %s with --auth but without TLS: credentials travel in clear "
                    "(pass --tls-cert and --tls-key)", host)



@dataclass
class GrpcServerHandle:
    """A running gRPC server: ``address`` (host:port), ``port``, ``stop()``. The server runs on
    its own event loop in ``thread``."""

    address: str
    port: int
    server: Any
    metrics: MetricsRegistry
    loop: asyncio.AbstractEventLoop | None = None
    thread: threading.Thread | None = None
    gate: LoadGate | None = None

    @property
    def url(self) -> str:
        return self.address

    def stop(self, grace: float = 1.0) -> None:
        loop, thread = self.loop, self.thread
        if loop is None or thread is None or not thread.is_alive():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed in between
            done = asyncio.run_coroutine_threadsafe(self.server.stop(grace), loop)
            with contextlib.suppress(Exception):
                done.result(grace + 5)
        thread.join(grace + 5)
        if self.gate is not None:
            self.gate.close()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()

    def __enter__(self) -> GrpcServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _port_error(host: str, port: int, exc: OSError, option: str) -> ConfigError:
    """The one message for a port that cannot be had, naming the option that moves it."""
    hint = ""
    if exc.errno == errno.EADDRINUSE:
        hint = (f" - another process (another agent?) already listens there; give this one "
                f"another port with {option} (0 picks a free one)")
    return ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}")


def _bind(host: str, port: int, option: str = "--port") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP by name: asyncio's event loop turns Nagle off (TCP_NODELAY) only on sockets
    # whose proto says TCP, and accepted sockets inherit the listener's. With proto 0 every
    # answer written in two parts waited ~40 ms for the client's delayed ACK (22 requests/s on
    # one connection without uvloop, which sets TCP_NODELAY itself)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise _port_error(host, port, exc, option) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def check_port_free(host: str, port: int, option: str = "--port") -> None:
    """Raise :class:`ConfigError` (naming ``option``) when ``host:port`` cannot be listened on.

    ``agent run`` checks before it connects to the broker: a device that registered with the
    fleet and then died on a taken port would leave a ghost in the registry. (The real bind
    follows at once; a port taken in between still fails with the same message.)"""
    if port == 0:
        return
    _bind(host, port, option).close()


def _metrics_for(agent: Agent, metrics: MetricsRegistry | None) -> MetricsRegistry:
    if metrics is None:
        metrics = MetricsRegistry()
        agent.add_observer(metrics)
    return metrics


def start_http_server(agent: Agent, host: str = "127.0.0.1", port: int = 0, *,
                      auth: Authenticator | None = None, workers: int = 2, queue: int = 64,
                      max_body_bytes: int = DEFAULT_MAX_BODY,
                      metrics: MetricsRegistry | None = None, block: bool = False,
                      log_level: str = "warning",
                      on_listen: Callable[[HttpServerHandle], None] | None = None,
                      tls: TlsSettings | None = None, limits: ServerLimits | None = None,
                      budget: MemoryBudget | None = None, loop: str = "auto") -> HttpServerHandle:
    """Serve OIP v2 over HTTP, or HTTPS with ``tls`` (port 0 picks a free port).

    Runs in a background thread and returns once listening; with ``block`` it runs in the
    calling thread (handling SIGINT/SIGTERM) and returns after shutdown. ``on_listen`` is called
    with the handle once the socket is bound (before serving starts when blocking). ``limits``
    bound memory, connections and time (:mod:`.limits`); pass one ``budget`` to this and
    :func:`start_grpc_server` so both transports share it. ``loop`` is one of
    :data:`EVENT_LOOPS` (:func:`event_loop`).
    """
    import uvicorn

    loop = event_loop(loop)
    limits = limits or ServerLimits()
    budget = budget or MemoryBudget.of(limits)
    tune_allocator()
    metrics = _metrics_for(agent, metrics)
    gate = LoadGate(workers, queue, budget=budget)
    guard = None
    protocol: Any = "h11"
    if importlib.util.find_spec("httptools") is not None:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        guard = ConnectionGuard(limits)
        protocol = guarded_protocol(HttpToolsProtocol, guard)
    else:
        log.warning("httptools is not installed: HTTP connections are not capped and slow "
                    "request headers are not timed out (pip install httptools)")
    app = HttpApp(agent, gate, metrics, auth, max_body_bytes, limits, budget, guard)
    failures = DataPlane(agent).preload()
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    config = uvicorn.Config(
        app, loop=loop, http=protocol,
        lifespan="on", ws="none", log_level=log_level, access_log=False, server_header=False,
        date_header=False, timeout_keep_alive=max(1, round(limits.keep_alive_s)),
        backlog=2048, **_uvicorn_tls(tls))
    server = uvicorn.Server(config)
    display = f"[{host}]" if ":" in host else host
    scheme = "https" if tls is not None else "http"
    handle = HttpServerHandle(f"{scheme}://{display}:{bound}", bound, gate, metrics, server,
                              None, failures, budget, guard)
    if block:
        if on_listen is not None:
            on_listen(handle)
        try:
            server.run(sockets=[sock])
        finally:
            gate.close()
            sock.close()
        return handle
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="edgeserve-http", daemon=True)
    thread.start()
    handle.thread = thread
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            with contextlib.suppress(Exception):
                handle.stop(1)
            raise ConfigError(f"the HTTP server on {host}:{bound} did not start")
        time.sleep(0.01)
    if on_listen is not None:
        on_listen(handle)
    return handle


def grpc_message_cap(max_message_bytes: int, budget: MemoryBudget, workers: int) -> int:
    """The largest gRPC request message: at most ``max_message_bytes``, and small enough that
    the messages the workers hold at once (each counted twice: the received bytes and the parsed
    message) stay within a quarter of the budget."""
    return max(64 << 10, min(max_message_bytes, budget.limit // (8 * max(1, workers))))


def _uvicorn_tls(tls: TlsSettings | None) -> dict[str, Any]:
    if tls is None:
        return {}
    import ssl

    return {"ssl_certfile": str(tls.certfile), "ssl_keyfile": str(tls.keyfile),
            "ssl_ca_certs": str(tls.client_ca) if tls.client_ca else None,
            "ssl_cert_reqs": ssl.CERT_REQUIRED if tls.client_ca else ssl.CERT_NONE}


def _grpc_credentials(tls: TlsSettings) -> Any:
    import grpc

    return grpc.ssl_server_credentials(
        [(Path(tls.keyfile).read_bytes(), Path(tls.certfile).read_bytes())],
        root_certificates=Path(tls.client_ca).read_bytes() if tls.client_ca else None,
        require_client_auth=tls.client_ca is not None)


def start_grpc_server(agent: Agent, host: str = "127.0.0.1", port: int = 0, *,
                      auth: Authenticator | None = None, workers: int = 2, queue: int = 64,
                      max_message_bytes: int = DEFAULT_MAX_BODY,
                      metrics: MetricsRegistry | None = None,
                      tls: TlsSettings | None = None, limits: ServerLimits | None = None,
                      budget: MemoryBudget | None = None, loop: str = "auto") -> GrpcServerHandle:
    """Serve the OIP gRPC service, over TLS with ``tls`` (port 0 picks a free port); returns
    once listening.

    The server is a ``grpc.aio`` one, on its own event loop in a background thread (``loop``,
    as for :func:`start_http_server`); inferences go through a :class:`LoadGate` of ``workers``
    threads and ``queue`` places, like HTTP's. A gRPC message is in memory whole before the
    servicer sees it, so the budget cannot be reserved ahead of it: messages are capped at
    :func:`grpc_message_cap` (by default a quarter of the budget across the workers) and counted
    once they arrive; what decoding them takes is reserved like HTTP's. Handshakes must finish
    within the header
    timeout."""
    import grpc

    from .grpc import InferenceServicer, service_handler

    limits = limits or ServerLimits()
    budget = budget or MemoryBudget.of(limits)
    tune_allocator()
    metrics = _metrics_for(agent, metrics)
    plane = DataPlane(agent)
    plane.preload()
    workers = max(1, workers)
    message_cap = grpc_message_cap(max_message_bytes, budget, workers)
    gate = LoadGate(workers, queue, budget=budget)
    # The gate admits exactly workers + queue calls (RESOURCE_EXHAUSTED past them). gRPC's own
    # stream and call limits leave it room: a call stays open on the server for a moment after
    # its client has its answer, and a client that keeps to the limit would see its next
    # stream refused (UNAVAILABLE) in that moment. Streams not yet admitted hold at most their
    # 64 KiB flow-control window.
    streams = 2 * gate.capacity
    options = _grpc_options(message_cap, max_message_bytes, streams, limits)
    display = f"[{host}]" if ":" in host else host
    if port != 0:  # grpc only says "0" when a port is taken: bind once to get the reason
        check_port_free(host, port, "--grpc-port")
    grpc_loop = _new_loop(event_loop(loop))
    ready: concurrent.futures.Future[tuple[Any, int]] = concurrent.futures.Future()

    async def serve() -> None:
        server = grpc.aio.server(maximum_concurrent_rpcs=streams, options=options)
        servicer = InferenceServicer(plane, metrics, auth, budget, gate)
        server.add_generic_rpc_handlers((service_handler(servicer),))
        try:
            address = f"{display}:{port}"
            bound = server.add_secure_port(address, _grpc_credentials(tls)) \
                if tls is not None else server.add_insecure_port(address)
        except RuntimeError:  # newer grpcio versions raise where older ones returned 0
            bound = 0
        if bound == 0:
            await server.stop(None)
            ready.set_result((None, 0))
            return
        await server.start()
        ready.set_result((server, bound))
        await server.wait_for_termination()

    thread = threading.Thread(target=_run_loop, args=(grpc_loop, serve, ready),
                              name="edgeserve-grpc", daemon=True)
    thread.start()
    try:
        server, bound = ready.result(30)
    except concurrent.futures.TimeoutError:
        raise ConfigError(f"the gRPC server on {host}:{port} did not start") from None
    if server is None:
        thread.join(5)
        gate.close()
        raise ConfigError(f"cannot listen for gRPC on {host}:{port}; give another port with "
                          "--grpc-port (0 picks a free one)")
    return GrpcServerHandle(f"{display}:{bound}", bound, server, metrics, grpc_loop, thread, gate)


def event_loop(choice: str) -> str:
    """The event loop the servers run for ``choice`` (one of :data:`EVENT_LOOPS`).

    uvloop serves more: 7,491 against 5,802 requests/s for asyncio's loop (HTTP, small model,
    8 connections, one run here) and it is measured faster for grpc.aio too. asyncio's loop
    costs 2.6 MB less resident memory, which ``agent run`` takes by default on a device."""
    if choice not in EVENT_LOOPS:
        raise ConfigError(f"unknown event loop {choice!r}; choose one of {', '.join(EVENT_LOOPS)}")
    installed = importlib.util.find_spec("uvloop") is not None
    if choice == "uvloop" and not installed:
        raise ConfigError("the uvloop event loop was asked for, but uvloop is not installed "
                          "(pip install uvloop; not available on Windows), or use --loop asyncio")
    return "uvloop" if choice == "uvloop" or (choice == "auto" and installed) else "asyncio"


def _new_loop(name: str) -> asyncio.AbstractEventLoop:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def _grpc_options(message_cap: int, max_message_bytes: int, capacity: int,
                  limits: ServerLimits) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", message_cap),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_concurrent_streams", capacity),
            # a fixed 64 KiB window per stream: what waits for a worker stays small
            ("grpc.http2.bdp_probe", 0),
            ("grpc.server_handshake_timeout_ms", int(limits.header_timeout_s * 1000)),
            ("grpc.max_connection_idle_ms", int(max(limits.keep_alive_s, 60) * 1000)),
            ("grpc.so_reuseport", 0)]


def _run_loop(loop: asyncio.AbstractEventLoop, serve: Callable[[], Any],
              ready: concurrent.futures.Future[Any]) -> None:
    """The gRPC thread: runs ``serve()`` on ``loop`` until the server stops; a failure before
    the server is ready goes to ``ready``, the starting thread's future."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(serve())
    except BaseException as exc:  # reported to the starting thread
        if not ready.done():
            ready.set_exception(exc)
        else:
            log.exception("the gRPC server stopped")
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
