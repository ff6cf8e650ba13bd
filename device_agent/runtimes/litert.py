"""LiteRT backend: ``ai_edge_litert`` Interpreter, or the older ``tflite_runtime`` on boards that
only have that. Threads and delegates come from the profile.

An interpreter is not thread-safe and holds its tensors between calls, so the backend keeps a pool
of interpreters (one per concurrent caller, up to ``pool_size``). A model whose batch axis is fixed
(e.g. 1) still takes larger batches: they are run sample by sample and stacked.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any

import numpy as np

from edgeserve.errors import InvalidInputError, RuntimeUnavailableError
from edgeserve.profiles import HardwareProfile

from . import ArtifactSource, TensorInfo

__all__ = ["LiteRtRuntime", "import_interpreter"]

_DELEGATE_LIBRARIES = {"edgetpu": "libedgetpu.so.1", "gpu": "libtensorflowlite_gpu_delegate.so",
                       "hexagon": "libhexagon_delegate.so"}


def import_interpreter() -> tuple[Any, Any]:
    """(Interpreter class, load_delegate) from ai_edge_litert, else tflite_runtime."""
    try:
        from ai_edge_litert import interpreter as lite
    except ImportError:
        try:
            from tflite_runtime import interpreter as lite  # type: ignore[no-redef]
        except ImportError:
            raise RuntimeUnavailableError(
                "no TFLite runtime here: install ai-edge-litert (or tflite-runtime on boards "
                "without it)") from None
    return lite.Interpreter, lite.load_delegate


def _shape(detail: dict[str, Any]) -> tuple[int | None, ...]:
    signature = detail.get("shape_signature")
    dims = signature if signature is not None and len(signature) else detail["shape"]
    return tuple(None if int(d) < 0 else int(d) for d in dims)


def _info(detail: dict[str, Any]) -> TensorInfo:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    quant = (float(scale), int(zero_point)) if scale else None
    return TensorInfo(detail["name"], np.dtype(detail["dtype"]), _shape(detail), quant)


class _Interp:
    """One interpreter and the input shapes it is currently allocated for."""

    def __init__(self, interpreter: Any) -> None:
        self.interpreter = interpreter
        interpreter.allocate_tensors()
        self.inputs = interpreter.get_input_details()
        self.outputs = interpreter.get_output_details()
        self.shapes = [tuple(int(d) for d in i["shape"]) for i in self.inputs]
        self.fixed = [tuple(int(d) for d in (i.get("shape_signature") if i.get("shape_signature")
                                             is not None else i["shape"])) for i in self.inputs]


class LiteRtRuntime:
    kind = "litert"

    def __init__(self, source: ArtifactSource, profile: HardwareProfile,
                 pool_size: int = 1) -> None:
        self._interpreter_cls, self._load_delegate = import_interpreter()
        if source.content is None:
            if source.path is None:
                raise RuntimeUnavailableError("no TFLite model content to load")
            source = ArtifactSource(content=source.path.read_bytes())
        self._content = source.content
        settings = profile.runtimes.litert
        self._threads = (settings.threads or None) if settings else None
        self._delegates = [d for d in (settings.delegates if settings else [])
                           if d.lower() != "xnnpack"]
        self._pool: queue.LifoQueue[_Interp] = queue.LifoQueue()
        self._created = 0
        self._max = max(1, pool_size)
        self._lock = threading.Lock()
        first = self._new()
        self._pool.put(first)
        self.inputs = [_info(d) for d in first.inputs]
        self.outputs = [_info(d) for d in first.outputs]
        self._index = {d["name"]: i for i, d in enumerate(first.inputs)}

    def _new(self) -> _Interp:
        delegates = []
        for name in self._delegates:
            library = _DELEGATE_LIBRARIES.get(name.lower(), name)
            try:
                delegates.append(self._load_delegate(library))
            except (ValueError, OSError, RuntimeError) as exc:
                raise RuntimeUnavailableError(
                    f"the profile asks for the LiteRT delegate {name!r} ({library}), which cannot "
                    f"be loaded here: {exc}") from None
        try:
            interpreter = self._interpreter_cls(model_content=self._content,
                                                num_threads=self._threads,
                                                experimental_delegates=delegates or None)
            made = _Interp(interpreter)
        except (ValueError, RuntimeError) as exc:
            raise RuntimeUnavailableError(f"LiteRT cannot load the artifact: {exc}") from None
        self._created += 1
        return made

    def _acquire(self) -> _Interp:
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._created < self._max:
                return self._new()
        return self._pool.get()

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        interp = self._acquire()
        try:
            arrays = [feeds[d["name"]] for d in interp.inputs]
            if self._needs_split(interp, arrays):
                parts = [self._invoke(interp, [a[i:i + 1] for a in arrays])
                         for i in range(arrays[0].shape[0])]
                return [np.concatenate([p[k] for p in parts]) for k in range(len(self.outputs))]
            return self._invoke(interp, arrays)
        finally:
            self._pool.put(interp)

    @staticmethod
    def _needs_split(interp: _Interp, arrays: list[np.ndarray]) -> bool:
        """True when the batch differs from a batch axis the model fixed at 1."""
        for array, fixed in zip(arrays, interp.fixed, strict=True):
            if array.ndim and fixed and fixed[0] == 1 and array.shape[0] != 1 \
                    and tuple(array.shape[1:]) == tuple(fixed[1:]):
                return True
        return False

    def _invoke(self, interp: _Interp, arrays: list[np.ndarray]) -> list[np.ndarray]:
        it = interp.interpreter
        shapes = [tuple(a.shape) for a in arrays]
        if shapes != interp.shapes:
            try:
                for detail, shape in zip(interp.inputs, shapes, strict=True):
                    it.resize_tensor_input(detail["index"], list(shape), strict=True)
                it.allocate_tensors()
            except (ValueError, RuntimeError) as exc:
                interp.shapes = []
                raise InvalidInputError(f"the TFLite artifact cannot take input shapes "
                                        f"{shapes}: {exc}") from None
            interp.shapes = shapes
        for detail, array in zip(interp.inputs, arrays, strict=True):
            it.set_tensor(detail["index"], np.ascontiguousarray(array))
        it.invoke()
        return [it.get_tensor(d["index"]).copy() for d in interp.outputs]

    def close(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self._pool.get_nowait()
