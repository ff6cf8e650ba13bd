"""Fixtures the security tests borrow from the areas they attack."""

from __future__ import annotations

from tests.fleet.conftest import web_store

__all__ = ["web_store"]
