"""The fleet at scale (issue 18): 1,000 / 3,000 / 10,000 simulated devices against real
``edgeserve fleet serve`` workers (1 and 2, ``--shared on``) on PostgreSQL and Mosquitto.

For every (devices, workers) pair, on a fresh PostgreSQL schema and a fresh fleet name:

1. **connect**: every simulated device opens its MQTT 3.1.1 session (birth, Last Will,
   subscriptions);
2. **backlog**: each device sends ``--backlog`` windows; timed until the fleet has acked all
   of them (windows/s stored);
3. **storm**: every connection drops without DISCONNECT, each device records ``--storm-windows``
   windows while away and returns within ``--storm-within`` seconds; timed until all are back
   and until everything is acked; resends counted;
4. **exactly once**: rows per device in the store == windows the simulator numbered, seq 1..N,
   and the device's acked seq == N;
5. **rollout** (``--rollout``): toy 2.0.0 in stages of 1/10/50/100 % with gates on
   (``error_rate<=0.05``, ``p95_ms<=1.5*control``, at least 50 canary requests), every device
   recording a ``--window``-second window each window (an agent's ``window_s``), timed from
   each stage's start to every device running 2.0.0; with ``--kill`` the leader (the worker
   holding the rollout controller's advisory lock) is killed -9 when the 10 % stage opens,
   and the history must show each stage once. Then toy 3.0.0, which the devices fail their
   health check on, must be rolled back on every device that took it.

CPU seconds per phase of the broker, each fleet worker, PostgreSQL (the sum over every
``postgres`` process of the server: backends, WAL writer, checkpointer …) and this process (the
simulator, plus the bench's own polling) are read with psutil.

By default the bench starts its own Mosquitto on a free loopback port with
``max_queued_messages`` raised (the machine's has the default of 1,000 per session, which drops
backlog at 10,000 devices); ``--broker-port`` uses a running broker instead. ``--broker nats``
starts a 3-node NATS JetStream cluster on loopback ports (``consumer_replicas: 1``, what
thousands of sessions on one machine need) and runs the workers with ``--nats`` (competing
consumers of one JetStream consumer); the devices are spread over the three nodes.

``--kill``: halfway through the storm's return window, worker 1 is killed -9 (on Mosquitto it
is started again 2 s later, as a supervisor would: Mosquitto keeps routing its ``$share/`` part
to its session; on NATS it stays dead and JetStream hands its unacknowledged messages to the
other worker), and on NATS the second node too. Every process it
starts is stopped at the end; the simulator's and the workers' broker sessions are ended and the
schemas dropped. Every wait is bounded (``--phase-timeout``): a run that does not finish is
reported as such, not waited for.

    .venv/bin/python bench/scale.py                       # 1k, 3k, 10k × 1 and 2 workers
    .venv/bin/python bench/scale.py --devices 1000,3000 --workers 1,2
    .venv/bin/python bench/scale.py --broker nats --devices 10000 --workers 2 --kill

Writes bench/out/scale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import sqlalchemy as sa
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgeserve._process import popen
from edgeserve.fleet.artifacts import ArtifactStore
from edgeserve.fleet.rollouts.admission import create_rollout
from edgeserve.fleet.rollouts.repo import Rollouts
from edgeserve.fleet.server import fleet_public_key_path
from edgeserve.fleet.simulate import SimSettings, Simulator, raise_open_files_limit
from edgeserve.fleet.store import Store
from edgeserve.fleet.tables import device_models, windows
from edgeserve.fleet.tables import devices as devices_table
from edgeserve.fleet.testing import leader_process
from edgeserve.mqtt import BrokerSettings
from edgeserve.testing import (
    KeyPair,
    end_mqtt_sessions,
    make_keypair,
    postgres_schema,
    publish_versions,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.natscluster import NatsCluster, start_nats_cluster  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 180)
OUT = Path(__file__).with_name("out") / "scale.json"
EDGESERVE = Path(sys.executable).with_name("edgeserve")


# -- processes -------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")


class Mosquitto:
    """A private Mosquitto on a free loopback port, no persistence, queues raised."""

    def __init__(self, directory: Path, max_queued: int) -> None:
        self.port = _free_port()
        self.config = directory / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"max_queued_messages {max_queued}\nmax_inflight_messages 0\n"
            "log_dest stderr\nlog_type error\nlog_type warning\n")
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.process = popen([binary, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        _wait_port(self.port, 10)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


class Worker:
    """``edgeserve fleet serve --worker N --shared on --http-port -1`` as a child process."""

    def __init__(self, fleet: str, db: str, brokers: list[str], n: int, directory: Path,
                 nats: list[str] | None = None, trusted: Path | None = None,
                 extra: list[str] | None = None) -> None:
        self.fleet, self.n = fleet, n
        self.lines: list[str] = []
        # each worker starts on another node of a cluster
        rotated = brokers[n % len(brokers):] + brokers[:n % len(brokers)]
        self.args = [str(EDGESERVE), "fleet", "serve", "--fleet", fleet, "--db", db,
                     "--broker", ",".join(rotated), "--worker", str(n),
                     "--http-port", "-1", "--json", "--log-level", "info",
                     "--fleet-key", str(directory / f"{fleet}.key"),
                     "--artifacts", str(directory / f"artifacts-{fleet}")]
        self.args += ["--nats", ",".join(nats)] if nats else ["--shared", "on"]
        if trusted is not None:
            self.args += ["--trusted-key", str(trusted)]
        self.args += extra or []
        self.killed = False
        self._start()

    def _start(self) -> None:
        self.process = popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(30)
        self.killed = True

    def restart(self) -> None:
        self.lines = []
        self._start()
        self.killed = False

    def _read(self) -> None:
        assert self.process.stderr is not None
        with contextlib.suppress(ValueError, OSError):
            for line in self.process.stderr:
                self.lines.append(line)

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(" ready: " in line for line in self.lines):
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"fleet worker {self.n} exited: " + "".join(self.lines[-20:]))
            time.sleep(0.1)
        raise RuntimeError(f"fleet worker {self.n} not ready after {timeout:g} s")

    def stop(self, timeout: float = 60.0) -> dict[str, Any]:
        if self.killed:
            return {"killed": True}
        self.process.send_signal(signal.SIGTERM)
        try:
            out, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
            return {"killed": True}
        with contextlib.suppress(ValueError):
            return dict(json.loads(out)) if out.strip() else {}
        return {}


# -- CPU accounting --------------------------------------------------------------------------------

def _cpu(process: psutil.Process) -> float:
    with contextlib.suppress(psutil.Error):
        t = process.cpu_times()
        return float(t.user + t.system)
    return 0.0


def _postgres() -> dict[int, float]:
    """CPU seconds of every ``postgres`` process (server, backends, background workers)."""
    out = {}
    for p in psutil.process_iter(["name"]):
        if p.info["name"] in ("postgres", "postmaster"):
            out[p.pid] = _cpu(p)
    return out


class Meter:
    """CPU seconds per role between two :meth:`mark` s."""

    def __init__(self, brokers: list[psutil.Process], workers: list[Worker]) -> None:
        self.brokers = brokers
        self.workers = [psutil.Process(w.process.pid) for w in workers]
        self.me = psutil.Process()
        self.last = self._read()

    def replace(self, index: int, worker: Worker) -> None:
        """Worker ``index`` was started again (a new process): count its CPU from zero."""
        self.workers[index] = psutil.Process(worker.process.pid)
        self.last["workers"][index] = 0.0

    def broker_rss_mib(self) -> float | None:
        """Resident memory of the broker processes (all nodes), in MiB."""
        total = 0
        for broker in self.brokers:
            with contextlib.suppress(psutil.Error):
                total += broker.memory_info().rss
        return round(total / 2**20, 1) if self.brokers else None

    def _read(self) -> dict[str, Any]:
        return {"broker": sum(_cpu(b) for b in self.brokers) if self.brokers else None,
                "workers": [_cpu(w) for w in self.workers],
                "postgres": _postgres(), "simulator": _cpu(self.me)}

    def mark(self) -> dict[str, Any]:
        now, before = self._read(), self.last
        self.last = now
        pg = sum(cpu - before["postgres"].get(pid, 0.0) for pid, cpu in now["postgres"].items())
        return {"broker": (round(max(0.0, now["broker"] - before["broker"]), 2)
                           if now["broker"] is not None else None),
                "workers": [round(max(0.0, a - b), 2) for a, b in zip(
                    now["workers"], before["workers"], strict=True)],
                "postgres": round(pg, 2), "simulator": round(now["simulator"]
                                                             - before["simulator"], 2)}


# -- one run ---------------------------------------------------------------------------------------

def _check_store(db: str, per_device: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Rows per device == what the simulator numbered (seq 1..N), acked seq == N."""
    with Store(db) as store, store.read() as conn:
        rows = conn.execute(sa.select(windows.c.device_id, sa.func.count(),
                                      sa.func.min(windows.c.seq), sa.func.max(windows.c.seq))
                            .group_by(windows.c.device_id)).all()
        acked = dict(conn.execute(sa.select(devices_table.c.device_id,
                                            devices_table.c.acked_seq)).all())
    stored = {d: (int(n), int(lo), int(hi)) for d, n, lo, hi in rows}
    bad = [d for d, mine in per_device.items()
           if stored.get(d) != (mine["windows"], 1, mine["windows"])
           or int(acked.get(d) or 0) != mine["windows"]]
    extra = sorted(set(stored) - set(per_device))
    return {"rows": sum(n for n, _, _ in stored.values()), "devices_checked": len(per_device),
            "mismatched_devices": len(bad) + len(extra), "examples": (bad + extra)[:5],
            "exactly_once": not bad and not extra}


async def _scenario(sim: Simulator, meter: Meter, args: argparse.Namespace,
                    progress: Progress, label: str,
                    during_storm: Callable[[], Awaitable[dict[str, Any]]] | None = None
                    ) -> dict[str, Any]:
    result: dict[str, Any] = {}
    n = len(sim.devices)
    task = progress.add_task(f"{label}: connect", total=n)

    async def watch_connect() -> None:
        while True:
            progress.update(task, completed=sim.sessions)
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch_connect())
    meter.mark()
    try:
        connect_s = await asyncio.wait_for(sim.start(), args.phase_timeout)
    finally:
        watcher.cancel()
    progress.update(task, completed=sim.sessions)
    result["connect"] = {"seconds": round(connect_s, 2), "sessions": sim.sessions,
                         "simulator_rss_mib": round(meter.me.memory_info().rss / 2**20, 1),
                         "broker_rss_mib": meter.broker_rss_mib(), "cpu_s": meter.mark()}

    def bar(description: str) -> Any:
        tid = progress.add_task(f"{label}: {description}", total=1)

        def tell(done: int, total: int) -> None:
            progress.update(tid, completed=done, total=max(total, 1))
        return tell

    count = n * args.backlog
    begun = time.monotonic()
    sim.record(args.backlog)
    try:
        await sim.wait_acked(args.phase_timeout, bar(f"backlog {count:,} windows acked"))
        took = time.monotonic() - begun
        result["backlog"] = {"windows": count, "seconds": round(took, 2),
                             "windows_per_s": round(count / took), "cpu_s": meter.mark(),
                             "resends": sim.counts()["resends"]}
    except TimeoutError as exc:
        result["backlog"] = {"windows": count, "timeout": str(exc), "cpu_s": meter.mark()}
        return result
    before = sim.counts()
    count = n * args.storm_windows
    begun = time.monotonic()
    storm = asyncio.ensure_future(sim.storm(args.storm_within, args.storm_windows))
    if during_storm is not None:
        result["kills"] = await during_storm()
    back_s = await asyncio.wait_for(storm, args.storm_within + args.phase_timeout)
    try:
        acked_s = await sim.wait_acked(args.phase_timeout,
                                       bar(f"storm {count:,} windows acked"))
        after = sim.counts()
        total = time.monotonic() - begun
        result["storm"] = {"windows": count, "within_s": args.storm_within,
                           "all_back_s": round(back_s, 2), "acked_after_back_s": round(acked_s, 2),
                           "all_acked_s": round(total, 2),
                           "resends": after["resends"] - before["resends"],
                           "batches_sent": after["batches_sent"] - before["batches_sent"],
                           "windows_sent": after["windows_sent"] - before["windows_sent"],
                           "connect_failures": after["connect_failures"]
                           - before["connect_failures"],
                           "cpu_s": meter.mark()}
    except TimeoutError as exc:
        result["storm"] = {"windows": count, "all_back_s": round(back_s, 2),
                           "timeout": str(exc), "cpu_s": meter.mark()}
    return result


ROLLOUT_GATES = ["error_rate<=0.05", "p95_ms<=1.5*control"]


async def _rollouts(sim: Simulator, meter: Meter, args: argparse.Namespace, db: str,
                    published: ArtifactStore, progress: Progress, label: str,
                    leader_kill: Callable[[], Awaitable[dict[str, Any]]] | None
                    ) -> dict[str, Any]:
    """toy 2.0.0 in stages with gates on (the devices recording windows all along), then toy
    3.0.0, which the devices fail: rolled back."""
    n = len(sim.devices)
    producing = asyncio.ensure_future(sim.produce(n / args.window, 10 * args.phase_timeout))
    result: dict[str, Any] = {}
    with Store(db) as store:
        repo = Rollouts(store)
        try:
            meter.mark()
            record, _ = await asyncio.to_thread(create_rollout, store, published, {
                "model": "toy", "version": "2.0.0", "stages": [1, 10, 50, 100],
                "gates": ROLLOUT_GATES, "min_requests": 50, "soak_seconds": 0,
                "min_devices": 1})
            begun = time.time()
            task = progress.add_task(f"{label}: rollout 2.0.0 (devices on it)", total=n)
            killed: dict[str, Any] | None = None
            all_on_new: float | None = None
            deadline = time.monotonic() + 4 * args.phase_timeout
            while True:
                state = (await asyncio.to_thread(repo.get, record.id)).state
                on_new = sum(1 for d in sim.devices if d.models.get("toy") == "2.0.0")
                progress.update(task, completed=on_new)
                if on_new == n and all_on_new is None:
                    all_on_new = time.time()
                if leader_kill is not None and killed is None and state.stage >= 1:
                    killed = await leader_kill()
                if state.done and on_new == n:
                    break
                if state.done and state.phase != "completed":
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rollout of 2.0.0 not done after "
                                       f"{4 * args.phase_timeout:g} s: {state.phase}, stage "
                                       f"{state.stage}, {on_new} of {n} devices on it")
                await asyncio.sleep(0.2)
            converged = time.time()
            stages = [h for h in state.history if h.event in ("created", "stage")]
            last_stage = max((h.ts for h in state.history if h.event == "stage"),
                             default=begun)
            result["good"] = {
                "phase": state.phase, "reason": state.reason,
                "seconds": round(converged - begun, 1),
                "stage_opened_s": [round(h.ts - begun, 1) for h in stages],
                "stage_events": [h.stage for h in state.history if h.event == "stage"],
                "completed_after_last_stage_s": round(converged - last_stage, 1),
                # every device runs it (the controller then still waits for the last stage's
                # gates to pass on windows recorded after the switch)
                "converged_after_last_stage_s": round((all_on_new or converged) - last_stage, 1),
                "devices_on_it": sum(1 for d in sim.devices if d.models.get("toy") == "2.0.0"),
                "history": [(round(h.ts - begun, 1), h.stage, h.event) for h in state.history],
                "leader_kill": killed, "cpu_s": meter.mark()}
            if state.phase != "completed":
                return result
            record, _ = await asyncio.to_thread(create_rollout, store, published, {
                "model": "toy", "version": "3.0.0", "stages": [1, 10, 50, 100],
                "gates": ROLLOUT_GATES, "min_requests": 50, "soak_seconds": 0,
                "min_devices": 1})
            begun = time.time()
            deadline = time.monotonic() + args.phase_timeout
            while True:
                state = (await asyncio.to_thread(repo.get, record.id)).state
                with store.read() as conn:
                    reported = dict(conn.execute(sa.select(
                        device_models.c.device_id, device_models.c.active).where(
                        device_models.c.model == "toy")).all())
                back = (state.done and sum(1 for v in reported.values() if v == "2.0.0") == n
                        and all(d.models.get("toy") == "2.0.0" for d in sim.devices))
                if back or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            tried = [d.device_id for d in sim.devices if "3.0.0" in d.hashes.get("toy", {})]
            result["bad"] = {"phase": state.phase, "stage": state.stage,
                             "reason": (state.reason or "")[:200],
                             "seconds": round(time.time() - begun, 1), "tried": len(tried),
                             "all_back_on_2.0.0": back, "cpu_s": meter.mark()}
        except TimeoutError as exc:
            result["timeout"] = str(exc)
        finally:
            producing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producing
        # what the devices recorded during the rollouts is stored and acked too (then checked)
        try:
            result["drained_s"] = round(await sim.wait_acked(args.phase_timeout), 1)
        except TimeoutError as exc:
            result["drain_timeout"] = str(exc)
    return result


@dataclass
class Brokers:
    """Where the devices and workers connect, and the broker processes (for CPU and kills)."""

    mqtt: list[str]
    processes: list[psutil.Process]
    nats: list[str] | None = None
    cluster: NatsCluster | None = None


def _publish_toy(directory: Path, fleet: str) -> tuple[KeyPair, ArtifactStore]:
    """A signing key and toy 2.0.0 / 3.0.0 published in the fleet's artifact directory."""
    keypair = make_keypair(directory / f"keys-{fleet}", "publisher")
    published = ArtifactStore(directory / f"artifacts-{fleet}", keypair.trust)
    publish_versions(published, directory, keypair, ["2.0.0", "3.0.0"], name="toy")
    return keypair, published


def run_one(n_devices: int, n_workers: int, args: argparse.Namespace, brokers: Brokers,
            directory: Path, progress: Progress) -> dict[str, Any]:
    label = f"{n_devices:,} devices, {n_workers} worker{'s' if n_workers > 1 else ''}"
    fleet = f"scale{uuid.uuid4().hex[:6]}"
    record: dict[str, Any] = {"devices": n_devices, "workers": n_workers, "fleet": fleet,
                              "broker": "nats" if brokers.nats else "mosquitto",
                              "kill": bool(args.kill)}
    started = time.monotonic()
    with postgres_schema(args.pg, "scale") as db:
        workers: list[Worker] = []
        try:
            keypair, published = _publish_toy(directory, fleet)
            # the first worker migrates the fresh schema; the others start after it
            extra = ["--desired-connections", str(args.desired_connections)]
            workers.append(Worker(fleet, db, brokers.mqtt, 0, directory, brokers.nats,
                                  keypair.public_path, extra))
            workers[0].wait_ready()
            workers += [Worker(fleet, db, brokers.mqtt, i, directory, brokers.nats,
                               keypair.public_path, extra) for i in range(1, n_workers)]
            for worker in workers[1:]:
                worker.wait_ready()
            meter = Meter(brokers.processes, workers)
            settings = SimSettings(BrokerSettings.from_url(",".join(brokers.mqtt),
                                                           protocol="3.1.1",
                                                           subscribe_qos=args.subscribe_qos),
                                   fleet, n_devices, seed=18, spread=True,
                                   ack_timeout_s=args.ack_timeout, models={"toy": "1.0.0"},
                                   bad_versions=frozenset({"toy=3.0.0"}),
                                   fleet_key=fleet_public_key_path(directory / f"{fleet}.key"),
                                   window_s=args.window,
                                   connect_concurrency=args.connect_concurrency)

            back_task: list[asyncio.Future[None]] = []

            async def kills() -> dict[str, Any]:
                await asyncio.sleep(args.storm_within / 2)
                done: dict[str, Any] = {"at_s": args.storm_within / 2}
                if brokers.cluster is not None:
                    cluster, node = brokers.cluster, brokers.cluster.nodes[1]
                    await asyncio.to_thread(cluster.kill, node)
                    done["broker_node"] = node.name
                    if args.node_down >= 0:

                        async def node_back() -> None:
                            await asyncio.sleep(args.node_down)
                            await asyncio.to_thread(cluster.restart, node)
                            meter.brokers[1] = psutil.Process(node.process.pid)
                        back_task.append(asyncio.ensure_future(node_back()))
                        done["node_restarted_after_s"] = args.node_down
                if len(workers) > 1:
                    await asyncio.to_thread(workers[1].kill)
                    done["worker"] = 1
                    if brokers.nats is None:  # Mosquitto: a supervisor starts it again
                        await asyncio.sleep(2.0)
                        workers[1].restart()
                        await asyncio.to_thread(workers[1].wait_ready)
                        meter.replace(1, workers[1])
                        done["worker_restarted_after_s"] = 2.0
                return done

            async def leader_kill() -> dict[str, Any]:
                index = await asyncio.to_thread(
                    leader_process, db, "edgeserve-rollouts", fleet,
                    [None if w.killed else w.process.pid for w in workers])
                if index is None:
                    return {"error": "no worker holds the rollout lock"}
                await asyncio.to_thread(workers[index].kill)

                async def supervisor() -> None:  # starts it again 2 s later, as a follower
                    await asyncio.sleep(2.0)
                    workers[index].restart()
                    await asyncio.to_thread(workers[index].wait_ready)
                    meter.replace(index, workers[index])
                back_task.append(asyncio.ensure_future(supervisor()))
                return {"killed_worker": index, "at": time.time(), "restarted_after_s": 2.0}

            async def main() -> dict[str, Any]:
                sim = Simulator(settings)
                try:
                    out = await _scenario(sim, meter, args, progress, label,
                                          kills if args.kill else None)
                    if args.rollout and "all_acked_s" in out.get("storm", {}):
                        for index, worker in enumerate(workers):
                            if worker.killed:  # a supervisor starts it again
                                worker.restart()
                                await asyncio.to_thread(worker.wait_ready)
                                meter.replace(index, worker)
                        out["rollout"] = await _rollouts(
                            sim, meter, args, db, published, progress, label,
                            leader_kill if args.kill and len(workers) > 1 else None)
                finally:
                    counts = sim.counts()
                    await asyncio.wait_for(sim.stop(), 120)
                    await asyncio.wait_for(sim.forget(), 120)
                out["counts"] = {k: v for k, v in counts.items() if k != "per_device"}
                out["per_device"] = counts["per_device"]
                return out

            record.update(_runner()(main()))
            record["check"] = _check_store(db, record.pop("per_device"))
        except Exception as exc:  # reported; the next run goes on
            record["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            record["worker_stats"] = [w.stop() for w in workers]
            record["worker_log"] = [[line.strip()[:300] for line in w.lines
                                     if " ready: " not in line and " INFO " not in line][-15:]
                                    for w in workers]
            if brokers.nats is None:
                for url in brokers.mqtt:
                    end_mqtt_sessions(int(url.rsplit(":", 1)[1]),
                                      [f"edgeserve-{k}-{fleet}-{i}" for i in range(n_workers)
                                       for k in ("fleet", "rollouts")])
    record["run_s"] = round(time.monotonic() - started, 1)
    return record


def _runner() -> Any:
    try:
        import uvloop

        return uvloop.run
    except ImportError:
        return asyncio.run


# -- output ----------------------------------------------------------------------------------------

def _cpu_text(cpu: dict[str, Any] | None) -> str:
    if not cpu:
        return "–"
    workers = "+".join(f"{w:g}" for w in cpu["workers"])
    broker = f"{cpu['broker']:g}" if cpu["broker"] is not None else "?"
    return f"B {broker} · W {workers} · PG {cpu['postgres']:g} · S {cpu['simulator']:g}"


def render(results: list[dict[str, Any]]) -> None:
    table = Table(title="fleet at scale (CPU s: B broker, W workers, PG postgres, S simulator)")
    for column in ("devices", "workers", "connect", "backlog acked", "storm: back / acked",
                   "resends", "exactly once", "CPU backlog", "CPU storm"):
        table.add_column(column)
    for r in results:
        connect, backlog, storm = r.get("connect", {}), r.get("backlog", {}), r.get("storm", {})
        if "seconds" in backlog:
            backlog_text = (f"{backlog['windows']:,} in {backlog['seconds']} s "
                            f"({backlog['windows_per_s']:,}/s)")
        else:
            backlog_text = "timed out" if backlog else r.get("error", "–")[:40]
        if "all_acked_s" in storm:
            storm_text = f"{storm['all_back_s']} s / +{storm['acked_after_back_s']} s"
        else:
            storm_text = "timed out" if storm else "–"
        check = r.get("check")
        check_text = ("yes" if check["exactly_once"] else
                      f"NO ({check['mismatched_devices']} devices)") if check else "–"
        table.add_row(f"{r['devices']:,}", str(r["workers"]),
                      f"{connect['seconds']} s" if connect else "–", backlog_text, storm_text,
                      str(storm.get("resends", "–")), check_text,
                      _cpu_text(backlog.get("cpu_s")), _cpu_text(storm.get("cpu_s")))
    console.print(table)
    rollouts = [r for r in results if "rollout" in r]
    if not rollouts:
        return
    table = Table(title="staged rollouts (1/10/50/100 %, gates on)")
    for column in ("devices", "workers", "broker", "2.0.0", "stages opened at (s)",
                   "all devices on it / completed, after last stage", "leader killed",
                   "3.0.0 (fails)"):
        table.add_column(column)
    for r in rollouts:
        ro = r["rollout"]
        good, bad = ro.get("good", {}), ro.get("bad", {})
        kill = good.get("leader_kill")
        table.add_row(
            f"{r['devices']:,}", str(r["workers"]), r.get("broker", "?"),
            f"{good.get('phase', ro.get('timeout', '–'))[:40]} in {good.get('seconds', '–')} s",
            ", ".join(f"{x:g}" for x in good.get("stage_opened_s", [])),
            f"{good.get('converged_after_last_stage_s', '–')} s / "
            f"{good.get('completed_after_last_stage_s', '–')} s",
            (f"worker {kill['killed_worker']}; stages {good.get('stage_events')}"
             if kill and "killed_worker" in kill else str(kill or "–")),
            (f"{bad['phase']} at stage {bad['stage'] + 1}, tried by {bad['tried']}, all back: "
             f"{bad['all_back_on_2.0.0']}" if bad else "–"))
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="1000,3000,10000",
                        help="comma list of device counts [1000,3000,10000]")
    parser.add_argument("--workers", default="1,2", help="comma list of worker counts [1,2]")
    parser.add_argument("--pg", default=os.environ.get(
        "EDGESERVE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--broker", choices=["mosquitto", "nats"], default="mosquitto",
                        help="a private Mosquitto, or a private 3-node NATS JetStream cluster")
    parser.add_argument("--broker-port", type=int, default=None,
                        help="use the Mosquitto already on this port [default: start one]")
    parser.add_argument("--consumer-replicas", type=int, choices=[1, 3], default=1,
                        help="NATS: replicas of each MQTT session's consumers (3 survives a node's "
                             "death, 1 costs a third)")
    parser.add_argument("--node-down", type=float, default=15.0,
                        help="NATS --kill: start the killed node again after this many seconds, "
                             "as a supervisor would (-1: never) [15]")
    parser.add_argument("--connect-concurrency", type=int, default=256,
                        help="simulated devices connecting at once (also in the storm) [256]")
    parser.add_argument("--subscribe-qos", type=int, choices=[0, 1], default=1,
                        help="the simulated devices' subscriptions' QoS (on NATS, 1 costs a "
                             "JetStream consumer per subscription) [1]")
    parser.add_argument("--desired-connections", type=int, default=1,
                        help="the workers' fleet serve --desired-connections [1]")
    parser.add_argument("--rollout", action="store_true",
                        help="after the storm: a staged rollout with gates on, then a bad one")
    parser.add_argument("--window", type=float, default=5.0,
                        help="the simulated agents' telemetry window (seconds) [5]")
    parser.add_argument("--kill", action="store_true",
                        help="kill -9 worker 1 (and on NATS node 2) halfway through the storm")
    parser.add_argument("--max-queued", type=int, default=1_000_000,
                        help="max_queued_messages of the bench's own Mosquitto")
    parser.add_argument("--backlog", type=int, default=5, help="windows per device at connect")
    parser.add_argument("--storm-within", type=float, default=10.0)
    parser.add_argument("--storm-windows", type=int, default=5)
    parser.add_argument("--ack-timeout", type=float, default=30.0,
                        help="the simulated devices' ack timeout (resend after it)")
    parser.add_argument("--phase-timeout", type=float, default=120.0,
                        help="longest wait for one phase (connect, backlog, storm acks)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    # a SIGTERM (a timeout, Ctrl+C's sibling) unwinds like Ctrl+C: schemas dropped, brokers and
    # workers stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    counts = [int(x) for x in args.devices.split(",") if x]
    worker_counts = [int(x) for x in args.workers.split(",") if x]
    raise_open_files_limit(max(counts) + 1024)
    load = os.getloadavg()
    results: list[dict[str, Any]] = []
    begun = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgeserve-scale-") as tmp:
        mosquitto: Mosquitto | None = None
        cluster: NatsCluster | None = None
        try:
            if args.broker == "nats":
                cluster = start_nats_cluster(consumer_replicas=args.consumer_replicas,
                                             timeout=60)
                brokers = Brokers(cluster.urls, [psutil.Process(n.process.pid)
                                                 for n in cluster.nodes if n.process],
                                  [f"nats://127.0.0.1:{n.client_port}" for n in cluster.nodes],
                                  cluster)
                broker_text = ("private 3-node NATS JetStream cluster (MQTT listeners, "
                               f"stream_replicas 3, consumer_replicas {args.consumer_replicas})")
            elif args.broker_port is None:
                mosquitto = Mosquitto(Path(tmp), args.max_queued)
                brokers = Brokers([f"mqtt://127.0.0.1:{mosquitto.port}"],
                                  [psutil.Process(mosquitto.process.pid)])
                broker_text = (f"private mosquitto on 127.0.0.1:{mosquitto.port}, "
                               f"max_queued_messages {args.max_queued}")
            else:
                port = args.broker_port
                found = [psutil.Process(c.pid) for c in psutil.net_connections("tcp")
                         if c.status == "LISTEN" and c.laddr.port == port and c.pid]
                brokers = Brokers([f"mqtt://127.0.0.1:{port}"], found[:1])
                broker_text = f"the broker on 127.0.0.1:{port}"
            console.print(f"[bold]fleet at scale[/]: devices {counts}, workers {worker_counts}, "
                          f"{broker_text}, PostgreSQL {args.pg}; load average "
                          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
            with Progress(TextColumn("{task.description}"), BarColumn(),
                          TextColumn("{task.completed:,}/{task.total:,}"), TimeElapsedColumn(),
                          console=console, transient=False) as progress:
                for n in counts:
                    for w in worker_counts:
                        results.append(run_one(n, w, args, brokers, Path(tmp), progress))
                        _write(args.out, args, broker_text, load, results, begun)
                        if cluster is not None and any(not n.alive for n in cluster.nodes):
                            break  # the cluster is one node short now
        finally:
            if mosquitto is not None:
                mosquitto.stop()
            if cluster is not None:
                cluster.stop()
    _write(args.out, args, broker_text, load, results, begun)
    render(results)
    console.print(f"wrote {args.out} ({time.monotonic() - begun:.0f} s)")


def _write(path: Path, args: argparse.Namespace, broker: str, load: tuple[float, ...],
           results: list[dict[str, Any]], begun: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "broker": broker, "postgres": args.pg, "cpus": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in load],
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "backlog_windows_per_device": args.backlog, "storm_within_s": args.storm_within,
        "storm_windows_per_device": args.storm_windows, "elapsed_s": round(
            time.monotonic() - begun, 1), "runs": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
