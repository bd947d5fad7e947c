"""Open-loop schedules: the intended send times, split over workers; and the generator charging latency from them."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client._proto import grpc_service_pb2_grpc as pb_grpc
from ferry.loadtest import generator
from ferry.loadtest.generator import StepPlan, Worker
from ferry.loadtest.histogram import Histogram
from ferry.loadtest.schedule import intended_offsets, split_evenly
from ferry.loadtest.workload import InputSpec, ModelSpec, build


def test_constant_rate_is_evenly_spaced_from_zero() -> None:
    t = intended_offsets(200, 2.0)
    assert len(t) == 400
    assert t[0] == 0 and t[-1] < 2.0
    assert np.allclose(np.diff(t), 1 / 200)


@pytest.mark.parametrize("workers", [2, 3, 7])
def test_constant_rate_split_over_workers_interleaves_into_the_single_schedule(workers: int) -> None:
    parts = [intended_offsets(300, 1.5, worker=w, workers=workers) for w in range(workers)]
    union = np.sort(np.concatenate(parts))
    assert np.allclose(union, intended_offsets(300, 1.5))
    for p in parts:  # each worker alone is a constant rate of rate / workers
        assert np.allclose(np.diff(p), workers / 300)


def test_poisson_arrivals_have_exponential_gaps_of_the_right_mean() -> None:
    t = intended_offsets(1000, 20.0, poisson=True, seed=3)
    gaps = np.diff(t)
    assert abs(len(t) - 20_000) < 5 * np.sqrt(20_000)
    assert gaps.mean() == pytest.approx(1e-3, rel=0.03)
    assert gaps.std() == pytest.approx(1e-3, rel=0.05)  # exponential: std = mean
    assert (gaps >= 0).all() and t[-1] < 20.0
    counts = np.histogram(t, bins=20, range=(0, 20))[0]  # counts per second: mean = var for Poisson
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.8)


def test_poisson_is_reproducible_per_seed_and_independent_per_worker() -> None:
    a = intended_offsets(500, 1.0, poisson=True, seed=1, worker=0, workers=2)
    assert np.array_equal(a, intended_offsets(500, 1.0, poisson=True, seed=1, worker=0, workers=2))
    b = intended_offsets(500, 1.0, poisson=True, seed=1, worker=1, workers=2)
    assert not np.array_equal(a[:10], b[:10])
    assert len(a) + len(b) == pytest.approx(500, abs=5 * np.sqrt(500))


def test_request_cap_and_empty_schedules() -> None:
    assert len(intended_offsets(1000, 10.0, max_requests=25)) == 25
    assert len(intended_offsets(0, 10.0)) == 0
    with pytest.raises(ValueError):
        intended_offsets(1e9, 1e6)


def test_split_evenly() -> None:
    assert split_evenly(10, 3) == [4, 3, 3]
    assert split_evenly(1, 4) == [1, 0, 0, 0]
    assert sum(split_evenly(1_000_003, 7)) == 1_000_003


# --- the generator measures open-loop latency from the intended send time -------------------------------------


class Stalling(pb_grpc.GRPCInferenceServiceServicer):
    """Answers at once, except that every request arriving while ``stalled`` is set waits for it to clear."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.go.set()

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        await self.go.wait()
        return pb.ModelInferResponse(model_name=request.model_name)


@pytest.fixture()
def stalling_server() -> Iterator[tuple[str, Stalling, asyncio.AbstractEventLoop]]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    servicer = Stalling()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield f"127.0.0.1:{port}", servicer, loop
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_open_loop_charges_latency_from_the_intended_send_time(
    stalling_server: tuple[str, Stalling, asyncio.AbstractEventLoop], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one request allowed in flight, a 300 ms stall holds back every request scheduled during it. Measured
    from the actual send, only the stalled request looks slow (coordinated omission); measured from the intended
    send time, every request scheduled during the stall carries the wait."""
    address, servicer, server_loop = stalling_server
    monkeypatch.setattr(generator, "MAX_IN_FLIGHT", 1)
    model = ModelSpec("m", "", 8, (InputSpec("x", "FP32", (4,)),))
    rate, stall_s = 100.0, 0.3

    async def main() -> generator.Tally:
        worker = Worker(generator.make_client("wire", address), build(model, (1,)), 0, 1, 0, lambda *a: None)
        await worker.ready(10)
        plan = StepPlan(index=0, loop="open", mode="unary", start_wall=time.time() + 0.05, warmup_s=0.0,
                        duration_s=1.0, timeout_s=5.0, max_requests=10_000, rate=rate)  # fmt: skip

        async def stall() -> None:
            await asyncio.sleep(0.35)
            server_loop.call_soon_threadsafe(servicer.go.clear)
            await asyncio.sleep(stall_s)
            server_loop.call_soon_threadsafe(servicer.go.set)

        staller = asyncio.create_task(stall())
        tally = await worker.run(plan)
        await staller
        await worker.client.close()
        return tally

    tally = asyncio.run(main())
    assert tally.in_window == 100 and not tally.errors
    slow_ms = 100

    def slow(h: Histogram) -> int:
        return sum(c for i, c in enumerate(h.counts) if c and _low(i, h) >= slow_ms * 1e6)

    held_back = slow(tally.latency)
    assert slow(tally.service) <= 3  # from the actual send: the stall looks like one or two slow requests
    assert held_back >= 10  # ~stall_s * rate - slow_ms * rate / 1000 = 20 requests scheduled during the stall
    assert tally.latency.max >= tally.service.max
    assert slow(tally.lag) >= held_back - 3  # and they were sent late: the lag is what the service view omits


def _low(index: int, h: Histogram) -> int:
    from ferry.loadtest.histogram import bucket_range

    return bucket_range(index, h.precision_bits)[0]
