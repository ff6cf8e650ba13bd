"""``edgeserve convert``: model file in, validated and signed package out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from edgeserve.console import console, emit, json_option
from edgeserve.errors import ConfigError, ConversionError, UnservedProfileError

__all__ = ["convert", "parse_input_shape"]


_DYNAMIC = ("?", "n", "batch")


def _dim(text: str, axis: int) -> int | None:
    if axis == 0 and text in _DYNAMIC:
        return None
    size = int(text)
    if size <= 0:
        raise ValueError(text)
    return size


def parse_input_shape(text: str) -> tuple[str, list[int | None]]:
    """``NAME=1x3x224x224`` → ``("NAME", [1, 3, 224, 224])``; a first dimension of ``N``,
    ``batch`` or ``?`` stays dynamic: ``NAME=Nx3x224x224`` → ``("NAME", [None, 3, 224, 224])``."""
    name, sep, dims = text.rpartition("=")
    try:
        shape = [_dim(d.strip(), i) for i, d in enumerate(dims.lower().split("x"))]
    except ValueError:
        shape = []
    if not sep or not name or not shape:
        raise ConfigError(f"--input-shape {text!r}: expected NAME=D1xD2x… with positive "
                          "integers, e.g. image=1x3x224x224; the first may be N (or batch) to "
                          "keep a dynamic batch: image=Nx3x224x224")
    return name, shape


def _layouts(values: tuple[str, ...]) -> dict[str, str]:
    layouts = {}
    for text in values:
        name, sep, layout = text.rpartition("=")
        if not sep or not name or not layout.isalpha():
            raise ConfigError(f"--layout {text!r}: expected NAME=LAYOUT, e.g. image=NCHW")
        layouts[name] = layout.upper()
    return layouts


def _constants(values: tuple[str, ...]) -> dict[str, Any]:
    import json

    constants = {}
    for text in values:
        name, sep, raw = text.partition("=")
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        if not sep or not name or not isinstance(value, int | float | list):
            raise ConfigError(f"--constant-input {text!r}: expected NAME=NUMBER or NAME=[…], "
                              "e.g. sr=16000")
        constants[name] = value
    return constants


def _labels(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--labels {path}: cannot be read as UTF-8 text ({exc})") from None
    labels = [line.strip() for line in text.splitlines() if line.strip()]
    if len(labels) < 2:
        raise ConfigError(f"--labels {path}: expected one class name per line, at least two")
    return labels


@click.command("convert")
@click.argument("source", type=click.Path(exists=True, path_type=Path),
                help="The trained model: .onnx, TorchScript .pt/.pth, .pt2, .keras, a "
                     "SavedModel folder, or a pickled scikit-learn estimator (.pkl/.joblib).")
@click.option("--profile", "profiles", multiple=True, required=True,
              help="Hardware profile name or TOML path; repeatable.")
@click.option("--calibration", type=click.Path(exists=True, path_type=Path),
              help=".npz (one array per input, keyed by name; optional 'labels') or image folder.")
@click.option("--eval", "evaluation", type=click.Path(exists=True, path_type=Path),
              help="Held-out evaluation data, same forms as --calibration.")
@click.option("--name", required=True, help="Package name.")
@click.option("--version", "version", required=True, help="Semantic version, e.g. 1.2.0.")
@click.option("--release", type=click.IntRange(min=1), default=None,
              help="Monotonic release number (devices and the fleet refuse lower or equal "
                   "ones); default: from the version, major×1000000 + minor×1000 + patch.")
@click.option("--sign-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="ed25519 private key (edgeserve keys generate).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder for NAME-VERSION.edgepkg, NAME-VERSION.report.json/.md and "
                   "NAME-VERSION.convert.log.")
@click.option("--input-shape", "input_shapes", multiple=True,
              help="Fix an input's shape: NAME=1x3x224x224 (NAME=Nx3x224x224 keeps the batch "
                   "dynamic); repeatable.")
@click.option("--preprocess", "preprocess", multiple=True,
              help="How image files become the input: KEY=VALUE with KEY size (HxW), scale "
                   "(1/255), mean, std (comma-separated), layout (NCHW or NHWC), color (rgb, "
                   "bgr or gray), invert; INPUT:KEY=VALUE for one of several inputs; "
                   "repeatable.")
@click.option("--layout", "layouts", multiple=True, help="Tensor layout: NAME=NCHW; repeatable.")
@click.option("--constant-input", "constants", multiple=True,
              help="Freeze an input that always has one value: NAME=16000; repeatable.")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Text file with one class name per line.")
@click.option("--task", type=click.Choice(["classification", "regression", "embedding",
                                           "detection", "other"]), help="Override task detection.")
@click.option("--dynamic-batch", is_flag=True,
              help="Make a batch axis the model fixes at 1 dynamic, when ONNX Runtime gives "
                   "each sample its own outputs at batch 2 and 3 (ONNX artifacts; the report "
                   "says either way).")
@click.option("--static-batch", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Also build each TFLite artifact with its batch fixed at N (a batch-N "
                   "variant, for the agent's dynamic batching), when ONNX Runtime gives each of "
                   "N stacked samples its own outputs; as a profile's [batching] static_batch.")
@click.option("--keep-going", is_flag=True, help="Build the other targets when one fails pre-flight.")
@click.option("--allow-random-calibration", is_flag=True,
              help="Calibrate int8 on random data when none is given (the report says so).")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep intermediate files here (default: a temporary folder).")
@json_option
def convert(source: Path, profiles: tuple[str, ...], calibration: Path | None,
            evaluation: Path | None, name: str, version: str, release: int | None,
            sign_key: Path, out: Path, input_shapes: tuple[str, ...], preprocess: tuple[str, ...],
            layouts: tuple[str, ...], constants: tuple[str, ...], labels: Path | None,
            task: str | None, dynamic_batch: bool, static_batch: int, keep_going: bool,
            allow_random_calibration: bool, work_dir: Path | None, as_json: bool) -> None:
    """Convert a trained model into a validated, signed package.

    SOURCE is an .onnx file, a TorchScript (.pt/.pth) or .pt2 file, a .keras file or SavedModel
    folder, or a pickled scikit-learn estimator (.pkl/.joblib; only files you trust). Exit codes:
    0 when every profile ships its own artifacts or a declared fallback, 5 when a profile's
    required artifact failed (or pre-flight refused), 16 when a profile gets no artifact at all.
    """
    from .pipeline import Converter
    from .preprocess import parse_preprocess

    converter = Converter(
        profiles=list(profiles), name=name, version=version, release=release,
        calibration=calibration, evaluation=evaluation,
        input_shapes=dict(parse_input_shape(s) for s in input_shapes),
        preprocessing=parse_preprocess(preprocess), constant_inputs=_constants(constants),
        layouts=_layouts(layouts), labels=_labels(labels), task=task,
        dynamic_batch=dynamic_batch, static_batch=static_batch, keep_going=keep_going,
        allow_random_calibration=allow_random_calibration, show_progress=not as_json,
        work_dir=work_dir)
    result = converter.run(source, out, sign_key)
    emit(result.report, as_json, _render)
    if result.unserved:
        raise UnservedProfileError(
            f"profile(s) {', '.join(result.unserved)} get no artifact that passed; see "
            f"{result.report_md}")
    if not result.ok:
        failed = [p for p, v in result.report["profiles"].items() if v["status"] == "failed"]
        raise ConversionError(f"required artifact(s) failed for profile(s) {', '.join(failed)}; "
                              f"see {result.report_md}")


def _render(report: dict[str, Any]) -> None:
    from .report import render_table

    console.print(render_table(report))
    for note in report["data"].get("notes") or []:
        console.print(f"[dim]note: {escape(note)}[/]")
    for name, profile in report["profiles"].items():
        colour = {"failed": "red", "warned": "yellow", "fallback": "yellow"}.get(
            profile["status"], "green")
        why = "; ".join(profile.get("reasons", []))
        console.print(f"profile [bold]{escape(name)}[/]: [{colour}]{profile['status']}[/]"
                      + (f" — {escape(why)}" if why else ""))
    package = report.get("package")
    if package:
        console.print(f"package: {escape(package['path'])}")
    if report.get("log"):
        console.print(f"[dim]third-party messages: {escape(report['log'])}[/]")
