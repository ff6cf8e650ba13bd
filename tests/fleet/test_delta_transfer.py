"""Deltas over the MQTT chunk path, on the real broker: the fleet answers a request naming a
base with the delta's chunks (or "full:"), the device rebuilds and verifies."""

from __future__ import annotations

import contextlib
import queue
from pathlib import Path

import pytest

from edgeserve.contract import FileChunk, FileRequest, decode, device_topic, encode
from edgeserve.device_agent.updates.delta import Base, NoDelta, mqtt_delta
from edgeserve.device_agent.updates.fetch import MqttTransport
from edgeserve.errors import DeltaError
from edgeserve.fleet.artifacts import ArtifactStore
from edgeserve.fleet.deltas import DeltaCache
from edgeserve.fleet.files import answer_file_request
from edgeserve.fleet.transfers import TransferLog
from edgeserve.testing import KeyPair
from tests.deltas import big_mlp_weights, fine_tuned, head_retrained, mlp_package

from .test_chunked_transfer import _client, _subscribe

MEMBER = "artifacts/model.onnx"


@pytest.fixture
def store(tmp_path: Path, keypair: KeyPair) -> ArtifactStore:
    store = ArtifactStore(tmp_path / "store", keypair.trust)
    w = big_mlp_weights()
    for release, (version, weights) in enumerate(
            (("1.0.0", w), ("1.1.0", head_retrained(w)), ("1.2.0", fine_tuned(w))), start=1):
        store.publish(mlp_package(tmp_path / f"{version}.edgepkg", keypair, weights, version,
                                  release))
    return store


@pytest.fixture
def transport(store: ArtifactStore, mqtt_broker: tuple[str, int], fleet_name: str,
              resources: contextlib.ExitStack) -> MqttTransport:
    host, port = mqtt_broker
    req_topic = device_topic(fleet_name, "dev1", "files", "req")
    data_topic = device_topic(fleet_name, "dev1", "files", "data")
    fleet = _client(resources, host, port, f"{fleet_name}-fleet")
    device = _client(resources, host, port, f"{fleet_name}-dev1")
    chunks: queue.Queue[FileChunk] = queue.Queue()
    deltas, transfers = DeltaCache(store), TransferLog(store.root)

    def fleet_on_message(c: object, u: object, msg: object) -> None:
        request = decode(FileRequest, msg.payload)  # type: ignore[attr-defined]
        answer = answer_file_request(store, request, deltas, transfers, "dev1")
        fleet.publish(data_topic, encode(answer), qos=1)

    fleet.on_message = fleet_on_message
    device.on_message = lambda c, u, msg: chunks.put(decode(FileChunk, msg.payload))
    _subscribe(fleet, req_topic)
    _subscribe(device, data_topic)

    def receive(timeout: float) -> FileChunk | None:
        try:
            return chunks.get(timeout=timeout)
        except queue.Empty:
            return None

    return MqttTransport(lambda r: device.publish(req_topic, encode(r), qos=1), receive,
                         timeout=5)


def _base(store: ArtifactStore) -> Base:
    data = store.file_path("toy", "1.0.0", MEMBER).read_bytes()
    return Base(store.manifest("toy", "1.0.0").files[MEMBER].sha256, data, "1.0.0")


def test_delta_over_mqtt_rebuilds_the_signed_file(tmp_path: Path, store: ArtifactStore,
                                                  transport: MqttTransport) -> None:
    """A head-retrained artifact comes as a few delta chunks and is rebuilt byte for byte."""
    entry = store.manifest("toy", "1.1.0").files[MEMBER]
    dest = tmp_path / "dev" / "model.onnx"
    dest.parent.mkdir()
    moved = mqtt_delta(transport.get, "toy", "1.1.0", MEMBER, entry, _base(store), dest)
    assert dest.read_bytes() == store.file_path("toy", "1.1.0", MEMBER).read_bytes()
    assert 0 < moved < 0.05 * entry.size
    summary = TransferLog(store.root).summary("toy", "1.1.0")
    assert summary.delta_transfers == 1 and summary.delta_bytes_sent == moved


def test_fleet_says_full_when_the_delta_is_not_worth_it(
        tmp_path: Path, store: ArtifactStore, transport: MqttTransport) -> None:
    """Every weight changed: the fleet refuses with "full:", which is a decision, not an error."""
    entry = store.manifest("toy", "1.2.0").files[MEMBER]
    with pytest.raises(NoDelta):
        mqtt_delta(transport.get, "toy", "1.2.0", MEMBER, entry, _base(store),
                   tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_damaged_delta_over_mqtt_is_refused(tmp_path: Path, store: ArtifactStore,
                                            transport: MqttTransport) -> None:
    """A delta damaged on the fleet's disk arrives chunk by chunk and is refused when applied;
    nothing is written where the installer looks."""
    entry = store.manifest("toy", "1.1.0").files[MEMBER]
    offer = DeltaCache(store).offer("toy", "1.1.0", MEMBER, _base(store).sha256)
    assert offer.path is not None
    damaged = bytearray(offer.path.read_bytes())
    damaged[len(damaged) // 3] ^= 0x10
    offer.path.write_bytes(bytes(damaged))
    dest = tmp_path / "model.onnx"
    with pytest.raises(DeltaError):
        mqtt_delta(transport.get, "toy", "1.1.0", MEMBER, entry, _base(store), dest)
    assert not dest.exists()


def test_fleet_cuts_external_data_at_its_tensors(tmp_path: Path, keypair: KeyPair) -> None:
    """The fleet's delta of an ONNX external data file uses the tensor layout the model file
    beside it names, and rebuilds the file exactly."""
    from edgeserve.delta import apply_delta, read_header
    from tests.deltas import external_package

    store = ArtifactStore(tmp_path / "store", keypair.trust)
    w = big_mlp_weights()
    # fine-tuned: the XOR of each tensor with its old self is what makes the tensor encoding win
    for release, (version, weights) in enumerate((("1.0.0", w), ("1.1.0", fine_tuned(w))),
                                                 start=1):
        store.publish(external_package(tmp_path / f"{version}.edgepkg", keypair, weights,
                                       version, release, tmp_path))
    member = "artifacts/onnx-fp32/model.onnx.data"
    base = store.manifest("toy", "1.0.0").files[member].sha256
    deltas = DeltaCache(store, fraction=1.0)
    offer = deltas.offer("toy", "1.1.0", member, base)
    assert offer.method == "delta" and offer.path is not None
    delta = offer.path.read_bytes()
    assert read_header(delta).method == "tensors"
    old = store.file_path("toy", "1.0.0", member).read_bytes()
    assert apply_delta(old, delta) == store.file_path("toy", "1.1.0", member).read_bytes()
