"""The lifecycle's parts without a server: what a load publishes (merge), the batcher's drain, what a poll reads,
load parameters, warmup samples, and the lifecycle settings' validation."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ferry.client._proto import model_config_pb2 as mc
from ferry.client.errors import InvalidArgument, Unavailable
from ferry.server.config import ServerConfig
from ferry.server.models.batching import Batcher, BatchPolicy
from ferry.server.models.lifecycle import merge, parse_override, snapshot, stage_files
from ferry.server.models.modelconfig import parse_config, tensor_specs
from ferry.server.models.repository import Model
from ferry.server.models.warmup import MAX_WARMUP_RUNS, warmup_samples


class FakeVersion:
    """Stands in for a ModelVersion in merge(): only identity matters."""

    def __init__(self, number: int) -> None:
        self.version = number


def model(name: str, versions: dict[int, Any], errors: dict[int | None, str] | None = None) -> Model:
    return Model(name, dict(versions), dict(errors or {}))


# ---- merge: what a load publishes -----------------------------------------------------------------------------


def test_a_load_that_built_everything_replaces_every_version() -> None:
    old1, old2, new2, new3 = FakeVersion(1), FakeVersion(2), FakeVersion(2), FakeVersion(3)
    published, retired = merge(model("m", {1: old1, 2: old2}), model("m", {2: new2, 3: new3}))
    assert published.versions == {2: new2, 3: new3} and not published.failed and not published.errors
    assert set(map(id, retired)) == {id(old1), id(old2)}


def test_a_version_that_failed_to_build_keeps_its_serving_build() -> None:
    old1, old2, new1 = FakeVersion(1), FakeVersion(2), FakeVersion(1)
    published, retired = merge(model("m", {1: old1, 2: old2}), model("m", {1: new1}, {2: "corrupt", 3: "missing"}))
    assert published.versions == {1: new1, 2: old2}
    assert published.failed == {2: "corrupt"} and published.errors == {3: "missing"}
    assert retired == [old1]


def test_a_model_whose_config_failed_keeps_everything() -> None:
    old1 = FakeVersion(1)
    published, retired = merge(model("m", {1: old1}), model("m", {}, {None: "config.pbtxt: syntax"}))
    assert published.versions == {1: old1} and published.failed == {None: "config.pbtxt: syntax"}
    assert retired == []


def test_a_first_load_publishes_what_it_built_and_its_errors() -> None:
    new = model("m", {}, {None: "no files"})
    assert merge(None, new) == (new, [])


# ---- the batcher's drain ----------------------------------------------------------------------------------------


def test_drain_answers_everything_queued_and_what_arrives_while_draining() -> None:
    async def main() -> None:
        gate = asyncio.Event()
        ran: list[int] = []

        async def run(batch: list[Any]) -> list[Any]:
            await gate.wait()
            ran.extend(batch)
            return [p * 10 for p in batch]

        batcher = Batcher(BatchPolicy(batching=True, max_batch_rows=2), run, "m")
        batcher.start()
        first = [asyncio.ensure_future(batcher.submit(i, 1)) for i in range(5)]
        await asyncio.sleep(0)
        drain = asyncio.ensure_future(batcher.drain())
        late = asyncio.ensure_future(batcher.submit(99, 1))  # resolved before the swap, submitted after it
        await asyncio.sleep(0.01)
        assert not drain.done()  # a batch is still running
        gate.set()
        await drain
        assert [r for r, _ in await asyncio.gather(*first, late)] == [0, 10, 20, 30, 40, 990]
        with pytest.raises(Unavailable):  # once closed, nothing more is taken
            await batcher.submit(7, 1)

    asyncio.run(main())


def test_close_still_fails_what_is_queued() -> None:
    async def main() -> None:
        gate = asyncio.Event()

        async def run(batch: list[Any]) -> list[Any]:
            await gate.wait()
            return batch

        batcher = Batcher(BatchPolicy(batching=True, max_batch_rows=1), run, "m")
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(1, 1))
        await asyncio.sleep(0)
        queued = asyncio.ensure_future(batcher.submit(2, 1))
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.01)
        gate.set()
        await closing
        assert (await running)[0] == 1
        with pytest.raises(Unavailable, match="shutting down"):
            await queued
        await batcher.close()  # a second close returns at once

    asyncio.run(main())


# ---- what a poll reads ------------------------------------------------------------------------------------------


def test_snapshot_changes_with_size_or_mtime_of_config_and_version_files(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.onnx").write_bytes(b"abc")
    (tmp_path / "notes").mkdir()  # not a version folder: ignored
    (tmp_path / "notes" / "x").write_bytes(b"x")
    first = snapshot(tmp_path)
    assert [f[0] for f in first.files] == ["1/model.onnx"]
    assert snapshot(tmp_path) == first
    (tmp_path / "1" / "model.onnx").write_bytes(b"abcd")
    grown = snapshot(tmp_path)
    assert grown != first
    os.utime(tmp_path / "1" / "model.onnx", ns=(1, 1))
    assert snapshot(tmp_path) != grown
    (tmp_path / "config.pbtxt").write_text("max_batch_size: 1")
    assert "config.pbtxt" in [f[0] for f in snapshot(tmp_path).files]
    assert snapshot(tmp_path / "gone").files == ()


# ---- load parameters ------------------------------------------------------------------------------------------


def test_a_config_override_is_a_json_model_config_without_ferrys_provenance_keys() -> None:
    config = parse_override(
        '{"max_batch_size": 8, "parameters": {"ferry.sha256": {"string_value": "x"}, '
        '"intra_op_thread_count": {"string_value": "1"}}}',
        "m",
    )
    assert config.name == "m" and config.max_batch_size == 8 and list(config.parameters) == ["intra_op_thread_count"]
    with pytest.raises(InvalidArgument, match="not a JSON ModelConfig"):
        parse_override('{"max_batch_size": "lots"}', "m")
    with pytest.raises(InvalidArgument, match="not a JSON ModelConfig"):
        parse_override("{oops", "m")


def test_uploaded_files_stay_inside_their_model_folder(tmp_path: Path) -> None:
    staged = stage_files("m", {"1/model.onnx": b"onnx", "warmup/x.bin": b"x"}, tmp_path)
    assert staged.name == "m" and (staged / "1" / "model.onnx").read_bytes() == b"onnx"
    for bad in ("../escape", "/etc/passwd", "1/../../x", ""):
        with pytest.raises(InvalidArgument, match="relative path"):
            stage_files("m", {"1/model.onnx": b"onnx", bad: b""}, tmp_path)
    assert list(tmp_path.iterdir()) == [staged.parent]  # a refused upload leaves nothing behind


# ---- warmup samples ---------------------------------------------------------------------------------------------


def _completed(text: str) -> tuple[mc.ModelConfig, list[Any]]:
    config = parse_config(
        'name: "m"\nmax_batch_size: 8\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ 3 ] } ]\n'
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 3 ] } ]\n' + text,
        "config.pbtxt",
    )
    return config, tensor_specs(config)[0]


def test_default_warmup_is_batch_one_and_the_largest_preferred_size(tmp_path: Path) -> None:
    config, inputs = _completed("dynamic_batching { preferred_batch_size: [ 2, 6 ] }")
    samples = warmup_samples(config, inputs, tmp_path)
    assert [s.feeds["x"].shape for s in samples] == [(1, 3), (6, 3)]
    assert all(s.count == 1 and not s.feeds["x"].any() for s in samples)
    config, inputs = _completed("")
    assert [s.feeds["x"].shape for s in warmup_samples(config, inputs, tmp_path)] == [(1, 3)]


def test_declared_warmup_data_kinds_and_errors(tmp_path: Path) -> None:
    (tmp_path / "warmup").mkdir()
    (tmp_path / "warmup" / "x.bin").write_bytes(np.arange(6, dtype=np.float32).tobytes())

    def samples(entry: str) -> list[Any]:
        config, inputs = _completed(f"model_warmup [ {entry} ]")
        return warmup_samples(config, inputs, tmp_path)

    def entry(data: str, batch: int = 2, count: int = 0, dims: str = "3", dtype: str = "TYPE_FP32") -> str:
        value = f"data_type: {dtype} dims: [ {dims} ] {data}"
        return f'{{ name: "w" batch_size: {batch} count: {count} inputs {{ key: "x" value: {{ {value} }} }} }}'

    (zeros,) = samples(entry("zero_data: true", count=3))
    assert zeros.count == 3 and zeros.feeds["x"].shape == (2, 3) and not zeros.feeds["x"].any()
    (random,) = samples(entry("random_data: true"))
    assert random.count == 1 and random.feeds["x"].any()
    (from_file,) = samples(entry('input_data_file: "x.bin"'))
    np.testing.assert_array_equal(from_file.feeds["x"], np.arange(6, dtype=np.float32).reshape(2, 3))
    errors = {
        "over max_batch_size": entry("zero_data: true", batch=9),
        "differs from the model's": entry("zero_data: true", dtype="TYPE_INT32"),
        "do not fit": entry("zero_data: true", dims="4"),
        "needs 48": entry('input_data_file: "x.bin"', batch=4),
        "outside the model's warmup": entry('input_data_file: "../../etc/passwd"'),
        "cannot read": entry('input_data_file: "nope.bin"'),
        f"at most {MAX_WARMUP_RUNS}": entry("zero_data: true", count=MAX_WARMUP_RUNS + 1),
        "no data for inputs": '{ name: "w" batch_size: 1 }',
        "do not fit the model": entry("zero_data: true", dims="-1"),
    }
    for message, text in errors.items():
        with pytest.raises(InvalidArgument, match=message):
            samples(text)
    _, inputs = _completed("")
    inputs = [replace(inputs[0], dims=(-1,))]  # a dynamic dimension: the sample's dims decide, within a bound
    huge = parse_config(
        'name: "m"\nmax_batch_size: 8\nmodel_warmup [ { name: "w" batch_size: 8 inputs { key: "x" value: '
        "{ data_type: TYPE_FP32 dims: [ 100000000 ] zero_data: true } } } ]",
        "config.pbtxt",
    )
    with pytest.raises(InvalidArgument, match="is over"):
        warmup_samples(huge, inputs, tmp_path)


# ---- settings --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"model_control_mode": "sometimes"}, "model_control_mode must be one of"),
        ({"load_models": ("a",)}, "needs model_control_mode explicit"),
        ({"model_control_mode": "explicit", "load_models": ("*", "a")}, "must be the only one"),
        ({"repository_poll_secs": 0}, "repository_poll_secs"),
        ({"model_load_threads": 0}, "model_load_threads"),
    ],
)
def test_lifecycle_settings_are_validated(tmp_path: Path, values: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        ServerConfig.build(model_repository=tmp_path, **values)
