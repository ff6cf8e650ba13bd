"""Step 1–2 of a conversion: the canonical fp32 ONNX reference, its data and its outputs.

Besides importing and simplifying, this is where the reference gets what people read: exporter
symbols renamed (``batch`` for the batch axis, ``output_0`` for ``Identity:0``), a dynamic batch
kept only when ONNX Runtime runs the graph at batch 2 (else fixed at 1, said in the report), the
task detected from the reference's actual outputs and the labels, and image preprocessing
completed from the input's shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeserve.errors import ConversionError
from edgeserve.manifest import ImagePreprocessing

from .context import BuildContext
from .data import Dataset, load_dataset, random_dataset
from .dequantize import SourceQuantization, dequantize, quantization_of
from .graph import fix_input_shapes, fold, free_batch, freeze_inputs, readable_names, run_onnx
from .options import ConvertOptions
from .plan import PlannedArtifact
from .preprocess import resolve_preprocessing
from .runners import OrtRunner, measure_latency, run_dataset
from .signature import ModelSignature, class_score_outputs, detect_task, read_signature
from .sources import import_model

__all__ = ["SAMPLE_COUNT", "make_context", "needs_calibration", "reference_outputs"]

SAMPLE_COUNT = 8


def needs_calibration(plans: Sequence[PlannedArtifact]) -> list[str]:
    """Ids of planned artifacts whose int8 activation ranges come from calibration data."""
    return [p.id for p in plans if p.key.quantization in ("static", "full-integer")]


def _data(options: ConvertOptions, signature: ModelSignature, plans: Sequence[PlannedArtifact],
          prep: Mapping[str, ImagePreprocessing]) -> tuple[Dataset | None, Dataset]:
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


def _shapes(options: ConvertOptions) -> dict[str, list[int | None]]:
    return {k: [None if d is None else int(d) for d in v] for k, v in options.input_shapes.items()}


def _has_dynamic_batch(model: Any) -> bool:
    """Whether some input's first axis is dynamic (what a batch-2 check can exercise)."""
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            return True
    return False


def _batch_two(model: Any, evaluation: Dataset) -> str | None:
    """Run ``model`` on two samples stacked on the batch axis; why it cannot, or None."""
    feeds = {k: np.concatenate([v[:1], v[:1]]) if len(v) < 2 else v[:2]
             for k, v in evaluation.inputs.items()}
    try:
        outputs = run_onnx(model, feeds)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    # outputs whose first axis is a fixed size other than 1 have no batch axis to check
    fixed = [d[0].dim_value if d and d[0].HasField("dim_value") else None
             for d in (o.type.tensor_type.shape.dim for o in model.graph.output)]
    wrong = [o.shape for o, size in zip(outputs, fixed, strict=True)
             if o.ndim and size in (None, 1) and o.shape[0] != 2]
    return f"output shapes {wrong} at batch 2" if wrong else None


def _keep_batch(model: Any, evaluation: Dataset, notes: list[str]) -> Any:
    """Keep a dynamic batch axis only when ONNX Runtime runs the graph at batch 2; else fix it
    at 1 and say so (an exporter can bake the example's batch into a Reshape)."""
    if not _has_dynamic_batch(model) or any(a != 0 for a in evaluation.axes.values()):
        return model  # (data as whole feeds or on another axis: the check stacks on axis 0)
    problem = _batch_two(model, evaluation)
    if problem is None:
        return model
    notes.append(f"the graph does not run at batch 2 ({problem}): batch fixed at 1, so each "
                 "request carries one sample")
    return fix_input_shapes(model, {}, batch=1)


def _stacked(feeds: Mapping[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    return {k: np.concatenate([v[i % len(v)][None] for i in range(count)])
            for k, v in feeds.items()}


def _free_batch(model: Any, evaluation: Dataset, keep: Sequence[str], notes: list[str]) -> Any:
    """Make a batch fixed at 1 dynamic (``dynamic_batch``) when ONNX Runtime computes the same
    per sample stacked as one at a time: at batch 2 and 3, every output equal (to float
    round-off) to the single-sample runs. Else keep it at 1 and say why."""
    if any(a != 0 for a in evaluation.axes.values()):
        notes.append("--dynamic-batch: the data are whole feeds, not samples on the batch "
                     "axis, so the batch stays as the model has it")
        return model
    trial, freed = free_batch(model, keep)
    if not freed:
        return model
    problem = per_sample_problem(trial, model, evaluation, (2, 3))
    if problem is not None:
        notes.append(f"--dynamic-batch: the batch of {freed} stays fixed at 1: {problem}")
        return model
    notes.append(f"--dynamic-batch: the batch of {freed} was fixed at 1 and is now dynamic "
                 "(ONNX Runtime gave each sample's own outputs at batch 2 and 3): requests may "
                 "carry several samples, and the agent can batch them (static routes keep 1)")
    return trial


def per_sample_problem(stacked_model: Any, model: Any, evaluation: Dataset,
                       counts: Sequence[int]) -> str | None:
    """Why ``stacked_model`` at each of ``counts`` samples does not give every sample the outputs
    ``model`` gives it alone (to float round-off), or None when it does (ONNX Runtime)."""
    try:
        for count in counts:
            feeds = _stacked(evaluation.inputs, count)
            stacked = run_onnx(stacked_model, feeds)
            alone = [run_onnx(model, {k: v[i:i + 1] for k, v in feeds.items()})
                     for i in range(count)]
            for index, output in enumerate(stacked):
                single = np.concatenate([a[index] for a in alone])
                if output.shape != single.shape:
                    return (f"output {index} is {list(output.shape)} at batch {count}, "
                            f"{list(single.shape)} one sample at a time")
                # round-off, not mixing: kernels picked for a batch of N may sum in another
                # order (magika's probabilities moved by 2e-4 at batch 4); a graph that mixes
                # samples moves outputs by the size of the signal. (Each artifact's accuracy is
                # judged apart, against the reference, by the profile's budget.)
                scale = max(1.0, float(np.abs(single).max(initial=0)))
                if not np.allclose(output, single, rtol=1e-3, atol=1e-3 * scale):
                    worst = float(np.abs(output - single).max())
                    return (f"output {index} at batch {count} differs from one sample at a "
                            f"time by up to {worst:.3g} (the graph mixes samples)")
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return None


def batched_graph(model: Any, evaluation: Dataset, size: int,
                  keep: Sequence[str] = ()) -> tuple[Any, dict[str, np.ndarray]]:
    """``model`` (the reference) with a batch axis free for a batch-``size`` static graph, and
    ``size`` stacked samples to check it with. Raises :class:`ConversionError` when there is no
    batch axis to stack samples on, or ONNX Runtime does not give each of ``size`` stacked
    samples its own outputs."""
    if any(a != 0 for a in evaluation.axes.values()):
        raise ConversionError("the data are whole feeds, not samples on a batch axis")
    trial, _freed = free_batch(model, keep)
    if not _has_dynamic_batch(trial):
        raise ConversionError("no input has a batch axis of size 1 or a dynamic one to fix at "
                              f"{size}")
    problem = per_sample_problem(trial, model, evaluation, (size,))
    if problem is not None:
        raise ConversionError(f"ONNX Runtime does not compute each sample alone at batch "
                              f"{size}: {problem}")
    return trial, _stacked(evaluation.inputs, size)


def _shape_notes(options: ConvertOptions, framework: str) -> list[str]:
    fixed = {k: v for k, v in options.input_shapes.items() if v and v[0] is not None}
    if framework != "torchscript" or not fixed:
        return []
    hint = " ".join(f"{k}={'x'.join(['N', *map(str, v[1:])])}" for k, v in fixed.items())
    return [f"--input-shape fixed the batch of {sorted(fixed)}; --input-shape {hint} keeps it "
            "dynamic (batch-2 requests are refused otherwise)"]


def _classifier(signature: ModelSignature, task: str, outputs: Sequence[np.ndarray],
                labels: list[str] | None) -> tuple[str, ...]:
    if task != "classification":
        return ()
    return (labels and class_score_outputs(signature, outputs, len(labels))) or \
        class_score_outputs(signature, outputs)


def _float_reference(model: Any, notes: list[str]) -> tuple[Any, Any, SourceQuantization | None]:
    """(the float graph to use as the reference, the source's own QDQ graph or None, how the
    source is quantized or None) — edgeserve.converters.dequantize."""
    import onnx

    quantized = quantization_of(model)
    if quantized is None:
        return model, None, None
    if quantized.format == "QOperator":
        notes.append(f"the source is already quantized: {quantized.summary}; QOperator ops "
                     "cannot be undone op by op, so the reference is the graph as given and no "
                     "int8 artifact is made from it again (its ONNX artifact is that int8 graph)")
        return model, None, quantized
    floated, removed = dequantize(model)
    notes.append(f"the source is already quantized: {quantized.summary}; the float reference is "
                 f"its de-quantized graph ({removed} Q/DQ nodes: int8 weights made float, "
                 "activation ranges kept as Clip), and the static int8 ONNX artifact is the "
                 "source's own quantization, not quantized again")
    return onnx.shape_inference.infer_shapes(floated), model, quantized


def _same_inputs(graph: Any, reference: Any) -> Any:
    """``graph`` with the input shapes the reference ended with (a batch fixed at 1 stays so)."""
    dims = {v.name: [d.dim_value if d.HasField("dim_value") else None
                     for d in v.type.tensor_type.shape.dim] for v in reference.graph.input}
    if any(None in d[1:] for d in dims.values()):
        return graph
    names = {v.name for v in graph.graph.input}
    return fix_input_shapes(graph, {k: v for k, v in dims.items() if k in names})


_PASS_THROUGH = {"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose", "Cast",
                 "ReduceMean", "ReduceMax", "ReduceMin", "Slice", "Gather", "Expand"}
"""ops whose output stays within the range of their first input (a mean of probabilities is a
probability)"""


def sigmoid_outputs(model: Any) -> tuple[str, ...]:
    """Graph outputs a Sigmoid makes (through reshapes and the like): probabilities, judged by
    the decision at 0.5 as well as by their error (edgeserve.converters.validate)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    found = []
    for output in model.graph.output:
        node = producer.get(output.name)
        while node is not None and node.op_type in _PASS_THROUGH and node.input:
            node = producer.get(node.input[0])
        if node is not None and node.op_type in ("Sigmoid", "HardSigmoid"):
            found.append(output.name)
    return tuple(found)


def _task_notes(task: str, labels: list[str] | None, evaluation: Dataset,
                classifier: tuple[str, ...], signature: ModelSignature,
                outputs: Sequence[np.ndarray]) -> list[str]:
    """Why accuracy is missing when the user gave labels (instead of a silent "-")."""
    shapes = {t.name: list(o.shape[1:]) for t, o in zip(signature.outputs, outputs, strict=True)}
    if labels and task != "classification":
        return [f"{len(labels)} labels given, but no float output has {len(labels)} scores per "
                f"sample (outputs per sample: {shapes}): task {task}, no accuracy; pass --task "
                "classification if an output holds class scores"]
    if evaluation.labels is not None and not classifier:
        return [f"evaluation labels given, but task {task} has no class-score output "
                f"(outputs per sample: {shapes}): no accuracy"]
    return []


def make_context(options: ConvertOptions, source: Any, work: Path,
                 plans: Sequence[PlannedArtifact]) -> BuildContext:
    """Import, fix shapes, load data, simplify (checked), run the reference on the data."""
    import onnx

    work.mkdir(parents=True, exist_ok=True)
    imported = import_model(source, work, example_inputs=options.example_inputs,
                            input_names=options.input_names, output_names=options.output_names,
                            input_shapes=options.input_shapes)
    shapes = _shapes(options)
    model, notes = readable_names(imported.model)
    if options.constant_inputs:
        model = freeze_inputs(model, options.constant_inputs)
    model = fix_input_shapes(model, shapes) if shapes else onnx.shape_inference.infer_shapes(model)
    model, source_int8, quantized = _float_reference(model, notes)
    signature = read_signature(model, options.layouts)
    preprocessing = resolve_preprocessing(options.preprocessing, signature.inputs)
    calibration, evaluation = _data(options, signature, plans, preprocessing)
    model = fold(model, evaluation.sample(0))  # one sample as one call: fits every model
    model = _keep_batch(model, evaluation, notes)
    if options.dynamic_batch or any(p.batching.dynamic for p in options.load_profiles()):
        model = _free_batch(model, evaluation, [k for k, v in options.input_shapes.items()
                                                if v and v[0] is not None], notes)
    notes += _shape_notes(options, imported.framework)
    reference_path = work / "reference.onnx"
    onnx.save(model, str(reference_path))
    signature = read_signature(model, options.layouts)
    source_int8_path = None
    if source_int8 is not None:
        source_int8_path = work / "source-int8.onnx"
        onnx.save(_same_inputs(source_int8, model), str(source_int8_path))
    try:
        runner = OrtRunner(reference_path)
        reference_eval = run_dataset(runner, evaluation.inputs, signature)
    except ConversionError:
        raise
    except Exception as exc:
        raise ConversionError(f"the fp32 reference does not run on the evaluation data: "
                              f"{type(exc).__name__}: {str(exc)[:400]}") from None
    labels = list(options.labels) if options.labels else None
    task = options.task or detect_task(model, signature, labels, reference_eval,
                                       evaluation.labels)
    classifier = _classifier(signature, task, reference_eval, labels)
    notes += _task_notes(task, labels, evaluation, classifier, signature, reference_eval)
    samples = evaluation.take(slice(0, SAMPLE_COUNT))
    return BuildContext(
        work=work, imported=imported, reference_path=reference_path, signature=signature,
        task=task, calibration=calibration, evaluation=evaluation, reference_eval=reference_eval,
        samples=samples, reference_samples=[o[:len(samples)] for o in reference_eval],
        input_shapes=shapes, reference_latency_ms=measure_latency(runner, evaluation.sample(0)),
        reference_bytes=reference_path.stat().st_size, classifier_names=classifier,
        probability_names=sigmoid_outputs(model),
        source_quantization=quantized.summary if quantized else None,
        source_quantization_format=quantized.format if quantized else None,
        source_int8_path=source_int8_path,
        preprocessing=preprocessing, notes=notes)


def reference_outputs(ctx: BuildContext, data: Dataset) -> list[np.ndarray]:
    """The fp32 reference's outputs for ``data``."""
    return run_dataset(OrtRunner(ctx.reference_path), data.inputs, ctx.signature)
