"""LiteRT backend: ``ai_edge_litert`` Interpreter, or the older ``tflite_runtime`` on boards that
only have that. Threads and delegates come from the profile.

An interpreter is not thread-safe and holds its tensors between calls, so the backend keeps a pool
of interpreters (one per concurrent caller, up to ``pool_size``). A model whose batch axis is fixed
(e.g. 1) still takes larger batches: they are run sample by sample and stacked.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from edgeserve.errors import InvalidInputError, RuntimeUnavailableError
from edgeserve.profiles import HardwareProfile

from . import ArtifactSource, TensorInfo

__all__ = ["LiteRtRuntime", "import_interpreter"]

log = logging.getLogger(__name__)

_UNAVAILABLE: dict[str, str] = {}
"""Delegate libraries that failed to load in this process (tried once, then skipped)."""
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


_BANNER = b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
_banner_lock = threading.Lock()
_banner_seen = False


@contextlib.contextmanager
def _without_xnnpack_banner() -> Iterator[None]:
    """LiteRT's C++ code writes ``INFO: Created TensorFlow Lite XNNPACK delegate for CPU.`` to
    fd 2 the first time a process allocates an interpreter, with no setting to turn it off.
    Around that first allocation fd 2 goes to a temporary file; everything else written there
    meanwhile (other threads' logs) is passed on afterwards, only that line is dropped."""
    global _banner_seen
    if _banner_seen:
        yield
        return
    with _banner_lock:
        if _banner_seen:
            yield
            return
        try:
            saved = os.dup(2)
        except OSError:  # no fd 2 at all: nothing to keep clean
            _banner_seen = True
            yield
            return
        with tempfile.TemporaryFile() as sink:
            sys.stderr.flush()
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                with contextlib.suppress(Exception):
                    sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                _banner_seen = True
                sink.seek(0)
                kept = [line for line in sink.read().splitlines(keepends=True)
                        if not line.startswith(_BANNER)]
                if kept:
                    os.write(2, b"".join(kept))


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
        with _without_xnnpack_banner():
            interpreter.allocate_tensors()
        self.inputs = interpreter.get_input_details()
        self.outputs = interpreter.get_output_details()
        self.shapes: list[tuple[int, ...]] = [tuple(int(d) for d in i["shape"])
                                              for i in self.inputs]
        self.fixed = [tuple(int(d) for d in (i.get("shape_signature") if i.get("shape_signature")
                                             is not None else i["shape"])) for i in self.inputs]
        self.names = [i["name"] for i in self.inputs]
        self.input_index = [i["index"] for i in self.inputs]
        self.output_index = [o["index"] for o in self.outputs]
        self.batch_one = any(f and f[0] == 1 for f in self.fixed)
        # One input and one output (most edge models): run() takes a path without loops.
        self.single = len(self.inputs) == 1 and len(self.outputs) == 1


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
        # The first interpreter is the primary, behind its own lock: a caller that finds it free
        # (every call of a single-threaded app) takes it with one non-blocking acquire. Callers
        # that find it busy share a pool of up to ``pool_size - 1`` more interpreters.
        self._free: list[_Interp] = []
        self._created = 0
        self._max = max(1, pool_size)
        self._lock = threading.Lock()
        self._returned = threading.Condition(self._lock)
        self._primary = first = self._new()
        self._primary_lock = threading.Lock()
        self.inputs = [_info(d) for d in first.inputs]
        self.outputs = [_info(d) for d in first.outputs]
        self._index = {d["name"]: i for i, d in enumerate(first.inputs)}

    def _delegate_objects(self) -> list[Any]:
        """The profile's delegates that load here, in its order of preference.

        A delegate is an accelerator the device class *may* have (a phone's GPU, an Edge TPU);
        where its library is missing the model still runs, on the CPU (XNNPACK), and the
        fallback is logged once per process instead of failing the model.
        """
        delegates = []
        for name in self._delegates:
            library = _DELEGATE_LIBRARIES.get(name.lower(), name)
            if library in _UNAVAILABLE:
                continue
            try:
                # a library that is not there fails here, before load_delegate builds a
                # half-made Delegate whose __del__ prints a traceback when it is collected
                ctypes.CDLL(library)
                delegates.append(self._load_delegate(library))
            except (ValueError, OSError, RuntimeError) as exc:
                _UNAVAILABLE[library] = str(exc)
                log.warning("LiteRT delegate %r (%s) cannot be loaded here (%s); running on the "
                            "CPU with XNNPACK instead", name, library, exc)
        return delegates

    def _new(self, counted: bool = False) -> _Interp:
        delegates = self._delegate_objects()
        try:
            interpreter = self._interpreter_cls(model_content=self._content,
                                                num_threads=self._threads,
                                                experimental_delegates=delegates or None)
            made = _Interp(interpreter)
        except (ValueError, RuntimeError) as exc:
            raise RuntimeUnavailableError(f"LiteRT cannot load the artifact: {exc}") from None
        if not counted:
            self._created += 1
        return made

    def _acquire(self) -> _Interp:
        """An interpreter from the pool beside the primary (made on demand up to the size)."""
        with self._lock:
            while True:
                if self._free:
                    return self._free.pop()
                if self._created < self._max:
                    self._created += 1
                    break
                self._returned.wait()
        try:
            return self._new(counted=True)
        except BaseException:
            with self._lock:
                self._created -= 1
            raise

    def _release(self, interp: _Interp) -> None:
        with self._lock:
            self._free.append(interp)
            self._returned.notify()

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        lock = self._primary_lock
        if lock.acquire(blocking=False):
            try:
                interp = self._primary
                if interp.single:
                    # The same shape as allocated (so no resize and no batch split) and
                    # contiguous: what _run_on would do, at a third of its cost per call.
                    array = feeds[interp.names[0]]
                    if array.shape == interp.shapes[0] and array.flags.c_contiguous:
                        it = interp.interpreter
                        it.set_tensor(interp.input_index[0], array)
                        it.invoke()
                        return [it.get_tensor(interp.output_index[0])]
                return self._run_on(interp, feeds)
            finally:
                lock.release()
        if self._max == 1:
            with lock:
                return self._run_on(self._primary, feeds)
        interp = self._acquire()
        try:
            return self._run_on(interp, feeds)
        finally:
            self._release(interp)

    def _run_on(self, interp: _Interp, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        arrays = [feeds[name] for name in interp.names]
        if interp.batch_one and self._needs_split(interp, arrays):
            parts = [self._invoke(interp, [a[i:i + 1] for a in arrays])
                     for i in range(arrays[0].shape[0])]
            return [np.concatenate([p[k] for p in parts]) for k in range(len(self.outputs))]
        return self._invoke(interp, arrays)

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
        shapes = [a.shape for a in arrays]
        if shapes != interp.shapes:
            self._resize(interp, shapes)
        for index, array in zip(interp.input_index, arrays, strict=True):
            it.set_tensor(index, array if array.flags.c_contiguous else
                          np.ascontiguousarray(array))
        it.invoke()
        # get_tensor returns a copy, so the result survives the next invoke.
        return [it.get_tensor(index) for index in interp.output_index]

    @staticmethod
    def _resize(interp: _Interp, shapes: list[tuple[int, ...]]) -> None:
        it = interp.interpreter
        try:
            for detail, shape in zip(interp.inputs, shapes, strict=True):
                it.resize_tensor_input(detail["index"], list(shape), strict=True)
            it.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            interp.shapes = []
            raise InvalidInputError(f"the TFLite artifact cannot take input shapes "
                                    f"{shapes}: {exc}") from None
        interp.shapes = shapes

    def close(self) -> None:
        with self._lock:
            self._free.clear()
