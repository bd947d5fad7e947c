"""Start Seldon MLServer on a settings folder, with a ``ModelConfig`` RPC added in-process, and print a ready line.

Run with MLServer's own interpreter (``.venv-mlserver/bin/python benchmarks/mlserver/launch.py FOLDER ...``); it
does what ``mlserver start FOLDER`` does (same logger, uvloop, settings loading, ``MLServer.start``) plus two things:

- **The ModelConfig shim.** MLServer's ``inference.GRPCInferenceService`` has no ``ModelConfig`` method, which
  Triton's perf_analyzer calls once before it sends load. A second generic handler on MLServer's own gRPC server
  answers ``/inference.GRPCInferenceService/ModelConfig`` with a pre-serialized ``ModelConfigResponse`` per model
  (``--model-configs``, JSON of base64 bytes, written by ``compare.py`` from the example's config.pbtxt). gRPC
  tries a method's registered handler first, so ``ModelInfer`` takes exactly MLServer's path: no proxy, no cost.
- **A ready line** on stdout, ``mlserver ready: grpc=HOST:PORT http=... metrics=...``, once ``ServerReady`` and
  every model's ``ModelReady`` answer true over gRPC: what ``compare.py`` waits for.

Ports given as 0 are replaced by free ones (bound and released just before MLServer binds them).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import socket
import sys
from pathlib import Path

import grpc
from mlserver.cli.serve import load_settings
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.grpc import dataplane_pb2_grpc as pb_grpc
from mlserver.grpc.server import GRPCServer
from mlserver.logging import configure_logger
from mlserver.server import MLServer
from mlserver.utils import install_uvloop_event_loop

SERVICE = "inference.GRPCInferenceService"
READY_TIMEOUT_S = 120


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _identity(data: bytes) -> bytes:
    return data


def model_config_handler(configs: dict[str, bytes]) -> grpc.GenericRpcHandler:
    """A handler for ``ModelConfig`` only: the raw request's field 1 is the model name (field 2 the version)."""

    async def model_config(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        name = _first_string_field(request)
        if name not in configs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {name!r} has no config in the shim")
        return configs[name]

    handler = grpc.unary_unary_rpc_method_handler(
        model_config, request_deserializer=_identity, response_serializer=_identity
    )
    return grpc.method_handlers_generic_handler(SERVICE, {"ModelConfig": handler})


def _first_string_field(message: bytes) -> str:
    """Field 1 (``name``, length-delimited) of a serialized ``ModelConfigRequest``; no protobuf class needed."""
    i = 0
    while i < len(message):
        key, i = _varint(message, i)
        field, wire = key >> 3, key & 7
        if wire == 2:
            size, i = _varint(message, i)
            if field == 1:
                return message[i : i + size].decode()
            i += size
        elif wire == 0:
            _, i = _varint(message, i)
        else:
            break
    return ""


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def install_shim(configs: dict[str, bytes]) -> None:
    """Patch MLServer's gRPC server factory so that the server it builds also answers ModelConfig."""
    create = GRPCServer._create_server

    def create_with_shim(self: GRPCServer) -> grpc.aio.Server:
        server = create(self)
        server.add_generic_rpc_handlers((model_config_handler(configs),))
        return server

    GRPCServer._create_server = create_with_shim


async def _announce(host: str, settings: object, models: list[str]) -> None:
    address = f"{host}:{settings.grpc_port}"  # type: ignore[attr-defined]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT_S
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while loop.time() < deadline:
            try:
                ready = (await stub.ServerReady(pb.ServerReadyRequest(), timeout=2)).ready
                for name in models:
                    ready = ready and (await stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=2)).ready
            except grpc.aio.AioRpcError:
                ready = False
            if ready:
                metrics = settings.metrics_port if settings.metrics_endpoint else "off"  # type: ignore[attr-defined]
                print(
                    f"mlserver ready: grpc={address} http={host}:{settings.http_port} metrics={metrics} "  # type: ignore[attr-defined]
                    f"models={','.join(models)}",
                    flush=True,
                )
                return
            await asyncio.sleep(0.2)
    print(f"mlserver launch: not ready within {READY_TIMEOUT_S}s", file=sys.stderr, flush=True)


async def serve(args: argparse.Namespace) -> None:
    settings, models_settings = await load_settings(str(args.folder))
    settings.host = args.host
    settings.grpc_port = args.grpc_port or _free_port(args.host)
    settings.http_port = args.http_port or _free_port(args.host)
    if settings.metrics_endpoint:
        settings.metrics_port = args.metrics_port or _free_port(args.host)
    server = MLServer(settings)
    announce = asyncio.create_task(_announce(args.host, settings, [m.name for m in models_settings]))
    try:
        await server.start(models_settings)
    finally:
        announce.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="MLServer settings folder (settings.json + one folder per model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--grpc-port", type=int, default=0)
    parser.add_argument("--http-port", type=int, default=0)
    parser.add_argument("--metrics-port", type=int, default=0)
    parser.add_argument("--model-configs", type=Path, help="JSON {model: base64 ModelConfigResponse} for the shim")
    args = parser.parse_args(argv)
    if args.model_configs:
        raw = json.loads(args.model_configs.read_text())
        install_shim({name: base64.b64decode(value) for name, value in raw.items()})
    configure_logger()
    install_uvloop_event_loop()
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
