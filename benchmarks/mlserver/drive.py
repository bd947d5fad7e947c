"""A small closed-loop load generator that drives any Open Inference Protocol server the same way, over gRPC or REST.

N workers on one connection each send unary ``ModelInfer`` back to back for a fixed time. The request is
serialized **once** (``raw_input_contents``, FP32) and sent as bytes, and replies are not parsed: the generator
spends no time in protobuf per call, and with its default client, :mod:`ferry.loadtest.wire` (``--client grpcio`` for
``grpc.aio``), about half grpcio's CPU per call, so more of the two cores is left to the server it measures. One
response per run is parsed and checked (output name, shape, size). Counted: calls that completed inside the
measurement window (after a warm-up), their latencies (send to answer, µs), errors by status code, and the
generator's own CPU time per request.

Over REST (``--client http-json`` or ``http-binary``, ``--target`` the REST address) the workers share one
:class:`ferry.loadtest.rest.HttpClient` (aiohttp, keep-alive HTTP/1.1, one connection per request in flight), which
sends each request to ``POST /v2/models/{model}/infer`` as V2 JSON or with Triton's binary tensor extension and
needs nothing else of the server but ``GET /v2/health/ready``: no Triton-only endpoint, so MLServer and KServe
answer it too.

    python -m benchmarks.mlserver.drive --target 127.0.0.1:8001 --model mlp --features 256 -c 8 -d 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import resource
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import grpc
import numpy as np

from ferry.client._proto import grpc_service_pb2 as pb
from ferry.loadtest.generator import make_client

INFER = "/inference.GRPCInferenceService/ModelInfer"
CLIENTS = ("wire", "grpcio", "http-json", "http-binary")
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


@dataclass(frozen=True, slots=True)
class Result:
    target: str
    model: str
    concurrency: int
    rows: int
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


def request_bytes(model: str, features: int, rows: int = 1, seed: int = 0) -> tuple[bytes, np.ndarray]:
    """A serialized ModelInferRequest: input ``input``, FP32, shape [rows, features], random values (and them)."""
    data = np.random.default_rng(seed).standard_normal((rows, features), dtype=np.float32)
    request = pb.ModelInferRequest(
        model_name=model,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[rows, features])],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="output")],
        raw_input_contents=[data.tobytes()],
    )
    return request.SerializeToString(), data


def decode_output(response: bytes, name: str = "output") -> np.ndarray:
    """The FP32 output ``name`` of a serialized ModelInferResponse (raw contents or typed fp32_contents)."""
    message = pb.ModelInferResponse.FromString(response)
    for i, out in enumerate(message.outputs):
        if out.name != name:
            continue
        if out.datatype != "FP32":
            raise ValueError(f"output {name!r} is {out.datatype}, expected FP32")
        if message.raw_output_contents:
            values = np.frombuffer(message.raw_output_contents[i], dtype="<f4")
        else:
            values = np.asarray(out.contents.fp32_contents, dtype=np.float32)
        return values.reshape(tuple(out.shape))
    raise ValueError(f"no output {name!r} in the response: {[o.name for o in message.outputs]}")


def decode_rest_output(body: bytes, name: str = "output") -> np.ndarray:
    """The FP32 output ``name`` of a REST infer answer: V2 JSON, or Triton's binary extension (a JSON header, then
    each binary output's bytes in order; the header's length is where its JSON document ends)."""
    header, offset = json.JSONDecoder().raw_decode(body.decode("latin-1"))  # latin-1: one char per byte
    for out in header.get("outputs", []):
        size = (out.get("parameters") or {}).get("binary_data_size")
        if out.get("name") == name:
            if out.get("datatype") != "FP32":
                raise ValueError(f"output {name!r} is {out.get('datatype')}, expected FP32")
            shape = tuple(int(d) for d in out["shape"])
            if size is None:
                values = np.asarray(out["data"], dtype=np.float32)
            else:
                values = np.frombuffer(body, dtype="<f4", count=int(size) // 4, offset=offset)
            if values.size != math.prod(shape):
                raise ValueError(f"output {name!r} has {values.size} values for shape {list(shape)}")
            return values.reshape(shape)
        offset += int(size or 0)
    raise ValueError(f"no output {name!r} in the response: {[o.get('name') for o in header.get('outputs', [])]}")


async def infer_once(target: str, payload: bytes, timeout_s: float = 10) -> bytes:
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)
        return bytes(await call(payload, timeout=timeout_s))


async def drive(
    target: str,
    model: str,
    payload: bytes,
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 1.0,
    rows: int = 1,
    timeout_s: float = 10.0,
    expect_shape: tuple[int, ...] | None = None,
    client: str = "wire",
) -> Result:
    """Closed loop: ``concurrency`` workers, each with one call in flight, for warm-up + ``duration_s`` seconds."""
    caller = make_client(client, target)
    await caller.ready(timeout_s)
    try:
        replies: list[bytes] = []
        status = await caller.unary(payload, timeout_s, replies.append)
        if status != "OK":
            raise ValueError(f"{target} {model}: the first call failed with {status}")
        out = (decode_rest_output if client.startswith("http-") else decode_output)(replies[0])
        if expect_shape is not None and out.shape != expect_shape:
            raise ValueError(f"{target} {model}: output shape {out.shape}, expected {expect_shape}")
        clock = time.perf_counter_ns
        start = clock() + int(warmup_s * 1e9)
        end = start + int(duration_s * 1e9)
        latencies: list[list[int]] = [[] for _ in range(concurrency)]
        errors: Counter[str] = Counter()

        async def worker(mine: list[int]) -> None:
            while (sent := clock()) < end:
                status = await caller.unary(payload, timeout_s)
                if status != "OK":
                    if start <= clock() <= end:
                        errors[status] += 1
                    continue
                done = clock()
                if start <= done <= end:
                    mine.append(done - sent)

        async def cpu_meter() -> float:
            await asyncio.sleep(max(0.0, (start - clock()) / 1e9))
            before = _cpu_s()
            await asyncio.sleep(max(0.0, (end - clock()) / 1e9))
            return _cpu_s() - before

        meter = asyncio.ensure_future(cpu_meter())
        await asyncio.gather(*(worker(mine) for mine in latencies))
        cpu = await meter
    finally:
        await caller.close()
    flat = np.fromiter((x for mine in latencies for x in mine), dtype=np.int64)
    completed = len(flat)
    window = duration_s
    p50, p90, p99 = (np.percentile(flat, (50, 90, 99)) / 1e3) if completed else (0.0, 0.0, 0.0)
    return Result(
        target=target,
        model=model,
        concurrency=concurrency,
        rows=rows,
        window_s=window,
        completed=completed,
        errors=dict(errors),
        infer_per_s=completed / window,
        p50_us=float(p50),
        p90_us=float(p90),
        p99_us=float(p99),
        mean_us=float(flat.mean() / 1e3) if completed else 0.0,
        client_cpu_us_per_request=cpu * 1e6 / max(1, completed),
    )


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(
    target: str,
    model: str,
    features: int,
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 1.0,
    client: str = "wire",
    expect_shape: tuple[int, ...] | None = None,
) -> Result:
    """Synchronous wrapper: one measurement in a fresh event loop (uvloop when installed, as the servers use)."""
    payload, _ = request_bytes(model, features)
    coro = drive(target, model, payload, concurrency=concurrency, duration_s=duration_s, warmup_s=warmup_s,
                 client=client, expect_shape=expect_shape)  # fmt: skip
    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mlserver.drive", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="HOST:PORT of the gRPC server (of the REST API: http-*)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--features", type=int, required=True, help="input width (mlp 256, tiny 16)")
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    parser.add_argument("-d", "--duration", type=float, default=5.0, help="measurement window, seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before the window")
    parser.add_argument(
        "--client",
        choices=CLIENTS,
        default="wire",
        help="gRPC: ferry.loadtest.wire or grpc.aio; REST: V2 JSON or Triton's binary extension",
    )
    args = parser.parse_args(argv)
    if not 0 < args.duration <= 600 or not 0 < args.concurrency <= 4096:
        parser.error("duration must be in (0, 600] s and concurrency in 1..4096")
    result = run(args.target, args.model, args.features, concurrency=args.concurrency, duration_s=args.duration,
                 warmup_s=args.warmup, client=args.client)  # fmt: skip
    print(json.dumps(asdict(result), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
