"""Packages for the delta tests: one MLP whose versions differ only in the head, or everywhere.

Real ONNX files (onnx.helper), real signatures and samples the agent's health check runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeserve.manifest import parse_manifest
from edgeserve.package import PackageWriter
from edgeserve.testing import KeyPair
from tests.device_agent.models import MlpWeights, _npz, mlp_weights, onnx_mlp

__all__ = ["big_mlp_weights", "external_package", "fine_tuned", "head_retrained", "mlp_package",
           "mlp_weights", "onnx_mlp"]


def head_retrained(w: MlpWeights, seed: int = 99) -> MlpWeights:
    """``w`` with a new last layer; the first layer's bytes are unchanged."""
    rng = np.random.default_rng(seed)
    return MlpWeights(w.w1, w.b1, rng.normal(size=w.w2.shape).astype(np.float32),
                      rng.normal(size=w.b2.shape).astype(np.float32))


def fine_tuned(w: MlpWeights, seed: int = 5) -> MlpWeights:
    """Every weight of ``w`` moved a little."""
    rng = np.random.default_rng(seed)
    return MlpWeights(*(a + (rng.normal(size=a.shape) * 1e-3).astype(np.float32)
                        for a in (w.w1, w.b1, w.w2, w.b2)))


def mlp_package(out: Path, key: KeyPair, w: MlpWeights, version: str, release: int,
                name: str = "toy") -> Path:
    """A one-artifact (onnx-fp32, generic-cpu) package of the MLP ``w`` with samples."""
    samples = np.random.default_rng(3).normal(size=(8, w.w1.shape[0])).astype(np.float32)
    manifest = parse_manifest({
        "schema": "edgeserve.manifest/1", "name": name, "version": version, "release": release,
        "task": "classification", "source": {"framework": "onnx", "sha256": "0" * 64},
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", w.w1.shape[0]]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", w.w2.shape[1]]}],
        "artifacts": [{"id": "onnx-fp32", "format": "onnx", "precision": "fp32",
                       "path": "artifacts/model.onnx", "profiles": ["generic-cpu"],
                       "validation": {"sample_max_abs_error": 1e-6}}],
        "samples": "samples/inputs.npz",
    })
    writer = PackageWriter(manifest)
    writer.add_file("artifacts/model.onnx", onnx_mlp(w))
    writer.add_file("samples/inputs.npz", _npz(x=samples))
    writer.add_file("samples/expected.npz", _npz(y=w.forward(samples)))
    out.parent.mkdir(parents=True, exist_ok=True)
    writer.write(out, key.private)
    return out


def big_mlp_weights(seed: int = 7, hidden: int = 512) -> MlpWeights:
    """An MLP whose first layer dominates its size (~0.5 MB), as a CNN's body dominates its head."""
    rng = np.random.default_rng(seed)
    return MlpWeights(rng.normal(size=(256, hidden)).astype(np.float32) * 0.05,
                      rng.normal(size=hidden).astype(np.float32) * 0.1,
                      rng.normal(size=(hidden, 3)).astype(np.float32),
                      rng.normal(size=3).astype(np.float32) * 0.1)


def external_package(out: Path, key: KeyPair, w: MlpWeights, version: str, release: int,
                     work: Path) -> Path:
    """A package whose ONNX artifact is a folder: model.onnx and its external model.onnx.data."""
    import onnx

    folder = work / f"external-{version}"
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(onnx.load_from_string(onnx_mlp(w)), str(folder / "model.onnx"),
                    save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    manifest = parse_manifest({
        "schema": "edgeserve.manifest/1", "name": "toy", "version": version, "release": release,
        "source": {"framework": "onnx", "sha256": "0" * 64},
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", w.w1.shape[0]]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", w.w2.shape[1]]}],
        "artifacts": [{"id": "onnx-fp32", "format": "onnx", "precision": "fp32",
                       "path": "artifacts/onnx-fp32"}]})
    writer = PackageWriter(manifest)
    for name in ("model.onnx", "model.onnx.data"):
        writer.add_file(f"artifacts/onnx-fp32/{name}", (folder / name).read_bytes())
    writer.write(out, key.private)
    return out
