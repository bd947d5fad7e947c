"""Where one request's time goes inside Ferry, without gRPC: the per-stage cost of the request path, in process.

    python -m benchmarks.hotpath --model-repository examples/models --model tiny [--requests 20000]

One 1-row request of random FP32 input is parsed from its wire bytes and answered over and over on uvloop, the
way the servicer answers it: ``Call()`` (resolve, decode, checks), ``Call.now()`` (the model run on the loop and
its accounting) or ``Call.later()`` (through the batcher), ``encode_response``. Each stage is timed with
``perf_counter_ns`` around it, interleaved with the others as in a real request (a stage timed alone in a tight
loop reads 2-3x faster: its code and data stay in the CPU's caches). The bare echo server's handler is timed the
same way, as the floor. Every figure is a mean over ``--requests`` requests after a warm-up.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.bench import batched_copy
from benchmarks.echo import EchoServicer
from ferry.client._proto import grpc_service_pb2 as pb
from ferry.server.api.codec import encode_response
from ferry.server.app import run
from ferry.server.config import ServerConfig
from ferry.server.inference.cache import ResultCache
from ferry.server.inference.call import Call
from ferry.server.models.repository import ModelRepository

STAGES = ("parse", "Call()", "run", "encode", "whole request", "echo handler")


def request_bytes(model: str, name: str, dims: Sequence[int]) -> bytes:
    rng = np.random.default_rng(0)
    request = pb.ModelInferRequest(model_name=model, id="1")
    request.inputs.add(name=name, datatype="FP32", shape=[1, *dims])
    request.raw_input_contents.append(rng.standard_normal((1, *dims)).astype(np.float32).tobytes())
    return request.SerializeToString()


async def measure(repository: ModelRepository, model: str, requests: int, warmup: int = 2000) -> dict[str, float]:
    """Mean µs per request of each of STAGES."""
    version = repository.resolve(model, "")
    spec = version.inputs[0]
    wire = request_bytes(model, spec.name, spec.dims)
    cache = ResultCache(0)
    echo = EchoServicer(version)
    totals = dict.fromkeys(STAGES, 0)
    clock = time.perf_counter_ns
    for i in range(warmup + requests):
        t0 = clock()
        request = pb.ModelInferRequest.FromString(wire)
        t1 = clock()
        call = Call(request, repository, cache, None)
        t2 = clock()
        ran = version.run_now(call.feeds, call.rows)
        outputs = ran[0] if ran is not None else (await version.infer(call.feeds, call.rows))[0]
        t3 = clock()
        encode_response(request, version, call.names, outputs)
        t4 = clock()
        whole = Call(pb.ModelInferRequest.FromString(wire), repository, cache, None)
        whole.now() or await whole.later()
        t5 = clock()
        await echo.ModelInfer(pb.ModelInferRequest.FromString(wire), None)
        t6 = clock()
        if i >= warmup:
            for stage, (a, b) in zip(STAGES, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5), (t5, t6)), strict=True):
                totals[stage] += b - a
    await version.close()
    return {stage: ns / requests / 1000 for stage, ns in totals.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hotpath", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", default="tiny", help="a model with one FP32 input (default tiny)")
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--warmup", type=int, default=2000, help="requests answered before timing starts")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:  # the model alone, with Ferry's batching on
        batched_copy(args.model_repository, Path(tmp), [args.model])
        repository = ModelRepository(ServerConfig(model_repository=Path(tmp)))
        repository.load_all()
        means = run(measure(repository, args.model, args.requests, args.warmup), use_uvloop=True)
    print(f"{args.model}, 1 row, {args.requests} requests, µs per request (mean):")
    for stage in STAGES:
        print(f"  {stage:14s} {means[stage]:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
