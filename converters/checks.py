"""Everything a conversion is given, checked before any work starts.

A conversion takes minutes; an argument it cannot use must not cost them. :func:`check_options`
refuses, with the value found and what was expected: a package name or version the manifest would
refuse (``--version 1.0``), a release that is not a positive number, unknown profiles, a signing
key that cannot be read, data paths that are missing or of an unknown kind (an image folder
without ``--preprocess``), too few labels, malformed input shapes, and an ``--out`` that is a file.

The release number (devices and the fleet refuse a lower or equal one than they have) defaults to
:func:`derive_release` of the semantic version, so converting 2.0.0 after 1.0.0 just works.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeserve.errors import ConfigError
from edgeserve.manifest import _NAME, _SEMVER
from edgeserve.profiles import HardwareProfile

from .options import ConvertOptions

__all__ = ["Checked", "check_options", "derive_release"]

_PART = 1000
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Checked:
    """What the checks resolved: the profiles, the signing key and the release number."""

    profiles: list[HardwareProfile]
    key: Ed25519PrivateKey
    release: int


def derive_release(version: str) -> int:
    """``major × 1 000 000 + minor × 1 000 + patch`` (1.2.3 → 1002003): increases with every
    version as long as minor and patch stay below 1000. Pre-release versions (``2.0.0-rc.1``)
    and versions past that range have no derived number: :class:`ConfigError` asks for
    ``--release``."""
    match = re.match(_SEMVER, version)
    if match is None:
        raise ConfigError(_version_message(version))
    major, minor, patch = (int(match.group(i)) for i in (1, 2, 3))
    if match.group(4):
        raise ConfigError(f"--version {version} is a pre-release, which has no derived release "
                          "number: pass --release N, higher than every release you published "
                          f"before and lower than {derive_release(f'{major}.{minor}.{patch}')} "
                          f"(what {major}.{minor}.{patch} will get)")
    if minor >= _PART or patch >= _PART:
        raise ConfigError(f"--version {version}: minor and patch below {_PART} derive the "
                          "release number (major×1000000 + minor×1000 + patch); pass --release N")
    release = major * _PART * _PART + minor * _PART + patch
    if release < 1:
        raise ConfigError(f"--version {version} derives release 0; devices need a release of "
                          "at least 1: use 0.0.1 or later, or pass --release N")
    return release


def _version_message(version: str) -> str:
    return (f"--version {version!r} is not a semantic version; expected MAJOR.MINOR.PATCH, e.g. "
            "1.0.0 (optionally -PRERELEASE, e.g. 1.0.0-rc.1)")


def _private_key(key: Ed25519PrivateKey | Path | str) -> Ed25519PrivateKey:
    if isinstance(key, Ed25519PrivateKey):
        return key
    from edgeserve.signing import load_private_key

    return load_private_key(Path(key))


def _check_data(option: str, spec: Any, preprocessing: Mapping[str, Any]) -> None:
    if not isinstance(spec, str | Path):
        return
    path = Path(spec)
    if path.is_dir():
        if not any(p.suffix.lower() in _IMAGE_SUFFIXES for p in path.rglob("*")):
            raise ConfigError(f"--{option} {path}: a folder without image files "
                              f"({', '.join(_IMAGE_SUFFIXES)}); expected an .npz file or a "
                              "folder of images")
        if not preprocessing:
            raise ConfigError(
                f"--{option} {path}: a folder of images needs to know how pixels become the "
                "input tensor: pass --preprocess, e.g. --preprocess scale=1/255 (size, layout "
                "and colour default from the model's input; add mean=…, std=…, invert as your "
                "training did)")
        return
    if not path.is_file():
        raise ConfigError(f"--{option} {path}: no such file or folder (expected an .npz file "
                          "or a folder of images)")
    if path.suffix.lower() != ".npz":
        raise ConfigError(f"--{option} {path}: unsupported kind {path.suffix or '(none)'!r}; "
                          "expected an .npz file (one array per input, keyed by name, optional "
                          "'labels') or a folder of images")
    try:
        with path.open("rb") as fh:
            fh.read(4)
    except OSError as exc:
        raise ConfigError(f"--{option} {path}: cannot be read ({exc.strerror})") from None


def _check_shapes(shapes: Mapping[str, Sequence[int | None]]) -> None:
    for name, dims in shapes.items():
        bad = [d for d in dims if d is not None and (not isinstance(d, int) or d <= 0)]
        if not dims or bad or any(d is None for d in list(dims)[1:]):
            raise ConfigError(f"--input-shape {name}: {list(dims)}: expected positive sizes; "
                              "only the first (batch) axis may stay dynamic")


def _check_dir(option: str, path: Path | None) -> None:
    if path is not None and path.exists() and not path.is_dir():
        raise ConfigError(f"--{option} {path}: a file, expected a folder (it is created when "
                          "missing)")


def check_options(options: ConvertOptions, sign_key: Ed25519PrivateKey | Path | str,
                  out: Path) -> Checked:
    """Check every argument of a conversion (module docstring); the first problem raises."""
    if not re.match(_NAME, options.name or ""):
        raise ConfigError(f"--name {options.name!r}: expected letters, digits, '.', '_' or '-' "
                          "(starting with a letter or digit, at most 128), e.g. digits")
    if not re.match(_SEMVER, options.version or ""):
        raise ConfigError(_version_message(options.version))
    if options.release is not None and (isinstance(options.release, bool) or
                                        not isinstance(options.release, int) or
                                        options.release < 1):
        raise ConfigError(f"--release {options.release!r}: expected a whole number ≥ 1")
    if isinstance(options.static_batch, bool) or not isinstance(options.static_batch, int) or \
            not 1 <= options.static_batch <= 256:
        raise ConfigError(f"--static-batch {options.static_batch!r}: expected a whole number "
                          "from 1 (no batch-N variant) to 256")
    release = options.release if options.release is not None else \
        derive_release(options.version)
    profiles = options.load_profiles()
    key = _private_key(sign_key)
    _check_dir("out", out)
    _check_dir("work-dir", options.work_dir)
    _check_shapes(options.input_shapes)
    for option, spec in (("calibration", options.calibration), ("eval", options.evaluation)):
        _check_data(option, spec, options.preprocessing)
    if options.labels is not None and len(options.labels) < 2:
        raise ConfigError("labels: give at least two class names")
    return Checked(profiles, key, release)
