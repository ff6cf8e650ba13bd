"""Real services for tests: Mosquitto and PostgreSQL.

A test uses the machine's service when it is reachable (127.0.0.1:1883, 127.0.0.1:5432), or starts
its own (``mosquitto`` on a free port; PostgreSQL only if reachable). Where neither works the test
skips with the reason, except under ``CI=true``, where that is a failure: CI must never pass by
skipping.

Every test gets its own MQTT topic prefix (a unique fleet name) and its own PostgreSQL schema, and
cleans them up afterwards, because the services persist between a session and its CI run.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgeserve.testing import postgres_schema

__all__ = ["MosquittoProcess", "free_port", "need", "port_open", "start_mosquitto",
           "unique_name"]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(reason: str) -> None:
    """Skip (on a user's machine) or fail (in CI) because a service is missing."""
    if IN_CI:
        pytest.fail(f"required service unavailable in CI: {reason}")
    pytest.skip(reason)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class MosquittoProcess:
    """A private mosquitto on a free port (for restarts, ACLs, persistence tests)."""

    port: int
    workdir: Path
    config: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.process = subprocess.Popen([exe, "-c", str(self.config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if port_open("127.0.0.1", self.port, 0.2):
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.process.returncode}; "
                                   f"config {self.config}")
            time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening within 10 s")

    def stop(self, kill: bool = False) -> None:
        if self.process and self.process.poll() is None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


def start_mosquitto(extra_config: str = "", persistence: bool = True) -> MosquittoProcess:
    """Start a mosquitto owned by the test (run as root it drops to the mosquitto user)."""
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        need("mosquitto is not installed")
    workdir = Path(tempfile.mkdtemp(prefix="es-mosq-"))
    workdir.chmod(0o777)
    port = free_port()
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true",
             f"persistence {'true' if persistence else 'false'}",
             f"persistence_location {workdir}/", "max_queued_messages 100000",
             "max_inflight_messages 100", "user mosquitto" if os.geteuid() == 0 else "",
             extra_config]
    config = workdir / "mosquitto.conf"
    config.write_text("\n".join(line for line in lines if line) + "\n")
    config.chmod(0o644)
    proc = MosquittoProcess(port, workdir, config)
    proc.start()
    return proc


@pytest.fixture
def mqtt_broker() -> Iterator[tuple[str, int]]:
    """The machine's Mosquitto on 127.0.0.1:1883, or a private one."""
    if port_open("127.0.0.1", 1883):
        yield ("127.0.0.1", 1883)
        return
    proc = start_mosquitto()
    try:
        yield ("127.0.0.1", proc.port)
    finally:
        proc.stop()
        shutil.rmtree(proc.workdir, ignore_errors=True)


@pytest.fixture
def private_mosquitto() -> Iterator[MosquittoProcess]:
    """A mosquitto this test owns and may restart or kill."""
    proc = start_mosquitto()
    try:
        yield proc
    finally:
        proc.stop(kill=True)
        shutil.rmtree(proc.workdir, ignore_errors=True)


@pytest.fixture
def fleet_name() -> str:
    """A fleet name (MQTT topic prefix) no other test uses."""
    return unique_name("fleet")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards."""
    url = os.environ.get("EDGESERVE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
    if not port_open("127.0.0.1", 5432):
        need("PostgreSQL is not reachable on 127.0.0.1:5432")
    try:
        import psycopg
    except ImportError:
        need("psycopg is not installed")
    try:
        with psycopg.connect(url, autocommit=True):
            pass
    except psycopg.OperationalError as exc:
        need(f"cannot connect to PostgreSQL at {url}: {exc}")
    with postgres_schema(url) as scoped:
        yield scoped
