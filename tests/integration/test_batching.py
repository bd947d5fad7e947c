"""Dynamic batching and the result cache through a real server: correctness under concurrency, overload, cache."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client._proto import grpc_service_pb2_grpc as pb_grpc
from tests.integration.test_rpcs import outputs_of, request_for
from tests.serving import BackgroundServer, background_server, ferry_serve, grpc_address, rss_kib

MLP_BATCHED = """name: "mlp"
max_batch_size: 64
dynamic_batching { max_queue_delay_microseconds: 2000 preferred_batch_size: [ 32, 64 ] }
"""
TINY_CACHED = """name: "tiny"
max_batch_size: 64
dynamic_batching { }
response_cache { enable: true }
"""
MLP_SLOW_WINDOW = """name: "mlp"
max_batch_size: 128
dynamic_batching { max_queue_delay_microseconds: 200000 default_queue_policy { max_queue_size: 16 } }
"""


def repository(example_repo: Path, root: Path, configs: dict[str, str]) -> Path:
    for name, config in configs.items():
        shutil.copytree(example_repo / name / "1", root / name / "1")
        (root / name / "config.pbtxt").write_text(config)
    return root


@pytest.fixture(scope="module")
def server(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    root = repository(example_repo, tmp_path_factory.mktemp("batching"), {"mlp": MLP_BATCHED, "tiny": TINY_CACHED})
    with background_server(root, http_port=None, model_control_mode="explicit", load_models=("*",)) as running:
        yield running


def statistics(stub: pb_grpc.GRPCInferenceServiceStub, model: str) -> pb.ModelStatistics:
    return stub.ModelStatistics(pb.ModelStatisticsRequest(name=model)).model_stats[0]


async def fire(address: str, requests: list[pb.ModelInferRequest]) -> list[pb.ModelInferResponse | grpc.RpcError]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        return await asyncio.gather(*(stub.ModelInfer(r, timeout=60) for r in requests), return_exceptions=True)


def test_a_thousand_concurrent_requests_of_mixed_rows_each_get_their_rows(
    server: BackgroundServer, example_repo: Path
) -> None:
    session = ort.InferenceSession(str(example_repo / "mlp" / "1" / "model.onnx"))
    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal((1 + i % 5, 256)).astype(np.float32) for i in range(1000)]
    with grpc.insecure_channel(server.address) as channel:
        before = statistics(pb_grpc.GRPCInferenceServiceStub(channel), "mlp")
        responses = asyncio.run(
            fire(server.address, [request_for("mlp", {"input": x}, id=str(i)) for i, x in enumerate(inputs)])
        )
        after = statistics(pb_grpc.GRPCInferenceServiceStub(channel), "mlp")
    for i, (x, response) in enumerate(zip(inputs, responses, strict=True)):
        assert isinstance(response, pb.ModelInferResponse), response
        assert response.id == str(i)
        np.testing.assert_allclose(
            outputs_of(response)["output"], session.run(None, {"input": x})[0], rtol=1e-4, atol=1e-5
        )
    rows = sum(len(x) for x in inputs)
    assert after.inference_count - before.inference_count == rows
    executions = after.execution_count - before.execution_count
    assert executions < len(inputs)  # requests shared executions
    assert all(b.batch_size <= 64 for b in after.batch_stats) and any(b.batch_size > 5 for b in after.batch_stats)


def test_cache_hits_skip_the_model_and_reload_forgets_them(server: BackgroundServer) -> None:
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        first = outputs_of(stub.ModelInfer(request_for("tiny", {"input": x}, id="a")))["output"]
        before = statistics(stub, "tiny")
        again = stub.ModelInfer(request_for("tiny", {"input": x}, id="b"))
        assert again.id == "b"  # the id is not part of the key, and the answer still echoes it
        np.testing.assert_array_equal(outputs_of(again)["output"], first)
        after = statistics(stub, "tiny")
        assert after.inference_stats.cache_hit.count == before.inference_stats.cache_hit.count + 1
        assert after.inference_stats.queue.count == before.inference_stats.queue.count + 1  # Triton counts hits
        assert after.execution_count == before.execution_count
        other = stub.ModelInfer(request_for("tiny", {"input": x + 1}))
        assert not np.array_equal(outputs_of(other)["output"], first)
        assert statistics(stub, "tiny").inference_stats.cache_miss.count == after.inference_stats.cache_miss.count + 1

        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="tiny"))
        stub.ModelInfer(request_for("tiny", {"input": x}))
        reloaded = statistics(stub, "tiny")  # fresh statistics of the reloaded version: the entry was dropped
        assert reloaded.inference_stats.cache_miss.count == 1 and reloaded.inference_stats.cache_hit.count == 0


def test_requested_outputs_and_priority_parameters_through_the_batcher(server: BackgroundServer) -> None:
    x = np.ones((2, 256), np.float32)
    request = request_for("mlp", {"input": x})
    request.parameters["priority"].uint64_param = 7  # no priority levels configured: ignored
    request.parameters["timeout"].int64_param = 10_000_000
    with grpc.insecure_channel(server.address) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert outputs_of(response)["output"].shape == (2, 10)


def test_overload_is_answered_or_rejected_and_memory_stays_bounded(example_repo: Path, tmp_path: Path) -> None:
    root = repository(example_repo, tmp_path, {"mlp": MLP_SLOW_WINDOW})
    with ferry_serve("--model-repository", str(root), "--grpc-port", "0", "--http-port", "-1") as (proc, line):
        address = grpc_address(line)
        session = ort.InferenceSession(str(example_repo / "mlp" / "1" / "model.onnx"))
        x = np.random.default_rng(5).standard_normal((1, 256)).astype(np.float32)
        expected = session.run(None, {"input": x})[0]
        asyncio.run(fire(address, [request_for("mlp", {"input": x})] * 50))  # warm up
        baseline = rss_kib(proc.pid)
        outcomes = []
        for _ in range(3):  # bounded: 3 bursts of 1500 requests, far above the 16-request queue
            outcomes += asyncio.run(fire(address, [request_for("mlp", {"input": x}, id=str(i)) for i in range(1500)]))
        grown_mib = (rss_kib(proc.pid) - baseline) / 1024
    answered = [o for o in outcomes if isinstance(o, pb.ModelInferResponse)]
    rejected = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError) and o.code() == grpc.StatusCode.UNAVAILABLE]
    # every call is Ferry's to answer: a burst of 1500 stays under --max-pending-calls (grpc-core's defaults
    # cancelled 3-4% of it at random)
    assert len(answered) + len(rejected) == len(outcomes), {str(o)[:200] for o in outcomes if isinstance(o, Exception)}
    assert answered and rejected
    for response in answered:
        np.testing.assert_allclose(outputs_of(response)["output"], expected, rtol=1e-4, atol=1e-5)
    for error in rejected:
        assert "queue is full (16 requests waiting" in (error.details() or "")
    assert grown_mib < 200, f"server RSS grew {grown_mib:.0f} MiB under overload"


@pytest.mark.parametrize("transport", ["grpcio", "ferry"])
def test_max_pending_calls_bounds_a_burst(example_repo: Path, tmp_path: Path, transport: str) -> None:
    """--max-pending-calls reaches the transport: with a bound of 32, a burst of 600 calls at once on one channel.
    On grpcio (far faster than the event loop picks calls up; under grpc-core's default bound of 1000) gRPC cancels
    some; on Ferry's transport, which advertises the bound as the connection's stream limit, the client holds the
    calls past it and every call is answered. Every answer is the call's own."""
    root = repository(example_repo, tmp_path, {"tiny": TINY_CACHED})
    serve = ("--model-repository", str(root), "--grpc-port", "0", "--http-port", "-1", "--max-pending-calls", "32")
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    with ferry_serve(*serve, "--transport", transport) as (_, line):
        outcomes = asyncio.run(
            fire(grpc_address(line), [request_for("tiny", {"input": x}, id=str(i)) for i in range(600)])
        )
    answered = [o for o in outcomes if isinstance(o, pb.ModelInferResponse)]
    cancelled = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError) and o.code() == grpc.StatusCode.CANCELLED]
    assert len(answered) + len(cancelled) == len(outcomes)
    if transport == "grpcio":
        assert answered and cancelled
    else:
        assert len(answered) == len(outcomes)
    assert all(r.id == str(i) for i, r in enumerate(outcomes) if isinstance(r, pb.ModelInferResponse))


def test_one_stream_mixes_requests_answered_at_once_with_queued_ones(
    example_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """tiny runs in the reading turn (no window, a short run); mlp waits for its window in the batcher. On one
    stream, every answer must still reach its own request, whichever path it took."""
    tiny = 'name: "tiny"\nmax_batch_size: 64\ndynamic_batching { }\n'
    root = repository(example_repo, tmp_path_factory.mktemp("mixed-stream"), {"mlp": MLP_BATCHED, "tiny": tiny})
    sessions = {m: ort.InferenceSession(str(example_repo / m / "1" / "model.onnx")) for m in ("mlp", "tiny")}
    rng = np.random.default_rng(11)
    cases = [
        ("tiny", rng.standard_normal((1, 16)).astype(np.float32))
        if i % 2
        else ("mlp", rng.standard_normal((1 + i % 3, 256)).astype(np.float32))
        for i in range(300)
    ]
    with background_server(root, http_port=None) as running, grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        requests = [request_for(model, {"input": x}, id=str(i)) for i, (model, x) in enumerate(cases)]
        replies = list(stub.ModelStreamInfer(iter(requests), timeout=60))
        mlp = statistics(stub, "mlp")
    assert len(replies) == len(cases)
    for reply in replies:
        assert not reply.error_message, reply.error_message
        model, x = cases[int(reply.infer_response.id)]
        assert reply.infer_response.model_name == model
        expected = sessions[model].run(None, {"input": x})[0]
        np.testing.assert_allclose(outputs_of(reply.infer_response)["output"], expected, rtol=1e-4, atol=1e-5)
    assert mlp.execution_count < 150  # mlp's requests shared executions while tiny's were answered at once
