"""docs/mqtt.md stays true: each JSON example decodes with the contract model it names."""

from __future__ import annotations

import re
from pathlib import Path

from edgeserve import contract

DOC = Path(__file__).resolve().parents[2] / "docs" / "mqtt.md"
EXAMPLE = re.compile(r"<!-- model: (\w+) -->\s*```json\n(.*?)```", re.S)


def test_every_mqtt_doc_example_decodes_with_its_model() -> None:
    """Every labelled example is a valid payload, and every payload model has an example."""
    examples = EXAMPLE.findall(DOC.read_text(encoding="utf-8"))
    assert examples
    for name, body in examples:
        contract.decode(getattr(contract, name), body.encode(), where=f"docs/mqtt.md {name}")
    assert {name for name, _ in examples} >= {"Status", "TelemetryBatch", "Ack", "Desired",
                                               "SignedDesired", "Reported", "FileRequest",
                                               "FileChunk", "FleetStatus"}
