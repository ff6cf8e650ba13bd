"""Model file → canonical ONNX → per-profile artifacts (ONNX, TFLite, Core ML) → validated,
signed package. Heavy frameworks (torch, TensorFlow, coremltools) are imported only by the step
that needs them.

    from edgeserve.converters import convert
    result = convert(module, example_inputs=(x,), profiles=["raspberry-pi-5"], name="digits",
                     version="1.0.0", calibration={"image": calib}, evaluation={"image": x_eval,
                     "labels": y_eval}, out="dist", sign_key="keys/edgeserve.key")
    result.ok, result.package, result.report["artifacts"]
"""

from __future__ import annotations

from .data import Dataset, load_dataset
from .pipeline import ConversionResult, Converter, convert

__all__ = ["ConversionResult", "Converter", "Dataset", "convert", "load_dataset"]
