"""A bare ``grpc.aio`` echo server speaking ``inference.GRPCInferenceService``: the per-request-cost ceiling.

It describes one real model (metadata and config read once, at start, through Ferry's own model loading code), and
answers ``ModelInfer`` and ``ModelStreamInfer`` without running anything: each output is a block of zeros of the
right shape for the request's batch size, prepared once per batch size. What is left is the cost every gRPC server in
Python pays per call (HTTP/2, the aio machinery, protobuf parse and serialize), so Ferry's throughput divided by
this server's, under the same load generator, is the share of that ceiling Ferry reaches. It runs on uvloop when
uvloop is installed, as Ferry does, so the comparison is fair.

``python -m benchmarks.echo --model-repository DIR --model tiny --port 0`` prints ``echo ready: grpc=HOST:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client._proto import grpc_service_pb2_grpc as pb_grpc
from ferry.client._proto import model_config_pb2 as mc
from ferry.server.app import run
from ferry.server.config import ServerConfig
from ferry.server.models.model import ModelVersion
from ferry.server.models.modelconfig import parse_config

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # Ferry's default limit, so both servers take the same messages


def load_version(model_repository: Path, model: str) -> ModelVersion:
    """The highest version of ``model``, loaded the way Ferry loads one (config completed from the ONNX graph), so
    the metadata and config the echo server answers are Ferry's. No model ever runs on it."""
    path = model_repository / model
    config_path = path / "config.pbtxt"
    config = parse_config(config_path.read_text(), str(config_path)) if config_path.exists() else mc.ModelConfig()
    filename = config.default_model_filename or "model.onnx"
    found = (
        [int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / filename).is_file()] if path.is_dir() else []
    )
    if not found:
        raise SystemExit(f"echo: no {model}/<version>/{filename} in {model_repository}")
    version = max(found)
    server = ServerConfig.build(model_repository=model_repository)
    return ModelVersion.load(server, config, model, version, path / str(version) / filename)


class EchoServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Answers with zeros of the model's output shapes; no model runs. Unimplemented RPCs use the base class."""

    def __init__(self, model: ModelVersion) -> None:
        self._name = model.name
        self._version = model.version_str
        self._batching = model.max_batch_size > 0
        self._outputs = model.outputs
        mbs = model.max_batch_size
        self._metadata = pb.ModelMetadataResponse(
            name=model.name,
            versions=[model.version_str],
            platform=model.config.platform or model.config.backend,
            inputs=[pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype.name,
                                                            shape=t.wire_shape(mbs)) for t in model.inputs],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype.name,
                                                             shape=t.wire_shape(mbs)) for t in model.outputs],
        )  # fmt: skip
        self._config = pb.ModelConfigResponse(config=model.config)
        self._by_batch: dict[int, tuple[list[pb.ModelInferResponse.InferOutputTensor], list[bytes]]] = {}

    def _answer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        batch = request.inputs[0].shape[0] if self._batching and request.inputs and request.inputs[0].shape else 0
        prepared = self._by_batch.get(batch)
        if prepared is None:
            prepared = self._by_batch[batch] = self._prepare(batch)
        outputs, raw = prepared
        return pb.ModelInferResponse(
            model_name=self._name, model_version=self._version, id=request.id, outputs=outputs, raw_output_contents=raw
        )

    def _prepare(self, batch: int) -> tuple[list[pb.ModelInferResponse.InferOutputTensor], list[bytes]]:
        outputs, raw = [], []
        for spec in self._outputs:
            shape = [batch, *spec.dims] if self._batching else list(spec.dims)
            shape = [max(d, 1) for d in shape]  # a variable dimension (-1) answers with size 1
            count = 1
            for d in shape:
                count *= d
            outputs.append(pb.ModelInferResponse.InferOutputTensor(name=spec.name, datatype=spec.datatype.name,
                                                                   shape=shape))  # fmt: skip
            raw.append(bytes(count * max(spec.datatype.itemsize, 1)))
        return outputs, raw

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name == self._name)

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="ferry-echo", version="0")  # no extensions: no statistics asked for

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        if request.name != self._name:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.name!r}")
        return self._metadata

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext) -> Any:
        if request.name != self._name:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.name!r}")
        return self._config

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        return self._answer(request)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in requests:
            yield pb.ModelStreamInferResponse(infer_response=self._answer(request))


class EchoServer:
    """The echo servicer on a ``grpc.aio`` server; :meth:`start` binds and returns the port."""

    def __init__(self, model: ModelVersion, host: str = "127.0.0.1", port: int = 0) -> None:
        self.address = f"{host}:{port}"
        self.host = host
        self.port = 0
        limits = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        self._server = grpc.aio.server(options=limits)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(EchoServicer(model), self._server)

    async def start(self) -> int:
        self.port = self._server.add_insecure_port(self.address)
        if self.port == 0:
            raise SystemExit(f"echo: cannot bind {self.address}")
        await self._server.start()
        return self.port

    async def stop(self, grace_s: float | None = 0.5) -> None:
        await self._server.stop(grace_s)


async def _serve(model: ModelVersion, host: str, port: int) -> None:
    server = EchoServer(model, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        print(f"echo ready: grpc={host}:{server.port}", flush=True)
        await stop.wait()
    finally:
        await server.stop()


def echo_arguments(prog: str, description: str) -> argparse.ArgumentParser:
    """The command line both echo servers take: the model to describe, where to listen."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--model-repository", required=True, type=Path, help="model repository (Triton layout)")
    parser.add_argument("--model", required=True, help="the model whose metadata and output shapes to echo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="gRPC port, 0 = any free port")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = echo_arguments("python -m benchmarks.echo", __doc__.split("\n\n")[0])
    parser.add_argument("--no-uvloop", action="store_true", help="use asyncio's default event loop")
    args = parser.parse_args(argv)
    model = load_version(args.model_repository, args.model)
    run(_serve(model, args.host, args.port), use_uvloop=not args.no_uvloop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
