"""Small requests are not reserved one by one: the server keeps their worst case back instead.

A request of at most ``SMALL_BODY`` bytes (an HTTP body with a Content-Length, no compression)
with an answer of at most ``SMALL_ANSWER`` to encode reserves nothing in the memory budget;
each server's gate keeps ``capacity × small_request_cost()`` back from what the others may
reserve while it is open, so the budget still bounds the total.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import requests

from edgeserve.device_agent import Agent
from edgeserve.device_agent.server import start_http_server
from edgeserve.device_agent.server.dataplane import LoadGate
from edgeserve.device_agent.server.limits import (
    SMALL_BODY,
    MemoryBudget,
    small_request_cost,
)
from edgeserve.errors import OverloadedError


def _body(rows: int) -> bytes:
    x = np.random.default_rng(rows).normal(size=(rows, 4)).astype(np.float32)
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 4],
                                   "data": x.ravel().tolist()}]}).encode()


def test_small_http_requests_reserve_nothing_larger_ones_do(
        tmp_path: Path, agent_assets: dict[str, Path]) -> None:
    budget = MemoryBudget(8 << 20)
    with Agent(tmp_path / "cache", trusted_keys=[agent_assets["public_key"]]) as agent:
        agent.install(agent_assets["pkg_v1"])
        with start_http_server(agent, workers=2, queue=4, budget=budget) as handle:
            # the gate's worst case of small requests is kept back while it is open
            assert budget.aside == 6 * small_request_cost()
            url = f"{handle.url}/v2/models/toy/infer"
            small = _body(1)
            assert len(small) <= SMALL_BODY
            for _ in range(20):
                assert requests.post(url, data=small, timeout=10).status_code == 200
            assert budget.peak == 0
            large = _body(200)
            assert len(large) > SMALL_BODY
            reply = requests.post(url, data=large, timeout=10)
            assert reply.status_code == 200 and len(reply.json()["outputs"][0]["data"]) == 600
            assert budget.peak >= len(large) and budget.in_use == 0
        assert budget.aside == 0  # given back when the server stops


def test_what_is_kept_back_cannot_be_reserved() -> None:
    """A reservation that fits the budget but not what the open gates keep back waits, then is
    refused; once the gate closes it fits."""
    cost = small_request_cost()
    budget = MemoryBudget(10 * cost, client_share=1.0, wait_s=0.05)
    gate = LoadGate(workers=1, queue=3, budget=budget)  # keeps back 4 × cost
    try:
        assert not budget.hold("a").try_take(7 * cost)
        with pytest.raises(OverloadedError, match="server busy"):
            asyncio.run(budget.hold("a").take(7 * cost))
    finally:
        gate.close()
    assert budget.hold("a").try_take(7 * cost)


def test_keeping_back_never_takes_more_than_half_of_a_small_budget() -> None:
    cost = small_request_cost()
    budget = MemoryBudget(4 * cost, client_share=1.0)
    gate = LoadGate(workers=2, queue=64, budget=budget)  # 66 × cost asked for
    try:
        assert budget.hold("a").try_take(2 * cost)
        assert not budget.hold("b").try_take(1)
    finally:
        gate.close()
