"""Experiments end to end: real agents (router, feedback log, monitor, outbox, link, updater),
the real fleet (ingestion, store, experiment and rollout controllers) on Mosquitto, and
converter-made model versions.

Only the *reward* is synthetic: real models with exact accuracies of 0.50 / 0.55 / 0.70 are
hard to make, so each device's traffic thread asks its agent for a prediction, reads which
version answered, and sends feedback Bernoulli(p of that version) for that prediction id.
Everything from there on is the product's own path: feedback sums per version in telemetry
windows, fleet-wide evidence, Thompson weights, desired-state pushes, routing on the device.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from click.testing import CliRunner

from edgeserve.cli import cli
from edgeserve.demo.sim import SimDevice, SimFleet
from edgeserve.errors import EdgeserveError
from edgeserve.fleet.experiments import Experiments, samples_per_arm, status
from edgeserve.fleet.rollouts.repo import Rollouts
from edgeserve.fleet.server import FleetConfig, FleetServer
from edgeserve.testing import KeyPair, make_keypair
from tests.support import wait_until

# converting the three arms and a minute of bandit traffic: about 30 s each on two idle cores
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = "arms"
PROFILE = "onnx-only-exp"
DEVICES = 4
RATES = {"1.0.0": 0.50, "1.1.0": 0.55, "1.2.0": 0.70}
BEST = "1.2.0"
RATE_PER_DEVICE = 40.0
PUSH_EVERY_S = 2.0


@dataclass
class Packages:
    key: KeyPair
    paths: dict[str, Path]
    x_test: np.ndarray


def _profile_dir(root: Path) -> Path:
    text = (Path(__file__).parents[2] / "hw-profiles" / "generic-cpu.toml").read_text()
    head = text[: text.index("[[artifacts]]")].replace('"generic-cpu"', f'"{PROFILE}"')
    directory = root / "profiles"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{PROFILE}.toml").write_text(
        head + '[[artifacts]]\nformat = "onnx"\nprecision = "fp32"\n')
    return directory


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Packages]:
    """One small digits CNN converted and signed as three versions (the arms)."""
    from edgeserve.converters import convert
    from edgeserve.demo.models import train_digits

    root = tmp_path_factory.mktemp("experiment-models")
    previous = os.environ.get("EDGESERVE_PROFILE_PATH")
    os.environ["EDGESERVE_PROFILE_PATH"] = str(_profile_dir(root))
    key = make_keypair(root / "keys", "release")
    digits = train_digits(seed=0, epochs=2, width=4)
    paths = {}
    for release, version in enumerate(RATES, start=1):
        result = convert(digits.module, example_inputs=(digits.x_train[:1],), out=root / "dist",
                         sign_key=key.private_path, profiles=[PROFILE], name=MODEL,
                         version=version, release=release,
                         calibration={"input": digits.x_train[:128]},
                         evaluation={"input": digits.x_test[:128],
                                     "labels": digits.y_test[:128]})
        assert result.ok, result.report
        paths[version] = result.package
    try:
        yield Packages(key, paths, digits.x_test)
    finally:
        if previous is None:
            os.environ.pop("EDGESERVE_PROFILE_PATH", None)
        else:
            os.environ["EDGESERVE_PROFILE_PATH"] = previous


@dataclass
class RewardTraffic:
    """Per device: predict, then reward the answering version with probability RATES[v]."""

    devices: list[SimDevice]
    x: np.ndarray
    answered: list[tuple[float, str]] = field(default_factory=list)
    feedback: Counter[str] = field(default_factory=Counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> RewardTraffic:
        for i, device in enumerate(self.devices):
            thread = threading.Thread(target=self._serve, args=(device, i), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def _serve(self, device: SimDevice, seed: int) -> None:
        rng = random.Random(seed)
        period = 1.0 / RATE_PER_DEVICE
        while not self._stop.is_set():
            i = rng.randrange(len(self.x))
            try:
                result = device.agent.predict(MODEL, {"input": self.x[i:i + 1]})
                reward = float(rng.random() < RATES[result.version])
                assert result.request_id is not None
                device.agent.feedback(result.request_id, reward=reward)
            except EdgeserveError:  # nothing installed yet
                self._stop.wait(0.2)
                continue
            with self._lock:
                self.answered.append((time.time(), result.version))
                self.feedback[result.version] += 1
            self._stop.wait(period)

    def share(self, version: str, since: float) -> tuple[float, int]:
        with self._lock:
            recent = [v for t, v in self.answered if t >= since]
        return (recent.count(version) / len(recent) if recent else 0.0), len(recent)

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(self.feedback)

    def regret(self, before: Counter[str]) -> tuple[float, float]:
        """(true cumulative regret since ``counts()`` was ``before``, a uniform split's over as
        many feedbacks)."""
        with self._lock:
            counts = self.feedback - before
        total = sum(counts.values())
        lost = sum(n * (RATES[BEST] - RATES[v]) for v, n in counts.items())
        return lost, total * (RATES[BEST] - sum(RATES.values()) / len(RATES))


@dataclass
class System:
    server: FleetServer
    devices: SimFleet
    traffic: RewardTraffic
    db: str
    packages: dict[str, Path]

    @property
    def experiments(self) -> Experiments:
        assert self.server.store is not None
        return Experiments(self.server.store)


@pytest.fixture
def system(tmp_path: Path, packages: Packages, mqtt_broker: tuple[str, int],
           fleet_name: str) -> Iterator[System]:
    """Four agents running 1.0.0 (rolled out by the fleet), with reward traffic."""
    tmp = tmp_path
    host, port = mqtt_broker
    db = f"sqlite:///{tmp}/fleet.db"
    # each piece is stopped (last started, first stopped) however far the setup got
    with contextlib.ExitStack() as stack:
        server = FleetServer(FleetConfig(
            fleet=fleet_name, db=db, broker=f"mqtt://{host}:{port}", http_port=0,
            artifacts_dir=tmp / "artifacts", trusted_keys=[packages.key.public_path],
            rollout_tick_s=0.25, experiment_tick_s=0.25, fleet_key=tmp / "fleet.key"))
        stack.callback(server.stop)
        server.start()
        assert server.artifacts is not None and server.store is not None
        for path in packages.paths.values():
            server.artifacts.publish(path)
        devices = SimFleet.build(DEVICES, [PROFILE], tmp / "devices", [packages.key.public_path],
                                 f"mqtt://{host}:{port}", fleet_name, window_s=0.5,
                                 prefix=fleet_name, fleet_keys=[tmp / "fleet.pub.pem"])
        stack.callback(devices.stop)
        devices.start()
        traffic = RewardTraffic(devices.devices, packages.x_test)
        stack.callback(traffic.stop)
        traffic.start()
        rollouts = Rollouts(server.store)
        first = rollouts.create({"model": MODEL, "version": "1.0.0", "stages": [100],
                                 "soak_seconds": 0, "gates": []})
        assert devices.wait_for(lambda: rollouts.get(first.id).state.done, 60)
        assert devices.wait_for(lambda: devices.versions(MODEL) == {"1.0.0": DEVICES}, 30)
        yield System(server, devices, traffic, db, packages.paths)


def _matches(device: SimDevice, weights: dict[str, float]) -> bool:
    applied = device.agent.router.weights(MODEL)
    return set(applied) == set(weights) and all(abs(applied[v] - w) < 1e-4
                                                for v, w in weights.items())


def _follow_pushes(system: System, experiment_id: str, done: Callable[[], bool],
                   timeout: float) -> list[float]:
    """For each weight push until (and including) the one after which ``done()``: seconds
    until every online device routes by exactly those weights (a device still behind when the
    next push comes counts as not matching within one push: infinity)."""
    lags: list[float] = []
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        state = system.experiments.get(experiment_id).state
        if state.pushes == seen or not state.weights:
            time.sleep(0.02)
            continue
        seen, weights, pushed = state.pushes, state.weights["*"], state.last_push
        online = [d for d in system.devices.devices if d.online]
        while time.monotonic() < deadline:
            if all(_matches(d, weights) for d in online):
                lags.append(time.time() - pushed)
                break
            if system.experiments.get(experiment_id).state.pushes != seen:
                lags.append(float("inf"))
                break
            time.sleep(0.02)
        if done():
            break
    return lags


def test_bandit_moves_traffic_to_the_best_arm(system: System) -> None:
    """Three arms rewarding 0.50/0.55/0.70: within a bounded number of feedbacks the fleet
    weights and the devices' actual routing send >= 80% to the best arm; regret (reported and
    true) is below a uniform split's; devices follow each push within that push, and an offline
    device gets the latest weights on reconnect."""
    for device in system.devices.devices:  # the arms are in the devices' caches already
        for version in ("1.1.0", "1.2.0"):
            device.agent.install(system.packages[version], activate=False)
    away = system.devices.devices[0]
    away.go_offline()
    before = system.traffic.counts()
    record = system.experiments.create({
        "model": MODEL, "kind": "bandit", "arms": dict.fromkeys(RATES, 1.0),
        "push_every_s": PUSH_EVERY_S, "floor": 0.05, "min_samples": 200})

    def converged() -> bool:
        state = system.experiments.get(record.id).state
        return bool(state.weights) and state.weights["*"][BEST] >= 0.8
    lags = _follow_pushes(system, record.id, converged, timeout=60)
    assert converged()
    # within one push: every online device routed by each push's weights before the next one
    assert len(lags) >= 2 and all(math.isfinite(lag) for lag in lags), lags
    used = (system.traffic.counts() - before).total()
    assert used <= 6000, used  # the bound on feedbacks it took
    fleet_weights = system.experiments.get(record.id).state.weights["*"]
    assert not _matches(away, fleet_weights)  # missed pushes while away
    away.come_back()
    assert system.devices.wait_for(
        lambda: _matches(away, system.experiments.get(record.id).state.weights["*"]), 20)

    # the routing share is measured once the posterior is firm (weight 0.85 of at most 0.9)
    assert system.devices.wait_for(
        lambda: system.experiments.get(record.id).state.weights["*"][BEST] >= 0.85, 30)
    since = time.time()
    # a share over 800 answers (~5 s of traffic): its standard error is ~0.013, so 0.8 is four
    # of them below a weight of 0.85; counted in answers, not seconds, so load cannot shrink it
    wait_until(lambda: system.traffic.share(BEST, since)[1] >= 800, 20,
               "800 answers to measure the routing share on",
               progress=lambda: system.traffic.share(BEST, since)[1])
    share, answered = system.traffic.share(BEST, since)
    assert answered >= 800 and share >= 0.8, (share, answered)

    report = status(system.server.store, system.experiments.get(record.id))  # type: ignore[arg-type]
    assert report["regret"] < report["uniform_regret"], report["result"]
    true_regret, uniform = system.traffic.regret(before)
    assert true_regret < uniform, (true_regret, uniform)
    assert max(report["p_best"], key=report["p_best"].get) == BEST, report["p_best"]

    system.experiments.request_stop(record.id, reason="bandit done")
    assert system.devices.wait_for(
        lambda: all(d.agent.router.weights(MODEL) == {} for d in system.devices.devices), 20)
    assert system.experiments.get(record.id).state.phase == "stopped"
    print(f"\nbandit: {used} feedbacks to >= 80% on {BEST}; push lags {lags}; "
          f"share {share:.3f} of {answered}; regret {report['regret']:.1f} (true "
          f"{true_regret:.1f}) vs uniform {report['uniform_regret']:.1f} (true {uniform:.1f})")


def _cli(*args: str) -> Any:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def test_ab_decides_at_the_planned_horizon_and_promotes_the_winner(system: System) -> None:
    """A/B 0.50 vs 0.70 planned for a 10-point effect: decided for the better arm once both
    arms have the power calculation's sample size (not long after), and 'stop --promote'
    rolls the winner out to every device through the rollout engine."""
    planned = samples_per_arm(0.5, 0.1)
    record = system.experiments.create({"model": MODEL, "arms": {"1.0.0": 50, BEST: 50},
                                        "mde": 0.1, "baseline": 0.5})
    assert record.spec.min_samples == planned
    assert system.devices.wait_for(
        lambda: system.experiments.get(record.id).state.phase == "decided", 60)
    decision = system.experiments.get(record.id).state.decision
    assert decision is not None and decision.winner == BEST, decision
    assert all(planned <= n <= 1.5 * planned for n in decision.samples.values()), decision
    assert all(_matches(d, {"1.0.0": 0.5, BEST: 0.5}) for d in system.devices.devices)
    listed = requests.get(f"{system.server.http_url}/api/v1/experiments", timeout=10).json()
    shown = next(x for x in listed if x["id"] == record.id)  # what the dashboard renders
    assert shown["state"] == "decided" and shown["winner"] == BEST
    assert [(a["version"], a["weight"]) for a in shown["arms"]] == [("1.0.0", 0.5), (BEST, 0.5)]
    assert all(a["n"] >= planned and len(a["ci"]) == 2 for a in shown["arms"])

    _cli("fleet", "experiment", "stop", record.id, "--promote", "--stages", "100", "--soak",
         "0", "--no-gates", "--db", system.db)
    assert system.devices.wait_for(
        lambda: system.experiments.get(record.id).state.rollout is not None, 20)
    rollout = system.experiments.get(record.id).state.rollout
    assert rollout is not None
    assert system.devices.wait_for(
        lambda: system.devices.versions(MODEL) == {BEST: DEVICES}
        and all(d.agent.router.weights(MODEL) == {} for d in system.devices.devices), 60)
    rollouts = Rollouts(system.server.store)  # type: ignore[arg-type]
    assert system.devices.wait_for(lambda: rollouts.get(rollout).state.phase == "completed", 20)
    print(f"\nA/B: planned {planned} per arm, decided at {decision.samples}: {decision.detail}")
