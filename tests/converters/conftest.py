"""Fixtures for the converter tests: a CNN trained on scikit-learn's digits, converted once.

Converting is slow (onnx2tf imports TensorFlow in a child process, coremltools converts and
compresses), so the digits model is trained and converted once per session for every profile the
tests look at; the tests then read the one result.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeserve.demo.models import Digits, train_digits
from edgeserve.testing import KeyPair, make_keypair

__all__ = ["Digits", "train_digits", "write_profile"]

DIGITS_PROFILES = ["generic-cpu", "raspberry-pi-5", "coral-dev-board", "iphone-15-pro",
                   "extra-targets"]

# Artifacts no shipped profile asks for (ONNX fp16 and dynamic int8, TFLite fp16, 4-bit Core ML).
EXTRA_PROFILE = """
schema = "edgeserve.profile/1"
name = "extra-targets"
title = "Test profile: the artifacts no shipped profile builds"
device_class = "desktop"
vendor = "test"

[hardware]
arch = "any"
cpu = "any"
cores = 2
memory_mb = 2048
storage_mb = 4096

[budgets]
max_model_bytes = 1_000_000_000
cache_bytes = 2_000_000_000

[runtimes.onnxruntime]
[runtimes.litert]
[runtimes.coreml]
minimum_deployment_target = "iOS17"

[[artifacts]]
format = "onnx"
precision = "fp16"

[[artifacts]]
format = "onnx"
precision = "int8"
quantization = "dynamic"

[[artifacts]]
format = "tflite"
precision = "fp16"

[[artifacts]]
format = "coreml"
precision = "int4"
quantization = "palettize-4"
"""


def write_profile(directory: Path, text: str) -> Path:
    """Write a profile TOML named after its ``name`` key; returns its path."""
    name = next(line.split('"')[1] for line in text.splitlines() if line.startswith("name ="))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def digits() -> Digits:
    return train_digits()


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("converters")


@pytest.fixture(scope="session")
def signer(session_dir: Path) -> KeyPair:
    return make_keypair(session_dir / "keys", "converter")


@pytest.fixture(scope="session")
def profile_dir(session_dir: Path) -> Iterator[Path]:
    directory = session_dir / "profiles"
    write_profile(directory, EXTRA_PROFILE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGESERVE_PROFILE_PATH", str(directory))
        yield directory


@pytest.fixture(scope="session")
def digits_onnx(digits: Digits, session_dir: Path) -> Path:
    """The digits CNN as an ONNX file (input ``image``, output ``logits``, dynamic batch)."""
    import io
    import warnings

    import torch

    path = session_dir / "digits.onnx"
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(digits.module, (torch.from_numpy(digits.x_test[:1]),), buffer,
                          input_names=["image"], output_names=["logits"], dynamo=False,
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture(scope="session")
def digits_npz(digits: Digits, session_dir: Path) -> tuple[Path, Path]:
    """(calibration.npz, eval.npz) keyed by the input name, eval with labels."""
    calibration, evaluation = session_dir / "calibration.npz", session_dir / "eval.npz"
    np.savez(calibration, image=digits.x_train[:300])
    np.savez(evaluation, image=digits.x_test, labels=digits.y_test)
    return calibration, evaluation


@pytest.fixture(scope="session")
def digits_result(digits: Digits, signer: KeyPair, session_dir: Path, profile_dir: Path) -> Any:
    """The digits CNN converted once, from the torch module, for every test profile."""
    import torch

    from edgeserve.converters import convert
    from edgeserve.manifest import ImagePreprocessing

    # a scanned digit: dark ink on white, 8x8 grey → invert, scale to [0, 1]
    prep = ImagePreprocessing(size=(8, 8), color="gray", invert=True, layout="NCHW")
    return convert(
        digits.module, example_inputs=(torch.from_numpy(digits.x_test[:1]),),
        input_names=["image"], output_names=["logits"], profiles=DIGITS_PROFILES,
        name="digits", version="1.0.0", labels=[str(i) for i in range(10)],
        preprocessing={"image": prep},
        calibration={"image": digits.x_train[:300]},
        evaluation={"image": digits.x_test, "labels": digits.y_test},
        out=session_dir / "dist", sign_key=signer.private, show_progress=False)
