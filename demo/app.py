"""``edgeserve demo``: the whole system on embedded defaults, in one command.

1. trains a digits CNN (v1), a better one (v2) and a deliberately broken one (v3: it fails on
   images with more ink than anything it was calibrated on);
2. converts each for a Raspberry Pi 5, a Pixel 8 and an iPhone 15 Pro — ONNX, TFLite and Core ML
   artifacts, each validated against the fp32 reference — into signed packages;
3. starts the fleet service (embedded MQTT broker, SQLite, artifact endpoint, dashboard);
4. starts simulated devices — the real agent stack (cache, ONNX Runtime/LiteRT, monitor, durable
   outbox, MQTT link, updater), one thread each — serving held-out digits;
5. deploys v1, rolls v2 out as a gated canary while some devices are offline, brings them back
   (they converge and their telemetry backlog arrives), then rolls v3 out: it is caught by a
   named gate and rolled back;
6. prints a summary and keeps the dashboard up until Ctrl-C (``--no-wait`` for CI).

It ties every part together; it imports the heavy ones (the converter's torch and TensorFlow,
the fleet's SQLAlchemy) only when a step needs them, so ``edgeserve demo --help`` stays quick.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.live import Live
from rich.table import Table

from edgeserve.console import console, format_bytes, table
from edgeserve.errors import EdgeserveError

__all__ = ["demo"]

MODEL = "digits"
CONVERT_PROFILES = ["raspberry-pi-5", "pixel-8", "iphone-15-pro"]
DEVICE_PROFILES = ["raspberry-pi-5", "pixel-8", "x86-industrial-pc", "raspberry-pi-4"]
GATES = ["error_rate<=0.02", "p50_ms<=2.5*control"]


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """Send native-library chatter (TensorFlow, coremltools, ONNX Runtime) to a log file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("ab") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])


@dataclass
class Outcome:
    """What the summary reports (also returned for tests)."""

    timings: dict[str, float] = field(default_factory=dict)
    rollouts: dict[str, dict[str, Any]] = field(default_factory=dict)
    offline: dict[str, int] = field(default_factory=dict)
    final_versions: dict[str, int] = field(default_factory=dict)
    served: int = 0
    dashboard: str = ""


class Demo:
    def __init__(self, work: Path, devices: int, http_port: int, rate: float) -> None:
        self.work = work
        self.count = devices
        self.http_port = http_port
        self.rate = rate
        self.outcome = Outcome()
        self.service: Any = None  # the fleet service, a child process
        self.store: Any = None
        self.artifacts: Any = None
        self.fleet: Any = None
        self._offline_from: dict[str, int] = {}

    # -- steps -------------------------------------------------------------------------------------

    def _timed(self, name: str, started: float) -> None:
        self.outcome.timings[name] = time.monotonic() - started

    def build_packages(self) -> tuple[dict[str, Path], Path, Any]:
        from edgeserve.signing import write_keypair

        from .models import erroring_variant, ink, train_digits

        started = time.monotonic()
        keys = self.work / "keys"
        write_keypair(keys / "release.key", keys / "release.pub.pem", overwrite=True)
        with console.status("training v1 (small CNN) and v2 (wider, trained longer) on "
                            "scikit-learn's digits"):
            v1 = train_digits(seed=0, epochs=6, width=8)
            v2 = train_digits(seed=1, epochs=10, width=16)
        limit = float(np.quantile(ink(v1.x_test), 0.85))
        v3 = erroring_variant(v2, limit)
        console.print(f"trained: v1 accuracy {v1.accuracy:.3f}, v2 {v2.accuracy:.3f}; v3 = v2 "
                      f"that fails on the {100 * (ink(v1.x_test) > limit).mean():.0f}% "
                      "inkiest images")
        self._timed("train", started)
        started = time.monotonic()
        calm = ink(v1.x_train) <= limit
        everything = np.ones(len(v1.x_train), bool)
        builds = {"1.0.0": (v1, 1, everything), "2.0.0": (v2, 2, everything),
                  "3.0.0": (v3, 3, calm)}
        packages = {}
        from edgeserve.converters import convert

        for version, (model, release, keep) in builds.items():
            console.print(f"[bold]converting {MODEL} {version}[/] for "
                          f"{', '.join(CONVERT_PROFILES)}")
            evaluation_keep = (ink(v1.x_test) <= limit if version == "3.0.0"
                               else np.ones(len(v1.x_test), bool))
            with _stderr_to(self.work / "logs" / "convert.log"):
                result = convert(model.module, example_inputs=(v1.x_train[:1],),
                                 out=self.work / "packages", sign_key=keys / "release.key",
                                 profiles=CONVERT_PROFILES, name=MODEL, version=version,
                                 release=release, calibration={"input": v1.x_train[keep][:300]},
                                 evaluation={"input": v1.x_test[evaluation_keep],
                                             "labels": v1.y_test[evaluation_keep]},
                                 labels=[str(i) for i in range(10)])
            packages[version] = result.package
            if version == "2.0.0":
                console.print(_report_table(result.report))
        self._timed("convert", started)
        return packages, keys / "release.pub.pem", v1

    def start_fleet(self, packages: dict[str, Path], public_key: Path) -> None:
        from edgeserve.fleet.artifacts import ArtifactStore
        from edgeserve.fleet.store import Store
        from edgeserve.signing import TrustStore

        from .sim import FleetChild

        started = time.monotonic()
        self.service = FleetChild("demo", self.work, public_key, broker_port=_free_port(18830),
                                  http_port=_free_port(self.http_port), tick_s=0.5).start()
        self.store = Store.open(self.service.db_url, migrate=False)
        self.artifacts = artifacts = ArtifactStore(self.service.artifacts_dir,
                                                   TrustStore.from_paths([public_key]))
        for path in packages.values():
            artifacts.publish(path)
        self.outcome.dashboard = f"{self.service.http_url}/"
        console.print(f"fleet service up (its own process): embedded MQTT broker "
                      f"{self.service.broker_url}, SQLite {self.work / 'fleet.db'}\n"
                      f"[bold]dashboard: {self.outcome.dashboard}[/]")
        self._timed("fleet", started)

    def start_devices(self, public_key: Path, data: Any) -> None:
        from .sim import SimFleet, Traffic

        started = time.monotonic()
        traffic = Traffic(MODEL, {"input": data.x_test}, data.y_test, rate_per_s=self.rate)
        with console.status(f"starting {self.count} device agents"):
            self.fleet = SimFleet.build(self.count, DEVICE_PROFILES, self.work / "devices",
                                        [public_key], self.service.broker_url, "demo",
                                        traffic=traffic, window_s=2.0, prefix="edge",
                                        fleet_keys=[self.service.fleet_public_key]).start()
        profiles = sorted({d.profile for d in self.fleet.devices})
        console.print(f"{self.count} devices running ({', '.join(profiles)}); each serves "
                      f"{self.rate:g} held-out digits per second and reports whether answers "
                      "were right")
        self._timed("devices", started)

    def rollout(self, version: str, label: str, **spec: Any) -> dict[str, Any]:
        from edgeserve.fleet.rollouts.admission import create_rollout
        from edgeserve.fleet.rollouts.repo import Rollouts

        started = time.monotonic()
        repo = Rollouts(self.store)
        # the path 'fleet rollout create' takes: checked against the devices first
        record, _ = create_rollout(self.store, self.artifacts, {"model": MODEL,
                                                                "version": version, **spec})
        with Live(self._status(record.id, label), console=console, refresh_per_second=4,
                  transient=True) as live:
            while True:
                state = repo.get(record.id).state
                live.update(self._status(record.id, label))
                if state.done and self._settled(version, state.phase):
                    break
                if time.monotonic() - started > 240:
                    break
                time.sleep(0.5)
        final = repo.get(record.id)
        result = {"id": record.id, "phase": final.state.phase, "gate": final.state.failed_gate,
                  "reason": final.state.reason, "seconds": time.monotonic() - started,
                  "devices": dict(self.fleet.versions(MODEL))}
        self.outcome.rollouts[version] = result
        colour = "green" if result["phase"] == "completed" else "red"
        line = f"[{colour}]{label}: {result['phase']}[/] in {result['seconds']:.1f} s"
        if result["gate"]:
            line += f" by gate [bold]{result['gate']}[/] ({result['reason']})"
        console.print(line)
        return result

    def _settled(self, version: str, phase: str) -> bool:
        online = [d for d in self.fleet.devices if d.online]
        if phase == "completed":
            return all(d.active_version(MODEL) == version for d in online)
        return all(d.active_version(MODEL) != version for d in online)

    def _status(self, rollout_id: str, label: str) -> Table:
        from edgeserve.fleet.rollouts.repo import Rollouts

        record = Rollouts(self.store).get(rollout_id)
        versions = self.fleet.versions(MODEL)
        status = Table(title=f"{label} — {record.state.phase}, stage {record.state.stage + 1}/"
                             f"{len(record.spec.stages)}", title_justify="left")
        status.add_column("version")
        status.add_column("devices")
        for version, count in sorted(versions.items(), key=lambda kv: str(kv[0])):
            status.add_row(str(version), f"{count}")
        for gate in record.state.gate_results:
            status.add_row(f"gate {gate.gate}", f"{gate.verdict}: {gate.detail}")
        return status

    def offline_devices(self, count: int) -> list[Any]:
        away: list[Any] = list(self.fleet.devices[:count])
        for device in away:
            device.go_offline()
            self._offline_from[device.device_id] = device.run.outbox.newest_seq
        console.print(f"{count} devices lost their connection ({', '.join(d.device_id for d in away)}"
                      "); they keep serving and keep their telemetry in the outbox")
        return away

    def bring_back(self, away: list[Any]) -> None:
        import sqlalchemy as sa

        from edgeserve.fleet.tables import windows

        since = self._offline_from
        recorded = {d.device_id: d.run.outbox.newest_seq - since[d.device_id] for d in away}
        for device in away:
            device.come_back()
        console.print(f"{len(away)} devices back online with {sum(recorded.values())} windows "
                      "recorded while away")
        self.fleet.wait_for(lambda: all(
            d.run.link.acked_seq >= since[d.device_id] + recorded[d.device_id] for d in away), 60)
        stored = 0
        with self.store.read() as conn:
            for device in away:
                stored += conn.execute(sa.select(sa.func.count()).select_from(windows).where(
                    windows.c.device_id == device.device_id,
                    windows.c.seq > since[device.device_id],
                    windows.c.seq <= since[device.device_id] + recorded[device.device_id])
                ).scalar_one()
        duplicates = int(self.service.metric("edgeserve_fleet_ingest_duplicates_total"))
        self.outcome.offline = {"recorded": sum(recorded.values()), "stored": stored,
                                "resent_copies_ignored": duplicates}
        converged = self.fleet.wait_for(
            lambda: all(d.active_version(MODEL) == "2.0.0" for d in away), 60)
        console.print(f"backlog: {stored} of {sum(recorded.values())} offline windows stored "
                      f"once each; returning devices on 2.0.0: {converged}")

    # -- the whole run -----------------------------------------------------------------------------

    def run(self, wait: bool) -> Outcome:
        started = time.monotonic()
        packages, public_key, data = self.build_packages()
        try:
            with _stderr_to(self.work / "logs" / "runtime.log"):
                self.start_fleet(packages, public_key)
                self.start_devices(public_key, data)
                self.rollout("1.0.0", "deploy 1.0.0", stages=[100], gates=[], soak_seconds=0)
                away = self.offline_devices(max(2, self.count // 6))
                canary = {"stages": [10, 50, 100], "soak_seconds": 5.0, "min_requests": 100,
                          "min_devices": 2, "gates": GATES, "silent_after_s": 4.0}
                self.rollout("2.0.0", "canary 2.0.0", **canary)
                self.bring_back(away)
                self.rollout("3.0.0", "canary 3.0.0", **canary)
                self.outcome.served = sum(d.counts.requests for d in self.fleet.devices)
                self.outcome.final_versions = {str(v): n for v, n in
                                               self.fleet.versions(MODEL).items()}
                self.outcome.timings["total"] = time.monotonic() - started
                console.print(_summary(self.outcome))
                if wait:
                    _wait_for_ctrl_c(self.outcome.dashboard)
        finally:
            self.stop()
        return self.outcome

    def stop(self) -> None:
        # Every step runs even if one before it fails: a fleet service left running keeps its
        # ports and its broker. The stack runs the callbacks last-in, first-out.
        with contextlib.ExitStack() as stack:
            if self.store is not None:
                stack.callback(self.store.close)
            if self.service is not None:
                stack.callback(self.service.stop)
            if self.fleet is not None:
                stack.callback(self.fleet.stop)


def _report_table(report: dict[str, Any]) -> Table:
    rows = []
    for a in report["artifacts"]:
        v = a.get("validation", {})
        rows.append((a["id"], ", ".join(a.get("profiles", [])), format_bytes(a.get("size_bytes")),
                     f"{v['latency_ms_p50']:.3f}" if v.get("latency_ms_p50") else "-",
                     f"{v['cosine_similarity']:.5f}" if v.get("cosine_similarity") else "-",
                     f"{v['accuracy']:.3f}" if v.get("accuracy") is not None else "-",
                     v.get("status")))
    return table("validation report, 2.0.0 (every artifact run against the fp32 reference)",
                 ["artifact", "profiles", "size", "p50 ms", "cosine", "accuracy", "verdict"], rows)


def _summary(outcome: Outcome) -> Table:
    summary = Table(title="edgeserve demo — summary", title_justify="left", show_header=False)
    summary.add_column("what", style="bold")
    summary.add_column("result")
    for version, r in outcome.rollouts.items():
        if r["phase"] == "completed":
            verdict = "promoted to 100%"
        elif r["gate"]:
            verdict = f"rolled back by gate {r['gate']}"
        else:
            verdict = r["phase"]
        summary.add_row(f"rollout {version}", f"{verdict} in {r['seconds']:.1f} s")
    final = ", ".join(f"{v} on {n}" for v, n in sorted(outcome.final_versions.items(),
                                                       key=lambda kv: str(kv[0])))
    summary.add_row("devices now", f"{final} (of {sum(outcome.final_versions.values())})")
    o = outcome.offline
    if o:
        summary.add_row("offline windows", f"{o['recorded']} recorded while offline, "
                                           f"{o['stored']} received, every one stored once "
                                           f"({o['resent_copies_ignored']} re-sent copies "
                                           "ignored)")
    summary.add_row("requests served", f"{outcome.served:,} (all offline-capable, local)")
    summary.add_row("time", ", ".join(f"{k} {v:.0f} s" for k, v in outcome.timings.items()))
    summary.add_row("dashboard", outcome.dashboard)
    return summary


def _wait_for_ctrl_c(url: str) -> None:
    console.print(f"dashboard stays up at [bold]{url}[/] — press Ctrl-C to stop")
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with contextlib.suppress(KeyboardInterrupt):
            while not stop.wait(1.0):
                pass
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.command("demo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the demo's files here (default: a new temporary directory).")
@click.option("--devices", type=click.IntRange(4, 200), default=24, show_default=True,
              help="Simulated devices (real agent code, one thread each).")
@click.option("--rate", type=click.FloatRange(0.5, 100), default=5.0, show_default=True,
              help="Requests per second each device serves.")
@click.option("--http-port", type=int, default=8080, show_default=True,
              help="Dashboard port (another free one if taken).")
@click.option("--no-wait", is_flag=True, help="Exit when done instead of keeping the dashboard up.")
def demo(out: Path | None, devices: int, rate: float, http_port: int, no_wait: bool) -> None:
    """Run the end-to-end demo on embedded defaults (about 3-4 minutes)."""
    work = out or Path(tempfile.mkdtemp(prefix="edgeserve-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    console.rule("edgeserve demo")
    console.print(f"working directory: {work}")
    outcome = Demo(work, devices, http_port, rate).run(wait=not no_wait)
    v2, v3 = outcome.rollouts.get("2.0.0", {}), outcome.rollouts.get("3.0.0", {})
    ok = (v2.get("phase") == "completed" and v3.get("phase") == "rolled-back"
          and outcome.offline.get("stored") == outcome.offline.get("recorded"))
    if not ok:
        raise EdgeserveError("the demo did not reach its expected outcome (v2 completed, v3 "
                             f"rolled back, every offline window received): {outcome.rollouts}, "
                             f"{outcome.offline}; logs in {work / 'logs'}")
