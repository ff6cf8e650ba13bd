"""Unit-level behaviour of the converter's pieces: data loading, planning, tensor mapping."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

from edgeserve.errors import ConfigError
from edgeserve.manifest import ImagePreprocessing, QuantParams, TensorSpec
from edgeserve.profiles import load_profile

MODULES = ["edgeserve.converters", "edgeserve.converters.data", "edgeserve.converters.graph",
           "edgeserve.converters.plan", "edgeserve.converters.runners",
           "edgeserve.converters.validate", "edgeserve.converters.preflight",
           "edgeserve.converters.onnx_torch", "edgeserve.converters.report",
           "edgeserve.converters.checks", "edgeserve.converters.fallback",
           "edgeserve.converters.preprocess", "edgeserve.converters.quiet"]


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist(name: str) -> None:
    """Every name a converter module exports exists."""
    module = importlib.import_module(name)
    assert all(hasattr(module, member) for member in module.__all__)


def test_plan_builds_shared_artifacts_once() -> None:
    """Two profiles asking for the same artifact get one plan entry listing both."""
    from edgeserve.converters.plan import plan_artifacts

    plans = plan_artifacts([load_profile("raspberry-pi-4"), load_profile("raspberry-pi-5")])
    ids = [p.id for p in plans]
    assert ids == ["tflite-int8-dynamic", "onnx-int8-static", "tflite-fp32", "onnx-fp32"]
    shared = plans[0]
    assert shared.profiles == ["raspberry-pi-4", "raspberry-pi-5"]
    assert shared.required_by == ["raspberry-pi-4", "raspberry-pi-5"]
    assert plans[2].required_by == [] and not plans[2].required


def test_npz_data_must_match_input_names_and_shapes(tmp_path: Path) -> None:
    """An .npz without the model's input name, or with a wrong shape, is a clear error."""
    from edgeserve.converters.data import load_dataset

    spec = [TensorSpec(name="image", dtype="float32", shape=["batch", 1, 8, 8])]
    np.savez(tmp_path / "wrong.npz", pixels=np.zeros((4, 1, 8, 8)), other=np.zeros((4, 2)))
    with pytest.raises(ConfigError, match=r"no array for model input\(s\) \['image'\]"):
        load_dataset(tmp_path / "wrong.npz", spec)
    np.savez(tmp_path / "shape.npz", image=np.zeros((4, 1, 9, 8)))
    with pytest.raises(ConfigError, match=r"\[4, 1, 9, 8\], which fits neither accepted form.*"
                                          r"\(n, 1, 8, 8\).*\(n, batch, 1, 8, 8\)"):
        load_dataset(tmp_path / "shape.npz", spec)
    np.savez(tmp_path / "ok.npz", image=np.ones((4, 1, 8, 8), dtype=np.float64),
             labels=np.arange(4))
    data = load_dataset(tmp_path / "ok.npz", spec)
    assert data.inputs["image"].dtype == np.float32 and list(data.labels) == [0, 1, 2, 3]


def test_image_folder_uses_preprocessing_and_class_folders(tmp_path: Path) -> None:
    """Images in class sub-folders become samples with the manifest's preprocessing and labels."""
    from PIL import Image

    from edgeserve.converters.data import load_dataset

    for label, value in (("zero", 0), ("one", 255)):
        (tmp_path / label).mkdir()
        Image.new("L", (16, 16), value).save(tmp_path / label / "a.png")
    spec = [TensorSpec(name="image", dtype="float32", shape=["batch", 1, 8, 8])]
    prep = {"image": ImagePreprocessing(size=(8, 8), color="gray", invert=True)}
    data = load_dataset(tmp_path, spec, prep)
    assert data.inputs["image"].shape == (2, 1, 8, 8)
    assert list(data.labels) == [0, 1]  # classes sorted: one, zero
    assert data.inputs["image"][0].max() == 0.0 and data.inputs["image"][1].min() == 1.0


def test_artifact_tensors_map_positionally_with_layout_and_quantization() -> None:
    """NCHW float model tensors go to NHWC int8 artifact tensors and back within one step."""
    from edgeserve.converters.runners import from_artifact, to_artifact

    model = TensorSpec(name="x", dtype="float32", shape=[1, 2, 3, 4], layout="NCHW")
    artifact = TensorSpec(name="serving_x", dtype="int8", shape=[1, 3, 4, 2], layout="NHWC",
                          quantization=QuantParams(scale=0.01, zero_point=-3))
    x = np.random.default_rng(0).uniform(-1, 1, (1, 2, 3, 4)).astype(np.float32)
    q = to_artifact(x, model, artifact)
    assert q.dtype == np.int8 and q.shape == (1, 3, 4, 2)
    back = from_artifact(q, model, artifact)
    assert back.shape == x.shape and np.abs(back - x).max() <= 0.005 + 1e-6


def test_verdict_is_the_worst_over_profiles() -> None:
    """An artifact within one profile's budget but not another's is failed overall."""
    from edgeserve.converters.validate import judge
    from edgeserve.profiles import ValidationBudget

    metrics = {"cosine_similarity": 0.995, "max_abs_error": 0.1}
    status, reasons, per = judge(metrics, {"loose": ValidationBudget(min_cosine=0.99),
                                           "strict": ValidationBudget(min_cosine=0.999)})
    assert status == "failed" and per == {"loose": "passed", "strict": "failed"}
    assert reasons == ["strict: cosine 0.99500 < 0.999"]


def test_profile_fallback_keys_are_checked() -> None:
    """A fallback must be an artifact key in the converter's form, in a format the profile has a
    runtime for; the shipped Pi 5 falls back to ONNX fp32."""
    from edgeserve.errors import ProfileError
    from edgeserve.profiles import parse_profile

    assert [t.key for t in load_profile("raspberry-pi-5").artifacts[0].fallback_targets()] == \
        ["onnx-fp32"]
    text = (Path(__file__).parents[2] / "hw-profiles" / "x86-industrial-pc.toml").read_text()
    for bad, message in (('["onnx-fp64"]', "expected FORMAT-PRECISION"),
                         ('["onnx-int8"]', "e.g. onnx-int8-static"),
                         ('["tflite-fp32"]', "no runtime for tflite")):
        with pytest.raises(ProfileError, match=message):
            parse_profile(text.replace('fallback = ["onnx-fp32"]', f"fallback = {bad}"),
                          "x86-industrial-pc.toml")
