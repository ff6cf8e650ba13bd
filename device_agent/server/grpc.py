"""The gRPC server: the OIP ``inference.GRPCInferenceService`` from the published proto.

Message and service code is generated (``.._grpc_gen``); this module maps it onto the
:class:`~.dataplane.DataPlane`. Tensors travel in ``raw_input_contents``/``raw_output_contents``
(what tritonclient sends and expects) or in the typed ``contents`` fields.

The servicer runs on a ``grpc.aio`` event loop: grpcio's synchronous server hands every call to
a thread of its pool and back, which cost more than a small model's whole inference (profiled,
docs/benchmarks.md). Inferences go through the same :class:`~.dataplane.LoadGate` as HTTP's:
cheap models run on the loop, others on the inference workers, and a full queue gets
RESOURCE_EXHAUSTED at once (``maximum_concurrent_rpcs`` bounds admission as well).

The published OIP proto has no repository index or statistics RPCs; :func:`service_handler`
also serves Triton's ``RepositoryIndex`` and ``ModelStatistics`` under the same service name, with
messages from ``triton_extensions.proto`` (wire-compatible with Triton's), so
``tritonclient.grpc`` can call them as ServerMetadata advertises.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np

from edgeserve.auth import Authenticator
from edgeserve.errors import (
    AuthError,
    EdgeserveError,
    ForbiddenError,
    InvalidInputError,
    ModelNotFoundError,
    OverloadedError,
    TooLargeError,
)

from .._grpc_gen import open_inference_grpc_pb2 as pb
from .._grpc_gen import triton_extensions_pb2 as ext
from .codec import (
    DATATYPES,
    checked_shape,
    datatype_of,
    decode_bytes_tensor,
    encode_bytes_tensor,
)
from .dataplane import DataPlane, LoadGate
from .limits import SMALL_ANSWER, SMALL_BODY, TRIM_AT, Hold, MemoryBudget, release_memory
from .metrics import MetricsRegistry

__all__ = ["SERVICE", "InferenceServicer", "service_handler", "status_for"]

log = logging.getLogger("edgeserve.agent.grpc")
T = TypeVar("T")
SERVICE = "inference.GRPCInferenceService"

_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
             "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
             "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
             "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def status_for(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, ForbiddenError):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(exc, AuthError):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(exc, ModelNotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, TooLargeError):  # gRPC's own code for a message past the limit
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, InvalidInputError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, OverloadedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, EdgeserveError) and 400 <= exc.http_status < 500:
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL


def _decode_input(tensor: Any, raw: bytes | None) -> np.ndarray:
    name, datatype = tensor.name, tensor.datatype
    if datatype not in DATATYPES:
        raise InvalidInputError(f"input {name!r}: datatype {datatype!r} is not one of "
                                f"{sorted(DATATYPES)}")
    shape, count = checked_shape([int(d) for d in tensor.shape], name)
    if raw is not None:
        if datatype == "BYTES":
            return decode_bytes_tensor(raw, count, name).reshape(shape)
        dtype = DATATYPES[datatype]
        if len(raw) != count * dtype.itemsize:
            raise InvalidInputError(f"input {name!r}: raw content is {len(raw)} bytes, shape "
                                    f"{shape} of {datatype} needs {count * dtype.itemsize}")
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    field = _CONTENTS.get(datatype)
    if field is None:
        raise InvalidInputError(f"input {name!r}: {datatype} must be sent in raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidInputError(f"input {name!r}: shape {shape} needs {count} values, contents "
                                f"has {len(values)}")
    if datatype == "BYTES":
        return np.array(list(values), dtype=object).reshape(shape)
    # streamed: a list of the values first would cost ~32 bytes per number
    return np.fromiter(values, dtype=DATATYPES[datatype], count=count).reshape(shape)


class _LazyHold:
    """A :class:`Hold` made at its first reservation: small calls reserve nothing (the server
    keeps back for them at start, :data:`~.limits.SMALL_BODY`), and finding the client (the
    call's peer, a string formatted by gRPC core) cost ~5 % of a small call's throughput
    (docs/benchmarks.md)."""

    __slots__ = ("_budget", "_context", "_hold")

    def __init__(self, budget: MemoryBudget, context: grpc.aio.ServicerContext) -> None:
        self._budget, self._context = budget, context
        self._hold: Hold | None = None

    def _get(self) -> Hold:
        if self._hold is None:
            self._hold = self._budget.hold(_client_of(self._context))
        return self._hold

    def force(self, n: int) -> None:
        self._get().force(n)

    async def take(self, n: int) -> None:
        await self._get().take(n)

    def release(self) -> int:
        return self._hold.release() if self._hold is not None else 0


def _client_of(context: grpc.aio.ServicerContext) -> str:
    """The peer's address without its port (``ipv4:10.0.0.5:53211`` → ``10.0.0.5``)."""
    peer = context.peer() or ""
    host = peer.split(":", 1)[-1].rsplit(":", 1)[0]
    return host.strip("[]")


class InferenceServicer:
    """Implements every RPC of the OIP service over a :class:`DataPlane`, on a ``grpc.aio``
    server's loop; inferences are run by ``gate`` (inline when cheap, else on its workers)."""

    def __init__(self, plane: DataPlane, metrics: MetricsRegistry,
                 auth: Authenticator | None = None, budget: MemoryBudget | None = None,
                 gate: LoadGate | None = None) -> None:
        self.plane = plane
        self.metrics = metrics
        self.auth = auth
        self.budget = budget or MemoryBudget()
        self.gate = gate or LoadGate()
        self.reading = asyncio.Semaphore(self.gate.workers)

    async def _call(self, context: grpc.aio.ServicerContext, fn: Callable[[], Awaitable[T]],
                    public: bool = False) -> T:
        try:
            if self.auth is not None and not public:
                metadata = dict(context.invocation_metadata() or ())
                self.auth.check(metadata.get("authorization"))
            result = await fn()
        except Exception as exc:
            code = status_for(exc)
            if code == grpc.StatusCode.INTERNAL and not isinstance(exc, EdgeserveError):
                log.exception("internal error in a gRPC call")
                message = f"internal server error ({type(exc).__name__})"
            else:
                message = str(exc)
            self.metrics.count_request("grpc", code.name)
            await context.abort(code, message)
        self.metrics.count_request("grpc", "OK")
        return result

    def _now(self, context: grpc.aio.ServicerContext, build: Callable[[], T],
             public: bool = False) -> Awaitable[T]:
        """:meth:`_call` for the cheap RPCs, answered on the loop."""
        async def run() -> T:
            return build()
        return self._call(context, run, public)

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._now(context, lambda: pb.ServerLiveResponse(live=self.plane.live()),
                               True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._now(context, lambda: pb.ServerReadyResponse(
            ready=self.plane.ready()), True)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._now(context, lambda: pb.ModelReadyResponse(
            ready=self.plane.model_ready(request.name, request.version or None)))

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._now(context, lambda: pb.ServerMetadataResponse(
            **self.plane.server_metadata()))

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        def build() -> Any:
            meta = self.plane.model_metadata(request.name, request.version or None)
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                inputs=[tensor(**t) for t in meta["inputs"]],
                outputs=[tensor(**t) for t in meta["outputs"]],
                properties={k: str(v) for k, v in meta["parameters"].items()})
        return await self._now(context, build)

    async def ModelInfer(self, requests: Any, context: grpc.aio.ServicerContext) -> Any:
        hold = _LazyHold(self.budget, context)
        try:
            return await self._call(context, lambda: self._infer(context, hold))
        finally:
            if hold.release() >= TRIM_AT:  # hand a big request's heap back, off the loop
                asyncio.get_running_loop().run_in_executor(None, release_memory)

    async def _infer(self, context: grpc.aio.ServicerContext, hold: _LazyHold) -> Any:
        """Admit the call, then read its message: :func:`service_handler` registers ModelInfer
        as client-streaming (the same bytes on the wire as a unary call), so that the message
        is read only here. Until then it waits in the stream's 64 KiB flow-control window; as
        in a pool of ``workers`` threads, at most ``workers`` messages are read at once (each
        counted twice, a quarter of the memory budget at the largest message the server takes,
        :func:`~.runner.grpc_message_cap`)."""
        self.gate.admit()
        try:
            async with self.reading:
                request = await context.read()
                if request is grpc.aio.EOF:
                    raise InvalidInputError("ModelInfer: the call ended without a request "
                                            "message; send one ModelInferRequest")
                # the message arrived whole (its bytes and the parsed message): count it, then
                # reserve what decoding takes (a copy of the raw contents, or the arrays of
                # typed contents)
                size = request.ByteSize()
                small = size <= SMALL_BODY  # kept back for at start (limits.SMALL_BODY)
                if not small:
                    hold.force(2 * size)
                    await hold.take(size)
                return await self.gate.run(lambda: self._infer_sync(request, hold, small),
                                           request.model_name, size)
        finally:
            self.gate.release()

    def _infer_sync(self, request: Any, hold: _LazyHold, small: bool = False) -> Any:
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise InvalidInputError(f"{len(raw)} raw_input_contents for {len(request.inputs)} "
                                    "inputs; send one per input, in order")
        inputs: dict[str, np.ndarray] = {}
        for i, tensor in enumerate(request.inputs):
            if tensor.name in inputs:
                raise InvalidInputError(f"input {tensor.name!r} appears twice")
            inputs[tensor.name] = _decode_input(tensor, raw[i] if raw else None)
        result = self.plane.infer(request.model_name, request.model_version or None, inputs,
                                  request.id or None)
        wanted = [o.name for o in request.outputs] or list(result.outputs)
        unknown = [n for n in wanted if n not in result.outputs]
        if unknown:
            raise InvalidInputError(f"requested output(s) {unknown} do not exist; the model has "
                                    f"{list(result.outputs)}")
        produced = sum(int(result.outputs[n].nbytes) * 2 for n in wanted)
        if not small or produced > SMALL_ANSWER:
            hold.force(produced)
        response = pb.ModelInferResponse(model_name=request.model_name,
                                         model_version=result.version, id=request.id)
        for name in wanted:
            array = result.outputs[name]
            response.outputs.add(name=name, datatype=datatype_of(array), shape=list(array.shape))
            response.raw_output_contents.append(
                encode_bytes_tensor(array) if array.dtype.kind in "OSU"
                else np.ascontiguousarray(array).tobytes())
        return response

    # -- extensions (not in the OIP proto; registered by extension_handler) ----------------------

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        def build() -> Any:
            index = self.plane.repository_index(bool(request.ready))
            return ext.RepositoryIndexResponse(
                models=[ext.RepositoryIndexResponse.ModelIndex(**entry) for entry in index])
        return await self._now(context, build)

    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        def build() -> Any:
            stats = self.plane.model_statistics(self.metrics, request.name or None,
                                                request.version or None)
            return ext.ModelStatisticsResponse(model_stats=[
                ext.ModelStatistics(**{k: v for k, v in entry.items() if k != "batch_stats"})
                for entry in stats["model_stats"]])
        return await self._now(context, build)


def service_handler(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """Every method of ``inference.GRPCInferenceService``: the OIP's own, with ModelInfer
    registered as client-streaming (see :meth:`InferenceServicer._infer`; a unary client sends
    the same frames), and Triton's RepositoryIndex and ModelStatistics extensions."""
    def unary(method: Callable[[Any, grpc.aio.ServicerContext], Any], request: Any,
              response: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            method, request_deserializer=request.FromString,
            response_serializer=response.SerializeToString)

    return grpc.method_handlers_generic_handler(SERVICE, {
        "ServerLive": unary(servicer.ServerLive, pb.ServerLiveRequest, pb.ServerLiveResponse),
        "ServerReady": unary(servicer.ServerReady, pb.ServerReadyRequest,
                             pb.ServerReadyResponse),
        "ModelReady": unary(servicer.ModelReady, pb.ModelReadyRequest, pb.ModelReadyResponse),
        "ServerMetadata": unary(servicer.ServerMetadata, pb.ServerMetadataRequest,
                                pb.ServerMetadataResponse),
        "ModelMetadata": unary(servicer.ModelMetadata, pb.ModelMetadataRequest,
                               pb.ModelMetadataResponse),
        "ModelInfer": grpc.stream_unary_rpc_method_handler(
            servicer.ModelInfer, request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=pb.ModelInferResponse.SerializeToString),
        "RepositoryIndex": unary(servicer.RepositoryIndex, ext.RepositoryIndexRequest,
                                 ext.RepositoryIndexResponse),
        "ModelStatistics": unary(servicer.ModelStatistics, ext.ModelStatisticsRequest,
                                 ext.ModelStatisticsResponse),
    })
