"""A TCP proxy in front of an HTTP server that cuts chosen downloads part-way, as a flaky link does.

It relays bytes both ways on 127.0.0.1 and reads each request's head on the way in, to record the
path and the ``Range`` header every request carried and count the response body bytes relayed per
path. A connection whose request matches ``cut_when`` has its response cut after that fraction of
the body (the connection closed mid-body), so the client sees a short read.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["CuttingProxy", "Seen"]


@dataclass
class Seen:
    """One request that went through the proxy."""

    path: str
    range: str | None
    user_agent: str = ""
    body_bytes: int = 0
    cut: bool = False


@dataclass
class CuttingProxy:
    upstream: tuple[str, int]
    cut_when: Callable[[Seen, int], float | None] = lambda seen, index: None
    """(request, how many earlier requests had its path) -> fraction of the body to let through
    before cutting, or None to relay it whole"""
    requests: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True, name="cutting-proxy")
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def seen(self, path_part: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.requests if path_part in s.path]

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._thread.join(5)

    def __enter__(self) -> CuttingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client, socket.create_connection(self.upstream, timeout=30) as server:
            client.settimeout(30)
            head = _read_head(client)
            if not head:
                return
            seen = _parse(head)
            with self._lock:
                index = sum(1 for s in self.requests if s.path == seen.path)
                self.requests.append(seen)
            fraction = self.cut_when(seen, index)
            server.sendall(head)
            # a request body (none for GET) is relayed as it comes
            relay = threading.Thread(target=_pump, args=(client, server), daemon=True)
            relay.start()
            self._respond(server, client, seen, fraction)

    def _respond(self, server: socket.socket, client: socket.socket, seen: Seen,
                 fraction: float | None) -> None:
        head = _read_head(server)
        client.sendall(head)
        length = _content_length(head)
        limit = None if fraction is None or length is None else int(length * fraction)
        while True:
            try:
                data = server.recv(65536)
            except OSError:
                return
            if not data:
                return
            if limit is not None and seen.body_bytes + len(data) >= limit:
                data = data[: limit - seen.body_bytes]
                with contextlib.suppress(OSError):
                    client.sendall(data)
                seen.body_bytes += len(data)
                seen.cut = True
                # the client keeps what arrived and sees the body end early (an RST instead
                # would make its kernel drop unread bytes, which says nothing about resuming)
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_RDWR)
                return
            try:
                client.sendall(data)
            except OSError:
                return
            seen.body_bytes += len(data)


def _read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = sock.recv(1)
        except OSError:
            return b""
        if not chunk:
            return b""
        data += chunk
        if len(data) > 65536:
            return b""
    return data


def _parse(head: bytes) -> Seen:
    lines = head.decode("latin-1").split("\r\n")
    path = lines[0].split(" ")[1] if len(lines[0].split(" ")) > 1 else ""
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(":") for line in lines[1:] if ":" in line)}
    return Seen(path=path, range=headers.get("range"), user_agent=headers.get("user-agent", ""))


def _content_length(head: bytes) -> int | None:
    for line in head.decode("latin-1").split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-length":
            return int(value.strip())
    return None


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
