"""The HTTP codec's fast JSON path (orjson) answers exactly as the standard parser does: the same
arrays, or the same error, for any body; and the event-loop gate runs only cheap kinds inline."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeserve.device_agent.server import codec
from edgeserve.device_agent.server.codec import InferRequest, decode_request, encode_response
from edgeserve.device_agent.server.dataplane import INLINE_BELOW_S, LoadGate
from edgeserve.errors import InvalidInputError

assert codec.orjson is not None, "edgeserve[agent] installs orjson"

_numbers = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-2**70, 2**70),
                     st.booleans(), st.none(), st.text(max_size=3))
_data = st.recursive(_numbers, lambda inner: st.lists(inner, max_size=4), max_leaves=12)
_valid_values = {
    "FP32": st.floats(-1e39, 1e39, allow_nan=False) | st.integers(-2**64, 2**64),
    "FP16": st.floats(-1e5, 1e5, allow_nan=False),
    "INT64": st.integers(-2**64, 2**64), "UINT8": st.integers(-2, 300), "BOOL": st.booleans(),
    "BYTES": st.text(max_size=4),
}


@st.composite
def _input(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly well-formed tensors (values at and past their type's range, nested or flat),
    sometimes a malformed one."""
    if draw(st.integers(0, 9)) == 0:
        return {"name": draw(st.sampled_from(["x", "", 3])),
                "datatype": draw(st.sampled_from(["FP32", "fp32", "BYTES"])),
                "shape": draw(st.one_of(st.lists(st.integers(-1, 4), max_size=3), st.just("2"))),
                "data": draw(_data)}
    datatype = draw(st.sampled_from(sorted(_valid_values)))
    shape = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    count = int(np.prod(shape))
    flat = draw(st.lists(_valid_values[datatype], min_size=count, max_size=count))
    data: Any = np.array(flat, dtype=object).reshape(shape).tolist() if draw(st.booleans()) \
        else flat
    return {"name": "x", "datatype": datatype, "shape": shape, "data": data}


_inputs = _input()


def _decode(body: bytes, fast: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Any]:
    with monkeypatch.context() as patch:
        if not fast:
            patch.setattr(codec, "orjson", None)
        try:
            request = decode_request(body)
        except InvalidInputError as exc:
            return "error", str(exc)
    return "ok", {k: (v.dtype.str, v.shape, v.tolist()) for k, v in request.inputs.items()}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.lists(_inputs, min_size=1, max_size=1), st.sampled_from(["", " ", "\n"]))
def test_fast_parser_decodes_like_the_standard_one(monkeypatch: pytest.MonkeyPatch,
                                                   items: list[dict[str, Any]], pad: str) -> None:
    body = (pad + json.dumps({"inputs": items}) + pad).encode()
    assert _decode(body, True, monkeypatch) == _decode(body, False, monkeypatch)


@pytest.mark.parametrize("body", [
    b'{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[NaN,1]}]}',
    b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[Infinity]}]}',
    b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1e400]}]}',
    b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]',
    b'[' * 5000 + b']' * 5000,
    b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}],"inputs":[]}',
])
def test_bodies_the_fast_parser_refuses_get_the_standard_answer(
        body: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = _decode(body, True, monkeypatch)
    assert fast == _decode(body, False, monkeypatch)
    assert fast[0] == "error"


def test_non_finite_outputs_keep_their_tokens() -> None:
    outputs = {"y": np.array([[np.nan, np.inf, 1.5]], np.float32)}
    payload, _ = encode_response("m", "1.0.0", outputs, InferRequest({}))
    assert b"[NaN,Infinity,1.5]" in payload
    # past the few values checked one by one, numpy checks them: still found at the end
    many = np.zeros((1, 100), np.float32)
    many[0, -1] = -np.inf
    payload, _ = encode_response("m", "1.0.0", {"y": many}, InferRequest({}))
    assert payload.rstrip().endswith(b"0.0,-Infinity]}]}")
    finite, _ = encode_response("m", "1.0.0", {"y": np.array([[0.25]], np.float32)},
                                InferRequest({}, id="r1"))
    assert json.loads(finite) == {"model_name": "m", "model_version": "1.0.0", "id": "r1",
                                  "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 1],
                                               "data": [0.25]}]}


def test_cheap_kinds_run_inline_and_slow_ones_on_the_workers() -> None:
    gate = LoadGate(workers=2)

    def cheap() -> str:
        return "c"

    def slow() -> str:
        time.sleep(3 * INLINE_BELOW_S)
        return "s"

    async def scenario() -> None:
        for _ in range(20):
            assert await gate.run(cheap, "cheap", 100) == "c"
        assert gate.inline == 19  # the first run, of a kind never seen, went to a worker
        for _ in range(5):
            assert await gate.run(slow, "slow", 100) == "s"
        # sleeping costs no CPU on the worker, so the loop tries it once, measures its wall
        # time there, and sends the rest back to the workers
        assert gate.inline <= 20
        before = gate.inline
        assert await gate.run(cheap, "cheap", 10 << 20) == "c"  # a big body: a worker
        assert gate.inline == before
        assert await gate.run(cheap) == "c"  # no kind: a worker
        assert gate.inline == before

    try:
        asyncio.run(scenario())
    finally:
        gate.close()


def test_a_kind_that_turns_slow_on_the_loop_goes_back_to_the_workers() -> None:
    gate = LoadGate(workers=1)
    delay = [0.0]

    def work() -> None:
        time.sleep(delay[0])

    async def scenario() -> None:
        await gate.run(work, "m", 0)
        await gate.run(work, "m", 0)
        assert gate.inline == 1
        delay[0] = 3 * INLINE_BELOW_S
        inline_runs = 0
        for _ in range(30):
            before = gate.inline
            await gate.run(work, "m", 0)
            inline_runs += gate.inline - before
        # a few slow runs in a row move it off the loop; one stall would not
        assert 2 <= inline_runs <= 10

    try:
        asyncio.run(scenario())
    finally:
        gate.close()


@pytest.mark.parametrize(("datatype", "values", "message"), [
    ("UINT8", [1, 300], "values from 1 to 300 do not fit UINT8 (0 to 255)"),
    ("INT8", [-129], "values from -129 to -129 do not fit INT8"),
    ("UINT64", [-1], "do not fit UINT64"),
    ("FP32", [1e39], "values do not fit FP32 (largest magnitude 3.40282e+38)"),
    ("FP16", [70000], "values do not fit FP16"),
    ("INT64", [2**70], "floating-point (or integers past 64 bits) values"),
])
def test_values_outside_the_datatype_are_refused_not_wrapped(datatype: str, values: list[Any],
                                                             message: str) -> None:
    """A cast would have turned 300 into 44 as UINT8 and 1e39 into infinity as FP32."""
    body = json.dumps({"inputs": [{"name": "x", "datatype": datatype, "shape": [len(values)],
                                   "data": values}]}).encode()
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        decode_request(body)
