"""Closed-loop REST load from nghttp2's ``h2load`` (C, ``--h1``): one prepared body posted to
``/v2/models/{model}/infer`` over N keep-alive HTTP/1.1 connections, one request in flight on each, for a fixed time.

h2load needs no endpoint but the one it posts to, so it drives any Open Inference Protocol server's REST API
(Triton's perf_analyzer ``-i http`` first reads ``GET /v2/models/{model}/config``, which only Triton-like servers
serve). It costs a fraction of a Python client's CPU per request, which on a small machine is CPU the server under
test keeps. Its per-request log (``--log-file``: start, status, microseconds to the end of the answer) gives the
latency percentiles; its own summary the count, which covers the measurement window only (not the warm-up).

    python -m benchmarks.rest_load --target 127.0.0.1:8000 --model tiny --features 16 --data json -c 16 -d 3
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.mlserver import drive
from ferry.client._proto import grpc_service_pb2 as pb
from ferry.loadtest.rest import body_of, infer_path


@dataclass(frozen=True, slots=True)
class Result:
    target: str
    model: str
    data: str
    concurrency: int
    window_s: float
    completed: int
    errors: dict[str, int]
    infer_per_s: float
    p50_us: float
    p90_us: float
    p99_us: float
    mean_us: float
    client_cpu_us_per_request: float
    extra: dict[str, object] = field(default_factory=dict)


def usable() -> tuple[bool, str]:
    return (True, "") if shutil.which("h2load") else (False, "h2load (nghttp2-client) is not on PATH")


def request_body(model: str, features: int, data: str) -> tuple[bytes, dict[str, str]]:
    """The benchmark's request (``drive.request_bytes``: FP32 [1, features]) as a REST body, JSON or binary."""
    payload, _ = drive.request_bytes(model, features)
    return body_of(pb.ModelInferRequest.FromString(payload), data == "binary")


def run(target: str, model: str, features: int, data: str, *, concurrency: int, duration_s: float,
        warmup_s: float, timeout_s: float = 60) -> Result:  # fmt: skip
    """One h2load run; raises RuntimeError when h2load fails or no request succeeded."""
    body, headers = request_body(model, features, data)
    with tempfile.TemporaryDirectory(prefix="ferry-h2load-") as tmp:
        body_file, log_file = Path(tmp) / "body", Path(tmp) / "requests.tsv"
        body_file.write_bytes(body)
        cmd = ["h2load", "--h1", "-c", str(concurrency), "-m", "1", "-D", f"{round(duration_s * 1000)}ms",
               "--warm-up-time", f"{round(warmup_s * 1000)}ms", "-d", str(body_file),
               "--log-file", str(log_file)]  # fmt: skip
        for name, value in headers.items():
            cmd += ["-H", f"{name}: {value}"]
        cmd.append(f"http://{target}{infer_path(model, '')}")
        before = _children_cpu_s()
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s + duration_s + warmup_s)
        cpu = _children_cpu_s() - before
        log = log_file.read_text() if log_file.exists() else ""
    if out.returncode != 0:
        raise RuntimeError(f"h2load exited {out.returncode}: {(out.stderr or out.stdout)[-500:]}")
    return parse(out.stdout, log, target=target, model=model, data=data, concurrency=concurrency,
                 window_s=duration_s, cpu_s=cpu)  # fmt: skip


def parse(summary: str, log: str, *, target: str, model: str, data: str, concurrency: int, window_s: float,
          cpu_s: float) -> Result:  # fmt: skip
    """A Result from h2load's stdout and its ``--log-file`` (rows: start µs, HTTP status, latency µs)."""
    rows = [line.split("\t") for line in log.splitlines() if line.strip()]
    ok = np.array([int(r[2]) for r in rows if r[1].startswith("2")], dtype=np.int64)
    errors: dict[str, int] = {}
    for r in rows:  # status 0: no answer yet when the window closed (h2load logs it; its summary does not count it)
        if not r[1].startswith("2") and r[1] != "0":
            errors[f"HTTP_{r[1]}"] = errors.get(f"HTTP_{r[1]}", 0) + 1
    found = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored, "
                      r"(\d+) timeout", summary)  # fmt: skip
    if found is None:
        raise RuntimeError(f"h2load printed no request counts: {summary[-500:]}")
    succeeded, failed, errored, timeout = (int(x) for x in found.groups())
    for name, count in (("failed", failed), ("errored", errored), ("timeout", timeout)):
        if count:
            errors[name] = count
    if succeeded == 0 or len(ok) == 0:
        raise RuntimeError(f"h2load: no request succeeded against {target} ({errors}): {summary[-500:]}")
    p50, p90, p99 = np.percentile(ok, (50, 90, 99))
    unanswered = sum(r[1] == "0" for r in rows)
    return Result(target=target, model=model, data=data, concurrency=concurrency, window_s=window_s,
                  completed=succeeded, errors=errors, infer_per_s=succeeded / window_s, p50_us=float(p50),
                  p90_us=float(p90), p99_us=float(p99), mean_us=float(ok.mean()),
                  client_cpu_us_per_request=cpu_s * 1e6 / succeeded,
                  extra={"unanswered_at_end": unanswered})  # fmt: skip


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rest_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="HOST:PORT of the REST API")
    parser.add_argument("--model", required=True)
    parser.add_argument("--features", type=int, required=True, help="input width (mlp 256, tiny 16)")
    parser.add_argument("--data", choices=("json", "binary"), default="json")
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    parser.add_argument("-d", "--duration", type=float, default=3.0, help="measurement window, seconds")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds of load before the window")
    args = parser.parse_args(argv)
    if not 0 < args.duration <= 600 or not 0 < args.concurrency <= 1024:
        parser.error("duration must be in (0, 600] s and concurrency in 1..1024")
    if not (ok := usable())[0]:
        parser.error(ok[1])
    result = run(args.target, args.model, args.features, args.data, concurrency=args.concurrency,
                 duration_s=args.duration, warmup_s=args.warmup)  # fmt: skip
    print(json.dumps(asdict(result), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
