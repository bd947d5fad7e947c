"""Ferry's client SDK: ``AsyncClient`` on ``grpc.aio``, and ``Client``, a thin blocking wrapper over it.

One implementation: ``Client`` runs a private event loop in a daemon thread and forwards every call to an
``AsyncClient`` living on that loop, so retries, deadlines, error mapping and tensor coding exist once::

    with Client("127.0.0.1:8001") as client:
        probs = client.infer("digits", {"input": x}, version="2")["probabilities"]

    async with AsyncClient("127.0.0.1:8001") as client:
        result = await client.infer_result("digits", {"input": x})  # outputs + model_version + id

Tensors travel as raw contents both ways (``ferry.client.tensors``); numpy str/bytes/object arrays are BYTES. Output
arrays are read-only views over the response bytes: copy one before writing to it.

Every failed RPC raises the ``ferry.client.errors.FerryError`` subclass of its status code (``NotFound``,
``InvalidArgument``, ``Unavailable``, ...), chained to the ``grpc.aio.AioRpcError``. Unary calls are retried
on UNAVAILABLE only, with capped, jittered exponential backoff, and never past the call's deadline; an answer
that arrives after the deadline raises ``DeadlineExceeded`` as well.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, TypedDict, TypeVar, Unpack

import grpc
import numpy as np

from ferry.client._proto import ferry_pb2_grpc as fpb_grpc
from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client._proto import grpc_service_pb2_grpc as pb_grpc
from ferry.client.errors import (
    STATUS_CODE_PARAMETER,
    DeadlineExceeded,
    FerryError,
    Internal,
    InvalidArgument,
    Unavailable,
    error_for_status,
)
from ferry.client.multiplex import StreamMultiplexer
from ferry.client.outcomes import Outcome, OutcomeReport, Truth, decode_report, encode_outcomes
from ferry.client.tensors import DATATYPES, datatype_of, from_contents, from_raw, to_raw

__all__ = ["AsyncClient", "Client", "ClientOptions", "InferRequest", "InferResult"]

DEFAULT_TARGET = "127.0.0.1:8001"

Parameter = bool | int | str | float
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class InferResult:
    """One inference answer: the outputs by name (read-only arrays over the response bytes; copy to modify),
    the model name and version that actually ran, the echoed request id and the response parameters."""

    outputs: dict[str, np.ndarray]
    model_name: str
    model_version: str
    id: str = ""
    parameters: dict[str, Parameter] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class InferRequest:
    """One inference request; the fields are the arguments of ``AsyncClient.infer``."""

    model: str
    inputs: Mapping[str, np.ndarray]
    version: str | int | None = None
    outputs: Sequence[str] | None = None
    request_id: str = ""
    parameters: Mapping[str, Parameter] | None = None


# ---- protobuf <-> numpy ------------------------------------------------------------------------------------


def encode_request(request: InferRequest) -> Any:
    """Build a ``ModelInferRequest`` with one raw blob per input, in input order."""
    if isinstance(request.outputs, str):
        raise TypeError("outputs must be a sequence of output names, not one string")
    message = pb.ModelInferRequest(
        model_name=request.model, model_version=_version(request.version), id=request.request_id
    )
    for name, value in request.inputs.items():
        array = np.asarray(value)
        datatype = datatype_of(array)
        message.inputs.add(name=name, datatype=datatype.name, shape=array.shape)
        message.raw_input_contents.append(to_raw(array, datatype))
    for name in request.outputs or ():
        message.outputs.add(name=name)
    for key, param in (request.parameters or {}).items():
        _set_parameter(message.parameters[key], key, param)
    return message


def decode_response(response: Any) -> InferResult:
    """Decode a ``ModelInferResponse``: raw blob *i* is output *i*'s data; typed contents are the fallback."""
    outputs: dict[str, np.ndarray] = {}
    raw = response.raw_output_contents
    for i, tensor in enumerate(response.outputs):
        what = f"output {tensor.name!r} of model {response.model_name!r}"
        datatype = DATATYPES.get(tensor.datatype)
        if datatype is None:
            raise Internal(f"{what}: the server sent unknown datatype {tensor.datatype!r}")
        shape = tuple(tensor.shape)
        try:
            if i < len(raw):
                outputs[tensor.name] = from_raw(raw[i], datatype, shape, what)
            else:
                outputs[tensor.name] = from_contents(tensor.contents, datatype, shape, what)
        except InvalidArgument as err:  # the server's answer is malformed, not the caller's request
            raise Internal(f"malformed response: {err.message}") from err
    parameters = {key: _parameter_value(value) for key, value in response.parameters.items()}
    return InferResult(outputs, response.model_name, response.model_version, response.id, parameters)


def _version(version: str | int | None) -> str:
    return "" if version is None else str(version)


def _set_parameter(param: Any, key: str, value: Parameter) -> None:
    if isinstance(value, bool):  # before int: bool is an int
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, str):
        param.string_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        raise TypeError(f"parameter {key!r}: {type(value).__name__} is not bool, int, str or float")


def _parameter_value(param: Any) -> Parameter:
    which = param.WhichOneof("parameter_choice")
    value: Parameter = "" if which is None else getattr(param, which)
    return value


def _stream_item(reply: Any) -> InferResult | FerryError:
    if not reply.error_message:
        return decode_response(reply.infer_response)
    params = reply.infer_response.parameters
    name = params[STATUS_CODE_PARAMETER].string_param if STATUS_CODE_PARAMETER in params else ""
    code = grpc.StatusCode.__members__.get(name, grpc.StatusCode.UNKNOWN)
    return error_for_status(code, reply.error_message)


def _error(err: grpc.aio.AioRpcError) -> FerryError:
    return error_for_status(err.code(), err.details() or "")


# ---- retries -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retry UNAVAILABLE at most ``retries`` times; the wait before retry *n* is capped at
    ``min(max_backoff_s, backoff_s * 2**n)``.

    Jitter is "equal": the wait is uniform in [cap/2, cap], so clients that failed together spread out but
    still back off by at least half the cap (full jitter can retry at once, hammering a restarting server).
    """

    retries: int
    backoff_s: float
    max_backoff_s: float

    def delay(self, attempt: int, error: FerryError, remaining_s: float | None, rng: random.Random) -> float | None:
        """Seconds to wait before retry ``attempt + 1``, or None to give up and raise ``error``."""
        if not isinstance(error, Unavailable) or attempt >= self.retries:
            return None
        cap = min(self.max_backoff_s, self.backoff_s * 2.0 ** min(attempt, 62))
        wait = cap * (0.5 + 0.5 * rng.random())
        if remaining_s is not None and wait >= remaining_s:
            return None  # the next attempt would start after the deadline
        return wait


# ---- asyncio client ----------------------------------------------------------------------------------------


class AsyncClient:
    """An asyncio client of one Ferry (or any Open Inference Protocol / Triton) gRPC server.

    The channel opens on first use, in the running event loop; use the client from that loop only. Every
    method takes ``timeout`` in seconds (the gRPC deadline; default ``timeout_s``, None = no deadline) and
    raises a ``FerryError`` subclass on failure. Where a response message wraps one field, that is returned.

    ``multiplex=True`` sends ``infer`` calls over one shared ``ModelStreamInfer`` stream instead of one unary call
    each (see ``ferry.client.multiplex``): the same API and errors, with the server's cheaper per-message path.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        retries: int = 3,
        backoff_s: float = 0.05,
        max_backoff_s: float = 1.0,
        timeout_s: float | None = None,
        max_message_bytes: int = 64 << 20,
        metadata: Sequence[tuple[str, str]] = (),
        multiplex: bool = False,
    ) -> None:
        if retries < 0 or backoff_s < 0 or max_backoff_s < backoff_s:
            raise ValueError("need retries >= 0 and 0 <= backoff_s <= max_backoff_s")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive or None, not {timeout_s}")
        if max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be positive, not {max_message_bytes}")
        if not tls and (root_certificates or private_key or certificate_chain):
            raise ValueError("certificates given but tls=False")
        self._target = target
        self._credentials = (
            grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain) if tls else None
        )
        self._options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self._retry = RetryPolicy(retries, backoff_s, max_backoff_s)
        self._timeout_s = timeout_s
        self._metadata = tuple(metadata)
        self._rng = random.Random()
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._outcome_stub: Any = None
        self._closed = False
        self._multiplex = multiplex
        self._multiplexer: StreamMultiplexer | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel, cancelling calls in flight. Idempotent."""
        self._closed = True
        if self._multiplexer is not None:
            await self._multiplexer.close()
        if self._channel is not None:
            await self._channel.close()

    async def server_live(self, *, timeout: float | None = None) -> bool:
        return bool((await self._unary("ServerLive", pb.ServerLiveRequest(), timeout)).live)

    async def server_ready(self, *, timeout: float | None = None) -> bool:
        return bool((await self._unary("ServerReady", pb.ServerReadyRequest(), timeout)).ready)

    async def model_ready(self, model: str, version: str | int | None = None, *, timeout: float | None = None) -> bool:
        request = pb.ModelReadyRequest(name=model, version=_version(version))
        return bool((await self._unary("ModelReady", request, timeout)).ready)

    async def server_metadata(self, *, timeout: float | None = None) -> Any:
        """The ``ServerMetadataResponse`` (name, version, extensions)."""
        return await self._unary("ServerMetadata", pb.ServerMetadataRequest(), timeout)

    async def model_metadata(
        self, model: str, version: str | int | None = None, *, timeout: float | None = None
    ) -> Any:
        """The ``ModelMetadataResponse`` (versions, platform, input and output tensors)."""
        request = pb.ModelMetadataRequest(name=model, version=_version(version))
        return await self._unary("ModelMetadata", request, timeout)

    async def model_config(self, model: str, version: str | int | None = None, *, timeout: float | None = None) -> Any:
        """The model's ``ModelConfig`` message (Triton's ``model_config.proto``)."""
        request = pb.ModelConfigRequest(name=model, version=_version(version))
        return (await self._unary("ModelConfig", request, timeout)).config

    async def statistics(
        self, model: str = "", version: str | int | None = None, *, timeout: float | None = None
    ) -> list[Any]:
        """``ModelStatistics`` entries, one per model version (all models when ``model`` is empty)."""
        request = pb.ModelStatisticsRequest(name=model, version=_version(version))
        return list((await self._unary("ModelStatistics", request, timeout)).model_stats)

    async def trace_settings(
        self,
        changes: dict[str, str | list[str] | None] | None = None,
        model: str = "",
        *,
        timeout: float | None = None,
    ) -> dict[str, list[str]]:
        """The server's trace settings (``model``'s, when given), after applying ``changes`` if any: Triton's
        TraceSetting. A value is a string or a list of them; None drops the setting (a model's override, or back to
        the server's startup value). Keys: ``trace_level`` (OFF, TIMESTAMPS), ``trace_rate`` (1 request in N),
        ``trace_count`` (-1 or how many more)."""
        request = pb.TraceSettingRequest(model_name=model)
        for name, value in (changes or {}).items():
            entry = request.settings[name]  # present with no value: drop it
            if value is not None:
                entry.value.extend([value] if isinstance(value, str) else value)
        reply = await self._unary("TraceSetting", request, timeout)
        return {name: list(value.value) for name, value in reply.settings.items()}

    async def repository_index(self, ready: bool = False, *, timeout: float | None = None) -> list[Any]:
        """``RepositoryIndexResponse.ModelIndex`` entries (name, version, state, reason)."""
        request = pb.RepositoryIndexRequest(ready=ready)
        return list((await self._unary("RepositoryIndex", request, timeout)).models)

    async def load(
        self,
        model: str,
        config: str | Mapping[str, Any] | None = None,
        files: Mapping[str, bytes] | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        """(Re)load ``model`` (the server's explicit mode). ``config``: a ModelConfig as JSON text or a dict, used
        instead of its config.pbtxt; ``files``: ``{"<version>/model.onnx": bytes, ...}`` (a ``file:`` prefix, as
        tritonclient wants it, may be given) that replace the model's
        directory for this load (needs ``config``). A version that fails keeps serving its earlier build and the
        call raises ``InvalidArgument`` with the reasons; a refused call (another mode) raises ``Unavailable``."""
        request = pb.RepositoryModelLoadRequest(model_name=model)
        if config is not None:
            request.parameters["config"].string_param = config if isinstance(config, str) else json.dumps(config)
        for path, content in (files or {}).items():  # tritonclient's keys ("file:1/model.onnx") are taken too
            request.parameters[f"file:{path.removeprefix('file:')}"].bytes_param = bytes(content)
        await self._unary("RepositoryModelLoad", request, timeout)

    async def unload(self, model: str, *, timeout: float | None = None) -> None:
        """Stop serving ``model``: new requests get NOT_FOUND; returns once what it had queued or running was
        answered."""
        await self._unary("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=model), timeout)

    async def report_outcomes(
        self, model: str, outcomes: Mapping[str, Truth] | Iterable[Outcome], *, timeout: float | None = None
    ) -> OutcomeReport:
        """Report the truth about earlier predictions of ``model`` (Ferry's ``ferry.v1.OutcomeService``):
        ``outcomes`` maps request ids to values (an ``int`` class label, ``float`` regression target or ``str``
        class label; row 0), or is a sequence of ``Outcome(request_id, value, row)``. Only a model whose
        config.pbtxt sets ``outcome_output`` remembers predictions, and only of requests sent with a
        ``request_id``; others come back unmatched (see ``ferry.client.outcomes``). A malformed outcome raises
        ``InvalidArgument`` and nothing is recorded."""
        request = encode_outcomes(model, outcomes)
        self._get_stub()  # opens the channel the outcome stub shares
        rpc = self._outcome_stub.ReportOutcomes

        def send(remaining: float | None) -> Awaitable[Any]:
            return rpc(request, timeout=remaining, metadata=self._metadata)

        return decode_report(await self._retrying("ReportOutcomes", send, timeout))

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        version: str | int | None = None,
        *,
        outputs: Sequence[str] | None = None,
        timeout: float | None = None,
        request_id: str = "",
        parameters: Mapping[str, Parameter] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run the model once; returns its outputs by name (all of them unless ``outputs`` names some).

        ``version`` is a number or one of the model's version labels (``"canary"``); None lets the server choose (its
        traffic split, else the latest version). ``parameters`` travel as typed request parameters: bool, int
        (int64), str and float (double).
        """
        result = await self.infer_result(
            model,
            inputs,
            version,
            outputs=outputs,
            timeout=timeout,
            request_id=request_id,
            parameters=parameters,
        )
        return result.outputs

    async def infer_result(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        version: str | int | None = None,
        *,
        outputs: Sequence[str] | None = None,
        timeout: float | None = None,
        request_id: str = "",
        parameters: Mapping[str, Parameter] | None = None,
    ) -> InferResult:
        """Like ``infer``, but also returns the model name and version that ran and the echoed request id."""
        request = encode_request(InferRequest(model, inputs, version, outputs, request_id, parameters))
        if not self._multiplex:
            return decode_response(await self._unary("ModelInfer", request, timeout))
        if self._multiplexer is None:
            self._multiplexer = StreamMultiplexer(self._get_stub(), self._metadata)
        mux = self._multiplexer
        return decode_response(await self._retrying("ModelInfer", lambda left: mux.infer(request, left), timeout))

    async def stream_infer(
        self,
        requests: AsyncIterable[InferRequest] | Iterable[InferRequest],
        *,
        timeout: float | None = None,
    ) -> AsyncGenerator[InferResult | FerryError, None]:
        """Send ``requests`` (``InferRequest`` objects) over one ``ModelStreamInfer`` stream; yield one item per
        request, in order.

        A request that fails is yielded as its ``FerryError`` (e.g. ``InvalidArgument``), not raised, so the
        stream goes on: test items with ``isinstance(item, FerryError)``. Only a failure of the whole stream
        raises. The server may answer out of order; replies are matched to requests by id, so ids must be
        unique within a stream (a request without one is sent with a generated id). ``timeout`` bounds the
        whole stream; streams are never retried. A plain iterable is read on the event loop, so it must not
        block; pass an async iterable to produce requests lazily.
        """
        call = self._get_stub().ModelStreamInfer(timeout=self._timeout(timeout), metadata=self._metadata)
        order = _RequestOrder()
        writer = asyncio.create_task(_send_all(call, requests, order))
        try:
            async for reply in call:
                for item in order.arrived(reply):
                    yield item
            await writer
            if order.unanswered:
                raise Internal(f"the stream ended with {order.unanswered} requests unanswered")
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as err:
            # The writer cancels the call when the caller's iterator or the encoder fails: raise that cause.
            if writer.done() and not writer.cancelled() and (cause := writer.exception()) is not None:
                raise cause from None
            if isinstance(err, grpc.aio.AioRpcError):
                raise _error(err) from err
            raise
        finally:
            writer.cancel()
            call.cancel()

    def _get_stub(self) -> Any:
        if self._closed:
            raise RuntimeError("the client is closed")
        if self._stub is None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self._target, options=self._options)
            else:
                self._channel = grpc.aio.secure_channel(self._target, self._credentials, options=self._options)
            self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
            self._outcome_stub = fpb_grpc.OutcomeServiceStub(self._channel)
        return self._stub

    def _timeout(self, timeout: float | None) -> float | None:
        return self._timeout_s if timeout is None else timeout

    async def _unary(self, method: str, request: Any, timeout: float | None) -> Any:
        """Call one unary RPC under one deadline, retrying per ``RetryPolicy``."""
        rpc = getattr(self._get_stub(), method)

        def send(remaining: float | None) -> Awaitable[Any]:
            return rpc(request, timeout=remaining, metadata=self._metadata)

        return await self._retrying(method, send, timeout)

    async def _retrying(
        self, method: str, send: Callable[[float | None], Awaitable[Any]], timeout: float | None
    ) -> Any:
        """``send(remaining_s)`` under one deadline, retried per ``RetryPolicy``.

        An answer that arrives after the deadline raises DeadlineExceeded too: gRPC's deadline timer can lose
        the race against a fast answer, and the caller's deadline should not depend on who wins it.
        """
        budget = self._timeout(timeout)
        deadline = None if budget is None else time.monotonic() + budget
        attempt = 0
        while True:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                reply = await send(remaining)
                if deadline is not None and time.monotonic() > deadline:
                    raise DeadlineExceeded(f"{method}: the answer came after the {budget:g} s deadline")
                return reply
            except (grpc.aio.AioRpcError, FerryError) as err:
                error = err if isinstance(err, FerryError) else _error(err)
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                wait = self._retry.delay(attempt, error, remaining, self._rng)
                if wait is None:
                    if error is err:
                        raise
                    raise error from err
            await asyncio.sleep(wait)
            attempt += 1


class _RequestOrder:
    """Gives each request of a stream a unique wire id and puts the replies back in request order."""

    def __init__(self) -> None:
        self._sent = 0
        self._next = 0
        self._position: dict[str, int] = {}
        self._ready: dict[int, InferResult | FerryError] = {}

    @property
    def unanswered(self) -> int:
        return self._sent - self._next

    def wire_id(self, request_id: str) -> str:
        wire = request_id or f"~{self._sent}"
        if wire in self._position:
            raise ValueError(f"request id {wire!r} is already in flight on this stream")
        self._position[wire] = self._sent
        self._sent += 1
        return wire

    def arrived(self, reply: Any) -> list[InferResult | FerryError]:
        """The items that can be yielded now that ``reply`` is here (none while an earlier one is missing)."""
        position = self._position.pop(reply.infer_response.id, None)
        if position is None:
            raise Internal(f"stream reply for unknown request id {reply.infer_response.id!r}")
        self._ready[position] = _stream_item(reply)
        items = []
        while self._next in self._ready:
            items.append(self._ready.pop(self._next))
            self._next += 1
        return items


async def _send_all(
    call: Any, requests: AsyncIterable[InferRequest] | Iterable[InferRequest], order: _RequestOrder
) -> None:
    """Write every request, then half-close. A failed call is left to the reader to report; any other error
    (from the caller's iterator, the encoder, a duplicate id) cancels the call and stays on this task for the
    reader to raise."""

    async def write(request: InferRequest) -> None:
        if not isinstance(request, InferRequest):
            raise TypeError(f"stream_infer takes InferRequest(model, inputs, ...) items, not {type(request).__name__}")
        message = encode_request(request)
        message.id = order.wire_id(request.request_id)
        await call.write(message)

    try:
        if isinstance(requests, AsyncIterable):
            async for request in requests:
                await write(request)
        else:
            for request in requests:
                await write(request)
        await call.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        return
    except BaseException:
        call.cancel()
        raise


# ---- blocking client ---------------------------------------------------------------------------------------


class ClientOptions(TypedDict, total=False):
    """The keyword options of ``AsyncClient``, which ``Client`` passes through unchanged."""

    tls: bool
    root_certificates: bytes | None
    private_key: bytes | None
    certificate_chain: bytes | None
    retries: int
    backoff_s: float
    max_backoff_s: float
    timeout_s: float | None
    max_message_bytes: int
    metadata: Sequence[tuple[str, str]]
    multiplex: bool


class _End:
    """Marks the end of an iterator crossing threads."""


_END = _End()


class Client:
    """A blocking client: each method runs the ``AsyncClient`` method of the same name on a private event loop
    in a daemon thread and waits for it. Options and semantics are ``AsyncClient``'s. Safe to share between
    threads; calls from several threads run concurrently on the one channel."""

    def __init__(self, target: str = DEFAULT_TARGET, **options: Unpack[ClientOptions]) -> None:
        self._async = AsyncClient(target, **options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=_run_loop, args=(self._loop,), name="ferry-client", daemon=True)
        self._thread.start()
        self._closed = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel and stop the loop thread. Idempotent."""
        if self._closed:
            return
        try:
            self._run(self._async.close())
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()

    def server_live(self, *, timeout: float | None = None) -> bool:
        return self._run(self._async.server_live(timeout=timeout))

    def server_ready(self, *, timeout: float | None = None) -> bool:
        return self._run(self._async.server_ready(timeout=timeout))

    def model_ready(self, model: str, version: str | int | None = None, *, timeout: float | None = None) -> bool:
        return self._run(self._async.model_ready(model, version, timeout=timeout))

    def server_metadata(self, *, timeout: float | None = None) -> Any:
        return self._run(self._async.server_metadata(timeout=timeout))

    def model_metadata(self, model: str, version: str | int | None = None, *, timeout: float | None = None) -> Any:
        return self._run(self._async.model_metadata(model, version, timeout=timeout))

    def model_config(self, model: str, version: str | int | None = None, *, timeout: float | None = None) -> Any:
        return self._run(self._async.model_config(model, version, timeout=timeout))

    def statistics(
        self, model: str = "", version: str | int | None = None, *, timeout: float | None = None
    ) -> list[Any]:
        return self._run(self._async.statistics(model, version, timeout=timeout))

    def trace_settings(
        self,
        changes: dict[str, str | list[str] | None] | None = None,
        model: str = "",
        *,
        timeout: float | None = None,
    ) -> dict[str, list[str]]:
        return self._run(self._async.trace_settings(changes, model, timeout=timeout))

    def repository_index(self, ready: bool = False, *, timeout: float | None = None) -> list[Any]:
        return self._run(self._async.repository_index(ready, timeout=timeout))

    def load(
        self,
        model: str,
        config: str | Mapping[str, Any] | None = None,
        files: Mapping[str, bytes] | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        self._run(self._async.load(model, config, files, timeout=timeout))

    def unload(self, model: str, *, timeout: float | None = None) -> None:
        self._run(self._async.unload(model, timeout=timeout))

    def report_outcomes(
        self, model: str, outcomes: Mapping[str, Truth] | Iterable[Outcome], *, timeout: float | None = None
    ) -> OutcomeReport:
        return self._run(self._async.report_outcomes(model, outcomes, timeout=timeout))

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        version: str | int | None = None,
        *,
        outputs: Sequence[str] | None = None,
        timeout: float | None = None,
        request_id: str = "",
        parameters: Mapping[str, Parameter] | None = None,
    ) -> dict[str, np.ndarray]:
        return self.infer_result(
            model,
            inputs,
            version,
            outputs=outputs,
            timeout=timeout,
            request_id=request_id,
            parameters=parameters,
        ).outputs

    def infer_result(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        version: str | int | None = None,
        *,
        outputs: Sequence[str] | None = None,
        timeout: float | None = None,
        request_id: str = "",
        parameters: Mapping[str, Parameter] | None = None,
    ) -> InferResult:
        return self._run(
            self._async.infer_result(
                model,
                inputs,
                version,
                outputs=outputs,
                timeout=timeout,
                request_id=request_id,
                parameters=parameters,
            )
        )

    def stream_infer(
        self, requests: Iterable[InferRequest], *, timeout: float | None = None
    ) -> Generator[InferResult | FerryError, None, None]:
        """``AsyncClient.stream_infer`` as a blocking iterator. A list or tuple is sent as it is; any other
        iterable is read in a worker thread, so it may block (e.g. a generator waiting for input). Closing the
        generator early cancels the stream."""
        source = requests if isinstance(requests, Sequence) else _read_in_thread(iter(requests))
        stream = self._async.stream_infer(source, timeout=timeout)
        try:
            while not isinstance(item := self._run(_next_or_end(stream)), _End):
                yield item
        finally:
            if not self._closed:
                self._run(stream.aclose())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise RuntimeError("the client is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt while waiting: do not leave the call running
            raise


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        loop.close()


async def _next_or_end(stream: AsyncIterator[T]) -> T | _End:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return _END


async def _read_in_thread(iterator: Iterator[T]) -> AsyncIterator[T]:
    while not isinstance(item := await asyncio.to_thread(next, iterator, _END), _End):
        yield item
