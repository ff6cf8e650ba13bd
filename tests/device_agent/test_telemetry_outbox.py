"""The durable outbox: sequence numbers, acks, the byte bound with counted drops, kill -9."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeserve._process import popen
from edgeserve.contract import TelemetryBatch, Window, decode
from edgeserve.device_agent.telemetry.outbox import Outbox
from edgeserve.errors import CacheError, SchemaError

WINDOW = {"start": 1.0, "end": 61.0, "model": "m", "version": "1.0.0", "requests": 10,
          "errors": 1}


def test_sequence_numbers_start_at_one_and_survive_reopening(tmp_path: Path) -> None:
    """Windows get 1, 2, 3…; a reopened outbox continues where it stopped."""
    with Outbox(tmp_path / "o.db") as ob:
        assert ob.append_many([WINDOW] * 3) == [1, 2, 3]
    with Outbox(tmp_path / "o.db") as ob:
        assert ob.append(WINDOW) == 4
        assert [r.seq for r in ob.pending()] == [1, 2, 3, 4]
        assert Window.model_validate_json(ob.pending()[0].data).seq == 1


def test_ack_deletes_up_to_the_sequence_only(tmp_path: Path) -> None:
    """An ack removes every window up to its seq and nothing after; stale acks do nothing."""
    with Outbox(tmp_path / "o.db") as ob:
        ob.append_many([WINDOW] * 5)
        assert ob.ack(3) == 3
        assert [r.seq for r in ob.pending()] == [4, 5]
        assert ob.ack(2) == 0
        assert ob.floor() == 4
        assert ob.stats().acked_seq == 3
        ob.ack(5)
        assert ob.floor() == ob.next_seq() == 6


def test_pending_is_oldest_first_and_bounded(tmp_path: Path) -> None:
    """pending() returns seqs after a mark, oldest first, within a byte budget (min one)."""
    with Outbox(tmp_path / "o.db") as ob:
        ob.append_many([WINDOW] * 10)
        size = len(ob.pending(limit=1)[0].data)
        assert [r.seq for r in ob.pending(after=4, limit=3)] == [5, 6, 7]
        assert len(ob.pending(limit=10, max_bytes=size * 2 + 1)) == 2
        assert len(ob.pending(limit=10, max_bytes=1)) == 1


def test_full_outbox_drops_oldest_and_counts_them_in_the_next_window(tmp_path: Path) -> None:
    """Over the byte bound the oldest windows go, and the window that needed the room carries
    their count; the counts add up to every window dropped, and the bound holds."""
    with Outbox(tmp_path / "o.db", max_bytes=4096) as ob:
        seqs = ob.append_many([WINDOW] * 30) + [ob.append(WINDOW) for _ in range(30)]
        assert seqs == list(range(1, 61))
        held = ob.pending(limit=1000)
        stats = ob.stats()
        assert stats.bytes <= 4096 and stats.bytes == sum(len(r.data) for r in held)
        kept = [r.seq for r in held]
        assert kept == list(range(61 - len(kept), 61))  # the newest survive
        carried = sum(json.loads(r.data)["dropped"] for r in held)
        assert carried == stats.dropped_total == 60 - len(kept)


def test_drop_counts_carried_by_dropped_windows_are_not_lost(tmp_path: Path) -> None:
    """When a window that carried a drop count is itself dropped, its count moves on."""
    with Outbox(tmp_path / "o.db", max_bytes=4096) as ob:
        for _ in range(200):
            ob.append(WINDOW)
        held = ob.pending(limit=1000)
        assert sum(json.loads(r.data)["dropped"] for r in held) == 200 - len(held)


def test_invalid_windows_are_refused_with_a_clear_error(tmp_path: Path) -> None:
    """A window that breaks the contract never enters the outbox."""
    with Outbox(tmp_path / "o.db") as ob:
        with pytest.raises(SchemaError, match="not valid"):
            ob.append({**WINDOW, "errors": 11})
        assert ob.next_seq() == 1
    with pytest.raises(CacheError, match="too small"):
        Outbox(tmp_path / "x.db", max_bytes=10)


def test_rebase_renumbers_after_what_the_fleet_already_holds(tmp_path: Path) -> None:
    """Renumbering keeps order and content and moves the sequence on."""
    with Outbox(tmp_path / "o.db") as ob:
        ob.append_many([WINDOW] * 3)
        assert ob.rebase(1001) == 3
        held = ob.pending()
        assert [r.seq for r in held] == [1001, 1002, 1003]
        assert [Window.model_validate_json(r.data).seq for r in held] == [1001, 1002, 1003]
        assert ob.append(WINDOW) == 1004
        assert ob.rebase(10) == 0


def test_stored_windows_form_a_valid_batch(tmp_path: Path) -> None:
    """The stored JSON of windows, joined, is a TelemetryBatch the fleet accepts."""
    with Outbox(tmp_path / "o.db") as ob:
        ob.append_many([WINDOW] * 3)
        body = b",".join(r.data for r in ob.pending())
    batch = decode(TelemetryBatch, b'{"v":1,"device_id":"d","windows":[' + body + b"]}")
    assert [w.seq for w in batch.windows] == [1, 2, 3]


_WRITER = """
import sys
from edgeserve.device_agent.telemetry.outbox import Outbox
ob = Outbox(sys.argv[1], max_bytes=200_000, synchronous="full")
window = {"start": 1.0, "end": 2.0, "model": "m", "version": "1", "requests": 3}
i = 0
while True:
    ob.append(window)
    i += 1
    if i % 7 == 0:
        ob.ack(ob.next_seq() - 3)
    if i == 50:
        print("going", flush=True)
"""


@pytest.mark.slow
def test_outbox_survives_kill_9_mid_write(tmp_path: Path) -> None:
    """SIGKILL while appending, acking and dropping leaves a consistent outbox: no gap between
    what was acked and what is held, byte count exact, and numbering goes on."""
    path = tmp_path / "o.db"
    for round_ in range(3):
        proc = popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE,
                     text=True)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "going"
        time.sleep(0.3 + 0.2 * round_)
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        with Outbox(path, max_bytes=200_000) as ob:
            stats = ob.stats()
            held = ob.pending(limit=100_000)
            seqs = [r.seq for r in held]
            assert seqs == list(range(ob.floor(), ob.next_seq()))
            assert stats.bytes == sum(len(r.data) for r in held) <= 200_000
            before = ob.next_seq()
            assert ob.append(WINDOW) == before
