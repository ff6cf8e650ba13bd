"""How arrays of samples relate to a model's inputs: one rule for converter data, the package's
health-check samples and the agent's checks.

An array of samples has **samples on its first axis**. Sample ``i`` of one input is either

* **one call's full feed**: ``array[i]`` has exactly the model input's shape, batch axis included
  wherever it is (``array`` has the input's rank + 1), e.g. recurrent state ``[layers, 1, hidden]``
  given as an ``(n, layers, 1, hidden)`` array; or
* **a slice along the model's batch axis**: ``array[i]`` is the input without its batch axis
  (``array`` has the input's rank), e.g. ``(n, 64)`` for a ``[1, 64]`` or ``[batch, 64]`` input.
  A call stacks one or more such slices on the batch axis.

The two forms differ in rank, so an array is never ambiguous. How the samples are then run:

* any input in full-feed form → one call per sample; every output of that call is kept whole,
  so each output array is ``(n, *output shape)``;
* every input sliced → slices are stacked on each input's batch axis, as many per call as the
  batch axis takes (any number where it is dynamic, exactly its size where it is fixed, e.g. one
  for ``[1, 64]``); each output is cut back into samples along its own batch axis, so an output
  array is ``(n, *output shape without the batch axis)``. An output without a batch axis makes
  every call carry one sample and is kept whole.

The batch axis of a tensor is the ``N`` of its layout, else the first axis whose dynamic name
says ``batch`` (or is ``N``), else axis 0 when it is dynamic or 1; a tensor with none of these
(e.g. a fixed ``[3, 224]``) has no batch axis and takes only full feeds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .errors import InvalidInputError
from .manifest import TensorSpec

__all__ = ["Form", "SamplePlan", "batch_axis", "plan_samples", "run_samples"]

Form = Literal["feed", "slice"]
Outputs = Mapping[str, np.ndarray] | Sequence[np.ndarray]


def batch_axis(spec: TensorSpec) -> int | None:
    """The axis of ``spec`` that indexes a batch, or None (see the module docstring)."""
    if spec.layout and "N" in spec.layout and len(spec.layout) == len(spec.shape):
        return spec.layout.index("N")
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, str) and ("batch" in dim.lower() or dim == "N"):
            return axis
    if spec.shape and (spec.shape[0] is None or isinstance(spec.shape[0], str)
                       or spec.shape[0] == 1):
        return 0
    return None


def _shape_text(shape: Sequence[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _fits(got: Sequence[int], want: Sequence[int | str | None]) -> bool:
    return len(got) == len(want) and all(
        not isinstance(w, int) or w <= 0 or g == w for g, w in zip(got, want, strict=True))


def _without(shape: Sequence[int | str | None], axis: int) -> list[int | str | None]:
    return [d for i, d in enumerate(shape) if i != axis]


def _accepted(spec: TensorSpec, axis: int | None) -> str:
    feed = f"(n, {_shape_text(spec.shape)[1:-1]})" if spec.shape else "(n,)"
    if axis is None:
        return f"{feed}, one call's full input per sample (it has no batch axis)"
    sliced = ", ".join(["n", *(_shape_text(_without(spec.shape, axis))[1:-1].split(", ")
                               if len(spec.shape) > 1 else [])])
    return (f"({sliced}): samples stacked on its batch axis {axis}, or {feed}: one call's "
            "full input per sample")


@dataclass(frozen=True)
class SamplePlan:
    """How ``count`` samples of a model's inputs are run: forms, batch axes, samples per call."""

    count: int
    forms: dict[str, Form]
    input_axes: dict[str, int | None]
    output_axes: dict[str, int | None]
    per_call: int | None
    """Samples one call carries: None means any number (every batch axis is dynamic)."""

    @property
    def sliced(self) -> bool:
        return all(form == "slice" for form in self.forms.values())

    def calls(self, arrays: Mapping[str, np.ndarray],
              max_batch: int = 64) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """``(samples in the call, feeds)`` for every call, in sample order."""
        step = 1 if not self.sliced else self.per_call or max(1, max_batch)
        for start in range(0, self.count, step):
            stop = min(start + step, self.count)
            feeds = {}
            for name, form in self.forms.items():
                part = arrays[name][start:stop]
                if form == "feed":
                    feeds[name] = part[0]
                    continue
                axis = self.input_axes[name]
                assert axis is not None
                if len(part) < step and self.per_call is not None:
                    # a fixed batch larger than the samples left: pad with the last one
                    part = np.concatenate([part, np.repeat(part[-1:], step - len(part), 0)])
                feeds[name] = np.ascontiguousarray(np.moveaxis(part, 0, axis))
            yield stop - start, feeds

    def split(self, taken: int, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call's outputs as arrays with the call's ``taken`` samples on the first axis."""
        result = {}
        for name, value in outputs.items():
            value = np.asarray(value)
            axis = self.output_axes.get(name)
            if not self.sliced or axis is None or value.ndim <= axis:
                result[name] = value[None]
                continue
            moved = np.moveaxis(value, axis, 0)
            if len(moved) < taken:
                raise InvalidInputError(
                    f"output {name!r}: batch axis {axis} holds {len(moved)} sample(s) of a call "
                    f"that carried {taken}; its shape {list(value.shape)} cannot be split "
                    "into samples")
            result[name] = moved[:taken]
        return result


def plan_samples(inputs: Sequence[TensorSpec], arrays: Mapping[str, np.ndarray],
                 outputs: Sequence[TensorSpec] = (), where: str = "samples") -> SamplePlan:
    """Check ``arrays`` against the model's inputs and decide how to run them.

    Raises :class:`~edgeserve.errors.InvalidInputError` naming the input, the shape found and
    both accepted shapes, when an array fits neither form, or when inputs disagree on the count.
    """
    forms: dict[str, Form] = {}
    axes: dict[str, int | None] = {}
    counts: dict[str, int] = {}
    for spec in inputs:
        if spec.name not in arrays:
            raise InvalidInputError(f"{where}: no array for input {spec.name!r}; arrays given: "
                                    f"{sorted(arrays)}")
        array = np.asarray(arrays[spec.name])
        axis = batch_axis(spec)
        axes[spec.name] = axis
        if array.ndim == len(spec.shape) + 1 and _fits(array.shape[1:], spec.shape):
            forms[spec.name] = "feed"
        elif axis is not None and array.ndim == len(spec.shape) and array.ndim >= 1 \
                and _fits(array.shape[1:], _without(spec.shape, axis)):
            forms[spec.name] = "slice"
        else:
            raise InvalidInputError(
                f"{where}: input {spec.name!r} is an array of shape {list(array.shape)}, which "
                f"fits neither accepted form for the model's {_shape_text(spec.shape)}: "
                f"{_accepted(spec, axis)}")
        counts[spec.name] = int(array.shape[0])
    if len(set(counts.values())) > 1:
        raise InvalidInputError(f"{where}: inputs hold different numbers of samples {counts}; "
                                "the first axis of every array indexes the same samples")
    output_axes = {spec.name: batch_axis(spec) for spec in outputs}
    per_call = _per_call(inputs, axes, output_axes) if all(
        f == "slice" for f in forms.values()) else 1
    return SamplePlan(next(iter(counts.values()), 0), forms, axes, output_axes, per_call)


def _per_call(inputs: Sequence[TensorSpec], axes: Mapping[str, int | None],
              output_axes: Mapping[str, int | None]) -> int | None:
    if any(axis is None for axis in output_axes.values()):
        return 1
    fixed: set[int] = set()
    for spec in inputs:
        axis = axes[spec.name]
        dim = spec.shape[axis] if axis is not None else None
        if isinstance(dim, int) and dim > 0:
            fixed.add(dim)
    if not fixed:
        return None
    # inputs that fix the batch at different sizes cannot share calls: one sample each
    return fixed.pop() if len(fixed) == 1 else 1


def run_samples(run: Callable[[dict[str, np.ndarray]], Outputs], inputs: Sequence[TensorSpec],
                outputs: Sequence[TensorSpec], arrays: Mapping[str, np.ndarray],
                max_batch: int = 64, where: str = "samples") -> dict[str, np.ndarray]:
    """Run every sample through ``run`` (one call's feeds → outputs, by name or in ``outputs``'
    order) as :func:`plan_samples` decides, and join the outputs with samples first."""
    plan = plan_samples(inputs, arrays, outputs, where)
    names = [spec.name for spec in outputs]
    parts: dict[str, list[np.ndarray]] = {}
    for taken, feeds in plan.calls(arrays, max_batch):
        produced = run(feeds)
        named = produced if isinstance(produced, Mapping) else dict(
            zip(names, produced, strict=True))
        for name, value in plan.split(taken, named).items():
            parts.setdefault(name, []).append(value)
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}

