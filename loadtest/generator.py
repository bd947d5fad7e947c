"""The load generator's worker process: asyncio gRPC clients sending prepared request bytes.

Each worker process (started with ``spawn``) owns one event loop (uvloop when installed), one connection to the
target, and the step it is told to run: a closed loop of ``concurrency`` slots, each sending its next request when
the previous one answers, or an open loop that sends on a fixed schedule (:mod:`ferry.loadtest.schedule`) whatever the
server does. Unary mode calls ``ModelInfer`` with the prepared request bytes and does not parse the reply; stream
mode sends on one ``ModelStreamInfer`` stream per worker, matching answers to requests by ``id``.

Two clients carry the calls: :mod:`ferry.loadtest.wire` (the default: gRPC written straight onto HTTP/2, about
perf_analyzer's CPU per call) and grpcio's ``grpc.aio`` (``--client grpcio``: the reference implementation, 2-3x the
CPU per call). Both sit behind the same small interface, :class:`WireClient` and :class:`GrpcioClient`.

Timing (``time.perf_counter_ns``, a system-wide monotonic clock; steps start at a wall-clock time the parent
chooses, converted once per step): a step is a warm-up, then the measurement window ``[ws, we)``, then a drain of
at most ``timeout_s``. A request belongs to the window if its *intended* send time does (closed loop: intended =
actual); its latency is measured from that intended time, so open-loop latency includes any send lag. Throughput
counts successful answers that *arrive* inside the window, so an overloaded server cannot look faster than it is.
Requests still unanswered when the drain ends are counted as ``DEADLINE_EXCEEDED``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Protocol

import grpc

from ferry.client._proto import grpc_service_pb2 as pb
from ferry.loadtest import wire
from ferry.loadtest.histogram import Histogram
from ferry.loadtest.schedule import intended_offsets
from ferry.loadtest.workload import RequestMaker, Workload

INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
STATUS_CODE_PARAMETER = "ferry_status_code"  # ferry.client.errors keeps its own name private; the wire name is stable
PROGRESS_INTERVAL_S = 0.5
MAX_IN_FLIGHT = 4096
"""Open loop: requests outstanding per worker before sending waits (still charged from the intended time)."""
CLIENTS = ("wire", "grpcio", "http-binary", "http-json")
"""How workers call: gRPC on ferry.loadtest.wire or grpc.aio, or REST (:mod:`ferry.loadtest.rest`) with binary or
JSON tensors."""


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One worker's share of one step."""

    index: int
    loop: str  # "closed" | "open"
    mode: str  # "unary" | "stream"
    start_wall: float  # time.time() at which the warm-up begins
    warmup_s: float
    duration_s: float
    timeout_s: float
    max_requests: int  # this worker's cap on sends for the whole step
    concurrency: int = 0  # closed loop: this worker's slots
    rate: float = 0.0  # open loop: the step's total rate (the worker sends rate / workers)
    poisson: bool = False
    worker: int = 0
    workers: int = 1
    seed: int = 0


@dataclass(slots=True)
class Tally:
    """What one worker measured in one step; merged by the parent."""

    latency: Histogram = field(default_factory=Histogram)  # from intended send, successes in the window
    service: Histogram = field(default_factory=Histogram)  # from actual send
    lag: Histogram = field(default_factory=Histogram)  # actual - intended send
    errors: Counter[str] = field(default_factory=Counter)
    in_window: int = 0  # requests intended in the window
    ok_arrived: int = 0  # successful answers arriving in the window
    rows_arrived: int = 0
    sent: int = 0  # all sends of the step, warm-up included
    capped_at_s: float | None = None  # seconds into the window at which the request cap stopped sending
    half_ns: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # latency sum, count: first half, second

    def to_dict(self) -> dict[str, Any]:
        return {
            "latency": self.latency.to_dict(),
            "service": self.service.to_dict(),
            "lag": self.lag.to_dict(),
            "errors": dict(self.errors),
            "in_window": self.in_window,
            "ok_arrived": self.ok_arrived,
            "rows_arrived": self.rows_arrived,
            "sent": self.sent,
            "capped_at_s": self.capped_at_s,
            "half_ns": self.half_ns,
        }


class Stream(Protocol):
    """One ``ModelStreamInfer`` stream, as the generator uses it."""

    async def write(self, message: bytes) -> None: ...

    async def done_writing(self) -> None: ...

    def cancel(self) -> None: ...

    async def result(self) -> str:
        """The stream's final status name, once it has ended (``"OK"`` when the server closed it cleanly)."""
        ...


class Client(Protocol):
    """How a worker reaches the server: unary calls whose replies are not read, and streams."""

    async def ready(self, timeout_s: float) -> None: ...

    async def unary(self, message: bytes, timeout_s: float, on_reply: Callable[[bytes], None] | None = None) -> str:
        """One ``ModelInfer`` call of serialized request bytes; its status name (``"OK"`` on success). The reply is
        read only for ``on_reply``."""
        ...

    async def stream(self, on_reply: Callable[[bytes], None]) -> Stream:
        """Open a ``ModelStreamInfer`` stream; each serialized reply goes to ``on_reply``."""
        ...

    async def close(self) -> None: ...


class WireClient:
    """:mod:`ferry.loadtest.wire` connections; a new one is opened when the server has closed or is closing the last."""

    def __init__(self, target: str, metadata: Sequence[tuple[str, str]] = ()) -> None:
        self.target = target
        self.metadata = tuple(metadata)
        self.conn: wire.Connection | None = None

    async def _connection(self) -> wire.Connection:
        conn = self.conn
        if conn is None or not conn.usable:
            if conn is not None and not conn.streams:
                conn.close()
            try:
                conn = self.conn = await wire.open_connection(self.target, metadata=self.metadata)
            except (OSError, TimeoutError) as err:
                raise wire.CallError("UNAVAILABLE", f"cannot connect to {self.target}: {err}") from None
        return conn

    async def ready(self, timeout_s: float) -> None:
        self.conn = await wire.open_connection(self.target, timeout_s, metadata=self.metadata)

    async def unary(self, message: bytes, timeout_s: float, on_reply: Callable[[bytes], None] | None = None) -> str:
        try:
            return await (await self._connection()).unary(INFER, message, timeout_s, on_reply)
        except wire.CallError as err:
            return err.code

    async def stream(self, on_reply: Callable[[bytes], None]) -> Stream:
        return _WireStream(await (await self._connection()).stream(STREAM, on_reply))

    async def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


class _WireStream:
    def __init__(self, call: wire.Call) -> None:
        self.call = call

    async def write(self, message: bytes) -> None:
        self.call.write(message)  # never waits: flow control holds what the window cannot take yet

    async def done_writing(self) -> None:
        self.call.done_writing()

    def cancel(self) -> None:
        self.call.cancel()

    async def result(self) -> str:
        return await self.call.result()


class GrpcioClient:
    """grpcio's ``grpc.aio`` channel, bytes in and out (no protobuf on the hot path)."""

    def __init__(self, target: str, metadata: Sequence[tuple[str, str]] = ()) -> None:
        self.metadata = tuple(metadata) or None
        options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1),
                   ("grpc.use_local_subchannel_pool", 1)]  # fmt: skip
        self.channel = grpc.aio.insecure_channel(target, options=options)
        self.infer = self.channel.unary_unary(INFER)
        self.stream_method = self.channel.stream_stream(STREAM)

    async def ready(self, timeout_s: float) -> None:
        await asyncio.wait_for(self.channel.channel_ready(), timeout_s)

    async def unary(self, message: bytes, timeout_s: float, on_reply: Callable[[bytes], None] | None = None) -> str:
        try:
            reply = await self.infer(message, timeout=timeout_s, metadata=self.metadata)
        except grpc.aio.AioRpcError as err:
            return str(err.code().name)
        if on_reply is not None:
            on_reply(bytes(reply))
        return "OK"

    async def stream(self, on_reply: Callable[[bytes], None]) -> Stream:
        return _GrpcioStream(self.stream_method(metadata=self.metadata), on_reply)

    async def close(self) -> None:
        await self.channel.close()


class _GrpcioStream:
    def __init__(self, call: Any, on_reply: Callable[[bytes], None]) -> None:
        self.call = call
        self.lock = asyncio.Lock()  # grpc.aio takes one write at a time
        self.reader = asyncio.create_task(self._read(on_reply))

    async def _read(self, on_reply: Callable[[bytes], None]) -> str:
        try:
            async for reply in self.call:
                on_reply(reply)
        except grpc.aio.AioRpcError as err:
            return str(err.code().name)
        return "OK"

    async def write(self, message: bytes) -> None:
        try:
            async with self.lock:
                await self.call.write(message)
        except grpc.aio.AioRpcError as err:
            raise wire.CallError(err.code().name) from None
        except (grpc.aio.UsageError, asyncio.InvalidStateError) as err:
            raise wire.CallError("UNAVAILABLE", str(err)) from None

    async def done_writing(self) -> None:
        async with self.lock:
            await self.call.done_writing()

    def cancel(self) -> None:
        self.call.cancel()

    async def result(self) -> str:
        return await asyncio.shield(self.reader)


def make_client(kind: str, target: str, metadata: Sequence[tuple[str, str]] = ()) -> Client:
    if kind == "wire":
        return WireClient(target, metadata)
    if kind == "grpcio":
        return GrpcioClient(target, metadata)
    if kind.startswith("http-"):
        from ferry.loadtest.rest import HttpClient

        return HttpClient(target, kind.removeprefix("http-"))
    raise ValueError(f"client must be one of {CLIENTS}, got {kind!r}")


class Worker:
    """Runs steps on one connection; lives for the whole run so connections stay warm between steps."""

    def __init__(self, client: Client, workload: Workload, worker: int, nonce: int, seed: int, progress: Any) -> None:
        self.client = client
        self.maker = RequestMaker(workload, worker, nonce, seed)
        self.worker = worker
        self.progress = progress
        self.ids = itertools.count()

    async def ready(self, timeout_s: float) -> None:
        await self.client.ready(timeout_s)

    async def run(self, plan: StepPlan) -> Tally:
        tally = Tally()
        offset_ns = time.perf_counter_ns() + int((plan.start_wall - time.time()) * 1e9)
        run = _Run(self, plan, tally, offset_ns)
        reporter = asyncio.create_task(run.report_progress())
        try:
            await run.execute()
        finally:
            reporter.cancel()
        return tally


class _Run:
    """One step in one worker."""

    def __init__(self, worker: Worker, plan: StepPlan, tally: Tally, start_ns: int) -> None:
        self.w, self.plan, self.tally = worker, plan, tally
        self.start_ns = start_ns
        self.ws = start_ns + int(plan.warmup_s * 1e9)
        self.we = self.ws + int(plan.duration_s * 1e9)
        self.mid = (self.ws + self.we) // 2
        self.recent = Histogram()
        self.done = 0
        self.failed = 0
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.slot_free = asyncio.Event()
        self.pending: dict[str, tuple[int, int, int, asyncio.Future[None] | None]] = {}
        self.stream: Stream | None = None
        self.watcher: asyncio.Task[None] | None = None
        self.tasks: set[asyncio.Task[None]] = set()  # open-loop unary calls in flight

    # --- accounting ------------------------------------------------------------------------------------------

    def finish(self, intended: int, sent: int, rows: int, code: str | None) -> None:
        now = time.perf_counter_ns()
        t = self.tally
        if self.ws <= intended < self.we:
            t.in_window += 1
            if code is None:
                latency = now - intended
                t.latency.record(latency)
                t.service.record(now - sent)
                t.lag.record(sent - intended)
                half = 0 if intended < self.mid else 2
                t.half_ns[half] += latency
                t.half_ns[half + 1] += 1
            else:
                t.errors[code] += 1
        if code is None:
            self.done += 1
            self.recent.record(now - intended)
            if self.ws <= now < self.we:
                t.ok_arrived += 1
                t.rows_arrived += rows
        else:
            self.failed += 1

    def note_cap(self, at_ns: int) -> None:
        if at_ns < self.we:
            self.tally.capped_at_s = max(0.0, (at_ns - self.ws) / 1e9)

    async def report_progress(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            recent, self.recent = self.recent, Histogram()
            self.w.progress(self.plan.index, self.done, self.failed, recent.to_dict())

    # --- the two loops ---------------------------------------------------------------------------------------

    async def execute(self) -> None:
        plan = self.plan
        if plan.mode == "stream":
            await self.open_stream()
        delay = (self.start_ns - time.perf_counter_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            if plan.loop == "closed":
                # a slot waits for its answer at most timeout_s (unary: the call's deadline; stream: this bound)
                bound = (self.we - time.perf_counter_ns()) / 1e9 + plan.timeout_s
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.gather(*(self.slot() for _ in range(plan.concurrency))), bound)
            else:
                await self.open_loop()
            await self.drain()
        finally:
            await self.close_stream()

    async def slot(self) -> None:
        plan, t = self.plan, self.tally
        while True:
            now = time.perf_counter_ns()
            if now >= self.we:
                return
            if t.sent >= plan.max_requests:
                self.note_cap(now)
                return
            t.sent += 1
            payload, rows = self.w.maker.next()
            if plan.mode == "unary":
                self.in_flight += 1
                await self.unary(payload, rows, now)
            else:
                await self.send_stream(payload, rows, now, wait=True)

    async def open_loop(self) -> None:
        plan = self.plan
        offsets = intended_offsets(
            plan.rate,
            plan.warmup_s + plan.duration_s,
            poisson=plan.poisson,
            seed=plan.seed,
            worker=plan.worker,
            workers=plan.workers,
            max_requests=plan.max_requests,
        )
        if len(offsets) == plan.max_requests and offsets.size:
            self.note_cap(self.start_ns + int(offsets[-1] * 1e9))
        tasks = self.tasks
        for off in (offsets * 1e9).astype("int64").tolist():
            intended = self.start_ns + off
            wait = intended - time.perf_counter_ns()
            if wait > 0:
                await asyncio.sleep(wait / 1e9)
            while self.in_flight >= MAX_IN_FLIGHT:
                self.slot_free.clear()
                await self.slot_free.wait()
            self.tally.sent += 1
            payload, rows = self.w.maker.next()
            if plan.mode == "unary":
                self.in_flight += 1  # counted now: the task may not start before the drain looks
                task = asyncio.create_task(self.unary(payload, rows, intended))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            else:
                await self.send_stream(payload, rows, intended, wait=False)

    # --- unary -----------------------------------------------------------------------------------------------

    async def unary(self, payload: bytes, rows: int, intended: int) -> None:
        """One ModelInfer call; the caller has already counted it in ``in_flight``."""
        sent = time.perf_counter_ns()
        code: str | None = "DEADLINE_EXCEEDED"  # unless it answers: cancelled by the drain
        try:
            status = await self.w.client.unary(payload, self.plan.timeout_s)
            code = None if status == "OK" else status
        finally:
            self.in_flight -= 1
            self.finish(intended, sent, rows, code)
            self.slot_free.set()
            if self.in_flight == 0:
                self.idle.set()

    # --- stream ----------------------------------------------------------------------------------------------

    async def open_stream(self) -> None:
        self.stream = stream = await self.w.client.stream(self.read_reply)
        self.watcher = asyncio.create_task(self.watch_stream(stream))

    async def send_stream(self, payload: bytes, rows: int, intended: int, *, wait: bool) -> None:
        request_id = str(next(self.w.ids))
        future: asyncio.Future[None] | None = asyncio.get_running_loop().create_future() if wait else None
        self.in_flight += 1
        sent = time.perf_counter_ns()
        self.pending[request_id] = (intended, sent, rows, future)
        try:
            if self.stream is None:  # the last one ended: open another
                await self.open_stream()
            assert self.stream is not None
            await self.stream.write(payload + _id_field(request_id))
        except wire.CallError as err:
            self.resolve(request_id, err.code)
        if future is not None:
            await future

    def resolve(self, request_id: str, code: str | None) -> None:
        entry = self.pending.pop(request_id, None)
        if entry is None:
            return
        intended, sent, rows, future = entry
        self.in_flight -= 1
        self.finish(intended, sent, rows, code)
        if future is not None and not future.done():
            future.set_result(None)
        self.slot_free.set()
        if self.in_flight == 0:
            self.idle.set()

    def read_reply(self, message: bytes) -> None:
        reply = pb.ModelStreamInferResponse.FromString(message)
        response = reply.infer_response
        code = None
        if reply.error_message:
            param = response.parameters.get(STATUS_CODE_PARAMETER)
            code = param.string_param if param is not None and param.string_param else "UNKNOWN"
        self.resolve(response.id, code)

    async def watch_stream(self, stream: Stream) -> None:
        """When the stream ends, whatever it had not answered fails with its status."""
        try:
            status = await stream.result()
            failure = "UNAVAILABLE" if status == "OK" else status  # OK: closed with requests outstanding
        except asyncio.CancelledError:
            failure = "DEADLINE_EXCEEDED"
        if self.stream is stream:
            self.stream = None
        for request_id in list(self.pending):
            self.resolve(request_id, failure)

    async def close_stream(self) -> None:
        stream, watcher = self.stream, self.watcher
        self.stream = None
        if stream is not None:
            with contextlib.suppress(Exception):
                await stream.done_writing()
        if watcher is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(watcher, 5)  # the server ends the stream once it has answered everything
        if stream is not None:
            stream.cancel()

    # --- end of step -----------------------------------------------------------------------------------------

    async def drain(self) -> None:
        """Wait for answers to requests already sent, at most ``timeout_s``; unanswered ones count as expired."""
        if self.in_flight == 0:
            return
        self.idle.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle.wait(), self.plan.timeout_s)
        for request_id in list(self.pending):
            self.resolve(request_id, "DEADLINE_EXCEEDED")
        for task in list(self.tasks):  # unary calls that outlived their deadline record themselves as expired
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=1)


def _id_field(request_id: str) -> bytes:
    """Protobuf ``id`` (field 3, length-delimited) appended to a serialized request: the last value wins."""
    data = request_id.encode()
    return bytes([0x1A, len(data)]) + data  # ids are short decimal strings, so the length fits one byte


# --- process entry point ---------------------------------------------------------------------------------------


def worker_main(conn: Connection, messages: Any, target: str, workload: Workload, worker: int, nonce: int,
                seed: int, client: str = "wire", metadata: Sequence[tuple[str, str]] = ()) -> None:  # fmt: skip
    """Entry point of a worker process: report ``ready``, then run each StepPlan received until ``None``."""
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    def progress(step: int, done: int, failed: int, recent: dict[str, Any]) -> None:
        messages.put(("progress", worker, step, (done, failed, recent)))

    try:
        w = Worker(make_client(client, target, metadata), workload, worker, nonce, seed, progress)
        loop.run_until_complete(w.ready(30))
        messages.put(("ready", worker, -1, None))
        while (plan := conn.recv()) is not None:
            tally = loop.run_until_complete(w.run(plan))
            messages.put(("result", worker, plan.index, tally.to_dict()))
        loop.run_until_complete(w.client.close())
    except Exception as err:
        messages.put(("error", worker, -1, f"{type(err).__name__}: {err}"))
    finally:
        loop.close()
