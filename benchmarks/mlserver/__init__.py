"""Seldon MLServer as a baseline: its venv, an ONNX runtime for it, a load generator and the comparison."""
