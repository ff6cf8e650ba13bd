"""Checks that fail a build before the long work starts, with the numbers.

Per profile and artifact target (fallback targets included):

* **ops**: op types of the reference graph (subgraphs included) that the profile lists under
  ``limits.unsupported_ops[format]`` → :class:`UnsupportedOpError`;
* **op domains**: ops outside the standard ONNX domain that a route cannot take
  (:func:`domain_problem`): ``ai.onnx.ml`` (scikit-learn's Scaler, TreeEnsembleClassifier …)
  runs in ONNX Runtime at fp32 and fp16 (those ops stay float32), but ONNX Runtime's int8
  quantization, onnx2tf (TFLite) and the Core ML route have no form of them;
* **Select TF ops**: ONNX ops that onnx2tf can only express as Select TF (Flex) ops, which
  LiteRT's builtin kernels cannot run (:data:`FLEX_ONLY`, measured) → blocks TFLite targets;
  anything else that comes out as Flex is caught after the build (``select_tf_ops``);
* **model bytes**: the expected artifact size (reference bytes × the precision's ratio) over
  ``budgets.max_model_bytes`` → :class:`ProfileLimitError`;
* **arena**: the largest sum of live tensors of any node (a lower bound of the runtime arena),
  over ``budgets.max_arena_bytes`` (or the TFLite Micro arena) → :class:`ProfileLimitError`;
* **tensor rank** over ``limits.max_tensor_rank``; **static shapes** when the profile needs them
  and an input has a dynamic dimension other than batch that ``--input-shape`` did not fix.

Each problem is a :class:`PreflightIssue` that blocks some targets of a profile (``blocks``) or
the whole profile (``blocks == ()``: arena, rank, shapes). :func:`fatal_issues` keeps those that
leave a profile nothing to build — a profile-wide problem, or a required target blocked whose
declared fallbacks are all blocked too; the pipeline raises the first of them (or, with
``keep_going``, marks the profile failed and builds the rest). The others only skip their
targets, and the fallbacks are built in their place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgeserve.errors import ConversionError, ProfileLimitError, UnsupportedOpError
from edgeserve.profiles import ArtifactTarget, HardwareProfile

from .graph import dynamic_inputs, iter_nodes, op_types, tensor_shapes

if TYPE_CHECKING:
    import onnx

__all__ = ["FLEX_FROM", "FLEX_ONLY", "SIZE_RATIO", "PreflightIssue", "domain_problem", "estimate_arena_bytes",
           "fatal_issues", "foreign_ops", "preflight", "profile_targets", "refusal"]

SIZE_RATIO = {"fp32": 1.0, "fp16": 0.5, "int8": 0.27, "int6": 0.2, "int4": 0.14, "mixed": 0.5}
_BYTES = {1: 4, 2: 1, 3: 1, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8}
_STANDARD = ("", "ai.onnx")
_ROUTES = {"tflite": "onnx2tf (TFLite)", "coreml": "the Core ML route"}
FLEX_ONLY = {"Det": "FlexMatrixDeterminant"}
"""ONNX op → the Select TF op onnx2tf makes of it (measured with onnx2tf 1.x; tests/converters
/test_select_tf_ops.py)"""
FLEX_FROM = {flex: op for op, flex in FLEX_ONLY.items()}


@dataclass(frozen=True)
class PreflightIssue:
    """One problem of one profile; ``blocks`` names the artifact keys it stops (all when empty)."""

    profile: str
    target: str
    kind: str
    message: str
    blocks: tuple[str, ...] = ()

    def error(self) -> ConversionError:
        if self.kind == "ops":
            return UnsupportedOpError(self.message)
        return ProfileLimitError(self.message)

    def stops(self, key: str) -> bool:
        return not self.blocks or key in self.blocks


def estimate_arena_bytes(model: onnx.ModelProto, batch: int = 1) -> int:
    """Largest (inputs + outputs) bytes of any node, with dynamic dims taken as ``batch``."""
    shapes = tensor_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]}
    inits = {i.name for i in model.graph.initializer}

    def size(name: str) -> int:
        if name in inits or name not in shapes:
            return 0
        count = 1
        for d in shapes[name]:
            count *= d if isinstance(d, int) and d > 0 else batch
        return count * _BYTES.get(types.get(name, 1), 4)

    peak = 0
    for node in model.graph.node:
        peak = max(peak, sum(size(n) for n in [*node.input, *node.output] if n))
    return peak


def _max_rank(model: onnx.ModelProto) -> int:
    return max((len(s) for s in tensor_shapes(model).values()), default=0)


def foreign_ops(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Op types outside the standard ONNX domain, by domain (subgraphs included)."""
    found: dict[str, set[str]] = {}
    for node in iter_nodes(model.graph):
        if node.domain not in _STANDARD:
            found.setdefault(node.domain, set()).add(node.op_type)
    return {domain: sorted(ops) for domain, ops in sorted(found.items())}


def domain_problem(target: ArtifactTarget, foreign: dict[str, list[str]]) -> str | None:
    """Why ``target`` cannot be built from a graph with these non-standard ops, or None.

    ONNX Runtime runs ``ai.onnx.ml`` and its own ``com.microsoft`` ops (the reference ran), so
    ONNX fp32/fp16 artifacts keep them; its int8 quantizer has no int8 form of ``ai.onnx.ml`` ops;
    onnx2tf and the Core ML route convert standard ONNX ops only.
    """
    if not foreign:
        return None
    listed = "; ".join(f"{domain} ({', '.join(ops)})" for domain, ops in foreign.items())
    if target.format in _ROUTES:
        return f"{_ROUTES[target.format]} cannot convert ops of domain {listed}"
    if target.precision in ("int8", "int6", "int4") and "ai.onnx.ml" in foreign:
        ml = ", ".join(foreign["ai.onnx.ml"])
        return (f"ONNX Runtime's int8 quantization has no int8 form of ai.onnx.ml ops ({ml}); "
                "ONNX Runtime runs them at fp32 or fp16")
    return None


def profile_targets(profile: HardwareProfile) -> list[ArtifactTarget]:
    """The profile's targets, then the fallback targets it declares (first occurrence kept)."""
    seen: dict[str, ArtifactTarget] = {t.key: t for t in profile.artifacts}
    for target in profile.artifacts:
        for fallback in target.fallback_targets():
            seen.setdefault(fallback.key, fallback)
    return list(seen.values())


def _op_issues(profile: HardwareProfile, targets: Sequence[ArtifactTarget], ops: set[str],
               ops_by_node: dict[str, str], foreign: dict[str, list[str]]) -> list[PreflightIssue]:
    issues = []
    for fmt in sorted({t.format for t in targets}):
        lacking = sorted(ops & set(profile.limits.unsupported_ops.get(fmt, [])))
        if lacking:
            where = ", ".join(f"{op} (node {ops_by_node.get(op) or '?'})" for op in lacking)
            keys = tuple(t.key for t in targets if t.format == fmt)
            issues.append(PreflightIssue(profile.name, fmt, "ops", (
                f"profile {profile.name}: target {fmt} cannot run op(s) {where}; replace "
                f"them in the model (e.g. export with a different opset or without that "
                f"layer) or choose a profile whose {fmt} runtime supports them"), keys))
    flex = sorted(ops & set(FLEX_ONLY))
    tflite = tuple(t.key for t in targets if t.format == "tflite")
    if flex and tflite:
        where = ", ".join(f"{op} (node {ops_by_node.get(op) or '?'}) → {FLEX_ONLY[op]}"
                          for op in flex)
        issues.append(PreflightIssue(profile.name, "tflite", "ops", (
            f"profile {profile.name}: TFLite would need Select TF ops that LiteRT's builtin "
            f"kernels cannot run: {where}; replace the op in the model, or let the profile "
            "fall back to ONNX"), tflite))
    for target in targets:
        problem = domain_problem(target, foreign)
        if problem:
            issues.append(PreflightIssue(profile.name, target.key, "ops", (
                f"profile {profile.name}: {target.key} cannot be built: {problem}"),
                (target.key,)))
    return issues


def _byte_issues(profile: HardwareProfile, targets: Sequence[ArtifactTarget],
                 model_bytes: int) -> list[PreflightIssue]:
    issues = []
    for target in targets:
        ratio = SIZE_RATIO.get(target.precision, 1.0)
        expected = int(model_bytes * ratio)
        if expected > profile.budgets.max_model_bytes:
            issues.append(PreflightIssue(profile.name, target.key, "bytes", (
                f"profile {profile.name}: {target.key} would be about {expected:,} bytes "
                f"({model_bytes:,} fp32 bytes × {ratio}), over the device's max_model_bytes "
                f"of {profile.budgets.max_model_bytes:,}; use a smaller model or a lower "
                "precision"), (target.key,)))
    return issues


def preflight(model: onnx.ModelProto, model_bytes: int, profiles: Sequence[HardwareProfile],
              fixed_inputs: Sequence[str] = ()) -> list[PreflightIssue]:
    """Every problem found, per profile and target, fallbacks included (empty list: go ahead)."""
    issues: list[PreflightIssue] = []
    ops = op_types(model)
    ops_by_node = {n.op_type: n.name for n in iter_nodes(model.graph)}
    foreign = foreign_ops(model)
    arena = estimate_arena_bytes(model)
    rank = _max_rank(model)
    dynamic = {k: v for k, v in dynamic_inputs(model).items() if k not in fixed_inputs}
    for profile in profiles:
        targets = profile_targets(profile)
        issues += _op_issues(profile, targets, ops, ops_by_node, foreign)
        issues += _byte_issues(profile, targets, model_bytes)
        arena_limit = profile.budgets.max_arena_bytes
        if profile.runtimes.tflite_micro is not None:
            arena_limit = min(arena_limit or 1 << 62, profile.runtimes.tflite_micro.arena_bytes)
        if arena_limit is not None and arena > arena_limit:
            issues.append(PreflightIssue(profile.name, "arena", "arena", (
                f"profile {profile.name}: the largest layer needs at least {arena:,} bytes of "
                f"tensors at batch 1, over the arena budget of {arena_limit:,} bytes; use "
                "smaller inputs (--input-shape) or a smaller model")))
        if profile.limits.max_tensor_rank is not None and rank > profile.limits.max_tensor_rank:
            issues.append(PreflightIssue(profile.name, "rank", "rank", (
                f"profile {profile.name}: the model has rank-{rank} tensors, the target "
                f"supports at most rank {profile.limits.max_tensor_rank}")))
        if profile.limits.requires_static_shapes and dynamic:
            issues.append(PreflightIssue(profile.name, "shapes", "shapes", (
                f"profile {profile.name} needs static shapes, but input(s) {sorted(dynamic)} have "
                f"dynamic dimensions {dynamic}; fix them with --input-shape NAME=1x…")))
    return issues


def fatal_issues(issues: Sequence[PreflightIssue],
                 profiles: Sequence[HardwareProfile]) -> list[PreflightIssue]:
    """The issues that leave a profile nothing to build (see the module docstring)."""
    fatal: list[PreflightIssue] = []
    for profile in profiles:
        mine = [i for i in issues if i.profile == profile.name]
        fatal += [i for i in mine if not i.blocks]
        for target in profile.artifacts:
            stopped = [i for i in mine if i.blocks and i.stops(target.key)]
            if not target.required or not stopped:
                continue
            if all(any(i.stops(f.key) for i in mine) for f in target.fallback_targets()):
                fatal += [i for i in stopped if i not in fatal]
    return fatal


def refusal(issue: PreflightIssue, profiles: Sequence[HardwareProfile]) -> str:
    """The message of a fatal issue, with what a fallback could or could not do about it."""
    profile = next((p for p in profiles if p.name == issue.profile), None)
    targets = [t for t in (profile.artifacts if profile else []) if t.required and issue.stops(t.key)]
    if not issue.blocks or not targets:
        return issue.message
    fallbacks = [f.key for t in targets for f in t.fallback_targets()]
    if fallbacks:
        return (f"{issue.message}; its fallback(s) {', '.join(dict.fromkeys(fallbacks))} cannot "
                "be built either")
    keys = ", ".join(t.key for t in targets)
    if profile is not None and profile.runtimes.onnxruntime is not None:
        return (f"{issue.message}; profile {issue.profile} declares no fallback for {keys} "
                "(fallback = [\"onnx-fp32\"] on that artifact ships it for ONNX Runtime "
                "instead; see docs/profiles.md)")
    return (f"{issue.message}; profile {issue.profile} declares no fallback for {keys} and no "
            "ONNX Runtime to fall back to: choose a profile that can run this model")
