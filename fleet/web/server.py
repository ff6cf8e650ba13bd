"""Run an ASGI app with uvicorn in a background thread (fleet service, tests, the demo)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from starlette.types import ASGIApp

__all__ = ["ServerHandle", "listen_socket", "start_server"]


@dataclass
class ServerHandle:
    host: str
    port: int
    server: uvicorn.Server
    thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` for uvicorn to listen on.

    Made with proto IPPROTO_TCP by name: asyncio turns Nagle off (TCP_NODELAY) only on sockets
    whose proto says TCP, and accepted sockets inherit the listener's; with proto 0 a response
    written in two parts waited ~40 ms for the client's delayed ACK."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM,
                         socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def start_server(app: ASGIApp, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning") -> ServerHandle:
    """Start serving; ``port=0`` picks a free port. Returns once the socket is listening."""
    sock = listen_socket(host, port)
    # log_config=None: uvicorn would otherwise run logging.config.dictConfig, which closes
    # every handler the process has (a host application's, TensorFlow's absl handler and the
    # stream it writes to); its loggers propagate to whatever the process configured instead
    config = uvicorn.Config(app, log_level=log_level, lifespan="off", access_log=False,
                            log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])),
                              name=f"http-{sock.getsockname()[1]}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"HTTP server on {host}:{port} did not start")
        time.sleep(0.01)
    return ServerHandle(host, sock.getsockname()[1], server, thread)
