"""A minute of random and mutated payloads on every topic the fleet and the agent subscribe to,
on the real Mosquitto, while a real device keeps sending telemetry: nothing dies, nothing raises
unhandled, and the good telemetry keeps arriving, each window stored once.

The payloads are drawn by hypothesis: raw bytes, deep nesting, JSON of the right shape with
wrong values, and valid messages of every contract type with bytes flipped, cut or inserted. The
one thing an attacker on an anonymous broker can still do is forge an ack for a device (the
broker ACL in docs/mqtt.md denies devices writing on ack topics); the good device's own ack
topic is therefore left alone here, while another device's is fuzzed like everything else.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from edgeserve.contract import (
    Ack,
    Desired,
    FileChunk,
    FileRequest,
    FleetStatus,
    Reported,
    Status,
    TelemetryBatch,
    Window,
    device_topic,
    encode,
    fleet_status_topic,
)
from edgeserve.demo.sim import SimFleet, Traffic
from edgeserve.fleet.server import FleetConfig, FleetServer
from edgeserve.fleet.tables import windows
from edgeserve.testing import KeyPair
from tests.device_agent.models import build_mlp_package
from tests.integration.telemetry_support import window_fields
from tests.support import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

FUZZ_SECONDS = 60.0
KINDS = ("status", "telemetry", "reported", "desired", "ack", "files/req", "files/data")


def _valid(device: str) -> list[bytes]:
    """One valid payload of every contract type, to mutate."""
    window = Window(seq=7, **window_fields(7))
    return [encode(m) for m in (
        Status(device_id=device, state="online", profile="generic-cpu", models={"toy": "1"}),
        TelemetryBatch(device_id=device, sent=1.0, floor=7, windows=[window]),
        Reported(device_id=device, revision=3, models={"toy": {"active": "1.0.0"}}),  # type: ignore[dict-item]
        Desired(revision=9, models={}, device_id=device, expires=2e9),
        Ack(seq=3),
        FileRequest(transfer="t", model="toy", version="1.0.0", file="artifacts/toy.onnx",
                    offset=0, length=1024),
        FileChunk.of("t", "artifacts/toy.onnx", 0, 3, b"abc"),
        FleetStatus(state="online", instance="x"),
    )]


def _mutated(payloads: list[bytes]) -> st.SearchStrategy[bytes]:
    def mutate(args: tuple[int, int, int, bytes]) -> bytes:
        which, at, how, junk = args
        raw = bytearray(payloads[which % len(payloads)])
        at %= max(1, len(raw))
        if how == 0:
            raw[at] ^= 0xFF
        elif how == 1:
            del raw[at:]
        else:
            raw[at:at] = junk
        return bytes(raw)

    return st.tuples(st.integers(0, 100), st.integers(0, 10**6), st.integers(0, 2),
                     st.binary(max_size=64)).map(mutate)


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=20)


def _payloads(device: str) -> st.SearchStrategy[bytes]:
    shaped = st.fixed_dictionaries({"v": st.sampled_from([1, 2, "1", None])}, optional={
        "device_id": st.sampled_from([device, "other", "", "x" * 300]),
        "seq": st.integers(-5, 2**64), "floor": st.integers(-5, 2**64),
        "revision": st.integers(-5, 2**64), "windows": _JSON, "models": _JSON,
        "state": st.text(max_size=12)}).map(lambda d: json.dumps(d).encode())
    return st.one_of(
        st.binary(max_size=2048),
        st.integers(1, 60_000).map(lambda n: b"[" * n),
        st.integers(1, 30_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
        _JSON.map(lambda v: json.dumps(v).encode()),
        shaped,
        _mutated(_valid(device)),
    )


@pytest.fixture
def system(tmp_path: Path, keypair: KeyPair, mqtt_broker: tuple[str, int],
           fleet_name: str) -> Iterator[tuple[FleetServer, SimFleet]]:
    """The fleet in this process (so its threads' exceptions are seen) and two agents: the first
    serves and sends telemetry, the second is the fuzz victim's namesake."""
    host, port = mqtt_broker
    with contextlib.ExitStack() as stack:
        server = FleetServer(FleetConfig(
            fleet=fleet_name, db=f"sqlite:///{tmp_path}/fleet.db",
            broker=f"mqtt://{host}:{port}", http_port=None, artifacts_dir=tmp_path / "artifacts",
            trusted_keys=[keypair.public_path], fleet_key=tmp_path / "fleet.key",
            rollout_tick_s=0.25))
        stack.callback(server.stop)
        server.start()
        assert server.artifacts is not None
        server.artifacts.publish(build_mlp_package(tmp_path / "toy.edgepkg", keypair,
                                                   tflite=False))
        good = [[float(i % 3), 0.5, -0.5, 1.0] for i in range(32)]
        traffic = Traffic("toy", {"x": np.asarray(good, np.float32)}, rate_per_s=20,
                          feedback=False)
        devices = SimFleet.build(2, ["generic-cpu"], tmp_path / "devices", [keypair.public_path],
                                 f"mqtt://{host}:{port}", fleet_name, traffic=traffic,
                                 window_s=0.5, prefix=fleet_name,
                                 fleet_keys=[tmp_path / "fleet.pub.pem"])
        stack.callback(devices.stop)
        for device in devices.devices:
            device.agent.install(tmp_path / "toy.edgepkg")
        devices.start()
        yield server, devices


def _stored(server: FleetServer, device: str) -> tuple[int, int]:
    """(windows stored for ``device``, distinct sequence numbers among them)."""
    assert server.store is not None
    with server.store.read() as conn:
        return tuple(conn.execute(  # type: ignore[return-value]
            sa.select(sa.func.count(), sa.func.count(sa.distinct(windows.c.seq)))
            .where(windows.c.device_id == device)).one())


def test_a_minute_of_fuzz_on_every_topic(system: tuple[FleetServer, SimFleet],
                                         fleet_name: str, mqtt_broker: tuple[str, int]) -> None:
    """Nothing dies or raises unhandled; the good device's windows keep being stored, once each."""
    server, devices = system
    good, victim = devices.devices
    unhandled: list[str] = []
    previous_hook = threading.excepthook
    threading.excepthook = lambda args: unhandled.append(f"{args.thread}: {args.exc_value!r}")
    attacker = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    attacker.connect(*mqtt_broker)
    attacker.loop_start()
    try:
        wait_until(lambda: _stored(server, good.device_id)[0] > 0, 60, "good telemetry")
        before = _stored(server, good.device_id)[0]
        sent = _fuzz(attacker, fleet_name, good.device_id, victim.device_id)
        assert sent > 1000, sent
        # good telemetry kept flowing during the fuzz and keeps flowing after it
        during = _stored(server, good.device_id)[0]
        assert during > before
        wait_until(lambda: _stored(server, good.device_id)[0] > during + 5, 60,
                   "good telemetry after the fuzz")
        count, distinct = _stored(server, good.device_id)
        assert count == distinct  # each window once
        assert server.service is not None and server.service.healthy
        assert server.service.worker_restarts == 0
        assert good.run.link is not None and good.run.link.connected.is_set()
        assert good.agent.predict("toy", {"x": [[0.0, 0.5, -0.5, 1.0]]}).version == "1.0.0"
        assert victim.active_version("toy") == "1.0.0"  # forged desired states changed nothing
        rejected = server.service.ingestor.stats.snapshot()["rejected_total"]
        assert rejected > 100
    finally:
        threading.excepthook = previous_hook
        attacker.disconnect()
        attacker.loop_stop()
    assert not unhandled, unhandled[:5]


def _fuzz(client: mqtt.Client, fleet: str, good: str, victim: str) -> int:
    """Publish hypothesis-drawn payloads on every topic for FUZZ_SECONDS; returns how many."""
    topics = [device_topic(fleet, d, kind.split("/")[0], *kind.split("/")[1:])  # type: ignore[arg-type]
              for d in (good, victim, "stranger") for kind in KINDS
              if not (d == good and kind == "ack")]
    topics.append(fleet_status_topic(fleet))
    pool: list[tuple[str, bytes, int, bool]] = []

    @settings(max_examples=2500, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(topics), _payloads(victim), st.sampled_from([0, 1]), st.booleans())
    def draw(topic: str, payload: bytes, qos: int, retain: bool) -> None:
        pool.append((topic, payload, qos, retain))

    draw()
    deadline = time.monotonic() + FUZZ_SECONDS
    sent = 0
    for topic, payload, qos, retain in itertools.cycle(pool):
        if time.monotonic() >= deadline:
            break
        client.publish(topic, payload, qos=qos, retain=retain)
        sent += 1
        if sent % 50 == 0:
            time.sleep(0.02)  # the broker and the system under test share two cores
    return sent
