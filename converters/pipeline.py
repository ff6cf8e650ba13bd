"""The conversion pipeline: source → canonical fp32 ONNX → per-profile artifacts → signed package.

:func:`convert` (and :class:`Converter`, which holds the options) is the Python API behind
``edgeserve convert``. Steps, in order, each with a progress bar:

1. import the source to ONNX, fix ``input_shapes``, simplify (checked with ONNX Runtime) → the
   fp32 *reference*; read its signature;
2. load calibration and evaluation data (refusing int8 static builds without calibration data
   unless ``allow_random_calibration``), run the reference on them;
3. pre-flight checks per profile (ops, bytes, arena, rank, static shapes) — raise, or with
   ``keep_going`` mark the profile failed and go on;
4. build each distinct artifact once, run it, judge it against each profile's budget;
5. write ``report.json`` / ``report.md`` and the signed ``NAME-VERSION.edgepkg``.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeserve.errors import ConfigError, ConversionError
from edgeserve.profiles import HardwareProfile

from .artifacts import (
    build_coreml_artifacts,
    build_onnx_artifact,
    build_tflite_artifacts,
    new_artifact,
)
from .context import BuiltArtifact
from .options import ConversionResult, ConvertOptions
from .packaging import assemble_report, write_outputs
from .plan import PlannedArtifact, plan_artifacts
from .preflight import PreflightIssue, preflight
from .progress import Progress
from .reference import make_context

__all__ = ["ConversionResult", "Converter", "convert"]


@dataclass
class Converter(ConvertOptions):
    """The options of a conversion (:class:`~.options.ConvertOptions`); :meth:`run` converts one
    source with them."""

    def run(self, source: Any, out: Path | str,
            sign_key: Ed25519PrivateKey | Path | str) -> ConversionResult:
        """Convert ``source`` into ``out/NAME-VERSION.edgepkg`` + ``out/report.{json,md}``."""
        key = _private_key(sign_key)
        profiles = self.load_profiles()
        out = Path(out)
        with ExitStack() as stack:
            work = self.work_dir or Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="edgeserve-convert-")))
            progress = stack.enter_context(Progress(enabled=self.show_progress))
            return self._run(source, out, key, profiles, Path(work), progress)

    def _run(self, source: Any, out: Path, key: Ed25519PrivateKey,
             profiles: list[HardwareProfile], work: Path, progress: Progress) -> ConversionResult:
        started = time.monotonic()
        plans = plan_artifacts(profiles)
        with progress.step("import and reference"):
            ctx = make_context(self, source, work, plans)
        with progress.step("pre-flight checks"):
            issues = preflight(_load(ctx.reference_path), ctx.reference_bytes, profiles,
                               fixed_inputs=list(self.input_shapes))
        blocked = self._blocked_profiles(issues)
        built = self._build_all(ctx, plans, blocked, work, progress)
        report = assemble_report(self, ctx, profiles, built, issues,
                                 time.monotonic() - started)
        return write_outputs(self, ctx, report, built, out, key, progress)

    def _blocked_profiles(self, issues: list[PreflightIssue]) -> dict[str, list[str]]:
        if issues and not self.keep_going:
            first = issues[0].error()
            others = [i.message for i in issues[1:]]
            if others:
                first.message += f" (and {len(others)} more: {'; '.join(others)})"
            raise first
        blocked: dict[str, list[str]] = {}
        for issue in issues:
            blocked.setdefault(issue.profile, []).append(issue.message)
        return blocked

    def _build_all(self, ctx: Any, plans: list[PlannedArtifact], blocked: dict[str, list[str]],
                   work: Path, progress: Progress) -> list[BuiltArtifact]:
        out_dir = work / "artifacts"
        out_dir.mkdir(parents=True, exist_ok=True)
        todo, skipped = [], []
        for plan in plans:
            if all(p in blocked for p in plan.profiles):
                reasons = "; ".join(m for p in plan.profiles for m in blocked[p])
                skipped.append(new_artifact(plan).fail(f"not built: pre-flight failed: {reasons}"))
            else:
                todo.append(plan)
        built: list[BuiltArtifact] = []
        for plan in [p for p in todo if p.key.format == "onnx"]:
            with progress.step(f"build + validate {plan.id}"):
                built.append(build_onnx_artifact(ctx, plan, out_dir))
        tflite = [p for p in todo if p.key.format == "tflite"]
        if tflite:
            with progress.step(f"onnx2tf + validate {', '.join(p.id for p in tflite)}"):
                built.extend(build_tflite_artifacts(ctx, tflite, out_dir))
        coreml = [p for p in todo if p.key.format == "coreml"]
        if coreml:
            with progress.step(f"Core ML + checks {', '.join(p.id for p in coreml)}"):
                built.extend(build_coreml_artifacts(ctx, coreml, out_dir))
        order = {p.id: i for i, p in enumerate(plans)}
        return sorted([*built, *skipped], key=lambda b: order[b.plan.id])


def _load(path: Path) -> Any:
    import onnx

    return onnx.load(str(path))


def _private_key(key: Ed25519PrivateKey | Path | str) -> Ed25519PrivateKey:
    if isinstance(key, Ed25519PrivateKey):
        return key
    from edgeserve.signing import load_private_key

    return load_private_key(Path(key))


def convert(source: Any, *, out: Path | str, sign_key: Ed25519PrivateKey | Path | str,
            profiles: Sequence[str | HardwareProfile], name: str, version: str,
            **options: Any) -> ConversionResult:
    """Convert ``source`` for ``profiles`` into a signed package; see :class:`Converter`.

    ``source`` is a ``torch.nn.Module`` (with ``example_inputs=``), a scikit-learn estimator, or
    a path (.onnx, .pt/.pth TorchScript, .pt2, .keras, SavedModel folder, .pkl/.joblib).
    Raises :class:`~edgeserve.errors.ConversionError` subclasses for pre-flight failures and
    when no artifact could be built; otherwise returns the result (check ``result.ok``).
    """
    unknown = set(options) - set(Converter.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown conversion option(s) {sorted(unknown)}")
    converter = Converter(profiles=profiles, name=name, version=version, **options)
    if not converter.name:
        raise ConversionError("a package name is needed")
    return converter.run(source, out, sign_key)
