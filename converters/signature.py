"""The model's signature (inputs and outputs as :class:`TensorSpec`) read from the reference ONNX.

Layouts are guessed only where the shape says so unambiguously (4-D with 1, 3 or 4 channels on
axis 1: ``NCHW``; 2-D: ``NC``) unless the caller gives them. An output counts as class scores when
the task is ``classification`` and the output is ``[batch, K]`` with ``K > 1``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgeserve.manifest import DType, TensorSpec

from .graph import iter_nodes

if TYPE_CHECKING:
    import onnx

__all__ = ["ModelSignature", "detect_task", "read_signature"]

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
        """Outputs holding class scores: ``[batch, K>1]`` outputs of a classification model."""
        if task != "classification":
            return ()
        return tuple(t.name for t in self.outputs
                     if len(t.shape) == 2 and (not isinstance(t.shape[1], int) or t.shape[1] > 1)
                     and t.dtype.startswith("float"))


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


def detect_task(model: onnx.ModelProto, signature: ModelSignature, labels: list[str] | None) -> str:
    """``classification`` when the outputs look like class scores, else ``other``.

    Evidence: labels were given, the graph ends in Softmax/LogSoftmax, or a ``[batch, K]`` output
    is named like scores (``logits``, ``probabilities`` …).
    """
    two_d = [t for t in signature.outputs if len(t.shape) == 2 and t.dtype.startswith("float")]
    if not two_d:
        return "other"
    if labels:
        return "classification"
    producers = {out: node.op_type for node in iter_nodes(model.graph) for out in node.output}
    if any(producers.get(t.name) in ("Softmax", "LogSoftmax") for t in two_d):
        return "classification"
    if any(h in t.name.lower() for t in two_d for h in _CLASS_HINTS):
        return "classification"
    return "other"
