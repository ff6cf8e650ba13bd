"""Before a rollout starts: do the devices in scope fit the package, and can its gates ever decide?

A rollout that cannot succeed should be refused when it is created, naming the devices and the
reason, not discovered stages later as a rollback or a stage that waits forever:

* **Fit.** For every device in scope, its profile (as it reported it) must find an artifact in
  the package by the same rule the device applies (:mod:`edgeserve.selection`: the profile's
  preferred targets in a format one of its runtimes runs, else an artifact built for it by
  name). Devices that do not fit are refused by default; ``only_fitting`` narrows the scope to
  those that do (an explicit device list, said so in the result). Devices whose profile the
  fleet does not know (a custom profile file on the device, or none reported yet) cannot be
  checked: they stay in scope and are listed.
* **Relative gates** (``p95_ms<=1.2*control``) compare the canary with the *control*: devices in
  scope still on the old version. There is none when the first stage already moves every
  device in scope (a single device, ``--stages 100``), and it has no data when no device in
  scope runs the model yet (a first deployment): such a gate would wait forever, so the rollout
  is refused with the fix (an absolute bound, more devices or stages, or ``--no-gates``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeserve.errors import ConfigError, EdgeserveError, ProfileError
from edgeserve.manifest import Manifest
from edgeserve.profiles import HardwareProfile, load_profile
from edgeserve.selection import choose_artifact, declared_formats

from ..artifacts import ArtifactStore
from ..registry import list_devices
from ..store import Store
from .controller import device_views
from .engine import RolloutSpec, stage_size
from .gates import parse_gate
from .repo import RolloutRecord, Rollouts

__all__ = ["Admission", "DeviceFit", "admit", "create_rollout"]

_LIST = 5
"""Devices named in an error before '… and N more'."""


@dataclass(frozen=True)
class DeviceFit:
    """One device in scope as admission sees it."""

    device_id: str
    profile: str | None
    active: str | None
    """the version of the model it runs now (None: it has none)"""


@dataclass
class Admission:
    """The outcome: the (possibly narrowed) spec to create, and what was found."""

    spec: dict[str, Any]
    fitting: list[str] = field(default_factory=list)
    unfit: dict[str, str] = field(default_factory=dict)
    unchecked: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"fitting": self.fitting, "unfit": self.unfit, "unchecked": self.unchecked,
                "notes": self.notes}


def _named(items: Mapping[str, str]) -> str:
    shown = [f"{device} ({why})" for device, why in list(items.items())[:_LIST]]
    more = f"; and {len(items) - _LIST} more" if len(items) > _LIST else ""
    return "; ".join(shown) + more


def _fit(device: DeviceFit, manifest: Manifest,
         profiles: dict[str, HardwareProfile | str]) -> tuple[str, str]:
    """("fits" | "unfit" | "unchecked", why)."""
    if not device.profile:
        return "unchecked", "it has not reported a profile yet"
    if device.profile not in profiles:
        try:
            profiles[device.profile] = load_profile(device.profile)
        except ProfileError as exc:
            profiles[device.profile] = str(exc).split(";")[0]
    profile = profiles[device.profile]
    if isinstance(profile, str):
        return "unchecked", f"profile {device.profile!r} is not known to the fleet"
    try:
        artifact = choose_artifact(manifest, profile, declared_formats(profile),
                                   where="on that device class")
    except EdgeserveError as exc:
        return "unfit", f"profile {device.profile}: {exc}"
    return "fits", artifact.id


def admit(spec_data: Mapping[str, Any], devices: Sequence[DeviceFit], manifest: Manifest,
          only_fitting: bool = False) -> Admission:
    """Check a rollout before it is created (module docstring); raises
    :class:`~edgeserve.errors.ConfigError` naming the devices and the fix when it cannot work."""
    spec = RolloutSpec.model_validate({"id": "admission", **spec_data})
    if not devices:
        raise ConfigError(f"no device is in the scope of this rollout of {spec.model} "
                          f"{spec.version}: check --profile/--label/--device, or wait until "
                          "devices have connected ('edgeserve fleet devices' lists them)")
    result = Admission(spec=dict(spec_data))
    profiles: dict[str, HardwareProfile | str] = {}
    for device in devices:
        verdict, why = _fit(device, manifest, profiles)
        if verdict == "fits":
            result.fitting.append(device.device_id)
        elif verdict == "unfit":
            result.unfit[device.device_id] = why
        else:
            result.unchecked[device.device_id] = why
    if result.unchecked:
        result.notes.append(f"not checked (in scope all the same): {_named(result.unchecked)}")
    if result.unfit:
        _narrow(result, spec, only_fitting, len(devices))
    kept = [d for d in devices if d.device_id not in result.unfit]
    _check_relative_gates(spec, kept)
    return result


def _narrow(result: Admission, spec: RolloutSpec, only_fitting: bool, in_scope: int) -> None:
    left = [*result.fitting, *result.unchecked]
    if not left:
        raise ConfigError(f"none of the {in_scope} device(s) in scope can run {spec.model} "
                          f"{spec.version}: {_named(result.unfit)}")
    if not only_fitting:
        raise ConfigError(
            f"{len(result.unfit)} of {in_scope} device(s) in scope cannot run {spec.model} "
            f"{spec.version}: {_named(result.unfit)}. Convert the package for their profiles, "
            "or pass --only-fitting to roll out to the other "
            f"{len(left)} device(s) only")
    selector = dict(result.spec.get("selector") or {})
    selector["devices"] = sorted(left)
    result.spec["selector"] = selector
    result.notes.append(f"scope narrowed to the {len(left)} device(s) that can run it; left "
                        f"out: {_named(result.unfit)}")


def _check_relative_gates(spec: RolloutSpec, devices: Sequence[DeviceFit]) -> None:
    relative = [g for g in spec.gates if parse_gate(g).factor is not None]
    if not relative:
        return
    fix = ("use an absolute bound instead (e.g. 'p95_ms<=20'), or --no-gates for a first "
           "deployment")
    first = stage_size(spec, 0, len(devices))
    if first >= len(devices):
        raise ConfigError(
            f"gate {relative[0]!r} compares with the control cohort (devices in scope still on "
            f"the old version), but the first stage ({spec.stages[0]:g}%, at least "
            f"{spec.min_devices} device(s)) already moves all {len(devices)} device(s) in "
            f"scope, so no control can exist: add devices or stages, or {fix}")
    if all(d.active is None for d in devices):
        raise ConfigError(
            f"gate {relative[0]!r} compares with the control cohort, but no device in scope "
            f"runs {spec.model} yet (a first deployment), so the control has no data to "
            f"compare with: {fix}")


def create_rollout(store: Store, artifacts: ArtifactStore, spec_data: Mapping[str, Any],
                   only_fitting: bool = False,
                   now: float | None = None) -> tuple[RolloutRecord, Admission]:
    """Admit (see :func:`admit`) and create a rollout of a published version; what the CLI and
    the API call."""
    model, version = str(spec_data.get("model", "")), str(spec_data.get("version", ""))
    manifest = artifacts.manifest(model, version)
    try:
        probe = RolloutSpec.model_validate({"id": "admission", **spec_data})
    except ValueError as exc:
        raise ConfigError(f"invalid rollout: {exc}") from None
    profiles = {d.device_id: d.profile for d in list_devices(store)}
    views = device_views(store, probe, 0.0 if now is None else now)
    devices = [DeviceFit(v.device_id, profiles.get(v.device_id), v.active) for v in views]
    admission = admit(spec_data, devices, manifest, only_fitting)
    return Rollouts(store).create(admission.spec, now), admission
