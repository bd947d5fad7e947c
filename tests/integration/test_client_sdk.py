"""The client SDK against a real Ferry server serving the example repository (mlp, tiny, digits v1 + v2).

Answers are checked against onnxruntime running the same files in this process."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from ferry.client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    FailedPrecondition,
    FerryError,
    InferRequest,
    InvalidArgument,
    NotFound,
    Outcome,
    OutcomeReport,
)
from ferry.client._proto import model_config_pb2
from tests.serving import running_server

Reference = Callable[[str, int, np.ndarray], list[np.ndarray]]


@pytest.fixture(scope="module")
def address(example_repo: Path) -> Iterator[str]:
    with running_server(example_repo) as address:
        yield address


@pytest.fixture(scope="module")
def client(address: str) -> Iterator[Client]:
    with Client(address, timeout_s=60) as c:
        yield c


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


@pytest.fixture(scope="module")
def digits_x(example_repo: Path) -> np.ndarray:
    with np.load(example_repo / "digits" / "heldout.npz") as data:
        return np.ascontiguousarray(data["X"][:32], dtype=np.float32)


def _rows(seed: int, n: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, width), dtype=np.float32)


def test_readiness(client: Client) -> None:
    assert client.server_live()
    assert client.server_ready()
    for model, version in (("mlp", None), ("tiny", None), ("digits", 1), ("digits", "2")):
        assert client.model_ready(model, version), (model, version)


def test_server_and_model_metadata(client: Client) -> None:
    server = client.server_metadata()
    assert server.name and server.version
    mlp = client.model_metadata("mlp")
    assert mlp.name == "mlp"
    assert [(t.name, t.datatype, list(t.shape)) for t in mlp.inputs] == [("input", "FP32", [-1, 256])]
    assert [(t.name, t.datatype, list(t.shape)) for t in mlp.outputs] == [("output", "FP32", [-1, 10])]
    digits = client.model_metadata("digits", 1)
    assert list(digits.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in digits.outputs] == [
        ("label", "INT64", [-1]),
        ("probabilities", "FP32", [-1, 10]),
    ]


def test_model_config(client: Client) -> None:
    config = client.model_config("mlp")
    assert isinstance(config, model_config_pb2.ModelConfig)
    assert config.name == "mlp"
    assert config.max_batch_size > 0
    assert [(i.name, list(i.dims)) for i in config.input] == [("input", [256])]
    assert config.input[0].data_type == model_config_pb2.TYPE_FP32
    assert [(o.name, list(o.dims)) for o in config.output] == [("output", [10])]


def test_infer_mlp_matches_onnxruntime(client: Client, reference: Reference) -> None:
    x = _rows(0, 8, 256)
    result = client.infer_result("mlp", {"input": x}, request_id="mlp-1")
    assert (result.model_name, result.model_version, result.id) == ("mlp", "1", "mlp-1")
    assert list(result.outputs) == ["output"]
    np.testing.assert_allclose(result.outputs["output"], reference("mlp", 1, x)[0], rtol=1e-5, atol=1e-6)


def test_explicit_versions_of_digits_differ(client: Client, reference: Reference, digits_x: np.ndarray) -> None:
    by_version = {}
    for version in (1, 2):
        result = client.infer_result("digits", {"input": digits_x}, version=version)
        assert result.model_version == str(version)
        label, probabilities = reference("digits", version, digits_x)
        np.testing.assert_array_equal(result.outputs["label"], label)
        np.testing.assert_allclose(result.outputs["probabilities"], probabilities, rtol=1e-5, atol=1e-6)
        by_version[version] = result.outputs["probabilities"]
    assert not np.allclose(by_version[1], by_version[2])
    assert client.infer_result("digits", {"input": digits_x}).model_version == "2"  # highest by default


def test_requested_output_subset(client: Client, reference: Reference, digits_x: np.ndarray) -> None:
    outputs = client.infer("digits", {"input": digits_x}, version=1, outputs=["label"])
    assert list(outputs) == ["label"]
    np.testing.assert_array_equal(outputs["label"], reference("digits", 1, digits_x)[0])


def test_unknown_model_raises_not_found(client: Client) -> None:
    with pytest.raises(NotFound) as caught:
        client.infer("no_such_model", {"input": _rows(0, 1, 16)})
    assert "no_such_model" in caught.value.message


def test_wrong_shape_raises_invalid_argument(client: Client) -> None:
    with pytest.raises(InvalidArgument) as caught:
        client.infer("mlp", {"input": _rows(0, 2, 255)})
    assert "input" in caught.value.message


def test_tiny_timeout_raises_deadline_exceeded(client: Client) -> None:
    with pytest.raises(DeadlineExceeded):
        client.infer("mlp", {"input": _rows(0, 64, 256)}, timeout=1e-6)
    assert client.server_live()


def _stream_requests(count: int, bad: int) -> list[InferRequest]:
    return [
        InferRequest("tiny", {"input": _rows(i, 1, 15 if i == bad else 16)}, request_id=f"s{i}") for i in range(count)
    ]


def _check_stream(items: list[Any], requests: list[InferRequest], bad: int, reference: Reference) -> None:
    assert len(items) == len(requests)
    for i, (item, request) in enumerate(zip(items, requests, strict=True)):
        if i == bad:
            assert isinstance(item, InvalidArgument), item
        else:
            assert not isinstance(item, FerryError), item
            assert item.id == request.request_id
            expected = reference("tiny", 1, np.asarray(request.inputs["input"]))[0]
            np.testing.assert_allclose(item.outputs["output"], expected, rtol=1e-5, atol=1e-6)


def test_sync_stream_with_one_bad_request(client: Client, reference: Reference) -> None:
    requests = _stream_requests(50, bad=25)
    _check_stream(list(client.stream_infer(requests)), requests, 25, reference)
    again = _stream_requests(3, bad=-1)
    _check_stream(list(client.stream_infer(iter(again))), again, -1, reference)
    assert client.server_live()


def test_async_client(address: str, reference: Reference) -> None:
    async def source(requests: list[InferRequest]) -> AsyncIterator[InferRequest]:
        for request in requests:
            yield request

    async def main() -> None:
        async with AsyncClient(address, timeout_s=60) as c:
            assert await c.server_ready()
            assert await c.model_ready("tiny")
            xs = [_rows(i, 2, 16) for i in range(16)]
            results = await asyncio.gather(*(c.infer_result("tiny", {"input": x}) for x in xs))
            for x, result in zip(xs, results, strict=True):
                assert result.model_version == "1"
                np.testing.assert_allclose(result.outputs["output"], reference("tiny", 1, x)[0], rtol=1e-5, atol=1e-6)
            requests = _stream_requests(50, bad=25)
            items = [item async for item in c.stream_infer(source(requests))]
            _check_stream(items, requests, 25, reference)
            with pytest.raises(NotFound):
                await c.infer("no_such_model", {"input": xs[0]})
            with pytest.raises(InvalidArgument):
                await c.infer("tiny", {"input": _rows(0, 1, 17)})
            with pytest.raises(DeadlineExceeded):
                await c.infer("mlp", {"input": _rows(0, 64, 256)}, timeout=1e-6)
            assert (await c.model_config("tiny")).name == "tiny"
            assert "tiny" in {m.name for m in await c.repository_index()}

    asyncio.run(main())


def test_trace_settings_read_and_change(client: Client) -> None:
    """This server has no trace exporter: its level reads OFF and cannot be raised, but the rate and count can be
    set, globally and for one model, and a model's settings dropped again."""
    settings = client.trace_settings()
    assert settings["trace_level"] == ["OFF"] and settings["trace_mode"] == ["opentelemetry"]
    assert client.trace_settings({"trace_rate": "50"})["trace_rate"] == ["50"]
    assert client.trace_settings({"trace_count": ["7"]}, model="tiny")["trace_count"] == ["7"]
    assert client.trace_settings(model="tiny")["trace_rate"] == ["50"]  # the global rate shows through
    assert client.trace_settings({"trace_count": None}, model="tiny")["trace_count"] == ["-1"]
    with pytest.raises(FailedPrecondition):
        client.trace_settings({"trace_level": "TIMESTAMPS"})
    with pytest.raises(InvalidArgument):
        client.trace_settings({"trace_rate": "often"})
    with pytest.raises(NotFound):
        client.trace_settings(model="no_such_model")
    client.trace_settings({"trace_rate": None})


def test_report_outcomes_joins_the_truth_by_request_id(client: Client, digits_x: np.ndarray) -> None:
    """The example digits names ``label`` as its outcome_output: requests sent with an id are remembered, and a
    report by that id (a mapping for row 0, ``Outcome`` for other rows) is matched once; unknown ids and rows
    already reported come back unmatched; a malformed outcome fails the call."""
    labels = client.infer("digits", {"input": digits_x[:2]}, request_id="sdk-outcome-1")["label"]
    report = client.report_outcomes("digits", {"sdk-outcome-1": int(labels[0])})
    assert report == OutcomeReport(matched=1, unmatched=0, unmatched_index=())
    again = client.report_outcomes(
        "digits",
        [Outcome("sdk-outcome-1", int(labels[1]), row=1), Outcome("sdk-outcome-1", 3), Outcome("no-such-id", 3)],
    )
    assert again == OutcomeReport(matched=1, unmatched=2, unmatched_index=(1, 2))
    with pytest.raises(InvalidArgument, match="request_id is empty"):
        client.report_outcomes("digits", {"": 3})


def test_async_report_outcomes(address: str, digits_x: np.ndarray) -> None:
    async def main() -> OutcomeReport:
        async with AsyncClient(address, timeout_s=60) as c:
            await c.infer("digits", {"input": digits_x[:1]}, request_id="sdk-outcome-async")
            return await c.report_outcomes("digits", {"sdk-outcome-async": 0, "sdk-outcome-never-sent": 1})

    assert asyncio.run(main()) == OutcomeReport(matched=1, unmatched=1, unmatched_index=(1,))


def test_stream_infer_refuses_what_is_not_an_infer_request(client: Client) -> None:
    with pytest.raises(TypeError, match="InferRequest"):
        list(client.stream_infer([("tiny", {"input": _rows(0, 1, 16)})]))  # type: ignore[list-item]
    assert client.server_live()


def test_statistics_has_an_entry_for_the_model(client: Client) -> None:
    client.infer("tiny", {"input": _rows(0, 1, 16)})
    stats = client.statistics("tiny")
    assert [(s.name, s.version) for s in stats] == [("tiny", "1")]
    assert stats[0].inference_stats.success.count >= 1
    assert "tiny" in {s.name for s in client.statistics()}


def test_repository_index_lists_the_models(client: Client) -> None:
    index = client.repository_index(ready=True)
    assert {m.name for m in index} >= {"mlp", "tiny", "digits"}
    assert all(m.state == "READY" for m in index)


def test_multiplexed_infer_over_one_stream(address: str, example_repo: Path) -> None:
    """``multiplex=True``: concurrent infer calls share one ModelStreamInfer stream, each with its own answer,
    errors and deadline."""
    session = ort.InferenceSession(str(example_repo / "mlp" / "1" / "model.onnx"))
    rng = np.random.default_rng(11)
    inputs = [rng.standard_normal((1 + i % 3, 256)).astype(np.float32) for i in range(200)]

    async def run() -> None:
        async with AsyncClient(address, multiplex=True, timeout_s=30) as client:
            results = await asyncio.gather(
                *(client.infer_result("mlp", {"input": x}, request_id=f"c{i}") for i, x in enumerate(inputs))
            )
            for i, (x, result) in enumerate(zip(inputs, results, strict=True)):
                assert result.id == f"c{i}" and result.model_version == "1"
                np.testing.assert_allclose(result.outputs["output"], session.run(None, {"input": x})[0], rtol=1e-5)
            before = await client.statistics("mlp")
            with pytest.raises(InvalidArgument, match="expected shape"):
                await client.infer("mlp", {"input": np.ones((1, 3), np.float32)})
            with pytest.raises(NotFound):
                await client.infer("nope", {"input": inputs[0]})
            assert (await client.infer("mlp", {"input": inputs[0]}))["output"].shape == (1, 10)
            after = await client.statistics("mlp")
            assert after[0].inference_stats.success.count == before[0].inference_stats.success.count + 1

    asyncio.run(run())
