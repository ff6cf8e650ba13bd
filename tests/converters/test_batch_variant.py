"""Batch-N variants for the static route: a profile's ``[batching] static_batch = N`` adds a
TFLite artifact with its batch fixed at N (only when ONNX Runtime computes each sample alone at
N); the device keeps it beside its batch-1 artifact, and the agent's dynamic batching stacks up
to N concurrent requests into one call of it, each answer bit-identical to the unbatched one."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgeserve.converters import convert
from edgeserve.manifest import parse_manifest
from edgeserve.profiles import load_profile
from edgeserve.testing import KeyPair
from tests.support import from_threads

from .conftest import write_profile
from .test_dynamic_batch import _mlp
from .test_preflight import ONNX_ONLY

SIZE = 4
THREADS = 8


@pytest.fixture
def profile(tmp_path: Path) -> Path:
    return write_profile(tmp_path / "profiles", ONNX_ONLY.format(
        name="tflite-b4", fmt="tflite", max_bytes=10**9, unsupported="[]")
        + f"\n[batching]\nstatic_batch = {SIZE}\n")


def _cnn() -> object:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10)).eval()


def _stored_manifest(package: Path) -> dict[str, object]:
    with zipfile.ZipFile(io.BytesIO(package.read_bytes())) as archive:
        return json.loads(archive.read("manifest.json"))  # type: ignore[no-any-return]


def test_the_variant_is_built_kept_and_batched_bit_identically(
        tmp_path: Path, profile: Path, keypair: KeyPair) -> None:
    import torch

    from edgeserve.device_agent import Agent
    from edgeserve.device_agent.batching import BatchingRuntime, BatchPolicy, PaddedRuntime

    images = np.random.default_rng(0).standard_normal((24, 3, 8, 8)).astype(np.float32)
    result = convert(_cnn(), example_inputs=(torch.from_numpy(images[:1]),),
                     profiles=[str(profile)], name="cnn", version="1.0.0",
                     evaluation={"input": images}, out=tmp_path / "out",
                     sign_key=keypair.private, show_progress=False,
                     # a batch given as 1 (often written only to fix the other axes) is freed
                     # for the variant all the same
                     input_shapes={"input": [1, 3, 8, 8]})
    assert result.ok and result.package is not None, result.report
    entries = {a["id"]: a for a in result.report["artifacts"]}
    assert sorted(entries) == ["tflite-fp32", f"tflite-fp32-b{SIZE}"]
    variant = entries[f"tflite-fp32-b{SIZE}"]
    assert variant["batch"] == SIZE and variant["validation"]["status"] == "passed", variant
    assert variant["required_by"] == []
    assert variant["inputs"][0]["shape"] == [SIZE, 8, 8, 3]  # NHWC, batch fixed at N
    stored = _stored_manifest(result.package)
    written = {a["id"]: a for a in stored["artifacts"]}  # type: ignore[index, union-attr]
    assert "batch" not in written["tflite-fp32"] and written[f"tflite-fp32-b{SIZE}"]["batch"] == SIZE
    manifest = parse_manifest(json.dumps(stored).encode())
    one = manifest.artifact("tflite-fp32").inputs or manifest.inputs
    assert one[0].shape[0] == 1  # the artifact a lone request runs on

    device = load_profile(profile)
    trust = [keypair.public_path]
    with Agent(tmp_path / "batched", device, trust, concurrency=THREADS,
               batching={"cnn": BatchPolicy(max_batch=8, max_queue_delay_us=5000)}) as batched, \
            Agent(tmp_path / "plain", device, trust, concurrency=THREADS) as plain:
        info = batched.install(result.package)
        assert info.artifact_id == "tflite-fp32"
        plain.install(result.package)
        # the device keeps the variant's file, but only a batching agent loads it
        assert f"artifacts/tflite-fp32-b{SIZE}.tflite" in plain.cache.record("cnn", "1.0.0").files
        assert not isinstance(plain.model("cnn").runtime, BatchingRuntime | PaddedRuntime)
        loaded = batched.model("cnn")
        assert loaded.extra["batch_variant"] == f"tflite-fp32-b{SIZE}"
        assert loaded.extra["batching"] == {"max_batch": SIZE, "max_queue_delay_us": 5000}
        assert isinstance(loaded.runtime, BatchingRuntime)
        assert isinstance(loaded.runtime.runtime, PaddedRuntime)

        rngs = [np.random.default_rng(seed) for seed in range(THREADS)]

        def call(thread: int, _: int) -> tuple[np.ndarray, np.ndarray]:
            x = rngs[thread].normal(size=(1, 3, 8, 8)).astype(np.float32)
            return x, next(iter(batched.predict("cnn", {"input": x}).outputs.values()))

        pairs = from_threads(call, THREADS, 15)
        for x, out in pairs:
            alone = next(iter(plain.predict("cnn", {"input": x}).outputs.values()))
            np.testing.assert_array_equal(out, alone)  # bit-identical, padded batches included
        stacked = loaded.runtime
        assert stacked.samples == len(pairs)
        assert stacked.batches < len(pairs), (stacked.batches, len(pairs))
        np.testing.assert_allclose(pairs[0][1], _cnn()(torch.from_numpy(pairs[0][0]))  # type: ignore[operator]
                                   .detach().numpy(), rtol=1e-4, atol=1e-4)


def test_a_graph_that_mixes_samples_gets_no_variant(tmp_path: Path, profile: Path,
                                                     keypair: KeyPair) -> None:
    """A Reshape baked at batch 1 cannot take N samples: the variant fails with the reason, the
    batch-1 artifact ships alone, and the conversion is still ok (a variant is never required)."""
    x = np.random.default_rng(0).standard_normal((24, 2, 2)).astype(np.float32)
    result = convert(_mlp(tmp_path / "m.onnx", baked=True), profiles=[str(profile)],
                     name="baked", version="1.0.0", evaluation={"x": x}, out=tmp_path / "out",
                     sign_key=keypair.private, show_progress=False)
    assert result.ok and result.package is not None, result.report
    entries = {a["id"]: a for a in result.report["artifacts"]}
    failed = entries[f"tflite-fp32-b{SIZE}"]
    assert failed["validation"]["status"] == "failed"
    assert f"no batch-{SIZE} variant" in failed["error"] and "each sample alone" in \
        failed["error"], failed["error"]
    stored = _stored_manifest(result.package)
    assert [a["id"] for a in stored["artifacts"]] == ["tflite-fp32"]  # type: ignore[index, union-attr]


def test_variants_are_planned_for_tflite_only_and_never_required() -> None:
    from edgeserve.converters.plan import plan_artifacts

    pi4 = load_profile("raspberry-pi-4")  # tflite int8-dynamic, onnx int8-static, tflite fp32
    assert [p.id for p in plan_artifacts([pi4])] == [
        "tflite-int8-dynamic", "onnx-int8-static", "tflite-fp32"]
    plans = {p.id: p for p in plan_artifacts([pi4], static_batch=8)}
    assert list(plans) == ["tflite-int8-dynamic", "onnx-int8-static", "tflite-fp32",
                           "tflite-int8-dynamic-b8", "tflite-fp32-b8"]
    variant = plans["tflite-int8-dynamic-b8"]
    assert variant.key.batch == 8 and variant.profiles == ["raspberry-pi-4"]
    assert not variant.required and variant.budgets == plans["tflite-int8-dynamic"].budgets


@pytest.mark.parametrize("size", [0, 257, True, 2.5])
def test_a_bad_static_batch_is_refused_before_any_work(tmp_path: Path, profile: Path,
                                                       keypair: KeyPair, size: object) -> None:
    from edgeserve.errors import ConfigError

    with pytest.raises(ConfigError, match="--static-batch"):
        convert(tmp_path / "missing.onnx", profiles=[str(profile)], name="m", version="1.0.0",
                out=tmp_path / "out", sign_key=keypair.private, show_progress=False,
                static_batch=size)
    assert not (tmp_path / "out").exists()
