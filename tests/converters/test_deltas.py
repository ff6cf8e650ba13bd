"""Deltas between converter-made packages (acceptance 1 of the model-deltas issue): a digits CNN
whose head alone was retrained goes as a delta of at most 5 % for ONNX fp32, ONNX int8 static and
TFLite int8; a fully fine-tuned one goes in full. Both decided by the same rule the fleet uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeserve.delta import apply_delta, make_delta
from edgeserve.demo.models import Digits, fine_tune, retrain_head
from edgeserve.package import open_package
from edgeserve.package_diff import diff_packages
from edgeserve.testing import KeyPair

from .conftest import write_profile

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PROFILE = """
schema = "edgeserve.profile/1"
name = "delta-targets"
title = "Test profile: the artifacts the delta acceptance names"
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

[[artifacts]]
format = "onnx"
precision = "fp32"

[[artifacts]]
format = "onnx"
precision = "int8"
quantization = "static"

[[artifacts]]
format = "tflite"
precision = "int8"
quantization = "full-integer"
"""
IDS = {"onnx-fp32", "onnx-int8-static", "tflite-int8-full-integer"}


@pytest.fixture(scope="module")
def packages(digits: Digits, signer: KeyPair,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    from edgeserve.converters import convert

    root = tmp_path_factory.mktemp("deltas")
    profile = write_profile(root / "profiles", PROFILE)
    built = {}
    for release, (version, model) in enumerate((("1.0.0", digits),
                                                ("1.1.0", retrain_head(digits)),
                                                ("1.2.0", fine_tune(digits))), start=1):
        result = convert(model.module, example_inputs=(torch.from_numpy(digits.x_test[:1]),),
                         input_names=["image"], output_names=["logits"], profiles=[str(profile)],
                         name="digits", version=version, release=release,
                         calibration={"image": digits.x_train[:300]},
                         evaluation={"image": digits.x_test, "labels": digits.y_test},
                         out=root / version, sign_key=signer.private_path)
        assert result.ok, result.report
        built[version] = result.package
    return built


def test_head_retrained_artifacts_go_as_small_deltas(packages: dict[str, Path]) -> None:
    """Every artifact of the head-retrained version is a delta of at most 5 % of its file, and
    rebuilds the new file byte for byte."""
    with open_package(packages["1.0.0"]) as old, open_package(packages["1.1.0"]) as new:
        diffs = {d.id: d for d in diff_packages(old, new)}
        assert set(diffs) == IDS
        for diff in diffs.values():
            assert diff.method == "delta", diff
            assert diff.delta_bytes <= 0.05 * diff.full_bytes, diff
        for artifact in new.manifest.artifacts:
            a = old.read_bytes(artifact.path)
            b = new.read_bytes(artifact.path)
            assert apply_delta(a, make_delta(a, b, artifact.format)) == b


def test_fine_tuned_artifacts_go_in_full(packages: dict[str, Path]) -> None:
    """Every weight changed: the delta is not worth sending for any artifact."""
    with open_package(packages["1.0.0"]) as old, open_package(packages["1.2.0"]) as new:
        diffs = diff_packages(old, new)
    assert {d.id for d in diffs} == IDS
    assert all(d.method == "full" for d in diffs), [(d.id, d.delta_bytes, d.full_bytes)
                                                   for d in diffs]
