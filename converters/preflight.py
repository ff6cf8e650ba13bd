"""Checks that fail a build before the long work starts, with the numbers.

Per profile and target format:

* **ops**: op types of the reference graph (subgraphs included) that the profile lists under
  ``limits.unsupported_ops[format]`` → :class:`UnsupportedOpError`;
* **model bytes**: the expected artifact size (reference bytes × the precision's ratio) over
  ``budgets.max_model_bytes`` → :class:`ProfileLimitError`;
* **arena**: the largest sum of live tensors of any node (a lower bound of the runtime arena),
  over ``budgets.max_arena_bytes`` (or the TFLite Micro arena) → :class:`ProfileLimitError`;
* **tensor rank** over ``limits.max_tensor_rank``; **static shapes** when the profile needs them
  and an input has a dynamic dimension other than batch that ``--input-shape`` did not fix.

Each problem is a :class:`PreflightIssue`; the pipeline raises the first one (or, with
``keep_going``, marks the profile's artifacts failed and builds the rest).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgeserve.errors import ConversionError, ProfileLimitError, UnsupportedOpError
from edgeserve.profiles import HardwareProfile

from .graph import dynamic_inputs, iter_nodes, op_types, tensor_shapes

if TYPE_CHECKING:
    import onnx

__all__ = ["SIZE_RATIO", "PreflightIssue", "estimate_arena_bytes", "preflight"]

SIZE_RATIO = {"fp32": 1.0, "fp16": 0.5, "int8": 0.27, "int6": 0.2, "int4": 0.14, "mixed": 0.5}
_BYTES = {1: 4, 2: 1, 3: 1, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8}


@dataclass(frozen=True)
class PreflightIssue:
    profile: str
    target: str
    kind: str
    message: str

    def error(self) -> ConversionError:
        if self.kind == "ops":
            return UnsupportedOpError(self.message)
        return ProfileLimitError(self.message)


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


def preflight(model: onnx.ModelProto, model_bytes: int, profiles: Sequence[HardwareProfile],
              fixed_inputs: Sequence[str] = ()) -> list[PreflightIssue]:
    """Every problem found, per profile and target (empty list: go ahead)."""
    issues: list[PreflightIssue] = []
    ops = op_types(model)
    ops_by_node = {n.op_type: n.name for n in iter_nodes(model.graph)}
    arena = estimate_arena_bytes(model)
    rank = _max_rank(model)
    dynamic = {k: v for k, v in dynamic_inputs(model).items() if k not in fixed_inputs}
    for profile in profiles:
        formats = sorted({t.format for t in profile.artifacts})
        for fmt in formats:
            lacking = sorted(ops & set(profile.limits.unsupported_ops.get(fmt, [])))
            if lacking:
                where = ", ".join(f"{op} (node {ops_by_node.get(op) or '?'})" for op in lacking)
                issues.append(PreflightIssue(profile.name, fmt, "ops", (
                    f"profile {profile.name}: target {fmt} cannot run op(s) {where}; replace "
                    f"them in the model (e.g. export with a different opset or without that "
                    f"layer) or choose a profile whose {fmt} runtime supports them")))
        for target in profile.artifacts:
            expected = int(model_bytes * SIZE_RATIO.get(target.precision, 1.0))
            if expected > profile.budgets.max_model_bytes:
                issues.append(PreflightIssue(profile.name, target.key, "bytes", (
                    f"profile {profile.name}: {target.key} would be about {expected:,} bytes "
                    f"({model_bytes:,} fp32 bytes × {SIZE_RATIO.get(target.precision, 1.0)}), "
                    f"over the device's max_model_bytes of {profile.budgets.max_model_bytes:,}; "
                    "use a smaller model or a lower precision")))
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
