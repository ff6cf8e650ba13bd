"""The controllers' leader on PostgreSQL (fleet/leader.py): one process ticks, the lock's
connection holds no transaction open, and a leader whose lock connection ends stops ticking, so
two processes never tick side by side."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from edgeserve.fleet.leader import LeaderLoop, leader_client_port
from edgeserve.fleet.store import Store
from tests.support import wait_until

pytestmark = pytest.mark.integration


class Ticker:
    def __init__(self, store: Store, name: str) -> None:
        self.ticks: list[float] = []
        self.loop = LeaderLoop(store, "edgeserve-test-job", "f1", self._tick, 0.05)
        self.name = name

    def _tick(self) -> None:
        self.ticks.append(time.monotonic())

    def since(self, moment: float) -> int:
        return sum(1 for t in self.ticks if t > moment)


def _lock_backend(url: str, store: Store) -> tuple[int, str]:
    """(pid, state) of the backend that holds the job's lock."""
    port = leader_client_port(store, "edgeserve-test-job", "f1")
    assert port is not None, "nobody holds the lock"
    with psycopg.connect(url.split("?", maxsplit=1)[0], autocommit=True) as conn:
        row = conn.execute("SELECT pid, state FROM pg_stat_activity WHERE client_port = %s",
                           (port,)).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


def test_one_leader_ticks_and_a_leader_that_lost_its_lock_stops(postgres_url: str) -> None:
    with Store.open(postgres_url) as first_store, Store.open(postgres_url) as second_store:
        a, b = Ticker(first_store, "a"), Ticker(second_store, "b")
        a.loop.start()
        try:
            wait_until(lambda: len(a.ticks) >= 3, 10, "the first process to lead")
            b.loop.start()
            time.sleep(0.5)
            assert b.ticks == [], "a second process ticked while the first led"
            pid, state = _lock_backend(postgres_url, first_store)
            # the leader's lock connection is idle between ticks, not idle in a transaction
            assert state == "idle", state
            # the server ends the leader's lock session (what a restart, an idle timeout or a
            # cut connection does): the lock is free, and the old leader must notice
            with psycopg.connect(postgres_url.split("?", maxsplit=1)[0], autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            cut = time.monotonic()
            wait_until(lambda: a.since(cut) + b.since(cut) >= 10, 10, "a leader after the cut")
            time.sleep(0.5)
            # a leader checks its lock's connection before each tick: after the cut only the
            # process that took the lock ticks (either may win it), never both
            assert (a.since(cut) > 0) != (b.since(cut) > 0), (a.since(cut), b.since(cut))
        finally:
            stops = [threading.Thread(target=t.loop.stop) for t in (a, b)]
            for s in stops:
                s.start()
            for s in stops:
                s.join()
