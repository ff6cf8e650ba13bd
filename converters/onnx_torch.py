"""An ONNX graph as a ``torch.nn.Module`` (the Core ML route for ONNX, Keras and sklearn sources).

coremltools converts from torch, not from ONNX. :class:`OnnxModule` interprets a *static*,
simplified ONNX graph node by node with torch operators; ``torch.jit.trace`` over it yields a
plain torch graph that coremltools converts. Parameter inputs (shapes, axes, pads) must be
constants, which the static preparation guarantees for ordinary models. Ops without a handler
raise :class:`ConversionError` naming them, so a model that cannot reach Core ML says why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edgeserve.errors import ConversionError

__all__ = ["SUPPORTED_OPS", "OnnxModule"]

Handler = Callable[[list[Any], dict[str, Any]], Any]
_HANDLERS: dict[str, Handler] = {}
_TORCH_DTYPES = {1: "float32", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 11: "float64",
                 2: "uint8", 3: "int8"}


def _op(*names: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for name in names:
            _HANDLERS[name] = fn
        return fn
    return register


def _ints(t: Any) -> list[int]:
    return [int(v) for v in (t.tolist() if hasattr(t, "tolist") else t)]


def _torch() -> Any:
    import torch

    return torch


def _elementwise() -> None:
    torch = _torch()
    binary = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div,
              "Pow": torch.pow, "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt,
              "LessOrEqual": torch.le, "GreaterOrEqual": torch.ge, "And": torch.logical_and,
              "Or": torch.logical_or, "Mod": torch.fmod}
    for name, fn in binary.items():
        _HANDLERS[name] = lambda a, k, fn=fn: fn(a[0], a[1])  # type: ignore[misc]
    unary = {"Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp,
             "Log": torch.log, "Sqrt": torch.sqrt, "Neg": torch.neg, "Abs": torch.abs,
             "Reciprocal": torch.reciprocal, "Erf": torch.erf, "Not": torch.logical_not,
             "Floor": torch.floor, "Ceil": torch.ceil, "Sin": torch.sin, "Cos": torch.cos,
             "Softplus": torch.nn.functional.softplus, "Sign": torch.sign}
    for name, fn in unary.items():
        _HANDLERS[name] = lambda a, k, fn=fn: fn(a[0])  # type: ignore[misc]


@_op("Identity", "Dropout")
def _identity(a: list[Any], k: dict[str, Any]) -> Any:
    return a[0]


@_op("Min", "Max", "Sum", "Mean")
def _variadic(a: list[Any], k: dict[str, Any]) -> Any:
    torch = _torch()
    result = a[0]
    for other in a[1:]:
        result = {"Min": torch.minimum, "Max": torch.maximum}.get(k["_op"], torch.add)(result, other)
    return result / len(a) if k["_op"] == "Mean" else result


@_op("LeakyRelu")
def _leaky(a: list[Any], k: dict[str, Any]) -> Any:
    return _torch().nn.functional.leaky_relu(a[0], k.get("alpha", 0.01))


@_op("Elu")
def _elu(a: list[Any], k: dict[str, Any]) -> Any:
    return _torch().nn.functional.elu(a[0], k.get("alpha", 1.0))


@_op("HardSigmoid")
def _hardsigmoid(a: list[Any], k: dict[str, Any]) -> Any:
    return _torch().clamp(a[0] * k.get("alpha", 0.2) + k.get("beta", 0.5), 0, 1)


@_op("HardSwish")
def _hardswish(a: list[Any], k: dict[str, Any]) -> Any:
    return _torch().nn.functional.hardswish(a[0])


@_op("Gelu")
def _gelu(a: list[Any], k: dict[str, Any]) -> Any:
    return _torch().nn.functional.gelu(a[0], approximate=k.get("approximate", "none"))


@_op("Softmax", "LogSoftmax")
def _softmax(a: list[Any], k: dict[str, Any]) -> Any:
    fn = _torch().softmax if k["_op"] == "Softmax" else _torch().log_softmax
    return fn(a[0], dim=k.get("axis", -1))


@_op("Clip")
def _clip(a: list[Any], k: dict[str, Any]) -> Any:
    low = a[1] if len(a) > 1 and a[1] is not None else k.get("min")
    high = a[2] if len(a) > 2 and a[2] is not None else k.get("max")
    low = float(low) if low is not None else None
    high = float(high) if high is not None else None
    return _torch().clamp(a[0], low, high)


def _pads(k: dict[str, Any], dims: int) -> list[int]:
    pads = list(k.get("pads", [0] * 2 * dims))
    if k.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise ConversionError("auto_pad SAME_* is not supported on the Core ML route; "
                              "simplify the model with explicit pads")
    return pads


def _symmetric(pads: list[int], dims: int) -> tuple[list[int], list[int] | None]:
    begin, end = pads[:dims], pads[dims:]
    if begin == end:
        return begin, None
    # asymmetric: F.pad takes (last dim begin, last dim end, ...)
    explicit = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        explicit += [b, e]
    return [0] * dims, explicit


@_op("Conv")
def _conv(a: list[Any], k: dict[str, Any]) -> Any:
    torch = _torch()
    x, w = a[0], a[1]
    bias = a[2] if len(a) > 2 else None
    dims = w.dim() - 2
    padding, explicit = _symmetric(_pads(k, dims), dims)
    if explicit:
        x = torch.nn.functional.pad(x, explicit)
    fn = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d,
          3: torch.nn.functional.conv3d}[dims]
    return fn(x, w, bias, stride=k.get("strides", [1] * dims), padding=padding,
              dilation=k.get("dilations", [1] * dims), groups=k.get("group", 1))


@_op("ConvTranspose")
def _conv_transpose(a: list[Any], k: dict[str, Any]) -> Any:
    torch = _torch()
    w = a[1]
    dims = w.dim() - 2
    padding, explicit = _symmetric(_pads(k, dims), dims)
    if explicit:
        raise ConversionError("ConvTranspose with asymmetric pads is not supported for Core ML")
    fn = {1: torch.nn.functional.conv_transpose1d, 2: torch.nn.functional.conv_transpose2d}[dims]
    return fn(a[0], w, a[2] if len(a) > 2 else None, stride=k.get("strides", [1] * dims),
              padding=padding, output_padding=k.get("output_padding", [0] * dims),
              groups=k.get("group", 1), dilation=k.get("dilations", [1] * dims))


@_op("MaxPool", "AveragePool")
def _pool(a: list[Any], k: dict[str, Any]) -> Any:
    torch = _torch()
    kernel = k["kernel_shape"]
    dims = len(kernel)
    padding, explicit = _symmetric(_pads(k, dims), dims)
    x = a[0]
    if explicit:
        x = torch.nn.functional.pad(x, explicit, value=-1e30 if k["_op"] == "MaxPool" else 0.0)
    strides = k.get("strides", [1] * dims)
    ceil = bool(k.get("ceil_mode", 0))
    if k["_op"] == "MaxPool":
        fn = {1: torch.nn.functional.max_pool1d, 2: torch.nn.functional.max_pool2d}[dims]
        return fn(x, kernel, strides, padding, ceil_mode=ceil)
    fn = {1: torch.nn.functional.avg_pool1d, 2: torch.nn.functional.avg_pool2d}[dims]
    return fn(x, kernel, strides, padding, ceil_mode=ceil,
              count_include_pad=bool(k.get("count_include_pad", 0)))


@_op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(a: list[Any], k: dict[str, Any]) -> Any:
    dims = tuple(range(2, a[0].dim()))
    if k["_op"] == "GlobalAveragePool":
        return a[0].mean(dim=dims, keepdim=True)
    return a[0].amax(dim=dims, keepdim=True)


@_op("BatchNormalization")
def _batchnorm(a: list[Any], k: dict[str, Any]) -> Any:
    return _torch().nn.functional.batch_norm(a[0], a[3], a[4], a[1], a[2], False, 0.0,
                                            k.get("epsilon", 1e-5))


@_op("LayerNormalization")
def _layernorm(a: list[Any], k: dict[str, Any]) -> Any:
    axis = k.get("axis", -1)
    axis = axis if axis >= 0 else a[0].dim() + axis
    shape = list(a[0].shape[axis:])
    return _torch().nn.functional.layer_norm(a[0], shape, a[1], a[2] if len(a) > 2 else None,
                                            k.get("epsilon", 1e-5))


@_op("Gemm")
def _gemm(a: list[Any], k: dict[str, Any]) -> Any:
    x = a[0].t() if k.get("transA", 0) else a[0]
    w = a[1].t() if k.get("transB", 0) else a[1]
    y = k.get("alpha", 1.0) * (x @ w)
    if len(a) > 2 and a[2] is not None:
        y = y + k.get("beta", 1.0) * a[2]
    return y


@_op("MatMul")
def _matmul(a: list[Any], k: dict[str, Any]) -> Any:
    return _torch().matmul(a[0], a[1])


@_op("Flatten")
def _flatten(a: list[Any], k: dict[str, Any]) -> Any:
    axis = k.get("axis", 1)
    return a[0].reshape(int(np.prod(a[0].shape[:axis])) if axis else 1, -1)


@_op("Reshape")
def _reshape(a: list[Any], k: dict[str, Any]) -> Any:
    shape = _ints(a[1])
    shape = [a[0].shape[i] if s == 0 and not k.get("allowzero", 0) else s
             for i, s in enumerate(shape)]
    return a[0].reshape(shape)


@_op("Transpose")
def _transpose(a: list[Any], k: dict[str, Any]) -> Any:
    perm = k.get("perm") or list(reversed(range(a[0].dim())))
    return a[0].permute(*perm)


@_op("Concat")
def _concat(a: list[Any], k: dict[str, Any]) -> Any:
    return _torch().cat([t for t in a if t is not None], dim=k["axis"])


@_op("Split")
def _split(a: list[Any], k: dict[str, Any]) -> Any:
    axis = k.get("axis", 0)
    sizes = _ints(a[1]) if len(a) > 1 and a[1] is not None else k.get("split")
    if sizes is None:
        parts = k["_outputs"]
        sizes = [a[0].shape[axis] // parts] * parts
    return tuple(_torch().split(a[0], sizes, dim=axis))


@_op("Slice")
def _slice(a: list[Any], k: dict[str, Any]) -> Any:
    starts, ends = _ints(a[1]), _ints(a[2])
    axes = _ints(a[3]) if len(a) > 3 and a[3] is not None else list(range(len(starts)))
    steps = _ints(a[4]) if len(a) > 4 and a[4] is not None else [1] * len(starts)
    index: list[Any] = [slice(None)] * a[0].dim()
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        if step < 0:
            raise ConversionError("Slice with negative steps is not supported for Core ML")
        size = a[0].shape[axis]
        index[axis] = slice(max(min(start, size), -size), max(min(end, size), -size - 1), step)
    return a[0][tuple(index)]


@_op("Gather")
def _gather(a: list[Any], k: dict[str, Any]) -> Any:
    axis = k.get("axis", 0)
    idx = a[1].long()
    idx = _torch().where(idx < 0, idx + a[0].shape[axis], idx)
    if idx.dim() == 0:
        return a[0].select(axis, int(idx))
    return _torch().index_select(a[0], axis, idx.reshape(-1)).reshape(
        *a[0].shape[:axis], *idx.shape, *a[0].shape[axis + 1:])


@_op("Unsqueeze")
def _unsqueeze(a: list[Any], k: dict[str, Any]) -> Any:
    axes = _ints(a[1]) if len(a) > 1 else k["axes"]
    x = a[0]
    rank = x.dim() + len(axes)
    for axis in sorted(ax if ax >= 0 else ax + rank for ax in axes):
        x = x.unsqueeze(axis)
    return x


@_op("Squeeze")
def _squeeze(a: list[Any], k: dict[str, Any]) -> Any:
    axes = _ints(a[1]) if len(a) > 1 else k.get("axes")
    if axes is None:
        return a[0].squeeze()
    x = a[0]
    for axis in sorted((ax if ax >= 0 else ax + x.dim() for ax in axes), reverse=True):
        x = x.squeeze(axis)
    return x


@_op("Cast")
def _cast(a: list[Any], k: dict[str, Any]) -> Any:
    torch = _torch()
    return a[0].to(getattr(torch, _TORCH_DTYPES.get(k["to"], "float32")))


@_op("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin")
def _reduce(a: list[Any], k: dict[str, Any]) -> Any:
    axes = _ints(a[1]) if len(a) > 1 and a[1] is not None else k.get("axes")
    dims = tuple(axes) if axes else tuple(range(a[0].dim()))
    keep = bool(k.get("keepdims", 1))
    op = k["_op"]
    if op == "ReduceMean":
        return a[0].mean(dim=dims, keepdim=keep)
    if op == "ReduceSum":
        return a[0].sum(dim=dims, keepdim=keep)
    return a[0].amax(dim=dims, keepdim=keep) if op == "ReduceMax" else a[0].amin(dim=dims,
                                                                                  keepdim=keep)


@_op("Shape")
def _shape(a: list[Any], k: dict[str, Any]) -> Any:
    return _torch().tensor(list(a[0].shape), dtype=_torch().int64)


@_op("Expand")
def _expand(a: list[Any], k: dict[str, Any]) -> Any:
    shape = _ints(a[1])
    target = np.broadcast_shapes(tuple(a[0].shape), tuple(shape))
    return a[0].expand(*target)


@_op("Where")
def _where(a: list[Any], k: dict[str, Any]) -> Any:
    return _torch().where(a[0].bool(), a[1], a[2])


@_op("Pad")
def _pad(a: list[Any], k: dict[str, Any]) -> Any:
    pads = _ints(a[1]) if len(a) > 1 else k["pads"]
    value = float(a[2]) if len(a) > 2 and a[2] is not None else 0.0
    dims = a[0].dim()
    explicit: list[int] = []
    for axis in reversed(range(dims)):
        explicit += [pads[axis], pads[axis + dims]]
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[k.get("mode", "constant")]
    return _torch().nn.functional.pad(a[0], explicit, mode=mode,
                                      value=value if mode == "constant" else None)


@_op("ConstantOfShape")
def _constant_of_shape(a: list[Any], k: dict[str, Any]) -> Any:
    value = k.get("value")
    fill = value.reshape(-1)[0].item() if value is not None else 0.0
    return _torch().full(_ints(a[0]), fill)


@_op("Tile")
def _tile(a: list[Any], k: dict[str, Any]) -> Any:
    return a[0].repeat(*_ints(a[1]))


@_op("Resize")
def _resize(a: list[Any], k: dict[str, Any]) -> Any:
    torch = _torch()
    mode = k.get("mode", "nearest")
    sizes = _ints(a[3]) if len(a) > 3 and a[3] is not None and a[3].numel() else None
    scales = [float(s) for s in a[2].tolist()] if sizes is None else None
    kwargs: dict[str, Any] = {"size": sizes[2:]} if sizes else {"scale_factor": scales[2:]}  # type: ignore[index]
    if mode == "nearest":
        return torch.nn.functional.interpolate(a[0], mode="nearest", **kwargs)
    align = k.get("coordinate_transformation_mode", "half_pixel") == "align_corners"
    return torch.nn.functional.interpolate(a[0], mode="bilinear" if a[0].dim() == 4 else "linear",
                                           align_corners=align, **kwargs)


_elementwise()
SUPPORTED_OPS = frozenset(_HANDLERS)


def _attributes(node: Any) -> dict[str, Any]:
    from onnx import helper, numpy_helper

    attrs: dict[str, Any] = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode()
        elif hasattr(value, "dims"):
            value = numpy_helper.to_array(value)
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        attrs[attr.name] = value
    attrs["_op"] = node.op_type
    attrs["_outputs"] = len(node.output)
    return attrs


class OnnxModule:
    """Factory: ``OnnxModule(model)`` returns a torch module computing the ONNX graph."""

    def __new__(cls, model: Any) -> Any:
        torch = _torch()
        from onnx import numpy_helper

        missing = sorted({n.op_type for n in model.graph.node} - SUPPORTED_OPS - {"Constant"})
        if missing:
            raise ConversionError(f"ops without a torch equivalent on the Core ML route: "
                                  f"{', '.join(missing)}")
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        inputs = [i.name for i in model.graph.input if i.name not in inits]
        outputs = [o.name for o in model.graph.output]
        nodes = [(n.op_type, list(n.input), list(n.output), _attributes(n))
                 for n in model.graph.node]
        return _build_module(torch, inits, inputs, outputs, nodes)


def _build_module(torch: Any, inits: dict[str, np.ndarray], inputs: Sequence[str],
                  outputs: Sequence[str], nodes: Sequence[tuple[str, list[str], list[str],
                                                               dict[str, Any]]]) -> Any:
    class _Graph(torch.nn.Module):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self._keys: dict[str, str] = {}
            for i, (name, array) in enumerate(inits.items()):
                key = f"w{i}"
                self._keys[name] = key
                self.register_buffer(key, torch.from_numpy(np.array(array)))

        def forward(self, *args: Any) -> Any:
            env: dict[str, Any] = dict(zip(inputs, args, strict=True))
            for name, key in self._keys.items():
                env[name] = getattr(self, key)
            for op, ins, outs, attrs in nodes:
                if op == "Constant":
                    env[outs[0]] = torch.from_numpy(np.array(attrs["value"]))
                    continue
                result = _HANDLERS[op]([env[n] if n else None for n in ins], attrs)
                if isinstance(result, tuple):
                    env.update(zip(outs, result, strict=False))
                else:
                    env[outs[0]] = result
            values = tuple(env[o] for o in outputs)
            return values[0] if len(values) == 1 else values

    return _Graph()
