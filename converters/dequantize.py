"""Sources that are already quantized: found, said so, and turned back into a float reference.

A QDQ graph (``QuantizeLinear`` / ``DequantizeLinear`` around float ops, as ONNX Runtime's
``quantize_static``, NNCF or a QAT export write it) holds int8 weights behind
``DequantizeLinear`` and fake-quantizes activations. Quantizing it again made an invalid graph
("two nodes with same node name ... DequantizeLinear"), and onnx2tf turned its Q/DQ pairs into
Select TF ops LiteRT cannot run. :func:`dequantize` makes the float graph it stands for:

* ``DequantizeLinear`` of a constant → a float initializer, ``(q - zero_point) * scale`` (per
  tensor or along ``axis``), exactly the values the quantized graph computes with;
* ``QuantizeLinear`` of a constant followed by ``DequantizeLinear`` → the rounded and clipped
  values, folded the same way;
* ``QuantizeLinear`` → ``DequantizeLinear`` on an activation → removed (the float value flows on).

Float artifacts and TFLite are built from that graph; the source's own QDQ graph is kept for the
static int8 ONNX artifact instead of quantizing anew. Graphs with QOperator ops
(``QLinearConv``, ``MatMulInteger``, ``ConvInteger``, ``DynamicQuantizeLinear`` …) cannot be
undone op by op: :func:`quantization_of` reports them, and the converter refuses to quantize
them again.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["QOPERATOR_OPS", "SourceQuantization", "dequantize", "quantization_of"]

QOPERATOR_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearSigmoid",
    "QLinearLeakyRelu", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat",
    "QLinearSoftmax", "QLinearReduceMean", "QLinearWhere", "QGemm", "QAttention",
    "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "DynamicQuantizeLSTM", "QEmbedLayerNormalization",
})
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


@dataclass(frozen=True)
class SourceQuantization:
    """How a source graph is quantized: ``"QDQ"`` or ``"QOperator"``, and its quantized ops."""

    format: str
    ops: dict[str, int] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        ops = ", ".join(f"{n} {op}" for op, n in sorted(self.ops.items(), key=lambda i: -i[1]))
        return f"{self.format} ({ops})"


def quantization_of(model: Any) -> SourceQuantization | None:
    """The source's quantization, or None for a float graph."""
    counts = Counter(n.op_type for n in model.graph.node)
    qop = {op: n for op, n in counts.items() if op in QOPERATOR_OPS}
    if qop:
        return SourceQuantization("QOperator", {**qop, **{op: counts[op] for op in _QDQ_OPS
                                                         if counts[op]}})
    qdq = {op: counts[op] for op in _QDQ_OPS if counts[op]}
    return SourceQuantization("QDQ", qdq) if "DequantizeLinear" in qdq else None


def _broadcast(param: np.ndarray, rank: int, axis: int) -> np.ndarray:
    if param.ndim == 0 or param.size == 1:
        return param.reshape(())
    shape = [1] * rank
    shape[axis % rank] = param.size
    return param.reshape(shape)


def _dequantized(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None,
                 axis: int) -> np.ndarray:
    zp = np.zeros((), np.int64) if zero is None else zero.astype(np.int64)
    out = (q.astype(np.int64) - _broadcast(zp, q.ndim, axis)).astype(np.float64) * \
        _broadcast(scale.astype(np.float64), q.ndim, axis)
    result: np.ndarray = out.astype(scale.dtype)
    return result


def _quantized(x: np.ndarray, scale: np.ndarray, zero: np.ndarray | None,
               axis: int) -> np.ndarray:
    dtype = np.dtype(np.uint8) if zero is None else zero.dtype
    info = np.iinfo(dtype)
    zp = np.zeros((), np.int64) if zero is None else zero.astype(np.int64)
    q = np.rint(x.astype(np.float64) / _broadcast(scale.astype(np.float64), x.ndim, axis)) + \
        _broadcast(zp, x.ndim, axis)
    result: np.ndarray = np.clip(q, info.min, info.max).astype(dtype)
    return result


def _clip(dq: Any, float_in: str, scale: np.ndarray | None, zero: np.ndarray | None,
          axis: int) -> tuple[list[Any], dict[str, np.ndarray]]:
    """A node standing for QuantizeLinear → DequantizeLinear on an activation: the float value
    clipped to what the quantized type can hold (``(qmin - zp) * scale`` to ``(qmax - zp) *
    scale``), so a ReLU the quantizer folded into uint8's zero point stays a ReLU."""
    from onnx import helper

    assert scale is not None
    dtype = np.dtype(np.uint8) if zero is None else zero.dtype
    info = np.iinfo(dtype)
    zp = np.zeros((), np.float64) if zero is None else zero.astype(np.float64)
    low = ((info.min - zp) * scale.astype(np.float64)).astype(scale.dtype)
    high = ((info.max - zp) * scale.astype(np.float64)).astype(scale.dtype)
    out, base = dq.output[0], dq.output[0] + "_range"
    if low.size == 1:
        bounds = {f"{base}_min": low.reshape(()), f"{base}_max": high.reshape(())}
        return [helper.make_node("Clip", [float_in, *bounds], [out], name=f"{base}_clip")], bounds
    # per-axis ranges (Clip takes scalars only): Max then Min with bounds along the axis
    rank = axis + 1 if axis >= 0 else -axis
    bounds = {f"{base}_min": _broadcast(low, rank, axis), f"{base}_max": _broadcast(high, rank,
                                                                                     axis)}
    return [helper.make_node("Max", [float_in, f"{base}_min"], [f"{base}_low"],
                             name=f"{base}_max"),
            helper.make_node("Min", [f"{base}_low", f"{base}_max"], [out], name=f"{base}_min")], \
        bounds


Replacements = tuple[dict[str, np.ndarray], set[int], list[tuple[list[Any], dict[str, np.ndarray]]]]


def _replacements(graph: Any, consts: dict[str, np.ndarray],
                  producer: dict[str, Any]) -> Replacements:
    """What each DequantizeLinear becomes: float initializers (by output name), the nodes to
    drop (by id) and the clipping nodes that stand for activation Q/DQ pairs."""
    new_consts: dict[str, np.ndarray] = {}
    drop: set[int] = set()
    clips: list[tuple[list[Any], dict[str, np.ndarray]]] = []

    def param(node: Any, index: int) -> np.ndarray | None:
        if len(node.input) <= index or not node.input[index]:
            return None
        return consts.get(node.input[index])

    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if any(a.name == "block_size" and a.i for a in node.attribute):
            continue  # blocked quantization (opset 21): left as it is
        scale, zero = param(node, 1), param(node, 2)
        if scale is None:
            continue
        source = node.input[0]
        if source in consts:  # int8 weights
            new_consts[node.output[0]] = _dequantized(consts[source], scale, zero, axis)
            drop.add(id(node))
            continue
        quant = producer.get(source)
        if quant is None or quant.op_type != "QuantizeLinear" or param(quant, 1) is None:
            continue  # e.g. a quantized graph input: keep the DequantizeLinear
        float_in = quant.input[0]
        q_axis = next((a.i for a in quant.attribute if a.name == "axis"), 1)
        if float_in in consts:  # float weights quantized in the graph: fold exactly
            q = _quantized(consts[float_in], param(quant, 1), param(quant, 2), q_axis)  # type: ignore[arg-type]
            new_consts[node.output[0]] = _dequantized(q, scale, zero, axis)
        else:  # an activation: keep the range the quantized graph can hold (a fused ReLU)
            clips.append(_clip(node, float_in, param(quant, 1), param(quant, 2), q_axis))
        drop.add(id(node))
    return new_consts, drop, clips


def dequantize(model: Any) -> tuple[Any, int]:
    """The float graph a QDQ ``model`` stands for (module docstring) and how many Q/DQ nodes
    were removed; a copy, ``model`` is left as it is."""
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:  # Constant nodes hold scales and zero points too
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    outputs = {o.name for o in graph.output}
    producer = {out: node for node in graph.node for out in node.output}
    new_consts, drop, clips = _replacements(graph, consts, producer)
    nodes = [n for n in graph.node if id(n) not in drop]
    for clip, bounds in clips:
        before = producer.get(clip[0].input[0])
        at = 0 if before is None else next(i for i, n in enumerate(nodes) if n is before) + 1
        nodes[at:at] = clip
        new_consts.update(bounds)
    used = {name for n in nodes for name in n.input} | outputs
    # what fed only the removed DequantizeLinear nodes: their QuantizeLinear nodes
    final = [n for n in nodes if n.op_type != "QuantizeLinear" or
             any(o in used for o in n.output)]
    removed = len(drop) + len(nodes) - len(final)
    del graph.node[:]
    graph.node.extend(final)
    for name, array in new_consts.items():
        graph.initializer.append(numpy_helper.from_array(array, name))
    live = {name for n in graph.node for name in n.input} | outputs
    keep_inits = [i for i in graph.initializer if i.name in live]
    del graph.initializer[:]
    graph.initializer.extend(keep_inits)
    del graph.value_info[:]  # stale for the renamed tensors; shape inference redoes them
    return model, removed
