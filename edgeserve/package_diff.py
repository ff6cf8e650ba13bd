"""What changed between two versions of a package, per artifact and tensor, and what a device
holding the old one would be sent (``edgeserve package diff``).

An artifact of the new package is compared with the old package's artifact of the same id (the
one a device of the same profile holds). Its files are diffed one by one (:func:`diff_file`; a
Core ML package is a directory of files); the artifact goes as a delta when the deltas of its
files together are at most ``fraction`` of its full size — the fleet's rule, per file, is the
same — else in full. An artifact the old package lacks always goes in full.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .delta import (
    DEFAULT_FRACTION,
    FileDiff,
    Layout,
    LayoutError,
    diff_file,
    external_layout,
    model_beside,
)
from .package import Package

__all__ = ["ArtifactDiff", "diff_packages"]


@dataclass
class ArtifactDiff:
    """One artifact of the new package against the same id in the old one."""

    id: str
    format: str
    full_bytes: int
    delta_bytes: int
    """the delta's size (sent only when ``method`` is "delta")"""
    method: str
    """"delta" or "full\""""
    base: str | None
    """the old package's artifact id it was compared with, None when it has none"""
    files: list[FileDiff] = field(default_factory=list)

    @property
    def sent_bytes(self) -> int:
        return self.delta_bytes if self.method == "delta" else self.full_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "format": self.format, "full_bytes": self.full_bytes,
                "delta_bytes": self.delta_bytes, "method": self.method,
                "sent_bytes": self.sent_bytes, "base": self.base,
                "ratio": round(self.delta_bytes / self.full_bytes, 5) if self.full_bytes else 0,
                "files": [f.to_dict() for f in self.files]}


def diff_packages(old: Package, new: Package,
                  fraction: float = DEFAULT_FRACTION) -> list[ArtifactDiff]:
    """Every artifact of ``new``, compared with ``old``'s artifact of the same id."""
    before = {a.id: a for a in old.manifest.artifacts}
    found = []
    for artifact in new.manifest.artifacts:
        names = new.manifest.artifact_files(artifact)
        full = sum(new.manifest.files[n].size for n in names)
        base = before.get(artifact.id)
        if base is None:
            found.append(ArtifactDiff(artifact.id, artifact.format, full, full, "full", None))
            continue
        old_files = {n[len(base.path):]: n for n in old.manifest.artifact_files(base)}
        diffs = []
        for name in names:
            old_name = old_files.get(name[len(artifact.path):])
            old_bytes = old.read_bytes(old_name) if old_name is not None else b""
            layout = _external(old, new, old_files, name, names, artifact.path) \
                if artifact.format == "onnx" else None
            diffs.append(diff_file(name, old_bytes, new.read_bytes(name), artifact.format,
                                   layout))
        delta = sum(d.delta_bytes for d in diffs)
        method = "delta" if delta <= fraction * full else "full"
        found.append(ArtifactDiff(artifact.id, artifact.format, full, delta, method, base.id,
                                  diffs))
    return found


def _external(old: Package, new: Package, old_files: dict[str, str], name: str,
              names: list[str], path: str) -> Layout | None:
    """The tensor layout of ``name`` when it is an ONNX model's external data file."""
    model = model_beside(name, names)
    old_model = old_files.get(model[len(path):]) if model is not None else None
    if model is None or old_model is None:
        return None
    try:
        return external_layout(name, model, old.read_bytes(old_model), new.read_bytes(model))
    except LayoutError:
        return None
