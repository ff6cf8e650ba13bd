"""Chunked artifact transfer over real MQTT: fleet answers, device resumes after a cut."""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeserve.contract import FileChunk, FileRequest, decode, device_topic, encode
from edgeserve.device_agent.updates.chunked import ChunkedDownload, fetch_chunked
from edgeserve.errors import TamperedFileError, TransferError
from edgeserve.fleet.artifacts import ArtifactStore
from edgeserve.fleet.files import answer_file_request
from edgeserve.testing import KeyPair, write_test_package

PAYLOAD = hashlib.sha512(b"chunks").digest() * 3000  # 192 KB


def _client(resources: contextlib.ExitStack, host: str, port: int, name: str) -> mqtt.Client:
    """A connected client, disconnected at teardown whatever the test did."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name,
                         protocol=mqtt.MQTTv5)
    client.connect(host, port)
    client.loop_start()
    resources.callback(client.loop_stop)
    resources.callback(client.disconnect)
    return client


def _subscribe(client: mqtt.Client, topic: str) -> None:
    """Subscribe and return once the broker granted it: until then it may drop what comes."""
    granted = threading.Event()
    client.on_subscribe = lambda *_a: granted.set()
    client.subscribe(topic, qos=1)
    assert granted.wait(10), f"the broker did not grant a subscription to {topic}"


@pytest.fixture
def store(tmp_path: Path, keypair: KeyPair) -> ArtifactStore:
    store = ArtifactStore(tmp_path / "store", keypair.trust)
    pkg = tmp_path / "toy.edgepkg"
    write_test_package(pkg, keypair, {"artifacts/model.onnx": PAYLOAD})
    store.publish(pkg)
    return store


def test_chunked_download_over_mqtt_resumes(tmp_path: Path, store: ArtifactStore,
                                            mqtt_broker: tuple[str, int], fleet_name: str,
                                            resources: contextlib.ExitStack) -> None:
    """A device fetches an artifact in chunks over MQTT, dies half-way, and fetches only the rest."""
    host, port = mqtt_broker
    req_topic = device_topic(fleet_name, "dev1", "files", "req")
    data_topic = device_topic(fleet_name, "dev1", "files", "data")
    fleet = _client(resources, host, port, f"{fleet_name}-fleet")
    device = _client(resources, host, port, f"{fleet_name}-dev1")
    chunks: queue.Queue[FileChunk] = queue.Queue()

    def fleet_on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        answer = answer_file_request(store, decode(FileRequest, msg.payload))
        c.publish(data_topic, encode(answer), qos=1)

    def device_on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        chunks.put(decode(FileChunk, msg.payload))

    fleet.on_message = fleet_on_message
    device.on_message = device_on_message
    # both, not only the device's: a request sent before the fleet's SUBACK may be dropped
    _subscribe(fleet, req_topic)
    _subscribe(device, data_topic)

    def send(request: FileRequest) -> None:
        device.publish(req_topic, encode(request), qos=1)

    def receive(timeout: float) -> FileChunk | None:
        try:
            return chunks.get(timeout=timeout)
        except queue.Empty:
            return None

    entry = store.manifest("toy", "1.0.0").files["artifacts/model.onnx"]
    dest = tmp_path / "dev" / "model.onnx"
    first = ChunkedDownload("toy", "1.0.0", "artifacts/model.onnx", dest, entry.size,
                            entry.sha256, chunk_bytes=16 * 1024)
    for _ in range(5):  # five chunks, then the "device dies"
        send(first.request())
        chunk = receive(5)
        assert chunk is not None
        first.accept(chunk)
    assert first.offset == 5 * 16 * 1024
    second = ChunkedDownload("toy", "1.0.0", "artifacts/model.onnx", dest, entry.size,
                             entry.sha256, chunk_bytes=16 * 1024)
    result = fetch_chunked(second, send, receive, timeout=5)
    assert result.resumed_from == 5 * 16 * 1024
    assert result.bytes_transferred == entry.size - result.resumed_from
    assert dest.read_bytes() == PAYLOAD
    unknown = ChunkedDownload("toy", "1.0.0", "artifacts/none.onnx", tmp_path / "x",
                              10, "0" * 64)
    with pytest.raises(TransferError, match="fleet refused"):
        fetch_chunked(unknown, send, receive, timeout=5)


def test_chunk_for_wrong_size_or_hash_is_refused(tmp_path: Path, store: ArtifactStore) -> None:
    """A file whose bytes or size disagree with the signed manifest is never installed."""
    entry = store.manifest("toy", "1.0.0").files["artifacts/model.onnx"]
    wrong_hash = ChunkedDownload("toy", "1.0.0", "artifacts/model.onnx", tmp_path / "a",
                                 entry.size, "f" * 64, chunk_bytes=256 * 1024)
    while not wrong_hash.accept(answer_file_request(store, wrong_hash.request())):
        pass
    with pytest.raises(TamperedFileError):
        wrong_hash.finish()
    assert not (tmp_path / "a").exists()
    wrong_size = ChunkedDownload("toy", "1.0.0", "artifacts/model.onnx", tmp_path / "b", 10,
                                 entry.sha256)
    with pytest.raises(TamperedFileError, match="fleet reports"):
        wrong_size.accept(answer_file_request(store, wrong_size.request()))
