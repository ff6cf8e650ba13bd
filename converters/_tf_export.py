"""Child-process entry point: a ``.keras`` file or SavedModel folder → ONNX with tf2onnx.

Run as ``python -m edgeserve.converters._tf_export SOURCE OUT.onnx``. TensorFlow is imported only
here, in a child process, so its start-up time and its warnings stay out of the converter.

Besides ``OUT.onnx`` it writes ``OUT.json`` = ``{"outputs": [names]}``: the names the source gives
its outputs (a SavedModel signature's keys, a Keras model's dict keys, else ``output_0`` … as
``keras.Model.export`` names them), in the order of the ONNX graph's outputs, so the converter can
replace tf2onnx's ``Identity:0``-style names.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["export"]


@dataclass
class _Traced:
    """A tf.function to convert, its input specs and output names, and what it calls.

    ``keep`` holds the loaded Keras model or SavedModel object: the function only references
    their variables weakly, so they must stay alive until tf2onnx has traced the function
    (else TensorFlow fails with "Called a function referencing variables which have been
    deleted").
    """

    call: Any
    specs: list[Any]
    outputs: list[str]
    keep: Any


def _keras_function(path: Path) -> _Traced:
    import keras
    import tensorflow as tf

    model = keras.saving.load_model(str(path), compile=False)
    specs = [tf.TensorSpec([None, *t.shape[1:]], t.dtype, name=t.name.split(":")[0])
             for t in model.inputs]
    try:
        named = isinstance(model.output, dict)
    except (AttributeError, ValueError):  # a Sequential model never called has no .output
        named = False
    count = len(model.outputs)
    names = list(model.output_names) if named else [f"output_{i}" for i in range(count)]

    @tf.function(input_signature=specs)  # type: ignore[untyped-decorator]
    def call(*args: Any) -> Any:
        result = model(list(args) if len(args) > 1 else args[0])
        if named:
            return [result[k] for k in names]
        return list(result) if isinstance(result, list | tuple) else [result]

    return _Traced(call, specs, names, model)


def _saved_model_function(path: Path) -> _Traced:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    if "serving_default" not in loaded.signatures:
        raise SystemExit(f"{path}: the SavedModel has no 'serving_default' signature")
    concrete = loaded.signatures["serving_default"]
    named = concrete.structured_input_signature[1]
    specs = [tf.TensorSpec(s.shape, s.dtype, name=k) for k, s in sorted(named.items())]
    keys = sorted(named)
    outputs = sorted(concrete.structured_outputs)

    @tf.function(input_signature=specs)  # type: ignore[untyped-decorator]
    def call(*args: Any) -> Any:
        result = concrete(**dict(zip(keys, args, strict=True)))
        return [result[k] for k in outputs]

    return _Traced(call, specs, outputs, loaded)


def export(source: Path, out: Path) -> None:
    """Convert ``source`` to ``out`` (ONNX, opset 17) and write the output names next to it."""
    import tf2onnx

    traced = _saved_model_function(source) if source.is_dir() else _keras_function(source)
    proto, _ = tf2onnx.convert.from_function(traced.call, input_signature=traced.specs, opset=17)
    out.write_bytes(proto.SerializeToString())
    out.with_suffix(".json").write_text(json.dumps({"outputs": traced.outputs}))
    del traced  # the loaded objects were needed up to here (see _Traced)


if __name__ == "__main__":
    export(Path(sys.argv[1]), Path(sys.argv[2]))
