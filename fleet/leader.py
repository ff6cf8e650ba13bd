"""A periodic job that one process of a fleet runs: the rollout and experiment controllers.

:class:`LeaderLoop` calls ``tick()`` every ``tick_s`` seconds on a thread of its own, but only
while this process leads: on PostgreSQL, where several fleet processes may share a store, it
holds a session advisory lock named after the job and the fleet for its lifetime (the other
processes keep trying, so one takes over when the leader's connection ends); on SQLite the
store belongs to one process and it always leads. A failing tick is logged, never fatal.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from edgeserve.errors import EdgeserveError

from .store import Store

__all__ = ["LeaderLoop", "leader_client_port", "leader_key"]

log = logging.getLogger(__name__)


def leader_key(job: str, fleet: str) -> int:
    """The PostgreSQL advisory-lock key of ``job`` in ``fleet``."""
    return zlib.crc32(f"{job}/{fleet}".encode())


def leader_client_port(store: Store, job: str, fleet: str) -> int | None:
    """The client port of the database connection that holds ``job``'s lock (PostgreSQL;
    None when nobody leads or on SQLite): with the hosts, it names the leading process."""
    if store.dialect != "postgresql":
        return None
    with store.read() as conn:
        port = conn.execute(sa.text(
            "SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.objid::bigint = :k"),
            {"k": leader_key(job, fleet)}).scalar()
    return None if port is None else int(port)


class LeaderLoop:
    def __init__(self, store: Store, job: str, fleet: str, tick: Callable[[], Any],
                 tick_s: float) -> None:
        self.store = store
        self.job = job
        self.key = leader_key(job, fleet)
        self.tick = tick
        self.tick_s = tick_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock_conn: Any = None

    def start(self) -> LeaderLoop:
        self._thread = threading.Thread(target=self._run, name=self.job, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self._drop_lock_conn()

    def _leads(self, leading: bool) -> bool:
        """Whether this process leads now. A leader checks on every tick that the connection
        holding its lock is alive: the lock lives exactly as long as that session, and when the
        session ends (the server restarted, an idle timeout, a cut connection) another process
        may take the lock, so this one must stop ticking before it could tick beside it. No
        transaction is left open on the lock's connection (it would hold back VACUUM)."""
        if self.store.dialect != "postgresql":
            return True
        try:
            if self._lock_conn is None:
                self._lock_conn = self.store.engine.connect()
            if leading:
                self._lock_conn.execute(sa.text("SELECT 1"))
                got = True
            else:
                got = bool(self._lock_conn.execute(
                    sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar())
            self._lock_conn.commit()
            return got
        except sa.exc.DBAPIError as exc:
            if leading:
                log.warning("%s: lost the connection that holds the leader's lock (%s); "
                            "another process may lead now, this one stops until it takes "
                            "the lock again", self.job, str(exc).splitlines()[0][:200])
            self._drop_lock_conn()
            return False

    def _drop_lock_conn(self) -> None:
        conn, self._lock_conn = self._lock_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.invalidate()
                conn.close()

    def _run(self) -> None:
        leader = False
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                leader = self._leads(leader)
                if leader:
                    self.tick()
            except EdgeserveError as exc:
                log.error("%s tick failed: %s", self.job, exc)
            except Exception:
                log.exception("%s tick failed", self.job)
            self._stop.wait(max(0.0, self.tick_s - (time.monotonic() - started)))
