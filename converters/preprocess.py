"""How image files become an input tensor, given on the command line and completed from the model.

``edgeserve convert --preprocess KEY=VALUE`` (repeatable; ``INPUT:KEY=VALUE`` names the input of
a model with several) sets the fields of :class:`~edgeserve.manifest.ImagePreprocessing`:

=========  ===================================================  ==============================
key        value                                                default
=========  ===================================================  ==============================
size       ``HxW`` (``224x224``) or one number for a square     the input's fixed height, width
scale      a number or a fraction (``1/255``)                   ``1/255``
mean, std  comma-separated, one per channel (or one for all)    none
layout     ``NCHW`` or ``NHWC``                                 the input's layout
color      ``rgb``, ``bgr`` or ``gray``                         from the channel count (1: gray)
invert     ``true``/``false`` (bare ``invert`` = true)          false
=========  ===================================================  ==============================

The result goes into the manifest's ``preprocessing``, which is how image folders given as
``--calibration``/``--eval`` are decoded and how ``edgeserve agent predict MODEL --input x.png``
prepares an image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

from edgeserve._doc import ValidationError
from edgeserve._validation import describe_validation_error
from edgeserve.errors import ConfigError
from edgeserve.manifest import ImagePreprocessing, TensorSpec

__all__ = ["FIELDS", "PreprocessSpec", "parse_preprocess", "resolve_preprocessing"]

FIELDS = ("size", "scale", "mean", "std", "layout", "color", "invert")
_ALIASES = {"colour": "color"}
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")

PreprocessSpec = ImagePreprocessing | Mapping[str, Any]
"""A complete :class:`ImagePreprocessing`, or some of its fields (completed from the input)."""


def _fail(text: str, why: str) -> ConfigError:
    return ConfigError(f"--preprocess {text!r}: {why}")


def _size(text: str, raw: str) -> tuple[int, int]:
    parts = raw.lower().split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if len(dims) not in (1, 2) or any(d <= 0 for d in dims):
        raise _fail(text, "size is HEIGHTxWIDTH in pixels (e.g. size=224x224) or one number for "
                          "a square")
    return (dims[0], dims[-1])


def _number(text: str, raw: str) -> float:
    try:
        return float(Fraction(raw.strip()))
    except (ValueError, ZeroDivisionError):
        raise _fail(text, "expected a number or a fraction, e.g. scale=1/255") from None


def _numbers(text: str, raw: str) -> list[float]:
    values = [_number(text, v) for v in raw.split(",") if v.strip()]
    if not 1 <= len(values) <= 4:
        raise _fail(text, "expected 1 to 4 comma-separated numbers, one per channel, e.g. "
                          "mean=0.485,0.456,0.406")
    return values


def _flag(text: str, raw: str) -> bool:
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise _fail(text, "expected true or false")


def _value(text: str, key: str, raw: str) -> Any:
    if key == "size":
        return _size(text, raw)
    if key == "scale":
        return _number(text, raw)
    if key in ("mean", "std"):
        return _numbers(text, raw)
    if key == "invert":
        return _flag(text, raw)
    if key == "layout" and raw.upper() in ("NCHW", "NHWC"):
        return raw.upper()
    if key == "color" and raw.lower() in ("rgb", "bgr", "gray", "grey"):
        return "gray" if raw.lower() == "grey" else raw.lower()
    choices = "NCHW or NHWC" if key == "layout" else "rgb, bgr or gray"
    raise _fail(text, f"{key} is {choices}")


def parse_preprocess(values: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["size=28x28", "image:invert"]`` → ``{"": {"size": (28, 28)}, "image": {"invert":
    True}}``; ``""`` stands for the model's only input. Every value is checked here, before any
    work starts."""
    found: dict[str, dict[str, Any]] = {}
    for text in values:
        head, sep, raw = text.partition("=")
        name, _, key = head.rpartition(":")
        key = _ALIASES.get(key.strip().lower(), key.strip().lower())
        if key not in FIELDS:
            raise _fail(text, f"unknown setting {key!r}; expected KEY=VALUE with KEY one of "
                              f"{', '.join(FIELDS)} (INPUT:KEY=VALUE for one input of several)")
        if not sep and key != "invert":
            raise _fail(text, f"expected {key}=VALUE")
        found.setdefault(name, {})[key] = _value(text, key, raw) if sep else True
    return found


def _default_size(spec: TensorSpec, layout: str) -> tuple[int, int]:
    axes = (2, 3) if layout == "NCHW" else (1, 2)
    dims = [spec.shape[a] if len(spec.shape) == 4 else None for a in axes]
    if not all(isinstance(d, int) and d > 0 for d in dims):
        raise ConfigError(f"--preprocess for input {spec.name!r} {list(spec.shape)}: its height "
                          "and width are not fixed; give them: --preprocess size=HxW")
    return (int(dims[0]), int(dims[1]))  # type: ignore[arg-type]


def _complete(spec: TensorSpec, given: Mapping[str, Any]) -> ImagePreprocessing:
    if len(spec.shape) != 4:
        raise ConfigError(f"--preprocess for input {spec.name!r}: it is {list(spec.shape)}, not "
                          "a 4-D image tensor (batch, channels, height, width or NHWC)")
    layout = str(given.get("layout") or (spec.layout if spec.layout in ("NCHW", "NHWC")
                                          else "NCHW"))
    channels = spec.shape[1] if layout == "NCHW" else spec.shape[3]
    color = given.get("color") or ("gray" if channels == 1 else "rgb")
    fields = {"size": given.get("size") or _default_size(spec, layout), "layout": layout,
              "color": color, **{k: v for k, v in given.items() if k not in ("layout", "color")}}
    wanted = 1 if color == "gray" else 3
    if isinstance(channels, int) and channels != wanted:
        raise ConfigError(f"--preprocess for input {spec.name!r}: color={color} gives {wanted} "
                          f"channel(s), the input has {channels} ({layout})")
    fixed = [spec.shape[a] for a in ((2, 3) if layout == "NCHW" else (1, 2))]
    if all(isinstance(d, int) for d in fixed) and tuple(fields["size"]) != tuple(fixed):
        raise ConfigError(f"--preprocess for input {spec.name!r}: size={fields['size'][0]}x"
                          f"{fields['size'][1]}, but the input is {fixed[0]}x{fixed[1]} "
                          f"({layout}); images are resized to the input's size")
    try:
        return ImagePreprocessing.model_validate(fields)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, f"--preprocess for input {spec.name!r}")
                          ) from None


def resolve_preprocessing(given: Mapping[str, PreprocessSpec],
                          inputs: Sequence[TensorSpec]) -> dict[str, ImagePreprocessing]:
    """Complete preprocessing settings for the model's inputs (``""``: its only input)."""
    specs = {t.name: t for t in inputs}
    resolved: dict[str, ImagePreprocessing] = {}
    for name, value in given.items():
        target = name
        if not name:
            if len(inputs) != 1:
                raise ConfigError(f"--preprocess: the model has {len(inputs)} inputs "
                                  f"{sorted(specs)}; name one: --preprocess INPUT:KEY=VALUE")
            target = inputs[0].name
        if target not in specs:
            raise ConfigError(f"--preprocess names input {target!r}; the model's inputs are "
                              f"{sorted(specs)}")
        resolved[target] = value if isinstance(value, ImagePreprocessing) \
            else _complete(specs[target], value)
    return resolved
