"""Bad requests get a precise status and message naming model, version, tensor, expected and received values;
none of them disturbs the server or other requests."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client._proto import grpc_service_pb2_grpc as pb_grpc
from tests.integration.test_rpcs import outputs_of, request_for
from tests.serving import background_server

ONES = np.ones((2, 4), np.float32)


@pytest.fixture(scope="module")
def stub(test_repo: Path) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with background_server(test_repo, http_port=None) as running, grpc.insecure_channel(running.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def add_request(**changes: object) -> pb.ModelInferRequest:
    return request_for("add", {"a": ONES, "b": ONES}, **changes)  # type: ignore[arg-type]


def mutate(fn: Callable[[pb.ModelInferRequest], object]) -> pb.ModelInferRequest:
    request = add_request()
    fn(request)
    return request


def with_typed_contents(request: pb.ModelInferRequest) -> None:
    request.inputs[0].contents.fp32_contents.extend([1.0] * 8)


def drop_first_raw(request: pb.ModelInferRequest) -> None:
    del request.raw_input_contents[0]


def typed_only(request: pb.ModelInferRequest) -> None:
    del request.raw_input_contents[:]
    request.inputs[0].contents.fp32_contents.extend([1.0] * 8)


CASES = {
    "unknown model": (
        request_for("nope", {"a": ONES}),
        grpc.StatusCode.NOT_FOUND,
        "unknown model 'nope'",
    ),
    "unknown version": (
        request_for("add", {"a": ONES, "b": ONES}, version="9"),
        grpc.StatusCode.NOT_FOUND,
        r"model 'add' has no version 9 \(serving \[1\]\)",
    ),
    "version outside the policy": (
        request_for("scale", {"input": ONES}, version="1"),
        grpc.StatusCode.NOT_FOUND,
        r"model 'scale' has no version 1 \(serving \[2, 3\]\)",
    ),
    "malformed version": (
        request_for("add", {"a": ONES, "b": ONES}, version="latest"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "version must be a non-negative integer, got 'latest'",
    ),
    "model that failed to load": (
        request_for("broken", {"input": ONES}),
        grpc.StatusCode.UNAVAILABLE,
        "model 'broken' is not ready: version 1: onnxruntime cannot load",
    ),
    "missing input": (
        request_for("add", {"a": ONES}),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"model 'add' version 1: missing inputs \['b'\]",
    ),
    "extra input": (
        request_for("add", {"a": ONES, "b": ONES, "c": ONES}),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"model 'add' version 1: unexpected input 'c'; inputs are \['a', 'b'\]",
    ),
    "duplicate input": (
        mutate(lambda r: (r.inputs.append(r.inputs[0]), r.raw_input_contents.append(r.raw_input_contents[0]))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "model 'add' version 1 input 'a': given more than once",
    ),
    "wrong datatype": (
        request_for("add", {"a": ONES.astype(np.int32), "b": ONES}),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"model 'add' version 1 input 'a': expected datatype FP32 \(shape \[-1, 4\]\), got 'INT32'",
    ),
    "wrong rank": (
        request_for("add", {"a": np.ones((2, 4, 1), np.float32), "b": ONES}),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"input 'a': expected shape \[-1, 4\] \(rank 2\), got \[2, 4, 1\]",
    ),
    "wrong dims": (
        request_for("add", {"a": np.ones((2, 5), np.float32), "b": ONES}),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"input 'a': expected shape \[-1, 4\], got \[2, 5\]",
    ),
    "fixed-shape model with wrong dims": (
        request_for("fixed", {"x": np.ones((3, 3), np.float32)}),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"model 'fixed' version 1 input 'x': expected shape \[2, 3\], got \[3, 3\]",
    ),
    "negative dim": (
        mutate(lambda r: r.inputs[0].shape.__setitem__(0, -2)),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"input 'a': shape \[-2, 4\] has a negative dimension",
    ),
    "empty raw contents": (
        pb.ModelInferRequest(
            model_name="fixed",
            inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[2, 3])],
            raw_input_contents=[b""],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"input 'x': raw contents hold 0 bytes, expected 24",
    ),
    "huge batch dimension": (
        mutate(lambda r: r.inputs[0].shape.__setitem__(0, 2**62)),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"input 'a': batch size 4611686018427387904 is outside 1..8",
    ),
    "raw length not matching the shape": (
        mutate(lambda r: r.raw_input_contents.__setitem__(1, b"\x00" * 12)),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"input 'b': raw contents hold 12 bytes, expected 32 \(8 FP32 elements for shape \[2, 4\]\)",
    ),
    "raw and typed contents mixed": (
        mutate(with_typed_contents),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'a': contents must not be set when the request uses raw_input_contents",
    ),
    "raw contents count not matching inputs": (
        mutate(drop_first_raw),
        grpc.StatusCode.INVALID_ARGUMENT,
        "1 raw_input_contents for 2 inputs",
    ),
    "input without data": (
        mutate(typed_only),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"input 'b': no data \(neither raw_input_contents nor contents\)",
    ),
    "batch above max_batch_size": (
        request_for("add", {"a": np.ones((9, 4), np.float32), "b": np.ones((9, 4), np.float32)}),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"input 'a': batch size 9 is outside 1..8 \(max_batch_size\)",
    ),
    "empty batch": (
        request_for("add", {"a": np.ones((0, 4), np.float32), "b": np.ones((0, 4), np.float32)}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "batch size 0 is outside 1..8",
    ),
    "inputs with different batch sizes": (
        request_for("add", {"a": np.ones((2, 4), np.float32), "b": np.ones((3, 4), np.float32)}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'b': batch size 3 differs from the other inputs' 2",
    ),
    "unknown requested output": (
        mutate(lambda r: r.outputs.add(name="product")),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"model 'add' version 1: unknown output 'product'; outputs are \['sum', 'diff'\]",
    ),
    "duplicate requested output": (
        mutate(lambda r: (r.outputs.add(name="sum"), r.outputs.add(name="sum"))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "an output is requested more than once",
    ),
    "typed values of the wrong count": (
        pb.ModelInferRequest(
            model_name="fixed",
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name="x", datatype="FP32", shape=[2, 3], contents=pb.InferTensorContents(fp32_contents=[1.0])
                )
            ],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'x': fp32_contents holds 1 values, expected 6",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_gets_precise_status(stub: pb_grpc.GRPCInferenceServiceStub, case: str) -> None:
    request, code, message = CASES[case]
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, timeout=10)
    assert err.value.code() == code, err.value.details()
    assert re.search(message, err.value.details()), err.value.details()


def test_non_utf8_bytes_for_a_string_tensor(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = pb.ModelInferRequest(model_name="identity")
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="identity"))
    for tensor in meta.inputs:
        request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=[1, 3])
        if tensor.datatype == "BYTES":
            request.raw_input_contents.append(b"".join(b"\x01\x00\x00\x00\xff" for _ in range(3)))
        else:
            size = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2}.get(tensor.datatype)
            size = size or (4 if tensor.datatype in ("UINT32", "INT32", "FP32") else 8)
            request.raw_input_contents.append(b"\x00" * 3 * size)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'in_BYTES': BYTES element 0 is not UTF-8" in err.value.details()


def test_server_still_answers_after_every_bad_request(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    for request, _, _ in CASES.values():
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(request, timeout=10)
    np.testing.assert_array_equal(outputs_of(stub.ModelInfer(add_request()))["sum"], 2 * ONES)
