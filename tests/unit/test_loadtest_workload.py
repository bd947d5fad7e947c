"""Prepared requests: valid messages, unique per request unless meant to repeat, from every input source."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from ferry.client._proto import grpc_service_pb2 as pb
from ferry.loadtest.generator import _id_field
from ferry.loadtest.workload import InputSpec, ModelSpec, RequestMaker, build, parse_rows

MLP = ModelSpec("mlp", "", 128, (InputSpec("input", "FP32", (256,)),))
TWO = ModelSpec("two", "2", 8, (InputSpec("a", "INT64", (3,)), InputSpec("b", "FP16", (2, 2))))
FIXED = ModelSpec("fixed", "", 0, (InputSpec("x", "FP32", (2, 3)),))


def parse(payload: bytes) -> pb.ModelInferRequest:
    return pb.ModelInferRequest.FromString(payload)


def first_input(request: pb.ModelInferRequest, dtype: str = "<f4") -> np.ndarray:
    shape = list(request.inputs[0].shape)
    return np.frombuffer(request.raw_input_contents[0], dtype=dtype).reshape(shape)


def test_random_requests_are_valid_and_unique_per_request() -> None:
    load = build(MLP, (1, 4), "random", seed=3)
    maker = RequestMaker(load, worker=2, nonce=99, seed=0)
    seen = set()
    for _ in range(3 * len(load.templates)):
        payload, rows = maker.next()
        request = parse(payload)
        assert request.model_name == "mlp" and request.inputs[0].datatype == "FP32"
        assert list(request.inputs[0].shape) == [rows, 256]
        array = first_input(request)
        assert array.flat[0] == 99 and array.flat[1] == 3  # nonce, worker + 1
        assert np.isfinite(array).all()
        seen.add(request.raw_input_contents[0])
    assert len(seen) == 3 * len(load.templates)  # every request distinct: a result cache misses
    assert {t.rows for t in load.templates} == {1, 4}


def test_duplicate_fraction_repeats_a_few_fixed_requests() -> None:
    load = build(MLP, (1,), "zeros", duplicate_fraction=0.5)
    maker = RequestMaker(load, worker=0, nonce=1, seed=0)
    counts = Counter(maker.next()[0] for _ in range(2000))
    repeated = sum(c for c in counts.values() if c > 1)
    assert 0.4 * 2000 < repeated < 0.6 * 2000
    assert len([c for c in counts.values() if c > 1]) <= 4
    # hot requests are the same in every worker and every run (nonce 0, worker 0), so they hit across runs too
    other = RequestMaker(load, worker=5, nonce=12345, seed=9)
    hot = {t.payload for t in load.hot}
    assert {p for p in (other.next()[0] for _ in range(200)) if p in hot} <= hot
    assert build(MLP, (1,), "zeros").hot == ()


def test_several_inputs_fp16_stamp_and_versions() -> None:
    load = build(TWO, (2,), "random")
    request = parse(RequestMaker(load, 0, 7, 0).next()[0])
    assert request.model_version == "2"
    assert [(i.name, i.datatype, list(i.shape)) for i in request.inputs] == [("a", "INT64", [2, 3]),
                                                                             ("b", "FP16", [2, 2, 2])]  # fmt: skip
    assert first_input(request, "<i8").flat[:3].tolist() == [7, 1, 1]
    assert len(request.raw_input_contents[1]) == 2 * 2 * 2 * 2


def test_a_model_without_a_batch_dimension_gets_its_fixed_shape() -> None:
    assert parse_rows("16", 0) == (1,)
    request = parse(RequestMaker(build(FIXED, (1,), "zeros"), 0, 1, 0).next()[0])
    assert list(request.inputs[0].shape) == [2, 3]


def test_parse_rows() -> None:
    assert parse_rows("4", 128) == (4,)
    assert parse_rows("1,8", 128) == (1, 8)
    assert parse_rows("mixed", 128) == (1, 2, 4, 8, 16)
    assert parse_rows("mixed", 4) == (1, 2, 4)
    with pytest.raises(ValueError, match="max_batch_size"):
        parse_rows("256", 128)


def test_npy_npz_and_json_inputs_are_sent_verbatim(tmp_path: Path) -> None:
    data = np.arange(10 * 256, dtype=np.float32).reshape(10, 256)
    np.save(tmp_path / "x.npy", data)
    load = build(MLP, (4,), str(tmp_path / "x.npy"))
    arrays = [first_input(parse(t.payload)) for t in load.templates]
    assert [a.shape for a in arrays] == [(4, 256), (4, 256)]
    assert np.array_equal(arrays[1], data[4:8])  # no stamp: the file's values exactly

    np.savez(tmp_path / "two.npz", a=np.ones((3, 3), np.int64), b=np.zeros((3, 2, 2), np.float16))
    request = parse(build(TWO, (1,), str(tmp_path / "two.npz")).templates[2].payload)
    assert [list(i.shape) for i in request.inputs] == [[1, 3], [1, 2, 2]]

    doc = {"data": [{"input": list(range(256))}, {"input": {"content": [0.5] * 512, "shape": [2, 256]}}]}
    (tmp_path / "r.json").write_text(json.dumps(doc))
    load = build(MLP, (1,), str(tmp_path / "r.json"))
    assert [t.rows for t in load.templates] == [1, 2]
    assert first_input(parse(load.templates[1].payload)).shape == (2, 256)


def test_bad_input_sources_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        build(MLP, (1,), str(tmp_path / "missing.npy"))
    np.savez(tmp_path / "wrong.npz", c=np.ones(3))
    with pytest.raises(ValueError, match="no array for input"):
        build(TWO, (1,), str(tmp_path / "wrong.npz"))
    (tmp_path / "bad.json").write_text(json.dumps({"data": [{"other": [1]}]}))
    with pytest.raises(ValueError, match="no input"):
        build(MLP, (1,), str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="duplicate"):
        build(MLP, (1,), "random", duplicate_fraction=1.5)


def test_an_appended_id_field_sets_the_request_id() -> None:
    payload, _ = RequestMaker(build(MLP, (1,), "random"), 0, 1, 0).next()
    assert parse(payload + _id_field("12345")).id == "12345"
    assert parse(payload + _id_field("12345")).raw_input_contents == parse(payload).raw_input_contents
