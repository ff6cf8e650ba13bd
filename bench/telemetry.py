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
    without, on real ONNX Runtime models (4→16→3 MLP, a 3×32×32 CNN and a ~1 ms 3×128×128
    CNN), blocks of calls interleaved in shuffled order, calling-thread CPU time; µs overhead
    per call and the ratio, end to end and for the observer hook timed on its own.

Usage::

    .venv/bin/python bench/telemetry.py                  # everything
    .venv/bin/python bench/telemetry.py --skip-postgres  # SQLite only
    .venv/bin/python bench/telemetry.py --only overhead  # one part (repeatable)
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
from edgeserve.testing import (  # noqa: E402
    end_mqtt_sessions,
    make_keypair,
    make_manifest,
    postgres_schema,
    write_test_package,
)
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
    end_mqtt_sessions(port, [client_id])
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


_WORKER = """
import signal, sys, threading
from edgeserve.fleet.connection import BrokerSettings
from edgeserve.fleet.ingest import Ingestor
from edgeserve.fleet.service import FleetService
from edgeserve.fleet.store import Store
url, port, fleet, client_id = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
store = Store.open(url, fleet=fleet)
service = FleetService(Ingestor(store, fleet), BrokerSettings(port=port), client_id, shared="on")
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
service.start()
print("ready", service.telemetry_filter, flush=True)
stop.wait(900)
service.stop()
print("stored", service.ingestor.stats.windows_stored, flush=True)
"""


def _start_workers(url: str, port: int, fleet: str, n: int) -> tuple[list[Any], float]:
    """``n`` fleet workers, each its own process (one GIL each), sharing the telemetry
    subscription (``$share/``); returns once every one is subscribed, with the time (perf
    counter) the first one was."""
    import subprocess

    from edgeserve._process import popen

    workers = [popen([sys.executable, "-c", _WORKER, url, str(port), fleet,
                      f"edgeserve-fleet-{fleet}-{i}"], stdout=subprocess.PIPE,
                     stderr=subprocess.DEVNULL, text=True) for i in range(n)]
    first = None
    for worker in workers:
        assert worker.stdout is not None
        line = worker.stdout.readline()
        first = first or time.perf_counter()
        if not line.startswith("ready") or "$share/" not in line:
            raise SystemExit(f"a fleet worker did not subscribe to shared telemetry: {line!r}")
    return workers, first or time.perf_counter()


def _stop_workers(workers: list[Any]) -> list[int]:
    stored = []
    for worker in workers:
        worker.terminate()
    for worker in workers:
        out, _ = worker.communicate(timeout=60)
        stored += [int(line.split()[1]) for line in out.splitlines() if line.startswith("stored")]
    return stored


def bench_ingest_workers(url: str, port: int, n_devices: int, windows_each: int, batch: int,
                         label: str, n_workers: int) -> dict[str, Any]:
    """:func:`bench_ingest` with ``n_workers`` fleet worker processes sharing the backlog:
    their persistent sessions subscribe, stop, the backlog is queued for them, and they come
    back and drain it together. (Mosquitto queues at most ``max_queued_messages`` per session,
    1,000 by default: keep the backlog's messages — devices × windows / batch — under that.)"""
    fleet = f"bench-{uuid.uuid4().hex[:8]}"
    total = n_devices * windows_each
    store = Store.open(url, fleet=fleet)
    _stop_workers(_start_workers(url, port, fleet, n_workers)[0])
    payload_bytes = _publish_backlog(port, fleet, n_devices, windows_each, batch)
    spawned = time.perf_counter()
    # from the first worker's connection (its interpreter's start-up, ~1 s here, is not
    # ingestion), as bench_ingest times its in-process service from its start
    workers, started = _start_workers(url, port, fleet, n_workers)
    import sqlalchemy as sa

    stored = 0
    deadline = time.monotonic() + 600
    try:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"ingest {label}, {n_workers} workers", total=total)
            while stored < total and time.monotonic() < deadline:
                with store.read() as conn:
                    stored = conn.execute(sa.select(sa.func.count())
                                          .select_from(windows)).scalar_one()
                progress.update(task, completed=stored)
                time.sleep(0.05)
        elapsed = time.perf_counter() - started
        from_spawn = time.perf_counter() - spawned
    finally:
        per_worker = _stop_workers(workers)
        end_mqtt_sessions(port, [f"edgeserve-fleet-{fleet}-{i}" for i in range(n_workers)])
    with store.read() as conn:
        acked = conn.execute(sa.select(sa.func.min(devices.c.acked_seq))).scalar_one()
    store.close()
    return {"db": f"{label}, {n_workers} workers", "windows": total, "stored": int(stored),
            "min_acked": int(acked or 0), "seconds": round(elapsed, 2),
            "seconds_from_spawn": round(from_spawn, 2),
            "windows_per_s": round(total / elapsed), "insert_only_windows_per_s": None,
            "batch": batch, "payload_bytes_per_window": round(payload_bytes / total, 1),
            "duplicates": None, "stored_per_worker": per_worker}


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

def _large_cnn_onnx(seed: int = 0, size: int = 128) -> bytes:
    """``x`` float32 [N, 3, size, size] → three 3×3 convolutions (32, 64, 64 channels, the last
    two with stride 2) → global pool → ``y`` [N, 10]: about 1 ms per image on one core here, the
    order of a small vision model on an edge CPU."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def weight(name: str, shape: tuple[int, ...], scale: float) -> Any:
        return numpy_helper.from_array((rng.normal(size=shape) * scale).astype(np.float32), name)

    inits = [weight("c1", (32, 3, 3, 3), 0.3), weight("c2", (64, 32, 3, 3), 0.06),
             weight("c3", (64, 64, 3, 3), 0.04), weight("fc", (64, 10), 1.0)]
    nodes = [helper.make_node("Conv", ["x", "c1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Conv", ["b", "c2"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["d"]),
             helper.make_node("Conv", ["d", "c3"], ["e"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["e"], ["f"]),
             helper.make_node("GlobalAveragePool", ["f"], ["g"]),
             helper.make_node("Flatten", ["g"], ["h"]),
             helper.make_node("MatMul", ["h", "fc"], ["i"]),
             helper.make_node("Softmax", ["i"], ["y"], axis=1)]
    graph = helper.make_graph(
        nodes, "cnn_large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _image_package(path: Path, key: Any, name: str, model: bytes, size: int) -> Path:
    """A signed package of an image classifier 3×size×size → 10 with a drift reference."""
    calibration = np.random.default_rng(1).normal(size=(100, 3, size, size)).astype(np.float32)
    stats = ReferenceStats.from_arrays({"x": calibration}, {"y": run_onnx(model, calibration)},
                                       layouts={"x": "NCHW"}, classifier_outputs=("y",))
    manifest = make_manifest(
        name=name, reference="reference/stats.json",
        inputs=[{"name": "x", "dtype": "float32", "shape": ["batch", 3, size, size],
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
    and make any observer look expensive; and with one thread, the calling thread's CPU time is
    the whole inference."""
    runtimes = agent.profile.runtimes
    assert runtimes.onnxruntime is not None
    ort = runtimes.onnxruntime.model_copy(update={"intra_op_threads": 1})
    return agent.profile.model_copy(update={"runtimes": runtimes.model_copy(
        update={"onnxruntime": ort})})


def _cpu_us(fn: Any, calls: int, rounds: int, after: Any = None) -> float:
    """Best block's calling-thread CPU µs per ``fn()`` call (thread CPU time ignores other
    processes; the best block is the one least disturbed by them)."""
    best = float("inf")
    for _ in range(rounds):
        started = time.thread_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.thread_time() - started) / calls * 1e6)
        if after is not None:
            after()
    return best


def _hook_costs(agent: Agent, model: str, x: np.ndarray,
                monitor: Monitor) -> tuple[float, float]:
    """Isolated CPU µs per request of (the agent's observer hook with ``monitor`` attached minus
    the same hook with no observer, ``monitor.on_inference`` alone on a real event).

    The hook is ``Agent._notify``, what ``predict`` runs after the runtime returns: with an
    observer it builds the InferenceEvent and calls each observer. Timing it apart from the
    runtime resolves fractions of a µs that the end-to-end blocks cannot on a shared machine."""
    loaded = agent.model(model)
    inputs = {"x": x}
    outputs = agent.predict(model, inputs).outputs
    start = time.perf_counter()
    observers = agent._observers
    try:
        agent._observers = []
        bare = _cpu_us(lambda: agent._notify(model, None, loaded, inputs, outputs, start, None,
                                              None), 5000, 7)
        agent._observers = [monitor]
        hooked = _cpu_us(lambda: agent._notify(model, None, loaded, inputs, outputs, start,
                                                None, None), 5000, 7, monitor.flush)
    finally:
        agent._observers = observers
    event = InferenceEvent(model, loaded.version, inputs, outputs, 0.5)
    alone = _cpu_us(lambda: monitor.on_inference(event), 5000, 7, monitor.flush)
    return hooked - bare, alone


OVERHEAD_MODELS = [  # model name, title, input shape (batch 1)
    ("toy", "MLP 4→16→3", (1, 4)),
    ("cnn", "CNN 3×32×32", (1, 3, 32, 32)),
    ("cnn_large", "CNN 3×128×128", (1, 3, 128, 128)),
]


def bench_overhead(rounds: int, block_ms: float) -> list[dict[str, Any]]:
    """Per model and monitoring mode: ``Agent.predict`` CPU µs per call without and with the
    monitor, in blocks of ~``block_ms`` (at least 200 calls) run in shuffled order each round
    (best block and median). Each monitored block is one monitoring window, sketching included:
    the default samples at most ~200 requests/s on a stride that starts from the previous
    window's rate, which the interleaving dilutes, so the first 32 requests of a block are
    sketched more often than in steady serving. Also the observer hook's cost on its own (no
    sketching: its loop runs far above the sketch rate)."""
    results = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        key = make_keypair(root / "keys")
        agent = Agent(root / "cache", trusted_keys=[key.public_path], warmup=True)
        agent.install(mlp_package(root / "toy.edgepkg", key))
        agent.install(_image_package(root / "cnn.edgepkg", key, "cnn", cnn_onnx(), 32))
        agent.install(_image_package(root / "large.edgepkg", key, "cnn_large",
                                     _large_cnn_onnx(), 128))
        agent.close()
        agent = Agent(root / "cache", trusted_keys=[key.public_path], warmup=True)
        agent.profile = _one_thread(agent)
        monitors = {
            "sampled (default)": Monitor(Outbox(root / "a.db"), references=agent.reference_stats,
                                         health=lambda: None),
            "every request": Monitor(Outbox(root / "b.db"), references=agent.reference_stats,
                                     health=lambda: None, max_sketch_rate=None),
        }
        for model, title, shape in OVERHEAD_MODELS:
            x = rng.normal(size=shape).astype(np.float32)
            version = agent.active_version(model)
            for monitor in monitors.values():
                monitor.watch(model, version)
            per_call = _cpu_us(lambda m=model, x=x: agent.predict(m, {"x": x}), 20, 3)
            # at least 200 calls, so that every block (a fresh window) reaches the monitor's
            # in-window restride (after 32 requests) even for the ~1 ms model
            n = max(200, round(block_ms * 1000 / per_call))
            times = _interleaved(agent, model, x, monitors, rounds, n)
            base, base_median = min(times["off"]), statistics.median(times["off"])
            for condition, monitor in monitors.items():
                hook, alone = _hook_costs(agent, model, x, monitor)
                on, on_median = min(times[condition]), statistics.median(times[condition])
                results.append({
                    "model": f"{title}, batch 1", "monitoring": condition,
                    "predict_us_off": round(base, 2), "predict_us_on": round(on, 2),
                    "overhead_us": round(on - base, 2), "ratio": round(on / base, 4),
                    "median_us_off": round(base_median, 2), "median_us_on": round(on_median, 2),
                    "median_ratio": round(on_median / base_median, 4),
                    "hook_us": round(hook, 3), "hook_ratio": round(1 + hook / base, 4),
                    "observer_us": round(alone, 3),
                    "calls_per_block": n, "rounds": rounds})
        agent.close()
    return results


def _interleaved(agent: Agent, model: str, x: np.ndarray, monitors: dict[str, Monitor],
                 rounds: int, n: int) -> dict[str, list[float]]:
    """CPU µs per predict for each condition ("off" and each monitor), one block of ``n`` calls
    per condition per round, in a fresh random order each round."""
    rng = np.random.default_rng(1)
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
    return times


# -- main -------------------------------------------------------------------------------------

PARTS = ("ingest", "bytes", "overhead")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--pg", default=os.environ.get(
        "EDGESERVE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--skip-ingest", action="store_true", help="only (b) and (c)")
    parser.add_argument("--only", action="append", choices=PARTS,
                        help="run only this part (repeatable); the other parts' results in "
                             "bench/out/telemetry.json are kept")
    parser.add_argument("--devices", type=int, default=300)
    parser.add_argument("--windows", type=int, default=200)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2,
                        help="(a): also drain the PostgreSQL backlog with this many fleet "
                             "worker processes sharing the telemetry (1: skip)")
    parser.add_argument("--rounds", type=int, default=25, help="(c): blocks per condition")
    parser.add_argument("--block-ms", type=float, default=50.0,
                        help="(c): CPU time per block of predict calls")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    parts = set(args.only or PARTS) - ({"ingest"} if args.skip_ingest else set())
    results: dict[str, Any] = {"ingest": [], "bytes": None, "overhead": []}
    if args.only and OUT.is_file():
        results.update(json.loads(OUT.read_text()))
    results["machine"] = {"cpus": os.cpu_count(), "load_average": list(os.getloadavg())}
    if "ingest" in parts:
        ingest = []
        with tempfile.TemporaryDirectory() as tmp:
            ingest.append(bench_ingest(f"sqlite:///{tmp}/fleet.db", args.port, args.devices,
                                       args.windows, args.batch, "SQLite"))
        if not args.skip_postgres:
            ingest += _bench_pg(args)
        results["ingest"] = ingest
    if "bytes" in parts:
        results["bytes"] = bench_bytes()
    if "overhead" in parts:
        results["overhead"] = bench_overhead(args.rounds, args.block_ms)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    _render(results, parts)


def _bench_pg(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    with postgres_schema(args.pg, "bench") as url:
        rows.append(bench_ingest(url, args.port, args.devices, args.windows, args.batch,
                                 "PostgreSQL"))
    if args.workers > 1:
        with postgres_schema(args.pg, "bench") as url:
            rows.append(bench_ingest_workers(url, args.port, args.devices, args.windows,
                                             args.batch, "PostgreSQL", args.workers))
    return rows


def _render(results: dict[str, Any], parts: set[str]) -> None:
    out = Console() if sys.stdout.isatty() else Console(width=160)  # a file: wide rows, unwrapped
    if "ingest" in parts:
        t = Table(title="fleet ingestion (backlog queued in Mosquitto, then drained)")
        for col in ("store", "windows", "seconds", "windows/s", "insert-only windows/s",
                    "payload B/window"):
            t.add_column(col)
        for r in results["ingest"]:
            t.add_row(r["db"], str(r["stored"]), str(r["seconds"]), str(r["windows_per_s"]),
                      str(r["insert_only_windows_per_s"]), str(r["payload_bytes_per_window"]))
        out.print(t)
    if "bytes" in parts:
        b = results["bytes"]
        out.print(f"bytes per window: {b['counts_latency_bytes']} (counts + latency), "
                  f"{b['with_sketches_drift_bytes']} (with sketches and drift)")
    if "overhead" in parts:
        t = Table(title="monitoring overhead per inference (CPU time of the calling thread; "
                        f"load average {results['machine']['load_average'][0]:.2f})")
        for col in ("model", "sketching", "predict µs off", "on", "overhead µs", "ratio",
                    "median ratio", "hook µs", "hook ratio", "observer µs"):
            t.add_column(col)
        for r in results["overhead"]:
            t.add_row(r["model"], r["monitoring"], str(r["predict_us_off"]),
                      str(r["predict_us_on"]), f"{r['overhead_us']:+.2f}", f"{r['ratio']:.3f}",
                      f"{r['median_ratio']:.3f}", f"{r['hook_us']:.2f}",
                      f"{r['hook_ratio']:.4f}", f"{r['observer_us']:.2f}")
        out.print(t)


if __name__ == "__main__":
    main()
