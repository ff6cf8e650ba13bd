"""`edgeserve fleet experiment create|status|list|stop`: plans, tables, JSON and clear errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeserve.cli import cli, main
from edgeserve.contract import Status
from edgeserve.fleet.artifacts import ArtifactStore
from edgeserve.fleet.experiments import Experiments, samples_per_arm
from edgeserve.fleet.registry import apply_status
from edgeserve.fleet.store import Store
from edgeserve.testing import KeyPair, make_manifest, write_test_package


@pytest.fixture
def fleet(tmp_path: Path, keypair: KeyPair) -> tuple[str, str]:
    """A store with two devices running toy 1.0.0, and toy 1.0.0/2.0.0 published."""
    db = f"sqlite:///{tmp_path}/fleet.db"
    artifacts = ArtifactStore(tmp_path / "artifacts", keypair.trust)
    for release, version in enumerate(("1.0.0", "2.0.0"), start=1):
        pkg = tmp_path / f"toy-{version}.edgepkg"
        write_test_package(pkg, keypair, manifest=make_manifest(version=version, release=release))
        artifacts.publish(pkg)
    with Store.open(db, fleet="cli") as store, store.write() as conn:
        for device in ("d1", "d2"):
            apply_status(store, conn, Status(device_id=device, state="online",
                                             models={"toy": "1.0.0"}), time.time())
    return db, str(tmp_path / "artifacts")


def run(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def fails(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return int(exit_info.value.code or 0), capsys.readouterr().err


def test_create_plans_the_horizon_and_status_shows_it(fleet: tuple[str, str]) -> None:
    """--mde sets min-samples by the power calculation; status shows arms, weights and plan."""
    db, artifacts = fleet
    created = json.loads(run("fleet", "experiment", "create", "toy", "--arms",
                             "1.0.0:50,2.0.0:50", "--metric", "reward", "--mde", "0.05",
                             "--db", db, "--artifacts", artifacts, "--json"))
    assert created["min_samples"] == samples_per_arm(0.5, 0.05) == 1565
    assert [(a["version"], a["weight"], a["n"]) for a in created["arms"]] == [
        ("1.0.0", 0.5, 0), ("2.0.0", 0.5, 0)]
    assert created["devices"] == 2 and created["state"] == "running"
    (shown,) = json.loads(run("fleet", "experiment", "status", created["id"], "--db", db,
                              "--json"))
    assert shown["id"] == created["id"] and shown["plan"]["samples_per_arm"] == 1565
    table = run("fleet", "experiment", "status", "--db", db)
    assert "1.0.0 (control)" in table and "50.0%" in table and "1565 samples per arm" in table
    assert "no decision before" in table
    (listed,) = json.loads(run("fleet", "experiment", "list", "--db", db, "--json"))
    assert listed["arms"] == ["1.0.0", "2.0.0"] and listed["kind"] == "ab"


def test_bandit_options_are_stored(fleet: tuple[str, str]) -> None:
    """Bandit: floor, push interval, group and selectors reach the spec."""
    db, artifacts = fleet
    created = json.loads(run("fleet", "experiment", "create", "toy", "--arms", "1.0.0,2.0.0",
                             "--kind", "bandit", "--floor", "0.1", "--push-every", "30s",
                             "--group-by", "site", "--label", "site=a", "--db", db,
                             "--artifacts", artifacts, "--json"))
    with Store.open(db, migrate=False) as store:
        spec = Experiments(store).get(created["id"]).spec
    assert (spec.kind, spec.floor, spec.push_every_s, spec.group_by) == ("bandit", 0.1, 30.0,
                                                                          "site")
    assert spec.selector.labels == {"site": "a"} and created["devices"] == 0


def test_user_errors_are_one_clear_line(fleet: tuple[str, str],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Unknown versions, bad arm lists, inconsistent options and promoting without a winner
    each fail with a message naming the problem (no traceback)."""
    db, artifacts = fleet
    common = ("--db", db, "--artifacts", artifacts)
    code, err = fails(capsys, "fleet", "experiment", "create", "toy", "--arms", "1.0.0,9.9.9",
                      *common)
    assert code == 6 and "9.9.9" in err and "Traceback" not in err
    code, err = fails(capsys, "fleet", "experiment", "create", "toy", "--arms", "1.0.0:x",
                      *common)
    assert code == 2 and "not a number" in err
    code, err = fails(capsys, "fleet", "experiment", "create", "toy", "--arms", "1.0.0,2.0.0",
                      "--kind", "bandit", "--metric", "p95_ms", *common)
    assert code == 2 and "A/B" in err
    created = json.loads(run("fleet", "experiment", "create", "toy", "--arms", "1.0.0,2.0.0",
                             *common, "--json"))
    code, err = fails(capsys, "fleet", "experiment", "stop", created["id"], "--promote",
                      "--db", db)
    assert code == 2 and "no winner to promote" in err and "rollout create" in err
    code, err = fails(capsys, "fleet", "experiment", "status", "nope", "--db", db)
    assert code == 6 and "no experiment 'nope'" in err


def test_stop_is_queued_for_the_controller(fleet: tuple[str, str]) -> None:
    """stop records the request (with the promotion rollout's options) for the controller."""
    db, artifacts = fleet
    created = json.loads(run("fleet", "experiment", "create", "toy", "--arms", "1.0.0,2.0.0",
                             "--db", db, "--artifacts", artifacts, "--json"))
    answer = json.loads(run("fleet", "experiment", "stop", created["id"][:12], "--reason",
                            "enough", "--stages", "50,100", "--soak", "1m", "--db", db,
                            "--json"))
    assert answer == {"id": created["id"], "stop": True, "promote": False, "queued": True}
    with Store.open(db, migrate=False) as store:
        request = Experiments(store).get(created["id"]).stop_request
    assert request is not None and request.reason == "enough"
    assert request.rollout == {"stages": [50.0, 100.0], "soak_seconds": 60.0}
