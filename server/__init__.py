"""Ferry: a gRPC server for ONNX models speaking the Open Inference Protocol (Triton-compatible)."""

__version__ = "0.1.0"
