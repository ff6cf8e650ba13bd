"""The package's health-check samples: ``samples/inputs.npz`` and ``samples/expected.npz``.

The expected outputs are the fp32 reference model's. An artifact (int8, fp16…) differs from them
by its own quantization error, which the converter measured on the same samples and recorded as
``artifact.validation["sample_max_abs_error"]``. A device reproduces that error up to small
numeric differences (threads, instruction sets), so the tolerance is
``2 × sample_max_abs_error + 1e-4`` (relative slack for the error itself, absolute slack for
floating-point noise). Without the figure, the profile's ``max_abs_error`` budget for the
precision is used, or 1e-3 for fp32 and 0.1 otherwise.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeserve.errors import CacheError
from edgeserve.manifest import Artifact, Manifest
from edgeserve.profiles import HardwareProfile

from .cache import ModelCache, VersionRecord

__all__ = ["SAMPLE_FILES", "SampleCheck", "compare_samples", "load_samples", "tolerance_for"]

SAMPLE_FILES = ("samples/inputs.npz", "samples/expected.npz")


@dataclass(frozen=True)
class SampleCheck:
    """Outcome of running the samples: ``ok`` when every output is within ``tolerance``."""

    ok: bool
    samples: int
    max_abs_error: float
    tolerance: float
    per_output: dict[str, float] = field(default_factory=dict)
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def tolerance_for(artifact: Artifact, profile: HardwareProfile) -> float:
    """The largest max-abs error on the samples that still counts as healthy."""
    measured = artifact.validation.get("sample_max_abs_error")
    if isinstance(measured, int | float) and measured >= 0:
        return 2.0 * float(measured) + 1e-4
    budget = profile.budget_for(artifact.precision).max_abs_error
    if budget is not None:
        return float(budget)
    return 1e-3 if artifact.precision == "fp32" else 0.1


def _npz(raw: bytes, what: str) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError) as exc:
        raise CacheError(f"{what} is not a readable .npz file ({exc})") from None


def load_samples(cache: ModelCache, record: VersionRecord,
                 manifest: Manifest) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(inputs, expected outputs) of a version, read from verified blobs."""
    for name in SAMPLE_FILES:
        if name not in record.files:
            raise KeyError(f"the package has no {name} (health-check samples)")
    what = f"{record.name} {record.version}"
    inputs = _npz(cache.read_verified(record.files[SAMPLE_FILES[0]], what), SAMPLE_FILES[0])
    expected = _npz(cache.read_verified(record.files[SAMPLE_FILES[1]], what), SAMPLE_FILES[1])
    names = [t.name for t in manifest.inputs]
    if sorted(inputs) != sorted(names):
        raise CacheError(f"{what}: {SAMPLE_FILES[0]} holds {sorted(inputs)}, the model takes "
                         f"{sorted(names)}")
    return inputs, expected


def compare_samples(manifest: Manifest, artifact: Artifact, profile: HardwareProfile,
                    outputs: dict[str, np.ndarray],
                    expected: dict[str, np.ndarray]) -> SampleCheck:
    tolerance = tolerance_for(artifact, profile)
    errors: dict[str, float] = {}
    problems = []
    for spec in manifest.outputs:
        if spec.name not in expected:
            continue
        got, want = outputs[spec.name], expected[spec.name]
        if got.shape != want.shape:
            problems.append(f"output {spec.name!r} has shape {list(got.shape)}, expected "
                            f"{list(want.shape)}")
            errors[spec.name] = float("inf")
            continue
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        errors[spec.name] = float(diff.max()) if diff.size else 0.0
    worst = max(errors.values(), default=0.0)
    samples = next(iter(expected.values())).shape[0] if expected else 0
    ok = not problems and bool(errors) and worst <= tolerance
    if not errors:
        problems.append("expected.npz names none of the model's outputs")
    message = "; ".join(problems) or (
        f"max abs error {worst:.3g} {'<=' if ok else '>'} tolerance {tolerance:.3g} "
        f"over {samples} samples")
    return SampleCheck(ok, samples, worst, tolerance, errors, message)
