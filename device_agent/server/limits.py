"""What the agent's servers will hold for their clients: memory, connections and time.

A device has 512 MB to 8 GB and shares it with the app around the agent, so the servers work to a
budget instead of hoping:

* :class:`MemoryBudget` - every request reserves what it will cost (its body, then what decoding
  the body takes: the text copy and Python objects of a JSON tensor, the runtime's copy of a
  binary one) before that memory is spent. A request that could never fit is refused with 413 at
  once, one that would fit later waits briefly and is then refused with 503 + Retry-After; one
  client gets at most a share of the budget, so one slow sender cannot hold all of it.
* :class:`ConnectionGuard` - HTTP connections are capped below the process's descriptor limit
  (a reserve stays for model files, the cache database, the broker and gRPC), and per client.
  A connection must finish its request headers within ``header_timeout_s`` of connecting (or of
  starting its next request); at the cap, the oldest connection still sending headers, then the
  oldest idle keep-alive one, makes room for a new one. Slow-header clients ("slowloris") thus
  time out and cannot lock real clients out.
* request bodies must keep arriving: no pause longer than ``read_timeout_s``, and on average at
  least ``min_body_rate`` bytes per second after the first ``read_timeout_s`` (408 otherwise).

:class:`ServerLimits` carries the settings (``agent serve --memory-budget``, ``--max-connections``,
``--header-timeout`` ...); docs/agent.md lists them with their defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import resource
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from edgeserve.errors import OverloadedError, TooLargeError

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "JSON_EXPANSION",
    "JSON_VALUE_COST",
    "SMALL_ANSWER",
    "SMALL_BODY",
    "TRIM_AT",
    "ConnectionGuard",
    "Hold",
    "MemoryBudget",
    "ServerLimits",
    "guarded_protocol",
    "json_decode_cost",
    "release_memory",
    "small_request_cost",
    "tune_allocator",
]

log = logging.getLogger("edgeserve.agent.limits")

DEFAULT_MEMORY_BUDGET = 64 << 20
JSON_EXPANSION = 7
"""What a JSON tensor body costs per byte, all told, for typical numbers (about 11 characters):
the body, its text copy and 56/11 for the values. Reserved before reading and trued up after."""
JSON_VALUE_COST = 56
"""Bytes one JSON number costs while it is decoded: a Python float (24) and its list slot (8),
nested lists' share, and the numpy value. Measured with tracemalloc on flat and nested FP32
tensors of 1-23 character numbers: 20-45 bytes per value beyond the text copy."""
FD_RESERVE = 128
"""Descriptors kept back from HTTP connections (model files, the cache database, MQTT, gRPC)."""
_POLL_S = 0.01
TRIM_AT = 8 << 20
"""A request that held this much hands freed heap back to the system afterwards."""
SMALL_BODY = 1 << 10
"""Requests of at most this many bytes (an HTTP body with a Content-Length and no compression,
a gRPC message) are not reserved one by one, nor are answers that cost at most
:data:`SMALL_ANSWER` to encode: each server keeps back what its gate's capacity of them can
cost (:func:`small_request_cost`) from the budget once, at start. Reserving and giving back
took ~7 % of a small model's HTTP throughput (docs/benchmarks.md)."""
SMALL_ANSWER = 4 << 10


def small_request_cost() -> int:
    """The most one small request can cost uncounted, all told: its body, and decoding a body
    of :data:`SMALL_BODY` bytes of one-digit JSON numbers (the most values it can hold), with
    an answer of :data:`SMALL_ANSWER`. A gRPC message costs less (its bytes and the parsed
    message, twice)."""
    return SMALL_BODY + json_decode_cost(b"1," * (SMALL_BODY // 2)) + SMALL_ANSWER


@dataclass(frozen=True)
class ServerLimits:
    """The limits of one agent's servers (see the module docstring)."""

    memory_budget: int = DEFAULT_MEMORY_BUDGET
    client_share: float = 0.5
    wait_s: float = 2.0
    header_timeout_s: float = 10.0
    read_timeout_s: float = 10.0
    min_body_rate: int = 32 << 10
    keep_alive_s: float = 5.0
    max_connections: int | None = None
    max_connections_per_client: int | None = None

    def connection_caps(self) -> tuple[int, int]:
        """(overall, per client): by default the descriptor limit less :data:`FD_RESERVE`, at
        most 4096, and a quarter of that per client."""
        overall = self.max_connections
        if overall is None:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            overall = 4096 if soft == resource.RLIM_INFINITY else soft - FD_RESERVE
            overall = max(16, min(4096, overall))
        per_client = self.max_connections_per_client or max(1, overall // 4)
        return overall, min(per_client, overall)

    def body_deadline_s(self, size: int) -> float:
        """How long a body of ``size`` bytes may take to arrive."""
        return self.read_timeout_s + size / max(1, self.min_body_rate)


def json_decode_cost(text: bytes | bytearray) -> int:
    """Bytes decoding this JSON text will allocate: its ``str`` copy and, for every value (each
    value but a list's last is followed by a comma), :data:`JSON_VALUE_COST`."""
    return len(text) + (text.count(b",") + 1) * JSON_VALUE_COST


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


class MemoryBudget:
    """Bytes the servers may have in use for requests at once, shared by HTTP and gRPC.

    ``limit`` bytes overall, at most ``client_share`` of them for one client; a reservation that
    does not fit waits up to ``wait_s`` for others to finish."""

    def __init__(self, limit: int = DEFAULT_MEMORY_BUDGET, client_share: float = 0.5,
                 wait_s: float = 2.0) -> None:
        self.limit = max(1, int(limit))
        self.client_limit = max(1, int(self.limit * min(1.0, max(0.01, client_share))))
        self.wait_s = wait_s
        self.in_use = 0
        self.peak = 0
        self.refused = 0
        self.aside = 0  # kept back for small requests, which are not reserved one by one
        self._clients: dict[str, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def of(cls, limits: ServerLimits) -> MemoryBudget:
        return cls(limits.memory_budget, limits.client_share, limits.wait_s)

    def hold(self, client: str = "") -> Hold:
        """A reservation for one request from ``client`` (released all at once)."""
        return Hold(self, client)

    def set_aside(self, n: int) -> None:
        """Keep ``n`` bytes back from what requests may reserve (a server's small requests,
        :data:`SMALL_BODY`), at most half of the budget; :meth:`give_back` returns them."""
        with self._lock:
            self.aside += n

    def give_back(self, n: int) -> None:
        with self._lock:
            self.aside = max(0, self.aside - n)

    def _fits(self, client: str, total: int, n: int) -> str | None:
        """Why ``n`` more bytes (``total`` with what the request holds) can never fit, or None."""
        if total > self.client_limit:
            return (f"this request needs {_mib(total)} of memory, more than the "
                    f"{_mib(self.client_limit)} one client may use (the agent's memory budget is "
                    f"{_mib(self.limit)}, --memory-budget)")
        return None

    def _try(self, client: str, n: int) -> bool:
        with self._lock:
            mine = self._clients.get(client, 0)
            if self.in_use + min(self.aside, self.limit // 2) + n > self.limit \
                    or mine + n > self.client_limit:
                return False
            self._take(client, n)
            return True

    def _take(self, client: str, n: int) -> None:
        self.in_use += n
        self.peak = max(self.peak, self.in_use)
        self._clients[client] = self._clients.get(client, 0) + n

    def _give(self, client: str, n: int) -> None:
        with self._lock:
            self.in_use -= n
            left = self._clients.get(client, 0) - n
            if left > 0:
                self._clients[client] = left
            else:
                self._clients.pop(client, None)

    def _busy(self, n: int) -> OverloadedError:
        with self._lock:
            self.refused += 1
            in_use = self.in_use
        return OverloadedError(
            f"server busy: requests hold {_mib(in_use)} of the {_mib(self.limit)} memory budget "
            f"and this one needs {_mib(n)} more; retry after 1 s", 1.0)


class Hold:
    """What one request has reserved from a :class:`MemoryBudget`."""

    def __init__(self, budget: MemoryBudget, client: str) -> None:
        self.budget = budget
        self.client = client
        self.taken = 0

    def check(self, n: int) -> None:
        """Raise :class:`TooLargeError` if ``n`` more bytes could never be had."""
        why = self.budget._fits(self.client, self.taken + n, n)
        if why is not None:
            raise TooLargeError(why)

    def room(self) -> int:
        """The most this request could still reserve (the client's share less what it holds)."""
        return max(0, self.budget.client_limit - self.taken)

    def settled(self, total: int) -> bool:
        """:meth:`settle` when it needs no waiting (it gives back, or there is room now);
        False when it would wait (nothing reserved then)."""
        if total >= self.taken:
            return self.try_take(total - self.taken)
        self.give(self.taken - total)
        return True

    async def settle(self, total: int) -> None:
        """Make the reservation ``total`` bytes: give back what the estimate had too much, or
        reserve (waiting) what it had too little."""
        if total >= self.taken:
            await self.take(total - self.taken)
        else:
            self.give(self.taken - total)

    def try_take(self, n: int) -> bool:
        """Reserve ``n`` more bytes if they fit now."""
        self.check(n)
        if n <= 0 or self.budget._try(self.client, n):
            self.taken += max(0, n)
            return True
        return False

    async def take(self, n: int, wait_s: float | None = None) -> None:
        """Reserve ``n`` more bytes, waiting (without blocking the event loop) for room."""
        deadline = time.monotonic() + (self.budget.wait_s if wait_s is None else wait_s)
        while not self.try_take(n):
            if time.monotonic() >= deadline:
                raise self.budget._busy(n)
            await asyncio.sleep(_POLL_S)

    def take_blocking(self, n: int, wait_s: float | None = None) -> None:
        """:meth:`take` for threads (the gRPC server's workers)."""
        deadline = time.monotonic() + (self.budget.wait_s if wait_s is None else wait_s)
        while not self.try_take(n):
            if time.monotonic() >= deadline:
                raise self.budget._busy(n)
            time.sleep(_POLL_S)

    def force(self, n: int) -> None:
        """Count ``n`` bytes that are already spent (a gRPC message arrives whole)."""
        if n > 0:
            with self.budget._lock:
                self.budget._take(self.client, n)
            self.taken += n

    def give(self, n: int) -> None:
        """Give back ``n`` bytes before the request ends (a compressed body once inflated)."""
        n = min(n, self.taken)
        if n > 0:
            self.taken -= n
            self.budget._give(self.client, n)

    def release(self) -> int:
        """Give everything back; returns how much that was."""
        taken, self.taken = self.taken, 0
        if taken:
            self.budget._give(self.client, taken)
        return taken

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.release() >= TRIM_AT:
            release_memory()


_libc: Any = None
_trim_lock = threading.Lock()
_trim_timer: threading.Timer | None = None
TRIM_DELAY_S = 0.2


def release_memory() -> None:
    """Hand freed heap back to the system soon after a large request (glibc's ``malloc_trim``).

    Without it, the memory of one big JSON request stays in the process (RSS stayed ~0.9 GB after
    a burst). Debounced: one trim :data:`TRIM_DELAY_S` after the last call, so a burst ends with
    one trim and no request waits for it. Elsewhere than glibc this does nothing."""
    global _trim_timer
    with _trim_lock:
        if _trim_timer is not None:
            _trim_timer.cancel()
        _trim_timer = threading.Timer(TRIM_DELAY_S, _trim)
        _trim_timer.daemon = True
        _trim_timer.start()


def _glibc() -> Any:
    """glibc, or False elsewhere (musl, macOS, Windows)."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else False
        except OSError:
            _libc = False
        _libc = _libc if _libc and hasattr(_libc, "malloc_trim") else False
    return _libc


def _trim() -> None:
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)


_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 << 10


def tune_allocator() -> None:
    """Serve every allocation of :data:`MMAP_THRESHOLD` or more from its own mapping.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
    request-sized buffers come from per-thread arenas that keep the memory: after a gRPC flood
    with 4 MiB messages, ~35 MiB stayed resident for good. With the threshold pinned, a request's
    buffers go back to the system when it ends (measured: ~1 MiB left over). No-op off glibc."""
    libc = _glibc()
    if libc and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


class ConnectionGuard:
    """Caps HTTP connections overall and per client and times out slow request headers.

    Connections are tracked by state: *waiting* (request headers not complete), *busy* (a request
    in progress) and *idle* (keep-alive between requests). At a cap the oldest waiting, then the
    oldest idle connection is closed to make room; when every connection is busy the new one is
    refused with 503."""

    def __init__(self, limits: ServerLimits) -> None:
        self.max_connections, self.per_client = limits.connection_caps()
        self.header_timeout_s = limits.header_timeout_s
        self.client_of: dict[Any, str] = {}
        self.waiting: OrderedDict[Any, None] = OrderedDict()
        self.idle: OrderedDict[Any, None] = OrderedDict()
        self.per: dict[str, tuple[OrderedDict[Any, None], OrderedDict[Any, None]]] = {}
        self.counts: dict[str, int] = {}
        self.refused = 0
        self.evicted = 0
        self.timed_out = 0

    def open(self, conn: Any, client: str) -> bool:
        """Register a new connection; False when it must be refused (everything is busy)."""
        if self.counts.get(client, 0) >= self.per_client and not self._evict(client):
            self.refused += 1
            return False
        if len(self.client_of) >= self.max_connections and not self._evict(None):
            self.refused += 1
            return False
        self.client_of[conn] = client
        self.counts[client] = self.counts.get(client, 0) + 1
        self.per.setdefault(client, (OrderedDict(), OrderedDict()))
        self.wait(conn)
        return True

    def _evict(self, client: str | None) -> bool:
        for states in ((self.waiting, self.idle) if client is None else self.per[client]):
            if states:
                victim = next(iter(states))
                self.close(victim)
                self.evicted += 1
                with contextlib.suppress(Exception):
                    victim.transport.abort()
                return True
        return False

    def _move(self, conn: Any, waiting: bool, idle: bool) -> None:
        client = self.client_of.get(conn)
        if client is None:
            return
        mine_waiting, mine_idle = self.per[client]
        for od, on in ((self.waiting, waiting), (self.idle, idle), (mine_waiting, waiting),
                       (mine_idle, idle)):
            od.pop(conn, None)
            if on:
                od[conn] = None

    def wait(self, conn: Any) -> None:
        self._move(conn, True, False)

    def busy(self, conn: Any) -> None:
        self._move(conn, False, False)

    def rest(self, conn: Any) -> None:
        self._move(conn, False, True)

    def is_waiting(self, conn: Any) -> bool:
        return conn in self.waiting

    def close(self, conn: Any) -> None:
        self._move(conn, False, False)
        client = self.client_of.pop(conn, None)
        if client is None:
            return
        left = self.counts.get(client, 1) - 1
        if left > 0:
            self.counts[client] = left
        else:
            self.counts.pop(client, None)
            self.per.pop(client, None)

    @property
    def open_connections(self) -> int:
        return len(self.client_of)


def _raw_response(status: str, message: str, *extra: str) -> bytes:
    body = ('{"error":"' + message + '"}').encode()
    head = [f"HTTP/1.1 {status}", "content-type: application/json", *extra, "connection: close",
            f"content-length: {len(body)}", "", ""]
    return "\r\n".join(head).encode() + body


_REFUSED = _raw_response("503 Service Unavailable",
                         "server busy: too many open connections; retry later", "retry-after: 1")
_TIMED_OUT = _raw_response("408 Request Timeout", "the request headers did not arrive in time")


def guarded_protocol(base: type, guard: ConnectionGuard) -> type:
    """``base`` (uvicorn's httptools protocol) with ``guard``'s caps and header deadline."""

    class Guarded(base):  # type: ignore[misc, valid-type]
        _guard_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            client = self.client[0] if self.client else ""
            if not guard.open(self, client):
                transport.write(_REFUSED)
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            guard.wait(self)
            self._disarm()
            self._guard_timer = self.loop.call_later(guard.header_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._guard_timer is not None:
                self._guard_timer.cancel()
                self._guard_timer = None

        def _too_slow(self) -> None:
            self._guard_timer = None
            if guard.is_waiting(self) and not self.transport.is_closing():
                guard.timed_out += 1
                guard.close(self)
                self.transport.write(_TIMED_OUT)
                self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if not guard.is_waiting(self):
                self._arm()  # the next request on a keep-alive connection

        def on_headers_complete(self) -> None:
            self._disarm()
            guard.busy(self)
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            pipelined = bool(self.pipeline)  # the next request starts at once: still busy
            super().on_response_complete()
            if not pipelined and not self.transport.is_closing() \
                    and not guard.is_waiting(self):
                guard.rest(self)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            guard.close(self)
            super().connection_lost(exc)

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
    return Guarded
