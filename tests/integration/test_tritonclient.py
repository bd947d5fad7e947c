"""Triton's own Python client (``tritonclient.grpc`` 2.41) against a real Ferry server on the example repository.

What the client calls and reads is in PROTOCOL.md §2.1. Answers are checked against onnxruntime running the same
model files in this process.
"""

from __future__ import annotations

import functools
import queue
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from tests.serving import running_server

WAIT_S = 30
"""Upper bound on any wait for a callback; a healthy run answers in milliseconds."""

Reference = Callable[[str, int, np.ndarray], list[np.ndarray]]
Answer = tuple[tc.InferResult | None, InferenceServerException | None]


@pytest.fixture(scope="module")
def address(example_repo: Path) -> Iterator[str]:
    with running_server(example_repo) as address:
        yield address


@pytest.fixture(scope="module")
def client(address: str) -> Iterator[tc.InferenceServerClient]:
    c = tc.InferenceServerClient(address)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def reference(example_repo: Path) -> Reference:
    """onnxruntime on the same model file: ``reference(model, version, x)`` -> outputs in graph order."""

    @functools.cache
    def session(model: str, version: int) -> ort.InferenceSession:
        path = example_repo / model / str(version) / "model.onnx"
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(model: str, version: int, x: np.ndarray) -> list[np.ndarray]:
        return list(session(model, version).run(None, {"input": x}))

    return run


def _rows(seed: int, n: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, width), dtype=np.float32)


def _input(x: np.ndarray, datatype: str = "FP32", name: str = "input") -> tc.InferInput:
    tensor = tc.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return tensor


def _code(err: pytest.ExceptionInfo[InferenceServerException]) -> str | None:
    return err.value.status()


# --- health and metadata ---------------------------------------------------------------------------------------


def test_server_live_and_ready(client: tc.InferenceServerClient) -> None:
    assert client.is_server_live() is True
    assert client.is_server_ready() is True


def test_model_ready(client: tc.InferenceServerClient) -> None:
    assert client.is_model_ready("mlp")
    assert client.is_model_ready("tiny", "1")
    assert client.is_model_ready("digits", "1")
    assert client.is_model_ready("digits", "2")
    assert not client.is_model_ready("digits", "3")
    assert not client.is_model_ready("no-such-model")
    assert not client.is_model_ready("no-such-model", "1")


def test_server_metadata(client: tc.InferenceServerClient) -> None:
    meta = client.get_server_metadata()
    assert meta.name == "ferry"
    assert meta.version
    assert {"model_configuration", "model_repository", "statistics"} <= set(meta.extensions)
    as_json = client.get_server_metadata(as_json=True)
    assert as_json["name"] == "ferry"
    assert list(as_json["extensions"]) == list(meta.extensions)


def test_model_metadata(client: tc.InferenceServerClient) -> None:
    mlp = client.get_model_metadata("mlp")
    assert mlp.name == "mlp"
    assert list(mlp.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in mlp.inputs] == [("input", "FP32", [-1, 256])]
    assert [(t.name, t.datatype, list(t.shape)) for t in mlp.outputs] == [("output", "FP32", [-1, 10])]

    digits = client.get_model_metadata("digits")
    assert list(digits.versions) == ["1", "2"]
    assert [(t.name, t.datatype, list(t.shape)) for t in digits.inputs] == [("input", "FP32", [-1, 64])]
    assert [(t.name, t.datatype, list(t.shape)) for t in digits.outputs] == [
        ("label", "INT64", [-1]),
        ("probabilities", "FP32", [-1, 10]),
    ]
    assert list(client.get_model_metadata("digits", "1").versions) == ["1"]

    # as_json: int64 shapes arrive as strings (MessageToJson)
    as_json = client.get_model_metadata("tiny", as_json=True)
    assert as_json["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "16"]}]


def test_model_config(client: tc.InferenceServerClient) -> None:
    config = client.get_model_config("mlp").config
    assert config.name == "mlp"
    assert config.max_batch_size == 128
    assert [(t.name, list(t.dims)) for t in config.input] == [("input", [256])]  # batch dim excluded
    assert [(t.name, list(t.dims)) for t in config.output] == [("output", [10])]

    as_json = client.get_model_config("tiny", as_json=True)["config"]
    assert as_json["name"] == "tiny"
    assert as_json["max_batch_size"] == 128
    assert as_json["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": ["16"]}]
    assert as_json["output"] == [{"name": "output", "data_type": "TYPE_FP32", "dims": ["4"]}]


def test_model_config_completed_from_graph(client: tc.InferenceServerClient) -> None:
    """digits' config.pbtxt names no tensors: the server fills them in from the ONNX graph."""
    for version in ("", "1", "2"):
        config = client.get_model_config("digits", version).config
        assert config.name == "digits"
        assert config.max_batch_size == 64
        inputs = {t.name: (tc.model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in config.input}
        outputs = {t.name: (tc.model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in config.output}
        assert inputs == {"input": ("TYPE_FP32", [64])}
        # label is [-1] in the graph: only the batch dimension, so no dims are left once it is excluded
        assert outputs == {"label": ("TYPE_INT64", []), "probabilities": ("TYPE_FP32", [10])}


def test_model_repository_index(client: tc.InferenceServerClient) -> None:
    index = client.get_model_repository_index()
    entries = {(m.name, m.version, m.state) for m in index.models}
    assert {("mlp", "1", "READY"), ("tiny", "1", "READY"), ("digits", "1", "READY"), ("digits", "2", "READY")} <= (
        entries
    )
    as_json = client.get_model_repository_index(as_json=True)
    assert {m["name"] for m in as_json["models"]} >= {"mlp", "tiny", "digits"}


# --- inference -------------------------------------------------------------------------------------------------


def test_infer_matches_onnxruntime(client: tc.InferenceServerClient, reference: Reference) -> None:
    x = _rows(1, 3, 256)
    result = client.infer("mlp", [_input(x)])
    (expected,) = reference("mlp", 1, x)
    out = result.as_numpy("output")
    assert out.dtype == np.float32
    assert out.shape == (3, 10)
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    response = result.get_response()
    assert response.model_name == "mlp"
    assert response.model_version == "1"
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("output", "FP32", [3, 10])]


def test_infer_requested_output_only(client: tc.InferenceServerClient, reference: Reference) -> None:
    x = _rows(2, 4, 64)
    result = client.infer("digits", [_input(x)], outputs=[tc.InferRequestedOutput("probabilities")])
    assert [o.name for o in result.get_response().outputs] == ["probabilities"]
    assert result.as_numpy("label") is None
    _, probabilities = reference("digits", 2, x)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities, rtol=1e-5)


def test_infer_explicit_versions(client: tc.InferenceServerClient, reference: Reference) -> None:
    x = _rows(3, 5, 64)
    answers = {}
    for version in ("1", "2"):
        result = client.infer("digits", [_input(x)], model_version=version)
        assert result.get_response().model_version == version
        label, probabilities = reference("digits", int(version), x)
        np.testing.assert_array_equal(result.as_numpy("label"), label)
        np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities, rtol=1e-5)
        answers[version] = result.as_numpy("probabilities")
    assert not np.allclose(answers["1"], answers["2"]), "versions 1 and 2 should be different models"
    latest = client.infer("digits", [_input(x)])
    assert latest.get_response().model_version == "2"


def test_request_id_echoed(client: tc.InferenceServerClient) -> None:
    result = client.infer("tiny", [_input(_rows(4, 1, 16))], request_id="req-42")
    assert result.get_response().id == "req-42"
    # no id given: none comes back
    assert client.infer("tiny", [_input(_rows(4, 1, 16))]).get_response().id == ""


def test_async_infer(client: tc.InferenceServerClient, reference: Reference) -> None:
    answers: queue.Queue[Answer] = queue.Queue()
    x = _rows(5, 2, 256)
    client.async_infer(
        "mlp", [_input(x)], callback=lambda result, error: answers.put((result, error)), request_id="async-1"
    )
    result, error = answers.get(timeout=WAIT_S)
    assert error is None
    assert result is not None
    assert result.get_response().id == "async-1"
    np.testing.assert_allclose(result.as_numpy("output"), reference("mlp", 1, x)[0], rtol=1e-5)


def test_async_infer_error_reaches_callback(client: tc.InferenceServerClient) -> None:
    done = threading.Event()
    seen: list[Answer] = []

    def callback(result: tc.InferResult | None, error: InferenceServerException | None) -> None:
        seen.append((result, error))
        done.set()

    client.async_infer("no-such-model", [_input(_rows(6, 1, 16))], callback=callback)
    assert done.wait(WAIT_S), "callback was never called"
    ((result, error),) = seen
    assert result is None
    assert isinstance(error, InferenceServerException)
    assert error.status() == "StatusCode.NOT_FOUND"


def test_stream_with_one_bad_request(address: str, reference: Reference) -> None:
    """20 requests on one stream, the 10th with a wrong shape: 19 answers matched by id, one error."""
    answers: queue.Queue[Answer] = queue.Queue()
    inputs = {f"s{i}": _rows(100 + i, 1 + i % 3, 256) for i in range(20)}
    bad = "s9"
    stream_client = tc.InferenceServerClient(address)
    try:
        stream_client.start_stream(callback=lambda result, error: answers.put((result, error)))
        try:
            for request_id, x in inputs.items():
                tensor = _input(x[:, :128].copy()) if request_id == bad else _input(x)
                stream_client.async_stream_infer("mlp", [tensor], request_id=request_id)
            received = [answers.get(timeout=WAIT_S) for _ in inputs]
        finally:
            stream_client.stop_stream()
    finally:
        stream_client.close()
    assert answers.empty(), "more answers than requests"

    errors = [error for result, error in received if error is not None]
    results = {result.get_response().id: result for result, error in received if result is not None}
    assert len(errors) == 1
    assert "input 'input'" in str(errors[0]) and "[1, 128]" in str(errors[0])
    assert sorted(results) == sorted(set(inputs) - {bad})
    for request_id, result in results.items():
        np.testing.assert_allclose(result.as_numpy("output"), reference("mlp", 1, inputs[request_id])[0], rtol=1e-5)


def test_inference_statistics_grow(client: tc.InferenceServerClient) -> None:
    def stats() -> tc.service_pb2.ModelStatistics:
        (entry,) = client.get_inference_statistics("tiny", "1").model_stats
        assert (entry.name, entry.version) == ("tiny", "1")
        return entry

    before = stats()
    requests, rows = 4, 3
    for i in range(requests):
        client.infer("tiny", [_input(_rows(200 + i, rows, 16))])
    after = stats()
    assert after.inference_stats.success.count - before.inference_stats.success.count == requests
    assert after.inference_stats.queue.count - before.inference_stats.queue.count == requests
    assert after.inference_count - before.inference_count == requests * rows
    assert after.execution_count - before.execution_count == requests  # one at a time: nothing to batch
    assert after.inference_stats.success.ns > before.inference_stats.success.ns
    assert after.inference_stats.compute_infer.count - before.inference_stats.compute_infer.count == requests
    assert after.last_inference > 0

    everything = client.get_inference_statistics()
    assert {(s.name, s.version) for s in everything.model_stats} >= {
        ("mlp", "1"),
        ("tiny", "1"),
        ("digits", "1"),
        ("digits", "2"),
    }
    as_json = client.get_inference_statistics("digits", as_json=True)
    assert [s["version"] for s in as_json["model_stats"]] == ["1", "2"]


# --- errors ----------------------------------------------------------------------------------------------------


def test_unknown_model_is_not_found(client: tc.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as err:
        client.infer("no-such-model", [_input(_rows(7, 1, 16))])
    assert _code(err) == "StatusCode.NOT_FOUND"
    assert "no-such-model" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("no-such-model")
    assert _code(err) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as err:
        client.get_model_config("no-such-model")
    assert _code(err) == "StatusCode.NOT_FOUND"


def test_wrong_datatype_is_invalid_argument(client: tc.InferenceServerClient) -> None:
    x = np.arange(2 * 256, dtype=np.int32).reshape(2, 256)
    with pytest.raises(InferenceServerException) as err:
        client.infer("mlp", [_input(x, "INT32")])
    assert _code(err) == "StatusCode.INVALID_ARGUMENT"
    message = err.value.message()
    for part in ("mlp", "input", "FP32", "INT32"):
        assert part in message, (part, message)


def test_wrong_shape_and_unknown_output_are_invalid_argument(client: tc.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as err:
        client.infer("mlp", [_input(_rows(8, 2, 255))])
    assert _code(err) == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as err:
        client.infer("mlp", [_input(_rows(8, 2, 256))], outputs=[tc.InferRequestedOutput("nope")])
    assert _code(err) == "StatusCode.INVALID_ARGUMENT"


# --- repository control ----------------------------------------------------------------------------------------


def test_load_unload_round_trip(example_repo: Path, tmp_path: Path, reference: Reference) -> None:
    """On a private copy of ``tiny``: unload makes it unready and unknown to infer, load brings it back."""
    repo = tmp_path / "repo"
    shutil.copytree(example_repo / "tiny", repo / "tiny")
    x = _rows(9, 2, 16)
    (expected,) = reference("tiny", 1, x)
    with running_server(repo, model_control_mode="explicit", load_models=("tiny",)) as address:
        c = tc.InferenceServerClient(address)
        try:
            assert c.is_model_ready("tiny")
            c.unload_model("tiny")
            assert not c.is_model_ready("tiny")
            with pytest.raises(InferenceServerException) as err:
                c.infer("tiny", [_input(x)])
            assert _code(err) == "StatusCode.NOT_FOUND"
            index = c.get_model_repository_index()
            assert [(m.name, m.state) for m in index.models] == [("tiny", "UNAVAILABLE")]

            c.load_model("tiny")
            assert c.is_model_ready("tiny")
            assert c.is_model_ready("tiny", "1")
            np.testing.assert_allclose(c.infer("tiny", [_input(x)]).as_numpy("output"), expected, rtol=1e-5)

            with pytest.raises(InferenceServerException) as err:
                c.load_model("not-in-repo")
            assert _code(err) == "StatusCode.NOT_FOUND"
        finally:
            c.close()


def test_trace_settings_without_an_exporter(client: tc.InferenceServerClient) -> None:
    """This server runs without OTEL_TRACES_EXPORTER: the settings read OFF and cannot be turned on."""
    settings = client.get_trace_settings().settings
    assert list(settings["trace_level"].value) == ["OFF"] and list(settings["trace_mode"].value) == ["opentelemetry"]
    with pytest.raises(InferenceServerException) as refused:
        client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]})
    assert refused.value.status() == "StatusCode.FAILED_PRECONDITION" and "OTEL_TRACES_EXPORTER" in str(refused.value)
