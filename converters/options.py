"""What a conversion is asked to do (:class:`ConvertOptions`) and what it produced
(:class:`ConversionResult`): plain data that every step reads, so the steps (reference,
packaging) need not import the pipeline that runs them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeserve.errors import ConfigError
from edgeserve.manifest import Manifest
from edgeserve.profiles import HardwareProfile, load_profile

from .data import DataSpec
from .preprocess import PreprocessSpec

__all__ = ["ConversionResult", "ConvertOptions"]


@dataclass
class ConversionResult:
    """What a conversion produced; ``ok`` is False when a profile failed (a required artifact
    failed and none of its declared fallbacks passed)."""

    report: dict[str, Any]
    package: Path | None
    report_json: Path
    report_md: Path
    manifest: Manifest | None = None
    log: Path | None = None

    @property
    def ok(self) -> bool:
        return bool(self.report["ok"])

    @property
    def unserved(self) -> list[str]:
        """Profiles that get no passing artifact at all from this conversion."""
        return [name for name, p in self.report["profiles"].items() if not p.get("ships")]

    def artifact(self, artifact_id: str) -> dict[str, Any]:
        for artifact in self.report["artifacts"]:
            if artifact["id"] == artifact_id:
                return dict(artifact)
        raise KeyError(artifact_id)


@dataclass
class ConvertOptions:
    """Options of a conversion (:class:`~.pipeline.Converter` runs them).

    ``profiles`` are names or :class:`HardwareProfile` objects. ``calibration``/``evaluation``
    are :data:`~edgeserve.converters.data.DataSpec` (``.npz`` path, image folder, mapping of
    arrays, :class:`Dataset` or callable). ``example_inputs`` are needed for an in-memory torch
    module; ``input_shapes`` fix dynamic dimensions (``{"x": [1, 3, 224, 224]}``; ``None`` as
    the first dimension keeps a dynamic batch: ``[None, 3, 224, 224]``);
    ``constant_inputs`` freeze inputs that always have one value (``{"sr": 16000}``) into the
    reference, which lets ``If`` nodes on them fold away. ``release`` defaults to
    :func:`~.checks.derive_release` of the version. ``preprocessing`` maps input names (``""``:
    the only input) to :class:`ImagePreprocessing` or some of its fields (the rest come from the
    input's shape). ``capture_output`` sends third-party console output to
    ``OUT/NAME-VERSION.convert.log`` while converting. ``dynamic_batch`` makes a batch axis that
    the source fixed at 1 dynamic in the reference and the ONNX artifacts, when ONNX Runtime
    computes the same per sample stacked as alone (checked at batch 2 and 3; the report says
    either way), so that requests may carry several samples and the agent can batch them.
    ``static_batch`` N > 1 adds a batch-N variant of each TFLite artifact, as a profile's
    ``[batching] static_batch`` does (the larger of the two wins).
    """

    profiles: Sequence[str | HardwareProfile]
    name: str
    version: str
    release: int | None = None
    calibration: DataSpec | None = None
    evaluation: DataSpec | None = None
    input_shapes: Mapping[str, Sequence[int | None]] = field(default_factory=dict)
    constant_inputs: Mapping[str, Any] = field(default_factory=dict)
    example_inputs: Any = None
    input_names: Sequence[str] | None = None
    output_names: Sequence[str] | None = None
    labels: Sequence[str] | None = None
    task: str | None = None
    layouts: Mapping[str, str] = field(default_factory=dict)
    preprocessing: Mapping[str, PreprocessSpec] = field(default_factory=dict)
    description: str = ""
    keep_going: bool = False
    allow_random_calibration: bool = False
    max_eval_samples: int = 1000
    show_progress: bool = True
    work_dir: Path | None = None
    capture_output: bool = True
    dynamic_batch: bool = False
    static_batch: int = 1

    def load_profiles(self) -> list[HardwareProfile]:
        if not self.profiles:
            raise ConfigError("at least one hardware profile is needed (--profile NAME)")
        return [p if isinstance(p, HardwareProfile) else load_profile(p) for p in self.profiles]
