"""The ``edgeserve agent`` commands, run through the real CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeserve.cli import main
from edgeserve.device_agent.inputs import load_image
from edgeserve.manifest import ImagePreprocessing

from .models import mlp_weights


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def test_install_list_predict_batch_rollback_remove(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    agent_assets: dict[str, Path]) -> None:
    """The whole device workflow through the CLI, with JSON output and precise exit codes."""
    cache = str(tmp_path / "cache")
    key = str(agent_assets["public_key"])
    common = ["--cache", cache, "--trusted-key", key]
    code, out, _ = _run(capsys, "agent", "install", str(agent_assets["pkg_v1"]), *common, "--json")
    assert code == 0 and json.loads(out)["active"] is True
    code, out, _ = _run(capsys, "agent", "install", str(agent_assets["pkg_v2"]), *common)
    assert code == 0 and "installed toy 1.1.0" in out
    code, out, _ = _run(capsys, "agent", "list", "--cache", cache, "--json")
    assert {(r["version"], r["active"], r["previous"]) for r in json.loads(out)} == \
        {("1.0.0", False, True), ("1.1.0", True, False)}
    x = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "x.json").write_text(json.dumps({"inputs": {"x": x[0].tolist()}}))
    code, out, _ = _run(capsys, "agent", "predict", "toy", "--input", str(tmp_path / "x.npy"),
                        "--cache", cache, "--json")
    data = json.loads(out)
    assert code == 0 and data["version"] == "1.1.0"
    np.testing.assert_allclose(data["outputs"]["y"], mlp_weights(11).forward(x), atol=1e-5)
    assert data["outputs"]["top"][0][0]["label"] in ("a", "b", "c")
    code, out, _ = _run(capsys, "agent", "predict", "toy", "--input", str(tmp_path / "x.json"),
                        "--cache", cache, "--version", "1.0.0")
    assert code == 0 and "toy 1.0.0" in out
    inputs = tmp_path / "in"
    inputs.mkdir()
    np.save(inputs / "a.npy", x)
    (inputs / "b.json").write_text("[[1, 2, 3]]")
    code, out, _ = _run(capsys, "agent", "batch", "toy", str(inputs), "--out",
                        str(tmp_path / "out"), "--cache", cache, "--json")
    report = json.loads(out)
    assert code == 7 and report["predicted"] == 1 and report["failed"][0]["file"] == "b.json"
    assert np.load(tmp_path / "out" / "a.npz")["y"].shape == (2, 3)
    code, out, _ = _run(capsys, "agent", "rollback", "toy", "--cache", cache)
    assert code == 0 and "rolled back to 1.0.0" in out
    code, _, err = _run(capsys, "agent", "remove", "toy", "--version", "1.0.0", "--cache", cache)
    assert code == 2 and "active version" in err
    code, _, err = _run(capsys, "agent", "predict", "nope", "--input", str(tmp_path / "x.npy"),
                        "--cache", cache)
    assert code == 6 and "unknown model" in err and "Traceback" not in err
    code, out, _ = _run(capsys, "agent", "check", "--cache", cache, "--json")
    assert code == 0 and json.loads(out)["ok"]
    code, out, _ = _run(capsys, "agent", "remove", "toy", "--cache", cache, "--json")
    assert code == 0 and sorted(json.loads(out)["removed"]) == ["1.0.0", "1.1.0"]


def test_install_without_trusted_key_is_refused(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                agent_assets: dict[str, Path]) -> None:
    """No pinned key: the install fails with a one-line reason and the package exit code."""
    code, _, err = _run(capsys, "agent", "install", str(agent_assets["pkg_v1"]), "--cache",
                        str(tmp_path / "c"))
    assert code == 4 and "trusted" in err and "Traceback" not in err


def test_image_preprocessing(tmp_path: Path) -> None:
    """An image file becomes the input tensor the manifest's preprocessing describes."""
    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[..., 0] = 255
    Image.fromarray(pixels).save(tmp_path / "red.png")
    prep = ImagePreprocessing(size=(4, 8), color="rgb", scale=1 / 255, mean=[0.5, 0.5, 0.5],
                              std=[0.5, 0.5, 0.5], layout="NCHW")
    tensor = load_image(tmp_path / "red.png", prep)
    assert tensor.shape == (1, 3, 4, 8) and tensor.dtype == np.float32
    np.testing.assert_allclose(tensor[0, 0], 1.0)
    np.testing.assert_allclose(tensor[0, 1], -1.0)
    gray = load_image(tmp_path / "red.png", ImagePreprocessing(size=(2, 2), color="gray",
                                                               layout="NHWC", invert=True))
    assert gray.shape == (1, 2, 2, 1) and 0.6 < float(gray.max()) < 0.8
