"""Batch-N variants (``Artifact.batch``) in the selection rule and the manifest's bytes: never
chosen on their own, found beside the artifact they serve, and written only when set (agents
that predate them read every other manifest unchanged)."""

from __future__ import annotations

import json

import pytest

from edgeserve.errors import RuntimeUnavailableError, SchemaError
from edgeserve.profiles import load_profile
from edgeserve.selection import batch_variant, choose_artifact
from edgeserve.testing import make_manifest

_SPEC = {"name": "x", "dtype": "float32", "shape": [4, 4]}


def _artifact(artifact_id: str, batch: int | None = None, precision: str = "fp32",
              fmt: str = "tflite") -> dict[str, object]:
    entry: dict[str, object] = {"id": artifact_id, "format": fmt, "precision": precision,
                                "path": f"artifacts/{artifact_id}.{fmt}",
                                "profiles": ["raspberry-pi-4"]}
    if batch is not None:
        entry.update(batch=batch, inputs=[_SPEC],
                     outputs=[{"name": "y", "dtype": "float32", "shape": [batch, 3]}])
    return entry


def test_a_variant_is_never_chosen_on_its_own_but_found_beside_its_artifact() -> None:
    profile = load_profile("raspberry-pi-4")
    formats = ["tflite", "onnx"]
    # listed first, and the only fp32 TFLite of its batch: still not the device's artifact
    manifest = make_manifest(artifacts=[_artifact("tflite-fp32-b4", 4),
                                        _artifact("tflite-fp16-b8", 8, "fp16"),
                                        _artifact("tflite-fp32"), _artifact("tflite-fp16",
                                                                            precision="fp16")])
    chosen = choose_artifact(manifest, profile, formats)
    assert chosen.batch is None and chosen.format == "tflite"
    variant = batch_variant(manifest, chosen)
    assert variant is not None and variant.precision == chosen.precision
    assert variant.batch == {"fp32": 4, "fp16": 8}[chosen.precision]
    assert batch_variant(manifest, manifest.artifact("tflite-fp32")).id == "tflite-fp32-b4"  # type: ignore[union-attr]


def test_a_package_of_variants_alone_serves_no_device() -> None:
    manifest = make_manifest(artifacts=[_artifact("tflite-fp32-b4", 4)])
    with pytest.raises(RuntimeUnavailableError, match=r"tflite-fp32-b4 \(tflite fp32 none batch 4\)"):
        choose_artifact(manifest, load_profile("raspberry-pi-4"), ["tflite", "onnx"])


def test_batch_is_written_only_when_set() -> None:
    plain = make_manifest(artifacts=[_artifact("tflite-fp32")])
    assert "batch" not in json.loads(plain.canonical_bytes())["artifacts"][0]
    both = make_manifest(artifacts=[_artifact("tflite-fp32"), _artifact("tflite-fp32-b4", 4)])
    written = json.loads(both.canonical_bytes())["artifacts"]
    assert "batch" not in written[0] and written[1]["batch"] == 4


@pytest.mark.parametrize("batch", [0, 1, 257, "four"])
def test_a_bad_batch_is_refused(batch: object) -> None:
    with pytest.raises(SchemaError, match="batch"):
        make_manifest(artifacts=[{**_artifact("tflite-fp32-b4", 4), "batch": batch}])
