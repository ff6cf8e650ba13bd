"""`edgeserve convert` on files of every source kind, its exit codes, and the report files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeserve.cli import main
from edgeserve.converters import convert
from edgeserve.errors import ConfigError
from edgeserve.package import open_package
from edgeserve.testing import KeyPair

from .conftest import Digits, write_profile
from .test_preflight import ONNX_ONLY

STRICT_FP16 = """
schema = "edgeserve.profile/1"
name = "strict-fp16"
title = "Test profile whose fp16 budget nothing meets"
device_class = "desktop"
vendor = "test"

[hardware]
arch = "any"
cpu = "any"
cores = 2
memory_mb = 64
storage_mb = 64

[budgets]
max_model_bytes = 1_000_000_000
cache_bytes = 1_000_000_000

[runtimes.onnxruntime]

[[artifacts]]
format = "onnx"
precision = "fp16"

[validation.fp16]
min_cosine = 1.0
max_abs_error = 0.0
"""


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(["convert", *args])
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


def _common(key: KeyPair, out: Path, profile: Path) -> list[str]:
    return ["--profile", str(profile), "--name", "digits", "--version", "1.2.0", "--release", "3",
            "--sign-key", str(key.private_path), "--out", str(out)]


@pytest.fixture
def onnx_profile(tmp_path: Path) -> Path:
    return write_profile(tmp_path / "profiles", ONNX_ONLY.format(
        name="onnx-cpu", fmt="onnx", max_bytes=10**9, unsupported="[]"))


def test_cli_converts_an_onnx_file_and_prints_json(digits_onnx: Path, digits_npz: tuple[Path, Path],
                                                   onnx_profile: Path, tmp_path: Path,
                                                   keypair: KeyPair,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """An ONNX file with .npz data converts; --json prints the report; files land in --out."""
    calibration, evaluation = digits_npz
    code, out, err = _run(capsys, str(digits_onnx), "--calibration", str(calibration), "--eval",
                          str(evaluation), "--json", *_common(keypair, tmp_path / "out", onnx_profile))
    assert code == 0, err
    report = json.loads(out)
    assert report["ok"] and report["model"]["release"] == 3
    assert report["model"]["source"]["framework"] == "onnx"
    assert report["artifacts"][0]["validation"]["accuracy"] > 0.95
    assert (tmp_path / "out" / "digits-1.2.0.edgepkg").exists()
    assert json.loads((tmp_path / "out" / "digits-1.2.0.report.json").read_text())["ok"]
    with open_package(tmp_path / "out" / "digits-1.2.0.edgepkg", trust=keypair.trust) as pkg:
        assert pkg.manifest.release == 3 and pkg.manifest.source.filename == "digits.onnx"


def test_cli_exits_non_zero_when_a_required_artifact_fails(
        digits_onnx: Path, digits_npz: tuple[Path, Path], tmp_path: Path, keypair: KeyPair,
        capsys: pytest.CaptureFixture[str]) -> None:
    """An artifact that misses its budget leaves its profile nothing: table printed, exit 16."""
    profile = write_profile(tmp_path / "profiles", STRICT_FP16)
    calibration, evaluation = digits_npz
    code, out, err = _run(capsys, str(digits_onnx), "--calibration", str(calibration), "--eval",
                          str(evaluation), *_common(keypair, tmp_path / "out", profile))
    assert code == 16
    assert "strict-fp16" in err and "report.md" in err and "Traceback" not in err
    assert "onnx-fp16" in out and "failed" in out
    report = json.loads((tmp_path / "out" / "digits-1.2.0.report.json").read_text())
    assert report["ok"] is False and report["package"] is None
    assert any("cosine" in r for r in report["artifacts"][0]["validation"]["reasons"])


def test_cli_rejects_a_malformed_input_shape(digits_onnx: Path, onnx_profile: Path, tmp_path: Path,
                                             keypair: KeyPair,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """--input-shape must be NAME=D1xD2…; anything else is a one-line usage error."""
    code, _, err = _run(capsys, str(digits_onnx), "--input-shape", "image=1xbig",
                        *_common(keypair, tmp_path / "out", onnx_profile))
    assert code == 2 and "NAME=D1xD2" in err and "Traceback" not in err


def test_torchscript_file_with_input_shape(digits: Digits, tmp_path: Path, onnx_profile: Path,
                                           keypair: KeyPair,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A TorchScript file converts when --input-shape names and sizes its input."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch deprecates jit.trace itself
        scripted = torch.jit.trace(digits.module, torch.from_numpy(digits.x_test[:1]))
    path = tmp_path / "digits.pt"
    scripted.save(str(path))
    np.savez(tmp_path / "data.npz", image=digits.x_test)
    code, out, err = _run(capsys, str(path), "--input-shape", "image=1x1x8x8", "--calibration",
                          str(tmp_path / "data.npz"), "--json",
                          *_common(keypair, tmp_path / "out", onnx_profile))
    assert code == 0, err
    report = json.loads(out)
    assert report["model"]["source"]["framework"] == "torchscript"
    assert report["model"]["inputs"][0]["shape"] == [1, 1, 8, 8]
    assert "held out" in " ".join(report["data"]["notes"])


def test_scikit_learn_estimator_converts_with_exact_labels(tmp_path: Path, onnx_profile: Path,
                                                           keypair: KeyPair) -> None:
    """A fitted sklearn classifier (skl2onnx) converts; its int64 label output must match exactly."""
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    estimator = LogisticRegression(max_iter=500).fit(x, y)
    result = convert(estimator, profiles=[str(onnx_profile)], name="iris", version="1.0.0",
                     calibration={"input": x[::2]}, evaluation={"input": x[1::2]},
                     out=tmp_path / "out", sign_key=keypair.private, show_progress=False)
    assert result.ok
    artifact = result.report["artifacts"][0]
    assert artifact["validation"]["exact_match"] == 1.0
    assert [o["name"] for o in result.report["model"]["outputs"]] == ["label", "probabilities"]
    assert result.report["model"]["source"]["framework"] == "scikit-learn"


def test_pt2_exported_program_converts(digits: Digits, tmp_path: Path, onnx_profile: Path,
                                       keypair: KeyPair) -> None:
    """A torch.export .pt2 file converts through the dynamo ONNX exporter."""
    import torch

    program = torch.export.export(digits.module, (torch.from_numpy(digits.x_test[:1]),))
    path = tmp_path / "digits.pt2"
    torch.export.save(program, str(path))
    result = convert(path, profiles=[str(onnx_profile)], name="digits", version="1.0.0",
                     evaluation={"x": digits.x_test[:50]}, out=tmp_path / "out",
                     sign_key=keypair.private, show_progress=False)
    assert result.ok, result.report["artifacts"]
    assert result.report["model"]["source"]["framework"] == "pytorch-exported-program"


@pytest.mark.slow
def test_keras_file_converts_through_tf2onnx(tmp_path: Path, onnx_profile: Path,
                                             keypair: KeyPair) -> None:
    """A .keras file converts (tf2onnx in a child process) and matches Keras' own outputs."""
    import subprocess
    import sys

    script = (
        "import os, sys, numpy as np; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'\n"
        "import keras\n"
        "keras.utils.set_random_seed(0)\n"
        "m = keras.Sequential([keras.Input((8,), name='features'), keras.layers.Dense(16, "
        "activation='relu'), keras.layers.Dense(3, activation='softmax')])\n"
        "x = np.random.default_rng(0).standard_normal((32, 8)).astype('float32')\n"
        "m.save(sys.argv[1]); np.savez(sys.argv[2], features=x, expected=m.predict(x, verbose=0))\n"
    )
    model, data = tmp_path / "m.keras", tmp_path / "data.npz"
    subprocess.run([sys.executable, "-c", script, str(model), str(data)], check=True,
                   capture_output=True, timeout=300)
    arrays = np.load(data)
    result = convert(model, profiles=[str(onnx_profile)], name="kmodel", version="1.0.0",
                     evaluation={"features": arrays["features"]}, out=tmp_path / "out",
                     sign_key=keypair.private, show_progress=False)
    assert result.ok and result.report["model"]["source"]["framework"] == "keras"
    assert result.report["model"]["task"] == "classification"
    from edgeserve.converters.runners import OrtRunner

    with open_package(result.package) as pkg:
        pkg.extract_artifact("onnx-fp32", tmp_path / "x")
    runner = OrtRunner(tmp_path / "x" / "artifacts" / "onnx-fp32.onnx")
    got = runner.run({"features": arrays["features"]})[0]
    np.testing.assert_allclose(got, arrays["expected"], atol=1e-5)


def test_in_memory_module_needs_example_inputs(digits: Digits, tmp_path: Path, keypair: KeyPair,
                                               onnx_profile: Path) -> None:
    """A torch module without example inputs is a clear configuration error."""
    with pytest.raises(ConfigError, match="example inputs"):
        convert(digits.module, profiles=[str(onnx_profile)], name="d", version="1.0.0",
                out=tmp_path / "out", sign_key=keypair.private, show_progress=False)


@pytest.mark.slow
def test_onnx_source_reaches_core_ml_through_the_torch_interpreter(
        digits_onnx: Path, digits_npz: tuple[Path, Path], tmp_path: Path, keypair: KeyPair) -> None:
    """An ONNX file (no torch module) still gets checked Core ML artifacts for the iPhone."""
    calibration, evaluation = digits_npz
    result = convert(digits_onnx, profiles=["iphone-15-pro"], name="digits", version="1.0.0",
                     calibration=calibration, evaluation=evaluation, out=tmp_path / "out",
                     sign_key=keypair.private, show_progress=False)
    assert result.ok
    for artifact in result.report["artifacts"]:
        assert artifact["validation"]["status"] == "not-executed", artifact
        checks: dict[str, Any] = artifact["validation"]["checks"]
        assert checks["weights_matched"] == checks["weights_checked"] > 0


def test_onnx_interpreter_matches_onnx_runtime(digits_onnx: Path, digits: Digits) -> None:
    """OnnxModule computes the same outputs as ONNX Runtime on the digits graph."""
    import onnx
    import torch

    from edgeserve.converters.graph import run_onnx
    from edgeserve.converters.onnx_torch import OnnxModule

    model = onnx.load(str(digits_onnx))
    module = OnnxModule(model)
    with torch.no_grad():
        got = module(torch.from_numpy(digits.x_test[:16])).numpy()
    expected = run_onnx(model, {"image": digits.x_test[:16]})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_constant_input_is_frozen_into_the_reference(tmp_path: Path, onnx_profile: Path,
                                                     keypair: KeyPair,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """--constant-input k=2 removes input k and folds its If away (the silero sample-rate case)."""
    import onnx
    from onnx import TensorProto, helper

    then = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["a"])], "then", [],
                             [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 3])],
                             [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["b"])], "else", [],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 3])])
    nodes = [helper.make_node("Equal", ["k", "two_i"], ["is_two"]),
             helper.make_node("If", ["is_two"], ["y"], then_branch=then, else_branch=other)]
    graph = helper.make_graph(
        nodes, "switch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("k", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor("two_i", TensorProto.INT64, [], [2])])
    path = tmp_path / "switch.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).standard_normal((20, 3)).astype("f4"))
    code, out, err = _run(capsys, str(path), "--constant-input", "k=2", "--eval",
                          str(tmp_path / "x.npz"), "--json",
                          *_common(keypair, tmp_path / "out", onnx_profile))
    assert code == 0, err
    report = json.loads(out)
    assert [t["name"] for t in report["model"]["inputs"]] == ["x"]
    with open_package(tmp_path / "out" / "digits-1.2.0.edgepkg") as pkg:
        reference = onnx.load_from_string(pkg.read_bytes("artifacts/onnx-fp32.onnx"))
    assert "If" not in {n.op_type for n in reference.graph.node}
