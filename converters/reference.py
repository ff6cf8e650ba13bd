"""Step 1–2 of a conversion: the canonical fp32 ONNX reference, its data and its outputs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeserve.errors import ConfigError, ConversionError

from .context import BuildContext
from .data import Dataset, load_dataset, random_dataset
from .graph import fix_input_shapes, fold, freeze_inputs
from .options import ConvertOptions
from .plan import PlannedArtifact
from .runners import OrtRunner, measure_latency, run_dataset
from .signature import ModelSignature, detect_task, read_signature
from .sources import import_model

__all__ = ["SAMPLE_COUNT", "make_context", "needs_calibration", "reference_outputs"]

SAMPLE_COUNT = 8


def needs_calibration(plans: Sequence[PlannedArtifact]) -> list[str]:
    """Ids of planned artifacts whose int8 activation ranges come from calibration data."""
    return [p.id for p in plans if p.key.quantization in ("static", "full-integer")]


def _data(options: ConvertOptions, signature: ModelSignature,
          plans: Sequence[PlannedArtifact]) -> tuple[Dataset | None, Dataset]:
    prep = dict(options.preprocessing)
    calibration = None if options.calibration is None else \
        load_dataset(options.calibration, signature.inputs, prep)
    evaluation = None if options.evaluation is None else \
        load_dataset(options.evaluation, signature.inputs, prep)
    if calibration is None and needs_calibration(plans):
        if not options.allow_random_calibration:
            raise ConversionError(
                f"{', '.join(needs_calibration(plans))} need calibration data (int8 activation "
                "ranges): pass --calibration DATA.npz (one array per input, keyed by name) or a "
                "folder of images. Random calibration silently ruins int8 accuracy; to accept "
                "that anyway pass --allow-random-calibration (the report will say so)")
        calibration = random_dataset(signature.inputs, 64, seed=1)
    if evaluation is None:
        if calibration is not None and options.calibration is not None:
            calibration, evaluation = calibration.split_holdout()
            evaluation.notes.append("no --eval given: the last fifth of the calibration data "
                                    "was held out for evaluation")
        else:
            evaluation = random_dataset(signature.inputs, 32, seed=2)
            evaluation.notes.append("no evaluation data: validated on random inputs")
    if len(evaluation) > options.max_eval_samples:
        evaluation = evaluation.take(slice(0, options.max_eval_samples))
    return calibration, evaluation


def _shapes(options: ConvertOptions) -> dict[str, list[int]]:
    return {k: [int(d) for d in v] for k, v in options.input_shapes.items()}


def make_context(options: ConvertOptions, source: Any, work: Path,
                 plans: Sequence[PlannedArtifact]) -> BuildContext:
    """Import, fix shapes, load data, simplify (checked), run the reference on the data."""
    import onnx

    work.mkdir(parents=True, exist_ok=True)
    imported = import_model(source, work, example_inputs=options.example_inputs,
                            input_names=options.input_names, output_names=options.output_names,
                            input_shapes=options.input_shapes)
    shapes = _shapes(options)
    model = imported.model
    if options.constant_inputs:
        model = freeze_inputs(model, options.constant_inputs)
    model = fix_input_shapes(model, shapes) if shapes else onnx.shape_inference.infer_shapes(model)
    signature = read_signature(model, options.layouts)
    calibration, evaluation = _data(options, signature, plans)
    model = fold(model, evaluation.take(slice(0, 1)).inputs)  # batch 1 fits every model
    reference_path = work / "reference.onnx"
    onnx.save(model, str(reference_path))
    signature = read_signature(model, options.layouts)
    try:
        runner = OrtRunner(reference_path)
        reference_eval = run_dataset(runner, evaluation.inputs, signature)
    except ConversionError:
        raise
    except Exception as exc:
        raise ConversionError(f"the fp32 reference does not run on the evaluation data: "
                              f"{type(exc).__name__}: {str(exc)[:400]}") from None
    labels = list(options.labels) if options.labels else None
    task = options.task or detect_task(model, signature, labels)
    if labels and len(labels) < 2:
        raise ConfigError("labels: give at least two class names")
    samples = evaluation.take(slice(0, SAMPLE_COUNT))
    return BuildContext(
        work=work, imported=imported, reference_path=reference_path, signature=signature,
        task=task, calibration=calibration, evaluation=evaluation, reference_eval=reference_eval,
        samples=samples, reference_samples=[o[:len(samples)] for o in reference_eval],
        input_shapes=shapes, reference_latency_ms=measure_latency(runner, evaluation.sample(0)),
        reference_bytes=reference_path.stat().st_size)


def reference_outputs(ctx: BuildContext, data: Dataset) -> list[np.ndarray]:
    """The fp32 reference's outputs for ``data``."""
    return run_dataset(OrtRunner(ctx.reference_path), data.inputs, ctx.signature)
