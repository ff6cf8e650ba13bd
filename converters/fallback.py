"""Declared fallbacks, and each profile's verdict.

A profile's required artifact can fail for that profile: pre-flight found it cannot be built
(ops, bytes), it did not build, it missed the profile's budget, or it is bigger than the
profile's ``max_model_bytes``. When the profile declares ``fallback = ["onnx-fp16",
"onnx-fp32"]`` on that artifact, :func:`resolve_fallbacks` tries those artifacts in order —
reusing one already built for another profile, else building it — and the first that passes the
profile's budget ships in its place: the artifact lists the profile and says why under
``validation.fallback`` (in the report and the manifest). A failed artifact is never shipped.

:func:`profile_verdicts` then says, per profile: ``passed`` / ``warned`` / ``not-executed``
(its required artifacts, worst first), ``fallback`` (a fallback ships in place of one), or
``failed`` (a required artifact failed and no fallback passed); ``ships`` lists the packaged
artifacts that serve it (empty: the profile gets nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeserve.profiles import ArtifactTarget, HardwareProfile

from .context import BuiltArtifact
from .plan import BuildKey, PlannedArtifact, build_key, plan_extra
from .preflight import PreflightIssue
from .validate import judge, worst_status

__all__ = ["Blocked", "Fallbacks", "profile_verdicts", "resolve_fallbacks", "shipped"]

_METRICS = ("cosine_similarity", "max_abs_error", "top1_agreement", "exact_match", "accuracy",
            "range_error", "decision_agreement")


@dataclass
class Blocked:
    """Pre-flight issues as they stop targets: ``fatal`` ones (kept with ``keep_going``) stop
    their whole profile, the others only the targets they name."""

    issues: Sequence[PreflightIssue] = ()
    fatal: Sequence[PreflightIssue] = ()

    def profile(self, name: str) -> list[str]:
        return [i.message for i in self.fatal if i.profile == name]

    def target(self, name: str, key: str) -> list[str]:
        found = [i.message for i in self.issues if i.profile == name and i.stops(key)]
        return found + [m for m in self.profile(name) if m not in found]

    def stops_plan(self, plan: PlannedArtifact) -> bool:
        return all(self.target(p, plan.key.target_key) for p in plan.profiles)


@dataclass
class Fallbacks:
    """What fallback resolution tried: profile → replaced target → ``"key: why not"`` lines."""

    tried: dict[str, dict[str, list[str]]] = field(default_factory=dict)


def shipped(artifact: BuiltArtifact) -> bool:
    """Whether the artifact goes into the package (failed ones never do)."""
    return artifact.status != "failed" and artifact.path is not None and artifact.path.exists()


def _short(message: str, profile: str) -> str:
    return message.removeprefix(f"profile {profile}: ")


def _status_for(artifact: BuiltArtifact, profile: str) -> str:
    return str(artifact.validation.get("profiles", {}).get(profile, artifact.status))


def usable(artifact: BuiltArtifact | None, profile: HardwareProfile,
           blocked: Blocked, key: str) -> tuple[bool, str]:
    """Whether ``artifact`` (for target ``key``) serves ``profile``; else why not."""
    reasons = blocked.target(profile.name, key)
    if reasons:
        return False, "; ".join(_short(r, profile.name) for r in reasons)
    if artifact is None:
        return False, f"{key} was not built"
    if artifact.error:
        return False, f"{key} failed: {artifact.error}"
    if not shipped(artifact) or _status_for(artifact, profile.name) == "failed":
        reasons = [str(r) for r in artifact.validation.get("reasons", [])]
        why = [r.removeprefix(f"{profile.name}: ") for r in reasons
               if r.startswith(f"{profile.name}: ")] or reasons
        return False, f"{key} missed its budget: {'; '.join(why) or 'failed'}"
    if artifact.size_bytes > profile.budgets.max_model_bytes:
        return False, (f"{key} is {artifact.size_bytes:,} bytes, over max_model_bytes "
                       f"{profile.budgets.max_model_bytes:,}")
    return True, ""


def _adopt(artifact: BuiltArtifact, profile: HardwareProfile, precision: str,
           added: set[tuple[str, str]]) -> str | None:
    """Judge an artifact built for other profiles with ``profile``'s budget; add the profile when
    it passes (the artifact's own status is unchanged, ``added`` records it). Returns why not,
    or None."""
    if profile.name in artifact.plan.profiles:
        return None
    budget = profile.budget_for(precision)
    measured = {k: v for k, v in artifact.validation.items() if k in _METRICS or
                k in ("reference_accuracy", "shape_mismatch", "samples")}
    status = artifact.status
    if any(k in measured for k in _METRICS):
        status, reasons, _ = judge(measured, {profile.name: budget})
        if status == "failed":
            return "missed its budget: " + "; ".join(r.removeprefix(f"{profile.name}: ")
                                                     for r in reasons)
    artifact.plan.profiles.append(profile.name)
    artifact.plan.budgets[profile.name] = budget
    artifact.validation.setdefault("profiles", {})[profile.name] = status
    added.add((artifact.plan.id, profile.name))
    return None


def _drop(artifact: BuiltArtifact, profile: str) -> None:
    """Take ``profile`` off an artifact it was added to as a fallback and that failed it, so the
    other profiles it serves keep it (a failed artifact is never shipped)."""
    if profile not in artifact.plan.profiles:
        return
    artifact.plan.profiles.remove(profile)
    artifact.plan.budgets.pop(profile, None)
    per = artifact.validation.get("profiles", {})
    per.pop(profile, None)
    if per and not artifact.error:
        artifact.validation["status"] = worst_status(list(per.values()))
        artifact.validation["reasons"] = [r for r in artifact.validation.get("reasons", [])
                                          if not r.startswith(f"{profile}: ")]


@dataclass
class _Need:
    profile: HardwareProfile
    target: ArtifactTarget
    why: str
    candidates: list[ArtifactTarget]


def _needs(profiles: Sequence[HardwareProfile], by_key: dict[BuildKey, BuiltArtifact],
           blocked: Blocked) -> list[_Need]:
    needs = []
    for profile in profiles:
        if blocked.profile(profile.name):
            continue
        for target in profile.artifacts:
            if not target.required or not target.fallback:
                continue
            ok, why = usable(by_key.get(build_key(target, profile)), profile, blocked, target.key)
            if not ok:
                needs.append(_Need(profile, target, why, target.fallback_targets()))
    return needs


def _plan_missing(current: Sequence[tuple[_Need, ArtifactTarget]],
                  by_key: dict[BuildKey, BuiltArtifact], blocked: Blocked,
                  plans: Sequence[PlannedArtifact],
                  added: set[tuple[str, str]]) -> list[PlannedArtifact]:
    missing: dict[BuildKey, PlannedArtifact] = {}
    for need, candidate in current:
        key = build_key(candidate, need.profile)
        if key in by_key or blocked.target(need.profile.name, candidate.key):
            continue
        plan = missing.get(key) or plan_extra(key, [*plans, *missing.values()])
        missing[key] = plan
        if need.profile.name not in plan.profiles:
            plan.profiles.append(need.profile.name)
            plan.budgets[need.profile.name] = need.profile.budget_for(candidate.precision)
            added.add((plan.id, need.profile.name))
    return list(missing.values())


def _try(need: _Need, candidate: ArtifactTarget, by_key: dict[BuildKey, BuiltArtifact],
         blocked: Blocked, added: set[tuple[str, str]]) -> str | None:
    """Ship ``candidate`` for the need when it passes; else why not."""
    profile = need.profile
    artifact = by_key.get(build_key(candidate, profile))
    if artifact is not None and not blocked.target(profile.name, candidate.key):
        refused = _adopt(artifact, profile, candidate.precision, added)
        if refused:
            return refused
    ok, why = usable(artifact, profile, blocked, candidate.key)
    if not ok:
        if artifact is not None and (artifact.plan.id, profile.name) in added:
            _drop(artifact, profile.name)
        return why
    assert artifact is not None
    artifact.fallback_for.setdefault(profile.name, {})[need.target.key] = need.why
    artifact.validation["fallback"] = {
        name: "; ".join(f"in place of {key} ({why})" for key, why in replaced.items())
        for name, replaced in artifact.fallback_for.items()}
    return None


def resolve_fallbacks(profiles: Sequence[HardwareProfile], built: Sequence[BuiltArtifact],
                      blocked: Blocked,
                      build: Callable[[list[PlannedArtifact]], list[BuiltArtifact]]
                      ) -> tuple[list[BuiltArtifact], Fallbacks]:
    """Ship declared fallbacks where required artifacts failed (module docstring); returns the
    artifacts built for that and what was tried."""
    by_key = {b.plan.key: b for b in built}
    plans = [b.plan for b in built]
    result = Fallbacks()
    fresh: list[BuiltArtifact] = []
    added: set[tuple[str, str]] = set()  # (artifact id, profile) joined as a fallback
    needs = _needs(profiles, by_key, blocked)
    while needs:
        current = [(need, need.candidates.pop(0)) for need in needs if need.candidates]
        missing = _plan_missing(current, by_key, blocked, plans, added)
        if missing:
            made = build(missing)
            fresh += made
            plans += [m.plan for m in made]
            by_key.update({m.plan.key: m for m in made})
        needs = []
        for need, candidate in current:
            why = _try(need, candidate, by_key, blocked, added)
            if why is not None:
                result.tried.setdefault(need.profile.name, {}).setdefault(
                    need.target.key, []).append(f"{candidate.key}: {why}")
                needs.append(need)
    return fresh, result


def _verdict(profile: HardwareProfile, built: Sequence[BuiltArtifact],
             by_key: dict[BuildKey, BuiltArtifact], blocked: Blocked,
             fallbacks: Fallbacks) -> dict[str, Any]:
    reasons = list(blocked.profile(profile.name))
    statuses, used, failed = [], [], bool(reasons)
    for target in [] if failed else profile.artifacts:
        artifact = by_key.get(build_key(target, profile))
        ok, why = usable(artifact, profile, blocked, target.key)
        if ok and target.required:
            assert artifact is not None
            statuses.append(_status_for(artifact, profile.name))
        if ok or not target.required:
            continue
        instead = [a for a in built if target.key in a.fallback_for.get(profile.name, {})]
        if instead:
            statuses.append(_status_for(instead[0], profile.name))
            used.append({"artifact": instead[0].plan.id, "replaces": target.key, "why": why})
            reasons.append(f"fallback: {instead[0].plan.id} ships in place of {target.key} "
                           f"({why})")
            continue
        failed = True
        tried = fallbacks.tried.get(profile.name, {}).get(target.key, [])
        reasons.append(f"required artifact {target.key} failed: {why}"
                       + (f"; fallbacks tried: {'; '.join(tried)}" if tried else ""))
    mine = [b for b in built if profile.name in b.plan.profiles]
    ships = [b.plan.id for b in mine if usable(b, profile, blocked, b.plan.key.target_key)[0]]
    status = "failed" if failed else "fallback" if used else worst_status(statuses)
    return {"status": status, "artifacts": [b.plan.id for b in mine],
            "required": [b.plan.id for b in mine if profile.name in b.plan.required_by],
            "ships": ships, "fallback": used, "reasons": reasons}


def profile_verdicts(profiles: Sequence[HardwareProfile], built: Sequence[BuiltArtifact],
                     blocked: Blocked, fallbacks: Fallbacks) -> dict[str, dict[str, Any]]:
    """Each profile's status, artifacts, fallbacks and reasons (module docstring)."""
    by_key = {b.plan.key: b for b in built}
    return {p.name: _verdict(p, built, by_key, blocked, fallbacks) for p in profiles}
