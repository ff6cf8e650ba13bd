"""Issue 13: a new user's own model goes through the documented commands the first time.

Each test walks one documented path with a model as a newcomer brings it: a Keras model saved
with ``model.export()`` or ``tf.saved_model.save``; a scikit-learn Pipeline for the shipped
Raspberry Pi 5 and Pixel 8 profiles; a TorchScript CNN and a ``.pt2`` with labels and a dynamic
batch; arguments checked before any work; image files for calibration and ``agent predict``; and
a console that shows only the converter's own output.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeserve.cli import main
from edgeserve.converters import convert
from edgeserve.package import open_package
from edgeserve.testing import KeyPair, make_keypair

from .conftest import Digits, write_profile
from .test_preflight import ONNX_ONLY

ONNX_AND_TFLITE = """
schema = "edgeserve.profile/1"
name = "cpu-both"
title = "Test profile: ONNX and TFLite fp32"
device_class = "desktop"
vendor = "test"

[hardware]
arch = "any"
cpu = "any"
cores = 2
memory_mb = 64
storage_mb = 64

[budgets]
max_model_bytes = 1_000_000_000
cache_bytes = 1_000_000_000

[runtimes.onnxruntime]
[runtimes.litert]

[[artifacts]]
format = "onnx"
precision = "fp32"

[[artifacts]]
format = "tflite"
precision = "fp32"
"""


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


@pytest.fixture
def onnx_profile(tmp_path: Path) -> Path:
    return write_profile(tmp_path / "profiles", ONNX_ONLY.format(
        name="onnx-cpu", fmt="onnx", max_bytes=10**9, unsupported="[]"))


# --- item 4: TensorFlow SavedModel -----------------------------------------------------------

_KERAS = """
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, keras, tensorflow as tf
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((8,), name="features"),
                          keras.layers.Dense(16, activation="relu"),
                          keras.layers.Dense(3, activation="softmax")])
x = np.random.default_rng(0).standard_normal((40, 8)).astype("float32")
root = sys.argv[1]
model.export(root + "/exported")
tf.saved_model.save(model, root + "/saved")
np.savez(root + "/data.npz", x=x, expected=model.predict(x, verbose=0))
"""


@pytest.mark.slow
def test_savedmodel_converts_whether_saved_by_export_or_tf_saved_model_save(
        tmp_path: Path, onnx_profile: Path, keypair: KeyPair) -> None:
    """Both ways of saving a Keras model as a SavedModel convert and match Keras' outputs."""
    from edgeserve.converters.runners import OrtRunner

    subprocess.run([sys.executable, "-c", _KERAS, str(tmp_path)], check=True,
                   capture_output=True, timeout=300)
    data = np.load(tmp_path / "data.npz")
    for saved in ("exported", "saved"):
        result = convert(tmp_path / saved, profiles=[str(onnx_profile)], name="dense",
                         version="1.0.0", evaluation={"x": data["x"]}, out=tmp_path / saved / "out",
                         sign_key=keypair.private, show_progress=False)
        assert result.ok, (saved, result.report)
        model = result.report["model"]
        assert model["source"]["framework"] == "tensorflow-savedmodel"
        assert [o["name"] for o in model["outputs"]] == ["output_0"], saved
        assert model["inputs"][0]["shape"] == ["batch", 8]
        assert result.package is not None
        with open_package(result.package) as pkg:
            pkg.extract_artifact("onnx-fp32", tmp_path / saved / "x")
        runner = OrtRunner(tmp_path / saved / "x" / "artifacts" / "onnx-fp32.onnx")
        name = model["inputs"][0]["name"]
        np.testing.assert_allclose(runner.run({name: data["x"]})[0], data["expected"], atol=1e-5)


# --- item 5: scikit-learn on the shipped profiles --------------------------------------------

def test_scikit_learn_pipeline_ships_a_declared_fallback_on_pi_5_and_pixel_8(
        tmp_path: Path, keypair: KeyPair, capsys: pytest.CaptureFixture[str]) -> None:
    """A pickled StandardScaler + RandomForest pipeline converts for raspberry-pi-5 and pixel-8:
    pre-flight skips the targets that cannot take ai.onnx.ml ops (⚠), each profile ships the
    passing onnx-fp32 fallback, the report and manifest say why, and the exit code is 0."""
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    pipeline = Pipeline([("scale", StandardScaler()),
                         ("forest", RandomForestClassifier(n_estimators=10, max_depth=4,
                                                           random_state=0))]).fit(x, y)
    (tmp_path / "iris.pkl").write_bytes(pickle.dumps(pipeline))
    np.savez(tmp_path / "calib.npz", input=x[::2])
    np.savez(tmp_path / "eval.npz", input=x[1::2], labels=y[1::2])
    (tmp_path / "labels.txt").write_text("setosa\nversicolor\nvirginica\n")
    code, out, err = _cli(
        capsys, "convert", tmp_path / "iris.pkl", "--profile", "raspberry-pi-5", "--profile",
        "pixel-8", "--calibration", tmp_path / "calib.npz", "--eval", tmp_path / "eval.npz",
        "--labels", tmp_path / "labels.txt", "--name", "iris", "--version", "1.0.0",
        "--sign-key", keypair.private_path, "--out", tmp_path / "dist")
    assert code == 0, err
    assert "profile pixel-8: fallback — fallback: onnx-fp32 ships in place of" in out
    assert "⚠ tflite-fp16 not built (pre-flight)" in err
    assert not [line for line in err.splitlines() if "✓" in line and "tflite" in line]
    text = (tmp_path / "dist" / "iris-1.0.0.report.json").read_text()
    assert "\x1b" not in text and "\\u001b" not in text
    report = json.loads(text)
    for profile in ("raspberry-pi-5", "pixel-8"):
        verdict = report["profiles"][profile]
        assert verdict["status"] == "fallback" and verdict["ships"] == ["onnx-fp32"], verdict
        assert all("ai.onnx.ml" in f["why"] for f in verdict["fallback"]), verdict
        assert {f["replaces"] for f in verdict["fallback"]} >= {"tflite-int8-dynamic"}
        assert verdict["reasons"][0].startswith("fallback: onnx-fp32 ships in place of")
    with open_package(tmp_path / "dist" / "iris-1.0.0.edgepkg", trust=keypair.trust) as pkg:
        manifest = pkg.manifest
    assert [a.id for a in manifest.artifacts] == ["onnx-fp32"]
    fp32 = manifest.artifacts[0]
    assert set(fp32.validation["fallback"]) == {"raspberry-pi-5", "pixel-8"}
    assert fp32.validation["status"] == "passed" and fp32.validation["accuracy"] > 0.9
    assert set(fp32.profiles) == {"raspberry-pi-5", "pixel-8"}


def test_onnx2tf_failure_reads_as_plain_text() -> None:
    """onnx2tf's coloured ERROR lines reach the report without terminal colour codes."""
    from edgeserve.converters.tflite_build import _log_summary

    log = ("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
           "ModuleNotFoundError: No module named 'onnx2tf.ops.Scaler'\n"
           "\x1b[31mERROR:\x1b[0m Scaler OP is not yet implemented.\n")
    assert _log_summary(log) == "ERROR: Scaler OP is not yet implemented."


def test_progress_marks_say_what_happened() -> None:
    """A step that failed shows ✗, one partly failed or skipped ⚠, only a clean one ✓."""
    from rich.console import Console

    from edgeserve.converters.progress import Progress

    buffer = StringIO()
    console = Console(file=buffer, width=120, color_system=None, force_terminal=False)
    with Progress(console=console) as progress:
        with progress.step("clean"):
            pass
        with progress.step("partly") as step:
            step.warn("failed: tflite-fp16")
        with progress.step("failing") as step:
            step.fail("failed")
        with pytest.raises(RuntimeError), progress.step("raising"):
            raise RuntimeError("boom")
        progress.note("tflite-fp32 not built (pre-flight)")
    lines = {line.split()[1]: line.split()[0] for line in buffer.getvalue().splitlines()
             if len(line.split()) > 1}
    assert lines == {"clean": "✓", "partly": "⚠", "failing": "✗", "raising": "✗",
                     "tflite-fp32": "⚠"}, buffer.getvalue()


# --- item 6 and 12: TorchScript with labels and a dynamic batch; a quiet console --------------

_HEAD = """
import sys, warnings, numpy as np, torch
torch.manual_seed(0)
# a convolutional classifier head: scores come out as [batch, 4, 1, 1]
net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                          torch.nn.Conv2d(8, 4, 1), torch.nn.AdaptiveAvgPool2d(1)).eval()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.jit.trace(net, torch.zeros(1, 3, 16, 16)).save(sys.argv[1] + "/head.pt")
x = np.random.default_rng(0).standard_normal((40, 3, 16, 16)).astype(np.float32)
with torch.no_grad():
    y = net(torch.from_numpy(x)).numpy().reshape(40, 4).argmax(1)
np.savez(sys.argv[1] + "/calib.npz", x=x[:24])
np.savez(sys.argv[1] + "/eval.npz", x=x[24:], labels=y[24:])
"""


@pytest.fixture(scope="module")
def torchscript_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``edgeserve convert head.pt --input-shape x=Nx3x16x16 --labels …`` run as a user runs
    it (its own process, --json), for ONNX and TFLite fp32."""
    root = tmp_path_factory.mktemp("torchscript")
    subprocess.run([sys.executable, "-c", _HEAD, str(root)], check=True, capture_output=True,
                   timeout=300)
    (root / "labels.txt").write_text("a\nb\nc\nd\n")
    profile = write_profile(root / "profiles", ONNX_AND_TFLITE)
    key = make_keypair(root / "keys", "release")
    proc = subprocess.run(
        [sys.executable, "-m", "edgeserve", "convert", str(root / "head.pt"), "--input-shape",
         "x=Nx3x16x16", "--labels", str(root / "labels.txt"), "--profile", str(profile),
         "--calibration", str(root / "calib.npz"), "--eval", str(root / "eval.npz"),
         "--name", "head", "--version", "1.0.0", "--sign-key", str(key.private_path),
         "--out", str(root / "dist"), "--json"],
        capture_output=True, text=True, timeout=600, check=False)
    return {"root": root, "proc": proc}


@pytest.mark.slow
def test_torchscript_classifier_keeps_a_dynamic_batch(torchscript_run: dict[str, Any]) -> None:
    """A TorchScript CNN given N as batch and labels is a classifier with accuracy, and its
    package takes a batch of 2."""
    from edgeserve.converters.runners import OrtRunner

    proc, root = torchscript_run["proc"], torchscript_run["root"]
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["model"]["task"] == "classification"
    assert report["model"]["inputs"][0]["shape"] == ["batch", 3, 16, 16]
    assert [o["name"] for o in report["model"]["outputs"]] == ["output"]
    for artifact in report["artifacts"]:
        assert artifact["validation"]["accuracy"] == 1.0, artifact
    with open_package(root / "dist" / "head-1.0.0.edgepkg") as pkg:
        assert pkg.manifest.inputs[0].shape == ["batch", 3, 16, 16]
        pkg.extract_artifact("onnx-fp32", root / "x")
    x = np.load(root / "eval.npz")["x"][:2]
    assert OrtRunner(root / "x" / "artifacts" / "onnx-fp32.onnx").run({"x": x})[0].shape == \
        (2, 4, 1, 1)


@pytest.mark.slow
def test_convert_console_shows_only_its_own_output(torchscript_run: dict[str, Any]) -> None:
    """With TensorFlow and LiteRT at work, stdout is the JSON report, stderr is empty, and the
    third-party lines are kept in NAME-VERSION.convert.log next to NAME-VERSION.report.*."""
    proc, root = torchscript_run["proc"], torchscript_run["root"]
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    report = json.loads(proc.stdout)
    assert report["log"] == str(root / "dist" / "head-1.0.0.convert.log")
    assert "XNNPACK" in Path(report["log"]).read_text()
    assert sorted(p.name for p in (root / "dist").iterdir()) == [
        "head-1.0.0.convert.log", "head-1.0.0.edgepkg", "head-1.0.0.report.json",
        "head-1.0.0.report.md"]


def test_pt2_batch_axis_and_outputs_get_readable_names(digits: Digits, tmp_path: Path,
                                                       onnx_profile: Path,
                                                       keypair: KeyPair) -> None:
    """A .pt2 exported with a dynamic batch has a `batch` axis (not s77) and an `output`, the
    same in the report and the signed manifest."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(digits.module, (torch.from_numpy(digits.x_test[:2]),),
                                  dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "digits.pt2"))
    result = convert(tmp_path / "digits.pt2", profiles=[str(onnx_profile)], name="digits",
                     version="1.0.0", evaluation={"x": digits.x_test[:64]},
                     out=tmp_path / "out", sign_key=keypair.private, show_progress=False)
    assert result.ok and result.manifest is not None
    model = result.report["model"]
    assert model["inputs"][0]["shape"] == ["batch", 1, 8, 8]
    assert model["outputs"] == [{"name": "output", "dtype": "float32", "shape": ["batch", 10],
                                 "layout": "NC"}]
    assert [t.model_dump(mode="json", exclude_defaults=True) for t in result.manifest.outputs] \
        == model["outputs"]


def test_a_graph_that_cannot_take_batch_2_gets_batch_1_and_says_so(
        tmp_path: Path, onnx_profile: Path, keypair: KeyPair) -> None:
    """A module that bakes batch 1 into a reshape is exported with a dynamic batch, fails the
    batch-2 check, and ships with batch 1 and a note saying why."""
    import torch

    class Baked(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(12, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x.view(1, -1))

    x = np.random.default_rng(0).standard_normal((20, 3, 4)).astype(np.float32)
    result = convert(Baked().eval(), example_inputs=(torch.from_numpy(x[:1]),),
                     input_names=["x"], profiles=[str(onnx_profile)], name="baked",
                     version="1.0.0", evaluation={"x": x}, out=tmp_path / "out",
                     sign_key=keypair.private, show_progress=False)
    assert result.ok
    assert result.report["model"]["inputs"][0]["shape"] == [1, 3, 4]
    assert any("does not run at batch 2" in n for n in result.report["data"]["notes"])


def test_exporter_symbols_become_readable_names() -> None:
    """tf2onnx-style `unk__0` axes and `Identity:0`/`probs:1` outputs get readable names, and a
    scikit-learn regressor's output is output_0."""
    import onnx
    from onnx import TensorProto, helper
    from sklearn.linear_model import LinearRegression

    from edgeserve.converters.graph import readable_names
    from edgeserve.converters.sources import import_model

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["Identity:0"]),
         helper.make_node("Softmax", ["x"], ["probs:1"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["unk__0", 3])],
        [helper.make_tensor_value_info("Identity:0", TensorProto.FLOAT, ["unk__1", 3]),
         helper.make_tensor_value_info("probs:1", TensorProto.FLOAT, ["unk__0", 3])])
    model, notes = readable_names(helper.make_model(graph))
    onnx.checker.check_model(model)
    assert [o.name for o in model.graph.output] == ["output_0", "probs"]
    dims = [v.type.tensor_type.shape.dim[0].dim_param
            for v in [*model.graph.input, *model.graph.output]]
    assert dims == ["batch"] * 3 and notes
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    imported = import_model(LinearRegression().fit(x, x.sum(1)), Path())
    assert [o.name for o in imported.model.graph.output] == ["output_0"]


# --- item 7 and 12: arguments checked first; a release per version; reports per version -------

@pytest.mark.parametrize(("args", "expected"), [
    (["--version", "1.0"], "--version '1.0' is not a semantic version"),
    (["--version", "2.0.0-rc.1"], "pass --release N"),
    (["--version", "1.0.0", "--name", "my model"], "--name 'my model'"),
    (["--version", "1.0.0", "--profile", "raspbery-pi-5"], "did you mean raspberry-pi-5"),
    (["--version", "1.0.0", "--calibration", "IMAGES"], "needs to know how pixels become"),
])
def test_arguments_are_checked_before_any_work(
        args: list[str], expected: str, digits_onnx: Path, onnx_profile: Path, tmp_path: Path,
        keypair: KeyPair, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad argument is refused with exit 2 and what was expected, before anything is built."""
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("L", (8, 8)).save(images / "a.png")
    args = [str(images) if a == "IMAGES" else a for a in args]
    code, _, err = _cli(capsys, "convert", digits_onnx, "--profile", onnx_profile, "--name",
                        "digits", "--sign-key", keypair.private_path, "--out", tmp_path / "out",
                        *args)
    assert code == 2, err
    assert expected in err and "internal error" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_release_follows_the_version_and_each_version_keeps_its_report(
        digits_onnx: Path, digits_npz: tuple[Path, Path], onnx_profile: Path, tmp_path: Path,
        keypair: KeyPair, capsys: pytest.CaptureFixture[str]) -> None:
    """Converting 1.0.0 then 2.0.0 into one folder without --release gives releases 1000000 and
    2000000 and two report pairs."""
    calibration, evaluation = digits_npz
    for version in ("1.0.0", "2.0.0"):
        code, _, err = _cli(capsys, "convert", digits_onnx, "--profile", onnx_profile,
                            "--calibration", calibration, "--eval", evaluation, "--name",
                            "digits", "--version", version, "--sign-key", keypair.private_path,
                            "--out", tmp_path / "dist")
        assert code == 0, err
    releases = {}
    for version in ("1.0.0", "2.0.0"):
        with open_package(tmp_path / "dist" / f"digits-{version}.edgepkg") as pkg:
            releases[version] = pkg.manifest.release
        report = json.loads((tmp_path / "dist" / f"digits-{version}.report.json").read_text())
        assert report["model"]["version"] == version
        assert f"# digits {version}" in (tmp_path / "dist" / f"digits-{version}.report.md").read_text()
    assert releases == {"1.0.0": 1_000_000, "2.0.0": 2_000_000}


# --- item 8: image files -----------------------------------------------------------------------

def test_image_folders_and_agent_predict_use_convert_preprocess(
        digits: Digits, digits_onnx: Path, onnx_profile: Path, tmp_path: Path,
        keypair: KeyPair, capsys: pytest.CaptureFixture[str]) -> None:
    """`convert --preprocess invert=true --calibration imgs/` stores the preprocessing in the
    manifest, and `agent predict MODEL --input digit.png` gives the model's scores for it."""
    import torch
    from PIL import Image

    # scanned digits: dark ink on white 8x8 greyscale PNGs, sorted into class folders
    for i, (image, label) in enumerate(zip(digits.x_test[:60], digits.y_test[:60], strict=True)):
        folder = tmp_path / "imgs" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(255 * (1 - image[0])).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    (tmp_path / "labels.txt").write_text("\n".join(str(i) for i in range(10)) + "\n")
    code, _, err = _cli(capsys, "convert", digits_onnx, "--profile", onnx_profile,
                        "--preprocess", "invert=true", "--calibration", tmp_path / "imgs",
                        "--eval", tmp_path / "imgs", "--labels", tmp_path / "labels.txt",
                        "--name", "digits", "--version", "1.0.0", "--sign-key",
                        keypair.private_path, "--out", tmp_path / "dist")
    assert code == 0, err
    package = tmp_path / "dist" / "digits-1.0.0.edgepkg"
    with open_package(package) as pkg:
        prep = pkg.manifest.preprocessing["image"]
    assert (prep.size, prep.color, prep.invert, prep.layout) == ((8, 8), "gray", True, "NCHW")
    agent = ["--cache", tmp_path / "cache", "--profile", onnx_profile, "--trusted-key",
             keypair.public_path]
    code, _, err = _cli(capsys, "agent", "install", package, *agent)
    assert code == 0, err
    code, out, err = _cli(capsys, "agent", "predict", "digits", "--input",
                          tmp_path / "imgs" / str(digits.y_test[0]) / "0.png", "--json", *agent)
    assert code == 0, err
    scores = np.asarray(json.loads(out)["outputs"]["logits"])
    with torch.no_grad():
        expected = digits.module(torch.from_numpy(digits.x_test[:1])).numpy()
    np.testing.assert_allclose(scores, expected, atol=0.05)
