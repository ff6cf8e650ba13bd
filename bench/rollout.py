"""Rollout speed with 200 simulated devices (real agent code) on one machine.

Measures, in one run: the time from ``rollout create`` until every device runs a good version
(stages 1/10/50/100 %, a few seconds of soak each), and until every device is back after a bad
version (one that fails on some inputs) is rolled back. Devices are the real device stack
(cache, ONNX Runtime, monitor, outbox, MQTT link, updater), spread over worker processes
(``--processes``); the fleet is the real fleet service (store, ingestion, artifact endpoint,
rollout controller) in its own process, on Mosquitto (or the embedded broker when no Mosquitto
listens on 127.0.0.1:1883).

    .venv/bin/python bench/rollout.py [--devices 200] [--soak 3] [--record]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgeserve.demo.sim import FleetChild, ProcessFleet, Traffic
from edgeserve.fleet.artifacts import ArtifactStore
from edgeserve.fleet.rollouts.repo import Rollouts
from edgeserve.fleet.store import Store
from edgeserve.testing import make_keypair

console = Console()
PROFILE = "bench-onnx"


def _mosquitto() -> str | None:
    try:
        with socket.create_connection(("127.0.0.1", 1883), timeout=0.5):
            return "mqtt://127.0.0.1:1883"
    except OSError:
        return None


def _profile(root: Path) -> None:
    text = (Path(__file__).parents[1] / "hw-profiles" / "generic-cpu.toml").read_text()
    head = text[: text.index("[[artifacts]]")].replace('"generic-cpu"', f'"{PROFILE}"')
    (root / f"{PROFILE}.toml").write_text(head + '[[artifacts]]\nformat = "onnx"\n'
                                                 'precision = "fp32"\n')
    os.environ["EDGESERVE_PROFILE_PATH"] = str(root)


def _packages(root: Path, key_path: Path) -> tuple[dict[str, Path], np.ndarray, np.ndarray]:
    from edgeserve.converters import convert
    from edgeserve.demo.models import erroring_variant, ink, train_digits

    v1 = train_digits(seed=0, epochs=4)
    v2 = train_digits(seed=1, epochs=4)
    limit = float(np.quantile(ink(v1.x_test), 0.8))
    calm = ink(v1.x_train) <= limit
    builds = {"1.0.0": (v1, 1, slice(None)), "2.0.0": (v2, 2, slice(None)),
              "2.1.0": (erroring_variant(v2, limit), 3, calm)}
    paths = {}
    for version, (model, release, keep) in builds.items():
        result = convert(model.module, example_inputs=(v1.x_train[:1],), out=root / "dist",
                         sign_key=key_path, profiles=[PROFILE], name="digits", version=version,
                         release=release, calibration={"input": v1.x_train[keep][:256]},
                         evaluation={"input": v1.x_test[ink(v1.x_test) <= limit]})
        paths[version] = result.package
    return paths, v1.x_test, v1.y_test


def _timed_rollout(store: Store, devices: ProcessFleet, version: str, want: str,
                   label: str, timeout: float, **spec: object) -> tuple[float, str, str | None]:
    repo = Rollouts(store)
    started = time.monotonic()
    record = repo.create({"model": "digits", "version": version, **spec})
    total = devices.count
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                  "{task.total}"), TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task(label, total=total)
        while time.monotonic() - started < timeout:
            count = devices.versions("digits").get(want, 0)
            progress.update(task, completed=count)
            state = repo.get(record.id).state
            if state.done and count == total:
                break
            time.sleep(0.25)
    state = repo.get(record.id).state
    return time.monotonic() - started, state.phase, state.failed_gate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--soak", type=float, default=3.0)
    parser.add_argument("--rate", type=float, default=2.0, help="requests/s per device")
    parser.add_argument("--window", type=float, default=2.0,
                        help="telemetry window seconds on the devices")
    parser.add_argument("--processes", type=int, default=4,
                        help="device worker processes (devices are split evenly)")
    parser.add_argument("--record", action="store_true", help="write docs/benchmarks.md")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="edgeserve-bench-rollout-"))
    _profile(root)
    key = make_keypair(root / "keys", "bench")
    with console.status("training and converting three versions"):
        paths, x_test, y_test = _packages(root, key.private_path)
    broker = _mosquitto()
    fleet = f"bench-{os.getpid()}"
    # every child is stopped (last started, first stopped) however far the run got
    with contextlib.ExitStack() as stack:
        service = FleetChild(fleet, root, key.public_path, broker_port=18830, http_port=18080,
                             broker=broker, tick_s=0.5).start()
        stack.callback(service.stop)
        store = Store.open(service.db_url, migrate=False)
        stack.callback(store.close)
        artifacts = ArtifactStore(service.artifacts_dir, key.trust)
        for path in paths.values():
            artifacts.publish(path)
        with console.status(f"starting {args.devices} devices in {args.processes} processes"):
            devices = ProcessFleet(args.devices, args.processes, [PROFILE], root / "devices",
                                   [key.public_path], service.broker_url, fleet,
                                   Traffic("digits", {"input": x_test}, y_test,
                                           rate_per_s=args.rate),
                                   window_s=args.window, prefix="bench", nice=10,
                                   fleet_keys=[service.fleet_public_key]).start()
        stack.callback(devices.stop)
        spec = {"soak_seconds": args.soak, "min_requests": 100, "silent_after_s": 30,
                "gates": ["error_rate<=0.02", "p95_ms<=3*control"]}
        base, _, _ = _timed_rollout(store, devices, "1.0.0", "1.0.0", "deploy 1.0.0", 300,
                                    stages=[100], gates=[], soak_seconds=0)
        good, good_phase, _ = _timed_rollout(store, devices, "2.0.0", "2.0.0",
                                             "canary 2.0.0 (1/10/50/100 %)", 600,
                                             stages=[1, 10, 50, 100], **spec)
        bad, bad_phase, gate = _timed_rollout(store, devices, "2.1.0", "2.0.0",
                                              "canary 2.1.0 (fails on some inputs)", 600,
                                              stages=[1, 10, 50, 100], **spec)
    table = Table(title=f"rollouts over {args.devices} devices (soak {args.soak:g} s per stage)")
    for column in ("rollout", "outcome", "time to converge"):
        table.add_column(column)
    table.add_row("initial deploy 1.0.0 (one stage, no gates)", "completed", f"{base:.1f} s")
    table.add_row("good 2.0.0, stages 1/10/50/100 %", good_phase, f"{good:.1f} s")
    table.add_row("bad 2.1.0 (errors on ~20% of inputs)", f"{bad_phase} by {gate}",
                  f"{bad:.1f} s")
    console.print(table)
    if args.record:
        _record(args, base, good, good_phase, bad, bad_phase, gate)
    return 0 if good_phase == "completed" and bad_phase == "rolled-back" else 1


def _record(args: argparse.Namespace, base: float, good: float, good_phase: str, bad: float,
            bad_phase: str, gate: str | None) -> None:
    path = Path(__file__).parents[1] / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    load = os.getloadavg()[0]
    canary = max(1, math.ceil(args.devices / 100))  # stage 1 % (minimum one device)
    section = (
        "## Rollouts\n\n"
        f"`.venv/bin/python bench/rollout.py --devices {args.devices} --soak {args.soak:g} "
        f"--rate {args.rate:g} --window {args.window:g} --record` - {args.devices} devices "
        f"(real agent stack, {args.processes} processes, "
        f"{args.rate:g} requests/s each, {args.window:g} s telemetry windows, nice 10), "
        "fleet on Mosquitto, SQLite store, 2 cores, load "
        f"average {load:.1f} at the end.\n\n"
        "| rollout | outcome | create → converged |\n|---|---|---|\n"
        f"| initial deploy 1.0.0 (one stage, no gates) | completed | {base:.1f} s |\n"
        f"| good 2.0.0, stages 1/10/50/100 %, soak {args.soak:g} s | {good_phase} | "
        f"{good:.1f} s |\n"
        f"| bad 2.1.0 (errors on ~20 % of inputs) | {bad_phase} by `{gate}` | {bad:.1f} s |\n\n"
        "Converged = every device reports the version (the rolled-back case: every device "
        "back on 2.0.0). Where the good rollout's time goes: each stage waits for its devices "
        "to download, verify, activate and pass the on-device health check, then for the "
        f"gates' minimum of 100 canary requests - at stage 1 ({canary} devices at {args.rate:g} "
        f"requests/s) alone that is ≥ {100 / (canary * args.rate):.0f} s - and the soak time. "
        "The bad version never gets past stage 1: its canaries fail their on-device health "
        "check, roll themselves back and report it, and the fleet's `device_health` gate rolls "
        "the rollout back.\n")
    start = text.find("## Rollouts")
    if start >= 0:
        end = text.find("\n## ", start + 5)
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
