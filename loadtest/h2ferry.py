"""Experiment: Ferry's own servicer (the real request path: ``Call``, batcher, onnxruntime, statistics) answering
unary calls over :mod:`loadtest.h2echo`'s hand-written HTTP/2 instead of grpc.aio. A measurement of what a transport
of Ferry's own would buy, not a server to deploy: no TLS, no request metadata (so no deadlines, tracing context or
auth), no streaming, no health or reflection services, none of the hardening a network-facing server needs.

``python -m loadtest.h2ferry --model-repository DIR`` prints ``ferry ready: grpc=HOST:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from client._proto import grpc_service_pb2 as pb
from loadtest import wire
from loadtest.h2echo import SERVICE, Answer, Connection, listen
from server.app import run
from server.cache import ResultCache
from server.config import ServerConfig
from server.repository import ModelRepository
from server.servicer import InferenceServicer

UNARY: dict[str, type[Message]] = {
    "ModelInfer": pb.ModelInferRequest,
    "ModelMetadata": pb.ModelMetadataRequest,
    "ModelConfig": pb.ModelConfigRequest,
    "ModelStatistics": pb.ModelStatisticsRequest,
    "ModelReady": pb.ModelReadyRequest,
    "ServerLive": pb.ServerLiveRequest,
    "ServerReady": pb.ServerReadyRequest,
    "ServerMetadata": pb.ServerMetadataRequest,
}


class Context:
    """What Ferry's servicer asks of a gRPC context, over this transport: no metadata and no deadline."""

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def time_remaining(self) -> None:
        return None

    async def abort(self, code: Any, details: str) -> None:
        raise wire.CallError(code.name, details)


def ferry_answers(servicer: InferenceServicer) -> dict[bytes, Answer]:
    context = Context()

    def answer_for(name: str, request_type: type[Message]) -> Answer:
        method = getattr(servicer, name)

        async def answer(body: bytes) -> bytes:
            reply: Message = await method(request_type.FromString(body), context)
            return reply.SerializeToString()

        return answer

    return {SERVICE + name.encode(): answer_for(name, request_type) for name, request_type in UNARY.items()}


async def _serve(model_repository: Path, host: str, port: int) -> None:
    config = ServerConfig.build(model_repository=model_repository)
    repository = ModelRepository(config)
    await asyncio.get_running_loop().run_in_executor(None, repository.load_all)

    async def unchanged() -> None:
        return None

    servicer = InferenceServicer(repository, ResultCache(config.cache_max_bytes), lambda: True, unchanged)
    unary = ferry_answers(servicer)
    try:
        await listen(lambda: Connection(unary), host, port, "ferry ready")
    finally:
        for version in [v for m in repository.models() for v in m.versions.values()]:
            await version.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.h2ferry", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", required=True, type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    run(_serve(args.model_repository, args.host, args.port), use_uvloop=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
