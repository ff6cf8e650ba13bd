"""The conversion pipeline: source → canonical fp32 ONNX → per-profile artifacts → signed package.

:func:`convert` (and :class:`Converter`, which holds the options) is the Python API behind
``edgeserve convert``. Steps, in order, each with a progress bar:

0. every argument checked (:mod:`.checks`: name, version, release, profiles, key, data paths)
   before any work starts;
1. import the source to ONNX, fix ``input_shapes``, simplify (checked with ONNX Runtime) → the
   fp32 *reference*; read its signature;
2. load calibration and evaluation data (refusing int8 static builds without calibration data
   unless ``allow_random_calibration``), run the reference on them;
3. pre-flight checks per profile and target (ops and op domains, bytes, arena, rank, static
   shapes): a target that cannot be built is skipped when the profile declares a fallback for
   it; a profile left with nothing raises, or with ``keep_going`` is marked failed;
4. build each distinct artifact once, run it, judge it against each profile's budget; then the
   declared fallbacks of required artifacts that failed (:mod:`.fallback`);
5. write ``NAME-VERSION.report.json`` / ``.report.md`` and the signed ``NAME-VERSION.edgepkg``.

Third-party console output (TensorFlow, LiteRT, exporters) goes to ``convert.log`` in the work
folder and, once the outputs are written, to ``NAME-VERSION.convert.log`` next to them
(:mod:`.quiet`).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeserve.errors import ConfigError
from edgeserve.profiles import HardwareProfile

from .artifacts import (
    build_coreml_artifacts,
    build_onnx_artifact,
    build_tflite_artifacts,
    new_artifact,
)
from .checks import check_options
from .context import BuildContext, BuiltArtifact
from .fallback import Blocked, resolve_fallbacks
from .options import ConversionResult, ConvertOptions
from .packaging import assemble_report, log_path, write_outputs
from .plan import PlannedArtifact, plan_artifacts
from .preflight import PreflightIssue, fatal_issues, preflight, refusal
from .progress import Progress, Step
from .quiet import captured_output
from .reference import make_context

__all__ = ["ConversionResult", "Converter", "convert"]


@dataclass
class Converter(ConvertOptions):
    """The options of a conversion (:class:`~.options.ConvertOptions`); :meth:`run` converts one
    source with them."""

    def run(self, source: Any, out: Path | str,
            sign_key: Ed25519PrivateKey | Path | str) -> ConversionResult:
        """Convert ``source`` into ``out/NAME-VERSION.edgepkg`` + ``out/NAME-VERSION.report.*``.

        Every argument is checked first (:func:`~.checks.check_options`): a bad one raises
        :class:`~edgeserve.errors.ConfigError` before any work starts."""
        out = Path(out)
        checked = check_options(self, sign_key, out)
        resolved = dataclasses.replace(self, release=checked.release)
        with ExitStack() as stack:
            work = Path(self.work_dir or stack.enter_context(
                tempfile.TemporaryDirectory(prefix="edgeserve-convert-")))
            # the log stays in the work folder until the outputs are written: a conversion
            # refused in pre-flight leaves nothing in --out
            log = work / "convert.log" if self.capture_output else None
            with ExitStack() as quiet:
                console = quiet.enter_context(captured_output(log)) if log else None
                progress = quiet.enter_context(Progress(enabled=self.show_progress,
                                                        console=console))
                result = resolved._run(source, out, checked.key, checked.profiles, work,
                                       progress)
            if log is None:
                return result
            kept = shutil.copyfile(log, log_path(resolved, out))
            return dataclasses.replace(result, log=kept)

    def _run(self, source: Any, out: Path, key: Ed25519PrivateKey,
             profiles: list[HardwareProfile], work: Path, progress: Progress) -> ConversionResult:
        started = time.monotonic()
        plans = plan_artifacts(profiles, self.static_batch)
        with progress.step("import and reference"):
            ctx = make_context(self, source, work, plans)
        with progress.step("pre-flight checks") as step:
            issues = preflight(_load(ctx.reference_path), ctx.reference_bytes, profiles,
                               fixed_inputs=list(self.input_shapes))
            blocked = self._blocked(issues, profiles, step)
        built = self._build(ctx, plans, blocked, work, progress)
        extra, tried = resolve_fallbacks(
            profiles, built, blocked,
            lambda more: self._build(ctx, more, blocked, work, progress, "fallback "))
        built = [*built, *extra]
        report = assemble_report(self, ctx, profiles, built, issues, blocked, tried,
                                 time.monotonic() - started)
        return write_outputs(self, ctx, report, built, out, key, progress)

    def _blocked(self, issues: list[PreflightIssue], profiles: Sequence[HardwareProfile],
                 step: Step) -> Blocked:
        fatal = fatal_issues(issues, profiles)
        if fatal and not self.keep_going:
            first = fatal[0].error()
            first.message = refusal(fatal[0], profiles)
            others = [i.message for i in fatal[1:]]
            if others:
                first.message += f" (and {len(others)} more: {'; '.join(others)})"
            step.fail(f"{len(fatal)} problem(s)")
            raise first
        if issues:
            skipped = sorted({f"{i.profile}: {i.target}" for i in issues})
            step.warn(f"not built: {', '.join(skipped)}")
        return Blocked(issues, fatal)

    def _build(self, ctx: BuildContext, plans: Sequence[PlannedArtifact], blocked: Blocked,
               work: Path, progress: Progress, label: str = "") -> list[BuiltArtifact]:
        out_dir = work / "artifacts"
        out_dir.mkdir(parents=True, exist_ok=True)
        todo, skipped = [], []
        for plan in plans:
            if blocked.stops_plan(plan):
                reasons = "; ".join(dict.fromkeys(
                    m for p in plan.profiles for m in blocked.target(p, plan.key.target_key)))
                skipped.append(new_artifact(plan).fail(f"not built: pre-flight: {reasons}"))
                progress.note(f"{label}{plan.id} not built (pre-flight)")
            else:
                todo.append(plan)
        built: list[BuiltArtifact] = []
        groups = [(f"build + validate {p.id}", [p], "onnx") for p in todo if p.key.format == "onnx"]
        for fmt, title in (("tflite", "onnx2tf + validate"), ("coreml", "Core ML + checks")):
            mine = [p for p in todo if p.key.format == fmt]
            if mine:
                groups.append((f"{title} {', '.join(p.id for p in mine)}", mine, fmt))
        builders = {"onnx": lambda ps: [build_onnx_artifact(ctx, ps[0], out_dir)],
                    "tflite": lambda ps: build_tflite_artifacts(ctx, ps, out_dir),
                    "coreml": lambda ps: build_coreml_artifacts(ctx, ps, out_dir)}
        for title, group, fmt in groups:
            with progress.step(label + title) as step:
                made = builders[fmt](group)
                _mark(step, made)
            built.extend(made)
        order = {p.id: i for i, p in enumerate(plans)}
        return sorted([*built, *skipped], key=lambda b: order[b.plan.id])


def _mark(step: Step, made: Sequence[BuiltArtifact]) -> None:
    """✗ when every artifact of the step failed, ⚠ when some did."""
    failed = [b.plan.id for b in made if b.status == "failed"]
    if failed and len(failed) == len(made):
        step.fail("failed")
    elif failed:
        step.warn(f"failed: {', '.join(failed)}")


def _load(path: Path) -> Any:
    import onnx

    return onnx.load(str(path))


def convert(source: Any, *, out: Path | str, sign_key: Ed25519PrivateKey | Path | str,
            profiles: Sequence[str | HardwareProfile], name: str, version: str,
            **options: Any) -> ConversionResult:
    """Convert ``source`` for ``profiles`` into a signed package; see :class:`Converter`.

    ``source`` is a ``torch.nn.Module`` (with ``example_inputs=``), a scikit-learn estimator, or
    a path (.onnx, .pt/.pth TorchScript, .pt2, .keras, SavedModel folder, .pkl/.joblib).
    Raises :class:`~edgeserve.errors.ConfigError` for bad arguments (before any work) and
    :class:`~edgeserve.errors.ConversionError` subclasses for pre-flight failures; otherwise
    returns the result (check ``result.ok`` and ``result.unserved``).
    """
    unknown = set(options) - set(Converter.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown conversion option(s) {sorted(unknown)}")
    converter = Converter(profiles=profiles, name=name, version=version, **options)
    return converter.run(source, out, sign_key)
