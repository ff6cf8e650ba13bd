"""`edgeserve fleet devices` and `edgeserve fleet telemetry` read the store: tables and --json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeserve.cli import cli
from edgeserve.contract import Status, TelemetryBatch, Window, encode
from edgeserve.fleet.cli_telemetry import parse_time
from edgeserve.fleet.ingest import Ingestor
from edgeserve.fleet.store import Store

FLEET = "acme"


@pytest.fixture
def db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/fleet.db"
    with Store.open(url, fleet=FLEET) as store:
        ing = Ingestor(store, FLEET)
        status = Status(device_id="cam-1", state="online", profile="rpi5",
                        models={"det": "2.0.0"}, labels={"site": "a"})
        windows = [Window(seq=i, start=1000.0 + 60 * i, end=1060.0 + 60 * i, model="det",
                          version="2.0.0", requests=10 * i, errors=i % 2) for i in (1, 2, 3)]
        health = Window(seq=4, start=1180.0, end=1240.0, health={"cpu_load": 0.5})
        parsed = [ing.parse(f"edgeserve/v1/{FLEET}/devices/cam-1/status", encode(status)),
                  ing.parse(f"edgeserve/v1/{FLEET}/devices/cam-1/telemetry",
                            encode(TelemetryBatch(device_id="cam-1",
                                                  windows=[*windows, health])))]
        ing.commit([p for p in parsed if p is not None])
    return url


def run(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def test_devices_lists_state_profile_and_versions(db: str) -> None:
    """The registry shows online, profile, active versions, counts, as a table and as JSON."""
    (device,) = json.loads(run("fleet", "devices", "--db", db, "--json"))
    assert (device["device_id"], device["state"], device["profile"]) == ("cam-1", "online",
                                                                         "rpi5")
    assert device["models"] == {"det": "2.0.0"} and device["windows_stored"] == 4
    assert device["acked_seq"] == 4
    table = run("fleet", "devices", "--db", db)
    assert "cam-1" in table and "det=2.0.0" in table and "site=a" in table
    assert json.loads(run("fleet", "devices", "--db", db, "--state", "offline", "--json")) == []


def test_telemetry_filters_by_device_model_and_time(db: str) -> None:
    """Windows come with device, seq, model, version, requests and errors, filterable."""
    rows = json.loads(run("fleet", "telemetry", "--db", db, "--json"))
    assert [(r["seq"], r["model"], r["requests"]) for r in rows] == [
        (1, "det", 10), (2, "det", 20), (3, "det", 30), (4, None, 0)]
    rows = json.loads(run("fleet", "telemetry", "--db", db, "--model", "det", "--since",
                          "1125", "--json"))
    assert [r["seq"] for r in rows] == [2, 3]
    assert [r["seq"] for r in json.loads(run("fleet", "telemetry", "--db", db, "--health",
                                             "--json"))] == [4]
    newest = json.loads(run("fleet", "telemetry", "--db", db, "--limit", "2", "--json"))
    assert [r["seq"] for r in newest] == [3, 4]
    full = json.loads(run("fleet", "telemetry", "--db", db, "--full", "--json"))
    assert full[3]["window"]["health"]["cpu_load"] == 0.5
    table = run("fleet", "telemetry", "--db", db, "--device", "cam-1")
    assert "4 window(s)" in table and "(health)" in table


def test_times_parse_relative_iso_and_epoch() -> None:
    """--since accepts 15m/2h/7d, ISO 8601 (UTC when no zone) and epoch seconds."""
    assert parse_time("15m", now=10_000) == 9_100
    assert parse_time("2h", now=10_000) == 2_800
    assert parse_time("1970-01-01T01:00:00") == 3600
    assert parse_time("1234.5") == 1234.5


def test_bad_time_and_missing_store_are_clear_errors(db: str, tmp_path: Path) -> None:
    """A wrong --since is a usage error; a missing store says how to create one."""
    result = CliRunner().invoke(cli, ["fleet", "telemetry", "--db", db, "--since", "yesterday"])
    assert result.exit_code == 2 and "not a time" in result.output
    result = CliRunner().invoke(cli, ["fleet", "devices", "--db", f"sqlite:///{tmp_path}/x.db"])
    assert result.exit_code != 0 and "fleet serve" in str(result.exception)


@pytest.mark.parametrize("url", ["mqtt://127.0.0.1:4222", "nats://", "nats://host:port",
                                 "127.0.0.1:4222"])
def test_a_bad_nats_url_is_refused_naming_it(url: str, tmp_path: Path) -> None:
    """``fleet serve --nats`` checks every URL before it opens anything."""
    result = CliRunner().invoke(cli, ["fleet", "serve", "--fleet", "f", "--db",
                                      f"sqlite:///{tmp_path}/f.db", "--nats",
                                      f"nats://127.0.0.1:4222,{url}", "--http-port", "-1"])
    assert result.exit_code == 2, result.output
    assert f"{url!r} is not a NATS URL" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "f.db").exists()


def test_nats_without_the_cluster_s_mqtt_listener_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["fleet", "serve", "--fleet", "f", "--db",
                                      f"sqlite:///{tmp_path}/f.db", "--nats",
                                      "nats://127.0.0.1:4222", "--http-port", "-1"],
                                env={"EDGESERVE_BROKER": ""})
    assert result.exit_code == 2, result.output
    assert "give that listener as --broker" in result.output
