"""Fixtures the fleet tests share: a store with devices and windows in it, and the fleet's HTTP
side serving it behind basic auth (the JSON API and dashboard tests both use them)."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeserve.contract import Status, Window
from edgeserve.errors import AuthError
from edgeserve.fleet.artifacts import ArtifactStore
from edgeserve.fleet.registry import apply_status
from edgeserve.fleet.store import Store
from edgeserve.fleet.telemetry import store_windows, window_row
from edgeserve.fleet.web.app import create_app
from edgeserve.fleet.web.server import ServerHandle, start_server
from edgeserve.telemetry import LatencyHistogram
from edgeserve.testing import KeyPair, make_manifest, write_test_package

AUTH = ("admin", "s3cret")


class PasswordAuth:
    """A real (if minimal) basic-auth checker for the tests: user and password are AUTH."""

    def check(self, authorization: str | None) -> str:
        expected = "Basic " + base64.b64encode(":".join(AUTH).encode()).decode()
        if authorization != expected:
            raise AuthError("missing or wrong credentials")
        return AUTH[0]

    def challenge(self) -> str:
        return 'Basic realm="edgeserve"'


@pytest.fixture
def web_store(tmp_path: Path, fleet_name: str) -> Iterator[Store]:
    """Three online devices running toy 1.0.0 and thirty windows of d0 (half with an error)."""
    with Store.open(f"sqlite:///{tmp_path}/fleet.db", fleet=fleet_name) as store:
        now = time.time()
        with store.write() as conn:
            for i, profile in enumerate(["pixel-8", "pixel-8", "raspberry-pi-5"]):
                apply_status(store, conn, Status(device_id=f"d{i}", state="online",
                                                 profile=profile, models={"toy": "1.0.0"}), now)
            rows = []
            for seq in range(1, 31):
                hist = LatencyHistogram()
                for v in range(1, 101):  # p99 of any merge of these windows is 99-100 ms
                    hist.add(float(v))
                rows.append(window_row("d0", Window(seq=seq, start=now - 300 + seq * 10 - 10,
                                                    end=now - 300 + seq * 10, model="toy",
                                                    version="1.0.0", requests=4,
                                                    errors=seq % 2, latency=hist.to_data()),
                                       now))
            store_windows(store, conn, rows, now)
        yield store


@pytest.fixture
def web_server(tmp_path: Path, web_store: Store, keypair: KeyPair) -> Iterator[ServerHandle]:
    """The fleet's HTTP app over ``web_store``, with toy 1.0.0 published, behind AUTH."""
    artifacts = ArtifactStore(tmp_path / "artifacts", keypair.trust)
    pkg = tmp_path / "toy.edgepkg"
    write_test_package(pkg, keypair, manifest=make_manifest())
    artifacts.publish(pkg)
    app = create_app(web_store, artifacts, authenticator=PasswordAuth(),
                     stats=lambda: {"messages": 7, "rejected": {"malformed": 2}})
    handle = start_server(app)
    try:
        yield handle
    finally:
        handle.stop()
