"""Fixtures the security tests borrow from the areas they attack."""

from __future__ import annotations

from tests.device_agent.conftest import agent_assets
from tests.fleet.conftest import web_store

__all__ = ["agent_assets", "web_store"]
