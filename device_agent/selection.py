"""Which artifact of a package this device keeps, and which package files it needs for it.

The rule itself is the core's (:mod:`edgeserve.selection`, shared with the fleet, which checks a
rollout's devices against it); here the formats are those a runtime *on this machine* can run.
"""

from __future__ import annotations

import importlib.util
import sys

from edgeserve.errors import ConfigError, RuntimeUnavailableError
from edgeserve.manifest import Artifact, Manifest
from edgeserve.profiles import HardwareProfile
from edgeserve.selection import (
    RUNTIME_FORMATS,
    artifact_io_dtype,
    batch_variant,
    choose_artifact,
)

__all__ = ["artifact_io_dtype", "required_files", "runnable_formats", "select_artifact"]


def _has_module(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def runnable_formats(profile: HardwareProfile) -> list[str]:
    """Artifact formats that the profile declares a runtime for AND that can run here."""
    here = {
        "onnx": _has_module("onnxruntime"),
        "tflite": _has_module("ai_edge_litert") or _has_module("tflite_runtime"),
        "coreml": sys.platform == "darwin" and _has_module("coremltools"),
    }
    declared = set(profile.runtimes.available())
    return [fmt for fmt, ok in here.items()
            if ok and declared & set(RUNTIME_FORMATS[fmt])]


def select_artifact(manifest: Manifest, profile: HardwareProfile,
                    artifact_id: str | None = None) -> Artifact:
    """The artifact this device keeps (see the module docstring); ``artifact_id`` overrides."""
    formats = runnable_formats(profile)
    if artifact_id is not None:
        chosen = manifest.artifact(artifact_id)
        if chosen.batch is not None:
            raise ConfigError(
                f"artifact {chosen.id} is a batch-{chosen.batch} variant: it serves only beside "
                "the batch-1 artifact of its format and precision (the agent's dynamic "
                "batching loads it); choose one of "
                f"{', '.join(a.id for a in manifest.artifacts if a.batch is None)}")
        if chosen.format not in formats:
            raise RuntimeUnavailableError(_cannot_run(chosen, profile, formats))
        return chosen
    return choose_artifact(manifest, profile, formats)


def _cannot_run(artifact: Artifact, profile: HardwareProfile, formats: list[str]) -> str:
    if artifact.format == "coreml" and sys.platform != "darwin":
        return (f"artifact {artifact.id} is Core ML, which runs only on macOS/iOS (this is "
                f"{sys.platform}); choose an ONNX or TFLite artifact")
    return (f"artifact {artifact.id} is {artifact.format}, but profile {profile.name!r} on this "
            f"machine can run only: {', '.join(formats) or 'nothing'}")


def required_files(manifest: Manifest, profile: HardwareProfile,
                   artifact_id: str | None = None) -> list[str]:
    """Package members a device with ``profile`` needs: its artifact (and that artifact's batch-N
    variant, if the package has one), reference and samples.

    A package's ``samples``/``reference`` fields may name one file; the conventional
    ``samples/inputs.npz`` + ``samples/expected.npz`` pair is included whenever present.
    """
    artifact = select_artifact(manifest, profile, artifact_id)
    names = set(manifest.artifact_files(artifact))
    variant = batch_variant(manifest, artifact)
    if variant is not None:  # kept for dynamic batching (the agent loads it only then)
        names.update(manifest.artifact_files(variant))
    for extra in (manifest.reference, manifest.samples):
        if extra:
            names.add(extra)
    for name in manifest.files:
        if name.startswith(("samples/", "reference/")):
            names.add(name)
    return sorted(names)
