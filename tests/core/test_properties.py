"""Property-based tests: random and mutated documents only ever raise EdgeserveError subclasses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeserve.contract import (
    Ack,
    Desired,
    FileChunk,
    FileRequest,
    Reported,
    Status,
    TelemetryBatch,
    decode,
    encode,
    parse_topic,
)
from edgeserve.errors import EdgeserveError
from edgeserve.manifest import parse_manifest
from edgeserve.profiles import parse_profile
from edgeserve.telemetry import LatencyHistogram, ReferenceStats
from edgeserve.testing import make_manifest

MESSAGES = [Status, Desired, Reported, TelemetryBatch, Ack, FileChunk, FileRequest]
PROFILE_TEXT = (Path(__file__).parents[2] / "hw-profiles" / "raspberry-pi-5.toml").read_text()
SHA = "ab" * 32

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)


def _samples() -> list[dict[str, Any]]:
    hist = LatencyHistogram()
    hist.add(1.5)
    batch = TelemetryBatch(device_id="d", windows=[{  # type: ignore[list-item]
        "seq": 1, "start": 0, "end": 1, "model": "m", "version": "1.0.0", "requests": 1,
        "latency": hist.to_data()}])
    return [
        json.loads(encode(m)) for m in (
            Status(device_id="d", state="online"),
            Desired(revision=1, models={"m": {"active": "1.0.0", "versions": {  # type: ignore[dict-item]
                "1.0.0": {"release": 1, "url": "http://x/", "manifest_sha256": SHA}}}}),
            Reported(device_id="d", revision=1, models={"m": {"active": "1.0.0"}}),  # type: ignore[dict-item]
            batch,
            Ack(seq=3),
            FileChunk.of("t", "f", 0, 1, b"x"),
        )
    ]


def _mutate(doc: Any, path: list[int], value: Any) -> Any:
    """Replace one node (chosen by ``path`` indices) of a JSON document with ``value``."""
    if not path or not isinstance(doc, dict | list) or not doc:
        return value
    if isinstance(doc, dict):
        key = sorted(doc)[path[0] % len(doc)]
        return {**doc, key: _mutate(doc[key], path[1:], value)}
    i = path[0] % len(doc)
    return [*doc[:i], _mutate(doc[i], path[1:], value), *doc[i + 1:]]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(MESSAGES), st.binary(max_size=300))
def test_random_bytes_to_every_message(model: type, payload: bytes) -> None:
    """Random bytes decode to a message or raise a ContractError; nothing else escapes."""
    try:
        decode(model, payload)
    except EdgeserveError:
        pass


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 5), st.lists(st.integers(0, 50), max_size=6), json_values,
       st.sampled_from(MESSAGES))
def test_mutated_messages(which: int, path: list[int], value: Any, model: type) -> None:
    """Valid payloads with one node replaced by random JSON only raise EdgeserveError."""
    doc = _mutate(_samples()[which], path, value)
    try:
        raw = json.dumps(doc, allow_nan=True).encode()
    except (ValueError, TypeError):
        return
    try:
        decode(model, raw)
    except EdgeserveError:
        pass


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 50), max_size=6), json_values)
def test_mutated_manifests(path: list[int], value: Any) -> None:
    """Manifests with one node replaced by random JSON only raise EdgeserveError."""
    doc = json.loads(make_manifest().canonical_bytes())
    mutated = _mutate(doc, path, value)
    # Only json.dumps may be excused: a ValueError from the parser (pydantic's ValidationError is
    # one) is exactly the leak this test hunts, so it must fail the test.
    try:
        raw = json.dumps(mutated, allow_nan=True).encode()
    except (ValueError, TypeError):
        return
    try:
        parse_manifest(raw)
    except EdgeserveError:
        pass


@settings(max_examples=200)
@given(st.binary(max_size=400))
def test_random_manifest_bytes(raw: bytes) -> None:
    """Random bytes as a manifest raise EdgeserveError only."""
    try:
        parse_manifest(raw)
    except EdgeserveError:
        pass


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(PROFILE_TEXT) - 1), st.integers(0, 40), st.text(max_size=12))
def test_mutated_profiles(pos: int, cut: int, insert: str) -> None:
    """Profile TOML with random edits raises ProfileError (an EdgeserveError) or parses."""
    text = PROFILE_TEXT[:pos] + insert + PROFILE_TEXT[pos + cut:]
    try:
        parse_profile(text, "fuzz.toml")
    except EdgeserveError:
        pass


@settings(max_examples=200)
@given(st.text(max_size=80))
def test_random_topics(topic: str) -> None:
    """Random topic strings parse or raise ContractError."""
    try:
        parse_topic(topic)
    except EdgeserveError:
        pass


@settings(max_examples=100)
@given(st.binary(max_size=200))
def test_random_reference_stats(raw: bytes) -> None:
    """Random bytes as reference statistics raise EdgeserveError only."""
    try:
        ReferenceStats.from_json(raw)
    except EdgeserveError:
        pass
