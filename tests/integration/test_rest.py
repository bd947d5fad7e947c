"""The REST API against a real server on the example repository: Triton's HTTP client (``tritonclient.http``
2.41, binary and JSON), raw HTTP for every error status, compression both ways, deadlines, and ``perf_analyzer -i
http``. Answers are checked against onnxruntime on the same model files, and against the gRPC port.
"""

from __future__ import annotations

import gc
import gzip
import json
import os
import socket
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from benchmarks import perf_analyzer as pa
from tests.resthttp import call, infer_path, post_json
from tests.serving import BackgroundServer, background_server


@pytest.fixture(scope="module")
def server(example_repo: Path) -> Iterator[BackgroundServer]:
    with background_server(example_repo, model_control_mode="explicit", load_models=("*",)) as running:
        yield running


@pytest.fixture(scope="module")
def port(server: BackgroundServer) -> int:
    assert server.server.http_port is not None
    return server.server.http_port


@pytest.fixture(scope="module")
def client(port: int) -> Iterator[th.InferenceServerClient]:
    c = th.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=60)
    try:
        yield c
    finally:
        c.close()
        del c
        # tritonclient.http's gevent objects must be freed on this thread: collected later on another (a server's
        # event loop thread), gevent raises InvalidThreadUseError from a finalizer, an unraisable-exception error
        gc.collect()


def reference(repo: Path, model: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(repo / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": x})[0])


def rows(n: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, width), dtype=np.float32)


def http_input(x: np.ndarray, binary: bool) -> th.InferInput:
    tensor = th.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


# -- tritonclient.http


def test_health_and_readiness(client: th.InferenceServerClient, port: int) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("tiny")
    assert client.is_model_ready("digits", "2")
    assert not client.is_model_ready("nope")
    # KServe's REST client parses these bodies
    assert call(port, "GET", "/v2/health/live").json() == {"live": True}
    assert call(port, "GET", "/v2/health/ready").json() == {"ready": True}
    assert call(port, "GET", "/v2/models/tiny/ready").json() == {"name": "tiny", "ready": True}
    missing = call(port, "GET", "/v2/models/nope/versions/3/ready")
    assert (missing.status, missing.json()) == (503, {"name": "nope", "ready": False})


def test_metadata_and_config_match_grpc(client: th.InferenceServerClient, server: BackgroundServer) -> None:
    grpc_client = tg.InferenceServerClient(server.address)
    try:
        for model in ("tiny", "mlp", "digits"):
            rest_meta = client.get_model_metadata(model)
            grpc_meta = grpc_client.get_model_metadata(model)
            assert (rest_meta["name"], rest_meta["versions"], rest_meta["platform"]) == (
                grpc_meta.name,
                list(grpc_meta.versions),
                grpc_meta.platform,
            )
            for kind in ("inputs", "outputs"):
                assert [(t["name"], t["datatype"], t["shape"]) for t in rest_meta[kind]] == [
                    (t.name, t.datatype, list(t.shape)) for t in getattr(grpc_meta, kind)
                ]
            config = client.get_model_config(model)
            assert config["name"] == model
            assert config["max_batch_size"] == grpc_client.get_model_config(model).config.max_batch_size
            assert all(isinstance(d, int) for t in config["input"] for d in t["dims"])
        server_meta = client.get_server_metadata()
        assert server_meta["name"] == "ferry"
        assert "binary_tensor_data" in server_meta["extensions"]
        assert client.get_model_metadata("digits", "1")["versions"] == ["1"]
    finally:
        grpc_client.close()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("model", ["tiny", "mlp"])
def test_infer_matches_onnxruntime(
    client: th.InferenceServerClient, example_repo: Path, model: str, binary: bool
) -> None:
    width = 16 if model == "tiny" else 256
    x = rows(3, width, seed=7)
    outputs = [th.InferRequestedOutput("output", binary_data=binary)]
    result = client.infer(model, [http_input(x, binary)], outputs=outputs, request_id=f"{model}-{binary}")
    np.testing.assert_allclose(result.as_numpy("output"), reference(example_repo, model, x), rtol=1e-5, atol=1e-5)
    response = result.get_response()
    assert response["id"] == f"{model}-{binary}"
    assert response["model_version"] == "1"
    assert ("parameters" in response["outputs"][0]) is binary


def test_async_infer(client: th.InferenceServerClient, example_repo: Path) -> None:
    xs = [rows(1, 16, seed=s) for s in range(8)]
    pending = [client.async_infer("tiny", [http_input(x, True)]) for x in xs]
    for x, handle in zip(xs, pending, strict=True):
        np.testing.assert_allclose(handle.get_result(timeout=60).as_numpy("output"), reference(example_repo, "tiny", x),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip


def test_compressed_requests_and_answers_through_the_client(client: th.InferenceServerClient) -> None:
    x = rows(8, 256, seed=3)
    for algorithm in ("gzip", "deflate"):
        result = client.infer(
            "mlp",
            [http_input(x, binary=False)],
            outputs=[th.InferRequestedOutput("output", binary_data=False)],
            request_compression_algorithm=algorithm,
            response_compression_algorithm=algorithm,
        )
        assert result.as_numpy("output").shape == (8, 10)


def test_statistics_count_rest_requests(client: th.InferenceServerClient) -> None:
    def success() -> int:
        (stats,) = client.get_inference_statistics("tiny")["model_stats"]
        return int(stats["inference_stats"]["success"]["count"])

    before = success()
    for _ in range(3):
        client.infer("tiny", [http_input(rows(1, 16), True)])
    assert success() == before + 3
    everything = client.get_inference_statistics()["model_stats"]
    assert {(s["name"], s["version"]) for s in everything} >= {("tiny", "1"), ("digits", "1"), ("digits", "2")}
    assert [s["version"] for s in client.get_inference_statistics("digits", "2")["model_stats"]] == ["2"]


def test_repository_index_load_and_unload(client: th.InferenceServerClient) -> None:
    index = {(m["name"], m["version"]): m["state"] for m in client.get_model_repository_index()}
    assert index[("mlp", "1")] == "READY"
    client.unload_model("digits")
    try:
        assert not client.is_model_ready("digits")
        tensor = th.InferInput("input", [1, 64], "FP32")
        tensor.set_data_from_numpy(rows(1, 64))
        with pytest.raises(InferenceServerException) as err:
            client.infer("digits", [tensor])
        assert "digits" in str(err.value)
    finally:
        client.load_model("digits")
    assert client.is_model_ready("digits")
    client.load_model("digits", config='{"name": "digits", "max_batch_size": 4}')  # Triton's config override
    try:
        assert client.get_model_config("digits")["max_batch_size"] == 4
    finally:
        client.load_model("digits")
    assert client.get_model_config("digits")["max_batch_size"] != 4


def test_trace_settings(client: th.InferenceServerClient) -> None:
    before = client.get_trace_settings()
    assert before["trace_level"] == ["OFF"]
    try:
        assert client.update_trace_settings(settings={"trace_rate": "7"})["trace_rate"] == "7"
        assert client.get_trace_settings(model_name="tiny")["trace_rate"] == "7"
        assert client.update_trace_settings("tiny", {"trace_rate": "3"})["trace_rate"] == "3"
        assert client.get_trace_settings()["trace_rate"] == "7"
        assert client.update_trace_settings("tiny", {"trace_rate": None})["trace_rate"] == "7"  # back to global
    finally:
        client.update_trace_settings(settings={"trace_rate": before["trace_rate"]})
    with pytest.raises(InferenceServerException, match="nope"):
        client.get_trace_settings(model_name="nope")


def test_outcomes_extension(port: int) -> None:
    answer = post_json(port, "/v2/outcomes", {"outcomes": [{"request_id": "r", "model_name": "digits", "label": 3}]})
    assert answer.status == 200, answer.body
    assert answer.json() == {"matched": 0, "unmatched": 1, "unmatched_index": [0]}
    bad = post_json(port, "/v2/outcomes", {"outcomes": [{"request_id": "r", "model_name": "digits"}]})
    assert bad.status == 400
    typo = post_json(port, "/v2/outcomes", {"outcomes": [{"request": "r"}]})
    assert (typo.status, "request" in typo.error) == (400, True)


# -- raw HTTP: every status


def test_not_found_and_method_not_allowed(port: int) -> None:
    missing = call(port, "GET", "/v2/nothing/here")
    assert (missing.status, missing.error) == (404, "no endpoint /v2/nothing/here")
    model = post_json(port, infer_path("nope"), {"inputs": []})
    assert (model.status, model.error) == (404, "unknown model 'nope'")
    version = call(port, "GET", "/v2/models/tiny/versions/7")
    assert version.status == 404 and "model 'tiny' has no version 7" in version.error
    wrong = call(port, "DELETE", "/v2/models/tiny")
    assert wrong.status == 405
    assert wrong.headers["allow"] == "GET"
    assert wrong.error == "DELETE is not allowed on /v2/models/tiny; allowed: GET"
    assert call(port, "GET", infer_path("tiny")).status == 405


def test_content_type_and_encoding_not_read_are_415(port: int) -> None:
    body = json.dumps({"inputs": []}).encode()
    xml = call(port, "POST", infer_path("tiny"), body, {"Content-Type": "application/xml"})
    assert (xml.status, xml.error) == (415, "content type 'application/xml' is not read here; send application/json")
    packed = call(
        port, "POST", infer_path("tiny"), body, {"Content-Type": "application/json", "Content-Encoding": "xz"}
    )
    assert packed.status == 415 and "'xz'" in packed.error
    # what curl -d and fetch() send unasked is read as JSON
    for kind in ("application/x-www-form-urlencoded", "text/plain;charset=UTF-8", ""):
        assert call(port, "POST", infer_path("tiny"), _tiny_body(), {"Content-Type": kind}).status == 200, kind


def _tiny_body(n: int = 1) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [n, 16], "data": [0.5] * 16 * n}]}
                      ).encode()  # fmt: skip


def test_a_body_over_the_limit_is_refused_before_it_is_read(port: int, server: BackgroundServer) -> None:
    """413 as soon as the headers arrive: the client never sends the gigabyte it announced."""
    limit = server.config.max_message_bytes
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = (
            f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {limit + 1}\r\n\r\n"
        )
        sock.sendall(head.encode() + b'{"inputs": [')
        reply = _read_reply(sock)
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    assert f'"the body is {limit + 1} bytes; the limit is {limit}"'.encode() in reply


def _read_reply(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head + b"\r\n\r\n" + rest


def test_deadlines_are_504(port: int) -> None:
    headers = {"Content-Type": "application/json", "Ferry-Timeout": "1n"}
    late = call(port, "POST", infer_path("mlp"), _mlp_body(), headers)
    assert late.status == 504, late.body
    assert "deadline" in late.error
    param = json.loads(_mlp_body())
    param["parameters"] = {"timeout": 1}  # µs, Triton's parameter
    assert post_json(port, infer_path("mlp"), param).status == 504
    roomy = call(port, "POST", infer_path("mlp"), _mlp_body(), {**headers, "Ferry-Timeout": "30S"})
    assert roomy.status == 200
    assert call(port, "POST", infer_path("mlp"), _mlp_body(), {"grpc-timeout": "20S"}).status == 200
    bad = call(port, "POST", infer_path("mlp"), _mlp_body(), {"Ferry-Timeout": "soon"})
    assert bad.status == 400
    assert bad.error.startswith("Ferry-Timeout must be up to 8 digits and a unit")


def _mlp_body(n: int = 1) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [n, 256], "data": [0.1] * 256 * n}]}
                      ).encode()  # fmt: skip


def test_gzip_and_deflate_both_ways(port: int) -> None:
    plain = call(port, "POST", infer_path("mlp"), _mlp_body(8), {"Content-Type": "application/json"})
    assert plain.status == 200 and "content-encoding" not in plain.headers
    expected = plain.json()
    packers = {"gzip": gzip.compress, "deflate": zlib.compress}
    unpackers = {"gzip": gzip.decompress, "deflate": zlib.decompress}
    for encoding, pack in packers.items():
        headers = {"Content-Type": "application/json", "Content-Encoding": encoding, "Accept-Encoding": encoding}
        answer = call(port, "POST", infer_path("mlp"), pack(_mlp_body(8)), headers)
        assert answer.status == 200, answer.body
        assert answer.headers["content-encoding"] == encoding
        assert json.loads(unpackers[encoding](answer.body)) == expected
    refused = call(port, "POST", infer_path("mlp"), _mlp_body(8), {"Accept-Encoding": "gzip;q=0, br"})
    assert "content-encoding" not in refused.headers
    broken = call(port, "POST", infer_path("mlp"), b"\x1f\x8bnot gzip", {"Content-Encoding": "gzip"})
    assert 400 <= broken.status < 500


def test_a_decompression_bomb_is_413(port: int, server: BackgroundServer) -> None:
    bomb = gzip.compress(b" " * (server.config.max_message_bytes + 1024 * 1024), compresslevel=9)
    assert len(bomb) < 1024 * 1024
    answer = call(port, "POST", infer_path("mlp"), bomb, {"Content-Encoding": "gzip"}, timeout_s=120)
    assert answer.status == 413, answer.body
    assert "over the limit" in answer.error
    assert call(port, "GET", "/v2/health/ready").status == 200


def test_the_openapi_document_is_served(port: int) -> None:
    answer = call(port, "GET", "/v2/openapi.yaml")
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("application/yaml")
    assert answer.body.startswith(b"openapi: 3.")


# -- perf_analyzer -i http


@pytest.mark.perf_analyzer
@pytest.mark.parametrize("model", ["tiny", "mlp"])
def test_perf_analyzer_over_http(port: int, model: str) -> None:
    usable, why = pa.usable()
    if not usable:
        if os.environ.get("CI") == "true":
            pytest.fail(f"perf_analyzer must run in CI: {why}")
        pytest.skip(why)
    binary = pa.binary()
    assert binary is not None
    cmd = [
        str(binary), "-m", model, "-i", "http", "-u", f"127.0.0.1:{port}", "--concurrency-range", "1:2",
        "--measurement-interval", "500", "--max-trials", "3", "--stability-percentage", "1000",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=pa.environment(), timeout=120)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert "Successful request count" in proc.stdout


# -- the other transport: REST is the same whichever server carries gRPC


def test_rest_under_the_grpcio_transport(example_repo: Path) -> None:
    with background_server(
        example_repo, transport="grpcio", model_control_mode="explicit", load_models=("*",)
    ) as running:
        port = running.server.http_port
        assert port is not None
        c = th.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            assert c.is_server_ready() and c.is_model_ready("tiny")
            assert c.get_model_metadata("mlp")["inputs"][0]["shape"] == [-1, 256]
            x = rows(2, 16)
            for binary in (True, False):
                result = c.infer("tiny", [http_input(x, binary)])
                np.testing.assert_allclose(
                    result.as_numpy("output"), reference(example_repo, "tiny", x), rtol=1e-5, atol=1e-5
                )
            assert c.get_inference_statistics("tiny")["model_stats"][0]["inference_stats"]["success"]["count"] == 2
        finally:
            c.close()
            del c
            gc.collect()  # on this thread (see the client fixture)
        assert post_json(port, infer_path("nope"), {"inputs": []}).status == 404
        assert call(port, "POST", infer_path("mlp"), _mlp_body(), {"Ferry-Timeout": "1n"}).status == 504


@pytest.mark.parametrize("name", ["..", ".", "..%2F..%2Ftmp", "%2Ftmp", "mlp%2F..%2Ftiny", ".hidden"])
def test_load_takes_only_a_directory_name_of_the_repository(port: int, name: str) -> None:
    """A model name that would reach outside the repository (or a hidden directory) is refused as malformed."""
    answer = call(port, "POST", f"/v2/repository/models/{name}/load")
    assert answer.status == 400, answer.body
    assert "must be a directory name" in answer.error
    index = call(port, "POST", "/v2/repository/index").json()
    assert {m["name"] for m in index} == {"digits", "imgcls", "mlp", "tiny"}


@pytest.mark.parametrize(
    ("method", "path", "feature"),
    [
        ("GET", "/v2/systemsharedmemory/status", "system shared memory"),
        ("POST", "/v2/systemsharedmemory/region/r0/register", "system shared memory"),
        ("POST", "/v2/cudasharedmemory/region/r0/unregister", "CUDA shared memory"),
        ("GET", "/v2/logging", "log settings"),
    ],
)
def test_extensions_ferry_lacks_are_501_as_on_grpc(port: int, method: str, path: str, feature: str) -> None:
    answer = call(port, method, path)
    assert (answer.status, answer.error) == (501, f"Ferry does not implement {feature}")


def test_tritonclient_sees_the_same_refusal(client: th.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException, match="Ferry does not implement system shared memory"):
        client.get_system_shared_memory_status()
