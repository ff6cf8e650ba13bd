"""The LiteRT runtime's call paths give the same answers: the primary interpreter's fast path,
the general path (resized shapes, non-contiguous arrays) and the pool that busy callers share."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edgeserve.device_agent.runtimes import ArtifactSource
from edgeserve.device_agent.runtimes.litert import LiteRtRuntime
from edgeserve.profiles import HardwareProfile

from .models import conv_weights, tflite_conv


@pytest.fixture(scope="module")
def conv_content() -> bytes:
    return tflite_conv(conv_weights())


def _reference(content: bytes, images: np.ndarray) -> np.ndarray:
    """One fresh interpreter per row: no state shared with the runtime under test."""
    from ai_edge_litert.interpreter import Interpreter

    rows = []
    for row in images:
        it = Interpreter(model_content=content)
        detail = it.get_input_details()[0]
        it.resize_tensor_input(detail["index"], [1, *row.shape])
        it.allocate_tensors()
        it.set_tensor(detail["index"], np.ascontiguousarray(row[None]))
        it.invoke()
        rows.append(it.get_tensor(it.get_output_details()[0]["index"]))
    return np.concatenate(rows)


def test_shapes_and_layouts_in_any_order(conv_content: bytes,
                                         tflite_profile: HardwareProfile) -> None:
    """Batch 1 (fast path), batch 3 (resize), batch 1 again, then a non-contiguous view: each
    answer equals a fresh interpreter's."""
    runtime = LiteRtRuntime(ArtifactSource(content=conv_content), tflite_profile)
    rng = np.random.default_rng(7)
    name = runtime.inputs[0].name
    for batch in (1, 3, 1, 2, 1):
        images = rng.normal(size=(batch, 8, 8, 3)).astype(np.float32)
        got = runtime.run({name: images})[0]
        np.testing.assert_allclose(got, _reference(conv_content, images), rtol=1e-5, atol=1e-6)
    wide = rng.normal(size=(2, 8, 8, 6)).astype(np.float32)
    view = wide[:1, :, :, ::2]  # strided: not C-contiguous
    assert not view.flags.c_contiguous
    np.testing.assert_allclose(runtime.run({name: view})[0], _reference(conv_content, view),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pool_size", [1, 3])
def test_concurrent_callers_share_the_primary_and_the_pool(
        conv_content: bytes, tflite_profile: HardwareProfile, pool_size: int) -> None:
    """8 threads at once: every answer is right, and no more interpreters exist than the pool
    allows (pool_size 1: callers wait for the primary)."""
    runtime = LiteRtRuntime(ArtifactSource(content=conv_content), tflite_profile,
                            pool_size=pool_size)
    name = runtime.inputs[0].name
    errors: list[BaseException] = []
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    start = threading.Barrier(8)

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            start.wait(10)
            for _ in range(25):
                images = rng.normal(size=(int(rng.integers(1, 4)), 8, 8, 3)).astype(np.float32)
                pairs.append((images, runtime.run({name: images})[0]))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert len(pairs) == 200
    assert runtime._created <= pool_size
    for images, got in pairs[::7]:
        np.testing.assert_allclose(got, _reference(conv_content, images), rtol=1e-5, atol=1e-6)

