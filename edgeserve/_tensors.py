"""Where a model file keeps its tensors' bytes, read straight from the wire format.

A delta against the previous version of a model (:mod:`edgeserve.delta`) is cut at tensor
boundaries, so it must know them without onnx, TensorFlow or LiteRT installed: the fleet and the
``package diff`` command run without the converter, and a device never has it. Both readers walk
the bytes themselves:

* **ONNX** (protobuf): ``ModelProto.graph`` (field 7) → ``GraphProto.initializer`` (field 5) →
  ``TensorProto.raw_data`` (field 9) or its packed typed data, named by ``TensorProto.name``
  (field 8). Initializers stored as external data (``data_location`` 14 = 1) name their file,
  offset and length in ``external_data`` (field 13, key/value pairs):
  :func:`onnx_external_segments` reads those ranges of the data file from the model file.
* **TFLite** (flatbuffer, schema ``TFL3``): ``Model.buffers`` (field 4) → ``Buffer.data``
  (field 0), or ``offset``/``size`` for buffers stored after the flatbuffer (models over 2 GB);
  a buffer is named after the first tensor of the first subgraph that uses it.

Anything unexpected raises :class:`LayoutError`; callers then treat the file as opaque bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["LayoutError", "Segment", "check_segments", "onnx_external_segments", "onnx_segments",
           "segments", "tflite_segments"]


class LayoutError(ValueError):
    """The bytes are not the model format they were said to be (or use a layout not read here)."""


@dataclass(frozen=True)
class Segment:
    """One tensor's bytes: ``data[start:end]``."""

    name: str
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


# -- protobuf -------------------------------------------------------------------------------------

def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise LayoutError("protobuf varint runs past its message")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end) of one message; for varints the end is
    where the varint stops."""
    found = []
    pos = start
    while pos < end:
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, after = _varint(data, pos, end)
        elif wire == 1:
            after = pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos, end)
            after = pos + length
        elif wire == 5:
            after = pos + 4
        else:
            raise LayoutError(f"protobuf wire type {wire} is not used by ONNX")
        if after > end or number == 0:
            raise LayoutError("protobuf field runs past its message")
        found.append((number, wire, pos, after))
        pos = after
    return found


_TYPED_DATA = {4, 5, 7, 10, 11}  # float_data, int32_data, int64_data, double_data, uint64_data


def _initializers(data: bytes) -> list[tuple[int, int]]:
    top = _fields(data, 0, len(data))
    graphs = [(s, e) for number, wire, s, e in top if number == 7 and wire == 2]
    if len(graphs) != 1 or not any(n == 1 and w == 0 for n, w, _, _ in top):
        raise LayoutError("not an ONNX model (no single graph and IR version)")
    return [(s, e) for n, w, s, e in _fields(data, *graphs[0]) if n == 5 and w == 2]


def onnx_segments(data: bytes) -> list[Segment]:
    """The byte ranges of an ONNX model's initializers (raw or packed typed data)."""
    found = []
    for start, end in _initializers(data):
        name, body = "", None
        for n, w, s, e in _fields(data, start, end):
            if n == 8 and w == 2:
                name = data[s:e].decode("utf-8", "replace")
            elif w == 2 and (n == 9 or n in _TYPED_DATA) and e > s:
                body = (s, e)
        if body is not None:
            found.append(Segment(name, *body))
    return found


def _entry(data: bytes, start: int, end: int) -> tuple[str, str]:
    key = value = ""
    for n, w, s, e in _fields(data, start, end):
        if w == 2 and n in (1, 2):
            text = data[s:e].decode("utf-8", "replace")
            key, value = (text, value) if n == 1 else (key, text)
    return key, value


def onnx_external_segments(model: bytes, location: str) -> list[Segment]:
    """The byte ranges, in the external data file ``location`` (as the model names it), of the
    initializers the ONNX ``model`` stores there."""
    found = []
    for start, end in _initializers(model):
        fields = _fields(model, start, end)
        name = next((model[s:e].decode("utf-8", "replace") for n, w, s, e in fields
                     if n == 8 and w == 2), "")
        info = dict(_entry(model, s, e) for n, w, s, e in fields if n == 13 and w == 2)
        if info.get("location") != location:
            continue
        try:
            offset, length = int(info.get("offset", 0)), int(info["length"])
        except (KeyError, ValueError):
            raise LayoutError(f"initializer {name!r}: external data without a length") from None
        found.append(Segment(name, offset, offset + length))
    return found


# -- flatbuffers ----------------------------------------------------------------------------------

class _Flat:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def u32(self, pos: int) -> int:
        if pos < 0 or pos + 4 > len(self.data):
            raise LayoutError("flatbuffer offset out of range")
        return int(struct.unpack_from("<I", self.data, pos)[0])

    def field(self, table: int, index: int) -> int | None:
        """Position of field ``index`` of the table at ``table``, None when absent."""
        vtable = table - struct.unpack_from("<i", self.data, table)[0]
        if vtable < 0 or vtable + 4 > len(self.data):
            raise LayoutError("flatbuffer vtable out of range")
        size = struct.unpack_from("<H", self.data, vtable)[0]
        slot = 4 + 2 * index
        if slot + 2 > size:
            return None
        offset = struct.unpack_from("<H", self.data, vtable + slot)[0]
        return table + offset if offset else None

    def ref(self, pos: int) -> int:
        return pos + self.u32(pos)

    def vector(self, table: int, index: int) -> tuple[int, int]:
        """(first element position, length) of a vector field; (0, 0) when absent."""
        pos = self.field(table, index)
        if pos is None:
            return 0, 0
        vec = self.ref(pos)
        length = self.u32(vec)
        return vec + 4, length

    def tables(self, table: int, index: int) -> list[int]:
        first, length = self.vector(table, index)
        if first + 4 * length > len(self.data):
            raise LayoutError("flatbuffer vector runs past the file")
        return [self.ref(first + 4 * i) for i in range(length)]

    def string(self, table: int, index: int) -> str:
        first, length = self.vector(table, index)
        return self.data[first:first + length].decode("utf-8", "replace")

    def u64(self, table: int, index: int) -> int:
        pos = self.field(table, index)
        return 0 if pos is None else int(struct.unpack_from("<Q", self.data, pos)[0])


def _buffer_names(flat: _Flat, model: int) -> dict[int, str]:
    names: dict[int, str] = {}
    for subgraph in flat.tables(model, 2):
        for tensor in flat.tables(subgraph, 0):
            pos = flat.field(tensor, 2)
            if pos is not None:
                names.setdefault(flat.u32(pos), flat.string(tensor, 3))
    return names


def tflite_segments(data: bytes) -> list[Segment]:
    """The byte ranges of a TFLite model's constant buffers."""
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise LayoutError("not a TFLite model (no TFL3 identifier)")
    flat = _Flat(data)
    try:
        model = flat.ref(0)
        names = _buffer_names(flat, model)
        found = []
        for i, buffer in enumerate(flat.tables(model, 4)):
            first, length = flat.vector(buffer, 0)
            start, size = (first, length) if length else (flat.u64(buffer, 1), flat.u64(buffer, 2))
            if size and start > 1:  # offset 0/1 mark "no data" in the >2 GB layout
                found.append(Segment(names.get(i, f"buffer {i}"), start, start + size))
    except struct.error as exc:
        raise LayoutError(f"flatbuffer is cut short ({exc})") from None
    return found


def check_segments(found: list[Segment], size: int) -> list[Segment]:
    """``found`` sorted, checked not to overlap or run past ``size`` (LayoutError)."""
    found = sorted(found, key=lambda s: s.start)
    at = 0
    for segment in found:
        if segment.start < at or segment.end > size or segment.end < segment.start:
            raise LayoutError("tensor ranges overlap or run past the end of the file")
        at = segment.end
    return found


def segments(data: bytes, fmt: str) -> list[Segment]:
    """Tensor byte ranges of ``data`` in format ``fmt`` ("onnx", "tflite"), sorted, checked not
    to overlap or run past the end; LayoutError for any other format or a file not read here."""
    if fmt == "onnx":
        found = onnx_segments(data)
    elif fmt == "tflite":
        found = tflite_segments(data)
    else:
        raise LayoutError(f"no tensor layout reader for {fmt!r} files")
    return check_segments(found, len(data))
