"""Start KServe's Python model server (``kserve.ModelServer``, REST on uvicorn + FastAPI) on ONNX files, and print a
ready line: the baseline :mod:`benchmarks.bench_rest_peers` compares Ferry's REST API with.

Run with KServe's own interpreter (``bash benchmarks/kserve/setup.sh`` adds onnxruntime to ``.venv-kserve``):

    .venv-kserve/bin/python benchmarks/kserve/launch.py --model tiny=examples/models/tiny/1/model.onnx --http-port 0

It does what a user of KServe writes for an ONNX model: a ``kserve.Model`` whose ``predict`` decodes each
``InferInput`` with ``as_numpy()``, calls ``session.run`` inline on the event loop (as MLServer's runtime in
``benchmarks/mlserver/onnx_runtime.py`` does), and answers an ``InferResponse`` in the encoding the request asked
for (``binary_data_output``: Triton's binary extension, which KServe's REST API speaks, or JSON). KServe has no
in-process batching (it batches in a sidecar agent), so none here.

Set as a user tuning for speed would: the per-request log lines KServe writes by default are off (uvicorn's access
log, the ``kserve.trace`` timings, ``enable_latency_logging``); one uvicorn worker (one process, as Ferry and
MLServer here); KServe's gRPC server off (only REST is measured). Two changes to how KServe binds, not to how it
serves: REST listens on ``--host`` (KServe hard-codes 0.0.0.0), and ``--http-port 0`` picks a free port.

Prints ``kserve ready: http=HOST:PORT models=a,b`` once every model's ``/v2/models/{name}/ready`` answers 200.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import urllib.request
from typing import Any

import numpy as np
import onnxruntime as ort

READY_TIMEOUT_S = 120


def _model_class() -> type:
    """The ``kserve.Model`` for one ONNX file (made here: kserve may be imported only after argv is cleared)."""
    import kserve
    from kserve import InferOutput, InferRequest, InferResponse

    class Model(kserve.Model):  # type: ignore[misc]
        def __init__(self, name: str, path: str, intra_op_threads: int) -> None:
            super().__init__(name)
            self.path = path
            self.intra_op_threads = intra_op_threads

        def load(self) -> bool:
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.intra_op_threads or (os.cpu_count() or 1)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
            self.session = ort.InferenceSession(self.path, sess_options=options, providers=["CPUExecutionProvider"])
            self.inputs = {i.name: np.dtype(_ORT_DTYPES.get(i.type, "float32")) for i in self.session.get_inputs()}
            self.outputs = [o.name for o in self.session.get_outputs()]
            self.ready = True
            return self.ready

        async def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
            feeds = {}
            for tensor in payload.inputs:
                if tensor.name not in self.inputs:
                    raise ValueError(f"unknown input {tensor.name!r}; the model has {sorted(self.inputs)}")
                feeds[tensor.name] = tensor.as_numpy().astype(self.inputs[tensor.name], copy=False)
            results = self.session.run(self.outputs, feeds)
            binary = payload.use_binary_outputs
            outputs = []
            for name, value in zip(self.outputs, results, strict=True):
                out = InferOutput(name=name, shape=list(value.shape), datatype=_DATATYPES[value.dtype.str[1:]])
                out.set_data_from_numpy(value, binary_data=binary)
                outputs.append(out)
            return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=outputs,
                                 use_binary_outputs=binary)  # fmt: skip

    return Model


_ORT_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(int64)": "int64",
               "tensor(int32)": "int32", "tensor(uint8)": "uint8", "tensor(bool)": "bool"}  # fmt: skip
_DATATYPES = {"f4": "FP32", "f8": "FP64", "i8": "INT64", "i4": "INT32", "u1": "UINT8", "b1": "BOOL"}


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _quiet_logging() -> None:
    """KServe's own log configuration, less its per-request lines (access log, trace timings)."""
    from kserve.logging import KSERVE_LOG_CONFIG, configure_logging

    config: dict[str, Any] = {**KSERVE_LOG_CONFIG, "loggers": dict(KSERVE_LOG_CONFIG["loggers"])}
    config["loggers"]["uvicorn.access"] = {**config["loggers"]["uvicorn.access"], "level": "WARNING"}
    config["loggers"]["kserve.trace"] = {**config["loggers"]["kserve.trace"], "level": "WARNING"}
    configure_logging(config)
    logging.getLogger("kserve").setLevel(logging.WARNING)


def _bind_to(host: str) -> None:
    """KServe's RESTServer hard-codes host 0.0.0.0 in its uvicorn config; listen on ``host`` only."""
    from kserve.protocol.rest import server

    init = server.RESTServer.__init__

    def init_on_host(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.config.host = host

    server.RESTServer.__init__ = init_on_host


async def _announce(base: str, models: list[str]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT_S

    def ready(name: str) -> bool:
        try:
            with urllib.request.urlopen(f"{base}/v2/models/{name}/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    while loop.time() < deadline:
        if all([await asyncio.to_thread(ready, name) for name in models]):
            print(f"kserve ready: http={base.removeprefix('http://')} models={','.join(models)}", flush=True)
            return
        await asyncio.sleep(0.2)
    print(f"kserve launch: not ready within {READY_TIMEOUT_S}s", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH", help="a model.onnx to serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, default=0)
    parser.add_argument("--intra-op-threads", type=int, default=1, help="onnxruntime threads (0: all cores)")
    args = parser.parse_args(argv)
    sys.argv = sys.argv[:1]  # kserve.model_server parses sys.argv when imported; it must see only its defaults
    models = dict(item.split("=", 1) for item in args.model)
    _quiet_logging()
    _bind_to(args.host)
    import kserve

    model_class = _model_class()
    port = args.http_port or _free_port(args.host)
    instances = [model_class(name, path, args.intra_op_threads) for name, path in models.items()]
    for instance in instances:
        instance.load()
    server = kserve.ModelServer(http_port=port, enable_grpc=False, enable_latency_logging=False, workers=1)
    serve = server._serve

    async def serve_and_announce() -> None:  # ModelServer.start() blocks in asyncio.run(self._serve())
        announce = asyncio.create_task(_announce(f"http://{args.host}:{port}", list(models)))
        try:
            await serve()
        finally:
            announce.cancel()

    server._serve = serve_and_announce
    server.start(instances)
    return 0


if __name__ == "__main__":
    sys.exit(main())
