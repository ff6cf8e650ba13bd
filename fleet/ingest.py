"""Telemetry ingestion, transport-free: validate messages, store them, decide the acks.

The MQTT adapter (:mod:`.service`) hands every received message to :meth:`Ingestor.parse`, then a
group of parsed messages to :meth:`Ingestor.commit`, which writes them in one transaction and
returns the acks to publish. A bad payload never stops ingestion: it is counted under a reason,
logged (throttled, so a flood of garbage cannot flood the log) and dropped.

Rejection reasons: ``topic`` (not a v1 device topic of this fleet, or a kind the fleet does not
ingest), ``oversize`` (over :data:`~edgeserve.contract.MAX_PAYLOAD_BYTES`), ``malformed`` (not a
JSON object), ``schema`` (JSON that breaks the contract), ``device-mismatch`` (the payload names
another device than its topic: a device may publish only under its own id), ``seq-jump`` (a
sequence number or floor far beyond what the device could have produced since its last ack),
``error`` (handling
it raised something unexpected - a bug, logged with its traceback - and it was dropped so that
ingestion goes on; see :mod:`.service`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from edgeserve.contract import (
    MAX_PAYLOAD_BYTES,
    Status,
    TelemetryBatch,
    decode,
    parse_topic,
)
from edgeserve.errors import ContractError

from .registry import apply_status, ensure_devices, lock_devices
from .store import Store
from .tables import devices
from .telemetry import advance_acks, store_windows, window_row

__all__ = ["MAX_SEQ_JUMP", "MAX_WINDOW_RATE", "REJECT_REASONS", "IngestStats", "Ingestor", "Parsed"]

log = logging.getLogger(__name__)

REJECT_REASONS = ("topic", "oversize", "malformed", "schema", "device-mismatch", "seq-jump",
                  "error")
MAX_SEQ_JUMP = 1_000_000
"""How far past a device's acked sequence number a batch may reach at once (Ingestor._plausible),
plus MAX_WINDOW_RATE per second since the device was last seen."""
MAX_WINDOW_RATE = 100.0
_LOG_FIRST = 20
_LOG_EVERY = 1000


@dataclass(frozen=True)
class Parsed:
    """A validated message: a telemetry batch or a status, with the device it came from."""

    device_id: str
    batch: TelemetryBatch | None = None
    status: Status | None = None


@dataclass
class IngestStats:
    """Counters since start (read them with :meth:`snapshot`)."""

    messages: int = 0
    batches: int = 0
    statuses: int = 0
    windows_received: int = 0
    windows_stored: int = 0
    duplicates: int = 0
    acks: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    def snapshot(self) -> dict[str, Any]:
        return {"messages": self.messages, "batches": self.batches, "statuses": self.statuses,
                "windows_received": self.windows_received, "windows_stored": self.windows_stored,
                "duplicates": self.duplicates, "acks": self.acks,
                "rejected": {r: self.rejected.get(r, 0) for r in REJECT_REASONS},
                "rejected_total": sum(self.rejected.values())}


class Ingestor:
    """Validates and stores what devices of one fleet publish; thread-safe counters."""

    def __init__(self, store: Store, fleet: str, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.fleet = fleet
        self.clock = clock
        self.stats = IngestStats()
        self._lock = threading.Lock()

    def parse(self, topic: str, payload: bytes) -> Parsed | None:
        """Validate one message; None (counted and logged) when it must be dropped."""
        with self._lock:
            self.stats.messages += 1
        try:
            where = parse_topic(topic)
        except ContractError as exc:
            return self._reject("topic", topic, str(exc))
        if where.fleet != self.fleet or where.kind not in ("telemetry", "status"):
            return self._reject("topic", topic, f"not a telemetry or status topic of fleet "
                                                f"{self.fleet!r}")
        if where.kind == "status" and not payload:
            return None  # an empty retained message clears a status: nothing to record
        if len(payload) > MAX_PAYLOAD_BYTES:
            return self._reject("oversize", topic, f"{len(payload)} bytes, at most "
                                                   f"{MAX_PAYLOAD_BYTES} allowed")
        try:
            message: TelemetryBatch | Status = (
                decode(TelemetryBatch, payload, where=topic) if where.kind == "telemetry"
                else decode(Status, payload, where=topic))
        except ContractError as exc:
            return self._reject(_classify(payload), topic, str(exc))
        if message.device_id != where.device_id:
            return self._reject("device-mismatch", topic,
                                f"payload is from device {message.device_id!r}")
        if isinstance(message, TelemetryBatch):
            return Parsed(where.device_id, batch=message)
        return Parsed(where.device_id, status=message)

    def commit(self, items: Sequence[Parsed]) -> dict[str, int]:
        """Store a group of parsed messages; returns the ack (seq) to send to each device that
        sent telemetry. Raises :class:`~edgeserve.errors.StoreError` if the store fails (then
        nothing is acked and the messages must be processed again)."""
        now = self.clock()
        batches = self._plausible([p for p in items if p.batch is not None])
        statuses = [p.status for p in items if p.status is not None]
        rows: list[dict[str, Any]] = []
        floors: dict[str, int] = {}
        for item in batches:
            assert item.batch is not None
            seqs = [w.seq for w in item.batch.windows]
            floor = min(*seqs, item.batch.floor or 1)
            floors[item.device_id] = max(floors.get(item.device_id, 1), floor)
            rows.extend(window_row(item.device_id, w, now) for w in item.batch.windows)
        # one row per key (a retransmission may sit in the same group as the original), in key
        # order, so two workers inserting overlapping backlogs lock rows in the same order
        received = len(rows)
        unique = {(r["device_id"], r["seq"]): r for r in reversed(rows)}
        rows = [unique[key] for key in sorted(unique)]
        stored = 0
        touched = sorted({s.device_id for s in statuses} | set(floors))
        with self.store.write() as conn:
            if touched:
                # every device row this group writes, made and locked first, in key order
                ensure_devices(self.store, conn, touched, now)
                lock_devices(self.store, conn, touched)
            # per device in time order (the newest status wins whatever the order: apply_status
            # checks the time stamp)
            for status in sorted(statuses, key=lambda s: (s.device_id, s.ts)):
                apply_status(self.store, conn, status, now)
            if rows:
                stored = store_windows(self.store, conn, rows, now)
        acks = advance_acks(self.store, floors)
        with self._lock:
            self.stats.batches += len(batches)
            self.stats.statuses += len(statuses)
            self.stats.windows_received += received
            self.stats.windows_stored += stored
            self.stats.duplicates += received - stored
            self.stats.acks += len(acks)
        return acks

    def _plausible(self, batches: list[Parsed]) -> list[Parsed]:
        """Batches whose sequence numbers a device could have produced since its last ack.

        A device numbers its windows one by one, a few per second at the very most, so a batch
        far beyond the device's acked sequence (``seq`` or ``floor`` near 2^53, say) is a
        forgery or a bug. Storing and acking it would move the device's floor past every number
        it will ever use, so its real windows would be refused from then on. The allowance is
        :data:`MAX_SEQ_JUMP` plus :data:`MAX_WINDOW_RATE` per second since the device was last
        seen (a device away for a year, its full outbox dropping the oldest windows, comes back
        far ahead, legitimately); for a device the fleet never saw that is the time since 1970.
        """
        if not batches:
            return []
        ids = sorted({p.device_id for p in batches})
        with self.store.read() as conn:
            known = {r.device_id: (int(r.acked_seq), float(r.last_seen or 0.0)) for r in
                     conn.execute(sa.select(devices.c.device_id, devices.c.acked_seq,
                                            devices.c.last_seen)
                                  .where(devices.c.device_id.in_(ids)))}
        now = self.clock()
        kept = []
        for item in batches:
            assert item.batch is not None
            top = max([w.seq for w in item.batch.windows] + [item.batch.floor or 0])
            acked, seen = known.get(item.device_id, (0, 0.0))
            limit = acked + MAX_SEQ_JUMP + int(max(0.0, now - seen) * MAX_WINDOW_RATE)
            if top > limit:
                self._reject("seq-jump", f"device {item.device_id}",
                             f"sequence number {top} is more than {limit - acked} past the "
                             f"{acked} acked: not stored, not acked")
                continue
            kept.append(item)
        return kept

    def reject(self, reason: str, topic: str, detail: str) -> None:
        """Count and log (throttled) one dropped message."""
        self._reject(reason, topic, detail)

    def _reject(self, reason: str, topic: str, detail: str) -> Parsed | None:
        with self._lock:
            self.stats.rejected[reason] += 1
            count = self.stats.rejected[reason]
        if count <= _LOG_FIRST or count % _LOG_EVERY == 0:
            log.warning("dropped a message on %s (%s, #%d): %s", topic[:200], reason, count,
                        detail.splitlines()[0][:300] if detail else "")
        return None


def _classify(payload: bytes) -> str:
    if payload.lstrip()[:1] != b"{":
        return "malformed"  # not an object: no need to parse it (deep nesting included)
    try:
        return "schema" if isinstance(json.loads(payload), dict) else "malformed"
    except (ValueError, UnicodeDecodeError, RecursionError):
        return "malformed"
