"""The agent's public modules export exactly names that exist."""

from __future__ import annotations

import importlib

import pytest

MODULES = ["edgeserve.device_agent", "edgeserve.device_agent.agent",
           "edgeserve.device_agent.cache", "edgeserve.device_agent.selection",
           "edgeserve.device_agent.adapter", "edgeserve.device_agent.runtimes",
           "edgeserve.device_agent.samples", "edgeserve.device_agent.config",
           "edgeserve.device_agent.inputs", "edgeserve.device_agent.server",
           "edgeserve.device_agent.server.codec", "edgeserve.auth",
           "edgeserve.device_agent.server.dataplane", "edgeserve.device_agent.server.http",
           "edgeserve.device_agent.server.openapi", "edgeserve.device_agent.server.metrics"]


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist(name: str) -> None:
    """Every name in __all__ exists, once."""
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(exported) == len(set(exported))
    assert all(hasattr(module, member) for member in exported)
