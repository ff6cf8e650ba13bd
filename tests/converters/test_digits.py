"""Acceptance 1: a CNN trained on scikit-learn's digits, converted for five profiles at once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeserve.package import open_package
from edgeserve.telemetry import ReferenceStats
from edgeserve.testing import KeyPair

pytestmark = pytest.mark.slow


def _artifacts(result: Any) -> dict[str, dict[str, Any]]:
    return {a["id"]: a for a in result.report["artifacts"]}


def test_every_onnx_and_tflite_artifact_passes(digits_result: Any) -> None:
    """Each ONNX and TFLite artifact was run and passed its profiles' budgets."""
    runnable = {k: a for k, a in _artifacts(digits_result).items()
                if a["format"] in ("onnx", "tflite")}
    assert set(runnable) == {"onnx-fp32", "onnx-int8-static", "onnx-fp16", "onnx-int8-dynamic",
                             "tflite-fp32", "tflite-fp16", "tflite-int8-dynamic",
                             "tflite-int8-full-integer"}
    for artifact_id, artifact in runnable.items():
        validation = artifact["validation"]
        assert validation["status"] == "passed", (artifact_id, validation, artifact["error"])
        assert validation["latency_ms_p50"] > 0
        assert validation["samples"] == 397
    assert digits_result.ok


def test_int8_accuracy_within_one_point_and_size_under_three_tenths(digits_result: Any,
                                                                     digits: Any) -> None:
    """Static and full-integer int8 keep top-1 accuracy within 1 point at ≤ 0.3× the fp32 bytes."""
    artifacts = _artifacts(digits_result)
    fp32 = artifacts["onnx-fp32"]
    assert fp32["validation"]["accuracy"] == pytest.approx(digits.accuracy)
    for artifact_id in ("onnx-int8-static", "tflite-int8-full-integer"):
        int8 = artifacts[artifact_id]
        assert fp32["validation"]["accuracy"] - int8["validation"]["accuracy"] <= 0.01, artifact_id
        assert int8["size_bytes"] <= 0.3 * fp32["size_bytes"], (artifact_id, int8["size_bytes"])


def test_coreml_artifacts_pass_structure_and_weight_checks(digits_result: Any) -> None:
    """Off macOS the Core ML artifacts are checked, and reported as not executed, never passed."""
    coreml = {k: a for k, a in _artifacts(digits_result).items() if a["format"] == "coreml"}
    assert set(coreml) == {"coreml-fp16", "coreml-int8-weight-int8", "coreml-int6-palettize-6",
                           "coreml-int4-palettize-4"}
    for artifact_id, artifact in coreml.items():
        validation = artifact["validation"]
        assert validation["status"] == "not-executed", (artifact_id, validation)
        checks = validation["checks"]
        assert checks["problems"] == [] and checks["structure_ok"]
        assert checks["weights_matched"] == checks["weights_checked"] == 9  # all but the 10-bias
        assert artifact["runtime"] == {"name": "coreml", "minimum_deployment_target": "iOS17"}
    sizes = {k: a["size_bytes"] for k, a in coreml.items()}
    assert sizes["coreml-int4-palettize-4"] < sizes["coreml-int6-palettize-6"] \
        < sizes["coreml-int8-weight-int8"] < sizes["coreml-fp16"]


def test_shared_artifacts_are_built_once_for_all_their_profiles(digits_result: Any) -> None:
    """onnx-int8-static serves generic-cpu and raspberry-pi-5 and appears once."""
    ids = [a["id"] for a in digits_result.report["artifacts"]]
    assert len(ids) == len(set(ids))
    shared = _artifacts(digits_result)["onnx-int8-static"]
    assert shared["profiles"] == ["generic-cpu", "raspberry-pi-5"]
    assert shared["required_by"] == ["raspberry-pi-5"]
    assert set(digits_result.report["profiles"]) == {
        "generic-cpu", "raspberry-pi-5", "coral-dev-board", "iphone-15-pro", "extra-targets"}
    assert digits_result.report["profiles"]["iphone-15-pro"]["status"] == "not-executed"
    assert digits_result.report["profiles"]["coral-dev-board"]["status"] == "passed"


def test_package_is_signed_and_holds_the_documented_members(digits_result: Any,
                                                           signer: KeyPair) -> None:
    """The package verifies with the signer's key and carries stats, samples and the report."""
    with open_package(digits_result.package, trust=signer.trust, verify_files=True) as pkg:
        manifest = pkg.manifest
        assert manifest.task == "classification"
        assert manifest.labels == [str(i) for i in range(10)]
        assert manifest.inputs[0].name == "image" and manifest.inputs[0].layout == "NCHW"
        assert manifest.inputs[0].shape == ["batch", 1, 8, 8]
        assert manifest.preprocessing["image"].invert
        assert manifest.reference == "reference/stats.json"
        stats = ReferenceStats.from_json(pkg.read_bytes("reference/stats.json"))
        assert stats.samples == 300 and any(g.reduce == "argmax" for g in stats.groups)
        report = json.loads(pkg.read_bytes("report.json"))
        assert report["model"]["name"] == "digits"
        assert {a.id for a in manifest.artifacts} == {a["id"] for a in report["artifacts"]}
        onnx_fp32 = manifest.artifact("onnx-fp32")
        assert onnx_fp32.runtime == {"name": "onnxruntime", "opset": 17}
        assert onnx_fp32.inputs is None and onnx_fp32.size_bytes > 0
        assert manifest.artifact("coreml-fp16").path == "artifacts/coreml-fp16.mlpackage"
        assert len(manifest.artifact_files(manifest.artifact("coreml-fp16"))) >= 2
    assert Path(digits_result.report_json).exists() and Path(digits_result.report_md).exists()
    assert "| onnx-int8-static |" in Path(digits_result.report_md).read_text()


def test_tflite_artifacts_declare_their_own_layout_and_quantization(digits_result: Any) -> None:
    """TFLite inputs are NHWC; full-integer I/O carries int8 scale and zero point."""
    with open_package(digits_result.package) as pkg:
        full = pkg.manifest.artifact("tflite-int8-full-integer")
        fp32 = pkg.manifest.artifact("tflite-fp32")
    assert fp32.inputs is not None and fp32.inputs[0].layout == "NHWC"
    assert fp32.inputs[0].shape == [1, 8, 8, 1] and fp32.inputs[0].dtype == "float32"
    assert full.inputs is not None and full.outputs is not None
    assert full.inputs[0].dtype == "int8" and full.inputs[0].quantization is not None
    assert full.outputs[0].dtype == "int8" and full.outputs[0].quantization is not None
    assert full.outputs[0].shape == [1, 10]


def test_samples_replay_on_each_artifact_within_the_recorded_error(digits_result: Any,
                                                                   tmp_path: Path) -> None:
    """samples/inputs.npz through each artifact (as a device would) stays within its recorded error."""
    import io

    from edgeserve.converters.runners import LiteRtRunner, OrtRunner, run_dataset
    from edgeserve.converters.signature import ModelSignature

    with open_package(digits_result.package) as pkg:
        manifest = pkg.manifest
        inputs = dict(np.load(io.BytesIO(pkg.read_bytes("samples/inputs.npz"))))
        expected = dict(np.load(io.BytesIO(pkg.read_bytes("samples/expected.npz"))))
        assert list(inputs) == ["image"] and inputs["image"].shape == (8, 1, 8, 8)
        assert list(expected) == ["logits"] and expected["logits"].shape == (8, 10)
        for artifact in manifest.artifacts:
            if artifact.format == "coreml":
                continue
            path = pkg.extract_artifact(artifact.id, tmp_path)
            path = path if Path(path).is_file() else tmp_path / artifact.path
            runner = OrtRunner(Path(path)) if artifact.format == "onnx" else LiteRtRunner(
                Path(path), manifest.inputs, manifest.outputs,
                artifact.inputs or manifest.inputs, artifact.outputs or manifest.outputs)
            got = run_dataset(runner, inputs, ModelSignature(manifest.inputs, manifest.outputs))[0]
            recorded = artifact.validation["sample_max_abs_error"]
            assert np.abs(got - expected["logits"]).max() <= recorded + 1e-5, artifact.id
