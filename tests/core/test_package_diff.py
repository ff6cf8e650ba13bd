"""`edgeserve package diff`: what changed per artifact and tensor, and what would be sent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeserve.testing import KeyPair, make_keypair
from tests.core.test_cli import run
from tests.deltas import (
    big_mlp_weights,
    external_package,
    fine_tuned,
    head_retrained,
    mlp_package,
)


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diff")
    key: KeyPair = make_keypair(root / "keys", "release")
    w = big_mlp_weights()
    return {"v1": mlp_package(root / "v1.edgepkg", key, w, "1.0.0", 1),
            "head": mlp_package(root / "head.edgepkg", key, head_retrained(w), "1.1.0", 2),
            "fine": mlp_package(root / "fine.edgepkg", key, fine_tuned(w), "1.2.0", 3),
            "other": mlp_package(root / "other.edgepkg", key, w, "1.0.0", 1, name="other")}


def test_head_retrained_goes_as_a_delta(packages: dict[str, Path]) -> None:
    """--json: one entry per artifact; a new head is a delta of a few percent of the file."""
    result = run("package", "diff", str(packages["v1"]), str(packages["head"]), "--json")
    assert result.returncode == 0, result.stderr
    entries = json.loads(result.stdout)
    assert [e["id"] for e in entries] == ["onnx-fp32"]
    entry = entries[0]
    assert {"id", "full_bytes", "delta_bytes", "method"} <= set(entry)
    assert entry["method"] == "delta"
    assert 0 < entry["delta_bytes"] <= 0.05 * entry["full_bytes"], entry
    tensors = {t["name"]: t["status"] for f in entry["files"] for t in f["tensors"]}
    assert tensors == {"w1": "same", "b1": "same", "w2": "changed", "b2": "changed"}


def test_fine_tuned_goes_in_full(packages: dict[str, Path]) -> None:
    """Every weight changed: the delta is not worth it and the full file is sent."""
    result = run("package", "diff", str(packages["v1"]), str(packages["fine"]), "--json")
    assert result.returncode == 0, result.stderr
    (entry,) = json.loads(result.stdout)
    assert entry["method"] == "full", entry
    assert entry["delta_bytes"] > 0.5 * entry["full_bytes"]


def test_human_output_names_changed_tensors(packages: dict[str, Path]) -> None:
    """Without --json: a summary line, the artifact table and the tensors that differ."""
    result = run("package", "diff", str(packages["v1"]), str(packages["head"]))
    assert result.returncode == 0, result.stderr
    assert "1.0.0 -> 1.1.0" in result.stdout and "onnx-fp32" in result.stdout
    assert "w2" in result.stdout and "changed" in result.stdout


def test_not_a_package_is_a_clear_error(tmp_path: Path, packages: dict[str, Path]) -> None:
    """A file that is not a package: one line naming it, exit code 4, no traceback."""
    bogus = tmp_path / "model.onnx"
    bogus.write_bytes(b"\x08\x07not a zip")
    result = run("package", "diff", str(bogus), str(packages["head"]))
    assert result.returncode == 4
    assert "not a model package" in result.stderr and "Traceback" not in result.stderr
    missing = run("package", "diff", str(tmp_path / "nope.edgepkg"), str(packages["head"]))
    assert missing.returncode == 4 and "no such package" in missing.stderr


def test_two_different_models_are_refused(packages: dict[str, Path]) -> None:
    """diff compares versions of one model; two models is a usage error."""
    result = run("package", "diff", str(packages["other"]), str(packages["head"]))
    assert result.returncode == 2
    assert "two versions of one model" in result.stderr and "Traceback" not in result.stderr


def test_external_data_tensors_are_listed(tmp_path: Path) -> None:
    """An ONNX artifact with external data: the data file's tensors are compared one by one."""
    from edgeserve.package import open_package
    from edgeserve.package_diff import diff_packages

    key = make_keypair(tmp_path / "keys", "release")
    w = big_mlp_weights()
    old = external_package(tmp_path / "v1.edgepkg", key, w, "1.0.0", 1, tmp_path)
    new = external_package(tmp_path / "v2.edgepkg", key, head_retrained(w), "1.1.0", 2, tmp_path)
    with open_package(old) as before, open_package(new) as after:
        (diff,) = diff_packages(before, after)
    assert diff.method == "delta" and diff.delta_bytes <= 0.05 * diff.full_bytes, diff
    files = {f.path: f for f in diff.files}
    data = files["artifacts/onnx-fp32/model.onnx.data"]
    assert {t.name: t.status for t in data.tensors} == {
        "w1": "same", "b1": "same", "w2": "changed", "b2": "changed"}


def _coreml_package(out: Path, key: KeyPair, weights: bytes, version: str, release: int) -> Path:
    from edgeserve.package import PackageWriter
    from edgeserve.testing import make_manifest

    root = "artifacts/model.mlpackage"
    manifest = make_manifest(version=version, release=release, artifacts=[{
        "id": "coreml-fp16", "format": "coreml", "precision": "fp16", "path": root}])
    writer = PackageWriter(manifest)
    writer.add_file(f"{root}/Manifest.json", b'{"fileFormatVersion": "1.0.0"}')
    writer.add_file(f"{root}/Data/com.apple.CoreML/weights/weight.bin", weights)
    writer.write(out, key.private)
    return out


def test_coreml_package_files_get_generic_deltas(tmp_path: Path) -> None:
    """A Core ML package (a folder) is diffed file by file with the generic encoding; an
    unchanged file costs next to nothing and a retrained tail of the weights stays small."""
    from edgeserve.package import open_package
    from edgeserve.package_diff import diff_packages

    key = make_keypair(tmp_path / "keys", "release")
    body = np.random.default_rng(1).normal(size=200_000).astype(np.float16).tobytes()
    head = np.random.default_rng(2).normal(size=2_000).astype(np.float16).tobytes()
    old = _coreml_package(tmp_path / "v1.edgepkg", key, body, "1.0.0", 1)
    new = _coreml_package(tmp_path / "v2.edgepkg", key, body[:-len(head)] + head, "1.1.0", 2)
    with open_package(old) as before, open_package(new) as after:
        (diff,) = diff_packages(before, after)
    assert diff.method == "delta" and diff.delta_bytes <= 0.05 * diff.full_bytes, diff
    assert [f.delta_method for f in diff.files] == ["generic", "generic"]
    assert all(f.layout == "none" and not f.tensors for f in diff.files)
    same = {f.path.rpartition("/")[2]: f.same for f in diff.files}
    assert same == {"Manifest.json": True, "weight.bin": False}
