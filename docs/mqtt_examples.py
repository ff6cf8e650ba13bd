"""Print the JSON payload examples of docs/mqtt.md, built with the contract models themselves
(``python docs/mqtt_examples.py``). tests/fleet/test_telemetry_docs.py checks that every example
in docs/mqtt.md still decodes with the model it is labelled with."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeserve.contract import (
    Ack,
    Desired,
    DesiredModel,
    FileChunk,
    FileRequest,
    FleetStatus,
    Message,
    ModelReport,
    Reported,
    Status,
    TelemetryBatch,
    VersionRef,
    Window,
    sign_desired,
)
from edgeserve.device_agent.observe import InferenceEvent
from edgeserve.device_agent.telemetry.monitor import Monitor
from edgeserve.device_agent.telemetry.outbox import Outbox
from edgeserve.telemetry import ReferenceStats

TS = 1_795_600_000.0


def telemetry() -> TelemetryBatch:
    """A real window from the monitor: 4-feature classifier, drifted inputs, and health."""
    rng = np.random.default_rng(0)
    x_ref = rng.normal(size=(500, 4))
    y_ref = rng.dirichlet(np.ones(3), size=500)
    reference = ReferenceStats.from_arrays({"x": x_ref}, {"y": y_ref}, classifier_outputs=("y",))
    with tempfile.TemporaryDirectory() as tmp:
        outbox = Outbox(Path(tmp) / "o.db")
        now = [TS]
        monitor = Monitor(outbox, references=lambda m, v: reference, clock=lambda: now[0],
                          health=lambda: None)
        monitor.watch("detector", "2.1.0")
        for i in range(120):
            x = rng.normal(loc=0.8, size=(1, 4))
            y = rng.dirichlet(np.ones(3), size=1)
            error = RuntimeError("bad input") if i % 40 == 0 else None
            monitor.on_inference(InferenceEvent("detector", "2.1.0", {"x": x},
                                                None if error else {"y": y},
                                                float(rng.gamma(4, 1.5)), error))
        monitor.flush(TS + 60)
        model_window = Window.model_validate_json(outbox.pending(limit=1)[0].data)
        outbox.close()
    health = Window(seq=model_window.seq + 1, start=TS, end=TS + 60, health={
        "mem_used_mb": 612.4, "mem_total_mb": 3793.0, "disk_free_mb": 20480.5,
        "cpu_load": 0.42, "temp_c": 51.2})
    return TelemetryBatch(device_id="cam-7", sent=TS + 61, floor=model_window.seq,
                          windows=[model_window.model_copy(update={"dropped": 0}), health])


def _example_fleet_key() -> Ed25519PrivateKey:
    """A fixed key, so the example signature is the same every time it is generated."""
    return Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def examples() -> dict[str, Message]:
    ref = VersionRef(release=7, url="http://fleet.local:8080/artifacts/detector/2.1.0/",
                     manifest_sha256="9f" * 32)
    desired = Desired(revision=12, ts=TS, rollout="detector-2.1.0-canary", device_id="cam-7",
                      expires=TS + 30 * 86400, models={
                          "detector": DesiredModel(active="2.1.0", versions={"2.1.0": ref})})
    return {
        "Status (birth)": Status(device_id="cam-7", state="online", ts=TS,
                                 agent_version="0.1.0", profile="raspberry-pi-5",
                                 models={"detector": "2.1.0"}, labels={"site": "berlin"}),
        "Status (Last Will)": Status(device_id="cam-7", state="offline", ts=TS,
                                     reason="connection lost"),
        "TelemetryBatch": telemetry(),
        "Ack": Ack(seq=1042),
        "Desired": desired,
        "SignedDesired": sign_desired(desired, _example_fleet_key()),
        "Reported": Reported(device_id="cam-7", revision=12, ts=TS + 5, models={
            "detector": ModelReport(active="2.1.0", previous="2.0.3",
                                    installed=["2.0.3", "2.1.0"], state="committed",
                                    progress=1.0)}),
        "FileRequest": FileRequest(transfer="t-cam-7-1", model="detector", version="2.1.0",
                                   file="artifacts/model.tflite", offset=0, length=65536),
        "FileChunk": FileChunk.of("t-cam-7-1", "artifacts/model.tflite", 0, 11, b"hello world"),
        "FleetStatus": FleetStatus(state="online", instance="3f9c2a61b7d0", ts=TS,
                                   resumed=False),
    }


def pretty(value: object, indent: int = 0, width: int = 96) -> str:
    """JSON with nesting shown, but anything that fits on one line kept on one line."""
    flat = json.dumps(value, separators=(", ", ": "))
    if len(flat) + indent <= width or not isinstance(value, dict | list):
        return flat
    pad = " " * (indent + 2)
    if isinstance(value, dict):
        items = [f"{pad}{json.dumps(k)}: {pretty(v, indent + 2, width)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if all(not isinstance(v, dict | list) for v in value):
        lines, line = [], ""
        for v in value:
            part = json.dumps(v)
            if line and len(pad) + len(line) + len(part) + 2 > width:
                lines.append(line.rstrip())
                line = ""
            line += part + ", "
        lines.append(line.rstrip(", "))
        return "[\n" + ",\n".join(pad + ln.rstrip(",") for ln in lines) + "\n" + " " * indent + "]"
    items = [pad + pretty(v, indent + 2, width) for v in value]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"


def main() -> None:
    for title, message in examples().items():
        print(f"#### {title}\n\n<!-- model: {type(message).__name__} -->\n```json")
        print(pretty(message.model_dump(mode="json", exclude_none=True)))
        print("```\n")


if __name__ == "__main__":
    main()
