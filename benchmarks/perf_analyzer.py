"""Run Triton's ``perf_analyzer`` (shipped inside the ``tritonclient`` wheel) and read its CSV report.

The binary links against ``libcudart.so.12`` even on CPU-only machines (no GPU is used): the PyPI package
``nvidia-cuda-runtime-cu12`` provides it, and :func:`environment` puts it on ``LD_LIBRARY_PATH``. It also needs
Debian's ``libb64-0d`` (``make perf-deps`` installs it).
"""

from __future__ import annotations

import csv
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


def binary() -> Path | None:
    """The perf_analyzer next to this interpreter (the venv's bin/), else on PATH."""
    local = Path(sys.executable).parent / "perf_analyzer"
    if local.exists():
        return local
    found = shutil.which("perf_analyzer")
    return Path(found) if found else None


def environment() -> dict[str, str]:
    """os.environ with the CUDA runtime library from the nvidia-cuda-runtime-cu12 wheel on LD_LIBRARY_PATH."""
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime as cuda_runtime
    except ImportError:
        return env
    libs = [str(Path(p) / "lib") for p in cuda_runtime.__path__]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    return env


def usable() -> tuple[bool, str]:
    """Whether the binary runs here, and if not, why (its own error output)."""
    path = binary()
    if path is None:
        return False, "perf_analyzer is not installed (it ships in tritonclient[grpc]==2.41.0)"
    proc = subprocess.run([str(path), "--version"], capture_output=True, text=True, env=environment(), timeout=30)
    if proc.returncode != 0 or "error while loading shared libraries" in proc.stderr:
        return False, f"perf_analyzer cannot run: {proc.stderr.strip() or proc.stdout.strip()}"
    return True, ""


@dataclass(frozen=True, slots=True)
class Step:
    """One measured concurrency level: throughput in inferences (rows) per second, latencies in µs."""

    concurrency: int
    infer_per_s: float
    p50_us: float
    p90_us: float
    p95_us: float
    p99_us: float
    avg_us: float  # sum of perf_analyzer's client and server latency components


def run(
    target: str,
    model: str,
    concurrency: Sequence[int],
    *,
    batch_size: int = 1,
    streaming: bool = False,
    measurement_ms: int = 2000,
    extra: Sequence[str] = (),
    timeout_s: float = 300,
    protocol: str = "grpc",
) -> list[Step]:
    """Run perf_analyzer against ``target`` (host:port; gRPC, or the REST API with ``protocol="http"``, where
    perf_analyzer sends binary tensor data) and return one Step per concurrency level."""
    path = binary()
    if path is None:
        raise RuntimeError(usable()[1])
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.csv"
        cmd = [
            str(path),
            "-m", model,
            "-i", protocol,
            "-u", target,
            "-b", str(batch_size),
            "--measurement-interval", str(measurement_ms),
            "--concurrency-range", _range(concurrency),
            "-f", str(report),
            *(["--streaming"] if streaming else []),
            *extra,
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=environment(), timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"perf_analyzer exited {proc.returncode}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        with report.open() as f:
            rows = list(csv.DictReader(f))
    steps = [
        Step(
            concurrency=int(r["Concurrency"]),
            infer_per_s=float(r["Inferences/Second"]),
            p50_us=float(r["p50 latency"]),
            p90_us=float(r["p90 latency"]),
            p95_us=float(r["p95 latency"]),
            p99_us=float(r["p99 latency"]),
            avg_us=sum(float(r[k]) for k in _LATENCY_PARTS if k in r),
        )
        for r in rows
    ]
    wanted = set(concurrency)
    return sorted((s for s in steps if s.concurrency in wanted), key=lambda s: s.concurrency)


_LATENCY_PARTS = ("Client Send", "Network+Server Send/Recv", "Server Queue", "Server Compute Input",
                  "Server Compute Infer", "Server Compute Output", "Client Recv")  # fmt: skip


def _range(levels: Sequence[int]) -> str:
    """perf_analyzer takes start:end:step; for an uneven list, measure start:end:1-free by running each."""
    ordered = sorted(set(levels))
    if len(ordered) == 1:
        return f"{ordered[0]}:{ordered[0]}"
    steps = {b - a for a, b in itertools.pairwise(ordered)}
    if len(steps) == 1:
        return f"{ordered[0]}:{ordered[-1]}:{steps.pop()}"
    raise ValueError(f"perf_analyzer needs evenly spaced concurrency levels, got {ordered}: call run() per level")
