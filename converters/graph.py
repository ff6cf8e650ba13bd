"""ONNX graph preparation shared by every route.

Real ONNX files trip converters in the same few ways (measured on trained models from PyPI wheels:
see docs/converters.md), so one preparation runs before any export:

* fixed input shapes (``--input-shape``) and, for the static routes (TFLite, Core ML), batch 1;
* simplification with onnxsim (constant folding, which also folds ``If`` nodes whose condition
  became constant), checked with ONNX Runtime against the unsimplified graph and dropped when the
  outputs differ;
* ``Constant`` nodes turned into initializers, node names made valid TensorFlow scope names
  (``Softmax@0`` from Paddle breaks onnx2tf), and ``Slice`` nodes with axes listed out of order
  rewritten in ascending axis order (onnx2tf applied them to the wrong axis).

Every function takes and returns an ``onnx.ModelProto``; ``onnx`` is imported lazily.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeserve.errors import ConfigError, ConversionError

if TYPE_CHECKING:
    import onnx

__all__ = [
    "BATCH",
    "canonicalize_slices",
    "constants_to_initializers",
    "drop_noop_slices",
    "dynamic_inputs",
    "fix_input_shapes",
    "fold",
    "freeze_inputs",
    "inline_constant_ifs",
    "iter_nodes",
    "op_types",
    "prepare_static",
    "prune_unused_initializers",
    "readable_names",
    "rename_nodes",
    "rename_outputs",
    "run_onnx",
    "simplify",
    "tensor_shapes",
]

_SCOPE_SAFE = re.compile(r"[^A-Za-z0-9_.\-/]")
BATCH = "batch"
# output names exporters make up from the op that happens to come last (tf2onnx's Identity:0,
# TensorFlow's StatefulPartitionedCall:1): they say nothing about what the output is
_GENERIC_OUTPUT = re.compile(r"^(Identity|StatefulPartitionedCall|PartitionedCall)(_\d+)?$")


def iter_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph``, including those inside ``If``/``Loop``/``Scan`` bodies."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                yield from iter_nodes(attr.g)
            for sub in attr.graphs:
                yield from iter_nodes(sub)


def op_types(model: onnx.ModelProto) -> set[str]:
    """The op types the model uses, subgraphs included."""
    return {node.op_type for node in iter_nodes(model.graph)}


def _initializer_names(model: onnx.ModelProto) -> set[str]:
    return {init.name for init in model.graph.initializer}


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = _initializer_names(model)
    return [i for i in model.graph.input if i.name not in inits]


def dynamic_inputs(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    """Inputs with a dynamic dimension other than the first (batch) axis, with their shapes."""
    found: dict[str, list[int | str]] = {}
    for value in _graph_inputs(model):
        dims: list[int | str] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                                 for d in value.type.tensor_type.shape.dim]
        if any(not isinstance(d, int) or d <= 0 for d in dims[1:]):
            found[value.name] = dims
    return found


def _names_batch(param: str) -> bool:
    return "batch" in param.lower() or param == "N"


def fix_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int | None]],
                     batch: int | None = None) -> onnx.ModelProto:
    """Set input dims: ``shapes`` wins; otherwise a dynamic first axis, and any axis named like
    a batch (``[2, batch, 8]`` recurrent state), becomes ``batch``.

    A ``None`` in ``shapes`` (only the first axis may be one) leaves that axis dynamic, named
    ``batch`` — or sets it to ``batch`` when that is given (the static routes pass 1).
    Intermediate shapes are cleared and re-inferred, so no stale dims remain.
    """
    import onnx

    model = _copy(model)
    names = {v.name for v in _graph_inputs(model)}
    unknown = sorted(set(shapes) - names)
    if unknown:
        raise ConfigError(f"--input-shape names unknown input(s) {unknown}; the model's inputs "
                          f"are {sorted(names)}")
    for value in _graph_inputs(model):
        dims = value.type.tensor_type.shape.dim
        if value.name in shapes:
            wanted = list(shapes[value.name])
            if len(wanted) != len(dims):
                raise ConfigError(f"--input-shape {value.name}: rank {len(wanted)} given, the "
                                  f"model's input has rank {len(dims)}")
            for dim, size in zip(dims, wanted, strict=True):
                dim.Clear()
                if size is not None:
                    dim.dim_value = int(size)
                elif batch is not None:
                    dim.dim_value = batch
                else:
                    dim.dim_param = BATCH
        elif batch is not None:
            # the batch axis by the samples rule: a dynamic first axis, or one named batch
            for i, dim in enumerate(dims):
                if not dim.HasField("dim_value") and (i == 0 or _names_batch(dim.dim_param)):
                    dim.Clear()
                    dim.dim_value = batch
    if shapes or batch is not None:
        # stale intermediate shapes would contradict the new input shapes; outputs keep their
        # (possibly symbolic) dims, which shape inference refines
        del model.graph.value_info[:]
    inferred: onnx.ModelProto = onnx.shape_inference.infer_shapes(model, data_prop=True)
    return inferred


def free_batch(model: onnx.ModelProto, keep: Sequence[str] = ()) -> tuple[onnx.ModelProto,
                                                                          list[str]]:
    """``model`` with the first axis of every input and output fixed at 1 made dynamic
    (``batch``), but for the inputs named in ``keep``; and the inputs so freed (none: the model
    is returned as it was). Intermediate shapes are cleared and re-inferred. Whether the graph
    then computes the same thing per sample is for the caller to check."""
    import onnx

    def fixed_at_one(value: Any) -> bool:
        dims = value.type.tensor_type.shape.dim
        return bool(dims) and dims[0].HasField("dim_value") and dims[0].dim_value == 1

    freed = [v.name for v in _graph_inputs(model) if fixed_at_one(v) and v.name not in keep]
    if not freed:
        return model, []
    model = _copy(model)
    for value in [*_graph_inputs(model), *model.graph.output]:
        if fixed_at_one(value) and value.name not in keep:
            dim = value.type.tensor_type.shape.dim[0]
            dim.Clear()
            dim.dim_param = BATCH
    del model.graph.value_info[:]
    with contextlib.suppress(Exception):  # the caller's runtime check decides; shapes are hints
        model = onnx.shape_inference.infer_shapes(model)
    return model, freed


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx

    clone = onnx.ModelProto()
    clone.CopyFrom(model)
    return clone


def run_onnx(model: onnx.ModelProto | bytes, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run a model once with ONNX Runtime on the CPU (basic optimisations, one thread)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    data = model if isinstance(model, bytes) else model.SerializeToString()
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return [np.asarray(o) for o in session.run(None, {k: v for k, v in feeds.items() if k in names})]


def _same_outputs(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x.shape != y.shape:
            return False
        if x.dtype.kind == "f" and not np.allclose(x, y, rtol=1e-3, atol=1e-4):
            return False
        if x.dtype.kind != "f" and not np.array_equal(x, y):
            return False
    return True


def simplify(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """onnxsim's simplification, kept only if it ran and (given ``feeds``) outputs still match."""
    import onnxsim

    try:
        simplified, ok = onnxsim.simplify(_copy(model))
    except Exception:  # onnxsim raises bare RuntimeErrors from C++; the original still works
        return model
    if not ok:
        return model
    if feeds is not None:
        try:
            if not _same_outputs(run_onnx(model, feeds), run_onnx(simplified, feeds)):
                return model
        except Exception:
            return model
    return simplified  # type: ignore[no-any-return]


def freeze_inputs(model: onnx.ModelProto, values: Mapping[str, Any]) -> onnx.ModelProto:
    """Turn inputs with a known constant value (e.g. a sample rate) into initializers."""
    from onnx import numpy_helper

    model = _copy(model)
    inputs = {v.name: v for v in _graph_inputs(model)}
    unknown = sorted(set(values) - set(inputs))
    if unknown:
        raise ConfigError(f"constant input(s) {unknown} are not inputs of the model; its inputs "
                          f"are {sorted(inputs)}")
    for name, value in values.items():
        elem = inputs[name].type.tensor_type.elem_type
        dtype = onnx_np_dtype(elem)
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        model.graph.input.remove(inputs[name])
    return model


def onnx_np_dtype(elem_type: int) -> Any:
    from onnx import helper

    return helper.tensor_dtype_to_np_dtype(elem_type)


def _constant_value(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    found = _const(model, name)
    if found is not None:
        return found
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            value = next((a for a in node.attribute if a.name == "value"), None)
            return numpy_helper.to_array(value.t) if value is not None else None
    return None


def inline_constant_ifs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Replace top-level ``If`` nodes whose condition is constant by the branch taken.

    Returns the model and how many nodes were inlined. Branch outputs are renamed to the ``If``
    node's outputs (through Identity nodes); branch initializers move to the main graph.
    """
    from onnx import helper

    model = _copy(model)
    nodes: list[onnx.NodeProto] = []
    inlined = 0
    for node in model.graph.node:
        cond = _constant_value(model, node.input[0]) if node.op_type == "If" else None
        if cond is None:
            nodes.append(node)
            continue
        branch_name = "then_branch" if bool(np.asarray(cond).reshape(-1)[0]) else "else_branch"
        branch = next(a.g for a in node.attribute if a.name == branch_name)
        model.graph.initializer.extend(branch.initializer)
        nodes.extend(branch.node)
        for produced, wanted in zip(branch.output, node.output, strict=True):
            nodes.append(helper.make_node("Identity", [produced.name], [wanted],
                                          name=f"{node.name or 'If'}_{wanted}_inlined"))
        inlined += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model, inlined


def prune_unused_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop initializers no node (subgraphs included) and no output uses, e.g. the weights of an
    ``If`` branch that was inlined away (silero's 8 kHz model)."""
    used = {name for node in iter_nodes(model.graph) for name in node.input}
    used |= {o.name for o in model.graph.output}
    keep = [init for init in model.graph.initializer if init.name in used]
    if len(keep) == len(model.graph.initializer):
        return model
    removed = {init.name for init in model.graph.initializer} - {init.name for init in keep}
    model = _copy(model)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    # old IR versions also list initializers as graph inputs
    inputs = [i for i in model.graph.input if i.name not in removed]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    return model


def fold(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """Simplify, inline ``If`` nodes that became constant, repeat while that changes the graph."""
    model = simplify(model, feeds)
    for _ in range(3):
        model, inlined = inline_constant_ifs(model)
        if not inlined:
            break
        model = simplify(prune_unused_initializers(model), feeds)
    return prune_unused_initializers(model)


def constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Top-level ``Constant`` nodes with a tensor value become initializers."""
    from onnx import numpy_helper

    model = _copy(model)
    keep = []
    existing = _initializer_names(model)
    for node in model.graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None and node.output[0] not in existing:
            array = numpy_helper.to_array(value.t)
            model.graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def rename_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every node a unique name made of TensorFlow-scope-safe characters."""
    model = _copy(model)
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        base = _SCOPE_SAFE.sub("_", node.name or f"{node.op_type}_{i}").lstrip("_-./") \
            or f"{node.op_type}_{i}"
        name = base
        while name in seen:
            name = f"{base}_{i}"
        seen.add(name)
        node.name = name
    return model


def _const(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    return None


def canonicalize_slices(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite ``Slice`` nodes whose constant ``axes`` are not ascending into ascending order."""
    from onnx import numpy_helper

    model = _copy(model)
    for node in model.graph.node:
        if node.op_type != "Slice" or len(node.input) < 4 or not node.input[3]:
            continue
        params = [_const(model, n) if n else None for n in node.input[1:]]
        axes = params[2]
        if axes is None or any(p is None for p in params[:2]) or list(axes) == sorted(axes):
            continue
        if len(params) > 3 and node.input[4] and params[3] is None:
            continue
        order = np.argsort(axes, kind="stable")
        for k, array in enumerate(params):
            if array is None:
                continue
            fresh = f"{node.name or node.output[0]}_sorted_{k}"
            model.graph.initializer.append(numpy_helper.from_array(array[order], fresh))
            node.input[k + 1] = fresh
    return model


def drop_noop_slices(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace ``Slice`` nodes that keep the whole tensor (known shape, constant parameters) by
    ``Identity``: onnx2tf re-maps their axes to channels-last and cut real data (magika)."""
    import onnx
    from onnx import helper

    model = onnx.shape_inference.infer_shapes(_copy(model))
    shapes = tensor_shapes(model)
    for i, node in enumerate(model.graph.node):
        if node.op_type != "Slice" or any(d is None for d in shapes.get(node.input[0], [None])):
            continue
        params = [_const(model, n) if n else None for n in node.input[1:5]]
        starts, ends = params[0], params[1]
        if starts is None or ends is None or any(
                p is None and k < len(node.input) - 1 and node.input[k + 1] for k, p in enumerate(params)):
            continue
        dims = shapes[node.input[0]]
        axes = params[2] if len(params) > 2 and params[2] is not None else np.arange(len(starts))
        steps = params[3] if len(params) > 3 and params[3] is not None else np.ones(len(starts))
        whole = all(int(st) in (0, -dims[ax]) and int(en) >= dims[ax] and int(sp) == 1
                    for st, en, ax, sp in zip(starts, ends, [int(a) % len(dims) for a in axes],
                                              steps, strict=True))
        if whole:
            model.graph.node[i].CopyFrom(helper.make_node("Identity", [node.input[0]],
                                                          list(node.output), name=node.name))
    return model


def prepare_static(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int | None]],
                   one: Mapping[str, np.ndarray] | None = None,
                   batch: int = 1) -> onnx.ModelProto:
    """The graph the static routes (TFLite, Core ML) start from: batch 1 (or ``batch``, for a
    batch-N variant of a graph whose batch axis is dynamic), every shape fixed; ``one`` is one
    call's feeds (to check the simplified graph with).

    Raises :class:`ConversionError` when an input still has a dynamic dimension, naming it and
    the ``--input-shape`` option that fixes it.
    """
    fixed = fix_input_shapes(model, shapes, batch=batch)
    still = {k: v for k, v in dynamic_inputs(fixed).items()}
    if still:
        hint = " ".join(f"{k}={'x'.join(str(d) if isinstance(d, int) and d > 0 else 'N' for d in v)}"
                        for k, v in still.items())
        raise ConversionError(f"input(s) {sorted(still)} have dynamic dimensions {still}; TFLite "
                              f"and Core ML need static shapes: pass --input-shape {hint} "
                              "(N = the size you want)")
    prepared = simplify(constants_to_initializers(fixed), dict(one) if one else None)
    prepared = canonicalize_slices(rename_nodes(constants_to_initializers(prepared)))
    return drop_noop_slices(prepared)


def tensor_shapes(model: onnx.ModelProto) -> dict[str, list[Any]]:
    """Shapes of every typed value (inputs, outputs, inferred intermediates) by name."""
    shapes: dict[str, list[Any]] = {}
    for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        t = value.type.tensor_type
        if t.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None
                                  for d in t.shape.dim]
    return shapes


def _unique(name: str, taken: set[str]) -> str:
    candidate, i = name, 1
    while candidate in taken:
        candidate = f"{name}_{i}"
        i += 1
    return candidate


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    names = {i.name for i in model.graph.initializer}
    names |= {v.name for v in [*model.graph.input, *model.graph.output, *model.graph.value_info]}
    for node in iter_nodes(model.graph):
        names.update(node.input)
        names.update(node.output)
    return names


def rename_outputs(model: onnx.ModelProto, names: Sequence[str]) -> tuple[onnx.ModelProto,
                                                                           dict[str, str]]:
    """Give the graph outputs ``names`` by position (an empty name keeps the old one); every use
    of the tensor is renamed with it, and a name already taken gets a ``_1`` suffix.

    Returns the model and ``{old: new}`` for the outputs that changed."""
    model = _copy(model)
    taken = _tensor_names(model)
    renamed: dict[str, str] = {}
    for value, wanted in zip(model.graph.output, names, strict=False):
        if not wanted or wanted == value.name:
            continue
        new = _unique(wanted, taken)
        taken.add(new)
        renamed[value.name] = new
    if not renamed:
        return model, {}
    for value in [*model.graph.output, *model.graph.value_info]:
        value.name = renamed.get(value.name, value.name)
    for node in iter_nodes(model.graph):
        for seq in (node.input, node.output):
            for k, name in enumerate(seq):
                if name in renamed:
                    seq[k] = renamed[name]
    return model, renamed


def _readable_output(name: str, index: int) -> str:
    base = re.sub(r":\d+$", "", name)
    return f"output_{index}" if not base or _GENERIC_OUTPUT.match(base) else base


def _batch_symbols(model: onnx.ModelProto) -> set[str]:
    """The symbols exporters gave the first axis of the inputs (``s77``, ``unk__0``, ``N``) and,
    when the inputs have one, of the outputs (the same batch, named apart by tf2onnx)."""
    def first(values: Sequence[onnx.ValueInfoProto]) -> set[str]:
        dims = [v.type.tensor_type.shape.dim for v in values if v.type.tensor_type.shape.dim]
        return {d[0].dim_param for d in dims if d[0].dim_param}

    inputs = first(_graph_inputs(model))
    return inputs | first(list(model.graph.output)) if inputs else set()


def readable_names(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Exporter symbols replaced by names people can read; returns the model and notes.

    The first-axis symbol of inputs and outputs becomes ``batch`` everywhere it appears; output
    names with a TensorFlow port suffix lose it (``probs:0`` → ``probs``), and names that only
    say which op came last (``Identity:0``, ``StatefulPartitionedCall:1``) become
    ``output_<i>``. Input names are kept: data files are keyed by them.
    """
    model = _copy(model)
    symbols = _batch_symbols(model) - {BATCH}
    if symbols:
        values = [*model.graph.input, *model.graph.output, *model.graph.value_info]
        for value in values:
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param in symbols:
                    dim.dim_param = BATCH
    wanted = [_readable_output(v.name, i) for i, v in enumerate(model.graph.output)]
    model, renamed = rename_outputs(model, wanted)
    notes = [f"outputs renamed: {', '.join(f'{a} → {b}' for a, b in renamed.items())}"] \
        if renamed else []
    if symbols:
        notes.append(f"batch axis {', '.join(sorted(symbols))} named {BATCH}")
    return model, notes
