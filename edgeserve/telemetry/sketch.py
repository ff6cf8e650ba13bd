"""Distribution sketches of model inputs and outputs, and drift against a reference.

The converter computes a :class:`ReferenceStats` from calibration data and ships it in the package
(``reference/stats.json``). For every tensor it decides how to turn one sample into a few scalar
*features* (:class:`FeatureGroup`): each element of small tensors, the per-channel mean of images,
mean and standard deviation of large tensors, and the top-1 class of classifier outputs. Each
feature gets bin edges at the reference's deciles, so the reference is ~10 % per bin by
construction.

On the device, :class:`DistributionSketch` counts live samples into those same bins. Counts merge
by addition, so windows from many devices combine exactly. Drift is the Population Stability
Index and the Jensen–Shannon divergence between live and reference bin frequencies.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import pairwise
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .._validation import validate_json
from ..errors import SchemaError

__all__ = [
    "REFERENCE_SCHEMA",
    "DistributionSketch",
    "DriftScore",
    "FeatureGroup",
    "ReferenceStats",
    "SketchData",
    "SketchGroupData",
    "extract_features",
    "jensen_shannon",
    "plan_group",
    "psi",
    "sketch_from_data",
]

REFERENCE_SCHEMA = "edgeserve.reference/1"
Reduce = Literal["element", "channel", "moments", "argmax"]
ELEMENT_LIMIT = 128
CHANNEL_LIMIT = 64
ARGMAX_LIMIT = 64
BINS = 10
_EPS = 1e-4


class FeatureGroup(BaseModel):
    """How one tensor becomes features, with per-feature bin edges and reference bin counts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tensor: str
    role: Literal["input", "output"]
    reduce: Reduce
    axis: int | None = Field(default=None, description="channel axis for reduce='channel'")
    features: list[str] = Field(min_length=1, max_length=4096)
    edges: list[list[float]] = Field(description="interior bin edges per feature (ascending)")
    ref_counts: list[list[int]] = Field(description="reference counts per feature and bin")

    @model_validator(mode="after")
    def _shapes(self) -> FeatureGroup:
        if not (len(self.features) == len(self.edges) == len(self.ref_counts)):
            raise ValueError("features, edges and ref_counts must have one entry per feature")
        for edges, counts in zip(self.edges, self.ref_counts, strict=True):
            if len(counts) != len(edges) + 1:
                raise ValueError("each feature needs len(edges)+1 reference counts")
            if any(b <= a for a, b in pairwise(edges)):
                raise ValueError("bin edges must be strictly ascending")
        return self

    def extract(self, batch: np.ndarray) -> np.ndarray:
        """Features of a batch (first axis = samples) as an ``(N, F)`` float64 array."""
        return extract_features(batch, self.reduce, self.axis, len(self.features))


class ReferenceStats(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    schema_: Literal["edgeserve.reference/1"] = Field(default="edgeserve.reference/1", alias="schema")
    samples: int = Field(ge=0)
    groups: list[FeatureGroup] = Field(default_factory=list)

    @classmethod
    def from_arrays(
        cls,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
        layouts: Mapping[str, str | None] | None = None,
        classifier_outputs: tuple[str, ...] = (),
    ) -> ReferenceStats:
        """Plan feature groups for each tensor and bin the given samples (first axis = samples)."""
        layouts = layouts or {}
        groups = []
        count = 0
        for role, tensors in (("input", inputs), ("output", outputs)):
            for name, array in tensors.items():
                array = np.asarray(array)
                if array.dtype.kind not in "fiub" or array.ndim == 0 or array.shape[0] == 0:
                    continue
                count = max(count, array.shape[0])
                for reduce, axis in plan_group(array.shape, layouts.get(name),
                                               name in classifier_outputs):
                    groups.append(_fit_group(name, role, reduce, axis, array))  # type: ignore[arg-type]
        return cls(samples=count, groups=groups)

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | str, where: str = "reference/stats.json") -> ReferenceStats:
        return validate_json(cls, raw, where, SchemaError)


def plan_group(shape: tuple[int, ...], layout: str | None,
               classifier: bool = False) -> list[tuple[Reduce, int | None]]:
    """Which reductions describe a tensor of per-sample ``shape[1:]`` in a few features."""
    per_sample = shape[1:]
    elements = int(np.prod(per_sample)) if per_sample else 1
    plans: list[tuple[Reduce, int | None]] = []
    if classifier and 1 < elements <= ARGMAX_LIMIT:
        plans.append(("argmax", None))
    if elements <= ELEMENT_LIMIT:
        plans.append(("element", None))
        return plans
    if len(shape) >= 3 and layout:
        axis = layout.upper().find("C")
        if axis > 0 and shape[axis] <= CHANNEL_LIMIT:
            plans.append(("channel", axis))
            return plans
    plans.append(("moments", None))
    return plans


def extract_features(batch: np.ndarray, reduce: Reduce, axis: int | None,
                     n_features: int | None = None) -> np.ndarray:
    batch = np.asarray(batch)
    n = batch.shape[0] if batch.ndim else 1
    features: np.ndarray
    if reduce == "channel":
        # no float64 copy of the whole tensor (a quarter of the cost for a 3×128×128 image):
        # mean() accumulates in float64 without one
        assert axis is not None
        moved = np.moveaxis(batch, axis, 1).reshape(n, batch.shape[axis], -1)
        features = moved.mean(axis=2, dtype=np.float64)
    else:
        flat = batch.reshape(n, -1).astype(np.float64, copy=False)
        if reduce == "element":
            features = flat
        elif reduce == "argmax":
            features = np.argmax(flat, axis=1).astype(np.float64)[:, None]
        else:
            features = np.stack([flat.mean(axis=1), flat.std(axis=1)], axis=1)
    if n_features is not None and features.shape[1] != n_features:
        raise SchemaError(f"tensor gives {features.shape[1]} features for reduce={reduce!r}, "
                          f"the reference expects {n_features}")
    return features


def _feature_names(name: str, reduce: Reduce, count: int) -> list[str]:
    if reduce == "argmax":
        return [f"{name}:top1"]
    if reduce == "moments":
        return [f"{name}:mean", f"{name}:std"]
    kind = "c" if reduce == "channel" else "e"
    return [f"{name}:{kind}{i}" for i in range(count)]


def _fit_group(name: str, role: Literal["input", "output"], reduce: Reduce, axis: int | None,
               array: np.ndarray) -> FeatureGroup:
    features = extract_features(array, reduce, axis)
    all_edges, all_counts = [], []
    for column in features.T:
        if reduce == "argmax":
            classes = int(np.prod(array.shape[1:]))
            edges = [i + 0.5 for i in range(classes - 1)]
        else:
            quantiles = np.quantile(column, np.linspace(0, 1, BINS + 1)[1:-1])
            edges = sorted({float(f"{q:.6g}") for q in quantiles})
        counts = np.bincount(np.searchsorted(edges, column, side="right"),
                             minlength=len(edges) + 1)
        all_edges.append(edges)
        all_counts.append([int(c) for c in counts])
    return FeatureGroup(tensor=name, role=role, reduce=reduce, axis=axis,
                        features=_feature_names(name, reduce, features.shape[1]),
                        edges=all_edges, ref_counts=all_counts)


class SketchGroupData(BaseModel):
    """Wire form of one group's live counts (same order as the reference's groups)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    t: str = Field(description="tensor name")
    r: Reduce
    n: int = Field(ge=0)
    c: list[list[int]] = Field(max_length=4096, description="bin counts per feature")
    s: list[float] = Field(default_factory=list, max_length=4096, description="sum per feature")


class SketchData(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    g: list[SketchGroupData] = Field(default_factory=list, max_length=1024)


class DriftScore(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    psi: float = Field(ge=0, description="max PSI over features")
    js: float = Field(ge=0, le=1, description="max Jensen–Shannon divergence (base 2)")
    psi_mean: float = Field(ge=0)
    worst: str | None = Field(default=None, description="feature with the highest PSI")
    n: int = Field(ge=0, description="live samples compared")


def _probabilities(counts: np.ndarray) -> np.ndarray:
    total = counts.sum(axis=-1, keepdims=True)
    p = counts / np.maximum(total, 1)
    p = np.maximum(p, _EPS)
    return np.asarray(p / p.sum(axis=-1, keepdims=True))


def psi(live_counts: np.ndarray, ref_counts: np.ndarray) -> np.ndarray:
    """Population Stability Index per row (feature): Σ (p−q)·ln(p/q), ε-smoothed."""
    p = _probabilities(np.asarray(live_counts, float))
    q = _probabilities(np.asarray(ref_counts, float))
    return np.asarray(((p - q) * np.log(p / q)).sum(axis=-1))


def jensen_shannon(live_counts: np.ndarray, ref_counts: np.ndarray) -> np.ndarray:
    """Jensen–Shannon divergence per row, base 2 (0 = same, 1 = disjoint)."""
    p = _probabilities(np.asarray(live_counts, float))
    q = _probabilities(np.asarray(ref_counts, float))
    m = (p + q) / 2
    kl_pm = (p * np.log2(p / m)).sum(axis=-1)
    kl_qm = (q * np.log2(q / m)).sum(axis=-1)
    return np.asarray(np.clip((kl_pm + kl_qm) / 2, 0.0, 1.0))


class DistributionSketch:
    """Live bin counts for every feature group of a reference; add batches, merge, score drift.

    Per group, edges are padded to one ``(F, B-1)`` matrix (``+inf`` beyond a feature's own
    edges), so a batch is binned with one comparison and one ``bincount``, not a loop per feature.
    """

    def __init__(self, reference: ReferenceStats, role: Literal["input", "output"]) -> None:
        self.groups = [g for g in reference.groups if g.role == role]
        self._edges: list[np.ndarray] = []
        self._bins: list[list[int]] = []
        for group in self.groups:
            width = max(len(e) for e in group.edges)
            padded = np.full((len(group.features), max(width, 1)), np.inf)
            for f, edges in enumerate(group.edges):
                padded[f, : len(edges)] = edges
            self._edges.append(padded)
            self._bins.append([len(e) + 1 for e in group.edges])
        self.counts = [np.zeros((e.shape[0], e.shape[1] + 1), np.int64) for e in self._edges]
        self.sums = [np.zeros(len(g.features)) for g in self.groups]
        self.n = [0 for _ in self.groups]

    def update(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Count one batch (first axis = samples) of the named tensors."""
        for i, group in enumerate(self.groups):
            batch = tensors.get(group.tensor)
            if batch is not None:
                self.add_features(i, group.extract(batch))

    def add_features(self, i: int, features: np.ndarray) -> None:
        """Count an ``(N, F)`` feature matrix into group ``i``."""
        edges = self._edges[i]
        width = edges.shape[1] + 1
        idx = (features[:, :, None] >= edges[None, :, :]).sum(axis=2)
        flat = idx + np.arange(edges.shape[0]) * width
        self.counts[i] += np.bincount(flat.ravel(), minlength=edges.shape[0] * width).reshape(
            edges.shape[0], width)
        self.sums[i] += np.nansum(features, axis=0)
        self.n[i] += features.shape[0]

    def merge_data(self, data: SketchData) -> None:
        """Add counts received on the wire (must come from the same reference)."""
        if len(data.g) != len(self.groups):
            raise SchemaError(f"sketch has {len(data.g)} groups, the reference has "
                              f"{len(self.groups)}")
        for i, (group, wire) in enumerate(zip(self.groups, data.g, strict=True)):
            if wire.t != group.tensor or wire.r != group.reduce or \
                    len(wire.c) != len(group.features):
                raise SchemaError(f"sketch group {i} ({wire.t}/{wire.r}) does not match the "
                                  f"reference ({group.tensor}/{group.reduce})")
            for f, row in enumerate(wire.c):
                if len(row) != self._bins[i][f]:
                    raise SchemaError(f"sketch {wire.t} feature {f}: {len(row)} bins, the "
                                      f"reference has {self._bins[i][f]}")
                self.counts[i][f, : len(row)] += np.asarray(row, np.int64)
            if len(wire.s) == len(group.features):
                self.sums[i] += np.asarray(wire.s)
            self.n[i] += wire.n

    def feature_counts(self, i: int, f: int) -> np.ndarray:
        return self.counts[i][f, : self._bins[i][f]]

    def to_data(self) -> SketchData:
        return SketchData(g=[
            SketchGroupData(t=g.tensor, r=g.reduce, n=self.n[i],
                            c=[self.feature_counts(i, f).tolist() for f in range(len(g.features))],
                            s=[float(f"{v:.6g}") for v in self.sums[i]])
            for i, g in enumerate(self.groups)
        ])

    def drift(self) -> DriftScore | None:
        """Drift of everything counted so far against the reference (None before any sample)."""
        scores_psi: list[np.ndarray] = []
        scores_js: list[np.ndarray] = []
        names: list[str] = []
        total = 0
        for i, group in enumerate(self.groups):
            if self.n[i] == 0:
                continue
            total = max(total, self.n[i])
            for f, name in enumerate(group.features):
                live = self.feature_counts(i, f)
                scores_psi.append(psi(live, np.asarray(group.ref_counts[f])))
                scores_js.append(jensen_shannon(live, np.asarray(group.ref_counts[f])))
                names.append(name)
        if not scores_psi:
            return None
        all_psi = np.asarray(scores_psi, float)
        worst = int(np.argmax(all_psi))
        return DriftScore(psi=round(float(all_psi.max()), 6),
                          js=round(float(np.max(scores_js)), 6),
                          psi_mean=round(float(all_psi.mean()), 6), worst=names[worst], n=total)

    def reset(self) -> None:
        for i in range(len(self.groups)):
            self.counts[i][:] = 0
            self.sums[i][:] = 0
            self.n[i] = 0


def sketch_from_data(reference: ReferenceStats, role: Literal["input", "output"],
                     data: SketchData | dict[str, Any]) -> DistributionSketch:
    sketch = DistributionSketch(reference, role)
    sketch.merge_data(data if isinstance(data, SketchData) else SketchData.model_validate(data))
    return sketch
