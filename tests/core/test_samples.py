"""The one rule for how arrays of samples feed a model (edgeserve.samples)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeserve.errors import InvalidInputError
from edgeserve.manifest import TensorSpec
from edgeserve.samples import batch_axis, plan_samples, run_samples


def spec(name: str, shape: Sequence[int | str | None], layout: str | None = None) -> TensorSpec:
    return TensorSpec(name=name, dtype="float32", shape=list(shape), layout=layout)


class Recorder:
    """A fake model: y = 2x on every input, enforcing the declared input shapes per call."""

    def __init__(self, inputs: Sequence[TensorSpec]) -> None:
        self.inputs = list(inputs)
        self.calls: list[dict[str, tuple[int, ...]]] = []

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for s in self.inputs:
            got = feeds[s.name].shape
            assert len(got) == len(s.shape), (s.name, got, s.shape)
            for g, want in zip(got, s.shape, strict=True):
                assert not isinstance(want, int) or g == want, (s.name, got, s.shape)
        self.calls.append({k: v.shape for k, v in feeds.items()})
        return {f"y_{k}": 2 * v for k, v in feeds.items()}


def test_batch_axis_follows_layout_names_and_leading_dims() -> None:
    """The batch axis is the layout's N, a dim named batch, or a leading dynamic/1 axis."""
    assert batch_axis(spec("x", [1, 64])) == 0
    assert batch_axis(spec("x", ["batch", 64])) == 0
    assert batch_axis(spec("x", [None, 3, 8, 8])) == 0
    assert batch_axis(spec("h", [2, "batch", 32])) == 1
    assert batch_axis(spec("x", [8, 8, 1], layout="HWN")) == 2
    assert batch_axis(spec("x", [3, 224])) is None


def test_fixed_batch_one_runs_one_call_per_sample() -> None:
    """A [1, 64] model gets eight calls of [1, 64] for eight stacked samples, outputs (8, 64)."""
    x = spec("x", [1, 64])
    model = Recorder([x])
    data = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    out = run_samples(model, [x], [spec("y_x", [1, 64])], {"x": data})
    assert len(model.calls) == 8
    assert all(c["x"] == (1, 64) for c in model.calls)
    np.testing.assert_array_equal(out["y_x"], 2 * data)


def test_dynamic_batch_stacks_samples_up_to_max_batch() -> None:
    """A [batch, 64] model takes the samples stacked, at most max_batch per call."""
    x = spec("x", ["batch", 64])
    model = Recorder([x])
    data = np.ones((10, 64), np.float32)
    out = run_samples(model, [x], [spec("y_x", ["batch", 64])], {"x": data}, max_batch=4)
    assert [c["x"][0] for c in model.calls] == [4, 4, 2]
    assert out["y_x"].shape == (10, 64)


def test_fixed_batch_of_four_pads_the_last_call() -> None:
    """A model fixed at batch 4 (layout NC) gets full calls; the padding never reaches the
    outputs."""
    x = spec("x", [4, 3], layout="NC")
    model = Recorder([x])
    data = np.arange(18, dtype=np.float32).reshape(6, 3)
    out = run_samples(model, [x], [spec("y_x", [4, 3], layout="NC")], {"x": data})
    assert len(model.calls) == 2
    np.testing.assert_array_equal(out["y_x"], 2 * data)


def test_batch_axis_in_the_middle_is_sliced_there() -> None:
    """Recurrent state [layers, batch, hidden] given as (n, layers, hidden) is stacked on axis 1."""
    h = spec("h", [2, "batch", 5])
    model = Recorder([h])
    data = np.random.default_rng(1).standard_normal((3, 2, 5)).astype(np.float32)
    out = run_samples(model, [h], [spec("y_h", [2, "batch", 5])], {"h": data})
    assert model.calls == [{"h": (2, 3, 5)}]
    np.testing.assert_array_equal(out["y_h"], 2 * data)


def test_full_feed_form_runs_each_sample_as_one_call_and_keeps_outputs_whole() -> None:
    """(n, *input shape) arrays are one call each; outputs come back (n, *output shape)."""
    x, h = spec("x", [1, 4]), spec("h", [2, 1, 5])
    model = Recorder([x, h])
    xs = np.ones((3, 4), np.float32)             # sliced: [4] per sample
    hs = np.zeros((3, 2, 1, 5), np.float32)      # full feed: [2, 1, 5] per sample
    out = run_samples(model, [x, h], [spec("y_x", [1, 4]), spec("y_h", [2, 1, 5])],
                      {"x": xs, "h": hs})
    assert len(model.calls) == 3
    assert model.calls[0] == {"x": (1, 4), "h": (2, 1, 5)}
    assert out["y_h"].shape == (3, 2, 1, 5)
    assert out["y_x"].shape == (3, 1, 4)


def test_data_that_fits_neither_form_names_both_accepted_shapes() -> None:
    """The error says what was given and both shapes the input accepts."""
    with pytest.raises(InvalidInputError) as err:
        plan_samples([spec("x", [1, 64])], {"x": np.zeros((8, 32), np.float32)})
    message = str(err.value)
    assert "'x'" in message and "[8, 32]" in message
    assert "(n, 64)" in message and "(n, 1, 64)" in message


def test_inputs_with_different_sample_counts_are_refused() -> None:
    """Every array's first axis indexes the same samples."""
    with pytest.raises(InvalidInputError, match="different numbers of samples"):
        plan_samples([spec("a", [1, 2]), spec("b", [1, 3])],
                     {"a": np.zeros((4, 2)), "b": np.zeros((5, 3))})


def test_input_without_batch_axis_takes_only_full_feeds() -> None:
    """A fixed [3, 4] input has no batch axis: (n, 3, 4) works, (n, 4) is refused."""
    x = spec("x", [3, 4])
    assert plan_samples([x], {"x": np.zeros((2, 3, 4))}).forms == {"x": "feed"}
    with pytest.raises(InvalidInputError, match="no batch axis"):
        plan_samples([x], {"x": np.zeros((2, 4))})


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 20), fixed=st.sampled_from([None, 1, 2, 3]),
       width=st.integers(1, 5), max_batch=st.integers(1, 9))
def test_any_split_gives_the_same_outputs_as_one_sample_at_a_time(
        n: int, fixed: int | None, width: int, max_batch: int) -> None:
    """However the calls are cut, the joined outputs equal per-sample results in order."""
    x = spec("x", [fixed if fixed is not None else "batch", width], layout="NC")
    data = np.random.default_rng(n).standard_normal((n, width)).astype(np.float32)
    out = run_samples(Recorder([x]), [x], [spec("y_x", [fixed or "batch", width], layout="NC")],
                      {"x": data}, max_batch=max_batch)
    np.testing.assert_array_equal(out["y_x"], 2 * data)
