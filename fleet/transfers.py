"""What the artifact endpoint sent, in full and as deltas: the bytes a rollout cost and saved.

Every response carrying a published file or a delta (HTTP, or an MQTT chunk) is one line of
``ROOT/.transfers.jsonl`` (the artifact store's directory, so every fleet process serving it
counts into one place)::

    {"ts", "model", "version", "file", "device", "kind": "full"|"delta", "bytes", "full_bytes"}

``bytes`` is what was sent (a resumed download counts only its rest); ``full_bytes`` is what
the full file would have cost, counted once per transfer (on the response that starts at
offset 0). A rollout brings one (model, version), so :meth:`TransferLog.summary` of that pair,
since the rollout began, is what it cost: ``saved`` is the full size of every file that went as a
delta, less the delta bytes sent.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["TransferLog", "TransferSummary"]


@dataclass
class TransferSummary:
    model: str
    version: str
    full_bytes_sent: int = 0
    delta_bytes_sent: int = 0
    delta_full_bytes: int = 0
    """what the files that went as deltas would have cost in full"""
    full_transfers: int = 0
    delta_transfers: int = 0
    fallbacks: int = 0
    """(device, file) pairs sent a delta and then the full file: the device refused the delta
    (its own report counts why)"""

    @property
    def bytes_sent(self) -> int:
        return self.full_bytes_sent + self.delta_bytes_sent

    @property
    def saved(self) -> int:
        return max(0, self.delta_full_bytes - self.delta_bytes_sent)

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "bytes_sent": self.bytes_sent, "saved": self.saved}


class TransferLog:
    """Append-only log of served transfers (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / ".transfers.jsonl"
        self._lock = threading.Lock()

    def record(self, model: str, version: str, file: str, device: str | None, kind: str,
               sent: int, full_bytes: int) -> None:
        line = json.dumps({"ts": round(time.time(), 3), "model": model, "version": version,
                           "file": file, "device": device, "kind": kind, "bytes": sent,
                           "full_bytes": full_bytes}) + "\n"
        with self._lock:
            # one write of one short line in append mode: lines of concurrent writers never mix
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)

    def entries(self, model: str | None = None, version: str | None = None,
                since: float = 0.0) -> list[dict[str, object]]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        found = []
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            if (model is None or entry.get("model") == model) and \
                    (version is None or entry.get("version") == version) and \
                    float(entry.get("ts", 0)) >= since:
                found.append(entry)
        return found

    def summary(self, model: str, version: str, since: float = 0.0,
                until: float | None = None) -> TransferSummary:
        total = TransferSummary(model, version)
        had_delta: set[tuple[object, object]] = set()
        refetched: set[tuple[object, object]] = set()
        for entry in self.entries(model, version, since):
            if until is not None and float(entry["ts"]) > until:  # type: ignore[arg-type]
                continue
            sent, full = int(entry["bytes"]), int(entry["full_bytes"])  # type: ignore[call-overload]
            key = (entry.get("device"), entry.get("file"))
            if entry["kind"] == "delta":
                total.delta_bytes_sent += sent
                total.delta_full_bytes += full
                total.delta_transfers += 1 if full else 0
                had_delta.add(key)
            else:
                total.full_bytes_sent += sent
                total.full_transfers += 1 if full else 0
                if full and key in had_delta and key[0] is not None:
                    refetched.add(key)
        total.fallbacks = len(refetched)
        return total
