"""Helpers for the telemetry integration tests: real fleet processes, device swarms, outboxes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from edgeserve._process import popen
from edgeserve.device_agent.telemetry.outbox import Outbox
from edgeserve.fleet.store import Store
from edgeserve.fleet.tables import devices, windows
from edgeserve.telemetry import LatencyHistogram
from tests.support import wait_until

__all__ = ["FleetProcess", "Swarm", "fill_outboxes", "ingest_stored", "store_counts",
           "stored_by_workers", "wait_for", "window_fields"]

REPO = Path(__file__).resolve().parents[2]
EDGESERVE = Path(sys.executable).with_name("edgeserve")


def window_fields(i: int, model: str = "toy", version: str = "1.0.0") -> dict[str, Any]:
    """A realistic small model window (counts and a latency histogram)."""
    hist = LatencyHistogram()
    for k in range(20):
        hist.add(1.0 + ((i * 7 + k * 13) % 50) / 10)
    return {"start": 1_800_000_000.0 + 60 * i, "end": 1_800_000_060.0 + 60 * i, "model": model,
            "version": version, "requests": 20 + i % 7, "errors": i % 3,
            "latency": hist.to_data()}


def fill_outboxes(directory: Path, device_ids: Sequence[str], windows_each: int,
                  max_bytes: int = 64 * 2**20) -> None:
    """One outbox per device under ``directory``, each holding ``windows_each`` windows.

    Sequence numbers are per device, so every device may hold the same windows: one outbox is
    recorded through :class:`Outbox` and copied (closed first, so its WAL is checkpointed).
    """
    directory.mkdir(parents=True, exist_ok=True)
    template = directory / ".template.db"
    with Outbox(template, max_bytes=max_bytes, synchronous="normal") as ob:
        ob.append_many([window_fields(i) for i in range(windows_each)])
    for device in device_ids:
        shutil.copyfile(template, directory / f"{device}.db")
    template.unlink()


def wait_for(condition: Callable[[], bool], timeout: float, what: str,
             interval: float = 0.25, progress: Callable[[], object] | None = None) -> None:
    """:func:`tests.support.wait_until`, polling less often: conditions here query a store."""
    wait_until(condition, timeout, what, progress=progress, interval=interval)


@dataclass
class FleetProcess:
    """``edgeserve fleet serve`` as a child process (so a test can SIGKILL it)."""

    fleet: str
    db: str
    broker: str | None
    extra: Sequence[str] = ()
    process: subprocess.Popen[str] | None = None
    lines: list[str] = field(default_factory=list)

    def start(self, timeout: float = 60.0) -> FleetProcess:
        args = [str(EDGESERVE), "fleet", "serve", "--fleet", self.fleet, "--db", self.db,
                "--json", "--log-level", "info", "--http-port", "0", *self.extra]
        if self.broker is not None:
            args += ["--broker", self.broker]
        self.lines = []
        self.process = popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=REPO)
        threading.Thread(target=self._read, args=(self.process,), daemon=True).start()
        try:
            wait_for(lambda: any(" ready: " in line for line in self.lines) or
                     self.process is None or self.process.poll() is not None, timeout,
                     "fleet ready")
            if self.process.poll() is not None:
                raise AssertionError("fleet serve exited: " + "".join(self.lines[-20:]))
        except BaseException:  # never leave a half-started fleet (and its broker) running
            self.kill()
            raise
        return self

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        with contextlib.suppress(ValueError, OSError):
            for line in process.stderr:
                self.lines.append(line)

    def kill(self) -> None:
        """SIGKILL: no goodbye, nothing flushed."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(30)
            _close_pipes(self.process)
            self.process = None

    def stop(self, timeout: float = 60.0) -> dict[str, Any]:
        """SIGTERM; returns the final ingestion stats the process printed. SIGKILL (and the
        test fails) if it has not exited after ``timeout``."""
        process, self.process = self.process, None
        assert process is not None
        process.send_signal(signal.SIGTERM)
        try:
            out, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise AssertionError(f"fleet serve did not exit within {timeout:g} s of SIGTERM"
                                 ) from None
        return dict(json.loads(out)) if out.strip() else {}


@dataclass
class Swarm:
    """Device links in a few child processes (``tests/integration/telemetry_swarm.py``)."""

    directory: Path
    port: int
    fleet: str
    groups: list[list[str]]
    options: Sequence[str] = ()
    processes: list[subprocess.Popen[str] | None] = field(default_factory=list)

    def start(self) -> Swarm:
        self.processes = []
        try:
            for group in self.groups:
                self.processes.append(self._spawn(group))
        except BaseException:  # the groups already started are not left behind
            self.terminate()
            raise
        return self

    def _spawn(self, group: list[str]) -> subprocess.Popen[str]:
        return popen(
            [sys.executable, "-m", "tests.integration.telemetry_swarm", "--dir",
             str(self.directory), "--port", str(self.port), "--fleet", self.fleet,
             "--devices", ",".join(group), *self.options],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)})

    def kill(self, index: int) -> None:
        process = self.processes[index]
        assert process is not None
        process.kill()
        process.wait(30)
        _close_pipes(process)

    def restart(self, index: int) -> None:
        self.processes[index] = self._spawn(self.groups[index])

    def wait(self, timeout: float) -> list[dict[str, Any]]:
        results = []
        for process in self.processes:
            assert process is not None
            out, err = process.communicate(timeout=timeout)
            assert process.returncode == 0, f"swarm failed ({process.returncode}): {out} {err[-2000:]}"
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results

    def terminate(self) -> None:
        for process in self.processes:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(30)
            if process is not None:
                _close_pipes(process)


def _close_pipes(process: subprocess.Popen[str]) -> None:
    for pipe in (process.stdout, process.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError, ValueError):
                pipe.close()


def store_counts(url: str) -> dict[str, Any]:
    """What the store holds: windows, distinct keys, per-device seq ranges, acks, drops."""
    with Store(url) as store, store.read() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(windows)).scalar_one()
        per_device = conn.execute(
            sa.select(windows.c.device_id, sa.func.count(), sa.func.min(windows.c.seq),
                      sa.func.max(windows.c.seq))
            .group_by(windows.c.device_id)).all()
        acked = dict(conn.execute(sa.select(devices.c.device_id, devices.c.acked_seq)).all())
        dropped = dict(conn.execute(sa.select(devices.c.device_id,
                                              devices.c.dropped_total)).all())
    return {"total": int(total),
            "devices": {d: (int(n), int(lo), int(hi)) for d, n, lo, hi in per_device},
            "acked": {d: int(a) for d, a in acked.items()},
            "dropped": {d: int(x) for d, x in dropped.items()}}


def ingest_stored(http_port: int) -> int:
    """``edgeserve_fleet_ingest_windows_stored_total`` of one fleet worker (its own counter),
    read from its ``/metrics``."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith("edgeserve_fleet_ingest_windows_stored_total"):
            return int(float(line.rsplit(" ", 1)[1]))
    raise AssertionError(f"no ingest counter in the worker's /metrics:\n{text[-2000:]}")


async def stored_by_workers(http_ports: Sequence[int], total: int,
                            timeout: float = 10.0) -> list[int]:
    """Each worker's stored-windows counter, read until together they reach ``total`` or
    ``timeout`` passes: a worker's counter moves just after its commit, and another worker may
    ack (acks follow what is stored) before that."""
    deadline = time.monotonic() + timeout
    while True:
        counts = [await asyncio.to_thread(ingest_stored, port) for port in http_ports]
        if sum(counts) >= total or time.monotonic() > deadline:
            return counts
        await asyncio.sleep(0.1)
