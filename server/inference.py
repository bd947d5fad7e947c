"""One inference, end to end: resolve the model version, decode, run, encode. Reading this explains a request."""

from __future__ import annotations

import time

from client._proto import grpc_service_pb2 as pb
from client.errors import DeadlineExceeded
from server.codec import decode_inputs, encode_response, requested_outputs
from server.repository import ModelRepository


async def infer(
    request: pb.ModelInferRequest, repository: ModelRepository, deadline: float | None
) -> pb.ModelInferResponse:
    """Answer one ModelInferRequest. ``deadline`` is on the ``time.monotonic()`` clock (None = no deadline)."""
    model = repository.resolve(request.model_name, request.model_version)
    stats = model.stats
    start = time.perf_counter_ns()
    ok = False
    try:
        feeds, rows = decode_inputs(request, model)
        names = requested_outputs(request, model)
        decoded = time.perf_counter_ns()
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded(f"{model.describe()}: deadline passed before the model ran")
        outputs, queue_ns, infer_ns = await model.run(feeds, names, deadline)
        ran = time.perf_counter_ns()
        response = encode_response(request, model, names, outputs)
        stats.queue.add(queue_ns)
        stats.record_execution(rows or 1, decoded - start, infer_ns, time.perf_counter_ns() - ran)
        ok = True
        return response
    finally:
        stats.record_request(ok, time.perf_counter_ns() - start)
