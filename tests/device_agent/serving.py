"""``edgeserve agent serve`` as the real CLI in its own process, for the tests that talk to it
from outside (tritonclient, the OIP extensions, hostile clients)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

from edgeserve._process import popen
from tests.services import free_port
from tests.support import stop_process

__all__ = ["EDGESERVE", "ServedProcess", "serve_cli"]

EDGESERVE = str(Path(sys.executable).parent / "edgeserve")


@dataclass
class ServedProcess:
    process: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    log: Path

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pid(self) -> int:
        return self.process.pid


@contextlib.contextmanager
def serve_cli(cache: Path, *args: str, preexec_fn: Callable[[], None] | None = None,
              ready_path: str = "/v2/health/ready",
              headers: dict[str, str] | None = None,
              env: dict[str, str] | None = None) -> Iterator[ServedProcess]:
    """``agent serve --cache CACHE`` on free HTTP and gRPC ports with ``args``; yields once it
    answers ``ready_path``, and stops it (SIGTERM, then SIGKILL) whatever happens. ``env`` adds
    to the environment."""
    http_port, grpc_port = free_port(), free_port()
    log = cache.parent / f"serve-{http_port}.log"
    command = [EDGESERVE, "agent", "serve", "--cache", str(cache), "--port", str(http_port),
               "--grpc-port", str(grpc_port), *args]
    with log.open("wb") as sink:
        process = popen(command, stdout=sink, stderr=subprocess.STDOUT, preexec_fn=preexec_fn,
                        env={**os.environ, "EDGESERVE_TRUSTED_KEYS": "", **(env or {})})
    try:
        _wait_ready(process, f"http://127.0.0.1:{http_port}{ready_path}", log, headers or {})
        yield ServedProcess(process, http_port, grpc_port, log)
    finally:
        stop_process(process, 10)


def _wait_ready(process: subprocess.Popen[bytes], url: str, log: Path,
                headers: dict[str, str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"agent serve exited: {log.read_text()[-2000:]}")
        with contextlib.suppress(requests.ConnectionError):
            if requests.get(url, timeout=1, headers=headers).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"agent serve did not answer {url} in 60 s: {log.read_text()[-2000:]}")
