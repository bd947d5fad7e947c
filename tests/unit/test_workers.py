"""The pieces of ``--workers N`` that need no processes: the link's framing and statuses, and how the workers'
statistics and metrics add up."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client.errors import InvalidArgument, ResourceExhausted
from ferry.server.workers.channel import Channel, Header, LinkClosed
from ferry.server.workers.merge import add_statistics, merge_metrics
from ferry.server.workers.worker import _parts, pack


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


WORKER_0 = b"""# HELP ferry_inference_request_success Requests answered.
# TYPE ferry_inference_request_success_total counter
ferry_inference_request_success_total{model="tiny",version="1"} 10.0
# HELP ferry_request_duration_seconds Time.
# TYPE ferry_request_duration_seconds histogram
ferry_request_duration_seconds_bucket{le="0.001",model="tiny",version="1"} 4.0
ferry_request_duration_seconds_bucket{le="+Inf",model="tiny",version="1"} 10.0
ferry_request_duration_seconds_count{model="tiny",version="1"} 10.0
ferry_request_duration_seconds_sum{model="tiny",version="1"} 0.02
# HELP ferry_model_ready Ready.
# TYPE ferry_model_ready gauge
ferry_model_ready{model="tiny",version="1"} 1.0
# HELP ferry_queue_depth Queued.
# TYPE ferry_queue_depth gauge
ferry_queue_depth{model="tiny",version="1"} 2.0
# HELP ferry_model_load_timestamp_seconds Loaded.
# TYPE ferry_model_load_timestamp_seconds gauge
ferry_model_load_timestamp_seconds{model="tiny",version="1"} 100.0
# HELP ferry_outcome_accuracy Accuracy.
# TYPE ferry_outcome_accuracy gauge
ferry_outcome_accuracy{model="tiny",version="1"} 0.5
"""
WORKER_1 = (
    WORKER_0.replace(b"} 10.0", b"} 5.0")
    .replace(b'le="0.001",model="tiny",version="1"} 4.0', b'le="0.001",model="tiny",version="1"} 1.0')
    .replace(b'ready{model="tiny",version="1"} 1.0', b'ready{model="tiny",version="1"} 0.0')
    .replace(b"} 100.0", b"} 200.0")
    .replace(b"} 0.5", b"} 0.75")
)
TINY = (("model", "tiny"), ("version", "1"))


def test_counters_histograms_and_held_gauges_add_up() -> None:
    merged = samples(merge_metrics([WORKER_0, WORKER_1]))
    assert merged[("ferry_inference_request_success_total", TINY)] == 15
    assert merged[("ferry_request_duration_seconds_bucket", (("le", "0.001"), *TINY))] == 5
    assert merged[("ferry_request_duration_seconds_count", TINY)] == 15
    assert merged[("ferry_queue_depth", TINY)] == 4


def test_state_gauges_take_the_worst_or_newest_and_ratios_stay_per_worker() -> None:
    merged = samples(merge_metrics([WORKER_0, WORKER_1]))
    assert merged[("ferry_model_ready", TINY)] == 0  # not ready on worker 1: not ready
    assert merged[("ferry_model_load_timestamp_seconds", TINY)] == 200
    assert merged[("ferry_outcome_accuracy", (*TINY[:1], *TINY[1:], ("worker", "0")))] == 0.5
    assert merged[("ferry_outcome_accuracy", (("model", "tiny"), ("version", "1"), ("worker", "1")))] == 0.75
    assert ("ferry_outcome_accuracy", TINY) not in merged


def test_each_workers_answered_requests_are_counted() -> None:
    merged = samples(merge_metrics([WORKER_0, WORKER_1]))
    assert merged[("ferry_worker_requests_total", (("worker", "0"),))] == 10
    assert merged[("ferry_worker_requests_total", (("worker", "1"),))] == 5


def stats(count: int, last: int, batch: int) -> pb.ModelStatisticsResponse:
    duration = pb.StatisticDuration(count=count, ns=count * 1000)
    return pb.ModelStatisticsResponse(
        model_stats=[
            pb.ModelStatistics(
                name="tiny",
                version="1",
                last_inference=last,
                inference_count=count,
                execution_count=count,
                inference_stats=pb.InferStatistics(success=duration, queue=duration),
                batch_stats=[pb.InferBatchStatistics(batch_size=batch, compute_infer=duration)],
            )
        ]
    )


def test_statistics_add_up_per_version_and_batch_size() -> None:
    mine, theirs = stats(3, 50, 1), stats(4, 70, 1)
    theirs.model_stats[0].batch_stats.add(batch_size=8, compute_infer=pb.StatisticDuration(count=1, ns=5))
    theirs.model_stats.add(name="other", version="1", inference_count=99)  # not in the answer asked for
    add_statistics(mine, theirs)
    (tiny,) = mine.model_stats
    assert (tiny.inference_count, tiny.execution_count, tiny.last_inference) == (7, 7, 70)
    assert (tiny.inference_stats.success.count, tiny.inference_stats.success.ns) == (7, 7000)
    assert tiny.inference_stats.queue.count == 7
    assert {b.batch_size: b.compute_infer.count for b in tiny.batch_stats} == {1: 7, 8: 1}


def test_several_bodies_pack_into_one() -> None:
    parts = [b"", b"abc", bytes(range(256))]
    assert _parts(pack(parts), 3) == parts


async def pair(
    serve_a: object, serve_b: object, max_frame: int = 2**20, max_frame_b: int | None = None
) -> tuple[Channel, Channel, list[object]]:
    a_sock, b_sock = socket.socketpair()
    a = Channel(a_sock, serve_a, "b", max_frame)  # type: ignore[arg-type]
    b = Channel(b_sock, serve_b, "a", max_frame if max_frame_b is None else max_frame_b)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(a.run()), loop.create_task(b.run())]
    await asyncio.sleep(0.01)
    return a, b, tasks  # type: ignore[return-value]


async def echo(header: Header, body: bytes) -> tuple[Header, bytes]:
    if header["op"] == "fail":
        raise InvalidArgument("no such thing")
    if header["op"] == "slow":
        await asyncio.sleep(0.2)
    return {"op_was": header["op"]}, body[::-1]


def test_both_ends_call_and_statuses_travel() -> None:
    async def main() -> None:
        a, b, tasks = await pair(echo, echo)
        slow = asyncio.ensure_future(a.call("slow", {}, b"1"))
        header, body = await a.call("x", {}, b"abc")  # answered while the slow one runs
        assert (header["op_was"], body) == ("x", b"cba")
        assert (await b.call("y", {}, b"12"))[1] == b"21"
        with pytest.raises(InvalidArgument, match="no such thing") as err:
            await b.call("fail")
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert (await slow)[1] == b"1"
        a.close()
        await asyncio.gather(*tasks)  # type: ignore[arg-type]

    asyncio.run(main())


def test_a_call_fails_when_the_other_end_goes_away() -> None:
    async def hang(header: Header, body: bytes) -> tuple[Header, bytes]:
        await asyncio.sleep(60)
        return {}, b""

    async def main() -> None:
        a, b, tasks = await pair(echo, hang)
        waiting = asyncio.ensure_future(a.call("x"))
        await asyncio.sleep(0.05)
        b.close()
        with pytest.raises(LinkClosed):
            await waiting
        with pytest.raises(LinkClosed):
            await a.call("after")
        for task in tasks:
            task.cancel()  # type: ignore[attr-defined]
        await asyncio.gather(*tasks, return_exceptions=True)  # type: ignore[arg-type]

    asyncio.run(main())


def test_a_call_or_reply_over_the_bound_fails_alone_and_the_link_stays() -> None:
    async def grow(header: Header, body: bytes) -> tuple[Header, bytes]:
        return {}, body * 8

    async def main() -> None:
        a, b, tasks = await pair(grow, grow, max_frame=1024)
        with pytest.raises(ResourceExhausted, match="over the link's 1024"):
            await a.call("big", {}, b"x" * 4096)  # never sent
        with pytest.raises(ResourceExhausted, match="over the link's 1024"):
            await a.call("grows", {}, b"x" * 200)  # its reply would be 1600 bytes
        assert (await a.call("small", {}, b"x"))[1] == b"x" * 8
        assert not a.closed.is_set() and not b.closed.is_set()
        a.close()
        await asyncio.gather(*tasks, return_exceptions=True)  # type: ignore[arg-type]

    asyncio.run(main())


def test_a_frame_read_over_the_bound_ends_the_link() -> None:
    async def main() -> None:
        a, b, tasks = await pair(echo, echo, max_frame=2**20, max_frame_b=1024)
        with pytest.raises(LinkClosed):
            await a.call("big", {}, b"x" * 4096)
        assert b.closed.is_set()
        await asyncio.gather(*tasks, return_exceptions=True)  # type: ignore[arg-type]

    asyncio.run(main())
