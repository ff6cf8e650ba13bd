"""What every build step shares: the reference, its signature, the data and reference outputs,
and the record of each artifact as it is built and validated."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeserve.manifest import ImagePreprocessing, TensorSpec

from .data import Dataset
from .plan import PlannedArtifact
from .signature import ModelSignature
from .sources import ImportedModel

__all__ = ["BuildContext", "BuiltArtifact"]


@dataclass
class BuildContext:
    """The fp32 reference and the numbers every artifact is judged against."""

    work: Path
    imported: ImportedModel
    reference_path: Path
    signature: ModelSignature
    task: str
    calibration: Dataset | None
    evaluation: Dataset
    reference_eval: list[np.ndarray]
    samples: Dataset
    reference_samples: list[np.ndarray]
    input_shapes: dict[str, list[int | None]] = field(default_factory=dict)
    reference_latency_ms: float | None = None
    reference_bytes: int = 0
    static_path: Path | None = None
    batched_static_paths: dict[int, Path] = field(default_factory=dict)
    """batch-N static graphs by N (the TFLite batch-N variants)"""
    classifier_names: tuple[str, ...] = ()
    """outputs holding class scores (classification only)"""
    probability_names: tuple[str, ...] = ()
    """outputs a Sigmoid makes"""
    source_quantization: str | None = None
    """how the source was already quantized (e.g. "QDQ (12 DequantizeLinear, …)"), or None"""
    source_quantization_format: str | None = None
    """"QDQ" or "QOperator" for an already quantized source"""
    source_int8_path: Path | None = None
    """a QDQ source's own graph (the reference is its de-quantized float graph)"""
    preprocessing: dict[str, ImagePreprocessing] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """what the reference step decided for the user (batch axis, task, names)"""

    @property
    def classifier_indices(self) -> list[int]:
        return [i for i, t in enumerate(self.signature.outputs) if t.name in self.classifier_names]

    @property
    def probability_indices(self) -> list[int]:
        return [i for i, t in enumerate(self.signature.outputs)
                if t.name in self.probability_names]


@dataclass
class BuiltArtifact:
    """One planned artifact: its file(s), own signature when it differs, and its verdict."""

    plan: PlannedArtifact
    format: str
    precision: str
    quantization: str
    path: Path | None = None
    runtime: dict[str, str | int | float | bool] = field(default_factory=dict)
    inputs: list[TensorSpec] | None = None
    outputs: list[TensorSpec] | None = None
    validation: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    fallback_for: dict[str, dict[str, str]] = field(default_factory=dict)
    """profile → {its failed artifact's key → why}: this artifact ships in their place"""

    @property
    def batch(self) -> int | None:
        """N for a batch-N variant, else None."""
        return self.plan.key.batch if self.plan.key.batch > 1 else None

    @property
    def status(self) -> str:
        return str(self.validation.get("status", "failed"))

    @property
    def size_bytes(self) -> int:
        if self.path is None or not self.path.exists():
            return 0
        if self.path.is_dir():
            return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        return self.path.stat().st_size

    def fail(self, message: str) -> BuiltArtifact:
        self.error = message
        self.validation = {**self.validation, "status": "failed"}
        return self
