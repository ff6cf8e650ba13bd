"""The agent's event log: what happened to its models, in order, kept in the cache directory.

Installs, activations, rollbacks and removals (written by :class:`~.agent.Agent`, whichever
process made them: the CLI, ``agent run``, an app), and what the fleet's updates came to
(committed after the health watch, health failures, failed deliveries; written by ``agent
run``). ``edgeserve agent events`` reads it.

``CACHE/events.jsonl`` holds one JSON object per line. It is bounded: past ``max_bytes`` the
oldest half is dropped. Appends and the trimming happen under ``CACHE/events.lock`` (flock), so
several processes on one cache never lose or tear a line. Writing an event never fails the
operation it describes: an unwritable log is logged and skipped.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["AgentEvent", "EventLog"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 256 * 1024


@dataclass(frozen=True)
class AgentEvent:
    """One line of the log. ``event`` is e.g. ``installed``, ``activated``, ``rolled-back``,
    ``removed``, ``committed``, ``health-failed``, ``update-failed``."""

    ts: float
    event: str
    model: str | None = None
    version: str | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EventLog:
    """Append-only, size-bounded JSON-lines log under ``root`` (see the module docstring)."""

    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = Path(root) / "events.jsonl"
        self._lock_path = Path(root) / "events.lock"
        self.max_bytes = max(4096, max_bytes)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def add(self, event: str, model: str | None = None, version: str | None = None,
            detail: str = "") -> None:
        """Append one event (never raises: the log must not fail what it records)."""
        line = json.dumps(AgentEvent(time.time(), event, model, version, detail[:2000])
                          .to_dict(), separators=(",", ":")) + "\n"
        try:
            with self._locked():
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(line)
                    size = f.tell()
                if size > self.max_bytes:
                    self._trim()
        except OSError as exc:
            log.warning("cannot write the agent event log %s: %s", self.path, exc)

    def _trim(self) -> None:
        # keep the newest half, replaced atomically (the lock is held)
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept: list[str] = []
        size = 0
        for line in reversed(lines):
            size += len(line.encode())
            if size > self.max_bytes // 2:
                break
            kept.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(reversed(kept)), encoding="utf-8")
        tmp.replace(self.path)

    def read(self, limit: int | None = None, model: str | None = None) -> list[AgentEvent]:
        """The events, oldest first (the newest ``limit`` of them; only ``model``'s if given).
        A damaged line (a disk that lost a write) is skipped."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        events = []
        for line in text.splitlines():
            try:
                data = json.loads(line)
                event = AgentEvent(float(data["ts"]), str(data["event"]), data.get("model"),
                                   data.get("version"), str(data.get("detail", "")))
            except (ValueError, KeyError, TypeError):
                continue
            if model is None or event.model == model:
                events.append(event)
        return events[-limit:] if limit else events
