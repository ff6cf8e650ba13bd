"""Numbers that say how close an artifact stays to the fp32 reference, and the verdict on them.

Each output is judged by what it is (its *kind*), since one metric does not fit all: per-sample
cosine is undefined for a single sigmoid that is ~0 on half the samples, and a correct artifact
was once failed with "cosine 0.479" for it.

============  =========================================  =====================================
kind          which outputs                              gated by
============  =========================================  =====================================
vector        float outputs with more than 4 values      ``cosine_similarity`` (mean over
              per sample (embeddings, feature maps)      samples; pairs equal within 1e-6 of
                                                         the output's scale agree, even at
                                                         zero norm)
classifier    class scores of a classification model     ``top1_agreement`` (+ cosine, and
                                                         ``accuracy`` with labels)
scalar        float outputs of at most 4 values per      ``range_error``: max abs error over
              sample (a score, a regression, a box)      the reference's range (max - min)
probability   a scalar output made by a Sigmoid          ``range_error`` over [0, 1] (its
              (through reshapes, means, slices)          range) and ``decision_agreement``
                                                         at 0.5
integer       integer outputs (a predicted label)        ``exact_match``
============  =========================================  =====================================

``max_abs_error`` and ``max_rel_error`` (over the largest reference value) cover every float
output. ``outputs`` holds each output's kind and figures, ``gated_by`` the metrics the verdict
used. The verdict applies each profile's :class:`ValidationBudget`: a hard limit missed is
*failed*, a warning level missed is *warned*, otherwise *passed*. A budget without
``max_range_error`` allows ``sqrt(2 (1 - min_cosine))``, the relative error a cosine of
``min_cosine`` allows a vector.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from edgeserve.profiles import ValidationBudget

__all__ = ["FEW_VALUES", "Status", "compare_outputs", "gated_by", "judge", "output_kind",
           "range_budget", "worst_status"]

FEW_VALUES = 4
"""outputs with at most this many values per sample are judged as scalars, not vectors"""
_SAME = 1e-6
"""pairs of per-sample outputs closer than this × the output's scale agree (cosine 1)"""

Status = Literal["passed", "warned", "failed", "not-executed"]
_ORDER = {"passed": 0, "not-executed": 1, "warned": 2, "failed": 3}


def worst_status(statuses: Sequence[str]) -> str:
    return max(statuses, key=lambda s: _ORDER.get(s, 3)) if statuses else "passed"


def _cosines(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Per-sample cosine; a pair whose difference is within ``_SAME`` of the output's scale
    (its largest per-sample norm) agrees, zero norms included."""
    a = ref.reshape(len(ref), -1).astype(np.float64)
    b = got.reshape(len(got), -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    scale = float(na.max(initial=0.0))
    same = np.linalg.norm(a - b, axis=1) <= _SAME * scale
    cos = np.sum(a * b, axis=1) / np.maximum(na * nb, 1e-30)
    return np.where(same, 1.0, cos)


def output_kind(ref: np.ndarray, classifier: bool = False, probability: bool = False) -> str:
    """The kind of an output (module docstring) from the reference's values of it."""
    if ref.dtype.kind not in "fc":
        return "integer"
    if classifier:
        return "classifier"
    if ref.size // max(len(ref), 1) > FEW_VALUES:
        return "vector"
    return "probability" if probability else "scalar"


def _range_error(ref: np.ndarray, diff: np.ndarray, probability: bool = False) -> float:
    """Max abs error over the output's range: [0, 1] for a probability, else max - min of the
    reference over the samples (max |ref| when that is 0)."""
    if probability:
        return float(diff.max(initial=0.0))
    span = float(np.ptp(ref)) if ref.size else 0.0
    scale = span or float(np.abs(ref).max(initial=0.0)) or 1.0
    return float(diff.max(initial=0.0)) / scale


def _top1(scores: np.ndarray) -> np.ndarray:
    """The best class per sample → ``[n]``: scores have one axis of classes, the others 1
    (``[n, K]``, ``[n, 1, K]``, ``[n, K, 1, 1]``)."""
    scores = np.asarray(scores)
    best: np.ndarray = scores.reshape(len(scores), -1).argmax(-1)
    return best


def compare_outputs(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray],
                    classifier: Sequence[int] = (), labels: np.ndarray | None = None,
                    names: Sequence[str] | None = None,
                    probabilities: Sequence[int] = ()) -> dict[str, Any]:
    """Error metrics of ``candidate`` outputs against ``reference`` (same order, samples first),
    each output judged by its kind (module docstring); ``classifier`` and ``probabilities`` are
    indices of class-score and sigmoid outputs."""
    metrics: dict[str, Any] = {"samples": len(reference[0]) if reference else 0}
    names = list(names) if names is not None else [f"output_{i}" for i in range(len(reference))]
    max_abs, max_ref, cosines, exact, ranges, decisions = 0.0, 0.0, [], [], [], []
    per_output: dict[str, dict[str, Any]] = {}
    for i, (ref, got) in enumerate(zip(reference, candidate, strict=True)):
        got = np.asarray(got).reshape(ref.shape) if got.size == ref.size else got
        if got.shape != ref.shape:
            metrics["shape_mismatch"] = f"{list(got.shape)} vs reference {list(ref.shape)}"
            return metrics
        kind = output_kind(ref, i in classifier, i in probabilities)
        figures: dict[str, Any] = {"kind": kind}
        if kind == "integer":
            figures["exact_match"] = float(np.mean(got == ref))
            exact.append(figures["exact_match"])
        else:
            diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
            figures["max_abs_error"] = float(diff.max(initial=0.0))
            max_abs = max(max_abs, figures["max_abs_error"])
            max_ref = max(max_ref, float(np.abs(ref).max(initial=0.0)))
        if kind in ("vector", "classifier"):
            cosine = _cosines(ref, got)
            figures["cosine_similarity"] = float(cosine.mean())
            cosines.append(cosine)
        if kind in ("scalar", "probability"):
            figures["range_error"] = _range_error(ref, diff, kind == "probability")
            ranges.append(figures["range_error"])
        if kind == "probability":
            figures["decision_agreement"] = float(np.mean((ref > 0.5) == (got > 0.5)))
            decisions.append(figures["decision_agreement"])
        if kind == "classifier":
            figures["top1_agreement"] = float(np.mean(_top1(ref) == _top1(got)))
        per_output[names[i]] = figures
    if max_ref or max_abs or cosines or ranges:
        metrics.update(max_abs_error=max_abs, max_rel_error=max_abs / max(max_ref, 1e-12))
    if cosines:
        per_sample = np.min(np.stack(cosines), axis=0)
        metrics.update(cosine_similarity=float(per_sample.mean()),
                       cosine_similarity_min=float(per_sample.min()))
    if ranges:
        metrics["range_error"] = float(max(ranges))
    if decisions:
        metrics["decision_agreement"] = float(min(decisions))
    if exact:
        metrics["exact_match"] = float(min(exact))
    if classifier:
        agree = [per_output[names[i]]["top1_agreement"] for i in classifier]
        metrics["top1_agreement"] = float(min(agree))
        if labels is not None:
            flat = np.asarray(labels).reshape(-1)
            metrics["accuracy"] = float(np.mean(_top1(candidate[classifier[0]]) == flat))
            metrics["reference_accuracy"] = float(np.mean(_top1(reference[classifier[0]]) == flat))
    metrics["outputs"] = per_output
    return metrics


def range_budget(budget: ValidationBudget) -> tuple[float, float | None]:
    """(limit, warning level) of ``range_error`` for ``budget``."""
    def derived(cosine: float) -> float:
        return math.sqrt(2 * max(0.0, 1 - cosine))

    limit = budget.max_range_error if budget.max_range_error is not None \
        else derived(budget.min_cosine)
    warn = budget.warn_range_error if budget.warn_range_error is not None else \
        (derived(budget.warn_cosine) if budget.warn_cosine is not None else None)
    return limit, warn


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
    ranged = metrics.get("range_error")
    if ranged is not None:
        limit, warn = range_budget(budget)
        if ranged > limit:
            failures.append(f"error {ranged:.3g} of the output's range > {limit:.3g}")
        elif warn is not None and ranged > warn:
            warnings.append(f"error {ranged:.3g} of the output's range > {warn:.3g} (warning "
                            "level)")
    decided = metrics.get("decision_agreement")
    if decided is not None and budget.min_top1_agreement is not None \
            and decided < budget.min_top1_agreement:
        failures.append(f"decisions at 0.5 agree on {decided:.4f} < {budget.min_top1_agreement}")
    acc, ref_acc = metrics.get("accuracy"), metrics.get("reference_accuracy")
    if acc is not None and ref_acc is not None and budget.max_accuracy_drop is not None \
            and ref_acc - acc > budget.max_accuracy_drop + 1e-9:
        failures.append(f"accuracy {acc:.4f} is {ref_acc - acc:.4f} below fp32 "
                        f"({ref_acc:.4f}); allowed drop {budget.max_accuracy_drop}")
    if failures:
        return "failed", failures
    return ("warned", warnings) if warnings else ("passed", [])


def gated_by(metrics: Mapping[str, Any], budget: ValidationBudget | None = None) -> list[str]:
    """The metrics a verdict on ``metrics`` rests on (for the report)."""
    used = [k for k in ("cosine_similarity", "top1_agreement", "range_error",
                        "decision_agreement", "exact_match") if metrics.get(k) is not None]
    if budget is not None and budget.max_abs_error is not None and "max_abs_error" in metrics:
        used.append("max_abs_error")
    if metrics.get("accuracy") is not None and budget is not None and \
            budget.max_accuracy_drop is not None:
        used.append("accuracy")
    return used


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
