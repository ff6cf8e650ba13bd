"""Benchmark telemetry, side by side with its baselines, in one run.

(a) Ingestion: windows stored per second by the fleet (``FleetService`` in this process) on
    SQLite and on PostgreSQL. A backlog of ``--devices`` × ``--windows`` windows, in batches of
    ``--batch``, is queued in the broker (Mosquitto, the fleet's persistent session) while the
    fleet is stopped; then the fleet starts and the clock runs until every window is stored and
    acked. The baseline is the same inserts without MQTT or validation (``Store.insert_ignore``
    of ready rows), to show where the time goes.
(b) Bytes on the wire per window: MQTT payload bytes of a batch / windows, for a counts +
    latency window and for one with input/output sketches and drift (the 4→3 toy MLP).
(c) Monitoring overhead per inference: ``Agent.predict`` with the monitoring observer vs
    without, on real ONNX Runtime models (4→16→3 MLP and a 3×32×32 CNN), interleaved rounds,
    median ratio.

Usage::

    .venv/bin/python bench/telemetry.py                  # everything
    .venv/bin/python bench/telemetry.py --skip-postgres  # SQLite only
    .venv/bin/python bench/telemetry.py --json           # machine-readable

Needs Mosquitto on 127.0.0.1:1883 (or ``--port``) and, for PostgreSQL, a server on
127.0.0.1:5432 (``--pg``). Results are printed and written to ``bench/out/telemetry.json``.
Loops are bounded in count and time; everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

from edgeserve.contract import Window, device_topic  # noqa: E402
from edgeserve.device_agent import Agent  # noqa: E402
from edgeserve.device_agent.observe import InferenceEvent  # noqa: E402
from edgeserve.device_agent.telemetry.monitor import Monitor  # noqa: E402
from edgeserve.device_agent.telemetry.outbox import Outbox  # noqa: E402
from edgeserve.fleet.connection import BrokerSettings  # noqa: E402
from edgeserve.fleet.ingest import Ingestor  # noqa: E402
from edgeserve.fleet.service import FleetService  # noqa: E402
from edgeserve.fleet.store import Store  # noqa: E402
from edgeserve.fleet.tables import devices, windows  # noqa: E402
from edgeserve.fleet.telemetry import window_row  # noqa: E402
from edgeserve.telemetry import ReferenceStats  # noqa: E402
from edgeserve.testing import make_keypair, make_manifest, write_test_package  # noqa: E402
from tests.integration.telemetry_models import (  # noqa: E402
    cnn_onnx,
    mlp_package,
    run_onnx,
)
from tests.integration.telemetry_support import window_fields  # noqa: E402

console = Console(stderr=True)
OUT = REPO / "bench" / "out" / "telemetry.json"


# -- (a) ingestion ----------------------------------------------------------------------------

def _batches(device: str, windows_each: int, batch: int) -> list[bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        outbox = Outbox(Path(tmp) / "o.db", synchronous="off")
        outbox.append_many([window_fields(i) for i in range(windows_each)])
        records = outbox.pending(limit=windows_each)
        outbox.close()
    out = []
    for i in range(0, len(records), batch):
        chunk = records[i:i + batch]
        head = f'{{"v":1,"device_id":"{device}","sent":1.0,"floor":{chunk[0].seq},"windows":['
        out.append(head.encode() + b",".join(r.data for r in chunk) + b"]}")
    return out


def _publish_backlog(port: int, fleet: str, n_devices: int, windows_each: int,
                     batch: int) -> int:
    """Publish every device's batches (QoS 1) and wait for the broker's PUBACKs."""
    template = _batches("DEVICE", windows_each, batch)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(200)
    client.connect("127.0.0.1", port)
    client.loop_start()
    infos = []
    payload_bytes = 0
    for d in range(n_devices):
        device = f"dev{d:04d}"
        topic = device_topic(fleet, device, "telemetry")
        for payload in template:
            data = payload.replace(b'"DEVICE"', f'"{device}"'.encode(), 1)
            payload_bytes += len(data)
            infos.append(client.publish(topic, data, qos=1))
    deadline = time.monotonic() + 300
    for info in infos:
        info.wait_for_publish(max(0.1, deadline - time.monotonic()))
    client.disconnect()
    client.loop_stop()
    return payload_bytes


def bench_ingest(url: str, port: int, n_devices: int, windows_each: int, batch: int,
                 label: str) -> dict[str, Any]:
    fleet = f"bench-{uuid.uuid4().hex[:8]}"
    total = n_devices * windows_each
    store = Store.open(url, fleet=fleet)
    client_id = f"edgeserve-fleet-{fleet}-0"
    service = FleetService(Ingestor(store, fleet), BrokerSettings(port=port), client_id)
    service.start()
    service.stop()  # the session stays: the broker queues the backlog for it
    payload_bytes = _publish_backlog(port, fleet, n_devices, windows_each, batch)
    service = FleetService(Ingestor(store, fleet), BrokerSettings(port=port), client_id)
    started = time.perf_counter()
    service.start()
    deadline = time.monotonic() + 600
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"ingest {label}", total=total)
        while service.ingestor.stats.windows_stored < total and time.monotonic() < deadline:
            progress.update(task, completed=service.ingestor.stats.windows_stored)
            time.sleep(0.05)
    elapsed = time.perf_counter() - started
    stats = service.ingestor.stats.snapshot()
    service.stop()
    with store.read() as conn:
        import sqlalchemy as sa

        stored = conn.execute(sa.select(sa.func.count()).select_from(windows)).scalar_one()
        acked = conn.execute(sa.select(sa.func.min(devices.c.acked_seq))).scalar_one()
    baseline = _insert_baseline(store, n_devices, windows_each)
    store.close()
    return {"db": label, "windows": total, "stored": int(stored), "min_acked": int(acked),
            "seconds": round(elapsed, 2), "windows_per_s": round(total / elapsed),
            "insert_only_windows_per_s": baseline, "batch": batch,
            "payload_bytes_per_window": round(payload_bytes / total, 1),
            "duplicates": stats["duplicates"]}


def _insert_baseline(store: Store, n_devices: int, windows_each: int) -> int:
    """Rows ready in memory, inserted with the same statement: the database's share alone."""
    fields = [Window(seq=i + 1, **window_fields(i)) for i in range(windows_each)]
    rows = [window_row(f"base{d:04d}", w, 1.0) for d in range(n_devices) for w in fields]
    started = time.perf_counter()
    for i in range(0, len(rows), 4000):
        with store.write() as conn:
            store.insert_ignore(conn, windows, rows[i:i + 4000], ["device_id", "seq"])
    return round(len(rows) / (time.perf_counter() - started))


# -- (b) bytes per window ---------------------------------------------------------------------

def bench_bytes() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        key = make_keypair(Path(tmp) / "keys")
        agent = Agent(Path(tmp) / "cache", trusted_keys=[key.public_path], warmup=False)
        agent.install(mlp_package(Path(tmp) / "toy.edgepkg", key))
        outbox = Outbox(Path(tmp) / "o.db")
        monitor = Monitor(outbox, references=agent.reference_stats, health=lambda: None)
        monitor.watch("toy", "1.0.0")
        agent.add_observer(monitor)
        rng = np.random.default_rng(0)
        for _ in range(500):
            agent.predict("toy", {"x": rng.normal(size=(1, 4)).astype(np.float32)})
        monitor.flush()
        sketched = outbox.pending(limit=1)[0].data
        agent.close()
    plain = Window(seq=123456, **window_fields(7)).model_dump_json(exclude_none=True).encode()
    return {"counts_latency_bytes": len(plain), "with_sketches_drift_bytes": len(sketched),
            "note": "payload JSON per window inside a TelemetryBatch; a batch of 100 adds "
                    "~80 bytes of batch header and ~60 bytes of MQTT header + topic"}


# -- (c) monitoring overhead ------------------------------------------------------------------

def _cnn_package(path: Path, key: Any) -> Path:
    model = cnn_onnx()
    calibration = np.random.default_rng(1).normal(size=(200, 3, 32, 32)).astype(np.float32)
    stats = ReferenceStats.from_arrays({"x": calibration}, {"y": run_onnx(model, calibration)},
                                       layouts={"x": "NCHW"}, classifier_outputs=("y",))
    manifest = make_manifest(
        name="cnn", reference="reference/stats.json",
        inputs=[{"name": "x", "dtype": "float32", "shape": ["batch", 3, 32, 32],
                 "layout": "NCHW"}],
        outputs=[{"name": "y", "dtype": "float32", "shape": ["batch", 10]}],
        labels=[str(i) for i in range(10)])
    write_test_package(path, key, files={"artifacts/model.onnx": model,
                                         "reference/stats.json": stats.to_json()},
                       manifest=manifest)
    return path


def _one_thread(agent: Agent) -> Any:
    """The agent's profile with one ONNX Runtime thread: on this shared 2-core machine, idle
    spinning pool threads would otherwise slow down whatever Python runs after each inference
    and make any observer look expensive."""
    runtimes = agent.profile.runtimes
    assert runtimes.onnxruntime is not None
    ort = runtimes.onnxruntime.model_copy(update={"intra_op_threads": 1})
    return agent.profile.model_copy(update={"runtimes": runtimes.model_copy(
        update={"onnxruntime": ort})})


def _observer_cost(monitor: Monitor, event: InferenceEvent, calls: int, rounds: int) -> float:
    """CPU µs per on_inference call (best block; thread CPU time ignores other processes)."""
    best = float("inf")
    for _ in range(rounds):
        started = time.thread_time()
        for _ in range(calls):
            monitor.on_inference(event)
        best = min(best, (time.thread_time() - started) / calls * 1e6)
        monitor.flush()
    return best


def bench_overhead(rounds: int, calls: int) -> list[dict[str, Any]]:
    """Per model: the observer's own CPU cost per inference (isolated, precise), and
    Agent.predict with vs without monitoring (blocks in shuffled order; best and median)."""
    results = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        key = make_keypair(root / "keys")
        agent = Agent(root / "cache", trusted_keys=[key.public_path], warmup=True)
        agent.install(mlp_package(root / "toy.edgepkg", key))
        agent.install(_cnn_package(root / "cnn.edgepkg", key))
        agent.close()
        agent = Agent(root / "cache", trusted_keys=[key.public_path], warmup=True)
        agent.profile = _one_thread(agent)
        monitors = {
            "sampled (default)": Monitor(Outbox(root / "a.db"), references=agent.reference_stats,
                                         health=lambda: None),
            "every request": Monitor(Outbox(root / "b.db"), references=agent.reference_stats,
                                     health=lambda: None, max_sketch_rate=None),
        }
        cases = [("toy", "MLP 4→16→3, batch 1", rng.normal(size=(1, 4)).astype(np.float32)),
                 ("cnn", "CNN 3×32×32, batch 1",
                  rng.normal(size=(1, 3, 32, 32)).astype(np.float32))]
        for model, title, x in cases:
            version = agent.active_version(model)
            for monitor in monitors.values():
                monitor.watch(model, version)
            outputs = agent.predict(model, {"x": x}).outputs
            n = calls if model == "toy" else max(100, calls // 8)
            times: dict[str, list[float]] = {"off": [], **{k: [] for k in monitors}}
            order = list(times)
            with Progress(console=console, transient=True) as progress:
                task = progress.add_task(f"overhead {model}", total=rounds)
                for _ in range(rounds):
                    rng.shuffle(order)
                    for condition in order:
                        monitor = monitors.get(condition)
                        if monitor is not None:
                            agent.add_observer(monitor)
                        started = time.thread_time()
                        for _ in range(n):
                            agent.predict(model, {"x": x})
                        times[condition].append((time.thread_time() - started) / n * 1e6)
                        if monitor is not None:
                            agent.remove_observer(monitor)
                            monitor.flush()
                    progress.advance(task)
            base, base_median = min(times["off"]), statistics.median(times["off"])
            event = InferenceEvent(model, version, {"x": x}, outputs, 0.5)
            for condition, monitor in monitors.items():
                cost = _observer_cost(monitor, event, 2000, 7)
                on = min(times[condition])
                results.append({
                    "model": title, "monitoring": condition,
                    "predict_us_off": round(base, 1), "predict_us_on": round(on, 1),
                    "median_us_off": round(base_median, 1),
                    "median_us_on": round(statistics.median(times[condition]), 1),
                    "ratio_end_to_end": round(on / base, 3),
                    "observer_us": round(cost, 2), "ratio_observer": round(1 + cost / base, 4),
                    "calls_per_block": n, "rounds": rounds})
        agent.close()
    return results


# -- main -------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--pg", default=os.environ.get(
        "EDGESERVE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--skip-ingest", action="store_true", help="only (b) and (c)")
    parser.add_argument("--devices", type=int, default=300)
    parser.add_argument("--windows", type=int, default=200)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--calls", type=int, default=800)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}}
    ingest = []
    if not args.skip_ingest:
        with tempfile.TemporaryDirectory() as tmp:
            ingest.append(bench_ingest(f"sqlite:///{tmp}/fleet.db", args.port, args.devices,
                                       args.windows, args.batch, "SQLite"))
        if not args.skip_postgres:
            ingest.append(_bench_pg(args))
    results["ingest"] = ingest
    results["bytes"] = bench_bytes()
    results["overhead"] = bench_overhead(args.rounds, args.calls)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    _render(results)


def _bench_pg(args: argparse.Namespace) -> dict[str, Any]:
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.pg, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in args.pg else "?"
    try:
        return bench_ingest(f"{args.pg}{sep}options=-csearch_path%3D{schema}", args.port,
                            args.devices, args.windows, args.batch, "PostgreSQL")
    finally:
        with psycopg.connect(args.pg, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _render(results: dict[str, Any]) -> None:
    out = Console()
    t = Table(title="fleet ingestion (backlog queued in Mosquitto, then drained)")
    for col in ("store", "windows", "seconds", "windows/s", "insert-only windows/s",
                "payload B/window"):
        t.add_column(col)
    for r in results["ingest"]:
        t.add_row(r["db"], str(r["stored"]), str(r["seconds"]), str(r["windows_per_s"]),
                  str(r["insert_only_windows_per_s"]), str(r["payload_bytes_per_window"]))
    out.print(t)
    b = results["bytes"]
    out.print(f"bytes per window: {b['counts_latency_bytes']} (counts + latency), "
              f"{b['with_sketches_drift_bytes']} (with sketches and drift)")
    t = Table(title="monitoring overhead per inference (CPU time of the calling thread)")
    for col in ("model", "sketching", "predict µs off", "predict µs on", "end-to-end ratio",
                "observer µs", "observer ratio"):
        t.add_column(col)
    for r in results["overhead"]:
        t.add_row(r["model"], r["monitoring"], str(r["predict_us_off"]), str(r["predict_us_on"]),
                  f"{r['ratio_end_to_end']:.3f}", str(r["observer_us"]),
                  f"{r['ratio_observer']:.4f}")
    out.print(t)


if __name__ == "__main__":
    main()
