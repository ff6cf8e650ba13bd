"""Build and validate the planned artifacts of each format against the fp32 reference.

Every artifact is *run* on the evaluation data (ONNX Runtime, LiteRT) and judged with the budgets
of the profiles it serves; a static int8 ONNX artifact that fails is analysed layer by layer and
rebuilt once with its worst layers kept in float. Core ML artifacts are run on macOS; elsewhere
they get the structural and weight checks and the status ``not-executed``.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Generator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeserve.errors import ConversionError

from .context import BuildContext, BuiltArtifact
from .onnx_build import COMPUTE_OPS, build_onnx, opset_of, worst_layers
from .plan import PlannedArtifact
from .preflight import FLEX_FROM
from .runners import LiteRtRunner, OrtRunner, Runner, measure_latency, run_dataset
from .validate import compare_outputs, gated_by, judge

__all__ = ["build_coreml_artifacts", "build_onnx_artifact", "build_tflite_artifacts", "new_artifact"]


def new_artifact(plan: PlannedArtifact) -> BuiltArtifact:
    key = plan.key
    return BuiltArtifact(plan, key.format, key.precision, key.quantization)


def _validate(ctx: BuildContext, built: BuiltArtifact, runner: Runner) -> BuiltArtifact:
    outputs = run_dataset(runner, ctx.evaluation.inputs, ctx.signature)
    metrics = compare_outputs(ctx.reference_eval, outputs, ctx.classifier_indices,
                              ctx.evaluation.labels, ctx.signature.output_names,
                              ctx.probability_indices)
    samples = run_dataset(runner, ctx.samples.inputs, ctx.signature)
    sample_error = compare_outputs(ctx.reference_samples, samples).get("max_abs_error")
    latency = measure_latency(runner, ctx.evaluation.sample(0))
    status, reasons, per_profile = judge(metrics, built.plan.budgets)
    budgets = list(built.plan.budgets.values())
    size = built.size_bytes
    built.validation = {
        "status": status, **metrics, "sample_max_abs_error": sample_error,
        "latency_ms_p50": round(latency, 4),
        "latency_ratio": round(latency / ctx.reference_latency_ms, 3)
        if ctx.reference_latency_ms else None,
        "size_ratio": round(size / ctx.reference_bytes, 4) if ctx.reference_bytes else None,
        "executed_with": built.runtime.get("name"), "reasons": reasons, "profiles": per_profile,
        "gated_by": gated_by(metrics, budgets[0] if budgets else None),
    }
    return built


def build_onnx_artifact(ctx: BuildContext, plan: PlannedArtifact, out_dir: Path) -> BuiltArtifact:
    built = new_artifact(plan)
    built.path = out_dir / f"{plan.id}.onnx"
    int8 = built.precision == "int8"
    if ctx.source_quantization_format == "QOperator" and int8:
        return built.fail(f"the source is already int8 ({ctx.source_quantization}): quantizing "
                          "it again is refused; its ONNX fp32 artifact is that int8 graph")
    try:
        if ctx.source_int8_path is not None and int8 and plan.key.quantization == "static":
            shutil.copyfile(ctx.source_int8_path, built.path)
            built.notes = [f"the source's own quantization ({ctx.source_quantization}), not "
                           "quantized again"]
        else:
            built.notes = build_onnx(ctx.reference_path, built.path, built.precision,
                                     built.quantization, ctx.calibration)
            if ctx.source_quantization_format == "QOperator":
                built.notes.append(f"the source's own int8 graph ({ctx.source_quantization}), "
                                   "as given")
        built.runtime = {"name": "onnxruntime", "opset": opset_of(built.path)}
        _validate(ctx, built, OrtRunner(built.path))
    except ConversionError as exc:
        return built.fail(str(exc))
    except Exception as exc:
        return built.fail(f"ONNX {plan.id} build failed: {type(exc).__name__}: {str(exc)[:400]}")
    if built.status == "failed" and plan.key.quantization == "static" and ctx.calibration \
            and ctx.source_int8_path is None:
        return _retry_static(ctx, built)
    return built


_STATUS_RANK = {"failed": 0, "warned": 1, "passed": 2}
# Builds a failing static int8 artifact may cost before the best one so far is kept: each is one
# quantize_static plus one validation run (ppocr-rec: ~15 s on two cores).
SEARCH_BUILDS = 10


def quality(validation: Mapping[str, Any]) -> tuple[int, float]:
    """Order candidates: status first, then the worst of the agreement figures (higher wins)."""
    figures = [float(validation[k]) for k in ("cosine_similarity", "top1_agreement",
                                              "decision_agreement", "exact_match")
               if validation.get(k) is not None]
    if validation.get("range_error") is not None:
        figures.append(1.0 - float(validation["range_error"]))
    return _STATUS_RANK.get(str(validation.get("status")), 0), min(figures, default=0.0)


def float_counts(ranked: int, builds: int = SEARCH_BUILDS) -> Generator[int, bool, None]:
    """Counts of noisiest tensors to keep in float, for a search that reports back: triples (1, 3,
    9, ...) until a count passes, then bisects between the last failing and the first passing
    count. Use with ``send(passed)``; ends after ``builds`` counts."""
    low, high, count = 0, None, 1
    for _ in range(builds):
        count = min(count, ranked)
        passed = yield count
        if passed:
            high = count
        else:
            low = count
        if high is None:
            if count >= ranked:
                return
            count *= 3
        else:
            if high - low <= 1:
                return
            count = (low + high) // 2


class _Search:
    """Static int8 rebuilds of one failing artifact, each validated; remembers the best."""

    def __init__(self, ctx: BuildContext, built: BuiltArtifact) -> None:
        self.ctx, self.built, self.best = ctx, built, built
        self.log: list[dict[str, Any]] = []

    def attempt(self, label: str, **options: Any) -> BuiltArtifact | None:
        built, ctx = self.built, self.ctx
        assert built.path is not None and ctx.calibration is not None
        path = built.path.with_name(f"{built.plan.id}.try{len(self.log)}.onnx")
        try:
            notes = build_onnx(ctx.reference_path, path, built.precision, built.quantization,
                               ctx.calibration, **options)
            candidate = new_artifact(built.plan)
            candidate.path, candidate.runtime, candidate.notes = path, dict(built.runtime), notes
            _validate(ctx, candidate, OrtRunner(path))
        except Exception as exc:
            self.log.append({"attempt": label, "status": "error", "error": str(exc)[:200]})
            path.unlink(missing_ok=True)
            return None
        candidate.validation["retry"] = label
        self.log.append({"attempt": label, "status": candidate.status,
                         "quality": round(quality(candidate.validation)[1], 4)})
        if quality(candidate.validation) > quality(self.best.validation):
            self.best = candidate
        return candidate


def _retry_static(ctx: BuildContext, built: BuiltArtifact) -> BuiltArtifact:
    """Keep the fewest tensors in float that meets the budget (sensitivity-guided mixed
    precision).

    Cheap whole-graph choices first, each kept only when it does better: percentile instead of
    min/max calibration (it clips outliers such as an LSTM's state), then only the compute ops
    (Conv, MatMul, Gemm) quantized, which keeps every weight int8 and leaves element-wise chains
    (a tanh GELU's cube, a hand-written softmax) in float. Still failing, every quantized tensor
    is ranked by its own quantization noise (:func:`~.onnx_build.worst_layers`) and
    :func:`float_counts` searches how many of the noisiest to leave in float (their producers
    and consumers are excluded from quantization). The passing build with the fewest float
    tensors is kept, else the best; the validation keeps the first attempt's figures and every
    attempt's.
    """
    assert built.path is not None and ctx.calibration is not None
    first = {k: built.validation.get(k) for k in ("status", "cosine_similarity", "top1_agreement",
                                                  "decision_agreement", "range_error",
                                                  "max_abs_error", "reasons")}
    search = _Search(ctx, built)
    base: dict[str, Any] = {}
    prefix = ""
    percentile = search.attempt("percentile calibration", calibrate="percentile")
    if percentile is not None and search.best is percentile:
        base["calibrate"], prefix = "percentile", "percentile calibration, "
    if search.best.status == "failed":
        compute = search.attempt(f"{prefix}compute ops only", op_types=COMPUTE_OPS, **base)
        if compute is not None and search.best is compute:
            base["op_types"], prefix = COMPUTE_OPS, f"{prefix}compute ops only, "
    ranked: list[dict[str, Any]] = []
    passing: BuiltArtifact | None = None
    if search.best.status == "failed":
        try:
            ranked = worst_layers(ctx.reference_path, built.path, ctx.calibration,
                                  built.path.parent, count=10_000)
        except Exception as exc:
            built.notes.append(f"per-layer analysis failed: {type(exc).__name__}: "
                               f"{str(exc)[:200]}")
        counts = float_counts(len(ranked), SEARCH_BUILDS - len(search.log))
        count = next(counts, None) if ranked else None
        while count is not None:
            nodes = _around(ranked[:count])
            candidate = search.attempt(f"{prefix}{count} of {len(ranked)} noisiest tensors in "
                                       f"float ({len(nodes)} nodes)", exclude=nodes, **base)
            ok = candidate is not None and candidate.status != "failed"
            passing = candidate if ok else passing  # later passes keep fewer tensors in float
            count = _send(counts, ok)
    result = passing if passing is not None else search.best
    result.validation.update(worst_layers=ranked[:3], search=search.log)
    if result is not built:
        assert result.path is not None
        result.validation["first_attempt"] = first
        result.path.replace(built.path)
        result.path = built.path
    for leftover in built.path.parent.glob(f"{built.plan.id}.try*.onnx"):
        leftover.unlink(missing_ok=True)
    return result


def _around(tensors: Sequence[Mapping[str, Any]]) -> list[str]:
    """The nodes that would quantize these tensors: producers and consumers."""
    return list(dict.fromkeys(n for t in tensors for n in [t["node"], *t.get("consumers", [])]))


def _send(counts: Generator[int, bool, None], passed: bool) -> int | None:
    try:
        return counts.send(passed)
    except StopIteration:
        return None


def _static_graph(ctx: BuildContext) -> Path:
    import onnx

    from .graph import prepare_static

    if ctx.static_path is None:
        model = onnx.load(str(ctx.reference_path))
        data = ctx.calibration if ctx.calibration else ctx.evaluation
        prepared = prepare_static(model, ctx.input_shapes, data.sample(0))
        ctx.static_path = ctx.work / "static.onnx"
        onnx.save(prepared, str(ctx.static_path))
    return ctx.static_path


def _batched_static_graph(ctx: BuildContext, size: int) -> Path:
    """The static graph with its batch fixed at ``size`` (a batch-N variant), built once;
    :class:`ConversionError` when the reference does not compute each sample alone."""
    import onnx

    from .graph import prepare_static
    from .reference import batched_graph

    path = ctx.batched_static_paths.get(size)
    if path is None:
        # a batch given as 1 (--input-shape x=1x3x224x224, often written only to fix the other
        # axes) is freed for the variant like any batch fixed at 1; another size stays
        shapes = {k: [None, *v[1:]] if v and v[0] == 1 else list(v)
                  for k, v in ctx.input_shapes.items()}
        keep = [k for k, v in shapes.items() if v and v[0] is not None]
        try:
            model, stacked = batched_graph(onnx.load(str(ctx.reference_path)), ctx.evaluation,
                                           size, keep)
        except ConversionError as exc:
            raise ConversionError(f"no batch-{size} variant: {exc}") from None
        prepared = prepare_static(model, shapes, stacked, batch=size)
        path = ctx.work / f"static-b{size}.onnx"
        onnx.save(prepared, str(path))
        ctx.batched_static_paths[size] = path
    return path


def build_tflite_artifacts(ctx: BuildContext, plans: Sequence[PlannedArtifact],
                           out_dir: Path) -> list[BuiltArtifact]:
    """One onnx2tf run per I/O dtype and batch for all TFLite plans, then each variant
    validated."""
    from .tflite_build import build_tflite, variant_of

    built = {p.id: new_artifact(p) for p in plans}
    groups: dict[tuple[int, str], list[PlannedArtifact]] = {}
    for plan in plans:
        io = plan.key.io_dtype if plan.key.quantization == "full-integer" else "int8"
        groups.setdefault((plan.key.batch, io), []).append(plan)
    # batch 1 first: a batch-N variant is built only beside its batch-1 artifact
    for (batch, io_dtype), group in sorted(groups.items()):
        wanted = {}
        for plan in group:
            try:
                wanted[plan.id] = variant_of(plan.key.precision, plan.key.quantization)
            except ConversionError as exc:
                built[plan.id].fail(str(exc))
        if not wanted:
            continue
        try:
            static = _static_graph(ctx) if batch == 1 else _batched_static_graph(ctx, batch)
            result = build_tflite(static, ctx.work / f"tflite-{io_dtype}-b{batch}",
                                  ctx.signature.inputs, ctx.signature.outputs,
                                  set(wanted.values()), io_dtype, ctx.calibration, batch=batch)
        except ConversionError as exc:
            for artifact_id in wanted:
                built[artifact_id].fail(str(exc))
            continue
        except Exception as exc:
            if batch == 1:
                raise
            # a variant is never required: whatever breaks it leaves the conversion standing
            for artifact_id in wanted:
                built[artifact_id].fail(f"no batch-{batch} variant: {type(exc).__name__}: "
                                        f"{str(exc)[:300]}")
            continue
        if batch == 1:
            _apply_output_layouts(ctx, result.model_output_layouts)
        for artifact_id, variant in wanted.items():
            _finish_tflite(ctx, built[artifact_id], result, variant, out_dir)
    return list(built.values())


def _apply_output_layouts(ctx: BuildContext, layouts: dict[str, str]) -> None:
    """Give model outputs a layout name where an artifact stores them transposed."""
    if not layouts:
        return
    outputs = [t.model_copy(update={"layout": layouts[t.name]}) if t.name in layouts and not t.layout
               else t for t in ctx.signature.outputs]
    ctx.signature = type(ctx.signature)(ctx.signature.inputs, outputs)


def _finish_tflite(ctx: BuildContext, built: BuiltArtifact, result: Any, variant: str,
                   out_dir: Path) -> None:
    from .tflite_build import select_tf_ops

    source = result.files.get(variant)
    if source is None:
        built.fail(f"onnx2tf wrote no {variant} file: {result.log_tail[-600:]}")
        return
    flex = select_tf_ops(Path(source))
    if flex:
        behind = sorted({FLEX_FROM[f] for f in flex if f in FLEX_FROM})
        built.fail(f"{built.plan.id} needs Select TF ops ({', '.join(flex)}), which LiteRT's "
                   "builtin kernels cannot run" + (f"; they come from ONNX op(s) "
                                                   f"{', '.join(behind)}" if behind else "")
                   + ": never shipped for a LiteRT profile")
        return
    built.path = out_dir / f"{built.plan.id}.tflite"
    built.path.write_bytes(Path(source).read_bytes())
    built.runtime = {"name": "litert"}
    built.inputs, built.outputs = result.inputs[variant], result.outputs[variant]
    try:
        runner = LiteRtRunner(built.path, ctx.signature.inputs, ctx.signature.outputs,
                              built.inputs, built.outputs, batch=built.batch or 1)
        _validate(ctx, built, runner)
    except Exception as exc:
        built.fail(f"LiteRT could not run {built.plan.id}: {type(exc).__name__}: {str(exc)[:300]}")
    if built.batch:
        built.validation["batch"] = built.batch
        built.notes.append(f"batch-{built.batch} variant: validated {built.batch} samples per "
                           "call, a partial batch padded; latency_ms_p50 is one call of "
                           f"{built.batch} samples")
    if built.inputs == ctx.signature.inputs and built.outputs == ctx.signature.outputs:
        built.inputs = built.outputs = None


def _torch_module(ctx: BuildContext) -> tuple[Any, tuple[Any, ...]]:
    """The module to trace (the source's, else the static ONNX graph as torch) and batch-1 inputs."""
    import torch

    examples = tuple(torch.from_numpy(np.ascontiguousarray(v[:1]))
                     for v in ctx.evaluation.inputs.values())
    if ctx.imported.torch_module is not None:
        return ctx.imported.torch_module, examples
    import onnx

    from .onnx_torch import OnnxModule

    return OnnxModule(onnx.load(str(_static_graph(ctx)))), examples


def _reference_weights(ctx: BuildContext) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    weights = {}
    for init in onnx.load(str(_static_graph(ctx))).graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype.kind == "f" and array.size >= 16:
            weights[init.name] = array
    return weights


def build_coreml_artifacts(ctx: BuildContext, plans: Sequence[PlannedArtifact],
                           out_dir: Path) -> list[BuiltArtifact]:
    from .coreml_build import build_coreml, check_coreml, on_macos

    built = {p.id: new_artifact(p) for p in plans}
    try:
        module, examples = _torch_module(ctx)
    except Exception as exc:
        message = (f"cannot reach Core ML from this {ctx.imported.framework} source: "
                   f"{type(exc).__name__}: {str(exc)[:300]}")
        return [b.fail(message) for b in built.values()]
    targets = {p.id: (p.key.quantization, p.key.deployment_target or "iOS17") for p in plans}
    paths, errors, notes = build_coreml(module, examples, ctx.signature.inputs,
                                        ctx.signature.outputs, targets, out_dir)
    weights = _reference_weights(ctx)
    for artifact_id, artifact in built.items():
        artifact.notes = list(notes)
        if artifact_id in errors:
            artifact.fail(errors[artifact_id])
            continue
        artifact.path = paths[artifact_id]
        artifact.runtime = {"name": "coreml",
                            "minimum_deployment_target": targets[artifact_id][1]}
        _check_coreml_artifact(ctx, artifact, weights, check_coreml, on_macos())
    return list(built.values())


def _check_coreml_artifact(ctx: BuildContext, artifact: BuiltArtifact,
                           weights: dict[str, np.ndarray], check: Any, macos: bool) -> None:
    assert artifact.path is not None
    try:
        checks = check(artifact.path, ctx.signature.inputs, ctx.signature.outputs, weights,
                       artifact.quantization)
    except Exception as exc:
        artifact.fail(f"Core ML package could not be read back: {type(exc).__name__}: {exc}")
        return
    size = artifact.size_bytes
    base = {"checks": checks,
            "size_ratio": round(size / ctx.reference_bytes, 4) if ctx.reference_bytes else None}
    if checks["problems"]:
        artifact.validation = {**base, "status": "failed", "reasons": checks["problems"]}
        return
    if macos:
        with contextlib.suppress(Exception):
            _validate(ctx, artifact, _CoreMlRunner(artifact.path))
            artifact.validation.update(base)
            return
    artifact.validation = {**base, "status": "not-executed",
                           "reasons": ["not executed (needs macOS): structure and "
                                       f"{checks['weights_matched']}/{checks['weights_checked']} "
                                       "weights checked against the reference"]}


class _CoreMlRunner:
    """Core ML prediction (macOS only), batch one."""

    batch_one = True
    max_batch = 1

    def __init__(self, path: Path) -> None:
        import coremltools as ct

        self._model = ct.models.MLModel(str(path))
        self._outputs = [o.name for o in self._model.get_spec().description.output]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:  # pragma: no cover - macOS
        result = self._model.predict({k: v.astype(np.float32) for k, v in feeds.items()})
        return [np.asarray(result[name]) for name in self._outputs]
