"""Hardware profiles: one TOML file per device class (schema ``edgeserve.profile/1``).

A profile says what a device is (architecture, cores, memory and storage), what it can run
(runtimes, execution providers, delegates, Core ML compute units), which artifacts the converter
builds for it, in order of preference, the error budgets each artifact must meet, and hard limits
that make a build fail early. Shipped profiles live in ``hw-profiles/`` (installed as
``edgeserve.hw_profiles``); more directories can be added with ``EDGESERVE_PROFILE_PATH``.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import msgspec.structs
from msgspec import Meta

from ._doc import Document, ValidationError, field
from ._validation import validate
from .errors import ProfileError, UnknownProfileError
from .manifest import ArtifactFormat, Precision, Quantization

__all__ = [
    "PROFILE_SCHEMA",
    "Accelerator",
    "ArtifactTarget",
    "Batching",
    "Budgets",
    "Hardware",
    "HardwareProfile",
    "Limits",
    "Runtimes",
    "ValidationBudget",
    "list_profiles",
    "load_profile",
    "parse_profile",
    "profile_dirs",
    "target_from_key",
]

PROFILE_SCHEMA = "edgeserve.profile/1"
DeviceClass = Literal[
    "server", "desktop", "sbc", "gpu-sbc", "accelerator-board", "mcu", "phone", "industrial-pc"
]


class Accelerator(Document):
    name: str
    kind: Literal["gpu", "npu", "tpu", "dsp", "vpu"]
    tops_int8: Annotated[float, Meta(ge=0, description="vendor peak int8 TOPS")] | None = None
    precisions: list[Precision] = field(default_factory=list)


class Hardware(Document):
    arch: Literal["x86_64", "aarch64", "armv7l", "xtensa", "riscv32", "riscv64", "any"]
    cpu: str
    cores: Annotated[int, Meta(ge=1, le=1024)]
    clock_mhz: Annotated[int, Meta(ge=1)] | None = None
    memory_mb: Annotated[float, Meta(gt=0, description="RAM; fractions allowed for MCUs (0.5 = 512 KB)")]
    storage_mb: Annotated[float, Meta(gt=0)]
    accelerators: list[Accelerator] = field(default_factory=list)


class Budgets(Document):
    """Byte budgets on the device; a build that exceeds one fails before converting."""

    max_model_bytes: Annotated[int, Meta(gt=0)]
    max_arena_bytes: Annotated[int, Meta(gt=0)] | None = None
    cache_bytes: Annotated[int, Meta(gt=0, description="the agent's model cache budget")]


class OrtRuntime(Document):
    execution_providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    intra_op_threads: Annotated[int, Meta(ge=0, description="0 = let ONNX Runtime decide")] = 0
    inter_op_threads: Annotated[int, Meta(ge=0)] = 1
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"


class LiteRtRuntime(Document):
    delegates: list[str] = field(default_factory=lambda: ["xnnpack"])
    threads: Annotated[int, Meta(ge=0)] = 0


class CoreMlRuntime(Document):
    compute_units: Literal["ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE"] = "ALL"
    minimum_deployment_target: Literal[
        "iOS15", "iOS16", "iOS17", "iOS18", "macOS12", "macOS13", "macOS14", "macOS15"
    ] = "iOS17"


class TfliteMicroRuntime(Document):
    arena_bytes: Annotated[int, Meta(gt=0)]
    ops: Annotated[list[str], Meta(description="ops the firmware registers")] = field(default_factory=list)


class Runtimes(Document):
    onnxruntime: OrtRuntime | None = None
    litert: LiteRtRuntime | None = None
    coreml: CoreMlRuntime | None = None
    tflite_micro: TfliteMicroRuntime | None = None

    def available(self) -> list[str]:
        return [k for k in ("onnxruntime", "litert", "coreml", "tflite_micro")
                if getattr(self, k) is not None]


_FORMAT_RUNTIMES: dict[str, tuple[str, ...]] = {
    "onnx": ("onnxruntime",),
    "tflite": ("litert", "tflite_micro"),
    "coreml": ("coreml",),
}


class ArtifactTarget(Document):
    """One artifact the converter builds for this device class.

    ``fallback`` lists artifact keys (``onnx-fp16``, ``onnx-fp32`` …) to ship in place of this
    artifact when it is required and cannot be built or misses its budget: the first that passes
    the profile's budget ships, and the report and the manifest say why.
    """

    format: ArtifactFormat
    precision: Precision
    quantization: Quantization = "none"
    required: Annotated[bool, Meta(description="a failure of this artifact fails the build")] = True
    io_dtype: Literal["float32", "int8", "uint8"] = "float32"
    fallback: Annotated[list[str], Meta(max_length=8, description=(
        "artifact keys shipped in its place when it fails"))] = field(default_factory=list)

    @property
    def key(self) -> str:
        suffix = "" if self.quantization in ("none", "static") and self.precision != "int8" \
            else f"-{self.quantization}"
        return f"{self.format}-{self.precision}{suffix}"

    def __post_init__(self) -> None:
        for key in self.fallback:
            target_from_key(key)

    def fallback_targets(self) -> list[ArtifactTarget]:
        """The ``fallback`` keys as targets, in order (never required themselves)."""
        return [target_from_key(key) for key in self.fallback]


_KEY = re.compile(r"^(onnx|tflite|coreml)-(fp32|fp16|int8|int6|int4|mixed)(?:-([a-z0-9-]+))?$")


def target_from_key(key: str) -> ArtifactTarget:
    """The target an artifact key names (``onnx-int8-static``, ``tflite-fp16`` …; the inverse of
    :attr:`ArtifactTarget.key`); ``ValueError`` naming the expected form otherwise."""
    match = _KEY.match(key)
    expected = ("expected FORMAT-PRECISION[-QUANTIZATION] as in the converter's artifact ids, "
                "e.g. onnx-fp32, onnx-fp16, onnx-int8-static, tflite-fp32, coreml-fp16")
    if match is None:
        raise ValueError(f"artifact key {key!r}: {expected}")
    fmt, precision, quantization = match.group(1), match.group(2), match.group(3) or "none"
    if quantization == "none" and precision not in ("fp32", "fp16", "mixed"):
        raise ValueError(f"artifact key {key!r}: {precision} needs its quantization, e.g. "
                         f"{fmt}-{precision}-{'static' if precision == 'int8' else 'palettize-6'}")
    try:
        target = ArtifactTarget.model_validate({"format": fmt, "precision": precision,
                                                "quantization": quantization, "required": False})
    except ValidationError:
        raise ValueError(f"artifact key {key!r}: unknown quantization {quantization!r}; "
                         f"{expected}") from None
    if target.key != key:
        raise ValueError(f"artifact key {key!r}: write it as {target.key!r}")
    return target


class ValidationBudget(Document):
    """How close an artifact must stay to the fp32 reference (``warn_*``: passed with a warning)."""

    min_cosine: Annotated[float, Meta(ge=-1, le=1)]
    warn_cosine: Annotated[float, Meta(ge=-1, le=1)] | None = None
    max_abs_error: Annotated[float, Meta(ge=0)] | None = None
    min_top1_agreement: Annotated[float, Meta(ge=0, le=1)] | None = None
    max_accuracy_drop: Annotated[float, Meta(ge=0, le=1, description=(
        "task metric drop, in fractions"))] | None = None
    max_range_error: Annotated[float, Meta(ge=0, description=(
        "outputs of a few values per sample (scores, sigmoids): largest abs error over the "
        "output's range [default: sqrt(2 (1 - min_cosine))]"))] | None = None
    warn_range_error: Annotated[float, Meta(ge=0)] | None = None


def _default_budgets() -> dict[Precision, ValidationBudget]:
    return {
        "fp32": ValidationBudget(min_cosine=0.9999, warn_cosine=0.99999, max_abs_error=1e-3,
                                 min_top1_agreement=0.999),
        "fp16": ValidationBudget(min_cosine=0.999, warn_cosine=0.9999, min_top1_agreement=0.98),
        "int8": ValidationBudget(min_cosine=0.98, warn_cosine=0.995, min_top1_agreement=0.95,
                                 max_accuracy_drop=0.01),
        "int6": ValidationBudget(min_cosine=0.98, min_top1_agreement=0.95),
        "int4": ValidationBudget(min_cosine=0.95, min_top1_agreement=0.9),
        "mixed": ValidationBudget(min_cosine=0.98, min_top1_agreement=0.95),
    }


class Limits(Document):
    unsupported_ops: Annotated[dict[ArtifactFormat, list[str]], Meta(description=(
        "ONNX op types this device's runtime cannot run"))] = field(default_factory=dict)
    max_tensor_rank: Annotated[int, Meta(ge=1)] | None = None
    requires_static_shapes: bool = False


class Batching(Document):
    """How this device class batches requests. ``dynamic``: the converter makes a batch axis the
    source fixes at 1 dynamic (checked per sample with ONNX Runtime), so the agent can stack
    concurrent requests into one call (its dynamic batching). ``static_batch``: the static route
    (TFLite), whose shapes are all fixed, also gets a *batch-N variant* of each artifact, built
    with the batch fixed at N; the agent stacks up to N concurrent requests into one call of it
    (padding a partial batch) and runs a lone request on the batch-1 artifact."""

    dynamic: Annotated[bool, Meta(description=(
        "make a batch the source fixes at 1 dynamic when the graph computes each sample alone"))] \
        = False
    static_batch: Annotated[int, Meta(ge=1, le=256, description=(
        "also build each TFLite artifact with its batch fixed at this size (1: none), for the "
        "agent's dynamic batching; built only when the graph computes each sample alone"))] = 1


class HardwareProfile(Document):
    schema_: Literal["edgeserve.profile/1"] = field(default="edgeserve.profile/1", name="schema")
    name: Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")]
    title: str
    device_class: DeviceClass
    vendor: str
    sources: Annotated[list[str], Meta(description="vendor spec pages used")] = field(default_factory=list)
    description: str = ""
    hardware: Hardware
    budgets: Budgets
    runtimes: Runtimes
    artifacts: Annotated[list[ArtifactTarget], Meta(min_length=1)]
    validation: dict[Precision, ValidationBudget] = field(default_factory=_default_budgets)
    limits: Limits = field(default_factory=Limits)
    batching: Batching = field(default_factory=Batching)

    def __post_init__(self) -> None:
        # given budgets override the defaults per precision
        msgspec.structs.force_setattr(self, "validation",  # type: ignore[arg-type]
                                      {**_default_budgets(), **self.validation})
        available = set(self.runtimes.available())
        for i, target in enumerate(self.artifacts):
            if not available & set(_FORMAT_RUNTIMES[target.format]):
                raise ValueError(
                    f"artifacts[{i}] is {target.format}, but no runtime for it is declared "
                    f"(declare one of {list(_FORMAT_RUNTIMES[target.format])} under [runtimes])"
                )
            for fallback in target.fallback_targets():
                # a device picks a fallback only in a format one of its runtimes runs
                if not available & set(_FORMAT_RUNTIMES[fallback.format]):
                    raise ValueError(
                        f"artifacts[{i}].fallback names {fallback.key}, but no runtime for "
                        f"{fallback.format} is declared (declare one of "
                        f"{list(_FORMAT_RUNTIMES[fallback.format])} under [runtimes])"
                    )

    def budget_for(self, precision: str) -> ValidationBudget:
        return self.validation.get(precision) or _default_budgets()["int8"]  # type: ignore[call-overload]


def profile_dirs() -> list[Path]:
    """Directories searched for ``NAME.toml``: ``EDGESERVE_PROFILE_PATH`` first, then shipped."""
    extra = [Path(p) for p in os.environ.get("EDGESERVE_PROFILE_PATH", "").split(os.pathsep) if p]
    shipped = Path(str(resources.files("edgeserve.hw_profiles")))
    return [*extra, shipped]


def parse_profile(text: str, where: str) -> HardwareProfile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{where}: not valid TOML: {exc}") from None
    return validate(HardwareProfile, data, where, ProfileError)


def _load_file(path: Path) -> HardwareProfile:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: cannot read profile: {exc}") from None
    profile = parse_profile(text, str(path))
    if path.stem != profile.name:
        raise ProfileError(f"{path}: key 'name': found {profile.name!r}, expected {path.stem!r} "
                           "(a profile's name must match its file name)")
    return profile


def _available() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for directory in reversed(profile_dirs()):  # earlier directories win
        if directory.is_dir():
            for path in sorted(directory.glob("*.toml")):
                found[path.stem] = path
    return found


def list_profiles() -> list[HardwareProfile]:
    return [_load_file(path) for _, path in sorted(_available().items())]


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """A profile by name (``raspberry-pi-5``) or by path to a TOML file."""
    text = str(name_or_path)
    if text.endswith(".toml") or os.sep in text:
        return _load_file(Path(text))
    available = _available()
    if text in available:
        return _load_file(available[text])
    close = difflib.get_close_matches(text, list(available), n=3, cutoff=0.4)
    hint = f"did you mean {', '.join(close)}?" if close else \
        f"known profiles: {', '.join(sorted(available))}"
    raise UnknownProfileError(f"unknown hardware profile {text!r}; {hint}")
