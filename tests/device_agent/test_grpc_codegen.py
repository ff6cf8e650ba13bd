"""The committed gRPC code is exactly what grpcio-tools generates from the published proto."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

GEN = Path(__file__).resolve().parents[2] / "device_agent" / "_grpc_gen"


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    """Regenerating from the two protos reproduces the committed modules byte for byte."""
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.fail("grpcio-tools (dev extra) is needed to check the generated gRPC code")
    # protoc runs in its own process: in-process it can crash beside TensorFlow's protobuf.
    subprocess.run([sys.executable, str(GEN / "generate.py"), str(tmp_path)], check=True,
                   timeout=120)
    for name in ("open_inference_grpc_pb2.py", "open_inference_grpc_pb2_grpc.py",
                 "triton_extensions_pb2.py"):
        assert (tmp_path / name).read_text() == (GEN / name).read_text(), name
    assert "service GRPCInferenceService" in (GEN / "open_inference_grpc.proto").read_text()
