"""The model's signature (inputs and outputs as :class:`TensorSpec`) read from the reference ONNX.

Layouts are guessed only where the shape says so unambiguously (4-D with 1, 3 or 4 channels on
axis 1: ``NCHW``; 2-D: ``NC``) unless the caller gives them. An output counts as class scores
(:func:`class_score_outputs`) when it is a float output holding one score per class for each
sample: ``[batch, K]`` with ``K > 1``, or, when ``K`` labels are given, any output with one axis
of ``K`` and every other axis 1 (``[batch, 1, K]``, ``[batch, K, 1, 1]``). Shapes are read from
the reference's actual outputs when they are known, so a graph whose output shapes shape
inference could not work out is still recognised.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edgeserve.manifest import DType, TensorSpec

from .graph import iter_nodes

if TYPE_CHECKING:
    import onnx

__all__ = ["ModelSignature", "class_score_outputs", "detect_task", "read_signature"]

_ONNX_DTYPES: dict[int, DType] = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32",
                                  7: "int64", 8: "string", 9: "bool", 10: "float16", 11: "float64"}
_CLASS_HINTS = ("logit", "prob", "score", "class", "softmax", "label")


@dataclass(frozen=True)
class ModelSignature:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def layouts(self) -> dict[str, str | None]:
        return {t.name: t.layout for t in [*self.inputs, *self.outputs]}

    def classifier_outputs(self, task: str) -> tuple[str, ...]:
        """Outputs holding class scores of a classification model, by the graph's shapes (the
        converter uses :func:`class_score_outputs` with the reference's outputs)."""
        return class_score_outputs(self) if task == "classification" else ()


def _guess_layout(shape: list[int | str | None]) -> str | None:
    if len(shape) == 4 and shape[1] in (1, 3, 4):
        return "NCHW"
    if len(shape) == 2:
        return "NC"
    return None


def _spec(value: onnx.ValueInfoProto, layout: str | None) -> TensorSpec:
    t = value.type.tensor_type
    shape: list[int | str | None] = []
    for i, d in enumerate(t.shape.dim):
        if d.HasField("dim_value") and d.dim_value > 0:
            shape.append(d.dim_value)
        else:
            shape.append(d.dim_param or ("batch" if i == 0 else None))
    return TensorSpec(name=value.name, dtype=_ONNX_DTYPES.get(t.elem_type, "float32"),
                      shape=shape, layout=layout or _guess_layout(shape))


def read_signature(model: onnx.ModelProto,
                   layouts: Mapping[str, str] | None = None) -> ModelSignature:
    """Inputs (initializers excluded) and outputs of ``model`` as tensor specs."""
    layouts = layouts or {}
    inits = {i.name for i in model.graph.initializer}
    inputs = [_spec(v, layouts.get(v.name)) for v in model.graph.input if v.name not in inits]
    outputs = [_spec(v, layouts.get(v.name)) for v in model.graph.output]
    return ModelSignature(inputs, outputs)


def _per_sample_shape(spec: TensorSpec, array: np.ndarray | None) -> list[int | str | None]:
    """An output's shape without its first (batch) axis: from the reference's actual output
    when there is one (samples first), else from the graph."""
    if array is not None:
        return list(array.shape[1:])
    return list(spec.shape[1:])


def class_score_outputs(signature: ModelSignature, arrays: Sequence[np.ndarray] | None = None,
                        classes: int | None = None) -> tuple[str, ...]:
    """Float outputs with one score per class for each sample (see the module docstring):
    per sample, one axis of ``classes`` entries (of more than one when ``classes`` is None) and
    every other axis 1 — ``[batch, K]``, ``[batch, 1, K]``, or ``[batch, K, 1, 1]`` from a
    convolutional head."""
    found = []
    for i, spec in enumerate(signature.outputs):
        array = arrays[i] if arrays is not None and i < len(arrays) else None
        dims = _per_sample_shape(spec, array)
        wide = [d for d in dims if d != 1]
        if not spec.dtype.startswith("float") or len(wide) != 1:
            continue
        count = wide[0]
        if classes is not None:
            if count == classes:
                found.append(spec.name)
        elif len(dims) == 1 and (not isinstance(count, int) or count > 1):
            found.append(spec.name)
    return tuple(found)


def _integer_labels_fit(labels: np.ndarray | None, classes: int) -> bool:
    if labels is None or len(labels) == 0 or labels.dtype.kind not in "iuf":
        return False
    values = np.asarray(labels, dtype=np.float64)
    return bool(np.all(values == np.round(values)) and values.min() >= 0 and values.max() < classes)


def detect_task(model: onnx.ModelProto, signature: ModelSignature, labels: list[str] | None,
                outputs: Sequence[np.ndarray] | None = None,
                eval_labels: np.ndarray | None = None) -> str:
    """``classification`` when the outputs look like class scores, else ``other``.

    Evidence, in order: class names were given and a float output has one score per name for
    each sample (:func:`class_score_outputs`); a ``[batch, K]`` float output comes from
    Softmax/LogSoftmax or is named like scores (``logits``, ``probabilities`` …); the
    evaluation labels are integers in ``0..K-1`` for such an output. ``outputs`` are the
    reference's outputs on the evaluation data (samples first); without them the graph's shapes
    are used.
    """
    if labels and class_score_outputs(signature, outputs, len(labels)):
        return "classification"
    scores = [t for t in signature.outputs if t.name in class_score_outputs(signature, outputs)]
    if not scores:
        return "other"
    producers = {out: node.op_type for node in iter_nodes(model.graph) for out in node.output}
    if any(producers.get(t.name) in ("Softmax", "LogSoftmax") for t in scores):
        return "classification"
    if any(h in t.name.lower() for t in scores for h in _CLASS_HINTS):
        return "classification"
    if outputs is not None:
        index = {t.name: i for i, t in enumerate(signature.outputs)}
        if any(_integer_labels_fit(eval_labels, outputs[index[t.name]][0].size) for t in scores):
            return "classification"
    return "other"
