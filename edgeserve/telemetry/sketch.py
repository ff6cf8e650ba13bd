"""Distribution sketches of model inputs and outputs, and drift against a reference.

The converter computes a :class:`ReferenceStats` from calibration data and ships it in the package
(``reference/stats.json``). For every tensor it decides how to turn one sample into a few scalar
*features* (:class:`FeatureGroup`): each element of small tensors, the per-channel mean of images,
mean and standard deviation of large tensors, and the top-1 class of classifier outputs. Each
feature gets bin edges at the reference's deciles, so the reference is ~10 % per bin by
construction.

On the device, :class:`DistributionSketch` counts live samples into those same bins. Counts merge
by addition, so windows from many devices combine exactly. Drift is the Population Stability
Index and the Jensen–Shannon divergence between live and reference bin frequencies, corrected
for sampling noise (:meth:`DistributionSketch.drift`).

Why a correction: both sides are samples (a window of tens to thousands of live samples; a
reference of 64 to 2000 calibration samples), and the plug-in PSI of two samples of one
distribution is not 0 but about ``(B-1)·(1/n + 1/m)`` for ``B`` bins, since ``n·m/(n+m)·PSI`` is
asymptotically χ² with ``B-1`` degrees of freedom (the PSI is the symmetrised KL divergence, whose
second-order term is Pearson's χ²). With the old ε = 1e-4 floor an empty live bin against a 10 %
reference bin alone added ``0.1·ln(1000) ≈ 0.69``, so a few-dozen-sample window read 4-5 on
unchanged data. Subtracting that mean is not enough for a number people put thresholds on: the
noise around it is of the same size (a standard deviation of ``√(2(B-1))·(1/n + 1/m)``, 0.15
for a 50-sample window against a 64-sample reference), and the reported score is the *maximum*
over features, which picks the noisiest. So each feature's score is the PSI *in excess of its
noise floor*: the value same-distribution samples of those sizes exceed with probability
``level`` (5 %) for the maximum over all the features scored (Šidák), read off the χ² quantile
(:func:`noise_floor`). On unchanged data the reported PSI is then 0 in ≥ 95 % of windows; on
drifted data it reads low by ``(floor - mean noise)``, about ``8·(1/n + 1/m)`` for one 10-bin
feature and ``12·(1/n + 1/m)`` for four, which vanishes as samples grow (a one-sigma shift,
population PSI 0.93 over the deciles, reads ≈ 0.4-0.7 at 50 samples and ≈ 0.9-1.0 at 1000).
Frequencies use Jeffreys (Krichevsky–Trofimov) smoothing, half a count per bin, not a
tiny ε: it keeps log ratios of empty bins finite and small and is close to the add-constant
with the lowest worst-case KL risk. Bins empty on both sides carry no information and are left out. Below
:data:`MIN_SAMPLES` samples (or 5 per occupied bin) on either side the χ² approximation does
not hold and a feature is not scored; with no feature scored the drift is ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from itertools import pairwise
from statistics import NormalDist
from typing import Annotated, Any, Literal

import numpy as np
from msgspec import Meta

from .._doc import Document, field
from .._validation import validate_json
from ..errors import SchemaError

__all__ = [
    "FALSE_ALARM",
    "MIN_PER_BIN",
    "MIN_SAMPLES",
    "REFERENCE_SCHEMA",
    "SMOOTHING",
    "DistributionSketch",
    "DriftScore",
    "FeatureGroup",
    "ReferenceStats",
    "SketchData",
    "SketchGroupData",
    "chi2_quantile",
    "extract_features",
    "jensen_shannon",
    "noise_floor",
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
SMOOTHING = 0.5
"""Pseudo-count added to every occupied bin of both sides (Jeffreys / Krichevsky–Trofimov)."""
MIN_PER_BIN = 5
"""Fewest samples per occupied bin, on each side, for a feature to be scored (Cochran's rule)."""
MIN_SAMPLES = MIN_PER_BIN * BINS
"""Fewest live and reference samples for a decile-binned feature to be scored."""
FALSE_ALARM = 0.05
"""Chance that same-distribution data gives a drift score above 0 (over all features scored)."""


class FeatureGroup(Document):
    """How one tensor becomes features, with per-feature bin edges and reference bin counts."""

    tensor: str
    role: Literal["input", "output"]
    reduce: Reduce
    axis: Annotated[int | None, Meta(description="channel axis for reduce='channel'")] = None
    features: Annotated[list[str], Meta(min_length=1, max_length=4096)]
    edges: Annotated[list[list[float]],
                     Meta(description="interior bin edges per feature (ascending)")]
    ref_counts: Annotated[list[list[int]],
                          Meta(description="reference counts per feature and bin")]

    def __post_init__(self) -> None:
        if not (len(self.features) == len(self.edges) == len(self.ref_counts)):
            raise ValueError("features, edges and ref_counts must have one entry per feature")
        for edges, counts in zip(self.edges, self.ref_counts, strict=True):
            if len(counts) != len(edges) + 1:
                raise ValueError("each feature needs len(edges)+1 reference counts")
            if any(b <= a for a, b in pairwise(edges)):
                raise ValueError("bin edges must be strictly ascending")

    def extract(self, batch: np.ndarray) -> np.ndarray:
        """Features of a batch (first axis = samples) as an ``(N, F)`` float64 array."""
        return extract_features(batch, self.reduce, self.axis, len(self.features))


class ReferenceStats(Document):
    schema_: Literal["edgeserve.reference/1"] = field(default="edgeserve.reference/1",
                                                      name="schema")
    samples: Annotated[int, Meta(ge=0)]
    groups: list[FeatureGroup] = field(default_factory=list)

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


class SketchGroupData(Document):
    """Wire form of one group's live counts (same order as the reference's groups)."""

    t: Annotated[str, Meta(description="tensor name")]
    r: Reduce
    n: Annotated[int, Meta(ge=0)]
    c: Annotated[list[list[int]], Meta(max_length=4096, description="bin counts per feature")]
    s: Annotated[list[float], Meta(max_length=4096, description="sum per feature")] = \
        field(default_factory=list)


class SketchData(Document):
    g: Annotated[list[SketchGroupData], Meta(max_length=1024)] = field(default_factory=list)


class DriftScore(Document):
    """Drift of one role's features (inputs or outputs) against the reference.

    ``psi``, ``js`` and ``psi_mean`` are noise-corrected (see the module docstring): 0 means no
    drift beyond what samples of these sizes show by chance. Old senders sent the plug-in values
    in the same fields, so the wire form is unchanged.
    """

    psi: Annotated[float, Meta(ge=0, description="max PSI over features, in excess of its "
                                                 "noise floor")]
    js: Annotated[float, Meta(ge=0, le=1, description="max Jensen–Shannon divergence (base 2), "
                                                      "in excess of its noise floor")]
    psi_mean: Annotated[float, Meta(ge=0)]
    worst: Annotated[str | None, Meta(description="feature closest to (or furthest beyond) its "
                                                  "noise floor")] = None
    n: Annotated[int, Meta(ge=0, description="live samples compared")]


def _frequencies(counts: np.ndarray, keep: np.ndarray, smoothing: float) -> np.ndarray:
    """Smoothed frequencies over the ``keep`` bins of each row (1 elsewhere, a log-safe filler)."""
    bins = keep.sum(axis=-1, keepdims=True)
    total = counts.sum(axis=-1, keepdims=True) + bins * smoothing
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(keep, (counts + smoothing) / np.where(total > 0, total, 1), 1.0)


def _smoothed_pair(live_counts: np.ndarray | list[int], ref_counts: np.ndarray | list[int],
                   smoothing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    live, ref = np.asarray(live_counts, float), np.asarray(ref_counts, float)
    # a bin empty on both sides says nothing about either distribution
    keep = (live + ref) > 0
    return _frequencies(live, keep, smoothing), _frequencies(ref, keep, smoothing), keep


def psi(live_counts: np.ndarray | list[int], ref_counts: np.ndarray | list[int],
        smoothing: float = SMOOTHING) -> np.ndarray:
    """Plug-in Population Stability Index per row (feature): Σ (p−q)·ln(p/q).

    ``p`` and ``q`` add ``smoothing`` (> 0) to every bin occupied on either side. This is the raw
    statistic: on two samples of one distribution it averages ``(B-1)·(1/n + 1/m)``, not 0;
    :meth:`DistributionSketch.drift` reports it net of its :func:`noise_floor`.
    """
    p, q, keep = _smoothed_pair(live_counts, ref_counts, smoothing)
    return np.asarray(np.where(keep, (p - q) * np.log(p / q), 0.0).sum(axis=-1))


def jensen_shannon(live_counts: np.ndarray | list[int], ref_counts: np.ndarray | list[int],
                   smoothing: float = SMOOTHING) -> np.ndarray:
    """Plug-in Jensen–Shannon divergence per row, base 2 (0 = same, 1 = disjoint), smoothed as
    :func:`psi`. For small differences it is ``PSI / (8·ln 2)``, noise included."""
    p, q, keep = _smoothed_pair(live_counts, ref_counts, smoothing)
    m = (p + q) / 2
    terms = np.where(keep, p * np.log2(p / m) + q * np.log2(q / m), 0.0)
    return np.asarray(np.clip(terms.sum(axis=-1) / 2, 0.0, 1.0))


def chi2_quantile(df: np.ndarray | int, p: float) -> np.ndarray:
    """The ``p`` quantile of χ² with ``df`` degrees of freedom (element-wise; 0 for df ≤ 0).

    Exact for 1 and 2 degrees of freedom, Wilson–Hilferty above, so the device needs no SciPy:
    within 1 % for p ≤ 0.99, and in the far tail (p up to 1 - 1e-5, the Šidák level for
    thousands of features) at most 5 % too high, i.e. on the side of fewer false alarms.
    """
    k = np.asarray(df, float)
    z = NormalDist().inv_cdf(p)
    h = 2 / (9 * np.maximum(k, 1))
    wilson = k * np.maximum(1 - h + z * np.sqrt(h), 0) ** 3
    one = NormalDist().inv_cdf((1 + p) / 2) ** 2
    two = -2 * math.log1p(-p)
    return np.asarray(np.select([k <= 0, k == 1, k == 2], [0.0, one, two], wilson))


def noise_floor(n_live: np.ndarray | int, n_ref: np.ndarray | int, bins: np.ndarray | int,
                level: float = FALSE_ALARM) -> np.ndarray:
    """The PSI that a live sample of ``n_live`` and a reference of ``n_ref`` drawn from one
    distribution, over ``bins`` occupied bins, exceed with probability ``level``.

    ``n·m/(n+m)·PSI`` is asymptotically χ² with ``bins-1`` degrees of freedom under "same
    distribution", so the floor is that χ² quantile times ``1/n + 1/m`` (checked by simulation
    with decile-binned references of 64-2000 samples and windows of 50-1000 samples: the
    exceedance rate is 3-5 % at level 5 %, the smoothing making it conservative on few samples).
    """
    inverse = 1 / np.asarray(n_live, float) + 1 / np.asarray(n_ref, float)
    return np.asarray(chi2_quantile(np.asarray(bins) - 1, 1 - level) * inverse)


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
        # reference counts padded like the live counts (padding bins are empty on both sides)
        self._ref = [np.zeros(c.shape) for c in self.counts]
        for ref, group in zip(self._ref, self.groups, strict=True):
            for f, row in enumerate(group.ref_counts):
                ref[f, : len(row)] = row
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

    def drift(self, level: float = FALSE_ALARM) -> DriftScore | None:
        """Noise-corrected drift of everything counted so far against the reference.

        Each feature with at least :data:`MIN_SAMPLES` (and :data:`MIN_PER_BIN` per occupied bin)
        live and reference samples scores its plug-in PSI and JS minus their :func:`noise_floor`
        at the Šidák level that makes the *maximum* over the ``F`` features scored exceed 0 with
        probability ``level`` (in (0, 1)) on same-distribution data, clamped at 0. None when no
        feature has enough samples (no evidence either way, which is not "no drift").
        """
        if not 0 < level < 1:
            raise ValueError(f"drift level must be in (0, 1), got {level}")
        names, raw_psi, raw_js, n, m, bins = self._scored_features()
        if not names:
            return None
        per_feature = -math.expm1(math.log1p(-level) / len(names))  # Šidák: 1-(1-level)^(1/F)
        floor = noise_floor(n, m, bins, per_feature)
        excess = raw_psi - floor
        scores = np.maximum(excess, 0.0)
        # JS ≈ PSI/(8·ln 2) to second order, for the noise as for the drift
        js = np.clip(raw_js - floor / (8 * math.log(2)), 0.0, 1.0)
        return DriftScore(psi=round(float(scores.max()), 6), js=round(float(js.max()), 6),
                          psi_mean=round(float(scores.mean()), 6),
                          worst=names[int(np.argmax(excess))], n=int(n.max()))

    def _scored_features(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray,
                                        np.ndarray, np.ndarray]:
        """Features with enough samples: names, plug-in PSI and JS, live and reference sample
        counts, occupied bins (one array entry per feature)."""
        names: list[str] = []
        parts: list[tuple[np.ndarray, ...]] = []
        for i, group in enumerate(self.groups):
            live, ref = self.counts[i].astype(float), self._ref[i]
            bins = ((live + ref) > 0).sum(axis=1)
            n, m = live.sum(axis=1), ref.sum(axis=1)
            need = np.maximum(MIN_SAMPLES, MIN_PER_BIN * bins)
            scored = (n >= need) & (m >= need)
            names += [name for name, ok in zip(group.features, scored, strict=True) if ok]
            parts.append((psi(live[scored], ref[scored]),
                          jensen_shannon(live[scored], ref[scored]),
                          n[scored], m[scored], bins[scored]))
        if not parts:
            empty = np.zeros(0)
            return names, empty, empty, empty, empty, empty
        raw_psi, raw_js, n, m, bins = (np.concatenate(c) for c in zip(*parts, strict=True))
        return names, raw_psi, raw_js, n, m, bins

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
