"""Real services for tests: Mosquitto and PostgreSQL.

A test uses the machine's service when it is reachable (127.0.0.1:1883, 127.0.0.1:5432), or starts
its own: ``mosquitto`` on a free port for that test, and one PostgreSQL cluster (``initdb`` into a
temporary directory, on a free port, as the ``postgres`` user when run as root) for the session.
Where neither works the test skips with the reason, except under ``CI=true``, where that is a
failure: CI must never pass by skipping.

Every test gets its own MQTT topic prefix (a unique fleet name) and its own PostgreSQL schema, and
cleans them up afterwards, because the services persist between a session and its CI run: the
schema is dropped, and the retained messages under the fleet's topics are deleted from the
machine's broker (``mqtt_broker``).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import pytest

from edgeserve._process import popen
from edgeserve.contract import TOPIC_ROOT
from edgeserve.testing import postgres_schema
from tests.processes import SESSION_SERVICE

__all__ = ["MosquittoProcess", "PostgresProcess", "clear_retained", "free_port", "need",
           "port_open", "postgres_at", "start_mosquitto", "start_postgres", "unique_name"]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(reason: str) -> NoReturn:
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
        try:
            self._start()
        except BaseException:  # a mosquitto that never listened is not left running
            self.stop(kill=True)
            raise

    def _start(self) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        # dies with the test run, even a SIGKILLed one (edgeserve._process)
        self.process = popen([exe, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, **_as_mosquitto_user())
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


def _as_mosquitto_user() -> dict[str, Any]:
    """Under root, start mosquitto as the ``mosquitto`` user instead of letting it drop to that
    user itself: a process that changes its user loses its parent-death signal."""
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam("mosquitto")
    except KeyError:
        return {}  # no such user: left to the config
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


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


def retained_messages(host: str, port: int, topic_filter: str,
                      timeout: float = 10.0) -> dict[str, bytes]:
    """Every retained message under ``topic_filter`` on the broker, by topic.

    The broker sends a new subscriber the retained messages before anything published after the
    subscription, so a sentinel published (not retained) once subscribed arrives after the last
    of them: no wait for "nothing more comes". QoS 0: a broker sends those to a connected
    client without queueing them, so Mosquitto's ``max_queued_messages`` (1,000 by default)
    does not cut a larger set short.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    # a topic of its own beside the filter's (no wildcard: it is published)
    fixed = []
    for part in topic_filter.split("/"):
        if part in ("+", "#"):
            break
        fixed.append(part)
    sentinel = "/".join([*fixed, f"probe-{uuid.uuid4().hex[:8]}"])
    found: dict[str, bytes] = {}
    subscribed, done = threading.Event(), threading.Event()

    def on_message(_c: Any, _u: Any, message: Any) -> None:
        if message.topic == sentinel:
            done.set()
        elif message.retain and message.payload:
            found[message.topic] = bytes(message.payload)

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    client.connect(host, port)
    client.loop_start()
    try:
        client.subscribe([(topic_filter, 0), (sentinel, 0)])
        assert subscribed.wait(timeout), f"the broker did not grant a subscription to {topic_filter}"
        client.publish(sentinel, b"", qos=0)
        assert done.wait(timeout), f"the retained messages under {topic_filter} did not arrive"
    finally:
        client.disconnect()
        client.loop_stop()
    return found


def clear_retained(host: str, port: int, topic_filter: str, timeout: float = 10.0) -> list[str]:
    """Delete every retained message under ``topic_filter`` (publish an empty retained payload
    on each topic holding one); returns those topics."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    retained = sorted(retained_messages(host, port, topic_filter, timeout))
    if not retained:
        return []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(host, port)
    client.loop_start()
    try:
        sent = [client.publish(topic, b"", qos=1, retain=True) for topic in retained]
        for info in sent:
            info.wait_for_publish(timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    return retained


_RETAINED_UNDER = pytest.StashKey[list[tuple[str, int, str]]]()


@pytest.fixture
def mqtt_broker(request: pytest.FixtureRequest, fleet_name: str) -> Iterator[tuple[str, int]]:
    """The machine's Mosquitto on 127.0.0.1:1883, or a private one. On the machine's broker,
    the retained messages under this test's fleet are deleted after the test (it keeps them on
    disk, for every later test and session to receive)."""
    if port_open("127.0.0.1", 1883):
        request.node.stash.setdefault(_RETAINED_UNDER, []).append(
            ("127.0.0.1", 1883, f"{TOPIC_ROOT}/{fleet_name}/#"))
        yield ("127.0.0.1", 1883)
        return
    proc = start_mosquitto()
    try:
        yield ("127.0.0.1", proc.port)
    finally:
        proc.stop()
        shutil.rmtree(proc.workdir, ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    """Clear the retained messages ``mqtt_broker`` noted once every fixture of the test is torn
    down: a link or fleet still running in a fixture would publish them again."""
    try:
        return (yield)
    finally:
        for host, port, topic_filter in item.stash.get(_RETAINED_UNDER, []):
            clear_retained(host, port, topic_filter)


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


POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


@dataclass
class PostgresProcess:
    """A private PostgreSQL cluster in a temporary directory (trust auth, database ``test``)."""

    port: int
    workdir: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/test"

    def stop(self) -> None:
        """Fast shutdown (SIGINT), SIGKILL if it is still there after 30 s; removes the data."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _postgres_bin() -> Path | None:
    """The directory of ``initdb`` and ``postgres``: on PATH, or Debian's newest version."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    return versions[-1].parent if versions else None


def _as_postgres_user() -> dict[str, Any]:
    """PostgreSQL refuses to run as root: under root, run it as the ``postgres`` user (set
    before exec, so the parent-death signal still holds), else as ourselves."""
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        need("PostgreSQL cannot run as root and there is no 'postgres' user to run it as")
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def start_postgres(timeout: float = 60.0) -> PostgresProcess:
    """initdb + postgres on a free port in a temporary directory; durability off (a test
    database is thrown away), no Unix socket (TCP on 127.0.0.1 only)."""
    import psycopg

    bindir = _postgres_bin()
    if bindir is None:
        need("PostgreSQL is not reachable and not installed here (no initdb) to start one")
    owner = _as_postgres_user()
    workdir = Path(tempfile.mkdtemp(prefix="es-pg-"))
    if owner:
        os.chown(workdir, owner["user"], owner["group"])
    data, log = workdir / "data", workdir / "postgres.log"
    made = subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                           "--auth=trust", "-E", "UTF8", "--no-sync"], check=False,
                          capture_output=True, text=True, cwd=workdir, timeout=timeout, **owner)
    if made.returncode != 0:
        shutil.rmtree(workdir, ignore_errors=True)
        raise RuntimeError(f"initdb failed ({made.returncode}): {made.stderr[-2000:]}")
    port = free_port()
    with log.open("wb") as sink:
        process = popen([str(bindir / "postgres"), "-D", str(data), "-p", str(port),
                         "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=",
                         "-c", "fsync=off", "-c", "synchronous_commit=off",
                         "-c", "full_page_writes=off", "-c", f"cluster_name={SESSION_SERVICE}"],
                        stdout=sink, stderr=subprocess.STDOUT, cwd=workdir, **owner)
    server = PostgresProcess(port, workdir, process)
    try:
        admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"postgres exited with {process.returncode}: "
                                   f"{log.read_text(errors='replace')[-2000:]}")
            try:
                with psycopg.connect(admin, autocommit=True, connect_timeout=2) as conn:
                    conn.execute("CREATE DATABASE test")
                return server
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postgres did not accept connections within "
                                       f"{timeout:g} s") from None
            time.sleep(0.1)
    except BaseException:  # a half-started cluster is not left running
        server.stop()
        raise


@contextlib.contextmanager
def postgres_at(url: str) -> Iterator[str]:
    """``url`` when a PostgreSQL answers there; when nothing listens on its (local) port, a
    private cluster's URL for as long as the context lasts."""
    try:
        import psycopg
    except ImportError:
        need("psycopg is not installed")
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5432
    if host in ("127.0.0.1", "localhost") and not port_open(host, port):
        server = start_postgres()
        try:
            yield server.url
        finally:
            server.stop()
        return
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=10):
            pass
    except psycopg.OperationalError as exc:
        need(f"cannot connect to PostgreSQL at {url}: {exc}")
    yield url


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """The PostgreSQL of ``EDGESERVE_TEST_PG`` (default the machine's, 127.0.0.1:5432), or a
    private one started once for the session when nothing listens there."""
    with postgres_at(os.environ.get("EDGESERVE_TEST_PG", POSTGRES_URL)) as url:
        yield url


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards."""
    with postgres_schema(postgres_server) as scoped:
        yield scoped
