"""The durable outbox: telemetry windows wait here, on disk, until the fleet acks them.

A SQLite database in WAL mode. Each appended window gets the device's next sequence number
(from 1, persisted in the same transaction, so a crash can neither reuse nor skip one) and is
stored as the exact JSON the link will send. A window leaves only through :meth:`Outbox.ack`,
when the fleet has confirmed that every window up to that number is stored.

The outbox is bounded in bytes. When a new window does not fit, the *oldest* windows are dropped
to make room, and the new window carries how many were dropped in its ``dropped`` field (plus
whatever count a dropped window was itself carrying), so the fleet always learns the total.
``synchronous=full`` (the default) makes every commit survive a power cut, not only a crash or
``kill -9``; windows are appended once a minute, so the fsync costs nothing that matters.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edgeserve._doc import ValidationError
from edgeserve.contract import MAX_PAYLOAD_BYTES, Window
from edgeserve.errors import CacheError, SchemaError

__all__ = ["DEFAULT_MAX_BYTES", "Outbox", "OutboxStats", "Record"]

DEFAULT_MAX_BYTES = 64 * 2**20
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS windows (
    seq INTEGER PRIMARY KEY,
    size INTEGER NOT NULL,
    dropped INTEGER NOT NULL,
    data BLOB NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES
    ('next_seq', 1), ('pending_dropped', 0), ('dropped_total', 0), ('bytes', 0),
    ('acked_seq', 0);
"""


@dataclass(frozen=True)
class Record:
    """One stored window: its sequence number and the JSON bytes to send."""

    seq: int
    data: bytes


@dataclass(frozen=True)
class OutboxStats:
    windows: int
    bytes: int
    max_bytes: int
    next_seq: int
    acked_seq: int
    dropped_total: int
    pending_dropped: int

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class Outbox:
    """Thread-safe, crash-safe, bounded queue of telemetry windows (see the module docstring)."""

    def __init__(self, path: Path | str, max_bytes: int = DEFAULT_MAX_BYTES,
                 synchronous: Literal["full", "normal"] = "full") -> None:
        if max_bytes < 4096:
            raise CacheError(f"outbox limit {max_bytes} bytes is too small; expected >= 4096")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                       timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.executescript(_SCHEMA)
            self._newest = self._meta(self._db, "next_seq") - 1
        except (sqlite3.Error, OSError) as exc:
            raise CacheError(f"cannot open the telemetry outbox {self.path}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing -----------------------------------------------------------------------------------

    def append(self, window: Mapping[str, Any]) -> int:
        """Store one window (the fields of :class:`~edgeserve.contract.Window` without ``seq``);
        returns its sequence number. Raises :class:`SchemaError` for an invalid window."""
        return self.append_many([window])[0]

    def append_many(self, windows: Iterable[Mapping[str, Any]]) -> list[int]:
        """Store several windows in one transaction, in order."""
        seqs = []
        with self._transaction() as db:
            state = {key: self._meta(db, key) for key in ("next_seq", "pending_dropped", "bytes")}
            evicted_before = self._meta(db, "dropped_total")
            evicted = 0
            for fields in windows:
                seq = state["next_seq"]
                extra = int(fields.get("dropped", 0))
                data = self._encode(fields, seq, state["pending_dropped"] + extra)
                if state["bytes"] + len(data) > self.max_bytes:
                    # the dropped count grows by a few digits at most: leave room for them
                    evicted += self._make_room(db, state, len(data) + 24)
                    data = self._encode(fields, seq, state["pending_dropped"] + extra)
                db.execute("INSERT INTO windows (seq, size, dropped, data) VALUES (?, ?, ?, ?)",
                           (seq, len(data), state["pending_dropped"] + extra, data))
                seqs.append(seq)
                state["next_seq"] += 1
                state["pending_dropped"] = 0
                state["bytes"] += len(data)
            state["dropped_total"] = evicted_before + evicted
            db.executemany("UPDATE meta SET value = ? WHERE key = ?",
                           [(value, key) for key, value in state.items()])
        self._newest = state["next_seq"] - 1
        return seqs

    def _encode(self, fields: Mapping[str, Any], seq: int, dropped: int) -> bytes:
        try:
            window = Window.model_validate({**fields, "seq": seq, "dropped": dropped})
        except ValidationError as exc:
            raise SchemaError(f"telemetry window is not valid: {exc.errors()[0]['msg']} at "
                              f"{'.'.join(str(p) for p in exc.errors()[0]['loc'])}") from None
        data = window.model_dump_json(exclude_none=True).encode()
        limit = min(self.max_bytes // 2, MAX_PAYLOAD_BYTES - 4096)
        if len(data) > limit:
            raise SchemaError(f"telemetry window of {len(data)} bytes is larger than {limit} "
                              "bytes (half the outbox, and it must fit one MQTT message)")
        return data

    def _make_room(self, db: sqlite3.Connection, state: dict[str, int], size: int) -> int:
        """Delete the oldest windows until ``size`` more bytes fit; returns how many went."""
        evicted = carried = freed = 0
        last = 0
        cursor = db.execute("SELECT seq, size, dropped FROM windows ORDER BY seq")
        for seq, rec_size, rec_dropped in cursor:
            if state["bytes"] - freed + size <= self.max_bytes:
                break
            freed += rec_size
            evicted += 1
            carried += rec_dropped
            last = seq
        cursor.close()
        db.execute("DELETE FROM windows WHERE seq <= ?", (last,))
        state["bytes"] -= freed
        state["pending_dropped"] += evicted + carried
        return evicted

    # -- reading and acking ------------------------------------------------------------------------

    def pending(self, after: int = 0, limit: int = 100, max_bytes: int | None = None
                ) -> list[Record]:
        """Up to ``limit`` windows with seq > ``after``, oldest first, at most ``max_bytes`` of
        data together (but always at least one)."""
        with self._lock:
            rows = self._db.execute("SELECT seq, data FROM windows WHERE seq > ? ORDER BY seq "
                                    "LIMIT ?", (after, limit)).fetchall()
        out: list[Record] = []
        total = 0
        for seq, data in rows:
            total += len(data)
            if out and max_bytes is not None and total > max_bytes:
                break
            out.append(Record(int(seq), bytes(data)))
        return out

    def ack(self, seq: int) -> int:
        """The fleet stored everything up to ``seq``: delete those windows; returns how many."""
        with self._transaction() as db:
            row = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM windows "
                             "WHERE seq <= ?", (seq,)).fetchone()
            count, size = int(row[0]), int(row[1])
            if count:
                db.execute("DELETE FROM windows WHERE seq <= ?", (seq,))
            db.execute("UPDATE meta SET value = CASE key WHEN 'bytes' THEN value - ? "
                       "WHEN 'acked_seq' THEN MAX(value, ?) ELSE value END "
                       "WHERE key IN ('bytes', 'acked_seq')", (size, seq))
        return count

    def rebase(self, next_seq: int) -> int:
        """Renumber the held windows to start at ``next_seq`` (the fleet already holds lower
        numbers from an earlier life of this device id); returns how many were renumbered."""
        with self._transaction() as db:
            current = self._meta(db, "next_seq")
            if next_seq <= current:
                return 0
            rows = db.execute("SELECT seq, size, dropped, data FROM windows ORDER BY seq"
                              ).fetchall()
            db.execute("DELETE FROM windows")
            seq = next_seq
            size_total = 0
            for _old, _size, dropped, data in rows:
                fields = Window.model_validate_json(data).model_dump(exclude={"seq"})
                new = self._encode(fields, seq=seq, dropped=int(dropped))
                db.execute("INSERT INTO windows (seq, size, dropped, data) VALUES (?, ?, ?, ?)",
                           (seq, len(new), dropped, new))
                size_total += len(new)
                seq += 1
            db.execute("UPDATE meta SET value = CASE key WHEN 'next_seq' THEN ? "
                       "WHEN 'bytes' THEN ? WHEN 'acked_seq' THEN ? ELSE value END "
                       "WHERE key IN ('next_seq', 'bytes', 'acked_seq')",
                       (seq, size_total, next_seq - 1))
        self._newest = seq - 1
        return len(rows)

    def floor(self) -> int:
        """The lowest seq still held (the next one to be assigned when empty)."""
        with self._lock:
            row = self._db.execute("SELECT MIN(seq) FROM windows").fetchone()
            if row[0] is not None:
                return int(row[0])
            return self._meta(self._db, "next_seq")

    @property
    def newest_seq(self) -> int:
        """The highest sequence number assigned so far (0 before the first window), without a
        query: one process appends to an outbox."""
        return self._newest

    def next_seq(self) -> int:
        """The sequence number the next appended window will get."""
        with self._lock:
            return self._meta(self._db, "next_seq")

    def stats(self) -> OutboxStats:
        with self._lock:
            meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
            count = int(self._db.execute("SELECT COUNT(*) FROM windows").fetchone()[0])
        return OutboxStats(windows=count, bytes=int(meta["bytes"]), max_bytes=self.max_bytes,
                           next_seq=int(meta["next_seq"]), acked_seq=int(meta["acked_seq"]),
                           dropped_total=int(meta["dropped_total"]),
                           pending_dropped=int(meta["pending_dropped"]))

    # -- helpers -----------------------------------------------------------------------------------

    @staticmethod
    def _meta(db: sqlite3.Connection, key: str) -> int:
        return int(db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    def _transaction(self) -> _Transaction:
        return _Transaction(self)


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on error) under the outbox lock."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    def __enter__(self) -> sqlite3.Connection:
        self.outbox._lock.acquire()
        try:
            self.outbox._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self.outbox._lock.release()
            raise CacheError(f"telemetry outbox {self.outbox.path}: {exc}") from None
        return self.outbox._db

    def __exit__(self, exc_type: object, exc: object, _tb: object) -> None:
        db = self.outbox._db
        try:
            db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
        except sqlite3.Error as error:
            if exc_type is None:
                raise CacheError(f"telemetry outbox {self.outbox.path}: {error}") from None
        finally:
            self.outbox._lock.release()
        if isinstance(exc, sqlite3.Error):
            raise CacheError(f"telemetry outbox {self.outbox.path}: {exc}") from None
