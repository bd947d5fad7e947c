"""The client SDK without a Ferry server: import isolation, public API, request and response coding, and the
retry, deadline, error-mapping and stream logic against a real tiny grpc.aio server started here."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import pathlib
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc
import numpy as np
import pytest

from ferry import client
from ferry.client import (
    AsyncClient,
    Client,
    ClientOptions,
    DeadlineExceeded,
    FerryError,
    InferRequest,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)
from ferry.client import errors as errors_module
from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client._proto import grpc_service_pb2_grpc as pb_grpc
from ferry.client.client import RetryPolicy, decode_response, encode_request
from ferry.client.errors import STATUS_CODE_PARAMETER
from ferry.client.tensors import DATATYPES, from_raw, to_raw

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY_S = 0.001  # backoff in tests: they never wait on purpose


# ---- import isolation and public API -----------------------------------------------------------------------


def test_import_client_loads_no_server_runtime_or_kernels() -> None:
    code = "import sys, json, client; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT)},
    ).stdout
    loaded = {name.split(".")[0] for name in json.loads(out)}
    assert loaded.isdisjoint({"onnxruntime", "numba", "server", "kernels"})


def test_all_is_the_documented_api() -> None:
    errors = {name for name in errors_module.__all__ if name != "error_for_status"}
    sdk = {"AsyncClient", "Client", "ClientOptions", "InferRequest", "InferResult", "Outcome", "OutcomeReport"}
    assert set(client.__all__) == sdk | errors
    assert len(client.__all__) == len(set(client.__all__))
    for name in client.__all__:
        assert getattr(client, name) is not None
    every_error = {cls.__name__ for cls in errors_module.FerryError.__subclasses__()} | {"FerryError"}
    assert every_error <= set(client.__all__)


# ---- request building --------------------------------------------------------------------------------------


def test_request_carries_raw_contents_datatypes_and_shapes_in_input_order() -> None:
    inputs: dict[str, np.ndarray] = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([[1, -2]], dtype=np.int64),
        "c": np.array([True, False]),
        "d": np.arange(4, dtype=np.float16),
    }
    message = encode_request(InferRequest("m", inputs, version=2, request_id="r1"))
    assert (message.model_name, message.model_version, message.id) == ("m", "2", "r1")
    assert [t.name for t in message.inputs] == ["a", "b", "c", "d"]
    assert [t.datatype for t in message.inputs] == ["FP32", "INT64", "BOOL", "FP16"]
    assert [list(t.shape) for t in message.inputs] == [[2, 3], [1, 2], [2], [4]]
    assert list(message.raw_input_contents) == [array.tobytes() for array in inputs.values()]
    assert not any(t.HasField("contents") for t in message.inputs)
    assert len(message.outputs) == 0 and len(message.parameters) == 0


@pytest.mark.parametrize(
    "array",
    [
        np.array([["a", "bé"], ["", "xyz"]]),
        np.array([b"\x00\x01", b""], dtype=object),
        np.array([b"ab", b"c"]),
    ],
    ids=["str", "object-bytes", "fixed-bytes"],
)
def test_string_arrays_travel_as_bytes(array: np.ndarray) -> None:
    message = encode_request(InferRequest("m", {"text": array}))
    tensor = message.inputs[0]
    assert tensor.datatype == "BYTES"
    decoded = from_raw(message.raw_input_contents[0], DATATYPES["BYTES"], tuple(tensor.shape), "text")
    expected = [item.encode() if isinstance(item, str) else bytes(item) for item in array.ravel()]
    assert decoded.ravel().tolist() == expected


def test_requested_outputs_are_listed() -> None:
    message = encode_request(InferRequest("m", {}, outputs=["label", "probabilities"]))
    assert [o.name for o in message.outputs] == ["label", "probabilities"]
    with pytest.raises(TypeError, match="not one string"):
        encode_request(InferRequest("m", {}, outputs="label"))


@pytest.mark.parametrize(
    ("value", "field", "expected"),
    [
        (True, "bool_param", True),
        (False, "bool_param", False),
        (7, "int64_param", 7),
        (-(2**40), "int64_param", -(2**40)),
        ("x", "string_param", "x"),
        (0.25, "double_param", 0.25),
    ],
)
def test_parameters_map_to_typed_fields(value: Any, field: str, expected: Any) -> None:
    param = encode_request(InferRequest("m", {}, parameters={"p": value})).parameters["p"]
    assert param.WhichOneof("parameter_choice") == field
    assert getattr(param, field) == expected


def test_unsupported_parameter_and_dtype_are_refused() -> None:
    with pytest.raises(TypeError, match="'p'"):
        encode_request(InferRequest("m", {}, parameters={"p": [1]}))  # type: ignore[dict-item]
    with pytest.raises(InvalidArgument, match="complex"):
        encode_request(InferRequest("m", {"x": np.zeros(2, dtype=np.complex64)}))


# ---- response decoding -------------------------------------------------------------------------------------


def _response(outputs: dict[str, np.ndarray], **fields: Any) -> Any:
    message = pb.ModelInferResponse(model_name="m", model_version="3", id="r", **fields)
    for name, array in outputs.items():
        datatype = "BYTES" if array.dtype.kind in "OSU" else {"f": "FP32", "i": "INT64"}[array.dtype.kind]
        message.outputs.add(name=name, datatype=datatype, shape=array.shape)
        message.raw_output_contents.append(to_raw(array))
    return message


def test_response_decodes_raw_outputs_by_position_as_read_only_arrays() -> None:
    probs = np.random.default_rng(0).random((2, 10), dtype=np.float32)
    labels = np.array([3, 7], dtype=np.int64)
    names = np.array([b"three", b"seven"], dtype=object)
    response = _response({"probabilities": probs, "label": labels, "name": names})
    response.parameters["flag"].bool_param = True
    result = decode_response(response)
    assert (result.model_name, result.model_version, result.id) == ("m", "3", "r")
    assert list(result.outputs) == ["probabilities", "label", "name"]
    np.testing.assert_array_equal(result.outputs["probabilities"], probs)
    assert result.outputs["probabilities"].dtype == np.float32
    np.testing.assert_array_equal(result.outputs["label"], labels)
    assert result.outputs["name"].tolist() == [b"three", b"seven"]
    assert not result.outputs["probabilities"].flags.writeable
    assert result.parameters == {"flag": True}


def test_typed_output_contents_are_the_fallback() -> None:
    response = pb.ModelInferResponse(model_name="m", model_version="1")
    tensor = response.outputs.add(name="y", datatype="INT32", shape=[2, 2])
    tensor.contents.int_contents.extend([1, 2, 3, 4])
    np.testing.assert_array_equal(decode_response(response).outputs["y"], [[1, 2], [3, 4]])


def test_malformed_response_is_internal_not_invalid_argument() -> None:
    bad_size = _response({"y": np.zeros(3, dtype=np.float32)})
    bad_size.raw_output_contents[0] = b"\x00" * 5
    with pytest.raises(Internal, match="malformed response"):
        decode_response(bad_size)
    unknown = pb.ModelInferResponse(model_name="m")
    unknown.outputs.add(name="y", datatype="COMPLEX64", shape=[1])
    unknown.raw_output_contents.append(b"\x00" * 8)
    with pytest.raises(Internal, match="COMPLEX64"):
        decode_response(unknown)


# ---- retry policy (pure) -----------------------------------------------------------------------------------


def test_retry_policy_waits_grow_jittered_and_capped() -> None:
    policy = RetryPolicy(retries=10, backoff_s=0.1, max_backoff_s=1.0)
    rng = random.Random(1)
    unavailable = Unavailable("x")
    for attempt in range(10):
        cap = min(1.0, 0.1 * 2**attempt)
        waits = [policy.delay(attempt, unavailable, None, rng) for _ in range(50)]
        assert all(w is not None and cap / 2 <= w <= cap for w in waits)
        assert len(set(waits)) > 1  # jittered
    assert policy.delay(10, unavailable, None, rng) is None  # retries used up


def test_retry_policy_retries_only_unavailable_and_never_past_the_deadline() -> None:
    policy = RetryPolicy(retries=3, backoff_s=0.2, max_backoff_s=0.2)
    rng = random.Random(2)
    for error in (InvalidArgument("x"), NotFound("x"), DeadlineExceeded("x"), FerryError("x")):
        assert policy.delay(0, error, None, rng) is None
    assert policy.delay(0, Unavailable("x"), remaining_s=0.05, rng=rng) is None  # wait >= 0.1 > remaining
    assert policy.delay(0, Unavailable("x"), remaining_s=1.0, rng=rng) is not None


# ---- a real tiny grpc.aio server ---------------------------------------------------------------------------


def _status(code: grpc.StatusCode) -> Any:
    return pb.InferParameter(string_param=code.name)


def _echo(request: Any) -> Any:
    """Inputs come back as outputs of the same name (only the requested ones), parameters are echoed."""
    wanted = {o.name for o in request.outputs}
    response = pb.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version or "1", id=request.id
    )
    for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
        if not wanted or tensor.name in wanted:
            response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
            response.raw_output_contents.append(raw)
    for key, value in request.parameters.items():
        response.parameters[key].CopyFrom(value)
    return response


class FakeServer(pb_grpc.GRPCInferenceServiceServicer):
    """ServerLive fails with the scripted codes, then answers; ModelInfer echoes (model "hang" never answers);
    ModelStreamInfer reads every request, then answers them in reverse order (model "bad" fails with
    INVALID_ARGUMENT)."""

    def __init__(self, failures: Sequence[grpc.StatusCode] = ()) -> None:
        self.failures = list(failures)
        self.live_calls = 0
        self.metadata: list[dict[str, str]] = []

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.live_calls += 1
        self.metadata.append({k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)})
        if self.failures:
            await context.abort(self.failures.pop(0), f"scripted failure {self.live_calls}")
        return pb.ServerLiveResponse(live=True)

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request.model_name == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown model 'missing'")
        if request.model_name == "hang":
            await asyncio.Event().wait()  # until the client's deadline cancels the call
        return _echo(request)

    async def ModelStreamInfer(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        received = [request async for request in requests]
        for request in reversed(received):
            if request.model_name == "bad":
                failed = pb.ModelInferResponse(id=request.id)
                failed.parameters[STATUS_CODE_PARAMETER].CopyFrom(_status(grpc.StatusCode.INVALID_ARGUMENT))
                yield pb.ModelStreamInferResponse(error_message="bad request", infer_response=failed)
            else:
                yield pb.ModelStreamInferResponse(infer_response=_echo(request))


@contextlib.contextmanager
def serving(
    servicer: FakeServer, credentials: grpc.ServerCredentials | None = None
) -> Iterator[tuple[str, FakeServer]]:
    """Run ``servicer`` on a grpc.aio server on 127.0.0.1:0 in a thread with its own event loop."""
    started: concurrent.futures.Future[tuple[asyncio.AbstractEventLoop, asyncio.Event, int]]
    started = concurrent.futures.Future()

    async def run() -> None:
        try:
            server = grpc.aio.server()
            pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
            address = "127.0.0.1:0"
            port = (
                server.add_insecure_port(address)
                if credentials is None
                else server.add_secure_port(address, credentials)
            )
            await server.start()
            stop = asyncio.Event()
        except BaseException as err:
            started.set_exception(err)
            raise
        started.set_result((asyncio.get_running_loop(), stop, port))
        try:
            await stop.wait()
        finally:
            await server.stop(None)

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    loop, stop, port = started.result(timeout=30)
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join()


@pytest.fixture
def fake() -> Iterator[tuple[str, FakeServer]]:
    with serving(FakeServer()) as running:
        yield running


# ---- retries against the real server -----------------------------------------------------------------------


def test_async_client_retries_unavailable_until_success() -> None:
    with serving(FakeServer([grpc.StatusCode.UNAVAILABLE] * 3)) as (address, server):

        async def main() -> bool:
            async with AsyncClient(address, retries=3, backoff_s=TINY_S, max_backoff_s=TINY_S) as c:
                return await c.server_live()

        assert asyncio.run(main()) is True
        assert server.live_calls == 4


def test_sync_client_gives_up_after_retries() -> None:
    with serving(FakeServer([grpc.StatusCode.UNAVAILABLE] * 10)) as (address, server):
        with (
            Client(address, retries=2, backoff_s=TINY_S, max_backoff_s=TINY_S) as c,
            pytest.raises(Unavailable) as caught,
        ):
            c.server_live()
        assert server.live_calls == 3
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert "scripted failure 3" in caught.value.message
        assert isinstance(caught.value.__cause__, grpc.aio.AioRpcError)


def test_retries_zero_means_one_attempt() -> None:
    with serving(FakeServer([grpc.StatusCode.UNAVAILABLE])) as (address, server):
        with (
            Client(address, retries=0, backoff_s=TINY_S, max_backoff_s=TINY_S) as c,
            pytest.raises(Unavailable),
        ):
            c.server_live()
        assert server.live_calls == 1


def test_invalid_argument_is_not_retried() -> None:
    with serving(FakeServer([grpc.StatusCode.INVALID_ARGUMENT])) as (address, server):
        with (
            Client(address, retries=5, backoff_s=TINY_S, max_backoff_s=TINY_S) as c,
            pytest.raises(InvalidArgument),
        ):
            c.server_live()
        assert server.live_calls == 1


def test_backoff_never_runs_past_the_deadline() -> None:
    # Each wait would be >= 2.5 s but the deadline is 0.5 s: the client gives up with the server's error
    # instead of sleeping (a later attempt would have failed with DeadlineExceeded instead).
    with serving(FakeServer([grpc.StatusCode.UNAVAILABLE] * 10)) as (address, server):
        with Client(address, retries=3, backoff_s=5.0, max_backoff_s=5.0) as c:
            start = time.monotonic()
            with pytest.raises(Unavailable):
                c.server_live(timeout=0.5)
            assert time.monotonic() - start < 2.5
        assert server.live_calls == 1


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL]
)
def test_status_codes_become_typed_errors(code: grpc.StatusCode) -> None:
    with serving(FakeServer([code])) as (address, _), Client(address) as c:
        with pytest.raises(FerryError) as caught:
            c.server_live()
        assert caught.value.code == code
        assert type(caught.value) is errors_module.error_for_status(code, "").__class__


def test_unimplemented_rpc_raises_unimplemented(fake: tuple[str, FakeServer]) -> None:
    with Client(fake[0]) as c, pytest.raises(Unimplemented):
        c.model_config("m")


@pytest.mark.parametrize("model", ["hang", "instant"])
def test_tiny_timeout_raises_deadline_exceeded(fake: tuple[str, FakeServer], model: str) -> None:
    # An instant echo can beat gRPC's deadline timer; the client then raises for the late answer itself.
    with Client(fake[0]) as c:
        for _ in range(20):
            with pytest.raises(DeadlineExceeded):
                c.infer(model, {"x": np.zeros(4, np.float32)}, timeout=1e-6)
        assert c.server_live()  # the client stays usable


def test_client_default_timeout_applies() -> None:
    with serving(FakeServer([grpc.StatusCode.UNAVAILABLE] * 10)) as (address, server):
        # No per-call timeout: timeout_s bounds the retries (without it the client would wait >= 2.5 s and retry).
        options: ClientOptions = {"retries": 3, "backoff_s": 5.0, "max_backoff_s": 5.0, "timeout_s": 0.5}
        with Client(address, **options) as c, pytest.raises(Unavailable):
            c.server_live()
        assert server.live_calls == 1


# ---- options change behaviour ------------------------------------------------------------------------------


def test_metadata_is_sent_on_every_call(fake: tuple[str, FakeServer]) -> None:
    with Client(fake[0], metadata=[("x-tenant", "blue")]) as c:
        c.server_live()
        c.server_live()
    assert [m.get("x-tenant") for m in fake[1].metadata] == ["blue", "blue"]


def test_max_message_bytes_limits_what_is_sent(fake: tuple[str, FakeServer]) -> None:
    big = {"x": np.zeros(4096, np.float32)}  # 16 KiB
    with Client(fake[0], max_message_bytes=1024) as small, pytest.raises(ResourceExhausted):
        small.infer("m", big)
    with Client(fake[0]) as default:
        np.testing.assert_array_equal(default.infer("m", big)["x"], big["x"])


def test_tls_uses_the_given_root_certificate(tmp_path: pathlib.Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-nodes", "-days", "1", "-subj", "/CN=localhost"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-keyout", str(key), "-out", str(cert)),
            *("-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ],
        check=True,
        capture_output=True,
    )
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    with serving(FakeServer(), credentials) as (address, _):
        with Client(address, tls=True, root_certificates=cert.read_bytes()) as secure:
            assert secure.server_live() is True
        with Client(address, retries=0) as plain, pytest.raises(Unavailable):
            plain.server_live(timeout=5)


def test_bad_options_are_refused() -> None:
    bad: list[ClientOptions] = [
        {"retries": -1},
        {"timeout_s": 0.0},
        {"max_message_bytes": 0},
        {"backoff_s": 2.0},
    ]
    for options in bad:
        with pytest.raises(ValueError):
            Client(**options)
    with pytest.raises(ValueError, match="tls"):
        AsyncClient(root_certificates=b"x")


# ---- infer and streams against the real server -------------------------------------------------------------


def test_infer_result_echoes_version_id_outputs_and_parameters(fake: tuple[str, FakeServer]) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    words = np.array(["a", "b"], dtype=object)
    params: dict[str, bool | int | str | float] = {"flag": True, "count": 3, "name": "n", "ratio": 0.5}
    with Client(fake[0]) as c:
        result = c.infer_result(
            "m", {"x": x, "words": words}, version=4, request_id="r9", parameters=params, outputs=["x"]
        )
        assert (result.model_name, result.model_version, result.id) == ("m", "4", "r9")
        assert list(result.outputs) == ["x"]
        np.testing.assert_array_equal(result.outputs["x"], x)
        assert result.parameters == params
        assert c.infer("m", {"words": words})["words"].tolist() == [b"a", b"b"]
        with pytest.raises(NotFound, match="missing"):
            c.infer("missing", {"x": x})


def _stream_requests(count: int, bad: int) -> list[InferRequest]:
    return [
        InferRequest("bad" if i == bad else "m", {"x": np.full(3, i, np.float32)}, request_id=f"r{i}" if i % 2 else "")
        for i in range(count)
    ]


def _check_stream(items: list[Any], count: int, bad: int) -> None:
    assert len(items) == count
    for i, item in enumerate(items):
        if i == bad:
            assert isinstance(item, InvalidArgument)
            assert item.message == "bad request"
        else:
            assert not isinstance(item, FerryError)
            np.testing.assert_array_equal(item.outputs["x"], np.full(3, i, np.float32))


def test_sync_stream_restores_request_order_and_yields_item_errors(fake: tuple[str, FakeServer]) -> None:
    with Client(fake[0]) as c:
        _check_stream(list(c.stream_infer(_stream_requests(20, bad=7))), 20, 7)
        generated = (request for request in _stream_requests(5, bad=2))  # read in a worker thread
        _check_stream(list(c.stream_infer(generated)), 5, 2)
        abandoned = c.stream_infer(_stream_requests(5, bad=-1))
        assert not isinstance(next(abandoned), FerryError)
        abandoned.close()  # cancels the call
        assert c.server_live()  # the client is still usable


def test_async_stream_with_an_async_request_source(fake: tuple[str, FakeServer]) -> None:
    async def source() -> AsyncIterator[InferRequest]:
        for request in _stream_requests(10, bad=0):
            yield request

    async def main() -> list[Any]:
        async with AsyncClient(fake[0]) as c:
            return [item async for item in c.stream_infer(source())]

    _check_stream(asyncio.run(main()), 10, 0)


def test_stream_raises_the_request_iterators_own_error(fake: tuple[str, FakeServer]) -> None:
    def failing() -> Iterator[InferRequest]:
        yield _stream_requests(1, bad=-1)[0]
        raise KeyError("no more requests")

    with Client(fake[0]) as c:
        with pytest.raises(KeyError, match="no more requests"):
            list(c.stream_infer(failing()))
        duplicate = [InferRequest("m", {}, request_id="same"), InferRequest("m", {}, request_id="same")]
        with pytest.raises(ValueError, match="already in flight"):
            list(c.stream_infer(duplicate))
        assert c.server_live()


def test_stream_item_error_without_a_status_code_is_a_plain_ferry_error() -> None:
    from ferry.client.client import _stream_item

    item = _stream_item(pb.ModelStreamInferResponse(error_message="boom", infer_response=pb.ModelInferResponse()))
    assert type(item) is FerryError
    assert item.code == grpc.StatusCode.UNKNOWN


def test_closed_client_refuses_calls(fake: tuple[str, FakeServer]) -> None:
    c = Client(fake[0])
    assert c.server_live()
    c.close()
    c.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        c.server_live()


# ---- outcomes ----------------------------------------------------------------------------------------------


def test_outcomes_are_encoded_by_the_type_of_their_value() -> None:
    from ferry.client.outcomes import decode_report, encode_outcomes

    request = encode_outcomes("m", {"a": 3, "b": np.int64(4), "c": 0.5, "d": np.float32(1.5), "e": "cat", "f": True})
    kinds = [
        (o.request_id, o.model_name, o.WhichOneof("value"), getattr(o, o.WhichOneof("value"))) for o in request.outcomes
    ]
    assert kinds == [
        ("a", "m", "label", 3), ("b", "m", "label", 4), ("c", "m", "target", 0.5), ("d", "m", "target", 1.5),
        ("e", "m", "class_label", "cat"), ("f", "m", "label", 1),
    ]  # fmt: skip
    rows = encode_outcomes("m", [client.Outcome("x", 2, row=3)]).outcomes
    assert [(o.request_id, o.label, o.row) for o in rows] == [("x", 2, 3)]
    with pytest.raises(TypeError, match="not int, float or str"):
        encode_outcomes("m", {"a": [1]})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="Outcome objects"):
        encode_outcomes("m", [("a", 1)])  # type: ignore[list-item]
    reply = type("Reply", (), {"matched": 2, "unmatched": 1, "unmatched_index": [2]})()
    assert decode_report(reply) == client.OutcomeReport(2, 1, (2,))
