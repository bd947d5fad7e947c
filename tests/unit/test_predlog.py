"""The prediction log: sampling, JSON Lines entries (redact, hash, truncation), size rotation, drop-and-count."""

from __future__ import annotations

import hashlib
import json
import re
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format

from ferry.client._proto import model_config_pb2 as mc
from ferry.client.errors import InvalidArgument
from ferry.server.observability.predlog import (
    REDACTED,
    Prediction,
    PredictionLog,
    PredictionLogOptions,
    PredictionLogSettings,
    PredictionSampler,
    encode_prediction,
)

WAIT_S = 10  # bound on every wait for the writer thread
RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
CONFIG = """
name: "m"
input [ { name: "a" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "b" data_type: TYPE_INT64 dims: [ 2 ] },
        { name: "text" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]
"""


def _config(**parameters: str) -> mc.ModelConfig:
    config = text_format.Parse(CONFIG, mc.ModelConfig())
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


def _entry(request_id: str = "1", options: PredictionLogOptions | None = None, **inputs: np.ndarray) -> Prediction:
    return Prediction(
        model="m",
        version=3,
        sha256="ab" * 32,
        request_id=request_id,
        trace_id="0af7651916cd43dd8448eb211c80319c",
        inputs=inputs or {"a": np.arange(4, dtype=np.float32).reshape(1, 4)},
        outputs={"y": np.array([[0.5]], dtype=np.float32)},
        latency_ms=1.23456,
        options=options or PredictionLogOptions(rate=1.0),
        timestamp=1_700_000_000.25,
    )


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# -- entries ------------------------------------------------------------------------------------------------------


def test_entry_has_every_field() -> None:
    line = json.loads(encode_prediction(_entry("req-7")))
    assert line == {
        "timestamp": "2023-11-14T22:13:20.250000Z",
        "request_id": "req-7",
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "model": "m",
        "version": 3,
        "sha256": "ab" * 32,
        "latency_ms": 1.235,
        "inputs": {"a": {"datatype": "FP32", "shape": [1, 4], "data": [0.0, 1.0, 2.0, 3.0]}},
        "outputs": {"y": {"datatype": "FP32", "shape": [1, 1], "data": [0.5]}},
    }
    assert RFC3339_UTC.match(line["timestamp"])


def test_redact_and_hash_per_input() -> None:
    options = PredictionLogOptions(rate=1.0, redact=frozenset({"a"}), hash=frozenset({"b", "text"}))
    a = np.ones((1, 4), np.float32)
    b = np.array([[1, -2]], np.int64)
    text = np.array([["héllo"]], dtype=object)
    line = json.loads(encode_prediction(_entry(options=options, a=a, b=b, text=text)))

    assert line["inputs"]["a"] == {"datatype": "FP32", "shape": [1, 4], "data": REDACTED}
    assert line["inputs"]["b"] == {
        "datatype": "INT64",
        "shape": [1, 2],
        "sha256": hashlib.sha256(struct.pack("<qq", 1, -2)).hexdigest(),
    }
    # BYTES hash the wire form of raw_input_contents: each element length-prefixed (uint32 little-endian).
    wire = struct.pack("<I", 6) + "héllo".encode()
    assert line["inputs"]["text"]["sha256"] == hashlib.sha256(wire).hexdigest()
    assert "data" not in line["inputs"]["b"] and "data" not in line["inputs"]["text"]
    assert line["outputs"]["y"]["data"] == [0.5]  # the options are about inputs


def test_without_options_inputs_are_written_in_full() -> None:
    line = json.loads(encode_prediction(_entry(text=np.array([["héllo"]], dtype=object))))
    assert line["inputs"]["text"]["data"] == ["héllo"]


def test_tensors_are_cut_to_max_elements() -> None:
    options = PredictionLogOptions(rate=1.0, max_elements=5)
    line = json.loads(encode_prediction(_entry(options=options, a=np.arange(12, dtype=np.float32).reshape(3, 4))))
    assert line["inputs"]["a"] == {"datatype": "FP32", "shape": [3, 4], "data": [0, 1, 2, 3, 4], "truncated": True}
    assert "truncated" not in line["outputs"]["y"]


def test_non_finite_floats_are_strings() -> None:
    a = np.array([[np.nan, np.inf, -np.inf, 1.5]], np.float32)
    line = json.loads(encode_prediction(_entry(a=a)))
    assert line["inputs"]["a"]["data"] == ["nan", "inf", "-inf", 1.5]


# -- options from config.pbtxt ------------------------------------------------------------------------------------


def test_options_from_parameters() -> None:
    options = PredictionLogOptions.from_parameters(
        _config(
            prediction_log_rate="0.1",
            prediction_log_redact=" a ",
            prediction_log_hash="b,text",
            prediction_log_max_elements="16",
        )
    )
    assert options == PredictionLogOptions(0.1, frozenset({"a"}), frozenset({"b", "text"}), 16)
    assert PredictionLogOptions.from_parameters(_config()) == PredictionLogOptions()
    assert PredictionLogOptions().rate == 0.0


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"prediction_log_rate": "often"}, "model 'm' parameters: prediction_log_rate must be a number in [0, 1], got"),
        ({"prediction_log_rate": "1.5"}, "prediction_log_rate must be a number in [0, 1], got '1.5'"),
        ({"prediction_log_rate": "nan"}, "prediction_log_rate must be a number in [0, 1], got 'nan'"),
        ({"prediction_log_redact": "a,zz"}, "prediction_log_redact: ['zz'] are not inputs of the model (inputs: ["),
        ({"prediction_log_hash": "a,,b"}, "prediction_log_hash: empty input name in 'a,,b'"),
        (
            {"prediction_log_redact": "a,b", "prediction_log_hash": "b"},
            "inputs ['b'] are in both prediction_log_redact and prediction_log_hash",
        ),
        ({"prediction_log_max_elements": "-1"}, "prediction_log_max_elements must be an integer in 0..1000000"),
    ],
)
def test_options_reject_bad_parameters(parameters: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        PredictionLogOptions.from_parameters(_config(**parameters))
    assert message in caught.value.message


@pytest.mark.parametrize(
    ("field", "value"), [("max_bytes", -1), ("backups", -1), ("queue_size", 0), ("queue_size", 10**8)]
)
def test_settings_are_validated(field: str, value: int) -> None:
    with pytest.raises(InvalidArgument, match=f"prediction log {field} must be"):
        PredictionLogSettings(**{field: value})  # type: ignore[arg-type]


def test_no_path_means_no_log() -> None:
    assert PredictionLogSettings().path is None
    assert PredictionLog.from_settings(PredictionLogSettings()) is None


# -- sampling -----------------------------------------------------------------------------------------------------


def test_rate_zero_never_samples_and_rate_one_always_does() -> None:
    never, always = PredictionSampler(0.0), PredictionSampler(1.0)
    assert not never.enabled and always.enabled
    assert not any(never.sample() for _ in range(10_000))
    assert all(always.sample() for _ in range(10_000))


def test_rate_samples_that_fraction() -> None:
    n, rate = 20_000, 0.1
    sampler = PredictionSampler(rate, seed=1234)
    hits = sum(sampler.sample() for _ in range(n))
    sigma = (n * rate * (1 - rate)) ** 0.5
    assert abs(hits - n * rate) < 5 * sigma, hits


def test_sampler_seed_makes_it_repeatable() -> None:
    def draws(seed: int) -> list[bool]:
        sampler = PredictionSampler(0.5, seed=seed)
        return [sampler.sample() for _ in range(64)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


@pytest.mark.parametrize("rate", [-0.1, 1.1, float("nan")])
def test_sampler_rejects_a_rate_outside_0_1(rate: float) -> None:
    with pytest.raises(InvalidArgument):
        PredictionSampler(rate)


# -- the sink -----------------------------------------------------------------------------------------------------


def test_close_flushes_everything_recorded(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "predictions.jsonl"
    sink = PredictionLog(path, max_bytes=0, backups=0, queue_size=1000)
    for i in range(500):
        assert sink.record(_entry(str(i)))
    sink.close()
    assert [line["request_id"] for line in _lines(path)] == [str(i) for i in range(500)]
    assert (sink.written, sink.dropped, sink.failed) == (500, 0, 0)
    assert not sink.record(_entry("late"))  # closed: dropped and counted, never blocks
    assert sink.dropped == 1


def test_rotates_by_size_keeping_backups(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    line_bytes = len(encode_prediction(_entry("00"))) + 1
    max_bytes = 3 * line_bytes + 10  # three lines fit in a file, a fourth does not
    sink = PredictionLog(path, max_bytes=max_bytes, backups=2, queue_size=100)
    for i in range(20):
        sink.record(_entry(f"{i:02d}"))
    sink.close()

    files = [path.with_name("p.jsonl.2"), path.with_name("p.jsonl.1"), path]  # oldest first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "p.jsonl.1", "p.jsonl.2"]
    for file in files:
        assert file.stat().st_size <= max_bytes
    kept = [line["request_id"] for file in files for line in _lines(file)]
    # 20 lines in files of 3: the last file holds the 2 newest, each backup 3 before them.
    assert kept == [f"{i:02d}" for i in range(12, 20)]


def test_no_backups_truncates_the_file(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    line_bytes = len(encode_prediction(_entry("00"))) + 1
    sink = PredictionLog(path, max_bytes=2 * line_bytes, backups=0, queue_size=100)
    for i in range(5):
        sink.record(_entry(f"{i:02d}"))
    sink.close()
    assert [p.name for p in tmp_path.iterdir()] == ["p.jsonl"]
    assert [line["request_id"] for line in _lines(path)] == ["04"]


def test_reopening_appends_and_counts_the_existing_size(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    line_bytes = len(encode_prediction(_entry("00"))) + 1
    for batch in (range(2), range(2, 4)):  # two server runs
        sink = PredictionLog(path, max_bytes=3 * line_bytes, backups=1, queue_size=100)
        for i in batch:
            sink.record(_entry(f"{i:02d}"))
        sink.close()
    assert [line["request_id"] for line in _lines(path.with_name("p.jsonl.1"))] == ["00", "01", "02"]
    assert [line["request_id"] for line in _lines(path)] == ["03"]


def test_full_queue_drops_and_counts_without_blocking(tmp_path: Path) -> None:
    writing, release = threading.Event(), threading.Event()

    def blocked_encode(entry: Prediction) -> bytes:
        writing.set()
        assert release.wait(WAIT_S), "the test never released the writer"
        return encode_prediction(entry)

    path = tmp_path / "p.jsonl"
    sink = PredictionLog(path, max_bytes=0, backups=0, queue_size=4, encode=blocked_encode)
    try:
        assert sink.record(_entry("first"))
        assert writing.wait(WAIT_S)  # the writer holds "first" and waits: the queue is empty and cannot drain
        assert all(sink.record(_entry(f"q{i}")) for i in range(4))
        assert sink.pending == 4
        assert not sink.record(_entry("over-1"))
        assert not sink.record(_entry("over-2"))
        assert sink.dropped == 2
    finally:
        release.set()
        sink.close()
    assert [line["request_id"] for line in _lines(path)] == ["first", "q0", "q1", "q2", "q3"]
    assert (sink.written, sink.dropped) == (5, 2)


def test_an_entry_that_cannot_be_encoded_is_counted_and_the_writer_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    sink = PredictionLog(path, max_bytes=0, backups=0, queue_size=10)
    sink.record(_entry("bad", a=np.array([1 + 2j], np.complex64)))  # no protocol datatype
    sink.record(_entry("good"))
    sink.close()
    assert [line["request_id"] for line in _lines(path)] == ["good"]
    assert (sink.written, sink.failed) == (1, 1)
