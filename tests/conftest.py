"""Shared fixtures. Services (Mosquitto, PostgreSQL) come from tests/services.py; the check that
no test leaves a process running is tests/processes.py; condition waits and cleanup on every path
are tests/support.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeserve.testing import KeyPair, make_keypair

# tests.processes: a test that leaves a process running errors; so does the session
# tests.support: the `resources` fixture (closed on every path); wait_until lives there too
# (tests.processes first: tests.services imports it, and a plugin must be registered before
# anything imports it, or pytest cannot rewrite its asserts)
pytest_plugins = ["tests.processes", "tests.services", "tests.support"]


@pytest.fixture
def keypair(tmp_path: Path) -> KeyPair:
    return make_keypair(tmp_path / "keys", "signer")


@pytest.fixture
def other_keypair(tmp_path: Path) -> KeyPair:
    return make_keypair(tmp_path / "keys", "stranger")
