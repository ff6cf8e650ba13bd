"""Model deltas benchmark: what a device holding v1 is sent for a head-retrained and a fine-tuned v2.

    .venv/bin/python bench/delta.py              # measure, print, replace "## Model deltas"
    .venv/bin/python bench/delta.py --no-write   # print only

The digits CNN (demo/models.py) is trained, then updated two ways: only its classification head
(the last Linear) retrained, every other weight bit-identical; and every weight fine-tuned for
an epoch. Each version goes through the real converter (one calibration set, the same for all)
to ONNX fp32, ONNX int8 static, TFLite int8 (full integer) and TFLite fp32. For each artifact the
table gives the full file, the generic zstd delta (the old file as a raw dictionary), the
tensor-aware delta (segments at tensor boundaries: copies, XOR differences, literals), what
``make_delta`` keeps (the smaller), and the decision at the fleet's default fraction (0.25) and
at 0.5.
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

from bench.convert import profile, write_section  # noqa: E402
from edgeserve.delta import (  # noqa: E402
    DEFAULT_FRACTION,
    apply_delta,
    diff_file,
    make_delta,
    make_delta_with,
)
from edgeserve.package import open_package  # noqa: E402
from edgeserve.signing import load_private_key, write_keypair  # noqa: E402

TARGETS = [("onnx", "fp32", "none"), ("onnx", "int8", "static"),
           ("tflite", "int8", "full-integer"), ("tflite", "fp32", "none")]


def build(work: Path, key: Path) -> dict[str, Path]:
    """v1, a head-retrained v2 and a fine-tuned v2, each converted and signed."""
    import torch

    from edgeserve.converters import convert
    from edgeserve.demo.models import fine_tune, retrain_head, train_digits

    base = train_digits(seed=0, epochs=6)
    models = {"1.0.0": base, "1.1.0-head": retrain_head(base), "1.1.0-fine": fine_tune(base)}
    prof = str(profile(work, "bench-delta", TARGETS))
    packages = {}
    for release, (version, model) in enumerate(models.items(), start=1):
        print(f"converting {version} (accuracy {model.accuracy:.4f})", flush=True)
        result = convert(
            model.module, example_inputs=(torch.from_numpy(base.x_test[:1]),),
            input_names=["image"], output_names=["logits"], profiles=[prof], name="digits",
            version=version, release=release, calibration={"image": base.x_train[:300]},
            evaluation={"image": base.x_test, "labels": base.y_test}, out=work / version,
            sign_key=load_private_key(key))
        packages[version] = result.package
    return packages


def measure(old_path: Path, new_path: Path) -> list[dict[str, Any]]:
    rows = []
    with open_package(old_path) as old, open_package(new_path) as new:
        before = {a.id: a for a in old.manifest.artifacts}
        for artifact in new.manifest.artifacts:
            if artifact.id not in before:
                continue
            a = old.read_bytes(before[artifact.id].path)
            b = new.read_bytes(artifact.path)
            started = time.perf_counter()
            kept = make_delta(a, b, artifact.format)
            seconds = time.perf_counter() - started
            assert apply_delta(a, kept) == b
            generic = len(make_delta_with(a, b, "generic"))
            try:
                tensors: int | None = len(make_delta_with(a, b, "tensors", artifact.format))
            except ValueError:  # the layout could not be read: generic only
                tensors = None
            report = diff_file(artifact.path, a, b, artifact.format)
            changed = [t.name for t in report.tensors if t.status != "same"]
            rows.append({"id": artifact.id, "full": len(b), "generic": generic,
                         "tensors_total": len(report.tensors), "changed": changed,
                         "tensors": tensors, "kept": len(kept), "seconds": seconds,
                         "decision": "delta" if len(kept) <= DEFAULT_FRACTION * len(b)
                         else "full",
                         "at_half": "delta" if len(kept) <= 0.5 * len(b) else "full"})
    return rows


def table(title: str, rows: list[dict[str, Any]]) -> list[str]:
    lines = [f"### {title}", "", "| artifact | tensors changed | full bytes | generic zstd | "
             "tensor-aware | kept | kept / full | make s | "
             f"sent (fraction {DEFAULT_FRACTION:g}) | sent at 0.5 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        tensors = "-" if r["tensors"] is None else f"{r['tensors']:,}"
        lines.append(f"| {r['id']} | {len(r['changed'])} of {r['tensors_total']} | "
                     f"{r['full']:,} | {r['generic']:,} | {tensors} | "
                     f"{r['kept']:,} | {r['kept'] / r['full']:.2%} | {r['seconds']:.2f} | "
                     f"{r['decision']} | {r['at_half']} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgeserve-bench-delta-"))
    key = work / "bench.key"
    write_keypair(key, work / "bench.pub.pem")
    packages = build(work, key)
    lines = ["## Model deltas", "",
             f"`.venv/bin/python bench/delta.py` on {platform.machine()}, Python "
             f"{platform.python_version()}: the digits CNN (conv 16-32-64, dense 1024→96, head "
             "96→10), v1 trained 6 epochs; each version converted by the real converter with "
             "the same 300 calibration images. \"kept\" is what `make_delta` returns (the "
             "smaller encoding), \"sent\" the fleet's decision at the default fraction "
             f"({DEFAULT_FRACTION:g}).", ""]
    for version, title in (("1.1.0-head", "Head retrained (last Linear only)"),
                           ("1.1.0-fine", "Fully fine-tuned (every weight, one epoch)")):
        rows = measure(packages["1.0.0"], packages[version])
        lines += [*table(title, rows), ""]
        if version.endswith("head"):
            lines += ["Tensors that differ after the head retrain: " + "; ".join(
                f"{r['id']}: {', '.join(r['changed']) or 'none'}" for r in rows) + ".", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(text, "## Model deltas")


if __name__ == "__main__":
    main()
