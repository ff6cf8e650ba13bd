"""Model file → canonical ONNX → per-profile artifacts (ONNX, TFLite, Core ML) → validated,
signed package. Heavy frameworks (torch, TensorFlow, coremltools) are imported only by the step
that needs them."""
