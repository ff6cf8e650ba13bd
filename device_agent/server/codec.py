"""Open Inference Protocol v2 tensors over HTTP: JSON and the binary tensor data extension.

Transport-free: bytes in, arrays out, and back. Request layout with binary data: the body is a
JSON header of ``Inference-Header-Content-Length`` bytes followed by the raw tensors, in input
order, each sized by its ``parameters.binary_data_size``. Outputs are returned as binary when the
request asks for it per output (``parameters.binary_data``) or for all (``binary_data_output``).
Every malformed request raises :class:`~edgeserve.errors.InvalidInputError` with a message that
names the tensor and the expectation.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeserve.errors import InvalidInputError
from edgeserve.manifest import TensorSpec

try:  # 5-10x faster than json on request and response bodies (bench/agent.py part b)
    import orjson
except ImportError:  # pragma: no cover - edgeserve[agent] installs it
    orjson = None  # type: ignore[assignment]

__all__ = [
    "DATATYPES",
    "DTYPE_NAMES",
    "InferRequest",
    "RequestedOutput",
    "checked_shape",
    "datatype_of",
    "decode_bytes_tensor",
    "decode_request",
    "dump_json",
    "encode_bytes_tensor",
    "encode_response",
    "parse_json",
    "tensor_metadata",
]

DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
DTYPE_NAMES = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int8": "INT8",
               "uint8": "UINT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
               "bool": "BOOL", "string": "BYTES"}
_MAX_DIMS = 16
_MAX_ELEMENTS = 1 << 31


def parse_json(data: bytes | bytearray | str) -> Any:
    """JSON text to Python objects. orjson reads every ordinary document; what it refuses
    (NaN or Infinity tokens, deep nesting, broken text) goes to the standard parser, which
    decides and words the error the same way as before."""
    return _parse_json(data)[0]


def _parse_json(data: bytes | bytearray | str) -> tuple[Any, bool]:
    """The document, and whether all its numbers are known finite (orjson refuses the rest)."""
    if orjson is not None:
        try:
            return orjson.loads(data), True
        except orjson.JSONDecodeError:
            pass
    return json.loads(data), False


def dump_json(data: Any, finite: bool = True) -> bytes:
    """Compact JSON bytes. Non-finite floats (``finite=False``) keep the standard module's
    ``NaN``/``Infinity`` tokens, which orjson would write as ``null``."""
    if orjson is not None and finite:
        return orjson.dumps(data)
    return json.dumps(data, separators=(",", ":"), allow_nan=True).encode()


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    """A decoded inference request: arrays by input name, and which outputs to return how."""

    inputs: dict[str, np.ndarray]
    id: str | None = None
    outputs: list[RequestedOutput] | None = None
    binary_output: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


_DATATYPE_OF = {dtype: name for name, dtype in DATATYPES.items() if name != "BYTES"}


def datatype_of(array: np.ndarray) -> str:
    if array.dtype.kind in "OSU":
        return "BYTES"
    name = _DATATYPE_OF.get(array.dtype)
    if name is None:
        raise InvalidInputError(f"numpy dtype {array.dtype} has no Open Inference Protocol "
                                "datatype")
    return name


def tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": DTYPE_NAMES[spec.dtype],
            "shape": [d if isinstance(d, int) else -1 for d in spec.shape]}


def _fail(message: str) -> InvalidInputError:
    return InvalidInputError(message)


def checked_shape(raw: object, name: str) -> tuple[list[int], int]:
    """A tensor shape from a request and its element count, for HTTP and gRPC alike.

    The count is Python integer arithmetic (``math.prod``), which cannot overflow: with numpy's
    int64 a shape like ``[2^32, 2^32]`` wrapped to 0 elements and passed a size check."""
    values = list(raw) if not isinstance(raw, list) and hasattr(raw, "__iter__") else raw
    if not isinstance(values, list) or len(values) > _MAX_DIMS or \
            not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in values):
        raise _fail(f"input {name!r}: 'shape' must be a list of at most {_MAX_DIMS} "
                    f"non-negative integers, got {str(raw)[:80]}")
    count = math.prod(values)
    if count > _MAX_ELEMENTS:
        raise _fail(f"input {name!r}: shape {values} has {count} elements, more than "
                    f"{_MAX_ELEMENTS}")
    return values, count


def _shape(raw: object, name: str) -> list[int]:
    return checked_shape(raw, name)[0]


def _params(raw: object, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _fail(f"{where}: 'parameters' must be an object")
    return raw


def decode_bytes_tensor(data: bytes, count: int, name: str) -> np.ndarray:
    """BYTES binary layout: each element is a 4-byte little-endian length, then the bytes."""
    items: list[bytes] = []
    offset = 0
    for _ in range(count):
        if offset + 4 > len(data):
            raise _fail(f"input {name!r}: binary BYTES data ends inside element {len(items)}")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise _fail(f"input {name!r}: BYTES element {len(items)} is longer than the data")
        items.append(data[offset:offset + length])
        offset += length
    if offset != len(data):
        raise _fail(f"input {name!r}: {len(data) - offset} extra bytes after {count} elements")
    return np.array(items, dtype=object)


def encode_bytes_tensor(array: np.ndarray) -> bytes:
    parts = []
    for item in array.ravel():
        raw = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(raw)) + raw)
    return b"".join(parts)


def _from_json_data(data: object, datatype: str, shape: list[int], name: str,
                    finite: bool = False) -> np.ndarray:
    """``finite``: the parser already refused NaN and infinity (no need to look again)."""
    dtype = DATATYPES[datatype]
    if not isinstance(data, list):
        raise _fail(f"input {name!r}: 'data' must be a (flat or nested) list")
    count = math.prod(shape)
    if datatype == "BYTES":
        flat = np.array(data, dtype=object).ravel()
        if flat.size != count or not all(isinstance(v, str) for v in flat):
            raise _fail(f"input {name!r}: BYTES data must be {count} strings for shape {shape}")
        return np.array([v.encode() for v in flat], dtype=object).reshape(shape)
    try:
        array = np.array(data)
    except (ValueError, TypeError):
        raise _fail(f"input {name!r}: 'data' is ragged; expected {count} values") from None
    if array.dtype.kind == "O" and array.size and \
            all(type(v) is int or type(v) is float for v in array.flat):
        # integers past 64 bits (with or without floats): numbers, as orjson reads them
        with contextlib.suppress(OverflowError):
            array = array.astype(np.float64)
    if array.size != count:
        raise _fail(f"input {name!r}: shape {shape} needs {count} values, 'data' has "
                    f"{array.size}")
    if array.size and not _kind_ok(array.dtype.kind, dtype.kind):
        found = _kind_name(array.dtype.kind)
        if array.dtype.kind == "f" and dtype.kind in "iu":
            found += " (or integers past 64 bits)"
        raise _fail(f"input {name!r}: 'data' holds {found} values, which are not valid "
                    f"{datatype}")
    if not finite and array.dtype.kind == "f" and not np.isfinite(array).all():
        raise _fail(f"input {name!r}: 'data' holds NaN or infinity, which no model input "
                    "takes; send finite numbers")
    return _narrow(array, dtype, datatype, name).reshape(shape)


def _narrow(array: np.ndarray, dtype: np.dtype, datatype: str, name: str) -> np.ndarray:
    """``array`` as ``dtype``, refusing values outside its range: a cast would turn 300 into
    44 as UINT8, or 1e39 into infinity as FP32, without a word."""
    if array.dtype == dtype or not array.size:
        return array.astype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        low, high = array.min(), array.max()
        if low < info.min or high > info.max:
            raise _fail(f"input {name!r}: values from {low} to {high} do not fit {datatype} "
                        f"({info.min} to {info.max})")
        return array.astype(dtype)
    try:
        with np.errstate(over="raise", invalid="raise"):
            return array.astype(dtype)
    except (FloatingPointError, ValueError, OverflowError):
        limit = np.finfo(dtype).max if dtype.kind == "f" else None
        raise _fail(f"input {name!r}: values do not fit {datatype}"
                    + (f" (largest magnitude {limit:g})" if limit is not None else "")) from None


def _kind_ok(found: str, wanted: str) -> bool:
    # booleans are not numbers here: true in an FP32 tensor is a client's bug, not 1.0
    allowed = {"f": "iuf", "i": "iu", "u": "iu", "b": "b"}
    return found in allowed.get(wanted, "")


def _kind_name(kind: str) -> str:
    return {"b": "boolean", "i": "integer", "u": "integer", "f": "floating-point",
            "U": "string", "O": "mixed"}.get(kind, "non-numeric")


def _from_binary(chunk: memoryview, datatype: str, shape: list[int], name: str) -> np.ndarray:
    """A view of the body's bytes (no copy): the body lives as long as the request."""
    count = math.prod(shape)
    if datatype == "BYTES":
        return decode_bytes_tensor(bytes(chunk), count, name).reshape(shape)
    dtype = DATATYPES[datatype]
    if len(chunk) != count * dtype.itemsize:
        raise _fail(f"input {name!r}: binary data is {len(chunk)} bytes, shape {shape} of "
                    f"{datatype} needs {count * dtype.itemsize}")
    return np.frombuffer(chunk, dtype=dtype).reshape(shape)


def _load_header(body: bytes | bytearray, header_length: int | None
                 ) -> tuple[dict[str, Any], memoryview, bool]:
    if header_length is not None and not 0 < header_length <= len(body):
        raise _fail(f"Inference-Header-Content-Length is {header_length}, but the body has "
                    f"{len(body)} bytes")
    end = len(body) if header_length is None else header_length
    try:
        header, finite = _parse_json(body if end == len(body) else
                                     bytes(memoryview(body)[:end]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _fail(f"request body is not valid JSON ({exc})") from None
    except RecursionError:
        raise _fail("request body is nested too deeply to be an inference request") from None
    if not isinstance(header, dict):
        raise _fail("request body must be a JSON object with an 'inputs' list")
    return header, memoryview(body)[end:], finite


def _decode_input(item: object, index: int, binary: memoryview,
                  offset: int, finite: bool = False) -> tuple[str, np.ndarray, int]:
    if not isinstance(item, dict):
        raise _fail(f"inputs[{index}] must be an object with name, datatype, shape and data")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise _fail(f"inputs[{index}]: 'name' must be a non-empty string")
    datatype = item.get("datatype")
    if datatype not in DATATYPES:
        raise _fail(f"input {name!r}: 'datatype' must be one of {sorted(DATATYPES)}, got "
                    f"{str(datatype)[:40]!r}")
    shape = _shape(item.get("shape"), name)
    size = _params(item.get("parameters"), f"input {name!r}").get("binary_data_size")
    if size is None:
        if "data" not in item:
            raise _fail(f"input {name!r}: needs 'data' or parameters.binary_data_size")
        return name, _from_json_data(item["data"], str(datatype), shape, name, finite), offset
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _fail(f"input {name!r}: binary_data_size must be a non-negative integer")
    if offset + size > len(binary):
        raise _fail(f"input {name!r}: binary_data_size {size} runs past the end of the body "
                    f"({len(binary) - offset} bytes left)")
    chunk = binary[offset:offset + size]
    return name, _from_binary(chunk, str(datatype), shape, name), offset + size


def _decode_outputs(raw: object) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise _fail("'outputs' must be a list of {name, parameters} objects")
    requested = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise _fail(f"outputs[{i}] must be an object with a string 'name'")
        params = _params(item.get("parameters"), f"outputs[{i}]")
        requested.append(RequestedOutput(item["name"], bool(params.get("binary_data", False))))
    return requested


def decode_request(body: bytes | bytearray, header_length: int | None = None) -> InferRequest:
    """Parse an inference request body (JSON, or JSON header + binary tensors)."""
    header, binary, finite = _load_header(body, header_length)
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise _fail("request needs a non-empty 'inputs' list")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for index, item in enumerate(raw_inputs):
        name, array, offset = _decode_input(item, index, binary, offset, finite)
        if name in inputs:
            raise _fail(f"input {name!r} appears twice")
        inputs[name] = array
    if offset != len(binary):
        raise _fail(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _fail("'id' must be a string")
    params = _params(header.get("parameters"), "request")
    return InferRequest(inputs, request_id, _decode_outputs(header.get("outputs")),
                        bool(params.get("binary_data_output", False)), params)


_CHECK_IN_PYTHON = 64
"""Outputs of at most this many floats are checked for NaN and infinity value by value."""


def encode_response(model: str, version: str, outputs: Mapping[str, np.ndarray],
                    request: InferRequest) -> tuple[bytes, int | None]:
    """Response body and, when any output is binary, the JSON header length."""
    if request.outputs is None:
        wanted = [RequestedOutput(name, request.binary_output) for name in outputs]
    else:
        wanted = request.outputs
        unknown = [o.name for o in wanted if o.name not in outputs]
        if unknown:
            raise _fail(f"requested output(s) {unknown} do not exist; the model has "
                        f"{list(outputs)}")
    tensors = []
    chunks = []
    finite = True
    for out in wanted:
        array = outputs[out.name]
        tensor: dict[str, Any] = {"name": out.name, "datatype": datatype_of(array),
                                  "shape": list(array.shape)}
        if out.binary:
            raw = encode_bytes_tensor(array) if array.dtype.kind in "OSU" else \
                np.ascontiguousarray(array).tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif array.dtype.kind in "OSU":
            tensor["data"] = [v.decode(errors="replace") if isinstance(v, bytes) else str(v)
                              for v in array.ravel()]
        else:
            data = array.ravel().tolist()
            if finite and array.dtype.kind in "fc":
                # a few floats are checked as Python numbers (0.12 against 0.85 µs for numpy's
                # ufunc and reduction on three values)
                finite = all(map(math.isfinite, data)) if array.dtype.kind == "f" and \
                    len(data) <= _CHECK_IN_PYTHON else bool(np.isfinite(array).all())
            tensor["data"] = data
        tensors.append(tensor)
    response: dict[str, Any] = {"model_name": model, "model_version": version,
                                "outputs": tensors}
    if request.id is not None:
        response["id"] = request.id
    header = dump_json(response, finite)
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)
