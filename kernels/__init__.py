"""Numeric kernels (numpy reference + Numba fast path) for preprocessing and statistics; no asyncio, no gRPC."""
