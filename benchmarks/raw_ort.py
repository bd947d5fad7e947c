"""In-process onnxruntime throughput: the compute ceiling a server of the same model cannot beat.

``rows_per_second`` builds a session the way Ferry does by default (all graph optimizations, onnxruntime's default
thread counts unless told), feeds random FP32 rows of the model's input width, and times ``session.run`` in a loop.
``python -m benchmarks.raw_ort MODEL.onnx --batch 1 16 64`` prints one line per batch size.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

WARMUP_RUNS = 20


def session_for(model_path: str | Path, intra_op_threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])


def rows_per_second(model_path: str | Path, batch: int, seconds: float, intra_op_threads: int = 0) -> float:
    """Rows per second of ``session.run`` on batches of ``batch`` random FP32 rows, timed for about ``seconds``."""
    if batch < 1 or seconds <= 0:
        raise ValueError(f"batch must be >= 1 and seconds > 0, got batch={batch} seconds={seconds}")
    session = session_for(model_path, intra_op_threads)
    (first, *others) = session.get_inputs()
    if others:
        raise ValueError(f"{model_path}: raw_ort drives single-input models, this one has {len(others) + 1}")
    if first.type != "tensor(float)":
        raise ValueError(f"{model_path}: input {first.name!r} is {first.type}, raw_ort feeds FP32 only")
    width = [d if isinstance(d, int) and d > 0 else 1 for d in first.shape[1:]]
    feeds = {first.name: np.random.default_rng(0).standard_normal((batch, *width), dtype=np.float32)}
    for _ in range(WARMUP_RUNS):
        session.run(None, feeds)
    runs = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        session.run(None, feeds)
        runs += 1
        now = time.perf_counter()
        if now >= deadline:
            break
    return runs * batch / (now - start)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.raw_ort", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="an ONNX file with one FP32 input [batch, ...]")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--seconds", type=float, default=2.0, help="timed loop length per batch size")
    parser.add_argument("--intra-op-threads", type=int, default=0, help="0 = onnxruntime's default")
    args = parser.parse_args(argv)
    for batch in args.batch:
        rate = rows_per_second(args.model, batch, args.seconds, args.intra_op_threads)
        print(f"{args.model} batch {batch}: {rate:,.0f} rows/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
