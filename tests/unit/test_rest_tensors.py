"""The REST inference body → ModelInferRequest translation writes protobuf's wire format by hand: the message it
makes must be the one protobuf's own setters make from the same body, for every field and value it can carry."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from hypothesis import given
from hypothesis import strategies as st

from ferry.client._proto import grpc_service_pb2 as pb
from ferry.server.api.rest_tensors import infer_request, set_parameters

INT64 = st.integers(-(2**63), 2**63 - 1)
TEXT = st.text(max_size=12)
PARAMS = st.dictionaries(
    st.text(min_size=1, max_size=6).filter(
        lambda k: k not in ("binary_data_size", "binary_data", "binary_data_output")
    ),
    st.one_of(
        st.booleans(), INT64, st.integers(2**63, 2**64 - 1), st.floats(allow_nan=False, allow_infinity=False), TEXT
    ),
    max_size=3,
)


def reference(model: str, version: str, doc: dict[str, Any], raws: list[bytes]) -> pb.ModelInferRequest:
    """The message built field by field with protobuf's setters."""
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=doc.get("id", ""))
    set_parameters(request.parameters, doc.get("parameters", {}), "request parameter")
    for item in doc["inputs"]:
        tensor = request.inputs.add(name=item["name"], datatype=item["datatype"], shape=item["shape"])
        params = {k: v for k, v in item.get("parameters", {}).items() if k != "binary_data_size"}
        set_parameters(tensor.parameters, params, "input parameter")
    for item in doc.get("outputs", []):
        out = request.outputs.add(name=item["name"])
        set_parameters(out.parameters, item.get("parameters", {}), "output parameter")
    request.raw_input_contents.extend(raws)
    return request


@given(
    model=st.text(min_size=1, max_size=8),
    version=st.sampled_from(["", "1", "17", "production"]),
    request_id=TEXT,
    shapes=st.lists(st.lists(INT64, max_size=4), min_size=1, max_size=3),
    sizes=st.lists(st.integers(0, 40), min_size=3, max_size=3),
    params=PARAMS,
    input_params=PARAMS,
    outputs=st.lists(st.tuples(TEXT, PARAMS), max_size=2),
)
def test_the_wire_format_matches_protobufs_setters(
    model: str,
    version: str,
    request_id: str,
    shapes: list[list[int]],
    sizes: list[int],
    params: dict[str, Any],
    input_params: dict[str, Any],
    outputs: list[tuple[str, dict[str, Any]]],
) -> None:
    raws = [bytes(range(size)) for size in sizes[: len(shapes)]]
    inputs = [
        {
            "name": f"in{i}é",
            "datatype": "UINT8",
            "shape": shape,
            "parameters": {**input_params, "binary_data_size": len(raw)},
        }
        for i, (shape, raw) in enumerate(zip(shapes, raws, strict=True))
    ]
    doc: dict[str, Any] = {"id": request_id, "parameters": params, "inputs": inputs}
    if outputs:
        doc["outputs"] = [{"name": name, "parameters": p} for name, p in outputs]
    header = orjson.dumps(doc)
    request, _ = infer_request(model, version, header + b"".join(raws), str(len(header)))
    assert request == reference(model, version, doc, raws)


def test_json_data_and_binary_flags() -> None:
    doc = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4]]}],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}],
        "parameters": {"binary_data_output": False, "priority": 2},
    }
    request, outputs = infer_request("m", "", orjson.dumps(doc), None)
    assert request.raw_input_contents[0] == np.array([1, 2, 3, 4], np.float32).tobytes()
    assert list(request.inputs[0].shape) == [2, 2]
    assert [o.name for o in request.outputs] == ["y", "z"]
    assert request.parameters["priority"].int64_param == 2
    assert "binary_data_output" not in request.parameters
    assert outputs.is_binary("y") and not outputs.is_binary("z")
