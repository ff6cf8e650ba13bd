"""Fleet housekeeping through the real CLI and the HTTP API, on SQLite and PostgreSQL stores and
the real broker: published packages and who uses them, unpublishing, removing a (ghost)
device with its retained messages, the fleet's event log, and a rollout's history in
``rollout status --json``."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from edgeserve.cli import main
from edgeserve.contract import (
    ModelReport,
    Reported,
    Status,
    TelemetryBatch,
    Window,
    device_topic,
    encode,
    fleet_filter,
)
from edgeserve.errors import AuthError, PackageError
from edgeserve.fleet.artifacts import ArtifactStore
from edgeserve.fleet.desired import DesiredStates
from edgeserve.fleet.ingest import Ingestor
from edgeserve.fleet.registry import get_device
from edgeserve.fleet.rollouts.repo import Rollouts
from edgeserve.fleet.store import Store
from edgeserve.fleet.tables import desired_state, device_models, windows
from edgeserve.fleet.web.app import create_app
from edgeserve.fleet.web.server import ServerHandle, start_server
from edgeserve.mqtt import BrokerSettings
from edgeserve.testing import KeyPair, make_manifest, write_test_package
from tests.services import retained_messages

AUTH = ("admin", "s3cret")
JSON = {"Content-Type": "application/json"}


class PasswordAuth:
    """A real (if minimal) basic-auth checker for the API tests."""

    def check(self, authorization: str | None) -> str:
        if authorization != "Basic " + base64.b64encode(b"admin:s3cret").decode():
            raise AuthError("missing or wrong credentials")
        return "admin"

    def challenge(self) -> str:
        return 'Basic realm="edgeserve"'


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fleet store URL: a SQLite file, or a fresh schema on the real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/fleet.db"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def store(db: str, fleet_name: str) -> Iterator[Store]:
    with Store.open(db, fleet=fleet_name) as opened:
        yield opened


def _package(tmp_path: Path, keypair: KeyPair, version: str, release: int,
             **extra: Any) -> Path:
    out = tmp_path / f"toy-{version}.edgepkg"
    write_test_package(out, keypair, manifest=make_manifest(version=version, release=release,
                                                            **extra))
    return out


@pytest.fixture
def published(tmp_path: Path, keypair: KeyPair, capsys: pytest.CaptureFixture[str]) -> Path:
    """An artifact store with toy 1.0.0, 1.1.0 and 2.0.0, published through the CLI."""
    artifacts = tmp_path / "artifacts"
    for version, release in (("1.0.0", 1), ("1.1.0", 2), ("2.0.0", 3)):
        code, _, err = _run(capsys, "fleet", "publish", str(_package(tmp_path, keypair, version,
                                                                     release)),
                            "--artifacts", str(artifacts), "--trusted-key",
                            str(keypair.public_path))
        assert code == 0, err
    return artifacts


def test_publish_warns_when_the_interface_changes(tmp_path: Path, keypair: KeyPair,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Publishing a version whose inputs or outputs differ from the newest published one warns
    on stderr, naming each change (a renamed dynamic axis is not one); --json carries them."""
    common = ["--artifacts", str(tmp_path / "artifacts"), "--trusted-key",
              str(keypair.public_path)]
    code, _, err = _run(capsys, "fleet", "publish", str(_package(tmp_path, keypair, "1.0.0", 1)),
                        *common)
    assert code == 0 and "warning" not in err
    same = _package(tmp_path, keypair, "1.1.0", 2,
                    inputs=[{"name": "x", "dtype": "float32", "shape": ["N", 4]}])
    code, _, err = _run(capsys, "fleet", "publish", str(same), *common)
    assert code == 0 and "warning" not in err
    changed = _package(tmp_path, keypair, "2.0.0", 3,
                       inputs=[{"name": "x", "dtype": "float16", "shape": ["batch", 8]}],
                       outputs=[{"name": "probs", "dtype": "float32", "shape": ["batch", 3]}])
    code, out, err = _run(capsys, "fleet", "publish", str(changed), *common, "--json")
    assert code == 0, err
    changes = json.loads(out)["interface_changes"]
    assert changes == ["input 'x' dtype float32 -> float16 (compared with 1.1.0)",
                       "input 'x' shape ['N', 4] -> ['batch', 8] (compared with 1.1.0)",
                       "output 'y' is gone (compared with 1.1.0)",
                       "output 'probs' is new (compared with 1.1.0)"]
    assert err.count("warning:") == 4 and "changes the model's interface" in err


def test_packages_and_unpublish_refuse_what_is_in_use(
        tmp_path: Path, published: Path, store: Store, db: str, keypair: KeyPair,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``fleet packages`` shows who uses each version; ``fleet unpublish`` refuses a version a
    running rollout or a device's desired state uses (exit 2, naming them), removes an unused
    one, and the removed version's release stays taken."""
    artifacts = ArtifactStore(published, keypair.trust)
    DesiredStates(store, artifacts, "http://fleet").set_model("d1", "toy", "1.0.0")
    rollout = Rollouts(store).create({"model": "toy", "version": "2.0.0", "stages": [100]})
    common = ["--artifacts", str(published), "--db", db]
    code, out, _ = _run(capsys, "fleet", "packages", *common, "--json")
    rows = {r["version"]: r for r in json.loads(out)}
    assert code == 0 and list(rows) == ["1.0.0", "1.1.0", "2.0.0"]
    assert rows["1.0.0"]["devices"] == ["d1"] and rows["1.0.0"]["in_use"]
    assert rows["2.0.0"]["rollouts"] == [f"{rollout.id} (running)"]
    assert not rows["1.1.0"]["in_use"] and rows["1.1.0"]["published_at"] > 0

    code, _, err = _run(capsys, "fleet", "unpublish", "toy", "1.0.0", *common)
    assert code == 2 and "d1" in err and "desired state" in err and "Traceback" not in err
    code, _, err = _run(capsys, "fleet", "unpublish", "toy", "2.0.0", *common)
    assert code == 2 and rollout.id in err
    code, out, err = _run(capsys, "fleet", "unpublish", "toy", "1.1.0", *common, "--json")
    assert code == 0 and json.loads(out)["version"] == "1.1.0", err
    code, out, _ = _run(capsys, "fleet", "packages", *common, "--json")
    assert [r["version"] for r in json.loads(out)] == ["1.0.0", "2.0.0"]
    code, out, _ = _run(capsys, "fleet", "packages", *common)
    assert code == 0 and "1 device(s)" in out and f"{rollout.id} (running)" in out
    code, _, err = _run(capsys, "fleet", "unpublish", "toy", "1.1.0", *common)
    assert code == 6 and "not published" in err

    # the very same package may come back
    code, _, err = _run(capsys, "fleet", "publish", str(tmp_path / "toy-1.1.0.edgepkg"),
                        "--artifacts", str(published), "--trusted-key",
                        str(keypair.public_path))
    assert code == 0, err


def test_an_unpublished_release_stays_taken(tmp_path: Path, keypair: KeyPair) -> None:
    """After the newest version is unpublished, a new package must still have a higher release
    than it had (devices that installed it refuse lower ones), and its version can only return
    with the same manifest."""
    store = ArtifactStore(tmp_path / "artifacts", keypair.trust)
    store.publish(_package(tmp_path, keypair, "1.0.0", 1))
    store.publish(_package(tmp_path, keypair, "2.0.0", 5))
    store.unpublish("toy", "2.0.0")
    assert [v.version for v in store.versions("toy")] == ["1.0.0"]
    (tmp_path / "b").mkdir()
    with pytest.raises(PackageError, match="2.0.0 was already published with release 5"):
        store.publish(_package(tmp_path / "b", keypair, "3.0.0", 4))
    with pytest.raises(PackageError, match="different manifest and unpublished"):
        store.publish(_package(tmp_path / "b", keypair, "2.0.0", 6))
    assert store.publish(_package(tmp_path / "b", keypair, "3.0.0", 6)).release == 6
    assert store.publish(tmp_path / "toy-2.0.0.edgepkg").version == "2.0.0"


@pytest.fixture
def api(tmp_path: Path, keypair: KeyPair, fleet_name: str,
        mqtt_broker: tuple[str, int]) -> Iterator[tuple[ServerHandle, Store, ArtifactStore]]:
    """The fleet's HTTP app with auth, a SQLite store, toy 1.0.0/1.1.0/2.0.0 published and
    the real broker."""
    store = Store.open(f"sqlite:///{tmp_path}/api.db", fleet=fleet_name)
    artifacts = ArtifactStore(tmp_path / "api-artifacts", keypair.trust)
    for version, release in (("1.0.0", 1), ("1.1.0", 2), ("2.0.0", 3)):
        artifacts.publish(_package(tmp_path, keypair, version, release))
    app = create_app(store, artifacts, authenticator=PasswordAuth(),
                     broker=BrokerSettings(host=mqtt_broker[0], port=mqtt_broker[1]),
                     fleet=fleet_name)
    handle = start_server(app)
    try:
        yield handle, store, artifacts
    finally:
        handle.stop()
        store.close()


def test_api_lists_and_unpublishes_with_auth_and_json(
        api: tuple[ServerHandle, Store, ArtifactStore]) -> None:
    """The API lists packages, refuses an unpublish without credentials (401) or without a
    JSON content type (415), answers 409 naming the user for a version in use, and removes an
    unused one."""
    server, store, artifacts = api
    DesiredStates(store, artifacts, "http://fleet").set_model("d7", "toy", "2.0.0")
    listed = requests.get(f"{server.url}/api/v1/packages", auth=AUTH, timeout=10).json()
    assert [(r["version"], r["devices"]) for r in listed] == [("1.0.0", []), ("1.1.0", []),
                                                              ("2.0.0", ["d7"])]
    url = f"{server.url}/api/v1/packages/toy/1.0.0"
    assert requests.delete(url, headers=JSON, timeout=10).status_code == 401
    plain = requests.delete(url, auth=AUTH, timeout=10)
    assert plain.status_code == 415 and "application/json" in plain.json()["error"]
    busy = requests.delete(f"{server.url}/api/v1/packages/toy/2.0.0", auth=AUTH, headers=JSON,
                           timeout=10)
    assert busy.status_code == 409 and "d7" in busy.json()["error"]
    done = requests.delete(url, auth=AUTH, headers=JSON, timeout=10)
    assert done.status_code == 200 and done.json()["unpublished"] is True
    assert [v.version for v in artifacts.versions("toy")] == ["1.1.0", "2.0.0"]
    assert requests.get(f"{server.url}/v1/packages/toy/1.0.0/manifest.json",
                        timeout=10).status_code == 404
    missing = requests.delete(url, auth=AUTH, headers=JSON, timeout=10)
    assert missing.status_code == 404


def _retained(host: str, port: int, fleet: str) -> set[str]:
    """Topics holding a retained message under ``fleet``'s devices."""
    root = fleet_filter(fleet, "+").split("/devices/")[0]
    return set(retained_messages(host, port, f"{root}/devices/#"))


def _leave_device(store: Store, broker: tuple[str, int], fleet: str, artifacts: ArtifactStore,
                  device: str, state: str) -> None:
    """What an agent leaves behind: retained status and report, desired state, a registry row,
    a report row and telemetry windows."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    status = Status(device_id=device, state=state, profile="generic-cpu")  # type: ignore[arg-type]
    reported = Reported(device_id=device, revision=1,
                        models={"toy": ModelReport(active="1.0.0", state="committed")})
    ingest = Ingestor(store, fleet)
    parsed = [ingest.parse(device_topic(fleet, device, "status"), encode(status)),
              ingest.parse(device_topic(fleet, device, "telemetry"), encode(TelemetryBatch(
                  device_id=device, windows=[Window(seq=1, start=1.0, end=61.0, model="toy",
                                                    version="1.0.0", requests=3, errors=0)])))]
    ingest.commit([p for p in parsed if p is not None])
    DesiredStates(store, artifacts, "http://fleet").set_model(device, "toy", "1.0.0")
    with store.write() as conn:
        conn.execute(device_models.insert().values(device_id=device, model="toy",
                                                   active="1.0.0", state="committed",
                                                   updated=time.time()))
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(*broker)
    client.loop_start()
    try:
        for kind, payload in (("status", encode(status)), ("reported", encode(reported)),
                              ("desired", b'{"v": 1}')):
            client.publish(device_topic(fleet, device, kind), payload, qos=1,
                           retain=True).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def _rows(store: Store, device: str) -> dict[str, int]:
    with store.read() as conn:
        return {t.name: len(conn.execute(t.select().where(t.c.device_id == device)).all())
                for t in (desired_state, device_models, windows)}


def test_device_remove_clears_retained_messages_and_rows(
        published: Path, store: Store, db: str, keypair: KeyPair, fleet_name: str,
        mqtt_broker: tuple[str, int], capsys: pytest.CaptureFixture[str]) -> None:
    """``fleet device remove`` clears a ghost device's retained status/reported/desired and
    every row about it, leaving other devices alone; an online device needs --force."""
    artifacts = ArtifactStore(published, keypair.trust)
    _leave_device(store, mqtt_broker, fleet_name, artifacts, "ghost", "offline")
    _leave_device(store, mqtt_broker, fleet_name, artifacts, "alive", "online")
    assert {t.rsplit("/", 2)[-2] for t in _retained(*mqtt_broker, fleet_name)} == {"ghost",
                                                                                     "alive"}
    broker = ["--broker", f"mqtt://{mqtt_broker[0]}:{mqtt_broker[1]}", "--db", db]
    code, out, err = _run(capsys, "fleet", "device", "remove", "ghost", *broker, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert sorted(t.rsplit("/", 1)[-1] for t in result["cleared_topics"]) == [
        "desired", "reported", "status"]
    assert result["deleted_rows"] == {"desired_state": 1, "device_models": 1, "windows": 1,
                                      "devices": 1}
    assert get_device(store, "ghost") is None and set(_rows(store, "ghost").values()) == {0}
    assert all("/ghost/" not in t for t in _retained(*mqtt_broker, fleet_name))
    assert get_device(store, "alive") is not None

    code, _, err = _run(capsys, "fleet", "device", "remove", "alive", *broker)
    assert code == 2 and "online" in err and "--force" in err
    code, _, err = _run(capsys, "fleet", "device", "remove", "nobody", *broker)
    assert code == 6 and "fleet devices" in err
    code, out, err = _run(capsys, "fleet", "device", "remove", "alive", *broker, "--force")
    assert code == 0 and "removed device alive" in out, err
    assert _retained(*mqtt_broker, fleet_name) == set()


def test_api_removes_a_device(api: tuple[ServerHandle, Store, ArtifactStore],
                              fleet_name: str, mqtt_broker: tuple[str, int]) -> None:
    """DELETE /api/v1/devices/{id} removes an offline device (409 for an online one unless
    ?force=1) and clears its retained messages through the fleet's broker."""
    server, store, artifacts = api
    _leave_device(store, mqtt_broker, fleet_name, artifacts, "cam-9", "online")
    url = f"{server.url}/api/v1/devices/cam-9"
    busy = requests.delete(url, auth=AUTH, headers=JSON, timeout=10)
    assert busy.status_code == 409 and "online" in busy.json()["error"]
    done = requests.delete(url + "?force=1", auth=AUTH, headers=JSON, timeout=30)
    assert done.status_code == 200, done.text
    assert done.json()["deleted_rows"]["devices"] == 1
    assert get_device(store, "cam-9") is None
    assert _retained(*mqtt_broker, fleet_name) == set()


def test_events_and_rollout_history(store: Store, db: str, published: Path, keypair: KeyPair,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """``fleet events`` merges rollout milestones with how devices' updates ended, without the
    periodic gate rows unless asked; ``rollout status --json`` keeps every milestone of a long
    rollout, not only its last 50 gate evaluations."""
    repo = Rollouts(store)
    record = repo.create({"model": "toy", "version": "2.0.0", "stages": [50, 100]}, now=1000.0)
    repo.add_event(record.id, 1001.0, 0, "assigned", "1 device(s)", {})
    for i in range(120):
        repo.add_event(record.id, 1002.0 + i, 0, "gates", "", {"gates": []})
    repo.add_event(record.id, 1200.0, 1, "stage", "stage 2/2", {})
    repo.add_event(record.id, 1300.0, 1, "completed", "all stages done", {})
    with store.write() as conn:
        conn.execute(device_models.insert().values(
            device_id="d2", model="toy", active="1.0.0", target="2.0.0", state="rolled-back",
            error_message="error rate 0.3 > 0.01", error_version="2.0.0", updated=1250.0))
        conn.execute(device_models.insert().values(device_id="d3", model="toy", active="2.0.0",
                                                   state="committed", updated=1260.0))

    code, out, err = _run(capsys, "fleet", "events", "--db", db, "--json")
    events = json.loads(out)
    assert code == 0, err
    assert [(e["source"], e["event"]) for e in events] == [
        ("rollout", "created"), ("rollout", "assigned"), ("rollout", "stage"),
        ("device", "rolled-back"), ("device", "committed"), ("rollout", "completed")]
    failed = events[3]
    assert (failed["device"], failed["version"], failed["detail"]) == (
        "d2", "2.0.0", "error rate 0.3 > 0.01")
    assert all(e["model"] == "toy" for e in events)
    code, out, _ = _run(capsys, "fleet", "events", "--db", db, "--json", "--gates", "--limit",
                        "1000")
    assert sum(e["event"] == "gates" for e in json.loads(out)) == 120
    code, out, _ = _run(capsys, "fleet", "events", "--db", db, "--json", "--device", "d3")
    assert [e["event"] for e in json.loads(out)] == ["committed"]
    code, out, _ = _run(capsys, "fleet", "events", "--db", db)
    assert code == 0 and "rolled-back" in out and "error rate 0.3" in out

    code, out, err = _run(capsys, "fleet", "rollout", "status", record.id, "--db", db, "--json")
    assert code == 0, err
    (status,) = json.loads(out)
    kinds = [e["event"] for e in status["events"]]
    assert kinds[:2] == ["created", "assigned"] and kinds[-1] == "completed"
    assert "stage" in kinds and kinds.count("gates") == 50
