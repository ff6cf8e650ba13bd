"""An ONNX artifact with external data (a folder: ``model.onnx`` beside ``model.onnx.data``, as
exporters write models past 2 GB) installs, verifies and runs like a single file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeserve.device_agent import Agent
from edgeserve.errors import RuntimeUnavailableError
from edgeserve.testing import KeyPair
from tests.deltas import external_package, mlp_weights


def test_an_external_data_artifact_runs(tmp_path: Path, keypair: KeyPair) -> None:
    w = mlp_weights()
    package = external_package(tmp_path / "ext.edgepkg", keypair, w, "1.0.0", 1, tmp_path)
    x = np.random.default_rng(4).normal(size=(3, w.w1.shape[0])).astype(np.float32)
    with Agent(tmp_path / "cache", "generic-cpu", [keypair.public_path]) as agent:
        agent.install(package)
        loaded = agent.model("toy")
        assert loaded.artifact.path == "artifacts/onnx-fp32"
        got = agent.predict("toy", {"x": x}).outputs["y"]
    np.testing.assert_allclose(got, w.forward(x), rtol=1e-5, atol=1e-6)


def test_a_folder_with_two_models_is_refused_by_name(tmp_path: Path) -> None:
    from edgeserve.device_agent.runtimes.onnx import _model_file

    (tmp_path / "a.onnx").write_bytes(b"x")
    (tmp_path / "b.onnx").write_bytes(b"x")
    with pytest.raises(RuntimeUnavailableError, match=r"holds 2 \.onnx files \(a\.onnx, b\.onnx\)"):
        _model_file(tmp_path)
