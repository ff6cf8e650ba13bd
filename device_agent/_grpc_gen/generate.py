"""Regenerate the gRPC code from the published Open Inference Protocol proto (build step).

``open_inference_grpc.proto`` is copied unmodified from the KServe open-inference-protocol
repository (specification/protocol/open_inference_grpc.proto, Apache-2.0);
``triton_extensions.proto`` holds the messages of the repository index and statistics RPCs,
wire-compatible with Triton's (messages only: the server registers the two methods itself). Run
``python device_agent/_grpc_gen/generate.py`` (needs grpcio-tools, in the ``dev`` extra); a test
checks that the committed modules equal a fresh generation.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "open_inference_grpc.proto"
EXTENSIONS_PROTO = "triton_extensions.proto"
MODULES = ("open_inference_grpc_pb2.py", "open_inference_grpc_pb2_grpc.py",
           "triton_extensions_pb2.py")


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    args = ["protoc", f"-I{HERE}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
            str(HERE / PROTO)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    grpc_module = out_dir / "open_inference_grpc_pb2_grpc.py"
    text = grpc_module.read_text()
    # protoc writes an absolute import; the package needs it relative.
    text = re.sub(r"^import open_inference_grpc_pb2 as", "from . import open_inference_grpc_pb2 as",
                  text, flags=re.M)
    grpc_module.write_text(text)
    # messages only (no service): no _grpc module to generate
    if protoc.main(["protoc", f"-I{HERE}", f"--python_out={out_dir}",
                    str(HERE / EXTENSIONS_PROTO)]) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    if target == HERE:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp))
            for name in MODULES:
                (HERE / name).write_text((Path(tmp) / name).read_text())
    else:
        generate(target)
