"""Slow and hostile clients cannot lock real ones out of the agent's HTTP API.

Once, 1,100 half-open connections sending their headers slowly (the agent at ``ulimit -n
1024``) made legitimate requests fail with ECONNRESET for at least 20 s. Here the real CLI runs
at that descriptor limit with auth on, and from five other loopback addresses 1,100 connections
trickle header lines (one address alone opens 300, past the per-client cap), while 60 more send
a body a byte at a time, reconnecting whenever the server drops them. Meanwhile a real client
from 127.0.0.1 must get every request served. Then schemathesis fuzzes the API from its own
OpenAPI document with the token, and afterwards normal requests must be served with a p99
within twice the idle one.
"""

from __future__ import annotations

import contextlib
import resource
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests

from edgeserve.device_agent import Agent
from edgeserve.device_agent.server import ServerLimits, start_http_server
from tests.device_agent.serving import ServedProcess, serve_cli

TOKEN = "slow-client-test-token-0123456789abcdef"
AUTH = {"authorization": f"Bearer {TOKEN}"}
DESCRIPTORS = 1024
ATTACK_S = 25.0
BODY = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[0.1,0.2,0.3,0.4]}]}'
SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")


def _limit_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (DESCRIPTORS, DESCRIPTORS))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           agent_assets: dict[str, Path]) -> Iterator[ServedProcess]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    if soft < want:  # this process holds the attack's 1,200 sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    cache = tmp_path_factory.mktemp("slow-clients") / "cache"
    with Agent(cache, trusted_keys=[agent_assets["public_key"]]) as agent:
        agent.install(agent_assets["pkg_v1"])
    with serve_cli(cache, "--auth", f"token:{TOKEN}", "--workers", "2",
                   preexec_fn=_limit_descriptors) as served:
        yield served


def _latencies(served: ServedProcess, count: int) -> list[float]:
    """``count`` inference requests, each on a new connection; their latencies in seconds.
    Every one must be answered 200."""
    url = f"http://127.0.0.1:{served.http_port}/v2/models/toy/infer"
    times = []
    for _ in range(count):
        started = time.perf_counter()
        response = requests.post(url, data=BODY, headers={**AUTH, "content-type":
                                                         "application/json"}, timeout=30)
        times.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
    return times


def _p99(times: list[float]) -> float:
    return float(np.percentile(times, 99))


@dataclass
class Attack:
    """Connections that trickle a request (headers, or a body) and reopen when dropped."""

    port: int
    sources: list[tuple[str, int]]
    body_trickle: bool = False
    interval_s: float = 2.0
    reopen_after_s: float = 1.0
    answers: Counter[str] = field(default_factory=Counter)
    opened: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def _open(self, source: str) -> socket.socket | None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((source, 0))
            sock.settimeout(2)
            sock.connect(("127.0.0.1", self.port))
            head = (b"POST /v2/models/toy/infer HTTP/1.1\r\nhost: agent\r\n"
                    + (b"content-type: application/json\r\ncontent-length: 4000\r\n"
                       b"authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n"
                       if self.body_trickle else b""))
            sock.sendall(head)
            sock.setblocking(False)
        except OSError:
            sock.close()
            self.answers["connect failed"] += 1
            return None
        self.opened += 1
        return sock

    def run(self, seconds: float) -> None:
        selector = selectors.DefaultSelector()
        pending: list[tuple[float, str]] = []  # (when, source) to reopen
        for source, count in self.sources:
            pending += [(0.0, source)] * count
        next_send = time.monotonic() + self.interval_s
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline and not self._stop.is_set():
                now = time.monotonic()
                due = [p for p in pending if p[0] <= now]
                pending = [p for p in pending if p[0] > now]
                for _, source in due:
                    sock = self._open(source)
                    if sock is None:
                        pending.append((now + self.reopen_after_s, source))
                    else:
                        selector.register(sock, selectors.EVENT_READ, source)
                for key, _ in selector.select(0.05):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    try:
                        data = sock.recv(4096)
                    except OSError:
                        data = b""
                    self.answers[data[:12].decode(errors="replace") or "closed"] += 1
                    selector.unregister(sock)
                    sock.close()
                    pending.append((time.monotonic() + self.reopen_after_s, key.data))
                if time.monotonic() >= next_send:
                    next_send += self.interval_s
                    line = b"x" if self.body_trickle else b"x-slow: 1\r\n"
                    for key in list(selector.get_map().values()):
                        with contextlib.suppress(OSError):
                            key.fileobj.send(line)  # type: ignore[union-attr]
        finally:
            for key in list(selector.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]
            selector.close()


def _metrics(served: ServedProcess) -> dict[str, float]:
    text = requests.get(f"http://127.0.0.1:{served.http_port}/metrics", headers=AUTH,
                        timeout=10).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith("edgeserve_http_")}


@pytest.mark.slow
def test_slow_clients_and_a_fuzzer_leave_real_clients_served(server: ServedProcess,
                                                            tmp_path: Path) -> None:
    _latencies(server, 30)  # warm up
    idle = _latencies(server, 300)
    headers = Attack(server.http_port, [(f"127.0.0.{n}", 200) for n in range(2, 6)]
                     + [("127.0.0.6", 300)])
    bodies = Attack(server.http_port, [("127.0.0.7", 60)], body_trickle=True)
    threads = [threading.Thread(target=attack.run, args=(ATTACK_S,), daemon=True)
               for attack in (headers, bodies)]
    for thread in threads:
        thread.start()
    time.sleep(3)  # the attack is at full strength: every connection open
    under_attack: list[float] = []
    while threads[0].is_alive() and len(under_attack) < 2000:
        under_attack += _latencies(server, 20)
    for thread in threads:
        thread.join(ATTACK_S + 10)
    counters = _metrics(server)
    print(f"\nidle p99 {_p99(idle) * 1e3:.1f} ms; under attack p99 "
          f"{_p99(under_attack) * 1e3:.1f} ms over {len(under_attack)} requests; "
          f"slow headers: {headers.opened} opened, answers {dict(headers.answers)}; slow bodies: "
          f"{bodies.opened} opened, answers {dict(bodies.answers)}; server {counters}")
    assert len(under_attack) >= 100
    # 1,100 slow-header connections against a cap of 896: the oldest were closed for new ones
    # (so none lived to its header deadline); slow bodies were answered 408 at theirs
    assert counters["edgeserve_http_connections_evicted_total"] >= 1100 - 896
    assert headers.answers["closed"] > 0, headers.answers
    assert bodies.answers["HTTP/1.1 408"] > 0, bodies.answers

    result = subprocess.run(
        [SCHEMATHESIS, "run", f"http://127.0.0.1:{server.http_port}/openapi.json",
         "-H", f"Authorization: Bearer {TOKEN}", "--max-examples", "10", "--seed", "11",
         "--checks", "not_a_server_error,status_code_conformance,content_type_conformance",
         "--request-timeout", "10"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stdout[-3000:]

    after = _latencies(server, 300)
    print(f"after the attack and the fuzzer: p99 {_p99(after) * 1e3:.1f} ms")
    assert _p99(after) <= 2 * _p99(idle), (
        f"p99 {_p99(after) * 1e3:.1f} ms after the attack, {_p99(idle) * 1e3:.1f} ms idle")
    assert _metrics(server)["edgeserve_http_connections_open"] <= 2


# -- each rule on its own, in process, with short limits -------------------------------------------


@contextlib.contextmanager
def _agent_server(tmp_path: Path, agent_assets: dict[str, Path],
                  limits: ServerLimits) -> Iterator[str]:
    with Agent(tmp_path / "cache", trusted_keys=[agent_assets["public_key"]]) as agent:
        agent.install(agent_assets["pkg_v1"])
        with start_http_server(agent, limits=limits) as handle:
            yield handle.url


def _connect(url: str, source: str = "127.0.0.1", first: bytes = b"") -> socket.socket:
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10, source_address=(source, 0))
    if first:
        sock.sendall(first)
    return sock


def _answer(sock: socket.socket) -> bytes:
    """What the server sends before it closes (b"" for a reset)."""
    chunks = []
    with contextlib.suppress(OSError):
        while chunk := sock.recv(4096):
            chunks.append(chunk)
    sock.close()
    return b"".join(chunks)


def _infer(url: str) -> int:
    return requests.post(f"{url}/v2/models/toy/infer", data=BODY, timeout=10).status_code


def test_headers_that_do_not_arrive_in_time_get_408(tmp_path: Path,
                                                    agent_assets: dict[str, Path]) -> None:
    """Half a request line, then silence: 408 after the header deadline, on a new connection
    and on a keep-alive one's next request alike."""
    with _agent_server(tmp_path, agent_assets, ServerLimits(header_timeout_s=1.0)) as url:
        started = time.monotonic()
        answer = _answer(_connect(url, first=b"POST /v2/models/toy/infer HTTP/1.1\r\nhost: a"))
        assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive in time" in answer
        assert 0.9 <= time.monotonic() - started < 5
        request = (b"POST /v2/models/toy/infer HTTP/1.1\r\nhost: a\r\ncontent-type: "
                   b"application/json\r\ncontent-length: " + str(len(BODY)).encode()
                   + b"\r\n\r\n" + BODY)
        sock = _connect(url, first=request + b"GET /v2/health/live HTTP/1.1\r\nho")
        answer = _answer(sock)
        assert answer.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in answer


def test_a_body_that_trickles_gets_408_and_holds_no_worker(tmp_path: Path,
                                                           agent_assets: dict[str, Path]) -> None:
    """Bodies slower than the minimum rate are cut off with 408; while they trickle, normal
    requests are served (a trickling body holds memory for its size, not a worker)."""
    limits = ServerLimits(read_timeout_s=1.0, min_body_rate=1000)
    with _agent_server(tmp_path, agent_assets, limits) as url:
        head = (b"POST /v2/models/toy/infer HTTP/1.1\r\nhost: a\r\ncontent-type: "
                b"application/json\r\ncontent-length: 4000\r\n\r\n")
        slow = [_connect(url, first=head + b"{") for _ in range(80)]  # more than workers+queue
        for _ in range(3):
            time.sleep(0.5)
            assert _infer(url) == 200
            for sock in slow:
                sock.send(b" ")
        answers = [_answer(sock) for sock in slow]
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[0]
        assert b"did not arrive in time" in answers[0]


def test_connection_caps_close_the_slow_first_and_refuse_when_all_are_busy(
        tmp_path: Path, agent_assets: dict[str, Path]) -> None:
    """At the per-client cap, that client's oldest connection still sending headers is closed
    for its new one; at the overall cap with every connection busy, a new one gets 503."""
    limits = ServerLimits(max_connections=16, max_connections_per_client=8,
                          read_timeout_s=3.0, min_body_rate=1)
    with _agent_server(tmp_path, agent_assets, limits) as url:
        partial = b"GET /v2/health/live HTTP/1.1\r\n"
        first = [_connect(url, "127.0.0.2", partial) for _ in range(8)]
        newest = _connect(url, "127.0.0.2", partial)
        assert _answer(first[0]) == b""  # closed for the newest
        newest.sendall(b"host: a\r\n\r\n")
        assert newest.recv(4096).startswith(b"HTTP/1.1 200")
        assert _infer(url) == 200  # another client is not limited by 127.0.0.2's cap
        for sock in [*first[1:], newest]:
            sock.close()
        busy_head = (b"POST /v2/models/toy/infer HTTP/1.1\r\nhost: a\r\ncontent-type: "
                     b"application/json\r\ncontent-length: 4000\r\n\r\n{")
        busy = [_connect(url, f"127.0.0.{3 + i % 4}", busy_head) for i in range(16)]
        time.sleep(0.3)
        refused = _answer(_connect(url, "127.0.0.8", b""))
        assert refused.startswith(b"HTTP/1.1 503") and b"too many open connections" in refused
        for sock in busy:
            sock.close()
        deadline = time.monotonic() + 5
        while True:  # the closed ones are gone as soon as the server sees them go
            with contextlib.suppress(requests.ConnectionError):
                if _infer(url) == 200:
                    break
            assert time.monotonic() < deadline, "the server did not recover after the caps"
            time.sleep(0.1)
