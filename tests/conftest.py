"""Shared fixtures. Services (Mosquitto, PostgreSQL) come from tests/services.py; the check that
no test leaves a process running is tests/processes.py; condition waits and cleanup on every path
are tests/support.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeserve.testing import KeyPair, make_keypair

# tests.processes: a test that leaves a process running errors; so does the session
# tests.support: the `resources` fixture (closed on every path); wait_until lives there too
# (tests.processes first: tests.services imports it, and a plugin must be registered before
# anything imports it, or pytest cannot rewrite its asserts)
pytest_plugins = ["tests.processes", "tests.services", "tests.support"]


@pytest.fixture(autouse=True, scope="session")
def private_data_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every default data path (the fleet's store, artifacts and signing keys, the agent's cache)
    lands in a directory of this run, for this process and the ones it starts: tests neither
    read the machine's leftovers nor leave files in the user's home."""
    home = tmp_path_factory.mktemp("xdg-data")
    previous = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = str(home)
    try:
        yield home
    finally:
        if previous is None:
            os.environ.pop("XDG_DATA_HOME", None)
        else:
            os.environ["XDG_DATA_HOME"] = previous


@pytest.fixture
def keypair(tmp_path: Path) -> KeyPair:
    return make_keypair(tmp_path / "keys", "signer")


@pytest.fixture
def other_keypair(tmp_path: Path) -> KeyPair:
    return make_keypair(tmp_path / "keys", "stranger")
