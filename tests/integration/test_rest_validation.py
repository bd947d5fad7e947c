"""REST twins of the gRPC validation suite (tests/integration/test_validation.py): each bad request, sent over
HTTP, gets the HTTP status of its gRPC status and the same message (or, where REST spells the request
differently, a message in REST's terms); and JSON bodies: every datatype both ways, and their own mistakes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ferry.server.api.rest_context import HTTP_STATUS
from tests.integration.test_validation import CASES, ONES
from tests.models import IDENTITY_DATATYPES
from tests.resthttp import Answer, call, infer_path, post_json, rest_body
from tests.serving import BackgroundServer, background_server

REST_MESSAGES = {
    # The binary extension names each input's bytes, so a count of raw contents cannot differ from the inputs:
    # the request that had one too few reaches REST as an input without data.
    "raw contents count not matching inputs": r"input 'b': no data \(neither 'data' nor the binary_data_size",
    "input without data": r"input 'b': no data \(neither 'data' nor the binary_data_size parameter\)",
    "raw and typed contents mixed": r"input 'a': give 'data' or the binary_data_size parameter, not both",
    "typed values of the wrong count": r"input 'x': data holds 1 values, expected 6 for shape \[2, 3\]",
}
"""Cases whose REST message differs from gRPC's, because REST spells the request differently."""


@pytest.fixture(scope="module")
def server(test_repo: Path) -> Iterator[BackgroundServer]:
    with background_server(test_repo) as running:
        yield running


@pytest.fixture(scope="module")
def port(server: BackgroundServer) -> int:
    assert server.server.http_port is not None
    return server.server.http_port


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_gets_the_twin_status_and_message(port: int, case: str) -> None:
    request, code, message = CASES[case]
    path, body, headers = rest_body(request)
    answer = call(port, "POST", path, body, headers)
    assert answer.status == HTTP_STATUS[code], (answer.status, answer.body)
    assert answer.headers["content-type"].startswith("application/json")
    assert re.search(REST_MESSAGES.get(case, message), answer.error), answer.error
    if answer.status == 503:
        assert answer.headers["retry-after"] == "1"


def test_the_status_table_is_googles_mapping() -> None:
    """Spot checks of the one table: client mistakes are 4xx, the server's own trouble 5xx, 500 only for bugs."""
    by_name = {code.name: status for code, status in HTTP_STATUS.items()}
    assert by_name["INVALID_ARGUMENT"] == 400
    assert by_name["NOT_FOUND"] == 404
    assert by_name["UNAVAILABLE"] == 503
    assert by_name["DEADLINE_EXCEEDED"] == 504
    assert by_name["UNAUTHENTICATED"] == 401
    assert by_name["PERMISSION_DENIED"] == 403
    assert by_name["UNIMPLEMENTED"] == 501
    assert [name for name, status in by_name.items() if status == 500] == ["UNKNOWN", "INTERNAL", "DATA_LOSS"]


def test_non_utf8_bytes_for_a_string_tensor(port: int) -> None:
    doc = {"inputs": []}
    parts = []
    for datatype in IDENTITY_DATATYPES:
        item = {"name": f"in_{datatype}", "datatype": datatype, "shape": [1, 3]}
        if datatype == "BYTES":
            raw = b"".join(b"\x01\x00\x00\x00\xff" for _ in range(3))
            item["parameters"] = {"binary_data_size": len(raw)}
            parts.append(raw)
        else:
            item["data"] = [False] * 3 if datatype == "BOOL" else [0] * 3
        doc["inputs"].append(item)
    header = json.dumps(doc).encode()
    answer = call(port, "POST", infer_path("identity"), header + b"".join(parts), _binary(header))
    assert answer.status == 400
    assert "input 'in_BYTES': BYTES element 0 is not UTF-8" in answer.error


def test_server_still_answers_after_every_bad_request(port: int) -> None:
    for request, _, _ in CASES.values():
        path, body, headers = rest_body(request)
        assert call(port, "POST", path, body, headers).status >= 400
    answer = post_json(port, infer_path("add"), _add_doc())
    assert answer.status == 200, answer.body
    assert answer.json()["outputs"][0]["data"] == [2.0] * 8


# -- JSON tensors


def _values(datatype: str) -> list[object]:
    return {
        "BOOL": [True, False, True],
        "FP16": [0.5, -1.25, 2.0],
        "FP32": [0.5, -1.25, 3e38],
        "FP64": [0.1, -1e300, 2.5],
        "BYTES": ["a", "héllo", ""],
    }.get(datatype, [0, 1, 100] if datatype.startswith("U") else [-1, 0, 100])


def _identity_doc(binary_output: bool = False) -> dict[str, object]:
    return {
        "id": "every-type",
        "inputs": [
            {"name": f"in_{dt}", "datatype": dt, "shape": [1, 3], "data": _values(dt)} for dt in IDENTITY_DATATYPES
        ],
        "parameters": {"binary_data_output": binary_output},
    }


def test_every_datatype_round_trips_as_json(port: int) -> None:
    answer = post_json(port, infer_path("identity"), _identity_doc())
    assert answer.status == 200, answer.body
    doc = answer.json()
    assert doc["id"] == "every-type"
    assert doc["model_name"] == "identity"
    outputs = {o["name"]: o for o in doc["outputs"]}
    for datatype in IDENTITY_DATATYPES:
        out = outputs[f"out_{datatype}"]
        assert out["datatype"] == datatype
        assert out["shape"] == [1, 3]
        if datatype in ("FP32", "FP16"):
            np.testing.assert_allclose(out["data"], _values(datatype), rtol=1e-6)
        else:
            assert out["data"] == _values(datatype), datatype


def test_every_datatype_comes_back_as_binary_when_asked(port: int) -> None:
    answer = post_json(port, infer_path("identity"), _identity_doc(binary_output=True))
    assert answer.status == 200, answer.body
    assert answer.headers["content-type"] == "application/octet-stream"
    length = int(answer.headers["inference-header-content-length"])
    doc = json.loads(answer.body[:length])
    offset = length
    from ferry.client.tensors import DATATYPES, from_raw

    for out in doc["outputs"]:
        size = out["parameters"]["binary_data_size"]
        array = from_raw(answer.body[offset : offset + size], DATATYPES[out["datatype"]], out["shape"], out["name"])
        offset += size
        expected = _values(out["datatype"])
        if out["datatype"] == "BYTES":
            assert [v.decode() for v in array.reshape(-1)] == expected
        else:
            np.testing.assert_allclose(array.reshape(-1).astype(np.float64), np.array(expected, np.float64), rtol=1e-3)
    assert offset == len(answer.body)


def test_nested_data_is_read_row_major(port: int) -> None:
    a = [[1, 2, 3, 4], [5, 6, 7, 8]]
    doc = _add_doc()
    doc["inputs"][0]["data"] = a  # type: ignore[index]
    answer = post_json(port, infer_path("add"), doc)
    assert answer.status == 200, answer.body
    sums = {o["name"]: o["data"] for o in answer.json()["outputs"]}["sum"]
    assert sums == [float(v + 1) for row in a for v in row]


def test_requested_outputs_with_per_output_binary(port: int) -> None:
    doc = _add_doc()
    doc["outputs"] = [{"name": "diff"}, {"name": "sum", "parameters": {"binary_data": True}}]
    answer = post_json(port, infer_path("add"), doc)
    assert answer.status == 200, answer.body
    length = int(answer.headers["inference-header-content-length"])
    header = json.loads(answer.body[:length])
    diff, total = header["outputs"]
    assert diff["name"] == "diff" and diff["data"] == [0.0] * 8 and "parameters" not in diff
    assert total["name"] == "sum" and total["parameters"] == {"binary_data_size": 32}
    assert np.frombuffer(answer.body[length:], np.float32).tolist() == [2.0] * 8


def _add_doc() -> dict[str, object]:
    data = ONES.reshape(-1).tolist()
    return {
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [2, 4], "data": data},
            {"name": "b", "datatype": "FP32", "shape": [2, 4], "data": data},
        ]
    }


def _binary(header: bytes) -> dict[str, str]:
    return {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}


def _with_a(**changes: object) -> dict[str, object]:
    doc = _add_doc()
    doc["inputs"][0].update(changes)  # type: ignore[index]
    return doc


JSON_CASES: dict[str, tuple[dict[str, object] | list[object], str]] = {
    "a body that is not an object": ([1, 2], "the inference request must be a JSON object, got a list"),
    "no inputs": ({"id": "x"}, "'inputs' must be a list of tensors, got null"),
    "an unknown field": ({**_add_doc(), "input": []}, r"unknown fields \['input'\]"),
    "a numeric id": ({**_add_doc(), "id": 7}, "'id' must be a string, got a number"),
    "another model_name than the path's": (
        {**_add_doc(), "model_name": "scale"},
        "model_name 'scale' in the body differs from 'add' in the path",
    ),
    "a model_version in the body only": (
        {**_add_doc(), "model_version": "1"},
        "model_version '1' in the body differs from '' in the path",
    ),
    "an input that is not an object": ({"inputs": [3]}, r"inputs\[0\] must be a JSON object, got a number"),
    "an input without a name": ({"inputs": [{"datatype": "FP32"}]}, r"inputs\[0\]: 'name' must be a string"),
    "a shape of strings": (_with_a(shape=["2", "4"]), r"input 'a': 'shape' must be a list of integers"),
    "a shape past int64": (_with_a(shape=[2**63, 4]), r"input 'a': 'shape' must be a list of integers"),
    "strings for FP32": (_with_a(data=["x"] * 8), "input 'a': FP32 data must be numbers"),
    "ragged nesting": (_with_a(data=[[1, 2, 3, 4], [5, 6]]), "input 'a': data is not a regular array"),
    "too few values": (_with_a(data=[1.0] * 7), r"input 'a': data holds 7 values, expected 8 for shape \[2, 4\]"),
    "an unknown datatype": (_with_a(datatype="FP8"), "input 'a': unknown datatype 'FP8'"),
    "the wrong datatype": (_with_a(datatype="INT32", data=[1] * 8), r"input 'a': expected datatype FP32"),
    "floats for INT32": (
        {"inputs": [{"name": "in_INT32", "datatype": "INT32", "shape": [1, 3], "data": [1.5, 2, 3]}]},
        "input 'in_INT32': INT32 data must be integers",
    ),
    "a value past UINT8": (
        {"inputs": [{"name": "in_UINT8", "datatype": "UINT8", "shape": [1, 3], "data": [1, 2, 300]}]},
        r"input 'in_UINT8': values 1..300 do not fit UINT8 \(0..255\)",
    ),
    "numbers for BOOL": (
        {"inputs": [{"name": "in_BOOL", "datatype": "BOOL", "shape": [1, 3], "data": [1, 0, 1]}]},
        "input 'in_BOOL': BOOL data must be true/false",
    ),
    "numbers for BYTES": (
        {"inputs": [{"name": "in_BYTES", "datatype": "BYTES", "shape": [1, 3], "data": [1, 2, 3]}]},
        "input 'in_BYTES': BYTES data must be strings, got a number",
    ),
    "a parameter that is a list": ({**_add_doc(), "parameters": {"p": [1]}}, "request parameter 'p' must be a bool"),
    "binary_data_output not a bool": (
        {**_add_doc(), "parameters": {"binary_data_output": 1}},
        "parameter 'binary_data_output' must be true or false, got 1",
    ),
    "outputs not a list": ({**_add_doc(), "outputs": {"name": "sum"}}, "'outputs' must be a list"),
    "an output without a name": ({**_add_doc(), "outputs": [{}]}, r"outputs\[0\]: 'name' must be a string"),
    "binary_data not a bool": (
        {**_add_doc(), "outputs": [{"name": "sum", "parameters": {"binary_data": "yes"}}]},
        "output 'sum' parameter 'binary_data' must be true or false",
    ),
    "a timeout that is a string": (
        {**_add_doc(), "parameters": {"timeout": "soon"}},
        "request parameter 'timeout' must be an int64 or uint64, got string_param",
    ),
    "binary data promised but absent": (
        _with_a(data=None, parameters={"binary_data_size": 32}),
        r"input 'a': binary_data_size 32 runs past the end of the body \(0 bytes left\)",
    ),
}
"""Mistakes only a JSON body can make (each a 400, with its message); the model is ``add`` or ``identity``."""


@pytest.mark.parametrize("case", list(JSON_CASES))
def test_json_mistakes_get_400_and_a_precise_message(port: int, case: str) -> None:
    doc, message = JSON_CASES[case]
    model = "identity" if isinstance(doc, dict) and "in_" in json.dumps(doc) else "add"
    answer = post_json(port, infer_path(model), doc)
    assert answer.status == 400, answer.body
    assert re.search(message, answer.error), answer.error


@pytest.mark.parametrize(
    ("body", "header", "message"),
    [
        (b'{"inputs": []}xyz', "abc", "Inference-Header-Content-Length must be an integer, got 'abc'"),
        (b'{"inputs": []}', "99", "Inference-Header-Content-Length 99 is outside the body's 14 bytes"),
        (b'{"inputs": []}xyz', "14", "the body has 3 bytes after the JSON and the binary data its inputs declare"),
        (b'{"inputs": [', "12", "the inference request is not valid JSON"),
    ],
)
def test_binary_framing_mistakes(port: int, body: bytes, header: str, message: str) -> None:
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": header}
    answer = call(port, "POST", infer_path("add"), body, headers)
    assert answer.status == 400, answer.body
    assert message in answer.error, answer.error


def test_binary_input_past_its_size(port: int) -> None:
    header = json.dumps(
        {"inputs": [{"name": "a", "datatype": "FP32", "shape": [2, 4], "parameters": {"binary_data_size": -1}}]}
    ).encode()
    answer = call(port, "POST", infer_path("add"), header, _binary(header))
    assert answer.status == 400
    assert "binary_data_size must be a non-negative integer, got -1" in answer.error


def test_answers_are_json_errors_never_500(port: int) -> None:
    """A sweep of odd bodies: every one answered with a 4xx JSON error."""
    odd: list[bytes] = [b"", b"null", b"[]", b'"s"', b"{}", b'{"inputs": null}', b'{"inputs": [null]}', b"\xff\xfe"]
    odd += [json.dumps({"inputs": [{"name": "a", "datatype": "FP32", "shape": [2, 4], "data": v}]}).encode() for v in
            (None, {}, [[[]]], [None] * 8, [True] * 8, [1e400] * 8)]  # fmt: skip
    for body in odd:
        answer: Answer = call(port, "POST", infer_path("add"), body, {"Content-Type": "application/json"})
        assert 400 <= answer.status < 500, (body, answer.status, answer.body)
        assert answer.error
