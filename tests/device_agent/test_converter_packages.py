"""A package made by the real converter (torch → ONNX, onnx2tf TFLite fp32 and full-int8 with
int8 I/O, fixed batch 1, NHWC) installs and serves the model's NCHW signature on every artifact."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edgeserve.device_agent import Agent
from edgeserve.profiles import load_profile
from edgeserve.testing import make_keypair

from .models import write_profile

ARTIFACTS = {
    "onnx-fp32": ('format = "onnx"\nprecision = "fp32"\n', 1e-5),
    "tflite-fp32": ('format = "tflite"\nprecision = "fp32"\n', 1e-4),
    "tflite-int8-full-integer": ('format = "tflite"\nprecision = "int8"\n'
                                 'quantization = "full-integer"\nio_dtype = "int8"\n', 0.15),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    torch = pytest.importorskip("torch")
    from edgeserve.converters.pipeline import convert

    root = tmp_path_factory.mktemp("converted")
    key = make_keypair(root / "keys")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    calibration = {"image": np.random.default_rng(0).normal(size=(32, 3, 8, 8)).astype(
        np.float32)}
    targets = "".join(f"[[artifacts]]\n{text}required = false\n\n"
                      for text, _ in ARTIFACTS.values())
    profile = write_profile(root / "profiles", "converter-all", targets)
    result = convert(model, out=root / "out", sign_key=key.private_path, profiles=[str(profile)],
                     name="tiny", version="1.0.0", example_inputs=(torch.zeros(1, 3, 8, 8),),
                     input_names=["image"], output_names=["logits"], calibration=calibration,
                     evaluation=calibration, show_progress=False)
    assert result.ok and result.package is not None
    images = np.random.default_rng(1).normal(size=(5, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    return {"root": root, "key": key, "package": result.package, "images": images,
            "expected": expected}


@pytest.mark.slow
@pytest.mark.parametrize("artifact_id", list(ARTIFACTS))
def test_converter_package_serves_every_artifact(converted: dict[str, Any],
                                                 artifact_id: str) -> None:
    """Each artifact of a converter-made package passes its sample check and predicts a batch
    of NCHW images close to the torch model (int8 within its quantization error)."""
    text, tolerance = ARTIFACTS[artifact_id]
    profile = load_profile(write_profile(converted["root"] / "p", f"only-{artifact_id}",
                                         f"[[artifacts]]\n{text}"))
    with Agent(converted["root"] / f"cache-{artifact_id}", profile,
               [converted["key"].public_path]) as agent:
        info = agent.install(converted["package"])
        assert info.artifact_id == artifact_id
        check = agent.check_samples("tiny")
        assert check.ok, check.message
        out = agent.predict("tiny", {"image": converted["images"]}).outputs["logits"]
    assert out.shape == (5, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, converted["expected"], atol=tolerance)
