"""Acceptance 4: pre-flight errors name the op and the target, or the limit with its numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeserve.converters import convert
from edgeserve.errors import ConversionError, ProfileLimitError, UnsupportedOpError
from edgeserve.testing import KeyPair

from .conftest import write_profile

ONNX_ONLY = """
schema = "edgeserve.profile/1"
name = "{name}"
title = "Test profile"
device_class = "desktop"
vendor = "test"

[hardware]
arch = "any"
cpu = "any"
cores = 2
memory_mb = 64
storage_mb = 64

[budgets]
max_model_bytes = {max_bytes}
cache_bytes = 100_000_000

[runtimes.onnxruntime]
[runtimes.litert]

[[artifacts]]
format = "{fmt}"
precision = "fp32"

[limits.unsupported_ops]
{fmt} = {unsupported}
"""


def gelu_mlp(path: Path) -> Path:
    """A tiny MLP with an Erf-based GELU, written as ONNX (input x [batch, 4])."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "w")
    half = numpy_helper.from_array(np.array(0.7071, dtype=np.float32), "half")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="dense"),
             helper.make_node("Mul", ["h", "half"], ["hs"], name="scale"),
             helper.make_node("Erf", ["hs"], ["y"], name="gelu_erf")]
    graph = helper.make_graph(nodes, "mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
                              [w, half])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture
def mlp(tmp_path: Path) -> Path:
    return gelu_mlp(tmp_path / "mlp.onnx")


def _profile(tmp_path: Path, name: str, fmt: str = "onnx", max_bytes: int = 10**9,
             unsupported: str = "[]") -> Path:
    return write_profile(tmp_path / "profiles", ONNX_ONLY.format(
        name=name, fmt=fmt, max_bytes=max_bytes, unsupported=unsupported))


def _data() -> dict[str, Any]:
    return {"x": np.random.default_rng(1).standard_normal((40, 4)).astype(np.float32)}


def test_unsupported_op_fails_before_building_and_names_op_and_target(
        mlp: Path, tmp_path: Path, keypair: KeyPair) -> None:
    """A model with Erf for a TFLite target that lacks Erf stops in pre-flight, naming both."""
    profile = _profile(tmp_path, "no-erf", fmt="tflite", unsupported='["Erf", "TopK"]')
    with pytest.raises(UnsupportedOpError) as caught:
        convert(mlp, profiles=[str(profile)], name="mlp", version="1.0.0", calibration=_data(),
                out=tmp_path / "out", sign_key=keypair.private, show_progress=False)
    message = str(caught.value)
    assert "Erf" in message and "gelu_erf" in message and "tflite" in message
    assert "no-erf" in message and "TopK" not in message
    assert not (tmp_path / "out").exists()


def test_shipped_mcu_profile_rejects_erf(mlp: Path, tmp_path: Path, keypair: KeyPair) -> None:
    """The shipped esp32-s3 profile lists Erf as unsupported for its TFLite Micro target."""
    with pytest.raises(UnsupportedOpError, match=r"esp32-s3: target tflite cannot run op\(s\) Erf"):
        convert(mlp, profiles=["esp32-s3"], name="mlp", version="1.0.0", calibration=_data(),
                out=tmp_path / "out", sign_key=keypair.private, show_progress=False)


def test_model_bytes_over_the_profile_budget_fail_early_with_numbers(
        mlp: Path, tmp_path: Path, keypair: KeyPair) -> None:
    """A model bigger than max_model_bytes fails pre-flight with both numbers in the message."""
    profile = _profile(tmp_path, "tiny-flash", max_bytes=50)
    with pytest.raises(ProfileLimitError) as caught:
        convert(mlp, profiles=[str(profile)], name="mlp", version="1.0.0", calibration=_data(),
                out=tmp_path / "out", sign_key=keypair.private, show_progress=False)
    message = str(caught.value)
    assert "tiny-flash" in message and "max_model_bytes of 50" in message
    assert "onnx-fp32 would be about" in message


def test_keep_going_builds_the_other_profiles_and_reports_the_blocked_one(
        mlp: Path, tmp_path: Path, keypair: KeyPair) -> None:
    """With keep_going a pre-flight failure marks its profile failed; the others still build."""
    blocked = _profile(tmp_path, "tiny-flash", max_bytes=50)
    fine = _profile(tmp_path, "roomy")
    result = convert(mlp, profiles=[str(blocked), str(fine)], name="mlp", version="1.0.0",
                     calibration=_data(), out=tmp_path / "out", sign_key=keypair.private,
                     keep_going=True, show_progress=False)
    assert not result.ok
    assert result.report["profiles"]["tiny-flash"]["status"] == "failed"
    assert "max_model_bytes" in result.report["profiles"]["tiny-flash"]["reasons"][0]
    assert result.report["profiles"]["roomy"]["status"] == "passed"
    assert result.package is not None and result.report["preflight"][0]["kind"] == "bytes"


def test_int8_static_without_calibration_is_refused(mlp: Path, tmp_path: Path,
                                                    keypair: KeyPair) -> None:
    """raspberry-pi-5 needs int8 static: no calibration data is a clear error, not random ranges."""
    with pytest.raises(ConversionError, match="need calibration data.*--allow-random-calibration"):
        convert(mlp, profiles=["x86-industrial-pc"], name="mlp", version="1.0.0",
                out=tmp_path / "out", sign_key=keypair.private, show_progress=False)


def test_random_calibration_when_allowed_is_reported(mlp: Path, tmp_path: Path,
                                                     keypair: KeyPair) -> None:
    """--allow-random-calibration builds int8 and the report says the calibration was random."""
    result = convert(mlp, profiles=["x86-industrial-pc"], name="mlp", version="1.0.0",
                     out=tmp_path / "out", sign_key=keypair.private, show_progress=False,
                     allow_random_calibration=True)
    assert result.report["data"]["random_calibration"] is True
    assert any("random" in n for n in result.report["data"]["notes"])
    assert {a["id"] for a in result.report["artifacts"]} == {"onnx-int8-static", "onnx-fp32"}
