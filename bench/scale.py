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
   and the device's acked seq == N.

CPU seconds per phase of the broker, each fleet worker, PostgreSQL (the sum over every
``postgres`` process of the server: backends, WAL writer, checkpointer …) and this process (the
simulator, plus the bench's own polling) are read with psutil.

By default the bench starts its own Mosquitto on a free loopback port with
``max_queued_messages`` raised (the machine's has the default of 1,000 per session, which drops
backlog at 10,000 devices); ``--broker-port`` uses a running broker instead. Every process it
starts is stopped at the end; the simulator's and the workers' broker sessions are ended and the
schemas dropped. Every wait is bounded (``--phase-timeout``): a run that does not finish is
reported as such, not waited for.

    .venv/bin/python bench/scale.py                       # 1k, 3k, 10k × 1 and 2 workers
    .venv/bin/python bench/scale.py --devices 1000,3000 --workers 1,2

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
from pathlib import Path
from typing import Any

import psutil
import sqlalchemy as sa
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgeserve._process import popen
from edgeserve.fleet.simulate import SimSettings, Simulator, raise_open_files_limit
from edgeserve.fleet.store import Store
from edgeserve.fleet.tables import devices as devices_table
from edgeserve.fleet.tables import windows
from edgeserve.mqtt import BrokerSettings
from edgeserve.testing import end_mqtt_sessions, postgres_schema

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

    def __init__(self, fleet: str, db: str, port: int, n: int, directory: Path) -> None:
        self.fleet, self.n = fleet, n
        self.lines: list[str] = []
        args = [str(EDGESERVE), "fleet", "serve", "--fleet", fleet, "--db", db,
                "--broker", f"mqtt://127.0.0.1:{port}", "--worker", str(n), "--shared", "on",
                "--http-port", "-1", "--json", "--log-level", "info",
                "--fleet-key", str(directory / f"{fleet}.key"),
                "--artifacts", str(directory / f"artifacts-{fleet}")]
        self.process = popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()

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

    def __init__(self, broker: psutil.Process | None, workers: list[Worker]) -> None:
        self.broker = broker
        self.workers = [psutil.Process(w.process.pid) for w in workers]
        self.me = psutil.Process()
        self.last = self._read()

    def _read(self) -> dict[str, Any]:
        return {"broker": _cpu(self.broker) if self.broker is not None else None,
                "workers": [_cpu(w) for w in self.workers],
                "postgres": _postgres(), "simulator": _cpu(self.me)}

    def mark(self) -> dict[str, Any]:
        now, before = self._read(), self.last
        self.last = now
        pg = sum(cpu - before["postgres"].get(pid, 0.0) for pid, cpu in now["postgres"].items())
        return {"broker": (round(now["broker"] - before["broker"], 2)
                           if now["broker"] is not None else None),
                "workers": [round(a - b, 2) for a, b in zip(now["workers"], before["workers"],
                                                                strict=True)],
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
                    progress: Progress, label: str) -> dict[str, Any]:
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
                         "cpu_s": meter.mark()}

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
    back_s = await asyncio.wait_for(sim.storm(args.storm_within, args.storm_windows),
                                    args.storm_within + args.phase_timeout)
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


def run_one(n_devices: int, n_workers: int, args: argparse.Namespace, port: int,
            broker: psutil.Process | None, directory: Path, progress: Progress) -> dict[str, Any]:
    label = f"{n_devices:,} devices, {n_workers} worker{'s' if n_workers > 1 else ''}"
    fleet = f"scale{uuid.uuid4().hex[:6]}"
    record: dict[str, Any] = {"devices": n_devices, "workers": n_workers, "fleet": fleet}
    started = time.monotonic()
    with postgres_schema(args.pg, "scale") as db:
        workers: list[Worker] = []
        try:
            # the first worker migrates the fresh schema; the others start after it
            workers.append(Worker(fleet, db, port, 0, directory))
            workers[0].wait_ready()
            workers += [Worker(fleet, db, port, i, directory) for i in range(1, n_workers)]
            for worker in workers[1:]:
                worker.wait_ready()
            meter = Meter(broker, workers)
            settings = SimSettings(BrokerSettings(host="127.0.0.1", port=port,
                                                  protocol="3.1.1"),
                                   fleet, n_devices, seed=18,
                                   ack_timeout_s=args.ack_timeout)

            async def main() -> dict[str, Any]:
                sim = Simulator(settings)
                try:
                    out = await _scenario(sim, meter, args, progress, label)
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
            end_mqtt_sessions(port, [f"edgeserve-{k}-{fleet}-{i}" for i in range(n_workers)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="1000,3000,10000",
                        help="comma list of device counts [1000,3000,10000]")
    parser.add_argument("--workers", default="1,2", help="comma list of worker counts [1,2]")
    parser.add_argument("--pg", default=os.environ.get(
        "EDGESERVE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--broker-port", type=int, default=None,
                        help="use the Mosquitto already on this port [default: start one]")
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
    counts = [int(x) for x in args.devices.split(",") if x]
    worker_counts = [int(x) for x in args.workers.split(",") if x]
    raise_open_files_limit(max(counts) + 1024)
    load = os.getloadavg()
    results: list[dict[str, Any]] = []
    begun = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgeserve-scale-") as tmp:
        broker = None
        try:
            if args.broker_port is None:
                broker = Mosquitto(Path(tmp), args.max_queued)
                port, broker_process = broker.port, psutil.Process(broker.process.pid)
                broker_text = (f"private mosquitto on 127.0.0.1:{port}, max_queued_messages "
                               f"{args.max_queued}")
            else:
                port = args.broker_port
                broker_process = next((psutil.Process(c.pid) for c in psutil.net_connections(
                    "tcp") if c.status == "LISTEN" and c.laddr.port == port and c.pid), None)
                broker_text = f"the broker on 127.0.0.1:{port}"
            console.print(f"[bold]fleet at scale[/]: devices {counts}, workers {worker_counts}, "
                          f"{broker_text}, PostgreSQL {args.pg}; load average "
                          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
            with Progress(TextColumn("{task.description}"), BarColumn(),
                          TextColumn("{task.completed:,}/{task.total:,}"), TimeElapsedColumn(),
                          console=console, transient=False) as progress:
                for n in counts:
                    for w in worker_counts:
                        results.append(run_one(n, w, args, port, broker_process, Path(tmp),
                                               progress))
                        _write(args.out, args, broker_text, load, results, begun)
        finally:
            if broker is not None:
                broker.stop()
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
