"""Deltas (edgeserve.delta): they rebuild exactly their target, or are refused by hash."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeserve._tensors import LayoutError, Segment, segments
from edgeserve.delta import (
    _HEADER,
    apply_delta,
    diff_file,
    external_layout,
    make_delta,
    make_delta_with,
    model_beside,
    read_header,
)
from edgeserve.errors import DeltaError
from tests.device_agent.models import MlpWeights, mlp_weights, onnx_mlp, tflite_mlp


def _head_retrained(w: MlpWeights, seed: int = 99) -> MlpWeights:
    rng = np.random.default_rng(seed)
    return MlpWeights(w.w1, w.b1, rng.normal(size=w.w2.shape).astype(np.float32),
                      rng.normal(size=w.b2.shape).astype(np.float32))


def _fine_tuned(w: MlpWeights) -> MlpWeights:
    rng = np.random.default_rng(5)
    return MlpWeights(*(a + (rng.normal(size=a.shape) * 1e-3).astype(np.float32)
                        for a in (w.w1, w.b1, w.w2, w.b2)))


@pytest.fixture(scope="module")
def onnx_files() -> dict[str, bytes]:
    w = mlp_weights()
    return {"v1": onnx_mlp(w), "head": onnx_mlp(_head_retrained(w)),
            "fine": onnx_mlp(_fine_tuned(w))}


@pytest.fixture(scope="module")
def tflite_files() -> Iterator[dict[str, bytes]]:
    w = mlp_weights()
    calib = np.random.default_rng(1).normal(size=(32, 4)).astype(np.float32)
    yield {"v1": tflite_mlp(w, True, calib), "head": tflite_mlp(_head_retrained(w), True, calib)}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(old=st.binary(max_size=4096), new=st.binary(max_size=4096),
       fmt=st.sampled_from(["generic", "onnx", "tflite"]))
def test_random_bytes_round_trip(old: bytes, new: bytes, fmt: str) -> None:
    """Any two byte strings: the delta rebuilds the new one exactly, whatever format is claimed."""
    delta = make_delta(old, new, fmt)
    assert apply_delta(old, delta) == new
    header = read_header(delta)
    assert header.target_sha256 == hashlib.sha256(new).hexdigest()


@settings(max_examples=40, deadline=None)
@given(base=st.binary(min_size=64, max_size=2048), edits=st.lists(
    st.tuples(st.integers(0, 2047), st.binary(min_size=1, max_size=16)), max_size=6))
def test_edited_bytes_round_trip_and_stay_small(base: bytes, edits: list[tuple[int, bytes]]) -> None:
    """A file with a few local edits rebuilds exactly, from a delta smaller than the file."""
    new = bytearray(base)
    for at, data in edits:
        new[at % len(new):at % len(new) + len(data)] = data
    delta = make_delta(base, bytes(new))
    assert apply_delta(base, delta) == bytes(new)
    assert len(delta) < len(new) + 200


@pytest.mark.parametrize("kind", ["head", "fine"])
def test_real_onnx_round_trip(onnx_files: dict[str, bytes], kind: str) -> None:
    """Real ONNX files: both encodings rebuild the new model byte for byte."""
    old, new = onnx_files["v1"], onnx_files[kind]
    for method in ("generic", "tensors"):
        assert apply_delta(old, make_delta_with(old, new, method, "onnx")) == new


def test_onnx_segments_are_the_initializers(onnx_files: dict[str, bytes]) -> None:
    """The protobuf reader finds every initializer's bytes where onnx keeps them."""
    import onnx
    from onnx import numpy_helper

    data = onnx_files["v1"]
    found = {s.name: data[s.start:s.end] for s in segments(data, "onnx")}
    model = onnx.load_from_string(data)
    expected = {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}
    assert found == expected


def test_tflite_round_trip_and_segments(tflite_files: dict[str, bytes]) -> None:
    """Real int8 TFLite files: the flatbuffer reader finds the constant buffers, and the delta of
    a head-retrained model rebuilds it."""
    old, new = tflite_files["v1"], tflite_files["head"]
    found = segments(old, "tflite")
    assert found and all(0 < s.start < s.end <= len(old) for s in found)
    for method in ("generic", "tensors"):
        assert apply_delta(old, make_delta_with(old, new, method, "tflite")) == new
    report = diff_file("m.tflite", old, new, "tflite")
    assert report.layout == "read"
    assert {t.status for t in report.tensors} >= {"same", "changed"}


def test_head_retrained_onnx_delta_is_small_and_names_the_head(
        onnx_files: dict[str, bytes]) -> None:
    """Only the head changed: the report says so and the delta is a fraction of the file."""
    report = diff_file("artifacts/m.onnx", onnx_files["v1"], onnx_files["head"])
    status = {t.name: t.status for t in report.tensors}
    assert status == {"w1": "same", "b1": "same", "w2": "changed", "b2": "changed"}
    assert report.delta_bytes < report.full_bytes


def test_unreadable_layout_falls_back_to_generic() -> None:
    """Bytes that are not the claimed format get the generic delta, never an error."""
    old, new = b"not a model " * 50, b"not a model either " * 50
    with pytest.raises(LayoutError):
        make_delta_with(old, new, "tensors", "onnx")
    delta = make_delta(old, new, "onnx")
    assert read_header(delta).method == "generic"
    assert apply_delta(old, delta) == new


def test_tensor_aware_never_worse_than_generic(onnx_files: dict[str, bytes]) -> None:
    """make_delta keeps the smaller encoding."""
    old, new = onnx_files["v1"], onnx_files["fine"]
    kept = make_delta(old, new, "onnx")
    assert len(kept) <= len(make_delta_with(old, new, "generic"))
    assert len(kept) <= len(make_delta_with(old, new, "tensors", "onnx"))


@pytest.mark.parametrize("method", ["generic", "tensors"])
def test_damaged_delta_is_refused(onnx_files: dict[str, bytes], method: str) -> None:
    """A flipped byte anywhere in the payload, or a cut, is refused; never other bytes."""
    old, new = onnx_files["v1"], onnx_files["head"]
    delta = make_delta_with(old, new, method, "onnx")
    for at in range(_HEADER.size, len(delta), max(1, len(delta) // 40)):
        bad = bytearray(delta)
        bad[at] ^= 0x41
        with pytest.raises(DeltaError):
            apply_delta(old, bytes(bad))
    for cut in (0, 7, _HEADER.size, len(delta) // 2, len(delta) - 1):
        with pytest.raises(DeltaError):
            apply_delta(old, delta[:cut])


def test_wrong_base_is_refused(onnx_files: dict[str, bytes]) -> None:
    """A delta applied to another file than its base is refused before anything is built."""
    delta = make_delta(onnx_files["v1"], onnx_files["head"], "onnx")
    with pytest.raises(DeltaError, match="made against"):
        apply_delta(onnx_files["fine"], delta)


def test_header_target_must_be_the_expected_one(onnx_files: dict[str, bytes]) -> None:
    """A delta whose target is not the file the manifest signs is refused up front."""
    delta = make_delta(onnx_files["v1"], onnx_files["head"], "onnx")
    with pytest.raises(DeltaError, match="not the expected"):
        apply_delta(onnx_files["v1"], delta, expected_sha256="0" * 64)


def test_forged_header_is_refused(onnx_files: dict[str, bytes]) -> None:
    """A payload for one target under a header claiming another does not pass the final hash."""
    old = onnx_files["v1"]
    delta = make_delta(old, onnx_files["head"], "onnx")
    magic, method, base, _, size = _HEADER.unpack_from(delta)
    forged = _HEADER.pack(magic, method, base, hashlib.sha256(onnx_files["fine"]).digest(),
                          size) + delta[_HEADER.size:]
    with pytest.raises(DeltaError):
        apply_delta(old, forged)


def test_not_a_delta() -> None:
    """Garbage is refused by its magic, and a header claiming a huge target by its size."""
    with pytest.raises(DeltaError, match="not an edgeserve delta"):
        read_header(b"PK\x03\x04" + b"\0" * 100)
    huge = _HEADER.pack(b"ESDELTA\x01", 1, b"\0" * 32, b"\0" * 32, 1 << 40)
    with pytest.raises(DeltaError):
        read_header(huge)
    assert struct.calcsize("<8sB32s32sQ") == _HEADER.size


def test_large_base_is_matched_whole() -> None:
    """A 24 MB file with 40 KB rewritten at its end: zstd's tables index the whole base, so the
    generic delta is about the size of the change (level 19's own tables would miss most)."""
    rng = np.random.default_rng(0)
    old = rng.normal(size=6_000_000).astype(np.float32).tobytes()
    new = old[:-40_000] + rng.normal(size=10_000).astype(np.float32).tobytes()
    delta = make_delta(old, new)
    assert len(delta) < 60_000, len(delta)
    assert apply_delta(old, delta) == new


@settings(max_examples=150, deadline=None)
@given(body=st.binary(max_size=600), magic=st.booleans(), method=st.sampled_from([1, 2, 3]))
def test_random_deltas_raise_only_delta_error(body: bytes, magic: bool, method: int) -> None:
    """Garbage, or garbage behind a well-formed header, is refused with DeltaError only."""
    old = b"base file " * 20
    delta = body
    if magic:
        delta = _HEADER.pack(b"ESDELTA\x01", method, hashlib.sha256(old).digest(),
                             b"\0" * 32, len(body)) + body
    with pytest.raises(DeltaError):
        apply_delta(old, delta)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=400), fmt=st.sampled_from(["onnx", "tflite"]),
       prefix=st.sampled_from([b"", b"\x08\x09\x3a", b"\x10\x00\x00\x00TFL3"]))
def test_layout_readers_raise_only_layout_error(data: bytes, fmt: str, prefix: bytes) -> None:
    """The wire-format readers meet hostile bytes with LayoutError (or an empty layout)."""
    try:
        found = segments(prefix + data, fmt)
    except LayoutError:
        return
    assert all(0 <= s.start <= s.end <= len(prefix + data) for s in found)


def _external(tmp_path: Path, w: MlpWeights, name: str) -> tuple[bytes, bytes]:
    """(model.onnx, model.onnx.data) of the MLP ``w`` saved with every tensor external."""
    import onnx

    model = onnx.load_from_string(onnx_mlp(w))
    folder = tmp_path / name
    folder.mkdir()
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    return (folder / "model.onnx").read_bytes(), (folder / "model.onnx.data").read_bytes()


def test_onnx_external_data_is_cut_at_its_tensors(tmp_path: Path) -> None:
    """An external data file's tensors are found from the model file beside it; a new head is
    reported as such and the delta rebuilds the data file."""
    w = mlp_weights()
    old_model, old_data = _external(tmp_path, w, "v1")
    new_model, new_data = _external(tmp_path, _head_retrained(w), "v2")
    layout = external_layout("a/model.onnx.data", "a/model.onnx", old_model, new_model)
    found = {s.name: old_data[s.start:s.end] for s in layout[0]}
    assert found == {"w1": w.w1.tobytes(), "b1": w.b1.tobytes(), "w2": w.w2.tobytes(),
                     "b2": w.b2.tobytes()}
    report = diff_file("a/model.onnx.data", old_data, new_data, "onnx", layout)
    assert {t.name: t.status for t in report.tensors} == {
        "w1": "same", "b1": "same", "w2": "changed", "b2": "changed"}
    for method in ("generic", "tensors"):
        delta = make_delta_with(old_data, new_data, method, "onnx", layout)
        assert apply_delta(old_data, delta) == new_data
    assert model_beside("a/model.onnx.data", ["a/model.onnx", "b/x.onnx"]) == "a/model.onnx"
    assert model_beside("a/model.onnx", ["a/model.onnx"]) is None


def test_wrong_external_layout_falls_back_to_generic(tmp_path: Path) -> None:
    """A layout that does not fit the file (ranges past its end) gives the generic delta."""
    w = mlp_weights()
    _, old_data = _external(tmp_path, w, "v1")
    _, new_data = _external(tmp_path, _head_retrained(w), "v2")
    bogus = ([Segment("x", 0, len(old_data) + 10)], [])
    delta = make_delta(old_data, new_data, "onnx", bogus)
    assert read_header(delta).method == "generic"
    assert apply_delta(old_data, delta) == new_data
