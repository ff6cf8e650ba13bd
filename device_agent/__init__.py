"""The on-device agent: a crash-safe local model cache, runtimes (ONNX Runtime, LiteRT, Core ML),
offline inference in process, from the CLI and over HTTP/gRPC, monitoring and a durable outbox.
Never imports torch, TensorFlow or coremltools."""
