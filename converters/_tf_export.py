"""Child-process entry point: a ``.keras`` file or SavedModel folder → ONNX with tf2onnx.

Run as ``python -m edgeserve.converters._tf_export SOURCE OUT.onnx``. TensorFlow is imported only
here, in a child process, so its start-up time and its warnings stay out of the converter.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

__all__ = ["export"]


def _keras_function(path: Path) -> tuple[Any, list[Any]]:
    import keras
    import tensorflow as tf

    model = keras.saving.load_model(str(path), compile=False)
    specs = [tf.TensorSpec([None, *t.shape[1:]], t.dtype, name=t.name.split(":")[0])
             for t in model.inputs]

    @tf.function(input_signature=specs)  # type: ignore[untyped-decorator]
    def call(*args: Any) -> Any:
        return model(list(args) if len(args) > 1 else args[0])

    return call, specs


def _saved_model_function(path: Path) -> tuple[Any, list[Any]]:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    if "serving_default" not in loaded.signatures:
        raise SystemExit(f"{path}: the SavedModel has no 'serving_default' signature")
    concrete = loaded.signatures["serving_default"]
    named = concrete.structured_input_signature[1]
    specs = [tf.TensorSpec(s.shape, s.dtype, name=k) for k, s in sorted(named.items())]
    keys = sorted(named)

    @tf.function(input_signature=specs)  # type: ignore[untyped-decorator]
    def call(*args: Any) -> Any:
        result = concrete(**dict(zip(keys, args, strict=True)))
        return [result[k] for k in sorted(result)]

    return call, specs


def export(source: Path, out: Path) -> None:
    import tf2onnx

    call, specs = _saved_model_function(source) if source.is_dir() else _keras_function(source)
    proto, _ = tf2onnx.convert.from_function(call, input_signature=specs, opset=17)
    out.write_bytes(proto.SerializeToString())


if __name__ == "__main__":
    export(Path(sys.argv[1]), Path(sys.argv[2]))
