"""The hardened set-up, as docs/security.md describes it, against a real Mosquitto started from the
configuration 'edgeserve fleet broker-config' writes (TLS, no anonymous clients, a password per
device, an ACL on the authenticated user): one device's credentials cannot publish as another,
cannot write desired state, acks or the fleet's announcement; what it may publish, it can make
poisonous, which the fleet contains; and the good device's telemetry is stored exactly once
meanwhile."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion

from edgeserve import certs
from edgeserve.cli import cli
from edgeserve.contract import TelemetryBatch, Window, device_topic, encode
from edgeserve.device_agent.telemetry.link import Link, LinkSettings
from edgeserve.device_agent.telemetry.outbox import Outbox
from edgeserve.fleet.ingest import Ingestor
from edgeserve.fleet.service import FleetService
from edgeserve.fleet.store import Store
from edgeserve.mqtt import BrokerSettings
from tests.integration.telemetry_support import store_counts, window_fields
from tests.services import MosquittoProcess, free_port, need
from tests.support import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@dataclass
class Hardened:
    port: int
    cert_port: int
    fleet_port: int
    ca: Path
    fleet_password: str
    passwords: dict[str, str]
    certificates: dict[str, tuple[Path, Path]]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Hardened]:
    """The generated configuration, two enrolled devices, and Mosquitto running it."""
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        need("mosquitto is not installed")
    # outside pytest's private tmp: the broker runs as its own user and must reach the files
    parent = Path(tempfile.mkdtemp(prefix="es-hardened-"))
    parent.chmod(0o755)
    directory, port, cert_port, fleet_port = parent / "broker", free_port(), free_port(), \
        free_port()
    runner = CliRunner()
    made = runner.invoke(cli, ["fleet", "broker-config", "--out", str(directory), "--host",
                               "127.0.0.1", "--port", str(port), "--cert-port", str(cert_port),
                               "--fleet-port", str(fleet_port),
                               "--bind", "127.0.0.1", "--json"])
    assert made.exit_code == 0, made.output
    passwords = {}
    for device in ("cam-1", "cam-2"):
        added = runner.invoke(cli, ["fleet", "device", "add", device, "--broker-dir",
                                    str(directory), "--json"])
        assert added.exit_code == 0, added.output
        passwords[device] = json.loads(added.output)["password"]
    certificates = {}
    for device in ("cam-3", "cam-4"):  # enrolled by certificate
        added = runner.invoke(cli, ["fleet", "device", "add", device, "--cert", "--broker-dir",
                                    str(directory), "--json"])
        assert added.exit_code == 0, added.output
        issued = json.loads(added.output)
        assert "password" not in issued and f"127.0.0.1:{cert_port}" in issued["agent_command"]
        certificates[device] = (Path(issued["cert_file"]), Path(issued["key_file"]))
    config = directory / "mosquitto.conf"
    if os.geteuid() == 0:  # the broker runs as its own user: let it read the files
        subprocess.run(["chown", "-R", "mosquitto", str(directory)], check=True)
    process = MosquittoProcess(port, directory, config)
    try:
        process.start()
        yield Hardened(port, cert_port, fleet_port, directory / "ca.crt",
                       (directory / "fleet.password").read_text(), passwords, certificates)
    finally:
        process.stop()
        shutil.rmtree(parent, ignore_errors=True)


def _settings(broker: Hardened, user: str | None, password: str | None) -> BrokerSettings:
    """A password login: the fleet's user on the fleet listener, devices on theirs."""
    port = broker.fleet_port if user == "edgeserve-fleet" else broker.port
    return BrokerSettings(host="127.0.0.1", port=port, tls=True, ca_file=broker.ca,
                          username=user, password=password)


def _certificate_settings(broker: Hardened, device: str) -> BrokerSettings:
    cert, key = broker.certificates[device]
    return BrokerSettings(host="127.0.0.1", port=broker.cert_port, tls=True, ca_file=broker.ca,
                          cert_file=cert, key_file=key)


def _client(broker: Hardened, user: str | None, password: str | None, client_id: str,
            certificate: tuple[Path, Path] | None = None,
            port: int | None = None) -> tuple[mqtt.Client, dict[str, object]]:
    """A raw MQTT 5 client over TLS (by default to the device password listener, or the
    certificate one when given a certificate and key); returns it and what the broker answered
    (connect, acks)."""
    seen: dict[str, object] = {"pubacks": {}}
    connected = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.tls_set(ca_certs=str(broker.ca), cert_reqs=ssl.CERT_REQUIRED,
                   certfile=str(certificate[0]) if certificate else None,
                   keyfile=str(certificate[1]) if certificate else None)
    if user is not None:
        client.username_pw_set(user, password)

    def on_connect(_c: object, _u: object, _f: object, reason: object, _p: object) -> None:
        seen["connect"] = str(reason)
        connected.set()

    def on_publish(_c: object, _u: object, mid: int, reason: object, _p: object) -> None:
        seen["pubacks"][mid] = str(reason)  # type: ignore[index]

    client.on_connect = on_connect
    client.on_publish = on_publish
    with contextlib.suppress(OSError):
        client.connect("127.0.0.1", port or (broker.cert_port if certificate else broker.port))
    client.loop_start()
    connected.wait(10)
    return client, seen


def _fleet(stack: contextlib.ExitStack, broker: Hardened, tmp_path: Path,
           fleet_name: str) -> tuple[Store, FleetService]:
    """The fleet's ingestion on its own listener, into a fresh SQLite store."""
    store = stack.enter_context(Store.open(f"sqlite:///{tmp_path}/fleet.db"))
    service = FleetService(Ingestor(store, fleet_name),
                           _settings(broker, "edgeserve-fleet", broker.fleet_password),
                           f"edgeserve-fleet-{fleet_name}-0")
    service.start()
    stack.callback(service.stop)
    return store, service


def _device(stack: contextlib.ExitStack, settings: BrokerSettings, tmp_path: Path,
            fleet_name: str, device: str) -> Link:
    """A device's telemetry link with 30 windows to send."""
    outbox = stack.enter_context(Outbox(tmp_path / f"{device}.db"))
    outbox.append_many([window_fields(i) for i in range(30)])
    link = Link(LinkSettings(settings, fleet_name, device, backoff_min_s=0.2,
                             backoff_max_s=1.0), outbox).start()
    stack.callback(link.stop)
    return link


def test_one_devices_credentials_cannot_act_as_another_or_as_the_fleet(
        broker: Hardened, tmp_path: Path, fleet_name: str) -> None:
    """Anonymous and wrong-password clients are refused; cam-1's credentials publishing under
    cam-2's id (its telemetry, with cam-2's client id too), on cam-2's desired topic, on an ack
    topic, on cam-2's file requests or on the fleet's announcement are refused by the broker;
    cam-2's own windows are stored exactly once throughout."""
    with contextlib.ExitStack() as stack:
        store, service = _fleet(stack, broker, tmp_path, fleet_name)
        good = _device(stack, _settings(broker, "cam-2", broker.passwords["cam-2"]), tmp_path,
                       fleet_name, "cam-2")

        for user, password in ((None, None), ("cam-1", "not-the-password")):
            client, seen = _client(broker, user, password, f"intruder-{user}")
            stack.callback(client.loop_stop)
            assert seen.get("connect") != "Success", (user, seen)

        rogue, seen = _client(broker, "cam-1", broker.passwords["cam-1"], f"cam-2@{fleet_name}")
        stack.callback(rogue.loop_stop)
        stack.callback(rogue.disconnect)
        assert seen["connect"] == "Success"
        forged = encode(TelemetryBatch(device_id="cam-2", sent=1.0, floor=1, windows=[
            Window(seq=s, **window_fields(s)) for s in range(1000, 1005)]))
        attacks = [device_topic(fleet_name, "cam-2", "telemetry"),
                   device_topic(fleet_name, "cam-2", "desired"),
                   device_topic(fleet_name, "cam-2", "ack"),
                   device_topic(fleet_name, "cam-1", "ack"),
                   device_topic(fleet_name, "cam-2", "files", "req"),  # its model transfers
                   f"edgeserve/v1/{fleet_name}/fleet/status"]
        mids = [rogue.publish(topic, forged, qos=1).mid for topic in attacks]
        wait_until(lambda: len(seen["pubacks"]) == len(mids), 20,  # type: ignore[arg-type]
                   "the broker's answers to every forged publish")
        answers = [seen["pubacks"][m] for m in mids]  # type: ignore[index]
        assert all(a == "Not authorized" for a in answers), answers
        assert good.stats.takeovers == 0  # the rogue's client id was forced to cam-1
        # cam-1 may still publish as itself
        own = rogue.publish(device_topic(fleet_name, "cam-1", "telemetry"), encode(
            TelemetryBatch(device_id="cam-1", sent=1.0, floor=1, windows=[
                Window(seq=1, **window_fields(1))])), qos=1)
        wait_until(lambda: own.mid in seen["pubacks"], 20, "cam-1's own publish")  # type: ignore[operator]
        assert seen["pubacks"][own.mid] == "Success"  # type: ignore[index]

        # what cam-1 may publish, it can still make poisonous: contained by the fleet
        for kind in ("status", "telemetry", "reported"):
            rogue.publish(device_topic(fleet_name, "cam-1", kind), b"[" * 50_000, qos=1)
        wait_until(lambda: service.ingestor.stats.snapshot()["rejected_total"] >= 2, 30,
                   "the fleet to drop cam-1's poison")
        wait_until(lambda: store_counts(store.url)["devices"].get("cam-2", (0, 0, 0))[0] == 30,
                   60, "cam-2's windows")
        counts = store_counts(store.url)
        assert counts["devices"]["cam-2"] == (30, 1, 30)  # none of the forged 1000-1004
        assert counts["devices"]["cam-1"][0] == 1
        # the forgeries never reached the fleet: only cam-1's own poison was there to drop
        assert service.ingestor.stats.snapshot()["rejected"]["malformed"] == 2
        assert service.healthy and service.worker_restarts == 0


def _foreign_certificate(folder: Path, device: str) -> tuple[Path, Path]:
    """A client certificate for ``device`` from a CA the broker does not know."""
    ca_key, ca = certs.new_ca("not the fleet CA", days=1)
    key, cert = certs.issue(ca_key, ca, device, 1, client=True)
    folder.mkdir(parents=True, exist_ok=True)
    certs.write_pem(folder / "foreign.key", folder / "foreign.crt", key, cert)
    return folder / "foreign.crt", folder / "foreign.key"


def test_a_device_certificate_is_its_identity(broker: Hardened, tmp_path: Path,
                                              fleet_name: str) -> None:
    """cam-3 logs in with only the client certificate 'fleet device add --cert' issued it, and
    its windows are stored exactly once; cam-4's certificate, under cam-3's client id, can
    neither publish as cam-3 nor take over its session; no certificate, a certificate for cam-3
    from another CA, and a device's password on the fleet's listener are all refused."""
    with contextlib.ExitStack() as stack:
        store, _ = _fleet(stack, broker, tmp_path, fleet_name)
        good = _device(stack, _certificate_settings(broker, "cam-3"), tmp_path, fleet_name,
                       "cam-3")
        assert good.connected.wait(20), good.stats

        refused = {
            "no certificate": _client(broker, None, None, "nobody", port=broker.cert_port),
            "another CA": _client(broker, None, None, "forger",
                                  _foreign_certificate(tmp_path / "foreign", "cam-3")),
            "device on the fleet listener": _client(broker, "cam-1", broker.passwords["cam-1"],
                                                    "edgeserve-fleet-x", port=broker.fleet_port),
        }
        for client, _ in refused.values():
            stack.callback(client.loop_stop)
        answers = {why: seen.get("connect") for why, (_, seen) in refused.items()}
        assert all(answer != "Success" for answer in answers.values()), answers

        rogue, seen = _client(broker, None, None, f"cam-3@{fleet_name}",
                              broker.certificates["cam-4"])
        stack.callback(rogue.loop_stop)
        stack.callback(rogue.disconnect)
        assert seen["connect"] == "Success"
        forged = encode(TelemetryBatch(device_id="cam-3", sent=1.0, floor=1, windows=[
            Window(seq=s, **window_fields(s)) for s in range(1000, 1005)]))
        own = encode(TelemetryBatch(device_id="cam-4", sent=1.0, floor=1, windows=[
            Window(seq=1, **window_fields(1))]))
        mids = [rogue.publish(device_topic(fleet_name, "cam-3", "telemetry"), forged, qos=1).mid,
                rogue.publish(device_topic(fleet_name, "cam-4", "telemetry"), own, qos=1).mid]
        wait_until(lambda: len(seen["pubacks"]) == 2, 20,  # type: ignore[arg-type]
                   "the broker's answers")
        assert [seen["pubacks"][m] for m in mids] == ["Not authorized", "Success"]  # type: ignore[index]

        wait_until(lambda: store_counts(store.url)["devices"].get("cam-3", (0, 0, 0))[0] == 30,
                   60, "cam-3's windows")
        wait_until(lambda: "cam-4" in store_counts(store.url)["devices"], 30, "cam-4's window")
        counts = store_counts(store.url)
        assert counts["devices"]["cam-3"] == (30, 1, 30)  # none of the forged 1000-1004
        assert counts["devices"]["cam-4"][0] == 1
        assert good.stats.takeovers == 0 and good.stats.disconnects == 0, good.stats
