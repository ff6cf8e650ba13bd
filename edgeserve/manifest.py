"""The model package manifest (schema ``edgeserve.manifest/1``).

The manifest is the one signed document of a package: it names the model, describes its input and
output signature, lists every artifact (format, precision, target profiles, validation figures) and
pins every file in the package by sha256 and size. Its canonical byte form (sorted keys, no
whitespace, UTF-8) is what the ed25519 signature covers, so any edit to it or to any file it pins is
detected. The JSON Schema generated from these models lives in ``docs/manifest.schema.json``.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from msgspec import Meta

from ._doc import Document, field
from ._validation import validate, validate_json
from .errors import SchemaError

__all__ = [
    "MANIFEST_SCHEMA",
    "Artifact",
    "ArtifactFormat",
    "DType",
    "FileEntry",
    "ImagePreprocessing",
    "Manifest",
    "Precision",
    "QuantParams",
    "Quantization",
    "SourceInfo",
    "TensorSpec",
    "canonical_json",
    "is_safe_member_name",
    "manifest_json_schema",
    "parse_manifest",
]

MANIFEST_SCHEMA = "edgeserve.manifest/1"

DType = Literal[
    "float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool", "string"
]
ArtifactFormat = Literal["onnx", "tflite", "coreml"]
Precision = Literal["fp32", "fp16", "int8", "int6", "int4", "mixed"]
Quantization = Literal[
    "none", "dynamic", "static", "full-integer", "weight-int8", "palettize-6", "palettize-4"
]
Task = Literal["classification", "regression", "embedding", "detection", "other"]

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# semver.org 2.0.0, without build metadata restrictions relaxed
_SEMVER = (
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
_SHA256 = r"^[0-9a-f]{64}$"
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


Dim = Annotated[int, Meta(ge=0)] | Annotated[str, Meta(min_length=1, max_length=64)] | None


class QuantParams(Document):
    """Affine quantization of an integer tensor: ``real = scale * (q - zero_point)``."""

    scale: Annotated[float, Meta(gt=0)]
    zero_point: int


class TensorSpec(Document):
    """One named tensor of a model or artifact signature."""

    name: Annotated[str, Meta(min_length=1, max_length=256)]
    dtype: DType
    shape: Annotated[list[Dim], Meta(max_length=16,
                                     description="int: fixed; str or null: dynamic axis")]
    layout: Annotated[str, Meta(max_length=16, description="e.g. NCHW, NHWC, NC")] | None = None
    quantization: QuantParams | None = None
    description: Annotated[str, Meta(max_length=1000)] = ""


class ImagePreprocessing(Document):
    """How an image file becomes the model input tensor (used by ``agent predict`` on images)."""

    kind: Literal["image"] = "image"
    size: Annotated[tuple[Annotated[int, Meta(ge=1)], Annotated[int, Meta(ge=1)]],
                    Meta(description="(height, width) after resizing")]
    color: Literal["rgb", "bgr", "gray"] = "rgb"
    scale: Annotated[float, Meta(description="multiplied into the 0..255 pixel values")] = 1 / 255
    mean: Annotated[list[float], Meta(max_length=4)] = field(default_factory=list)
    std: Annotated[list[float], Meta(max_length=4)] = field(default_factory=list)
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    invert: Annotated[bool, Meta(description="255 - pixel before scaling (e.g. MNIST ink)")] = False


class FileEntry(Document):
    sha256: Annotated[str, Meta(pattern=_SHA256)]
    size: Annotated[int, Meta(ge=0)]


class SourceInfo(Document):
    framework: Annotated[str, Meta(min_length=1, max_length=64)]
    sha256: Annotated[str, Meta(pattern=_SHA256)]
    filename: Annotated[str, Meta(max_length=512)] | None = None


class Artifact(Document):
    """One runnable form of the model. ``path`` is a file, or a directory prefix (Core ML)."""

    id: Annotated[str, Meta(pattern=_NAME)]
    format: ArtifactFormat
    precision: Precision
    quantization: Quantization = "none"
    path: Annotated[str, Meta(min_length=1, max_length=512)]
    profiles: Annotated[list[str], Meta(max_length=64)] = field(default_factory=list)
    runtime: dict[str, str | int | float | bool] = field(default_factory=dict)
    inputs: Annotated[list[TensorSpec] | None, Meta(description=(
        "this artifact's own signature when it differs (layout, int8 I/O)"))] = None
    outputs: list[TensorSpec] | None = None
    size_bytes: Annotated[int, Meta(ge=0)] = 0
    validation: dict[str, Any] = field(default_factory=dict)
    batch: Annotated[int, Meta(ge=2, le=256, description=(
        "a batch-N variant: every input and output has its batch fixed at this size; it ships "
        "beside the batch-1 artifact of the same format, precision and quantization, is never "
        "chosen on its own, and serves the agent's dynamic batching"))] | None = None


class Manifest(Document):
    schema_: Literal["edgeserve.manifest/1"] = field(default="edgeserve.manifest/1", name="schema")
    name: Annotated[str, Meta(pattern=_NAME)]
    version: Annotated[str, Meta(pattern=_SEMVER)]
    release: Annotated[int, Meta(ge=1, description="monotonic; devices refuse a lower one than "
                                                   "installed")]
    created: Annotated[datetime, Meta(extra_json_schema={"format": "date-time"})] = \
        field(default_factory=lambda: datetime.now(UTC))
    description: Annotated[str, Meta(max_length=4000)] = ""
    task: Task = "other"
    source: SourceInfo
    inputs: Annotated[list[TensorSpec], Meta(min_length=1, max_length=256)]
    outputs: Annotated[list[TensorSpec], Meta(min_length=1, max_length=256)]
    preprocessing: dict[str, ImagePreprocessing] = field(default_factory=dict)
    labels: Annotated[list[str], Meta(max_length=100_000)] | None = None
    artifacts: Annotated[list[Artifact], Meta(min_length=1, max_length=256)]
    files: Annotated[dict[str, FileEntry], Meta(max_length=10_000)] = field(default_factory=dict)
    reference: str | None = None
    samples: str | None = None
    report: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.files:
            if not is_safe_member_name(name) or name in ("manifest.json", "signature"):
                raise ValueError(f"file name {name!r} is not a safe relative path in the package")
        ids = [a.id for a in self.artifacts]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"artifact ids must be unique, repeated: {dupes}")
        for artifact in self.artifacts:
            if self.files and not self.artifact_files(artifact):
                raise ValueError(f"artifact {artifact.id!r}: no file at path {artifact.path!r}")
        for key in ("reference", "samples", "report"):
            path = getattr(self, key)
            if path is not None and self.files and path not in self.files:
                raise ValueError(f"{key} file {path!r} is not listed in files")
        input_names = {t.name for t in self.inputs}
        unknown = set(self.preprocessing) - input_names
        if unknown:
            raise ValueError(f"preprocessing for unknown inputs {sorted(unknown)}")

    def artifact_files(self, artifact: Artifact) -> list[str]:
        """The package members that make up ``artifact`` (one file, or a directory's files)."""
        prefix = artifact.path.rstrip("/") + "/"
        return sorted(n for n in self.files if n == artifact.path or n.startswith(prefix))

    def artifact(self, artifact_id: str) -> Artifact:
        for artifact in self.artifacts:
            if artifact.id == artifact_id:
                return artifact
        known = ", ".join(a.id for a in self.artifacts)
        raise SchemaError(f"package {self.name} {self.version} has no artifact {artifact_id!r}; "
                          f"it has: {known}")

    def canonical_bytes(self) -> bytes:
        data = self.model_dump(mode="json", by_alias=True)
        for artifact in data["artifacts"]:
            # written only when set: agents older than batch-N variants read the rest unchanged
            if artifact.get("batch") is None:
                artifact.pop("batch", None)
        return canonical_json(data)


def manifest_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a manifest, as published in docs/."""
    schema = Manifest.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://edgeserve.dev/schemas/manifest-1.json"
    return schema


def canonical_json(data: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no whitespace, UTF-8 (what signatures cover)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def is_safe_member_name(name: str) -> bool:
    """A relative POSIX path with no ``..``, no empty parts, no drive letter and no backslash."""
    if not name or len(name) > 512 or name.startswith("/") or "\\" in name or "\x00" in name:
        return False
    if _WINDOWS_DRIVE.match(name):
        return False
    parts = name.split("/")
    return all(part not in ("", ".", "..") for part in parts)


def parse_manifest(raw: bytes | str | dict[str, Any], where: str = "manifest.json") -> Manifest:
    """Parse and validate a manifest; every problem raises :class:`SchemaError` naming the key."""
    if isinstance(raw, dict):
        return validate(Manifest, raw, where)
    return validate_json(Manifest, raw, where, max_bytes=8 * 1024 * 1024)
