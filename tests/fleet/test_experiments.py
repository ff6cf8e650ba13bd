"""Experiments on the fleet side: spec checks, A/B decisions at the planned horizon (seeded
synthetic feedback), p95 comparisons, the controller's desired-state pushes, bounded bandit
pushes, per-group bandits, feedback validation and stopping with promotion.

The store is real SQLite; windows are written with the ingestion's own ``store_windows``; the
real agents and broker are in tests/integration/test_experiments_e2e.py.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from edgeserve.contract import Status, Window
from edgeserve.errors import ConfigError
from edgeserve.fleet.artifacts import ArtifactStore
from edgeserve.fleet.desired import DesiredStates
from edgeserve.fleet.experiments import (
    ArmData,
    ExperimentController,
    Experiments,
    ExperimentSpec,
    ab_decision,
    check_feedback,
    parse_arms,
    plan,
    samples_per_arm,
    status,
)
from edgeserve.fleet.experiments.collect import Collected, Evidence, collect
from edgeserve.fleet.registry import apply_status
from edgeserve.fleet.rollouts.repo import Rollouts
from edgeserve.fleet.store import Store
from edgeserve.fleet.tables import device_models
from edgeserve.fleet.telemetry import store_windows, window_row
from edgeserve.telemetry import LatencyHistogram
from edgeserve.testing import KeyPair, make_manifest, write_test_package

DEVICES = 6


# -- the spec ---------------------------------------------------------------------------------------

def test_arms_and_spec_are_checked_with_clear_errors() -> None:
    """Bad arm lists and inconsistent specs are refused, saying what was wrong."""
    assert parse_arms("1.0.0:50, 2.0.0:50") == {"1.0.0": 50.0, "2.0.0": 50.0}
    assert parse_arms("a,b,c") == {"a": 1.0, "b": 1.0, "c": 1.0}
    for text, message in (("1.0.0:x", "not a number"), ("1.0.0:-1", ">= 0"),
                          ("a:1,a:2", "twice"), ("bad/version:1", "not a version")):
        with pytest.raises(ConfigError, match=message):
            parse_arms(text)
    base: dict[str, Any] = {"id": "e", "model": "m", "arms": {"a": 1, "b": 1}}
    for extra, message in (({"arms": {"a": 1}}, "at least two arms"),
                           ({"kind": "bandit", "metric": "p95_ms", "binary": False}, "A/B"),
                           ({"kind": "bandit", "floor": 0.5}, "floor"),
                           ({"metric": "p95_ms"}, "continuous"),
                           ({"group_by": "site"}, "one bandit per group"),
                           ({"baseline": 1.5}, "within")):
        with pytest.raises(ValueError, match=message):
            ExperimentSpec.model_validate({**base, **extra})


def test_plan_from_mde_and_detectable_effect_from_min_samples() -> None:
    """--mde gives the power calculation's sample size; --min-samples alone the effect it can
    detect (the two are inverse of each other)."""
    spec = ExperimentSpec(id="e", model="m", arms={"a": 1, "b": 1}, mde=0.05, baseline=0.5)
    assert plan(spec).samples_per_arm == samples_per_arm(0.5, 0.05) == 1565
    three = ExperimentSpec(id="e", model="m", arms={"a": 1, "b": 1, "c": 1}, mde=0.05)
    assert plan(three).samples_per_arm == samples_per_arm(0.5, 0.05, alpha=0.025)  # Bonferroni
    inverse = plan(ExperimentSpec(id="e", model="m", arms={"a": 1, "b": 1}, min_samples=1565))
    assert inverse.mde is not None and abs(inverse.mde - 0.05) < 0.001


# -- A/B statistics on seeded synthetic feedback ------------------------------------------------------

def _binary_arm(rng: np.random.Generator, rate: float, n: int) -> ArmData:
    wins = float(rng.binomial(n, rate))
    return ArmData(requests=n, feedback=n, rewarded=n, reward_sum=wins, reward_sumsq=wins)


def _ab(arms: dict[str, float], mde: float, alpha: float = 0.05) -> ExperimentSpec:
    return ExperimentSpec(id="e", model="m", arms=dict.fromkeys(arms, 1.0), mde=mde,
                          alpha=alpha, min_samples=plan(ExperimentSpec(
                              id="e", model="m", arms=dict.fromkeys(arms, 1.0), mde=mde,
                              alpha=alpha)).samples_per_arm or 1)


def test_identical_arms_declare_no_winner_beyond_alpha() -> None:
    """Over 2,000 seeded A/A tests (two arms) and 1,000 A/A/A tests (three arms, Bonferroni),
    a winner is declared in about alpha = 5% of them or fewer."""
    rng = np.random.default_rng(21)
    spec = _ab({"a": 0.5, "b": 0.5}, mde=0.05)
    n = spec.min_samples
    winners = sum(ab_decision(spec, {"a": _binary_arm(rng, 0.5, n),
                                     "b": _binary_arm(rng, 0.5, n)})[0] is not None
                  for _ in range(2000))
    assert 0.03 <= winners / 2000 <= 0.07
    three = _ab({"a": 0.3, "b": 0.3, "c": 0.3}, mde=0.1)
    winners = sum(ab_decision(three, {v: _binary_arm(rng, 0.3, three.min_samples)
                                      for v in "abc"})[0] is not None for _ in range(1000))
    assert winners / 1000 <= 0.07


def test_known_difference_is_found_at_the_planned_sample_size() -> None:
    """A real 5-point lift is declared (for the right arm) in about 80% of tests at the planned
    n (the power asked for), and far less often with a quarter of it."""
    rng = np.random.default_rng(22)
    spec = _ab({"a": 0.5, "b": 0.55}, mde=0.05)
    n = spec.min_samples

    def found(samples: int) -> float:
        hits = [ab_decision(spec, {"a": _binary_arm(rng, 0.50, samples),
                                   "b": _binary_arm(rng, 0.55, samples)})[0] for _ in range(800)]
        assert hits.count("a") <= 2  # the worse arm (the control) practically never wins
        return hits.count("b") / len(hits)

    assert 0.74 <= found(n) <= 0.87
    assert found(n // 4) <= 0.4


def _latency_arm(rng: np.random.Generator, scale_ms: float, n: int) -> ArmData:
    hist = LatencyHistogram()
    for value in rng.lognormal(np.log(scale_ms), 0.3, n):
        hist.add(float(value))
    return ArmData(requests=n, latency=hist)


def test_p95_comparison_finds_the_faster_arm_and_not_noise() -> None:
    """p95_ms: a 30% slower treatment makes the control win, a faster one wins itself, and
    identical arms almost never produce a winner (non-overlapping intervals are conservative)."""
    rng = np.random.default_rng(23)
    spec = ExperimentSpec(id="e", model="m", arms={"a": 1, "b": 1}, metric="p95_ms",
                          binary=False, min_samples=2000)
    slower = ab_decision(spec, {"a": _latency_arm(rng, 10, 2000), "b": _latency_arm(rng, 13, 2000)})
    faster = ab_decision(spec, {"a": _latency_arm(rng, 10, 2000), "b": _latency_arm(rng, 7, 2000)})
    assert slower[0] == "a" and faster[0] == "b", (slower[1], faster[1])
    noise = sum(ab_decision(spec, {"a": _latency_arm(rng, 10, 2000),
                                   "b": _latency_arm(rng, 10, 2000)})[0] is not None
                for _ in range(150))
    assert noise / 150 <= 0.05


def test_inconsistent_feedback_is_named() -> None:
    """Feedback sums that cannot be right are rejected with the reason."""
    assert check_feedback({"count": 3, "reward_sum": 2.0, "reward_sumsq": 2.0}, True) is None
    assert "not 0/1" in str(check_feedback({"count": 2, "reward_sum": 5.0,
                                            "reward_sumsq": 25.0}, True))
    assert "inconsistent" in str(check_feedback({"count": 2, "labeled": 3, "correct": 1}, True))
    assert check_feedback({"count": 2, "reward_sum": 5.0, "reward_sumsq": 25.0}, False) is None


# -- the controller over a real store -----------------------------------------------------------------

@dataclass
class Env:
    store: Store
    artifacts: ArtifactStore
    controller: ExperimentController
    repo: Experiments
    seq: itertools.count[int]

    def desired_traffic(self, device: str) -> dict[str, float]:
        desired = DesiredStates(self.store, self.artifacts, "http://127.0.0.1:1").get(device)
        model = desired.models.get("toy") if desired is not None else None
        return dict(model.traffic) if model is not None else {}

    def report_split(self, arms: list[str]) -> None:
        """Every device reports (as its ``reported`` message would) the split applied."""
        now = time.time()
        with self.store.write() as conn:
            conn.execute(sa.delete(device_models).where(device_models.c.model == "toy"))
            conn.execute(sa.insert(device_models), [
                {"device_id": f"d{i}", "model": "toy", "active": arms[0], "state": "committed",
                 "traffic": json.dumps(dict.fromkeys(arms, 1.0)), "updated": now}
                for i in range(DEVICES)])

    def feed(self, device: str, version: str, n: int, wins: int, **extra: Any) -> None:
        """One window of ``device`` answered by ``version`` carrying ``n`` rewards."""
        now = time.time()
        feedback = {"count": n, "rewarded": n, "reward_sum": float(wins),
                    "reward_sumsq": float(wins), **extra}
        window = Window(seq=next(self.seq), start=now, end=now + 1, model="toy",
                        version=version, requests=n, feedback=feedback)  # type: ignore[arg-type]
        with self.store.write() as conn:
            store_windows(self.store, conn, [window_row(device, window, now)], now)


@pytest.fixture(params=["sqlite", "postgresql"])
def env(request: pytest.FixtureRequest, tmp_path: Path, keypair: KeyPair) -> Iterator[Env]:
    url = (f"sqlite:///{tmp_path}/fleet.db" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    store = Store.open(url, fleet="exp")
    artifacts = ArtifactStore(tmp_path / "artifacts", keypair.trust)
    for release, version in enumerate(("1.0.0", "2.0.0", "3.0.0"), start=1):
        pkg = tmp_path / f"toy-{version}.edgepkg"
        write_test_package(pkg, keypair, manifest=make_manifest(version=version, release=release))
        artifacts.publish(pkg)
    with store.write() as conn:
        for i in range(DEVICES):
            apply_status(store, conn, Status(device_id=f"d{i}", state="online",
                                             profile="generic-cpu", models={"toy": "1.0.0"},
                                             labels={"site": f"s{i % 2}"}), time.time())
        apply_status(store, conn, Status(device_id="other", state="online",
                                         models={"cam": "1.0.0"}), time.time())
    controller = ExperimentController(store, artifacts, "http://127.0.0.1:1", "exp", seed=5)
    try:
        yield Env(store, artifacts, controller, Experiments(store), itertools.count(1))
    finally:
        store.close()


def test_ab_split_is_pushed_decided_once_and_the_winner_promoted(env: Env) -> None:
    """Devices running the model get the split (others nothing) and count once they report it
    applied; at the horizon the test runs once; stop --promote clears the split and hands the
    winner to the rollout engine."""
    record = env.repo.create({"model": "toy", "arms": {"1.0.0": 50, "2.0.0": 50},
                              "min_samples": 200})
    assert env.controller.tick() == DEVICES
    assert env.desired_traffic("d0") == {"1.0.0": 0.5, "2.0.0": 0.5}
    assert env.desired_traffic("other") == {}
    assert env.controller.tick() == 0  # in line already: nothing rewritten
    env.feed("d0", "1.0.0", 100, 50)  # served before d0 routed by the split: not counted
    env.report_split(["1.0.0", "2.0.0"])
    env.controller.tick()
    assert set(env.repo.get(record.id).state.joined) == {f"d{i}" for i in range(DEVICES)}
    for i in range(DEVICES):
        env.feed(f"d{i}", "1.0.0", 40, 20)
        env.feed(f"d{i}", "2.0.0", 40, 30)
    env.controller.tick()
    state = env.repo.get(record.id).state
    assert state.phase == "decided" and state.decision is not None
    assert state.decision.winner == "2.0.0" and state.decision.samples == {"1.0.0": 240,
                                                                           "2.0.0": 240}
    for i in range(DEVICES):  # later evidence changes nothing: the horizon has passed
        env.feed(f"d{i}", "1.0.0", 100, 100)
    env.controller.tick()
    report = env.repo.get(record.id).state.report
    assert report is not None and report["winner"] == "2.0.0"
    assert {"id", "state", "kind", "model", "metric", "result", "arms"} <= set(report)
    arm = report["arms"][1]
    assert arm["version"] == "2.0.0" and arm["weight"] == 0.5 and len(arm["ci"]) == 2
    env.repo.request_stop(record.id, promote=True, reason="done",
                          rollout={"stages": [100], "soak_seconds": 0})
    env.controller.tick()
    final = env.repo.get(record.id)
    assert final.state.phase == "stopped" and final.stop_request is None
    assert final.state.rollout is not None and "promoting 2.0.0" in str(final.state.reason)
    assert Rollouts(env.store).get(final.state.rollout).spec.version == "2.0.0"
    assert all(env.desired_traffic(f"d{i}") == {} for i in range(DEVICES))


def test_bandit_pushes_at_a_bounded_rate(env: Env) -> None:
    """Thompson weights move toward the better arm, but at most once per push interval."""
    record = env.repo.create({"model": "toy", "kind": "bandit", "arms": {"1.0.0": 1, "2.0.0": 1},
                              "push_every_s": 10, "floor": 0.05, "min_samples": 100})
    env.report_split(["1.0.0", "2.0.0"])
    t0 = time.time()
    env.controller.tick(t0)
    assert env.repo.get(record.id).state.pushes == 1
    for i in range(DEVICES):
        env.feed(f"d{i}", "1.0.0", 30, 10)
        env.feed(f"d{i}", "2.0.0", 30, 25)
    assert env.controller.tick(t0 + 1) == 0
    assert env.repo.get(record.id).state.pushes == 1
    assert env.controller.tick(t0 + 11) == DEVICES
    state = env.repo.get(record.id).state
    assert state.pushes == 2 and state.weights["*"]["2.0.0"] == pytest.approx(0.95, abs=0.01)
    assert env.desired_traffic("d3") == state.weights["*"]
    report = status(env.store, env.repo.get(record.id))
    # equal samples so far: the regret is what a uniform split loses, 180 x (25/30 - 10/30)
    assert report["winner"] == "2.0.0" and report["regret"] == pytest.approx(90.0)
    assert report["uniform_regret"] == pytest.approx(90.0)


def test_bandit_per_group_learns_each_group(env: Env) -> None:
    """group_by=site: each site gets its own weights, and each device carries its site's."""
    record = env.repo.create({"model": "toy", "kind": "bandit", "group_by": "site",
                              "arms": {"1.0.0": 1, "2.0.0": 1}, "push_every_s": 1})
    env.report_split(["1.0.0", "2.0.0"])
    t0 = time.time()
    env.controller.tick(t0)
    for i in range(DEVICES):
        good, bad = ("1.0.0", "2.0.0") if i % 2 == 0 else ("2.0.0", "1.0.0")
        env.feed(f"d{i}", good, 60, 50)
        env.feed(f"d{i}", bad, 60, 15)
    env.controller.tick(t0 + 2)
    weights = env.repo.get(record.id).state.weights
    assert weights["s0"]["1.0.0"] > 0.9 and weights["s1"]["2.0.0"] > 0.9
    assert env.desired_traffic("d0") == weights["s0"] and env.desired_traffic("d1") == weights["s1"]
    groups = status(env.store, env.repo.get(record.id))["groups"]
    assert [g["group"] for g in groups] == ["s0", "s1"]


def test_malformed_feedback_windows_are_left_out_and_reported(env: Env) -> None:
    """A window claiming 5 successes out of 2 binary rewards is not counted, and is named."""
    record = env.repo.create({"model": "toy", "arms": {"1.0.0": 1, "2.0.0": 1}})
    env.report_split(["1.0.0", "2.0.0"])
    env.controller.tick()
    env.feed("d0", "1.0.0", 10, 5)
    env.feed("d1", "2.0.0", 2, 5)
    report = status(env.store, env.repo.get(record.id))
    assert [a["n"] for a in report["arms"]] == [10, 0]
    assert report["rejected"]["windows"] == 1 and "d1 2.0.0" in report["rejected"]["reason"]


def test_one_experiment_per_model_and_none_during_a_rollout(env: Env) -> None:
    """A second experiment on the model, or one during its rollout, is refused."""
    first = env.repo.create({"model": "toy", "arms": {"1.0.0": 1, "2.0.0": 1}})
    with pytest.raises(ConfigError, match="already has experiment"):
        env.repo.create({"model": "toy", "arms": {"1.0.0": 1, "3.0.0": 1}})
    env.repo.request_stop(first.id)
    env.controller.tick()
    Rollouts(env.store).create({"model": "toy", "version": "3.0.0"})
    with pytest.raises(ConfigError, match="has rollout"):
        env.repo.create({"model": "toy", "arms": {"1.0.0": 1, "3.0.0": 1}})
    with pytest.raises(ConfigError, match="min_samples"):
        env.repo.create({"model": "cam", "arms": {"1.0.0": 1, "3.0.0": 1}, "min_samples": 0})


def test_stop_promote_without_a_winner_promotes_nothing(env: Env) -> None:
    """A stop asking for promotion before any decision stops, and says why nothing rolled out."""
    record = env.repo.create({"model": "toy", "arms": {"1.0.0": 1, "2.0.0": 1}})
    env.controller.tick()
    env.repo.request_stop(record.id, promote=True)
    env.controller.tick()
    final = env.repo.get(record.id).state
    assert final.phase == "stopped" and final.rollout is None
    assert "nothing promoted" in str(final.reason) and "horizon" in str(final.reason)
    assert json.loads(json.dumps(final.report))["state"] == "stopped"


def test_no_pushes_while_a_rollout_of_the_model_runs(env: Env) -> None:
    """A rollout created by hand during an experiment owns the model's desired state: the
    experiment writes nothing (and says why) until it ends, then restores the split."""
    record = env.repo.create({"model": "toy", "arms": {"1.0.0": 1, "2.0.0": 1}})
    env.controller.tick()
    rollouts = Rollouts(env.store)
    rollout = rollouts.create({"model": "toy", "version": "3.0.0", "stages": [100]})
    DesiredStates(env.store, env.artifacts, "http://127.0.0.1:1").set_model("d0", "toy", "3.0.0")
    assert env.controller.tick() == 0 and env.desired_traffic("d0") == {}
    report = env.repo.get(record.id).state.report
    assert report is not None and rollout.id in str(report["blocked"])
    assert "not pushing" in report["result"]
    rollouts.save(rollout, rollout.state.model_copy(update={"phase": "completed"}), time.time())
    assert env.controller.tick() == 1 and env.desired_traffic("d0") == {"1.0.0": 0.5,
                                                                       "2.0.0": 0.5}


def _summary(evidence: Collected) -> dict[str, Any]:
    return {"rejected": evidence.rejected, "groups": {
        group: {version: (a.requests, a.errors, a.feedback, a.rewarded, round(a.reward_sum, 9),
                          a.correct, a.labeled, a.latency.count)
                for version, a in arms.items()}
        for group, arms in evidence.groups.items()}}


def test_incremental_evidence_matches_a_full_read_at_every_step(env: Env) -> None:
    """The controller's :class:`Evidence` reads only what arrived since its previous update;
    through joins, rejoins at a later time, devices leaving the scope, windows from before a
    join, windows stored before the controller saw the device join, duplicates, windows
    stamped a little earlier than ones already read, rejected feedback and versions outside
    the experiment, it agrees with a full :func:`collect` after every step."""
    spec = ExperimentSpec.model_validate({"id": "inc", "model": "toy", "kind": "ab",
                                          "arms": {"1.0.0": 50, "2.0.0": 50},
                                          "metric": "p95_ms", "binary": False,
                                          "min_samples": 10})
    rng = np.random.default_rng(11)
    devices = [f"d{i}" for i in range(DEVICES)]
    groups = {d: f"s{i % 2}" for i, d in enumerate(devices)}
    starts: dict[str, float] = {}
    seqs = dict.fromkeys(devices, 0)
    stored: list[tuple[str, int]] = []
    clock = [1_000.0]
    evidence = Evidence(spec, clock=lambda: clock[0])
    hist = LatencyHistogram()
    for k in range(20):
        hist.add(1.0 + k / 4)

    def insert(device: str, seq: int, start: float, received: float, **extra: Any) -> None:
        feedback = {"count": 4, "rewarded": 4, "reward_sum": 1.5, "reward_sumsq": 1.0,
                    "labeled": 2, "correct": 1, **extra}
        window = Window(seq=seq, start=start, end=start + 1, model="toy",
                        version=str(rng.choice(["1.0.0", "2.0.0", "3.0.0"])), requests=5,
                        errors=int(rng.integers(0, 2)), feedback=feedback,  # type: ignore[arg-type]
                        latency=hist.to_data())
        with env.store.write() as conn:
            store_windows(env.store, conn, [window_row(device, window, received)], received)
        stored.append((device, seq))

    checked = rejected = counted = 0
    for step in range(160):
        clock[0] += 1.0
        now = clock[0]
        device = devices[int(rng.integers(len(devices)))]
        roll = rng.random()
        if roll < 0.55:  # a new window, from now or from before the device joined
            seqs[device] += 1
            start = now - float(rng.choice([0.0, 0.0, 30.0]))
            extra = {"labeled": 9} if rng.random() < 0.05 else {}  # labeled > count: rejected
            insert(device, seqs[device], start, now, **extra)
        elif roll < 0.65 and stored:  # the same window again (a retransmission): ignored
            dev, seq = stored[int(rng.integers(len(stored)))]
            insert(dev, seq, now, now)
        elif roll < 0.75:  # stamped earlier than windows already read (a slow transaction)
            seqs[device] += 1
            insert(device, seqs[device], now, now - 60.0)
        elif roll < 0.88:  # the device joins, or rejoins later
            starts[device] = now - float(rng.choice([0.0, 40.0]))
        elif roll < 0.94:  # the device leaves the scope, or comes back into it
            if device in groups:
                del groups[device]
            else:
                groups[device] = "s0"
        elif device in starts:  # the split is removed from the device: it has not joined
            del starts[device]
        if step % 3 == 0 or step > 150:
            full = collect(env.store, spec, starts, groups)
            assert _summary(evidence.update(env.store, starts, groups)) == _summary(full), step
            checked += 1
            rejected = max(rejected, full.rejected)
            counted = max(counted, sum(a.requests for g in full.groups.values()
                                       for a in g.values()))
    assert checked > 50 and rejected > 0 and counted > 20, (checked, rejected, counted)

