"""Read prediction inputs from files for the CLI: .npy, .npz, .json and image files.

Arrays are named by the model's input signature; a single-input model takes a bare array. A
sample without its batch axis gets one. Images go through the manifest's ``preprocessing`` for the
input (resize, colour, scale, invert, mean/std, layout), so ``agent predict digit.png`` works for
an image model exactly as the converter's calibration data was prepared.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgeserve.errors import InvalidInputError
from edgeserve.manifest import ImagePreprocessing, Manifest, TensorSpec

from .adapter import numpy_dtype

__all__ = ["IMAGE_SUFFIXES", "INPUT_SUFFIXES", "load_image", "read_inputs"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
INPUT_SUFFIXES = (".npy", ".npz", ".json", *IMAGE_SUFFIXES)


def _with_batch(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    if array.ndim == len(spec.shape) - 1:
        return array[None]
    return array


def _single(manifest: Manifest, path: Path) -> TensorSpec:
    if len(manifest.inputs) != 1:
        names = [t.name for t in manifest.inputs]
        raise InvalidInputError(f"{path.name}: the model takes {len(names)} inputs {names}; use "
                                "an .npz or .json file with one entry per input name")
    return manifest.inputs[0]


def _from_json(manifest: Manifest, path: Path) -> dict[str, np.ndarray]:
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{path}: not a readable JSON file ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("inputs"), dict):
        data = data["inputs"]
    if isinstance(data, list):
        data = {_single(manifest, path).name: data}
    if not isinstance(data, dict):
        raise InvalidInputError(f"{path}: expected a JSON list or an object of input name → "
                                "nested list")
    specs = {t.name: t for t in manifest.inputs}
    arrays = {}
    for name, value in data.items():
        spec = specs.get(name)
        dtype = numpy_dtype(spec.dtype) if spec and spec.dtype != "string" else None
        try:
            array = np.asarray(value, dtype=dtype)
        except (ValueError, TypeError) as exc:
            raise InvalidInputError(f"{path}: input {name!r} is not a numeric array "
                                    f"({exc})") from None
        arrays[name] = _with_batch(spec, array) if spec else array
    return arrays


def load_image(path: Path, prep: ImagePreprocessing) -> np.ndarray:
    """One image as a batch of one, prepared as ``prep`` says."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            mode = "L" if prep.color == "gray" else "RGB"
            height, width = prep.size
            pixels: np.ndarray = np.asarray(image.convert(mode).resize((width, height)),
                                            dtype=np.float32)
    except (OSError, UnidentifiedImageError) as exc:
        raise InvalidInputError(f"{path}: not a readable image ({exc})") from None
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if prep.color == "bgr":
        pixels = pixels[..., ::-1]
    if prep.invert:
        pixels = 255.0 - pixels
    pixels = pixels * prep.scale
    if prep.mean:
        pixels = pixels - np.asarray(prep.mean, dtype=np.float32)
    if prep.std:
        pixels = pixels / np.asarray(prep.std, dtype=np.float32)
    if prep.layout == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels[None], dtype=np.float32)


def read_inputs(manifest: Manifest, path: Path) -> dict[str, np.ndarray]:
    """Named input arrays from one file (see the module docstring for the formats)."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise InvalidInputError(f"{path}: no such input file")
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"{path}: not a readable .npy file ({exc})") from None
        spec = _single(manifest, path)
        return {spec.name: _with_batch(spec, array)}
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                specs = {t.name: t for t in manifest.inputs}
                return {k: _with_batch(specs[k], data[k]) if k in specs else data[k]
                        for k in data.files}
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"{path}: not a readable .npz file ({exc})") from None
    if suffix == ".json":
        return _from_json(manifest, path)
    if suffix in IMAGE_SUFFIXES:
        spec = _single(manifest, path)
        prep = manifest.preprocessing.get(spec.name)
        if prep is None:
            raise InvalidInputError(f"{path.name}: model {manifest.name} declares no image "
                                    f"preprocessing for input {spec.name!r}; pass .npy/.json")
        return {spec.name: load_image(path, prep)}
    raise InvalidInputError(f"{path.name}: unsupported input file type {suffix!r}; use one of "
                            f"{', '.join(INPUT_SUFFIXES)}")
