"""Which artifacts to build: the union of the profiles' targets, each distinct artifact once.

Two profiles asking for the same artifact (same format, precision, quantization, I/O dtype and, for
Core ML, deployment target) share one build; the artifact lists both profiles, and it is required
when any of them requires it. Each profile's own validation budget is applied to it. A profile
whose ``[batching] static_batch`` is N > 1 adds a batch-N variant of each TFLite artifact it
wants (id ``…-bN``), built after the others and never required.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from edgeserve.profiles import ArtifactTarget, HardwareProfile, ValidationBudget

__all__ = ["BuildKey", "PlannedArtifact", "build_key", "plan_artifacts", "plan_extra"]


@dataclass(frozen=True)
class BuildKey:
    format: str
    precision: str
    quantization: str
    io_dtype: str = "float32"
    deployment_target: str | None = None
    batch: int = 1
    """> 1: a batch-N variant (the batch fixed at N; profiles' ``[batching] static_batch``)"""

    @property
    def target_key(self) -> str:
        """``ArtifactTarget.key`` (``onnx-int8-static``): what profiles and fallbacks name."""
        target = ArtifactTarget.model_validate({"format": self.format, "precision": self.precision,
                                                "quantization": self.quantization})
        return target.key

    @property
    def base_id(self) -> str:
        """:attr:`target_key`, plus ``-uint8-io`` for uint8 I/O and ``-bN`` for a batch-N
        variant."""
        return self.target_key + ("-uint8-io" if self.io_dtype == "uint8" else "") + \
            (f"-b{self.batch}" if self.batch > 1 else "")


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


def plan_artifacts(profiles: Sequence[HardwareProfile],
                   static_batch: int = 1) -> list[PlannedArtifact]:
    """Distinct artifacts in first-seen order (profile order, then each profile's preference);
    then the batch-N variants (``static_batch`` or the profile's own, the larger)."""
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
    for profile in profiles:
        _plan_batch_variants(profile, planned, max(static_batch, profile.batching.static_batch))
    bases = [k.base_id for k in planned]
    for key, item in planned.items():
        # Core ML builds for two deployment targets would share an id: tell them apart
        clash = bases.count(key.base_id) > 1 and key.deployment_target
        item.id = f"{key.base_id}-{key.deployment_target.lower()}" if clash else key.base_id  # type: ignore[union-attr]
    return list(planned.values())


def _plan_batch_variants(profile: HardwareProfile, planned: dict[BuildKey, PlannedArtifact],
                         size: int) -> None:
    """Batch-``size`` variants for ``profile``: one per TFLite artifact it wants, never required
    (the batch-1 artifact serves without it)."""
    if size <= 1:
        return
    for target in profile.artifacts:
        key = build_key(target, profile)
        if key.format != "tflite":
            continue
        variant = planned.setdefault(replace(key, batch=size), PlannedArtifact(replace(key,
                                                                                   batch=size)))
        if profile.name not in variant.profiles:
            variant.profiles.append(profile.name)
        variant.budgets[profile.name] = profile.budget_for(target.precision)


def plan_extra(key: BuildKey, existing: Sequence[PlannedArtifact]) -> PlannedArtifact:
    """A plan for an artifact built after the others (a fallback), with an id none of
    ``existing`` has."""
    taken = {p.id for p in existing}
    item = PlannedArtifact(key, key.base_id)
    if item.id in taken and key.deployment_target:
        item.id = f"{key.base_id}-{key.deployment_target.lower()}"
    return item
