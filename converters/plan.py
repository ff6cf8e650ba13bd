"""Which artifacts to build: the union of the profiles' targets, each distinct artifact once.

Two profiles asking for the same artifact (same format, precision, quantization, I/O dtype and, for
Core ML, deployment target) share one build; the artifact lists both profiles, and it is required
when any of them requires it. Each profile's own validation budget is applied to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from edgeserve.profiles import ArtifactTarget, HardwareProfile, ValidationBudget

__all__ = ["BuildKey", "PlannedArtifact", "build_key", "plan_artifacts", "plan_extra"]


@dataclass(frozen=True)
class BuildKey:
    format: str
    precision: str
    quantization: str
    io_dtype: str = "float32"
    deployment_target: str | None = None

    @property
    def target_key(self) -> str:
        """``ArtifactTarget.key`` (``onnx-int8-static``): what profiles and fallbacks name."""
        target = ArtifactTarget.model_validate({"format": self.format, "precision": self.precision,
                                                "quantization": self.quantization})
        return target.key

    @property
    def base_id(self) -> str:
        """:attr:`target_key`, plus ``-uint8-io`` for uint8 I/O."""
        return self.target_key + ("-uint8-io" if self.io_dtype == "uint8" else "")


@dataclass
class PlannedArtifact:
    """One artifact to build, the profiles it serves and their budgets for it."""

    key: BuildKey
    id: str = ""
    profiles: list[str] = field(default_factory=list)
    required_by: list[str] = field(default_factory=list)
    budgets: dict[str, ValidationBudget] = field(default_factory=dict)

    @property
    def required(self) -> bool:
        return bool(self.required_by)


def build_key(target: ArtifactTarget, profile: HardwareProfile) -> BuildKey:
    """What makes ``target`` a distinct build for ``profile`` (see the module docstring)."""
    deployment = None
    if target.format == "coreml":
        coreml = profile.runtimes.coreml
        deployment = coreml.minimum_deployment_target if coreml else "iOS17"
    io_dtype = target.io_dtype if target.quantization == "full-integer" else "float32"
    return BuildKey(target.format, target.precision, target.quantization, io_dtype, deployment)


def plan_artifacts(profiles: Sequence[HardwareProfile]) -> list[PlannedArtifact]:
    """Distinct artifacts in first-seen order (profile order, then each profile's preference)."""
    planned: dict[BuildKey, PlannedArtifact] = {}
    for profile in profiles:
        for target in profile.artifacts:
            key = build_key(target, profile)
            item = planned.setdefault(key, PlannedArtifact(key))
            if profile.name not in item.profiles:
                item.profiles.append(profile.name)
            if target.required and profile.name not in item.required_by:
                item.required_by.append(profile.name)
            item.budgets[profile.name] = profile.budget_for(target.precision)
    bases = [k.base_id for k in planned]
    for key, item in planned.items():
        # Core ML builds for two deployment targets would share an id: tell them apart
        clash = bases.count(key.base_id) > 1 and key.deployment_target
        item.id = f"{key.base_id}-{key.deployment_target.lower()}" if clash else key.base_id  # type: ignore[union-attr]
    return list(planned.values())


def plan_extra(key: BuildKey, existing: Sequence[PlannedArtifact]) -> PlannedArtifact:
    """A plan for an artifact built after the others (a fallback), with an id none of
    ``existing`` has."""
    taken = {p.id for p in existing}
    item = PlannedArtifact(key, key.base_id)
    if item.id in taken and key.deployment_target:
        item.id = f"{key.base_id}-{key.deployment_target.lower()}"
    return item
