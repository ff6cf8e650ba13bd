"""Chunked transfer serves a device only what its desired state names, at a bounded rate: 50
requests of 150 bytes from anyone on the broker once returned 538 KB of model."""

from __future__ import annotations

from pathlib import Path

from edgeserve.contract import FileRequest
from edgeserve.fleet.artifacts import ArtifactStore
from edgeserve.fleet.desired import DesiredStates
from edgeserve.fleet.files import FileGate
from edgeserve.fleet.store import Store
from edgeserve.testing import KeyPair, publish_versions


def request(version: str = "1.0.0") -> FileRequest:
    return FileRequest(transfer="t1", model="toy", version=version,
                       file="artifacts/model.onnx", offset=0, length=65536)


def test_only_the_versions_a_device_should_run_are_served(tmp_path: Path,
                                                         keypair: KeyPair) -> None:
    """cam-7, whose desired state names toy 1.0.0, gets it; 2.0.0, and any other device, get a
    refusal naming why."""
    artifacts = ArtifactStore(tmp_path / "artifacts", keypair.trust)
    publish_versions(artifacts, tmp_path, keypair, ["1.0.0", "2.0.0"])
    with Store.open(f"sqlite:///{tmp_path}/fleet.db") as store:
        desired = DesiredStates(store, artifacts, "http://fleet")
        desired.set_model("cam-7", "toy", "1.0.0")
        gate = FileGate(desired.get)
        assert gate.admit("cam-7", request()) == (True, None)
        answer, why = gate.admit("cam-7", request("2.0.0"))
        assert answer and why is not None and "not in the desired state of device cam-7" in why
        answer, why = gate.admit("intruder", request())
        assert answer and why is not None and "intruder" in why
        assert gate.refused == 2


def test_requests_over_the_rate_are_dropped_unanswered() -> None:
    """A burst beyond the bucket gets no answer at all; the bucket refills with time."""
    now = [0.0]
    gate = FileGate(lambda device: None, rate=2.0, burst=3.0, clock=lambda: now[0])
    answered = [gate.admit("d1", request())[0] for _ in range(10)]
    assert answered == [True] * 3 + [False] * 7 and gate.dropped == 7
    assert gate.admit("d2", request())[0]  # per device
    now[0] += 1.0
    assert [gate.admit("d1", request())[0] for _ in range(3)] == [True, True, False]
