"""Which artifact of a package this device keeps, and which package files it needs for it.

The rule (shared with the rollout engineer, who downloads only these files): walk the profile's
``artifacts`` in order of preference and take the first that the package carries (same format,
precision and quantization; io dtype and a matching ``profiles`` entry break ties) and that a
runtime *on this machine* can run. When no target matches, an artifact built for the profile by
name is taken. Otherwise the package is refused, naming what it has and what the profile wants.
"""

from __future__ import annotations

import importlib.util
import sys

from edgeserve.errors import RuntimeUnavailableError
from edgeserve.manifest import Artifact, Manifest
from edgeserve.profiles import ArtifactTarget, HardwareProfile

__all__ = ["artifact_io_dtype", "required_files", "runnable_formats", "select_artifact"]

_PROFILE_RUNTIME = {"onnx": ("onnxruntime",), "tflite": ("litert",), "coreml": ("coreml",)}


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
            if ok and declared & set(_PROFILE_RUNTIME[fmt])]


def artifact_io_dtype(artifact: Artifact, manifest: Manifest) -> str:
    specs = artifact.inputs or manifest.inputs
    return specs[0].dtype if specs else "float32"


def _matches(target: ArtifactTarget, artifact: Artifact) -> bool:
    if (artifact.format, artifact.precision) != (target.format, target.precision):
        return False
    loose = {"none", "static"}
    return artifact.quantization == target.quantization or \
        (artifact.quantization in loose and target.quantization in loose)


def select_artifact(manifest: Manifest, profile: HardwareProfile,
                    artifact_id: str | None = None) -> Artifact:
    """The artifact this device keeps (see the module docstring); ``artifact_id`` overrides."""
    formats = runnable_formats(profile)
    if artifact_id is not None:
        chosen = manifest.artifact(artifact_id)
        if chosen.format not in formats:
            raise RuntimeUnavailableError(_cannot_run(chosen, profile, formats))
        return chosen
    for target in profile.artifacts:
        if target.format not in formats:
            continue
        found = [a for a in manifest.artifacts if _matches(target, a)]
        if found:
            found.sort(key=lambda a: (artifact_io_dtype(a, manifest) != target.io_dtype,
                                      profile.name not in a.profiles))
            return found[0]
    named = [a for a in manifest.artifacts if profile.name in a.profiles and a.format in formats]
    if named:
        return named[0]
    has = ", ".join(f"{a.id} ({a.format} {a.precision} {a.quantization})"
                    for a in manifest.artifacts)
    wants = ", ".join(t.key for t in profile.artifacts)
    raise RuntimeUnavailableError(
        f"package {manifest.name} {manifest.version} has no artifact that profile "
        f"{profile.name!r} can run here (runnable formats here: {', '.join(formats) or 'none'}); "
        f"the package has: {has}; the profile wants: {wants}"
    )


def _cannot_run(artifact: Artifact, profile: HardwareProfile, formats: list[str]) -> str:
    if artifact.format == "coreml" and sys.platform != "darwin":
        return (f"artifact {artifact.id} is Core ML, which runs only on macOS/iOS (this is "
                f"{sys.platform}); choose an ONNX or TFLite artifact")
    return (f"artifact {artifact.id} is {artifact.format}, but profile {profile.name!r} on this "
            f"machine can run only: {', '.join(formats) or 'nothing'}")


def required_files(manifest: Manifest, profile: HardwareProfile,
                   artifact_id: str | None = None) -> list[str]:
    """Package members a device with ``profile`` needs: its artifact, reference and samples.

    A package's ``samples``/``reference`` fields may name one file; the conventional
    ``samples/inputs.npz`` + ``samples/expected.npz`` pair is included whenever present.
    """
    artifact = select_artifact(manifest, profile, artifact_id)
    names = set(manifest.artifact_files(artifact))
    for extra in (manifest.reference, manifest.samples):
        if extra:
            names.add(extra)
    for name in manifest.files:
        if name.startswith(("samples/", "reference/")):
            names.add(name)
    return sorted(names)
