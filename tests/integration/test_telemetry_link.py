"""The device's MQTT link against a real broker: status and Last Will, protocol fallback,
back-off, flow control, TLS with passwords and client certificates, drops, bad payloads."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import random
import re
import resource
import shutil
import socket
import subprocess
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeserve.contract import Ack, device_topic, encode
from edgeserve.device_agent.telemetry.link import Link, LinkSettings
from edgeserve.device_agent.telemetry.outbox import Outbox
from edgeserve.errors import ConfigError
from edgeserve.fleet.broker import EmbeddedBroker
from edgeserve.mqtt import BrokerSettings
from tests.integration.telemetry_support import FleetProcess, store_counts, window_fields
from tests.services import MosquittoProcess, free_port, start_mosquitto
from tests.support import wait_until


def two_ports() -> dict[str, int]:
    """Two distinct free ports for the embedded broker's MQTT 5 and 3.1.1 listeners."""
    first = free_port()
    second = free_port()
    while second == first:
        second = free_port()
    return {"port": first, "port_v311": second}


pytestmark = pytest.mark.integration


def settings(port: int, fleet: str, device: str = "dev1", **kw: Any) -> LinkSettings:
    # the client id is {device}@{fleet}: with a fleet name per test, a "dev1" of another run on
    # the shared broker (a second checkout, CI) never takes this session over
    return LinkSettings(BrokerSettings(port=port, **kw.pop("broker", {})), fleet, device,
                        backoff_min_s=0.2, backoff_max_s=1.0, **kw)


def started(resources: contextlib.ExitStack, link: Link) -> Link:
    """Start ``link``; it is stopped at teardown whatever the test did (stopping twice is fine)."""
    resources.callback(link.stop)
    return link.start()


def test_birth_is_retained_and_the_last_will_says_offline(
        mqtt_broker: tuple[str, int], fleet_name: str, tmp_path: Path,
        watcher_factory: Any, resources: contextlib.ExitStack) -> None:
    """Connecting publishes a retained online status with profile and models; dying without a
    goodbye makes the broker publish the retained offline Last Will with the same ts."""
    port = mqtt_broker[1]
    watcher = watcher_factory(port, device_topic(fleet_name, "dev1", "status"))
    outbox = resources.enter_context(Outbox(tmp_path / "o.db"))
    link = started(resources, Link(
        settings(port, fleet_name), outbox,
        status_info=lambda: {"profile": "rpi5", "models": {"toy": "1.0.0"},
                             "labels": {"site": "lab"}}))
    assert link.connected.wait(10)
    wait_until(lambda: len(watcher.statuses()) == 1, 10, "the birth message")
    link.kill()
    wait_until(lambda: len(watcher.statuses()) == 2, 10, "the Last Will")
    birth, will = watcher.statuses()
    assert (birth.state, birth.profile, birth.models, birth.labels) == (
        "online", "rpi5", {"toy": "1.0.0"}, {"site": "lab"})
    assert (will.state, will.reason, will.ts) == ("offline", "connection lost", birth.ts)
    late = watcher_factory(port, device_topic(fleet_name, "dev1", "status"))
    wait_until(lambda: bool(late.messages), 10, "the retained status")
    assert late.messages[0][2] and late.statuses()[0].state == "offline"


@pytest.mark.parametrize("qos", [1, 0])
def test_subscribed_topics_and_connect_hooks_work_across_reconnects(
        tmp_path: Path, fleet_name: str, private_mosquitto: MosquittoProcess,
        resources: contextlib.ExitStack, qos: int) -> None:
    """A desired-state handler gets retained messages on every connection, and on_connect
    callbacks run after each connect (here: after a broker restart). With subscriptions at
    QoS 0 (``subscribe_qos``, for NATS) the same holds: the retained state comes again."""
    proc = private_mosquitto
    desired: list[bytes] = []
    connects: list[int] = []
    outbox = resources.enter_context(Outbox(tmp_path / "o.db"))
    link = Link(settings(proc.port, fleet_name, broker={"subscribe_qos": qos}), outbox)
    link.subscribe("desired", desired.append)
    link.on_connect(lambda: connects.append(1))
    started(resources, link)
    assert link.connected.wait(10)
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    publisher.connect("127.0.0.1", proc.port)
    publisher.loop_start()
    try:
        publisher.publish(device_topic(fleet_name, "dev1", "desired"), b'{"v":1,"revision":3}',
                          qos=1, retain=True).wait_for_publish(5)
    finally:
        publisher.disconnect()
        publisher.loop_stop()
    wait_until(lambda: len(desired) == 1, 10, "the desired state")
    assert sorted(link.granted.values()) == [qos] * 3, \
        link.granted  # ack, fleet status, desired
    proc.restart()
    wait_until(lambda: len(connects) == 2, 20, "the reconnect")
    wait_until(lambda: len(desired) == 2, 10, "the retained desired state again")
    assert desired[1] == desired[0]
    assert link.publish("reported", b'{"v":1}', retain=True)


def test_a_clean_stop_says_offline_stopped(mqtt_broker: tuple[str, int], fleet_name: str,
                                           tmp_path: Path, watcher_factory: Any,
                                           resources: contextlib.ExitStack) -> None:
    """stop() publishes a retained offline status with reason 'stopped'."""
    port = mqtt_broker[1]
    watcher = watcher_factory(port, device_topic(fleet_name, "dev1", "status"))
    outbox = resources.enter_context(Outbox(tmp_path / "o.db"))
    link = started(resources, Link(settings(port, fleet_name), outbox))
    assert link.connected.wait(10)
    link.stop()
    wait_until(lambda: len(watcher.statuses()) == 2, 10, "the goodbye")
    assert [(s.state, s.reason) for s in watcher.statuses()] == [("online", None),
                                                                 ("offline", "stopped")]


def test_the_link_falls_back_to_mqtt_311(tmp_path: Path, fleet_name: str,
                                         resources: contextlib.ExitStack) -> None:
    """Against a listener that speaks only MQTT 3.1.1 the link connects with 3.1.1; against
    MQTT 5 it uses 5."""
    broker = resources.enter_context(EmbeddedBroker(**two_ports()))
    old = started(resources, Link(settings(broker.port_v311, fleet_name),
                                  resources.enter_context(Outbox(tmp_path / "a.db"))))
    new = started(resources, Link(settings(broker.port, fleet_name, "dev2"),
                                  resources.enter_context(Outbox(tmp_path / "b.db"))))
    assert old.connected.wait(15) and new.connected.wait(15)
    assert (old.stats.protocol, new.stats.protocol) == ("3.1.1", "5")


def test_backoff_is_jittered_exponential_and_capped(tmp_path: Path) -> None:
    """Delays are uniform in [0, min(max, min·2^attempt)]: spread out, growing, bounded."""
    with Outbox(tmp_path / "o.db") as outbox:
        link = Link(LinkSettings(BrokerSettings(), "f", "d", backoff_min_s=1.0,
                                 backoff_max_s=60.0), outbox, rng=random.Random(4))
    for attempt, cap in ((1, 2.0), (3, 8.0), (10, 60.0)):
        delays = [link._backoff(attempt) for _ in range(400)]
        assert min(delays) >= 0 and max(delays) <= cap
        assert max(delays) > 0.8 * cap and min(delays) < 0.2 * cap
        assert len(set(delays)) == 400


def test_unacked_windows_are_capped_then_sent_again(mqtt_broker: tuple[str, int],
                                                    fleet_name: str, tmp_path: Path,
                                                    watcher_factory: Any,
                                                    resources: contextlib.ExitStack) -> None:
    """With nobody acking, the link sends oldest first in batches up to max_unacked, then after
    ack_timeout sends the same windows again; an ack lets it go on."""
    port = mqtt_broker[1]
    ack_timeout = 1.0
    watcher = watcher_factory(port, device_topic(fleet_name, "dev1", "telemetry"))
    outbox = resources.enter_context(Outbox(tmp_path / "o.db"))
    outbox.append_many([window_fields(i) for i in range(100)])
    link = started(resources, Link(settings(port, fleet_name, batch_windows=10,
                                            max_unacked_windows=30, ack_timeout_s=ack_timeout),
                                   outbox))
    # the retransmission comes ack_timeout after the first send: wait well beyond it
    wait_until(lambda: link.stats.retransmits >= 1 and len(watcher.messages) >= 4,
               10 + 5 * ack_timeout, "a retransmission")
    batches = [json.loads(p) for _t, p, _r in watcher.messages]
    seqs = [[w["seq"] for w in b["windows"]] for b in batches]
    assert seqs[:4] == [list(range(1, 11)), list(range(11, 21)), list(range(21, 31)),
                        list(range(1, 11))]
    assert all(b["floor"] == 1 for b in batches)
    watcher.client.publish(device_topic(fleet_name, "dev1", "ack"), encode(Ack(seq=30)), qos=1)
    wait_until(lambda: outbox.floor() == 31, 10, "the ack to delete 1-30")
    wait_until(lambda: any(json.loads(p)["windows"][0]["seq"] == 31
                           for _t, p, _r in watcher.messages), 10, "windows after 30")


def test_the_link_works_with_descriptors_past_1023(mqtt_broker: tuple[str, int],
                                                    fleet_name: str, tmp_path: Path,
                                                    watcher_factory: Any,
                                                    resources: contextlib.ExitStack) -> None:
    """An app or gateway embedding the agent can hold over a thousand files and sockets, and
    select() cannot watch a descriptor numbered 1024 or more (paho's own loop fails on it as
    "closed before CONNACK"). With every descriptor below 1100 taken, the link's socket gets a
    higher number and must still connect, send its windows and take the fleet's ack."""
    port = mqtt_broker[1]
    watcher = watcher_factory(port, device_topic(fleet_name, "dev1", "telemetry"))
    outbox = resources.enter_context(Outbox(tmp_path / "o.db"))
    outbox.append_many([window_fields(i) for i in range(20)])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard limit on open files is {hard}; this test needs 1200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    fillers: list[int] = []
    link = None
    try:
        while not fillers or fillers[-1] < 1100:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        link = Link(settings(port, fleet_name, batch_windows=10), outbox).start()
        assert link.connected.wait(10), "the link did not connect"
        wait_until(lambda: len(watcher.messages) >= 2, 10, "both batches")
        watcher.client.publish(device_topic(fleet_name, "dev1", "ack"), encode(Ack(seq=20)),
                               qos=1)
        wait_until(lambda: outbox.floor() == 21, 10, "the ack to delete 1-20")
        assert link.stats.connect_failures == 0
    finally:
        if link is not None:
            link.stop()
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


SIZE = 1 << 16


def test_publishes_from_other_threads_do_not_corrupt_the_stream(
        mqtt_broker: tuple[str, int], fleet_name: str, tmp_path: Path,
        watcher_factory: Any, resources: contextlib.ExitStack) -> None:
    """The updater and the agent publish on the link from their own threads while the link
    thread sends telemetry, through a small socket send buffer so that writes are partial.
    Every message arrives whole and in one piece, and the link never reconnects. (Without the
    link's I/O lock two threads' partial writes could interleave two packets' bytes; that
    window is narrow, and this test does not reliably catch it: it guards the lock's
    correctness - no deadlock, nothing lost - under real contention.)"""
    port = mqtt_broker[1]
    watcher = watcher_factory(port, device_topic(fleet_name, "dev1", "reported"))
    telemetry = watcher_factory(port, device_topic(fleet_name, "dev1", "telemetry"))
    outbox = resources.enter_context(Outbox(tmp_path / "o.db"))
    outbox.append_many([window_fields(i) for i in range(400)])
    link = started(resources, Link(settings(port, fleet_name, batch_windows=50,
                                            max_unacked_windows=400, rate_windows_per_s=10_000.0),
                                   outbox))
    assert link.connected.wait(10)
    # a small send buffer makes partial writes (where interleaving would happen) the rule
    sock = link._client.socket() if link._client is not None else None
    assert sock is not None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    threads_n, each = 4, 25
    done = threading.Event()  # publishers give up retrying once the test is over

    def publisher(n: int) -> None:
        for i in range(each):
            body = bytes([65 + n]) * SIZE + f"{n}:{i}".encode()
            while not link.publish("reported", body, sub=()) and not done.wait(0.01):
                pass

    def arrived() -> int:
        return sum(t.endswith("/reported") for t, _p, _r in watcher.messages)

    threads = [threading.Thread(target=publisher, args=(n,)) for n in range(threads_n)]
    for thread in threads:
        thread.start()
    resources.callback(lambda: [thread.join(10) for thread in threads])
    resources.callback(done.set)
    # 6.4 MB through a 4 KB buffer: as long as messages keep arriving, the machine is only slow
    wait_until(lambda: arrived() >= threads_n * each, 20,
               f"{threads_n * each} reported messages to arrive", progress=arrived)
    reported = [p for t, p, _r in watcher.messages if t.endswith("/reported")]
    for payload in reported:
        head, tail = payload[:SIZE], payload[SIZE:].decode()
        n = int(tail.split(":")[0])
        assert head == bytes([65 + n]) * SIZE
    assert len({p[SIZE:] for p in reported}) == threads_n * each
    wait_until(lambda: bool(telemetry.messages), 10, "telemetry batches alongside")
    assert link.stats.disconnects == 0


def test_an_ack_from_an_earlier_life_renumbers_the_outbox(mqtt_broker: tuple[str, int],
                                                         fleet_name: str, tmp_path: Path,
                                                         watcher_factory: Any,
                                                         resources: contextlib.ExitStack) -> None:
    """A device whose outbox was wiped learns from the fleet's ack that seqs up to 500 are taken
    and sends its windows as 501… instead of having them ignored as duplicates."""
    port = mqtt_broker[1]
    wait_s = 10.0
    watcher = watcher_factory(port, device_topic(fleet_name, "dev1", "telemetry"))
    outbox = resources.enter_context(Outbox(tmp_path / "o.db"))
    outbox.append_many([window_fields(i) for i in range(3)])
    # an ack timeout far beyond the waits below: no retransmission may pass for the last batch
    link = started(resources, Link(settings(port, fleet_name, ack_timeout_s=6 * wait_s), outbox))
    wait_until(lambda: bool(watcher.messages), wait_s, "the first batch")
    watcher.client.publish(device_topic(fleet_name, "dev1", "ack"), encode(Ack(seq=500)), qos=1)
    wait_until(lambda: outbox.floor() == 501, wait_s, "the renumbering")
    wait_until(lambda: len(watcher.messages) >= 2, wait_s, "the renumbered batch")
    assert [w["seq"] for w in json.loads(watcher.messages[-1][1])["windows"]] == [501, 502, 503]
    assert link.stats.rebased == 3


def _certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (PEM files)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("edgeserve test CA"))
          .issuer_name(name("edgeserve test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    files: dict[str, Path] = {}

    def issue(cn: str, san: x509.GeneralName | None) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1)))
        if san is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName([san]), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return (cert.public_bytes(serialization.Encoding.PEM),
                key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))

    server_cert, server_key = issue("127.0.0.1", x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    client_cert, client_key = issue("dev1", None)
    for label, data in (("ca", ca.public_bytes(serialization.Encoding.PEM)),
                        ("server_cert", server_cert), ("server_key", server_key),
                        ("client_cert", client_cert), ("client_key", client_key)):
        files[label] = directory / f"{label}.pem"
        files[label].write_bytes(data)
        files[label].chmod(0o644)  # mosquitto drops to its own user and must read them
    return files


@pytest.fixture
def tls_mosquitto() -> Iterator[tuple[MosquittoProcess, int, dict[str, Path]]]:
    """A private Mosquitto with a TLS listener that needs a client certificate and a password."""
    certs_dir = Path(tempfile.mkdtemp(prefix="es-tls-"))
    certs_dir.chmod(0o755)
    certs = _certificates(certs_dir)
    passwd = certs_dir / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "dev1", "s3cret"], check=True,
                   capture_output=True)
    passwd.chmod(0o644)
    tls_port = free_port()
    proc = start_mosquitto(
        f"password_file {passwd}\n"
        f"listener {tls_port} 127.0.0.1\ncafile {certs['ca']}\ncertfile {certs['server_cert']}\n"
        f"keyfile {certs['server_key']}\nrequire_certificate true\n")
    try:
        yield proc, tls_port, certs
    finally:
        proc.stop(kill=True)
        shutil.rmtree(proc.workdir, ignore_errors=True)
        shutil.rmtree(certs_dir, ignore_errors=True)


def test_tls_with_password_and_client_certificate(tls_mosquitto: Any, tmp_path: Path,
                                                  fleet_name: str,
                                                  resources: contextlib.ExitStack) -> None:
    """mqtts:// with CA, client certificate and password connects; a wrong password does not."""
    _proc, port, certs = tls_mosquitto

    def broker(password: str) -> BrokerSettings:
        return BrokerSettings.from_url(f"mqtts://dev1:{password}@127.0.0.1:{port}",
                                       ca_file=certs["ca"], cert_file=certs["client_cert"],
                                       key_file=certs["client_key"])

    good = started(resources, Link(LinkSettings(broker("s3cret"), fleet_name, "dev1"),
                                   resources.enter_context(Outbox(tmp_path / "a.db"))))
    bad = started(resources, Link(LinkSettings(broker("wrong"), fleet_name, "dev2",
                                               backoff_min_s=0.1, backoff_max_s=0.2),
                                  resources.enter_context(Outbox(tmp_path / "b.db"))))
    assert good.connected.wait(15)
    wait_until(lambda: bad.stats.connect_failures >= 2, 15, "refused connections")
    assert not bad.connected.is_set()
    assert good.settings.broker.tls
    with pytest.raises(ConfigError, match="both --cert-file and --key-file"):
        BrokerSettings.from_url(f"mqtts://127.0.0.1:{port}", cert_file=certs["client_cert"])


def test_a_full_outbox_drops_oldest_first_and_the_fleet_sees_the_count(
        mqtt_broker: tuple[str, int], fleet_name: str, tmp_path: Path,
        resources: contextlib.ExitStack) -> None:
    """A device offline long enough to overflow its outbox delivers its newest windows; the
    fleet stores the drop count and acks past the dropped sequence numbers."""
    outbox = resources.enter_context(Outbox(tmp_path / "o.db", max_bytes=16_384))
    for i in range(300):
        outbox.append(window_fields(i))
    held = outbox.pending(limit=1000)
    stats = outbox.stats()
    assert stats.dropped_total == 300 - len(held) > 0
    assert [r.seq for r in held] == list(range(301 - len(held), 301))
    db = f"sqlite:///{tmp_path}/fleet.db"
    fleet = FleetProcess(fleet_name, db, f"mqtt://127.0.0.1:{mqtt_broker[1]}")
    resources.callback(fleet.kill)  # a no-op once stop() below ran
    fleet.start()
    # a batch the fleet missed is sent again after the ack timeout (default 30 s): keep it short,
    # and wait for as long as the outbox keeps draining
    link = started(resources, Link(settings(mqtt_broker[1], fleet_name, ack_timeout_s=2.0),
                                   outbox))
    wait_until(lambda: outbox.floor() == outbox.next_seq(), 20, "the outbox to empty",
               progress=outbox.floor)
    link.stop()
    fleet.stop()
    counts = store_counts(db)
    assert counts["total"] == len(held)
    assert counts["devices"]["dev1"] == (len(held), 301 - len(held), 300)
    assert counts["dropped"]["dev1"] == stats.dropped_total
    assert counts["acked"]["dev1"] == 300


def _rejected(fleet: FleetProcess) -> dict[str, float]:
    """The fleet's rejection counters by reason, read from its /metrics (the URL it logged)."""
    found = (re.search(r"dashboard and API: (http://[^\s/]+)", line) for line in fleet.lines)
    url = next((m.group(1) for m in found if m), None)
    if url is None:  # logged just after "ready"
        return {}
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^edgeserve_fleet_ingest_rejected_total\{reason="([^"]+)"\} (\S+)$', text, re.M)}


def test_bad_payloads_on_the_telemetry_topic_are_counted_and_ingestion_goes_on(
        mqtt_broker: tuple[str, int], fleet_name: str, tmp_path: Path,
        resources: contextlib.ExitStack) -> None:
    """Malformed, oversized, wrong-schema and spoofed messages are counted by reason while the
    real device's windows keep being stored."""
    port = mqtt_broker[1]
    db = f"sqlite:///{tmp_path}/fleet.db"
    fleet = FleetProcess(fleet_name, db, f"mqtt://127.0.0.1:{port}")
    resources.callback(fleet.kill)  # a no-op once stop() below ran
    fleet.start()
    outbox = resources.enter_context(Outbox(tmp_path / "o.db"))
    outbox.append_many([window_fields(i) for i in range(200)])
    attacker = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    attacker.connect("127.0.0.1", port)
    attacker.loop_start()
    resources.callback(attacker.loop_stop)
    resources.callback(attacker.disconnect)
    topic = device_topic(fleet_name, "dev1", "telemetry")
    bad = [b"\xff\xfe garbage", b'{"v": 1, "device_id": "dev1", "windows": [{"seq"',
           b"{" + b" " * (1 << 20) + b"}", b'{"v": 1, "device_id": "dev1", "windows": []}',
           b'{"v": 9, "device_id": "dev1", "windows": [{"seq": 1, "start": 1, "end": 2}]}',
           json.dumps({"v": 1, "device_id": "other", "windows": [
               {"seq": 1, "start": 1, "end": 2}]}).encode()]
    link = started(resources, Link(settings(port, fleet_name, batch_windows=20,
                                            rate_windows_per_s=200, ack_timeout_s=2.0), outbox))
    stop = threading.Event()

    def attack() -> None:
        while not stop.is_set():
            for payload in bad:
                attacker.publish(topic, payload, qos=1)
            stop.wait(0.1)

    thread = threading.Thread(target=attack)
    thread.start()
    resources.callback(thread.join)
    resources.callback(stop.set)
    wait_until(lambda: outbox.floor() == outbox.next_seq(), 20, "the device's windows stored",
               progress=outbox.floor)
    # the fleet counts what it has processed, not what was sent: wait until its counters show
    # every kind of bad payload (rather than sleeping and hoping the last round was read)
    least = {"malformed": 2, "oversize": 1, "schema": 2, "device-mismatch": 1}
    wait_until(lambda: all(_rejected(fleet).get(k, 0) >= n for k, n in least.items()), 20,
               f"the fleet to count at least {least} rejections", progress=lambda: _rejected(fleet))
    stop.set()
    thread.join()
    link.stop()
    stats = fleet.stop()
    assert store_counts(db)["total"] == 200
    rejected = stats["rejected"]
    assert all(rejected[k] >= n for k, n in least.items()), rejected
    assert stats["windows_stored"] == 200
