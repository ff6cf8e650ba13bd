"""Calibration and evaluation data: one array per model input, first axis = samples.

Each input's array takes either form of the shared rule (:mod:`edgeserve.samples`): samples
stacked on the model's batch axis (``(n, *shape without the batch axis)``, the batch axis
anywhere, e.g. ``[layers, batch, hidden]`` state), or one call's full feed per sample (``(n,
*shape)``, e.g. a fixed-batch model whose state has no batch axis the rule can find). The
:class:`Dataset` remembers which (``axes``), and every later step takes its samples through
:meth:`Dataset.sample` (one call's feed) or :meth:`Dataset.stacked` (samples on the first axis).

A :class:`Dataset` is what every later step sees. It comes from

* an ``.npz`` file: one array per model input, keyed by input name, plus an optional ``labels``
  array (a model with one input also accepts a single unnamed array, ``arr_0``);
* a folder of images (``.png``/``.jpg``/…), decoded with the model's :class:`ImagePreprocessing`
  (labels from sub-folder names when the images are sorted into class folders);
* a Python callable returning any of these, a mapping of arrays, or a :class:`Dataset`.

Calibration data (for int8 ranges) and evaluation data (for validation) are kept apart: when no
evaluation data is given, the last fifth of the calibration data is held out and the report says so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeserve.errors import ConfigError, InvalidInputError
from edgeserve.manifest import ImagePreprocessing, TensorSpec
from edgeserve.samples import plan_samples

__all__ = ["DataSpec", "Dataset", "load_dataset", "preprocess_image", "random_dataset"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64,
              "int8": np.int8, "uint8": np.uint8, "int16": np.int16, "int32": np.int32,
              "int64": np.int64, "bool": np.bool_}


@dataclass(frozen=True)
class Dataset:
    """Named input arrays of equal length (first axis = samples), optional labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = "in-memory arrays"
    notes: list[str] = field(default_factory=list)
    axes: dict[str, int | None] = field(default_factory=dict)
    """per input: the model's batch axis its samples are stacked on (absent: 0), or None when
    each sample is one call's full feed"""
    batch_axes: dict[str, int | None] = field(default_factory=dict)
    """per input: the model input's batch axis by the shared rule (None: it has none)"""

    def __post_init__(self) -> None:
        lengths = {name: len(a) for name, a in self.inputs.items()}
        if not lengths:
            raise ConfigError(f"{self.source}: no input arrays")
        if len(set(lengths.values())) != 1:
            raise ConfigError(f"{self.source}: inputs have different sample counts {lengths}; "
                              "every array needs the same first axis (samples)")
        if self.labels is not None and len(self.labels) != len(self):
            raise ConfigError(f"{self.source}: {len(self.labels)} labels for {len(self)} samples")

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, indices: Sequence[int] | np.ndarray | slice) -> Dataset:
        """A subset, in the given order."""
        labels = None if self.labels is None else self.labels[indices]
        return Dataset({k: v[indices] for k, v in self.inputs.items()}, labels, self.source,
                       list(self.notes), dict(self.axes), dict(self.batch_axes))

    @property
    def whole_feeds(self) -> bool:
        """Some input's samples are whole feeds: every call carries one sample."""
        return any(axis is None for axis in self.axes.values())

    def sample(self, i: int) -> dict[str, np.ndarray]:
        """Sample ``i`` as one call's feeds (a batch of one)."""
        feeds = {}
        for name, array in self.inputs.items():
            axis = self.axes.get(name, 0)
            feeds[name] = array[i] if axis is None else np.expand_dims(array[i], axis)
        return feeds

    def stacked(self, name: str) -> np.ndarray:
        """Input ``name`` with samples on the first axis and no batch axis left: as given for
        stacked samples; whole feeds lose their batch axis when it holds one sample, else they
        are returned whole."""
        array = self.inputs[name]
        if self.axes.get(name, 0) is not None:
            return array
        feed_axis = self.batch_axes.get(name)
        if feed_axis is not None and array.shape[feed_axis + 1] == 1:
            squeezed: np.ndarray = np.take(array, 0, axis=feed_axis + 1)
            return squeezed
        return array

    def split_holdout(self, fraction: float = 0.2) -> tuple[Dataset, Dataset]:
        """(calibration, evaluation): the last ``fraction`` held out, at least one sample each."""
        n = len(self)
        if n < 2:
            raise ConfigError(f"{self.source}: {n} sample(s) cannot be split into calibration and "
                              "evaluation data; pass --eval")
        cut = min(n - 1, max(1, round(n * (1 - fraction))))
        return self.take(slice(0, cut)), self.take(slice(cut, n))


DataSpec = Dataset | Mapping[str, Any] | str | Path | Callable[[], Any]


def load_dataset(spec: DataSpec, inputs: Sequence[TensorSpec],
                 preprocessing: Mapping[str, ImagePreprocessing] | None = None) -> Dataset:
    """Load ``spec`` and check it against the model's input signature (names, ranks, dtypes)."""
    dataset = _load(spec, inputs, preprocessing or {})
    return _conform(dataset, inputs)


def random_dataset(inputs: Sequence[TensorSpec], samples: int, seed: int = 0) -> Dataset:
    """Standard-normal (floats) or small non-negative integers, for explicitly allowed fallbacks."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for spec in inputs:
        shape = [samples, *(_static_dim(d) for d in spec.shape[1:])]
        dtype = _NP_DTYPES.get(spec.dtype, np.float32)
        if np.issubdtype(dtype, np.floating):
            arrays[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            arrays[spec.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return Dataset(arrays, None, "random data (--allow-random-calibration)",
                   ["random data: int8 ranges and accuracy figures are not representative"])


def _static_dim(dim: int | str | None) -> int:
    return dim if isinstance(dim, int) and dim > 0 else 1


def _load(spec: DataSpec, inputs: Sequence[TensorSpec],
          preprocessing: Mapping[str, ImagePreprocessing]) -> Dataset:
    if isinstance(spec, Dataset):
        return spec
    if isinstance(spec, Mapping):
        return _from_mapping(spec, inputs, "in-memory arrays")
    if isinstance(spec, str | Path):
        path = Path(spec)
        if path.is_dir():
            return _from_images(path, inputs, preprocessing)
        if path.suffix == ".npz":
            return _from_npz(path, inputs)
        if not path.exists():
            raise ConfigError(f"data {path}: no such file or folder (expected an .npz file or a "
                              "folder of images)")
        raise ConfigError(f"data {path}: unsupported kind; expected an .npz file (one array per "
                          "input, keyed by name, optional 'labels') or a folder of images")
    if callable(spec):
        produced = spec()
        if callable(produced) and not isinstance(produced, Mapping | Dataset):
            raise ConfigError("a data callable must return arrays or a Dataset, not another callable")
        return _load(produced, inputs, preprocessing)
    raise ConfigError(f"unsupported data of type {type(spec).__name__}; expected a Dataset, a "
                      "mapping of arrays, an .npz path, an image folder or a callable")


def _from_mapping(arrays: Mapping[str, Any], inputs: Sequence[TensorSpec], source: str) -> Dataset:
    data = {k: np.asarray(v) for k, v in arrays.items()}
    labels = data.pop("labels", None)
    names = [t.name for t in inputs]
    if len(names) == 1 and names[0] not in data and len(data) == 1:
        data = {names[0]: next(iter(data.values()))}
    missing = [n for n in names if n not in data]
    if missing:
        raise ConfigError(f"{source}: no array for model input(s) {missing}; arrays given: "
                          f"{sorted(data)} (keys must be the model's input names)")
    return Dataset({n: data[n] for n in names}, labels, source)


def _from_npz(path: Path, inputs: Sequence[TensorSpec]) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data {path}: cannot read as .npz ({exc})") from None
    return _from_mapping(arrays, inputs, str(path))


def _from_images(folder: Path, inputs: Sequence[TensorSpec],
                 preprocessing: Mapping[str, ImagePreprocessing]) -> Dataset:
    if len(inputs) != 1 or inputs[0].name not in preprocessing:
        raise ConfigError(f"data {folder}: a folder of images needs a model with one image input "
                          "and known preprocessing (pass preprocessing= or use an .npz file)")
    from PIL import Image

    prep = preprocessing[inputs[0].name]
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"data {folder}: no image files ({', '.join(_IMAGE_SUFFIXES)})")
    classes = sorted({p.parent.name for p in files if p.parent != folder})
    arrays = []
    for path in files:
        with Image.open(path) as img:
            arrays.append(preprocess_image(img, prep))
    labels = None
    if classes and all(p.parent != folder for p in files):
        labels = np.array([classes.index(p.parent.name) for p in files], dtype=np.int64)
    return Dataset({inputs[0].name: np.stack(arrays)}, labels, str(folder))


def preprocess_image(img: Any, prep: ImagePreprocessing) -> np.ndarray:
    """One PIL image → one float32 sample (no batch axis) as the manifest's preprocessing says."""
    mode = "L" if prep.color == "gray" else "RGB"
    height, width = prep.size
    pixels: np.ndarray = np.asarray(img.convert(mode).resize((width, height)), dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if prep.color == "bgr":
        pixels = pixels[:, :, ::-1]
    if prep.invert:
        pixels = 255.0 - pixels
    pixels = pixels * prep.scale
    if prep.mean:
        pixels = pixels - np.asarray(prep.mean, dtype=np.float32)
    if prep.std:
        pixels = pixels / np.asarray(prep.std, dtype=np.float32)
    if prep.layout == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels, dtype=np.float32)


def _conform(dataset: Dataset, inputs: Sequence[TensorSpec]) -> Dataset:
    """Check the arrays against the model's inputs by the shared rule (:mod:`edgeserve.samples`)
    and cast them to the model's dtypes."""
    try:
        plan = plan_samples(inputs, dataset.inputs, where=dataset.source)
    except InvalidInputError as exc:
        raise ConfigError(exc.message) from None
    axes = {spec.name: None if plan.forms[spec.name] == "feed" else plan.input_axes[spec.name]
            for spec in inputs}
    arrays = {}
    for spec in inputs:
        array = dataset.inputs[spec.name]
        dtype = _NP_DTYPES.get(spec.dtype)
        arrays[spec.name] = array.astype(dtype, copy=False) if dtype is not None else array
    return Dataset(arrays, dataset.labels, dataset.source, list(dataset.notes), axes,
                   {spec.name: plan.input_axes[spec.name] for spec in inputs})
