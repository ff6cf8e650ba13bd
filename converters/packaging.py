"""Step 5: the report, and the signed package holding every artifact that did not fail.

Package members::

    artifacts/<id>.onnx | .tflite | .mlpackage/…   one per built artifact (failed ones left out)
    reference/stats.json    ReferenceStats of inputs and fp32 outputs over the calibration data
    samples/inputs.npz      the first 8 evaluation samples, one array per model input
    samples/expected.npz    the fp32 reference's outputs for them, one array per model output
    report.json             the conversion report (also written next to the package as
                            NAME-VERSION.report.json, with NAME-VERSION.report.md)
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeserve import __version__
from edgeserve.manifest import Artifact, Manifest, SourceInfo, parse_manifest
from edgeserve.package import PackageWriter, atomic_write
from edgeserve.profiles import HardwareProfile
from edgeserve.selection import Family, family
from edgeserve.telemetry import ReferenceStats

from .context import BuildContext, BuiltArtifact
from .fallback import Blocked, Fallbacks, profile_verdicts, shipped
from .options import ConversionResult, ConvertOptions
from .preflight import PreflightIssue
from .progress import Progress
from .reference import reference_outputs
from .report import REPORT_SCHEMA, render_markdown

__all__ = ["assemble_report", "log_path", "member_path", "report_paths", "write_outputs"]

_EXTENSIONS = {"onnx": ".onnx", "tflite": ".tflite", "coreml": ".mlpackage"}
_TASKS = ("classification", "regression", "embedding", "detection", "other")


def report_paths(options: ConvertOptions, out: Path) -> tuple[Path, Path]:
    """``OUT/NAME-VERSION.report.json`` and ``.report.md``: one pair per version, so converting
    2.0.0 into the folder that holds 1.0.0 keeps 1.0.0's report."""
    stem = f"{options.name}-{options.version}"
    return out / f"{stem}.report.json", out / f"{stem}.report.md"


def log_path(options: ConvertOptions, out: Path) -> Path:
    """``OUT/NAME-VERSION.convert.log``: what third-party libraries printed while converting."""
    return out / f"{options.name}-{options.version}.convert.log"


def member_path(artifact: BuiltArtifact) -> str:
    return f"artifacts/{artifact.plan.id}{_EXTENSIONS[artifact.format]}"


def _clean(value: Any) -> Any:
    """JSON-safe: no NaN/inf, numpy scalars as Python numbers, floats rounded to 7 digits."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return None if not math.isfinite(value) else float(f"{value:.7g}")
    return value


def _artifact_entry(artifact: BuiltArtifact, reference_bytes: int) -> dict[str, Any]:
    size = artifact.size_bytes
    return {
        "id": artifact.plan.id, "format": artifact.format, "precision": artifact.precision,
        "quantization": artifact.quantization, "size_bytes": size,
        "size_ratio": round(size / reference_bytes, 4) if size and reference_bytes else None,
        "profiles": list(artifact.plan.profiles), "required_by": list(artifact.plan.required_by),
        "runtime": artifact.runtime,
        "path": member_path(artifact) if artifact.status != "failed" and size else None,
        "inputs": [t.model_dump(mode="json", exclude_defaults=True) for t in artifact.inputs]
        if artifact.inputs else None,
        "outputs": [t.model_dump(mode="json", exclude_defaults=True) for t in artifact.outputs]
        if artifact.outputs else None,
        "notes": artifact.notes, "error": artifact.error, "validation": artifact.validation,
        **({"batch": artifact.batch} if artifact.batch else {}),
    }


def _data_text(data: Any) -> str | None:
    return None if data is None else f"{data.source} ({len(data)} samples)"


def assemble_report(options: ConvertOptions, ctx: BuildContext, profiles: Sequence[HardwareProfile],
                    built: Sequence[BuiltArtifact], issues: Sequence[PreflightIssue],
                    blocked: Blocked, fallbacks: Fallbacks, elapsed_s: float) -> dict[str, Any]:
    verdicts = profile_verdicts(profiles, built, blocked, fallbacks)
    imported = ctx.imported
    notes = [*imported.notes, *ctx.notes, *(ctx.calibration.notes if ctx.calibration else []),
             *ctx.evaluation.notes]
    report = {
        "schema": REPORT_SCHEMA, "created": datetime.now(UTC).isoformat(),
        "converter": __version__, "elapsed_s": round(elapsed_s, 1),
        "ok": all(v["status"] != "failed" for v in verdicts.values()),
        "model": {"name": options.name, "version": options.version, "release": options.release,
                  "task": ctx.task,
                  "source": {"framework": imported.framework, "sha256": imported.sha256,
                             "filename": imported.filename,
                             "quantization": ctx.source_quantization},
                  "inputs": [t.model_dump(mode="json", exclude_defaults=True)
                             for t in ctx.signature.inputs],
                  "outputs": [t.model_dump(mode="json", exclude_defaults=True)
                              for t in ctx.signature.outputs]},
        "reference": {"size_bytes": ctx.reference_bytes,
                      "latency_ms_p50": ctx.reference_latency_ms},
        "data": {"calibration": _data_text(ctx.calibration),
                 "evaluation": _data_text(ctx.evaluation),
                 "random_calibration": bool(ctx.calibration is not None and
                                            ctx.calibration.source.startswith("random")),
                 "notes": notes},
        "preflight": [{"profile": i.profile, "target": i.target, "kind": i.kind,
                       "message": i.message, "fatal": i in blocked.fatal} for i in issues],
        "profiles": verdicts,
        "artifacts": [_artifact_entry(b, ctx.reference_bytes) for b in built],
    }
    cleaned: dict[str, Any] = _clean(report)
    return cleaned


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def _stats(ctx: BuildContext) -> ReferenceStats:
    data = ctx.calibration if ctx.calibration is not None else ctx.evaluation
    data = data.take(slice(0, 2000))
    outputs = reference_outputs(ctx, data)
    named = dict(zip(ctx.signature.output_names, outputs, strict=True))
    return ReferenceStats.from_arrays({k: data.stacked(k) for k in data.inputs}, named,
                                      ctx.signature.layouts(),
                                      ctx.classifier_names)


def _manifest(options: ConvertOptions, ctx: BuildContext, report: dict[str, Any],
              kept: Sequence[BuiltArtifact]) -> Manifest:
    entries = {a["id"]: a for a in report["artifacts"]}
    artifacts = [Artifact(
        id=a.plan.id, format=a.format, precision=a.precision,  # type: ignore[arg-type]
        quantization=a.quantization, path=member_path(a),  # type: ignore[arg-type]
        profiles=list(a.plan.profiles), runtime=a.runtime, inputs=a.inputs, outputs=a.outputs,
        validation=entries[a.plan.id]["validation"], batch=a.batch) for a in kept]
    task = ctx.task if ctx.task in _TASKS else "other"
    assert options.release is not None  # resolved by the checks before any work
    return parse_manifest(Manifest(
        name=options.name, version=options.version, release=options.release,
        description=options.description, task=task,  # type: ignore[arg-type]
        source=SourceInfo(framework=ctx.imported.framework, sha256=ctx.imported.sha256,
                          filename=ctx.imported.filename),
        inputs=ctx.signature.inputs, outputs=ctx.signature.outputs,
        preprocessing=dict(ctx.preprocessing),
        labels=list(options.labels) if options.labels else None, artifacts=artifacts,
        reference="reference/stats.json", samples="samples/inputs.npz", report="report.json",
        metadata={"expected_outputs": "samples/expected.npz", "converter": __version__},
    ).model_dump(by_alias=True))


def _with_siblings(kept: list[BuiltArtifact]) -> list[BuiltArtifact]:
    """``kept`` without batch-N variants whose batch-1 artifact is not kept (never chosen on
    their own, they would be dead weight in the package)."""
    def of(b: BuiltArtifact) -> Family:
        return family(b.format, b.precision, b.quantization, b.plan.key.io_dtype)

    singles = {of(b) for b in kept if b.batch is None}
    return [b for b in kept if b.batch is None or of(b) in singles]


def write_outputs(options: ConvertOptions, ctx: BuildContext, report: dict[str, Any],
                  built: Sequence[BuiltArtifact], out: Path, key: Ed25519PrivateKey,
                  progress: Progress) -> ConversionResult:
    out.mkdir(parents=True, exist_ok=True)
    kept = _with_siblings([b for b in built if shipped(b)])
    package, manifest = None, None
    if kept:
        with progress.step("sign and write the package"):
            writer = PackageWriter(_manifest(options, ctx, report, kept))
            for artifact in kept:
                assert artifact.path is not None
                writer.add_file(member_path(artifact), artifact.path)
            writer.add_file("reference/stats.json", _stats(ctx).to_json())
            writer.add_file("samples/inputs.npz", _npz(dict(ctx.samples.inputs)))
            writer.add_file("samples/expected.npz", _npz(dict(zip(
                ctx.signature.output_names, ctx.reference_samples, strict=True))))
            writer.add_file("report.json", json.dumps(report, indent=2).encode())
            package = out / f"{options.name}-{options.version}.edgepkg"
            manifest = writer.write(package, key)
        report = {**report, "package": {"path": str(package),
                                        "sha256": hashlib.sha256(package.read_bytes()).hexdigest()}}
    else:
        report = {**report, "ok": False, "package": None}
    if options.capture_output:
        report["log"] = str(log_path(options, out))
    report_json, report_md = report_paths(options, out)
    atomic_write(report_json, json.dumps(report, indent=2).encode())
    atomic_write(report_md, render_markdown(report).encode())
    return ConversionResult(report, package, report_json, report_md, manifest)
