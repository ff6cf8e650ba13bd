"""The ceiling for bench/agent.py part (b): the least server that answers the same OIP calls.

HTTP: one Starlette route that parses the OIP JSON body with orjson, runs the ONNX Runtime
session on the event loop and writes the answer with orjson (uvicorn, uvloop, httptools). gRPC:
one ``grpc.aio`` ModelInfer handler on the same loop, typed ``fp32_contents`` in, raw bytes out.
No validation, limits, auth, metrics or telemetry: what is left is the cost of the web stack
and the runtime, which is what the agent's servers are measured against.

    python bench/bare_server.py MODEL.onnx HTTP_PORT GRPC_PORT
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeserve.device_agent._grpc_gen import open_inference_grpc_pb2 as pb
from edgeserve.device_agent._grpc_gen import open_inference_grpc_pb2_grpc as pb_grpc

_DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}


def main() -> None:
    model, http_port, grpc_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    async def infer(request: Request) -> Response:
        body = orjson.loads(await request.body())
        feeds = {i["name"]: np.asarray(i["data"], dtype=_DTYPES[i["datatype"]]).reshape(i["shape"])
                 for i in body["inputs"]}
        outputs = session.run(names, feeds)
        return Response(orjson.dumps({"model_name": "toy", "outputs": [
            {"name": n, "datatype": "FP32", "shape": list(o.shape), "data": o.ravel().tolist()}
            for n, o in zip(names, outputs, strict=True)]}), media_type="application/json")

    async def ready(request: Request) -> Response:
        return Response(b"")

    class Servicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
        async def ModelInfer(self, request: object, context: object) -> object:
            feeds = {t.name: np.asarray(t.contents.fp32_contents, np.float32).reshape(
                list(t.shape)) for t in request.inputs}  # type: ignore[attr-defined]
            outputs = session.run(names, feeds)
            response = pb.ModelInferResponse(model_name="toy")
            for n, o in zip(names, outputs, strict=True):
                response.outputs.add(name=n, datatype="FP32", shape=list(o.shape))
                response.raw_output_contents.append(o.tobytes())
            return response

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        server = grpc.aio.server()  # on uvicorn's loop, beside the HTTP route
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(), server)
        server.add_insecure_port(f"127.0.0.1:{grpc_port}")
        await server.start()
        yield
        await server.stop(0)

    app = Starlette(routes=[Route("/v2/models/toy/infer", infer, methods=["POST"]),
                            Route("/v2/health/ready", ready)], lifespan=lifespan)
    uvicorn.run(app, host="127.0.0.1", port=http_port, loop="uvloop", http="httptools",
                ws="none", log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
