"""Deltas between two versions of a file: a smaller way to obtain bytes the manifest already signs.

A delta never carries trust. The signed manifest pins the new artifact's sha256; a delta is only
a recipe to rebuild those bytes from a file the device already holds (and verified). Whoever
applies one checks the base it was made against, the bytes it rebuilds, and then — before
anything is installed — the signed manifest's sha256 of them.

The container (all integers little-endian)::

    b"ESDELTA" 0x01     magic and container version
    u8                  method: 1 generic, 2 tensor segments
    32 bytes            sha256 of the base (the old file)
    32 bytes            sha256 of the target (the new file)
    u64                 target size
    ...                 one zstd frame compressed with the base as a raw-content dictionary

* **generic**: the frame holds the target itself. zstd finds everything the target shares with
  the base (long-distance matching, a window over both), for any format — Core ML packages,
  sample files, an ONNX file this module cannot read.
* **tensor segments**: the frame holds an op list and the bytes it consumes. Each of the target's
  tensors (:mod:`edgeserve._tensors`) is a ``COPY`` of a base range when the base has a tensor with
  the same bytes, an ``XOR`` with the base tensor of the same name and size when that compresses
  better than the bytes themselves (fine-tuned weights keep most sign and exponent bits), or a
  ``LITERAL``; the graph bytes between tensors are literals, which the dictionary compresses
  against the base's graph. Applying needs no model parser: only zstandard and hashlib.

:func:`make_delta` builds both and keeps the smaller, so the tensor-aware path is never worse
than the generic one, and any file whose layout cannot be read gets the generic one.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import zstandard

from ._tensors import LayoutError, Segment, check_segments, onnx_external_segments, segments
from .errors import DeltaError

__all__ = [
    "DEFAULT_FRACTION",
    "DeltaHeader",
    "FileDiff",
    "Layout",
    "LayoutError",
    "TensorChange",
    "apply_delta",
    "delta_format",
    "diff_file",
    "external_layout",
    "make_delta",
    "model_beside",
    "read_header",
]

Layout = tuple[list[Segment], list[Segment]]
"""Tensor ranges of the old and the new file, when the caller knows them (external data)."""

MAGIC = b"ESDELTA\x01"
GENERIC, TENSORS = 1, 2
METHODS = {GENERIC: "generic", TENSORS: "tensors"}
DEFAULT_FRACTION = 0.25
"""Serve a delta only when it is at most this fraction of the full file. A delta costs the device
memory (base, delta and rebuilt file at once) and, when refused, the delta's bytes on top of the
full download; below a quarter it saves at least 3/4 of the transfer (docs/deltas.md)."""
_HEADER = struct.Struct("<8sB32s32sQ")
_OP = struct.Struct("<BQQ")
_COPY, _LITERAL, _XOR = 0, 1, 2
_LEVEL = 19
_MAX_TARGET = 1 << 34
"""16 GiB: no artifact is larger; a header claiming more is damaged."""


@dataclass(frozen=True)
class DeltaHeader:
    method: str
    base_sha256: str
    target_sha256: str
    target_size: int


def read_header(delta: bytes) -> DeltaHeader:
    """The header of a delta (DeltaError when it is not one)."""
    if len(delta) < _HEADER.size or not delta.startswith(MAGIC):
        raise DeltaError("not an edgeserve delta (bad magic or cut short)")
    _, method, base, target, size = _HEADER.unpack_from(delta)
    if method not in METHODS or size > _MAX_TARGET:
        raise DeltaError(f"unknown delta method {method} or implausible size {size}")
    return DeltaHeader(METHODS[method], base.hex(), target.hex(), size)


def delta_format(path: str, fmt: str | None = None) -> str:
    """How to cut a file: "onnx", "tflite", or "generic" (the manifest's artifact format wins
    over the file name)."""
    if fmt in ("onnx", "tflite"):
        return fmt
    if fmt is None and path.endswith(".onnx"):
        return "onnx"
    if fmt is None and path.endswith(".tflite"):
        return "tflite"
    return "generic"


# -- making ---------------------------------------------------------------------------------------

def _dictionary(old: bytes) -> zstandard.ZstdCompressionDict | None:
    if len(old) < 8:  # zstd refuses tiny dictionaries; there is nothing to reuse anyway
        return None
    return zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def _compress(old: bytes, payload: bytes) -> bytes:
    compressor = zstandard.ZstdCompressor(dict_data=_dictionary(old),
                                          compression_params=_params(len(old), len(payload)))
    return compressor.compress(payload)


def _params(base: int, payload: int) -> zstandard.ZstdCompressionParameters:
    # The window must reach from the end of the payload back to the start of the base, and the
    # match finder's tables must index the whole base: zstd finds matches in a large raw
    # dictionary only with a hash (and chain) log near log2 of its size (measured: a 38 MB base
    # with its last 40 KB rewritten gave deltas of 6 and 34 MB in two runs with level 19's own
    # tables, 40 KB with 2^26 entries).
    # Tables stop at 2^27 entries (1 GiB of fleet memory); bigger files rely on the
    # tensor-aware encoding, whose copies need no match finder.
    window = max(20, min(31, (base + payload).bit_length()))
    tables = max(17, min(27, base.bit_length()))
    level = _LEVEL if base <= 16 << 20 else 9  # level 19 takes ~7 s on 38 MB, level 9 ~1.5 s
    return zstandard.ZstdCompressionParameters.from_level(
        level, window_log=window, hash_log=tables, chain_log=tables, enable_ldm=True,
        write_content_size=True, write_checksum=True)


def _container(method: int, old: bytes, new: bytes, body: bytes) -> bytes:
    header = _HEADER.pack(MAGIC, method, hashlib.sha256(old).digest(),
                          hashlib.sha256(new).digest(), len(new))
    return header + body


def _generic(old: bytes, new: bytes) -> bytes:
    return _container(GENERIC, old, new, _compress(old, new))


def _layout(old: bytes, new: bytes, fmt: str, layout: Layout | None) -> Layout:
    if layout is None:
        return segments(old, fmt), segments(new, fmt)
    return check_segments(layout[0], len(old)), check_segments(layout[1], len(new))


def external_layout(member: str, model_member: str, old_model: bytes,
                    new_model: bytes) -> Layout:
    """Where the tensors of the ONNX external data file ``member`` are, from the two versions
    of the model file ``model_member`` beside it (LayoutError when they cannot be read)."""
    folder = model_member.rpartition("/")[0]
    location = member[len(folder) + 1:] if folder else member
    return onnx_external_segments(old_model, location), onnx_external_segments(new_model, location)


def model_beside(member: str, members: Iterable[str]) -> str | None:
    """The ONNX model file in the same folder as ``member`` (which may be its external data
    file), None when there is none or ``member`` is one itself."""
    if member.endswith(".onnx"):
        return None
    folder = member.rpartition("/")[0]
    return next((m for m in sorted(members)
                 if m.endswith(".onnx") and m.rpartition("/")[0] == folder), None)


def _ops(old: bytes, new: bytes, fmt: str,
         layout: Layout | None = None) -> tuple[list[tuple[int, int, int]], bytes]:
    """The op list and the bytes it consumes that rebuild ``new`` from ``old``."""
    before, after = _layout(old, new, fmt, layout)
    by_hash = {hashlib.sha256(old[s.start:s.end]).digest(): s for s in before}
    by_name = {(s.name, s.size): s for s in before}
    ops: list[tuple[int, int, int]] = []
    stream = bytearray()
    at = 0
    for segment in after:
        if segment.start > at:
            ops.append((_LITERAL, 0, segment.start - at))
            stream += new[at:segment.start]
        data = new[segment.start:segment.end]
        same = by_hash.get(hashlib.sha256(data).digest())
        partner = by_name.get((segment.name, segment.size))
        if same is not None:
            ops.append((_COPY, same.start, same.size))
        elif partner is not None and _xor_pays(old[partner.start:partner.end], data):
            ops.append((_XOR, partner.start, partner.size))
            stream += _xor(old[partner.start:partner.end], data)
        else:
            ops.append((_LITERAL, 0, segment.size))
            stream += data
        at = segment.end
    if at < len(new):
        ops.append((_LITERAL, 0, len(new) - at))
        stream += new[at:]
    return _merge(ops), bytes(stream)


def _xor(a: bytes, b: bytes) -> bytes:
    return np.bitwise_xor(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)).tobytes()


def _xor_pays(old: bytes, new: bytes) -> bool:
    plain = zstandard.ZstdCompressor(level=3)
    return len(plain.compress(_xor(old, new))) < len(plain.compress(new))


def _merge(ops: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    merged: list[tuple[int, int, int]] = []
    for kind, offset, length in ops:
        if merged and merged[-1][0] == kind and kind != _XOR and (
                kind == _LITERAL or merged[-1][1] + merged[-1][2] == offset):
            last = merged[-1]
            merged[-1] = (kind, last[1], last[2] + length)
        elif length:
            merged.append((kind, offset, length))
    return merged


def _tensor_delta(old: bytes, new: bytes, fmt: str, layout: Layout | None = None) -> bytes:
    ops, stream = _ops(old, new, fmt, layout)
    table = struct.pack("<I", len(ops)) + b"".join(_OP.pack(*op) for op in ops)
    return _container(TENSORS, old, new, _compress(old, table + stream))


def make_delta(old: bytes, new: bytes, fmt: str = "generic", layout: Layout | None = None) -> bytes:
    """A delta that rebuilds ``new`` from ``old`` (the smaller of the generic and, for "onnx" and
    "tflite" files or when the caller gives the tensors' ``layout``, the tensor-aware
    encoding)."""
    best = _generic(old, new)
    if fmt in ("onnx", "tflite") or layout is not None:
        try:
            tensors = _tensor_delta(old, new, fmt, layout)
        except LayoutError:
            return best
        if len(tensors) <= len(best):
            best = tensors
    return best


def make_delta_with(old: bytes, new: bytes, method: str, fmt: str = "generic",
                    layout: Layout | None = None) -> bytes:
    """A delta by one named method ("generic" or "tensors"), for measuring them apart;
    LayoutError when ``fmt``'s layout cannot be read."""
    return _generic(old, new) if method == "generic" else _tensor_delta(old, new, fmt, layout)


# -- applying -------------------------------------------------------------------------------------

def _decompress(old: bytes, body: bytes, limit: int) -> bytes:
    try:
        declared = zstandard.frame_content_size(body)
        if declared < 0 or declared > limit:
            raise DeltaError(f"delta payload declares {declared} bytes; at most {limit} expected")
        stream = zstandard.ZstdDecompressor(dict_data=_dictionary(old),
                                            max_window_size=1 << 31).decompressobj()
        data = stream.decompress(body)
    except zstandard.ZstdError as exc:
        raise DeltaError(f"delta payload is damaged ({exc})") from None
    if not stream.eof or stream.unused_data or len(data) != declared:
        raise DeltaError("delta payload is cut short or has bytes after its end")
    return data


def _run(old: bytes, payload: bytes, size: int) -> bytes:
    if len(payload) < 4:
        raise DeltaError("delta op table is cut short")
    (count,) = struct.unpack_from("<I", payload)
    pos = 4 + count * _OP.size
    if pos > len(payload):
        raise DeltaError("delta op table is cut short")
    out = bytearray()
    for i in range(count):
        kind, offset, length = _OP.unpack_from(payload, 4 + i * _OP.size)
        if len(out) + length > size:
            raise DeltaError("delta ops build more bytes than the target has")
        if kind == _LITERAL:
            chunk = payload[pos:pos + length]
            pos += length
        elif kind in (_COPY, _XOR):
            if offset + length > len(old):
                raise DeltaError("delta op reads past the end of the base")
            chunk = old[offset:offset + length]
            if kind == _XOR:
                chunk = _xor(chunk, payload[pos:pos + length])
                pos += length
        else:
            raise DeltaError(f"unknown delta op {kind}")
        if len(chunk) != length:
            raise DeltaError("delta payload is cut short")
        out += chunk
    if pos != len(payload):
        raise DeltaError("delta payload has bytes no op uses")
    return bytes(out)


def apply_delta(old: bytes, delta: bytes, expected_sha256: str | None = None) -> bytes:
    """Rebuild the target from ``old``. Raises :class:`DeltaError` when the delta is damaged,
    cut short, made against another base, or rebuilds bytes other than its target (or, with
    ``expected_sha256``, other than those)."""
    header = read_header(delta)
    if expected_sha256 is not None and header.target_sha256 != expected_sha256:
        raise DeltaError(f"delta builds {header.target_sha256[:16]}…, not the expected "
                         f"{expected_sha256[:16]}…")
    if hashlib.sha256(old).hexdigest() != header.base_sha256:
        raise DeltaError(f"delta was made against {header.base_sha256[:16]}…, not the file held "
                         "here")
    payload = _decompress(old, delta[_HEADER.size:], header.target_size
                          + (0 if header.method == "generic" else (1 << 20) + header.target_size))
    new = payload if header.method == "generic" else _run(old, payload, header.target_size)
    if len(new) != header.target_size or hashlib.sha256(new).hexdigest() != header.target_sha256:
        raise DeltaError("delta rebuilt bytes whose sha256 is not its target's; refused")
    return new


# -- reporting ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorChange:
    """One tensor of the new file: "same", "changed" (same name, new bytes) or "new"; "removed"
    for a tensor of the old file only."""

    name: str
    status: str
    bytes: int


@dataclass
class FileDiff:
    """What changed in one file, and what it would cost to send."""

    path: str
    format: str
    full_bytes: int
    delta_bytes: int
    delta_method: str
    same: bool
    tensors: list[TensorChange] = field(default_factory=list)
    layout: str = "read"
    """"read", "none" (a generic file) or why the tensor layout could not be read"""

    def method(self, fraction: float = DEFAULT_FRACTION) -> str:
        """"delta" when the delta is worth sending, else "full"."""
        return "delta" if self.delta_bytes <= fraction * self.full_bytes else "full"

    def to_dict(self, fraction: float = DEFAULT_FRACTION) -> dict[str, Any]:
        data = asdict(self)
        data["method"] = self.method(fraction)
        return data


def _tensor_changes(old: bytes, new: bytes, fmt: str,
                    layout: Layout | None) -> Iterator[TensorChange]:
    first, after = _layout(old, new, fmt, layout)
    before = {s.name: s for s in first}
    hashes = {hashlib.sha256(old[s.start:s.end]).digest() for s in before.values()}
    for s in after:
        digest = hashlib.sha256(new[s.start:s.end]).digest()
        status = "same" if digest in hashes else "changed" if s.name in before else "new"
        yield TensorChange(s.name, status, s.size)
    names = {s.name for s in after}
    for name, s in before.items():
        if name not in names:
            yield TensorChange(name, "removed", s.size)


def diff_file(path: str, old: bytes, new: bytes, fmt: str | None = None,
              layout: Layout | None = None) -> FileDiff:
    """Compare two versions of one file: per tensor where the layout can be read (or is given),
    and the size of the delta :func:`make_delta` would send."""
    kind = delta_format(path, fmt)
    delta = make_delta(old, new, kind, layout)
    header = read_header(delta)
    tensor_aware = kind != "generic" or layout is not None
    result = FileDiff(path, kind, len(new), len(delta), header.method, old == new,
                      layout="read" if tensor_aware else "none")
    if tensor_aware:
        try:
            result.tensors = list(_tensor_changes(old, new, kind, layout))
        except LayoutError as exc:
            result.layout = str(exc)
    return result
