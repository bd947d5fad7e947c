"""``loadtest/h2ferry.py`` (Ferry's servicer over hand-written HTTP/2, the transport experiment) answers grpcio's
client as Ferry does: correct outputs, Ferry's error statuses and messages, UNIMPLEMENTED for what it leaves out."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from client._proto import grpc_service_pb2 as pb
from client._proto import grpc_service_pb2_grpc as pb_grpc
from loadtest import bench
from tests.integration.test_rpcs import outputs_of, request_for


@pytest.fixture(scope="module")
def stub(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    command = [sys.executable, "-m", "loadtest.h2ferry", "--model-repository", str(example_repo)]
    log_path = tmp_path_factory.mktemp("h2ferry") / "server.log"
    with (
        log_path.open("w") as log,
        bench.serving("h2ferry", command, "ferry ready:", log) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def test_answers_equal_onnxruntime_and_the_metadata_is_ferrys(
    stub: pb_grpc.GRPCInferenceServiceStub, example_repo: Path
) -> None:
    session = ort.InferenceSession(str(example_repo / "mlp" / "1" / "model.onnx"))
    x = np.random.default_rng(2).standard_normal((3, 256)).astype(np.float32)
    reply = stub.ModelInfer(request_for("mlp", {"input": x}, id="r1"), timeout=30)
    assert reply.id == "r1" and reply.model_name == "mlp"
    np.testing.assert_allclose(outputs_of(reply)["output"], session.run(None, {"input": x})[0], rtol=1e-4, atol=1e-5)
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny"), timeout=10)
    assert [(t.name, list(t.shape)) for t in meta.inputs] == [("input", [-1, 16])]
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live


def test_errors_keep_ferrys_statuses_and_messages(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request_for("nope", {"input": np.ones((1, 16), np.float32)}), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request_for("tiny", {"input": np.ones((1, 3), np.float32)}), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "input" in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        list(stub.ModelStreamInfer(iter([request_for("tiny", {"input": np.ones((1, 16), np.float32)})]), timeout=10))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
