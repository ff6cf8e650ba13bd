"""Each output is judged by a metric that fits it: cosine for vectors, top-1 for class scores,
error over the output's range (and the decision at 0.5 for a sigmoid) for a few values.

A correct TFLite artifact (max abs error 1e-6) was once failed with "cosine 0.479": its single
sigmoid output is ~0 on half the samples, where LiteRT returns exactly 0 and per-sample cosine
is undefined (counted as 0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeserve.converters import convert
from edgeserve.converters.validate import compare_outputs, judge
from edgeserve.profiles import ValidationBudget
from edgeserve.testing import KeyPair

INT8 = ValidationBudget(min_cosine=0.98, warn_cosine=0.995, min_top1_agreement=0.95)
FP32 = ValidationBudget(min_cosine=0.9999, warn_cosine=0.99999, max_abs_error=1e-3,
                        min_top1_agreement=0.999)
rng = np.random.default_rng(7)


def _probabilities(n: int = 200) -> np.ndarray:
    """A sigmoid's outputs, [n, 1], half of them ~1e-11."""
    p = rng.uniform(0.05, 0.95, (n, 1)).astype(np.float32)
    p[: n // 2] = 1e-11
    return p


def test_a_sigmoid_near_zero_is_judged_by_range_and_decisions_not_cosine() -> None:
    ref = _probabilities()
    got = ref.copy()
    got[got < 1e-6] = 0.0  # what LiteRT returns there
    got += rng.normal(0, 1e-6, got.shape).astype(np.float32) * (got > 0)
    metrics = compare_outputs([ref], [got], names=["p"], probabilities=[0])
    assert "cosine_similarity" not in metrics
    assert metrics["range_error"] < 1e-5 and metrics["decision_agreement"] == 1.0
    assert metrics["outputs"]["p"]["kind"] == "probability"
    assert judge(metrics, {"fp32": FP32})[0] == "passed"


@pytest.mark.parametrize(("change", "why"), [
    (lambda p: p + 0.3, "of the output's range"),
    (lambda p: np.where(p > 0.5, 0.45, p), "decisions at 0.5 agree"),
])
def test_a_wrong_sigmoid_still_fails(change: object, why: str) -> None:
    ref = _probabilities()
    got = change(ref.copy())  # type: ignore[operator]
    metrics = compare_outputs([ref], [got], names=["p"], probabilities=[0])
    status, reasons, _ = judge(metrics, {"int8": INT8})
    assert status == "failed" and any(why in r for r in reasons), reasons


def test_a_scalar_regression_is_judged_against_its_range() -> None:
    """Values around 1,000 spanning 10: an error of 1 is 10 % of the range (fails fp32 and
    int8's derived limit of sqrt(2 x 0.02) = 0.2 only when larger)."""
    ref = (1000 + rng.uniform(0, 10, (100, 1))).astype(np.float32)
    small = compare_outputs([ref], [ref + 0.5])
    assert small["outputs"]["output_0"]["kind"] == "scalar"
    assert judge(small, {"int8": INT8})[0] == "passed"
    assert judge(compare_outputs([ref], [ref + 3.0]), {"int8": INT8})[0] == "failed"


def test_vectors_equal_within_tolerance_agree_even_at_zero_norm() -> None:
    """Embeddings where some samples are all zeros in the reference and 1e-9 in the artifact
    (or the other way round) agree; a really different vector does not."""
    ref = rng.normal(size=(50, 16)).astype(np.float32)
    ref[:10] = 0.0
    got = ref.copy()
    got[:10] = 1e-9
    metrics = compare_outputs([ref], [got])
    assert metrics["cosine_similarity"] == pytest.approx(1.0)
    got[20] = -ref[20]
    assert compare_outputs([ref], [got])["cosine_similarity_min"] < 0


@pytest.mark.slow
def test_a_sigmoid_model_converts_for_phone_and_sbc(tmp_path: Path, keypair: KeyPair) -> None:
    """A logistic model whose output is ~0 on half the evaluation data: every artifact passes
    (TFLite returns exact zeros there) and the report says range error and decisions gated."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = rng.normal(size=(16, 1)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Sigmoid", ["z"], ["p"])],
        "logistic", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = tmp_path / "logistic.onnx"
    onnx.save(model, str(path))
    x = rng.normal(size=(200, 16)).astype(np.float32)
    x[:100] -= (w.T / float(np.sum(w * w))) * ((x[:100] @ w) + 25)  # logit -25
    result = convert(path, profiles=["pixel-8", "raspberry-pi-5"], name="logistic",
                     version="1.0.0", calibration={"x": x}, evaluation={"x": x},
                     out=tmp_path / "out", sign_key=keypair.private, show_progress=False)
    assert {p: v["status"] for p, v in result.report["profiles"].items()} == \
        {"pixel-8": "passed", "raspberry-pi-5": "passed"}, result.report["profiles"]
    for artifact in result.report["artifacts"]:
        validation = artifact["validation"]
        assert validation["status"] == "passed", artifact
        assert "cosine_similarity" not in validation
        assert {"range_error", "decision_agreement"} <= set(validation["gated_by"])
        assert validation["outputs"]["p"]["kind"] == "probability"


def test_a_sigmoid_that_stays_near_zero_is_measured_on_its_own_range() -> None:
    """Evaluation audio with no speech keeps a VAD's probability within 0.003: an int8 error of
    0.002 is 0.2 % of what a probability can be, not 80 % of the range seen (silero-vad's int8
    was once failed so)."""
    ref = rng.uniform(0.0, 0.003, (100, 1)).astype(np.float32)
    got = (ref + rng.uniform(-0.002, 0.002, ref.shape)).clip(0, 1).astype(np.float32)
    metrics = compare_outputs([ref], [got], probabilities=[0])
    assert metrics["range_error"] <= 0.002 + 1e-6
    assert judge(metrics, {"int8": INT8})[0] == "passed"
    assert judge(compare_outputs([ref], [got]), {"int8": INT8})[0] == "failed"  # as a scalar
