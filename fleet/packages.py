"""Published packages as the fleet uses them: list them, see who uses a version, unpublish.

A version is *in use* while something may still send a device to it: a rollout that is not
finished (of that version, or rolling devices back to it), an experiment that is not stopped
with an arm on it, or a device's desired state that names it (its active version, a traffic
arm, a shadow). :func:`unpublish` refuses such a version with an :class:`InUseError` naming
what uses it; devices would otherwise be told to download files that are gone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from edgeserve.errors import InUseError

from .artifacts import ArtifactStore, PublishedVersion
from .desired import DesiredStates
from .experiments.repo import Experiments
from .rollouts.repo import Rollouts
from .store import Store

__all__ = ["VersionUsage", "list_packages", "unpublish", "version_usage"]

_NAMED = 5  # devices named in a refusal; the rest are counted


@dataclass(frozen=True)
class VersionUsage:
    """Who still needs one published version (ids, sorted)."""

    rollouts: list[str] = field(default_factory=list)
    experiments: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)

    @property
    def used(self) -> bool:
        return bool(self.rollouts or self.experiments or self.devices)

    def describe(self) -> str:
        parts = []
        if self.rollouts:
            parts.append(f"rollout(s) {', '.join(self.rollouts)}")
        if self.experiments:
            parts.append(f"experiment(s) {', '.join(self.experiments)}")
        if self.devices:
            shown = ", ".join(self.devices[:_NAMED])
            more = f" and {len(self.devices) - _NAMED} more" if len(self.devices) > _NAMED else ""
            parts.append(f"the desired state of device(s) {shown}{more}")
        return "; ".join(parts)


def _usage(store: Store, model: str, desired: list[tuple[str, Any]]) -> dict[str, VersionUsage]:
    rollouts: dict[str, list[str]] = {}
    for record in Rollouts(store).find(active_only=True, model=model):
        wanted = {record.spec.version, *(v for v in record.state.assigned.values() if v)}
        for version in wanted:
            rollouts.setdefault(version, []).append(f"{record.id} ({record.state.phase})")
    experiments: dict[str, list[str]] = {}
    for exp in Experiments(store).find(active_only=True, model=model):
        for version in exp.spec.arms:
            experiments.setdefault(version, []).append(f"{exp.id} ({exp.state.phase})")
    devices: dict[str, list[str]] = {}
    for device_id, doc in desired:
        entry = doc.models.get(model)
        if entry is None:
            continue
        for version in {entry.active, *entry.versions, *entry.traffic}:
            devices.setdefault(version, []).append(device_id)
    versions = set(rollouts) | set(experiments) | set(devices)
    return {v: VersionUsage(sorted(rollouts.get(v, [])), sorted(experiments.get(v, [])),
                            sorted(devices.get(v, []))) for v in versions}


def version_usage(store: Store, artifacts: ArtifactStore, model: str,
                  version: str) -> VersionUsage:
    """Who still needs ``model`` ``version`` (see the module docstring)."""
    desired = DesiredStates(store, artifacts, "").all()
    return _usage(store, model, desired).get(version, VersionUsage())


def list_packages(store: Store, artifacts: ArtifactStore,
                  model: str | None = None) -> list[dict[str, Any]]:
    """Every published version (oldest release first per model), with who uses it."""
    desired = DesiredStates(store, artifacts, "").all()
    rows = []
    for name in [model] if model else artifacts.models():
        usage = _usage(store, name, desired)
        for published in artifacts.versions(name):
            used = usage.get(published.version, VersionUsage())
            row = published.to_dict()
            row.pop("interface_changes", None)
            rows.append({**row, "in_use": used.used, **asdict(used)})
    return rows


def unpublish(store: Store, artifacts: ArtifactStore, model: str,
              version: str) -> PublishedVersion:
    """Remove a published version nothing uses any more; :class:`InUseError` names the users."""
    artifacts.get(model, version)  # unknown versions are a 404 before anything else
    usage = version_usage(store, artifacts, model, version)
    if usage.used:
        raise InUseError(f"{model} {version} is still used by {usage.describe()}; finish or "
                         "roll back those rollouts, stop those experiments and move those "
                         "devices to another version before unpublishing it")
    return artifacts.unpublish(model, version)
