"""Shared fixtures. Services (Mosquitto, PostgreSQL) come from tests/services.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeserve.testing import KeyPair, make_keypair

pytest_plugins = ["tests.services"]


@pytest.fixture
def keypair(tmp_path: Path) -> KeyPair:
    return make_keypair(tmp_path / "keys", "signer")


@pytest.fixture
def other_keypair(tmp_path: Path) -> KeyPair:
    return make_keypair(tmp_path / "keys", "stranger")
