"""Deltas the fleet serves: a published file, rebuilt on the device from one it already holds.

A device asks for a file of a version with the sha256 of the file it holds (its *base*: the same
artifact of an earlier version, verified in its cache). When the base is a file the store has
published for the same model, the fleet computes the delta once per (base, target) pair
(:func:`edgeserve.delta.make_delta`) and keeps it on disk::

    ROOT/.deltas/BASE-TARGET.delta    the delta container
    ROOT/.deltas/BASE-TARGET.json     {"method", "size", "sha256", "full_bytes", "encoding"}

It offers the delta when it is at most ``fraction`` of the full file, else the full file.
The offer names the delta's own size and sha256, so the device downloads it like any other
file (HTTP Range resume, or MQTT chunks) and checks it before applying; whatever it rebuilds is
then checked against the signed manifest. Trust never rests on the delta.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgeserve.delta import (
    DEFAULT_FRACTION,
    Layout,
    LayoutError,
    delta_format,
    external_layout,
    make_delta,
    model_beside,
    read_header,
)
from edgeserve.errors import ConfigError, EdgeserveError, ModelNotFoundError
from edgeserve.package import atomic_write

from .artifacts import ArtifactStore

__all__ = ["DeltaCache", "DeltaOffer", "delta_fraction_from_env"]

log = logging.getLogger(__name__)
_SHA = frozenset("0123456789abcdef")


def delta_fraction_from_env(default: float = DEFAULT_FRACTION) -> float:
    """``EDGESERVE_DELTA_FRACTION`` (0 turns deltas off), or ``default``."""
    raw = os.environ.get("EDGESERVE_DELTA_FRACTION")
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise ConfigError(f"EDGESERVE_DELTA_FRACTION={raw!r}: expected a number from 0 to 1")
    return value


@dataclass(frozen=True)
class DeltaOffer:
    """What the fleet serves for (version, member, base): ``method`` "delta" (then ``size`` and
    ``sha256`` are the delta's, ``path`` where it is) or "full" (``reason`` says why)."""

    method: str
    full_bytes: int
    size: int = 0
    sha256: str = ""
    encoding: str = ""
    reason: str = ""
    path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("path")
        return data


class DeltaCache:
    """Computes, keeps and offers deltas between the files of one :class:`ArtifactStore`."""

    def __init__(self, store: ArtifactStore, fraction: float | None = None) -> None:
        self.store = store
        if fraction is None:
            fraction = store.delta_fraction
        self.fraction = delta_fraction_from_env() if fraction is None else fraction
        self.root = store.root / ".deltas"
        self._lock = threading.Lock()
        self._computing: dict[str, threading.Lock] = {}

    def _base_file(self, name: str, base_sha256: str) -> tuple[str, str] | None:
        """(version, member) of a published file of model ``name`` with that sha256."""
        for published in reversed(self.store.versions(name)):
            manifest = self.store.manifest(name, published.version)
            for member, entry in manifest.files.items():
                if entry.sha256 == base_sha256:
                    return published.version, member
        return None

    def offer(self, name: str, version: str, member: str, base_sha256: str) -> DeltaOffer:
        """The delta for ``member`` of ``name`` ``version`` against the file ``base_sha256``,
        or why the full file is served instead."""
        manifest = self.store.manifest(name, version)
        entry = manifest.files.get(member)
        if entry is None:
            raise ModelNotFoundError(f"{name} {version} has no file {member!r}")
        if len(base_sha256) != 64 or not set(base_sha256) <= _SHA:
            return DeltaOffer("full", entry.size, reason="base is not a sha256")
        if self.fraction <= 0:
            return DeltaOffer("full", entry.size, reason="deltas are turned off")
        base = self._base_file(name, base_sha256)
        if base is None:
            return DeltaOffer("full", entry.size,
                              reason=f"no published file of {name} has sha256 {base_sha256[:16]}…")
        meta = self._computed(name, version, member, base, base_sha256, entry.sha256)
        if meta["size"] > self.fraction * entry.size:
            return DeltaOffer("full", entry.size, reason=f"delta is {meta['size']} bytes, more "
                              f"than {self.fraction:g} of the {entry.size}-byte file")
        return DeltaOffer("delta", entry.size, int(meta["size"]), str(meta["sha256"]),
                          str(meta["encoding"]),
                          path=self.root / f"{base_sha256}-{entry.sha256}.delta")

    def delta_path(self, base_sha256: str, target_sha256: str) -> Path:
        """A computed delta file (ModelNotFoundError when there is none)."""
        for value in (base_sha256, target_sha256):
            if len(value) != 64 or not set(value) <= _SHA:
                raise ModelNotFoundError("no such delta")
        path = self.root / f"{base_sha256}-{target_sha256}.delta"
        if not path.exists():
            raise ModelNotFoundError("no such delta (ask for an offer first)")
        return path

    def _computed(self, name: str, version: str, member: str, base: tuple[str, str],
                  base_sha256: str, target_sha256: str) -> dict[str, Any]:
        key = f"{base_sha256}-{target_sha256}"
        meta_path = self.root / f"{key}.json"
        with self._lock:
            lock = self._computing.setdefault(key, threading.Lock())
        with lock:  # one computation per pair, however many devices ask at once
            try:
                return dict(json.loads(meta_path.read_text()))
            except (OSError, ValueError):
                pass
            target = self.store.file_path(name, version, member)
            artifact = next((a for a in self.store.manifest(name, version).artifacts
                             if member.startswith(a.path)), None)
            fmt = delta_format(member, artifact.format if artifact else None)
            delta = make_delta(self.store.file_path(name, *base).read_bytes(),
                               target.read_bytes(), fmt,
                               self._external(name, version, member, base) if fmt == "onnx"
                               else None)
            meta: dict[str, Any] = {
                "size": len(delta), "sha256": hashlib.sha256(delta).hexdigest(),
                "full_bytes": target.stat().st_size, "encoding": read_header(delta).method,
                "format": fmt}
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write(self.root / f"{key}.delta", delta)
            atomic_write(meta_path, json.dumps(meta).encode())
            log.info("delta %s %s %s from %s…: %d of %d bytes (%s)", name, version, member,
                     base_sha256[:12], len(delta), meta["full_bytes"], meta["encoding"])
            return meta

    def _external(self, name: str, version: str, member: str,
                  base: tuple[str, str]) -> Layout | None:
        """The tensor layout of an ONNX external data file and its base, from the model files
        beside them."""
        model = model_beside(member, self.store.manifest(name, version).files)
        old_model = model_beside(base[1], self.store.manifest(name, base[0]).files)
        if model is None or old_model is None:
            return None
        try:
            return external_layout(
                member, model, self.store.file_path(name, base[0], old_model).read_bytes(),
                self.store.file_path(name, version, model).read_bytes())
        except LayoutError:
            return None

    def safe_offer(self, name: str, version: str, member: str, base_sha256: str) -> DeltaOffer:
        """:meth:`offer`, but a delta that cannot be made is served in full (logged)."""
        try:
            return self.offer(name, version, member, base_sha256)
        except ModelNotFoundError:
            raise
        except (EdgeserveError, OSError, ValueError) as exc:
            log.warning("no delta for %s %s %s: %s", name, version, member, exc)
            return DeltaOffer("full", 0, reason=f"delta could not be made: {exc}")
