"""Every RPC of inference.GRPCInferenceService, health and reflection, through a real server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import queue
import re
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client._proto import grpc_service_pb2_grpc as pb_grpc
from ferry.client.tensors import DATATYPES, to_raw
from ferry.server.api.servicer import EXTENSIONS, InferenceServicer
from tests.serving import BackgroundServer, background_server


@pytest.fixture(scope="module")
def server(test_repo: Path) -> Iterator[BackgroundServer]:
    with background_server(test_repo) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: BackgroundServer) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def request_for(model: str, arrays: dict[str, np.ndarray], version: str = "", **fields: object) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version, **fields)  # type: ignore[arg-type]
    for name, array in arrays.items():
        datatype = (
            "BYTES"
            if array.dtype == object
            else next(d.name for d in DATATYPES.values() if d.dtype == array.dtype.newbyteorder("<"))
        )
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(to_raw(array))
    return request


def outputs_of(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    from ferry.client.tensors import from_raw

    return {
        out.name: from_raw(raw, DATATYPES[out.datatype], list(out.shape), out.name)
        for out, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def test_every_rpc_maps_errors_through_the_decorator() -> None:
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        assert hasattr(getattr(InferenceServicer, method.name), "__wrapped__"), method.name


def test_liveness_and_readiness(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready  # broken models do not block readiness by default
    assert stub.ModelReady(pb.ModelReadyRequest(name="add")).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="scale", version="2")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="scale", version="1")).ready  # outside latest{2}
    assert not stub.ModelReady(pb.ModelReadyRequest(name="broken")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="nope")).ready


def test_strict_readiness_reports_not_ready_while_a_model_is_broken(test_repo: Path) -> None:
    with (
        background_server(test_repo, strict_readiness=True, http_port=None) as strict,
        grpc.insecure_channel(strict.address) as channel,
    ):
        assert not pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(pb.ServerReadyRequest()).ready


def test_server_metadata(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    meta = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "ferry" and meta.version
    assert list(meta.extensions) == list(EXTENSIONS)


def test_model_metadata_batching_fixed_and_versions(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    add = stub.ModelMetadata(pb.ModelMetadataRequest(name="add"))
    assert add.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in add.inputs] == [("a", "FP32", [-1, 4]), ("b", "FP32", [-1, 4])]
    assert [t.name for t in add.outputs] == ["sum", "diff"]
    fixed = stub.ModelMetadata(pb.ModelMetadataRequest(name="fixed"))
    assert list(fixed.inputs[0].shape) == [2, 3]
    assert list(stub.ModelMetadata(pb.ModelMetadataRequest(name="scale")).versions) == ["2", "3"]
    assert list(stub.ModelMetadata(pb.ModelMetadataRequest(name="scale", version="2")).versions) == ["2"]
    identity = stub.ModelMetadata(pb.ModelMetadataRequest(name="identity"))
    assert {t.datatype for t in identity.inputs} == set(DATATYPES)


def test_model_config_is_completed_from_the_graph(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    config = stub.ModelConfig(pb.ModelConfigRequest(name="identity")).config
    assert config.name == "identity" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 64
    assert len(config.input) == len(DATATYPES) and list(config.input[0].dims) == [3]
    assert stub.ModelConfig(pb.ModelConfigRequest(name="fixed")).config.max_batch_size == 0
    assert stub.ModelConfig(pb.ModelConfigRequest(name="scale")).config.version_policy.latest.num_versions == 2


def test_infer_every_datatype_raw(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    rng = np.random.default_rng(1)
    arrays: dict[str, np.ndarray] = {}
    for name, datatype in DATATYPES.items():
        if name == "BYTES":
            arrays[f"in_{name}"] = np.array([["a", "\u00e9t\u00e9", ""], ["x" * 300, "y", "z"]], dtype=object)
        elif name == "BOOL":
            arrays[f"in_{name}"] = rng.integers(0, 2, (2, 3)).astype(bool)
        else:
            arrays[f"in_{name}"] = rng.integers(0, 100, (2, 3)).astype(datatype.dtype)
    response = stub.ModelInfer(request_for("identity", arrays, id="all-types"))
    assert response.id == "all-types" and response.model_name == "identity" and response.model_version == "1"
    assert len(response.raw_output_contents) == len(response.outputs) == len(DATATYPES)
    got = outputs_of(response)
    for name in DATATYPES:
        expected = arrays[f"in_{name}"]
        if name == "BYTES":
            expected = np.vectorize(lambda s: s.encode(), otypes=[object])(expected)
        np.testing.assert_array_equal(got[f"out_{name}"], expected)
        assert got[f"out_{name}"].shape == (2, 3)


def test_infer_typed_contents(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = pb.ModelInferRequest(model_name="add")
    for name in ("a", "b"):
        tensor = request.inputs.add(name=name, datatype="FP32", shape=[1, 4])
        tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0] if name == "a" else [1.0, 1.0, 1.0, 1.0])
    got = outputs_of(stub.ModelInfer(request))
    np.testing.assert_array_equal(got["sum"], [[2, 3, 4, 5]])
    np.testing.assert_array_equal(got["diff"], [[0, 1, 2, 3]])


def test_requested_outputs_subset_and_order(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    a, b = np.ones((1, 4), np.float32), np.full((1, 4), 3, np.float32)
    request = request_for("add", {"a": a, "b": b})
    request.outputs.add(name="diff")
    response = stub.ModelInfer(request)
    assert [o.name for o in response.outputs] == ["diff"] and len(response.raw_output_contents) == 1
    np.testing.assert_array_equal(outputs_of(response)["diff"], a - b)


def test_unknown_parameters_are_ignored(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = request_for("add", {"a": np.ones((1, 4), np.float32), "b": np.ones((1, 4), np.float32)})
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    request.parameters["priority"].uint64_param = 3
    request.parameters["something_else"].string_param = "x"
    request.inputs[0].parameters["binary_data_size"].int64_param = 16
    np.testing.assert_array_equal(outputs_of(stub.ModelInfer(request))["sum"], np.full((1, 4), 2.0))


def test_versions_side_by_side(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    latest = stub.ModelInfer(request_for("scale", {"input": x}))
    assert latest.model_version == "3"
    np.testing.assert_array_equal(outputs_of(latest)["output"], 3 * x)
    v2 = stub.ModelInfer(request_for("scale", {"input": x}, version="2"))
    assert v2.model_version == "2"
    np.testing.assert_array_equal(outputs_of(v2)["output"], 2 * x)


def test_fixed_shape_model(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(outputs_of(stub.ModelInfer(request_for("fixed", {"x": x})))["y"], 2 * x)


def test_large_request_above_grpc_default_limit(
    stub: pb_grpc.GRPCInferenceServiceStub, server: BackgroundServer
) -> None:
    # 8 x (8 MiB / 8 rows) FP32: above gRPC's 4 MiB default receive limit, within Ferry's 64 MiB.
    x = np.ones((1, 4), np.float32)
    big = request_for("add", {"a": x, "b": x})
    big.parameters["padding"].string_param = "p" * (6 * 1024 * 1024)
    with grpc.insecure_channel(
        server.address,
        options=[("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)],
    ) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(big)
    np.testing.assert_array_equal(outputs_of(response)["sum"], 2 * x)


def test_message_above_the_configured_limit_is_resource_exhausted(test_repo: Path) -> None:
    x = np.ones((1, 4), np.float32)
    request = request_for("add", {"a": x, "b": x})
    request.parameters["padding"].string_param = "p" * (128 * 1024)
    with (
        background_server(test_repo, max_message_bytes=64 * 1024, http_port=None) as small,
        grpc.insecure_channel(small.address) as channel,
        pytest.raises(grpc.RpcError) as err,
    ):
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_stream_infer_answers_each_request_and_survives_errors(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    good = np.arange(4, dtype=np.float32).reshape(1, 4)
    requests = []
    for i in range(10):
        if i == 4:
            requests.append(request_for("scale", {"input": np.ones((1, 5), np.float32)}, id="bad"))
        elif i == 7:
            requests.append(request_for("nope", {"input": good}, id="unknown"))
        else:
            requests.append(request_for("scale", {"input": good * i}, id=f"r{i}"))
    replies = list(stub.ModelStreamInfer(iter(requests), timeout=30))
    assert len(replies) == 10
    by_id = {r.infer_response.id: r for r in replies}
    assert "expected shape [-1, 4], got [1, 5]" in by_id["bad"].error_message
    assert "unknown model 'nope'" in by_id["unknown"].error_message
    for i in (0, 1, 2, 3, 5, 6, 8, 9):
        reply = by_id[f"r{i}"]
        assert not reply.error_message
        np.testing.assert_array_equal(outputs_of(reply.infer_response)["output"], 3 * good * i)


def test_statistics_count_successes_and_failures(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    def stats() -> pb.ModelStatistics:
        return stub.ModelStatistics(pb.ModelStatisticsRequest(name="add", version="1")).model_stats[0]

    before = stats()
    x = np.ones((3, 4), np.float32)
    stub.ModelInfer(request_for("add", {"a": x, "b": x}))
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(request_for("add", {"a": x, "b": np.ones((3, 5), np.float32)}))
    after = stats()
    assert after.name == "add" and after.version == "1"
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.inference_stats.fail.count == before.inference_stats.fail.count + 1
    assert after.inference_count == before.inference_count + 3
    assert after.execution_count == before.execution_count + 1
    assert after.inference_stats.queue.count == before.inference_stats.queue.count + 1
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    assert any(b.batch_size == 3 for b in after.batch_stats)
    everything = stub.ModelStatistics(pb.ModelStatisticsRequest()).model_stats
    assert {(s.name, s.version) for s in everything} >= {("add", "1"), ("scale", "2"), ("scale", "3")}


def test_repository_index_reports_failures_with_reasons(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest()).models
    states = {(m.name, m.version): (m.state, m.reason) for m in index}
    # a serving version's reason is its provenance: the model file's sha256 and when the build was ready
    assert states[("add", "1")][0] == "READY" and re.fullmatch(
        r"sha256=[0-9a-f]{64} loaded_at=\S+Z", states[("add", "1")][1]
    )
    assert states[("scale", "3")][0] == "READY" and ("scale", "1") not in states
    assert states[("broken", "1")][0] == "UNAVAILABLE" and "onnxruntime cannot load" in states[("broken", "1")][1]
    assert states[("badconfig", "")][0] == "UNAVAILABLE" and "config.pbtxt" in states[("badconfig", "")][1]
    ready = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True)).models
    assert all(m.state == "READY" for m in ready) and {m.name for m in ready} == {"add", "fixed", "identity", "scale"}


def test_unimplemented_extensions(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "shared memory" in err.value.details()


def test_health_check_and_watch(server: BackgroundServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        for service in ("", "inference.GRPCInferenceService", "add", "scale"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == serving, service
        assert health.Check(health_pb2.HealthCheckRequest(service="broken")).status == (
            health_pb2.HealthCheckResponse.NOT_SERVING
        )
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        watch = health.Watch(health_pb2.HealthCheckRequest(service="add"), timeout=30)
        assert next(watch).status == serving
        watch.cancel()


def test_reflection_lists_services_and_describes_inference(server: BackgroundServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService"),
        ]
        listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=30))
    names = {s.name for s in listed.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
    assert described.file_descriptor_response.file_descriptor_proto


def test_http_health_endpoints(server: BackgroundServer) -> None:
    base = f"http://127.0.0.1:{server.server.http_port}"

    def status(path: str) -> int:
        try:
            with urllib.request.urlopen(base + path, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as err:
            return err.code

    assert status("/v2/health/live") == 200
    assert status("/v2/health/ready") == 200
    assert status("/v2/models/add/ready") == 200
    assert status("/v2/models/scale/versions/1/ready") == 503
    assert status("/v2/models/broken/ready") == 503


def test_load_and_unload_a_model(test_repo: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(test_repo / "scale", tmp_path / "scale")
    explicit = {"model_control_mode": "explicit", "load_models": ("*",)}  # load/unload are refused in `none`
    with (
        background_server(tmp_path, http_port=None, **explicit) as running,
        grpc.insecure_channel(running.address) as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        updates: queue.Queue[int] = queue.Queue()
        watch = health.Watch(health_pb2.HealthCheckRequest(service="scale"), timeout=60)

        def follow() -> None:
            with contextlib.suppress(grpc.RpcError):  # ends with CANCELLED when the test cancels the watch
                for reply in watch:
                    updates.put(reply.status)

        threading.Thread(target=follow, daemon=True).start()
        assert updates.get(timeout=10) == health_pb2.HealthCheckResponse.SERVING

        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="scale"))
        assert not stub.ModelReady(pb.ModelReadyRequest(name="scale")).ready
        assert updates.get(timeout=10) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request_for("scale", {"input": np.ones((1, 4), np.float32)}))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        # A new version on disk is picked up by the next load.
        shutil.copytree(tmp_path / "scale" / "3", tmp_path / "scale" / "4")
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="scale"))
        assert updates.get(timeout=10) == health_pb2.HealthCheckResponse.SERVING
        assert list(stub.ModelMetadata(pb.ModelMetadataRequest(name="scale")).versions) == ["3", "4"]
        watch.cancel()

        with pytest.raises(grpc.RpcError) as err:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_concurrent_requests_each_get_their_own_answer(example_repo: Path) -> None:
    """400 concurrent requests with distinct inputs: each answer equals onnxruntime's for its own input."""
    import asyncio

    session = ort.InferenceSession(str(example_repo / "mlp" / "1" / "model.onnx"))
    rng = np.random.default_rng(7)
    inputs = [rng.standard_normal((1 + i % 3, 256)).astype(np.float32) for i in range(400)]
    expected = [session.run(None, {"input": x})[0] for x in inputs]

    async def fire(address: str) -> list[pb.ModelInferResponse]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            calls = [stub.ModelInfer(request_for("mlp", {"input": x}, id=str(i))) for i, x in enumerate(inputs)]
            return list(await asyncio.gather(*calls))

    with background_server(example_repo, http_port=None) as running:
        responses = asyncio.run(fire(running.address))
    for i, response in enumerate(responses):
        assert response.id == str(i)
        np.testing.assert_allclose(outputs_of(response)["output"], expected[i], rtol=1e-5, atol=1e-5)
