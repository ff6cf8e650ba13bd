"""The document base (edgeserve/_doc.py): the pydantic-style API the code base relies on, kept
on msgspec structs (issue 17)."""

from __future__ import annotations

import json

import pytest

from edgeserve._doc import ValidationError
from edgeserve._validation import validate_json
from edgeserve.contract import Desired, HealthPolicy, Window, decode, encode
from edgeserve.errors import ContractError, SchemaError
from edgeserve.manifest import FileEntry, ImagePreprocessing, Manifest, TensorSpec
from edgeserve.telemetry.histogram import LatencyHistogram
from edgeserve.telemetry.sketch import ReferenceStats

SHA = "a" * 64


def _desired() -> Desired:
    return Desired(revision=3, models={"m": {"active": "1.0.0", "versions": {"1.0.0": {
        "release": 1, "url": "http://h/p/", "manifest_sha256": SHA}}}})


def test_construction_validates_and_converts_like_pydantic() -> None:
    """Keyword construction turns nested dicts into documents, applies lax conversions and
    refuses bad values with a ValidationError (a ValueError, as pydantic's)."""
    desired = _desired()
    assert desired.models["m"].versions["1.0.0"].release == 1
    assert isinstance(desired.models["m"].health, HealthPolicy)
    assert Window(seq="7", start=1, end=2).seq == 7  # "7" -> 7, as pydantic's lax mode
    assert isinstance(Window(seq=1, start=1, end=2).start, float)
    assert ImagePreprocessing(size=[2, 3]).size == (2, 3)
    with pytest.raises(ValidationError) as info:
        Window(seq=0, start=1, end=2)
    assert isinstance(info.value, ValueError)
    assert info.value.errors()[0]["loc"] == ("seq",)
    with pytest.raises(ValidationError, match="window end is before its start"):
        Window(seq=1, start=5, end=2)
    with pytest.raises(TypeError, match="keyword arguments only"):
        Window(1)  # type: ignore[misc]


def test_alias_and_copy() -> None:
    """Renamed fields answer to both names on construction; model_copy replaces fields."""
    spec = TensorSpec(name="x", dtype="float32", shape=[1, 4])
    assert spec.model_copy(update={"layout": "NC"}).layout == "NC"
    assert spec.layout is None  # the original is untouched (frozen)
    entry = FileEntry(sha256=SHA, size=1)
    assert hash(entry) == hash(FileEntry(sha256=SHA, size=1))
    with pytest.raises(AttributeError):
        entry.size = 2  # type: ignore[misc]
    assert ReferenceStats(schema_="edgeserve.reference/1", samples=1) == \
        ReferenceStats(schema="edgeserve.reference/1", samples=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        ReferenceStats(schema_="edgeserve.reference/2", samples=1)  # type: ignore[arg-type]


def test_dumps_match_pydantic_forms() -> None:
    """exclude_none / exclude_defaults / by_alias / python and JSON modes."""
    hist = LatencyHistogram()
    hist.add(2.0)
    window = Window(seq=1, start=0, end=60, model="m", version="1.0.0", requests=1,
                    latency=hist.to_data())
    data = window.model_dump(mode="json", exclude_none=True)
    assert "inputs" not in data and data["latency"]["n"] == 1 and "mn" in data["latency"]
    assert json.loads(window.model_dump_json(exclude_none=True)) == data
    assert list(data)[:2] == ["v", "seq"]  # base fields first, as pydantic
    assert hist.to_dict() == {"c": [1], "o": hist.to_data().o, "n": 1, "s": 2.0, "mn": 2.0,
                              "mx": 2.0}
    schema_key = {"schema": "edgeserve.manifest/1"}
    manifest = Manifest.model_validate({
        **schema_key, "name": "toy", "version": "1.0.0", "release": 1,
        "source": {"framework": "onnx", "sha256": SHA},
        "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [None, 2]}],
        "artifacts": [{"id": "a", "format": "onnx", "precision": "fp32", "path": "m.onnx"}]})
    assert manifest.model_dump(mode="json", by_alias=True)["schema"] == "edgeserve.manifest/1"
    assert "schema_" in manifest.model_dump(mode="json")
    assert json.loads(manifest.canonical_bytes())["created"].endswith("Z")
    desired = _desired()
    assert decode(Desired, encode(desired)) == desired


def test_errors_name_the_key_the_value_and_what_was_expected() -> None:
    """msgspec's first error becomes the one-line form, dict keys included (msgspec leaves
    them out of its paths)."""
    payload = {"v": 1, "revision": 1, "models": {"ok": {"active": "1", "versions": {"1": {
        "release": 1, "url": "http://h/", "manifest_sha256": SHA}}}, "m": {
        "active": "1", "versions": {"1": {"release": 1, "url": "http://h/",
                                          "manifest_sha256": "zz"}}}}}
    with pytest.raises(ContractError) as info:
        decode(Desired, json.dumps(payload).encode(), "desired")
    assert str(info.value) == ("desired: key 'models.m.versions.1.manifest_sha256': found 'zz' "
                               "(str), expected a string matching regex '^[0-9a-f]{64}$'")
    with pytest.raises(SchemaError, match=r"key 'layout': found 'NWHC' \(str\), expected one of "
                                          "'NCHW', 'NHWC'"):
        validate_json(ImagePreprocessing, '{"size": [1, 1], "layout": "NWHC"}', "pp")
    with pytest.raises(SchemaError, match="key 'size' is missing"):
        validate_json(ImagePreprocessing, "{}", "pp")
    with pytest.raises(SchemaError, match="key 'sizes' is not allowed here"):
        validate_json(ImagePreprocessing, '{"size": [1, 1], "sizes": 1}', "pp")
    with pytest.raises(SchemaError, match="pp: not valid JSON"):
        validate_json(ImagePreprocessing, '{"size": ', "pp")


def test_pydantic_models_hold_documents() -> None:
    """The fleet's pydantic models (RolloutSpec.health) validate and dump documents."""
    import pydantic

    class Spec(pydantic.BaseModel):
        health: HealthPolicy = pydantic.Field(default_factory=HealthPolicy)

    spec = Spec.model_validate_json('{"health": {"min_inferences": 3}}')
    assert spec.health == HealthPolicy(min_inferences=3)
    assert spec.model_dump(mode="json")["health"]["min_inferences"] == 3
    with pytest.raises(pydantic.ValidationError, match="min_inferences"):
        Spec.model_validate({"health": {"min_inferences": -1}})


def test_exclude_none_takes_the_short_walk_to_the_same_result() -> None:
    """``model_dump(exclude_none=True)`` looks only at the fields that may be None or hold
    documents (a per-class plan); it must give what the full walk gives, nested documents,
    lists and dicts of them included."""
    from edgeserve._doc import _prune
    from edgeserve.contract import TelemetryBatch
    from edgeserve.profiles import list_profiles

    hist = LatencyHistogram()
    for value in (0.5, 1.5, 40.0):
        hist.add(value)
    documents: list[object] = [
        Window(seq=1, start=0, end=60, model="m", version="1", requests=3,
               latency=hist.to_data()),
        Window(seq=2, start=0, end=60, requests=0),
        TelemetryBatch(device_id="d1", windows=[Window(seq=3, start=0, end=1, requests=1)]),
        Desired(device_id="d1", revision=1, models={}),
        *list_profiles()[:3],
    ]
    import msgspec

    for doc in documents:
        slow = msgspec.to_builtins(doc)
        _prune(doc, slow, True, False)
        assert doc.model_dump(mode="json", by_alias=True, exclude_none=True) == slow  # type: ignore[attr-defined]
        assert json.loads(doc.model_dump_json(by_alias=True, exclude_none=True)) == slow  # type: ignore[attr-defined]
