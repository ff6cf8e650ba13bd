"""Numbers that say how close an artifact stays to the fp32 reference, and the verdict on them.

Metrics (over all float outputs, on the evaluation data): ``max_abs_error``, ``max_rel_error``
(max abs error / max abs reference value), ``cosine_similarity`` (mean over samples of the cosine
between flattened outputs) and its minimum, ``top1_agreement`` for class-score outputs, and the
task metric ``accuracy`` when labels are given. Integer outputs (e.g. a predicted label) count as
``exact_match``. The verdict applies each profile's :class:`ValidationBudget`: a hard limit missed
is *failed*, a warning level missed is *warned*, otherwise *passed*.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from edgeserve.profiles import ValidationBudget

__all__ = ["Status", "compare_outputs", "judge", "worst_status"]

Status = Literal["passed", "warned", "failed", "not-executed"]
_ORDER = {"passed": 0, "not-executed": 1, "warned": 2, "failed": 3}


def worst_status(statuses: Sequence[str]) -> str:
    return max(statuses, key=lambda s: _ORDER.get(s, 3)) if statuses else "passed"


def _cosines(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    a = ref.reshape(len(ref), -1).astype(np.float64)
    b = got.reshape(len(got), -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = np.sum(a * b, axis=1) / np.maximum(na * nb, 1e-30)
    return np.where(both_zero, 1.0, cos)


def _top1(scores: np.ndarray) -> np.ndarray:
    """The best class per sample → ``[n]``: scores have one axis of classes, the others 1
    (``[n, K]``, ``[n, 1, K]``, ``[n, K, 1, 1]``)."""
    scores = np.asarray(scores)
    best: np.ndarray = scores.reshape(len(scores), -1).argmax(-1)
    return best


def compare_outputs(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray],
                    classifier: Sequence[int] = (), labels: np.ndarray | None = None) -> dict[str, Any]:
    """Error metrics of ``candidate`` outputs against ``reference`` (same order, samples first)."""
    metrics: dict[str, Any] = {"samples": len(reference[0]) if reference else 0}
    max_abs, max_ref, cosines, exact = 0.0, 0.0, [], []
    for ref, got in zip(reference, candidate, strict=True):
        got = np.asarray(got).reshape(ref.shape) if got.size == ref.size else got
        if got.shape != ref.shape:
            metrics["shape_mismatch"] = f"{list(got.shape)} vs reference {list(ref.shape)}"
            return metrics
        if ref.dtype.kind in "fc":
            diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
            max_abs = max(max_abs, float(diff.max(initial=0.0)))
            max_ref = max(max_ref, float(np.abs(ref).max(initial=0.0)))
            cosines.append(_cosines(ref, got))
        else:
            exact.append(float(np.mean(got == ref)))
    if cosines:
        per_sample = np.min(np.stack(cosines), axis=0)
        metrics.update(max_abs_error=max_abs, max_rel_error=max_abs / max(max_ref, 1e-12),
                       cosine_similarity=float(per_sample.mean()),
                       cosine_similarity_min=float(per_sample.min()))
    if exact:
        metrics["exact_match"] = float(min(exact))
    if classifier:
        agree = [float(np.mean(_top1(reference[i]) == _top1(candidate[i]))) for i in classifier]
        metrics["top1_agreement"] = float(min(agree))
        if labels is not None:
            flat = np.asarray(labels).reshape(-1)
            metrics["accuracy"] = float(np.mean(_top1(candidate[classifier[0]]) == flat))
            metrics["reference_accuracy"] = float(np.mean(_top1(reference[classifier[0]]) == flat))
    return metrics


def _one(metrics: Mapping[str, Any], budget: ValidationBudget) -> tuple[str, list[str]]:
    failures, warnings = [], []
    if "shape_mismatch" in metrics:
        return "failed", [f"output shape {metrics['shape_mismatch']}"]
    cosine = metrics.get("cosine_similarity")
    if cosine is not None and cosine < budget.min_cosine:
        failures.append(f"cosine {cosine:.5f} < {budget.min_cosine}")
    elif cosine is not None and budget.warn_cosine is not None and cosine < budget.warn_cosine:
        warnings.append(f"cosine {cosine:.6f} < {budget.warn_cosine} (warning level)")
    err = metrics.get("max_abs_error")
    if err is not None and budget.max_abs_error is not None and err > budget.max_abs_error:
        failures.append(f"max abs error {err:.3g} > {budget.max_abs_error}")
    top1 = metrics.get("top1_agreement")
    if top1 is not None and budget.min_top1_agreement is not None and top1 < budget.min_top1_agreement:
        failures.append(f"top-1 agreement {top1:.4f} < {budget.min_top1_agreement}")
    exact = metrics.get("exact_match")
    if exact is not None and budget.min_top1_agreement is not None and exact < budget.min_top1_agreement:
        failures.append(f"integer outputs agree on {exact:.4f} < {budget.min_top1_agreement}")
    acc, ref_acc = metrics.get("accuracy"), metrics.get("reference_accuracy")
    if acc is not None and ref_acc is not None and budget.max_accuracy_drop is not None \
            and ref_acc - acc > budget.max_accuracy_drop + 1e-9:
        failures.append(f"accuracy {acc:.4f} is {ref_acc - acc:.4f} below fp32 "
                        f"({ref_acc:.4f}); allowed drop {budget.max_accuracy_drop}")
    if failures:
        return "failed", failures
    return ("warned", warnings) if warnings else ("passed", [])


def judge(metrics: Mapping[str, Any], budgets: Mapping[str, ValidationBudget]) -> tuple[str, list[str],
                                                                                      dict[str, str]]:
    """(overall status, reasons, status per profile): the worst over the profiles' budgets."""
    per_profile: dict[str, str] = {}
    reasons: list[str] = []
    for profile, budget in budgets.items():
        status, why = _one(metrics, budget)
        per_profile[profile] = status
        reasons.extend(f"{profile}: {w}" for w in why if f"{profile}: {w}" not in reasons)
    return worst_status(list(per_profile.values())), reasons, per_profile
