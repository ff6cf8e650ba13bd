"""Which artifact of a package a device of a given profile keeps: one rule for the device agent
(which downloads only that artifact) and the fleet (which checks, before a rollout starts, that
every device in scope has one).

Walk the profile's ``artifacts`` in order of preference and take the first that the package
carries (same format, precision and quantization; io dtype and a matching ``profiles`` entry
break ties) in a format one of ``formats`` runs. When no target matches, an artifact built for
the profile by name is taken. Otherwise there is none, and the error names what the package has
and what the profile wants. ``formats`` are the artifact formats the device can run: on the
device, those whose runtime is installed; on the fleet, those the profile declares a runtime for.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from .errors import RuntimeUnavailableError
from .manifest import Artifact, Manifest
from .profiles import ArtifactTarget, HardwareProfile

__all__ = ["RUNTIME_FORMATS", "Family", "artifact_io_dtype", "batch_variant", "choose_artifact",
           "declared_formats", "family", "pad_batch"]

RUNTIME_FORMATS = {"onnx": ("onnxruntime",), "tflite": ("litert",), "coreml": ("coreml",)}
"""Artifact format -> the profile runtimes that run it."""


def declared_formats(profile: HardwareProfile) -> list[str]:
    """Formats the profile declares a runtime for (what a device of that class can run)."""
    declared = set(profile.runtimes.available())
    return [fmt for fmt, runtimes in RUNTIME_FORMATS.items() if declared & set(runtimes)]


def artifact_io_dtype(artifact: Artifact, manifest: Manifest) -> str:
    specs = artifact.inputs or manifest.inputs
    return specs[0].dtype if specs else "float32"


def _matches(target: ArtifactTarget, artifact: Artifact) -> bool:
    if (artifact.format, artifact.precision) != (target.format, target.precision):
        return False
    loose = {"none", "static"}
    return artifact.quantization == target.quantization or \
        (artifact.quantization in loose and target.quantization in loose)


def choose_artifact(manifest: Manifest, profile: HardwareProfile,
                    formats: Collection[str], where: str = "here") -> Artifact:
    """The artifact a device of ``profile`` that runs ``formats`` keeps (module docstring);
    :class:`~edgeserve.errors.RuntimeUnavailableError` when there is none."""
    for target in profile.artifacts:
        if target.format not in formats:
            continue
        found = [a for a in manifest.artifacts if a.batch is None and _matches(target, a)]
        if found:
            found.sort(key=lambda a: (artifact_io_dtype(a, manifest) != target.io_dtype,
                                      profile.name not in a.profiles))
            return found[0]
    named = [a for a in manifest.artifacts
             if a.batch is None and profile.name in a.profiles and a.format in formats]
    if named:
        return named[0]
    has = ", ".join(f"{a.id} ({a.format} {a.precision} {a.quantization}"
                    f"{f' batch {a.batch}' if a.batch else ''})" for a in manifest.artifacts)
    wants = ", ".join(t.key for t in profile.artifacts)
    raise RuntimeUnavailableError(
        f"package {manifest.name} {manifest.version} has no artifact that profile "
        f"{profile.name!r} can run {where} (runnable formats: {', '.join(formats) or 'none'}); "
        f"the package has: {has}; the profile wants: {wants}"
    )


Family = tuple[str, str, str, str]
"""What a batch-N variant shares with the batch-1 artifact it stands beside."""


def family(format: str, precision: str, quantization: str, io_dtype: str) -> Family:
    """The family of an artifact: a batch-N variant serves beside the batch-1 artifact of its
    family (the same format, precision, quantization and I/O dtype), never on its own."""
    return format, precision, quantization, io_dtype


def batch_variant(manifest: Manifest, artifact: Artifact) -> Artifact | None:
    """The batch-N variant of ``artifact`` (``Artifact.batch``: its :func:`family`, every batch
    fixed at N), the largest when there are several; None when the package has none. Batch-N
    variants are never chosen on their own: a device keeps one beside its artifact for the
    agent's dynamic batching."""
    def of(a: Artifact) -> Family:
        return family(a.format, a.precision, a.quantization, artifact_io_dtype(a, manifest))

    mine = of(artifact)
    same = [a for a in manifest.artifacts
            if a.batch is not None and a.id != artifact.id and of(a) == mine]
    return max(same, key=lambda a: a.batch or 0, default=None)


def pad_batch(array: np.ndarray, size: int) -> np.ndarray:
    """``array`` with its last sample repeated up to ``size`` samples: a partial batch for a
    batch-N variant, whose outputs for the copies are then dropped."""
    if array.shape[0] >= size:
        return array
    filler = np.repeat(array[-1:], size - array.shape[0], axis=0)
    return np.concatenate([array, filler])
