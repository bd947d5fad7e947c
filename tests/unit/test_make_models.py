"""Tests of the example repository script (examples/make_models.py) and of the test-only models
(tests/models.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument, InvalidProtobuf

from tests import models

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXPECTED_FILES = {
    "mlp/config.pbtxt",
    "mlp/1/model.onnx",
    "tiny/config.pbtxt",
    "tiny/1/model.onnx",
    "digits/config.pbtxt",
    "digits/1/model.onnx",
    "digits/2/model.onnx",
    "digits/heldout.npz",
    "digits/train_stats.npz",
    "digits/preprocess.json",
    "imgcls/config.pbtxt",
    "imgcls/preprocess.json",
    "imgcls/1/model.onnx",
    "digits/drift_reference.npz",
}
MLP_CONFIG = """\
name: "mlp"
platform: "onnxruntime_onnx"
max_batch_size: 128
input [ { name: "input" data_type: TYPE_FP32 dims: [ 256 ] } ]
output [ { name: "output" data_type: TYPE_FP32 dims: [ 10 ] } ]
dynamic_batching { }
"""
TINY_CONFIG = MLP_CONFIG.replace("mlp", "tiny").replace("256", "16").replace("10", "4")
DIGITS_CONFIG = """\
name: "digits"
platform: "onnxruntime_onnx"
max_batch_size: 64
version_policy: { all { } }
# requests sent with an id are remembered: report_outcomes joins the truth with their label (live accuracy)
parameters { key: "outcome_output" value: { string_value: "label" } }
# with `ferry serve --prediction-log FILE`: every request is logged (0 = off)
parameters { key: "prediction_log_rate" value: { string_value: "1" } }
"""


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_models", ROOT / "examples" / "make_models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_models = _load_script()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("repo")
    make_models.build_repository(out)
    return out


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A second, independent build, to compare with ``repo`` and to rerun the script on."""
    out = tmp_path_factory.mktemp("rebuilt")
    make_models.main(["--out", str(out)])
    return out


def _session(path: pathlib.Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _signature(args: list[ort.NodeArg]) -> dict[str, tuple[str, list[int | str | None]]]:
    return {arg.name: (arg.type, arg.shape) for arg in args}


def _files(root: pathlib.Path) -> set[str]:
    return {path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file()}


def test_repository_holds_exactly_the_expected_files(repo: pathlib.Path) -> None:
    assert _files(repo) == EXPECTED_FILES  # and no temporary files left behind


@pytest.mark.parametrize(
    ("name", "config", "in_dim", "out_dim"), [("mlp", MLP_CONFIG, 256, 10), ("tiny", TINY_CONFIG, 16, 4)]
)
def test_dense_model(repo: pathlib.Path, name: str, config: str, in_dim: int, out_dim: int) -> None:
    assert (repo / name / "config.pbtxt").read_text() == config
    session = _session(repo / name / "1" / "model.onnx")
    assert _signature(session.get_inputs()) == {"input": ("tensor(float)", ["batch", in_dim])}
    assert _signature(session.get_outputs()) == {"output": ("tensor(float)", ["batch", out_dim])}
    x = np.random.default_rng(1).standard_normal((5, in_dim), dtype=np.float32)
    (y,) = session.run(None, {"input": x})
    assert y.shape == (5, out_dim) and y.dtype == np.float32
    assert np.isfinite(y).all() and 0 < np.abs(y).max() < 100


def test_mlp_has_the_specified_layers(repo: pathlib.Path) -> None:
    model = onnx.load(repo / "mlp" / "1" / "model.onnx")
    assert [node.op_type for node in model.graph.node] == ["Gemm", "Relu", "Gemm", "Relu", "Gemm"]
    weights = {tensor.name: tensor.dims for tensor in model.graph.initializer}
    assert [weights[f"w{i}"] for i in range(3)] == [[1024, 256], [1024, 1024], [10, 1024]]


def test_builds_are_deterministic(repo: pathlib.Path, rebuilt: pathlib.Path) -> None:
    x = np.random.default_rng(2).standard_normal((4, 256), dtype=np.float32)
    outputs = [_session(root / "mlp" / "1" / "model.onnx").run(None, {"input": x})[0] for root in (repo, rebuilt)]
    np.testing.assert_array_equal(outputs[0], outputs[1])
    for file in EXPECTED_FILES:
        assert (repo / file).read_bytes() == (rebuilt / file).read_bytes(), file


@pytest.mark.parametrize("version", [1, 2])
def test_digits_version(repo: pathlib.Path, version: int) -> None:
    session = _session(repo / "digits" / str(version) / "model.onnx")
    assert _signature(session.get_inputs()) == {"input": ("tensor(float)", ["batch", 64])}
    assert _signature(session.get_outputs()) == {
        "label": ("tensor(int64)", ["batch"]),
        "probabilities": ("tensor(float)", ["batch", 10]),
    }
    heldout = np.load(repo / "digits" / "heldout.npz")
    labels, probabilities = session.run(None, {"input": heldout["X"]})
    assert np.mean(labels == heldout["y"]) > 0.9
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(labels, probabilities.argmax(axis=1))


def test_digits_versions_differ(repo: pathlib.Path) -> None:
    x = np.load(repo / "digits" / "heldout.npz")["X"][:20]
    v1, v2 = (_session(repo / "digits" / v / "model.onnx").run(["probabilities"], {"input": x})[0] for v in "12")
    assert not np.allclose(v1, v2, atol=1e-3)


def test_digits_data_files(repo: pathlib.Path) -> None:
    assert (repo / "digits" / "config.pbtxt").read_text() == DIGITS_CONFIG
    heldout = np.load(repo / "digits" / "heldout.npz")
    assert set(heldout.files) == {"X", "y"}
    assert heldout["X"].dtype == np.float32 and heldout["X"].shape == (450, 64)
    assert heldout["y"].dtype == np.int64 and heldout["y"].shape == (450,)
    assert set(np.unique(heldout["y"])) == set(range(10))  # stratified
    stats = np.load(repo / "digits" / "train_stats.npz")
    assert set(stats.files) == {"mean", "std", "min", "max"}
    for name in stats.files:
        assert stats[name].dtype == np.float32 and stats[name].shape == (64,), name
    assert (stats["min"] <= stats["mean"]).all() and (stats["mean"] <= stats["max"]).all()
    assert (stats["std"] >= 0).all() and stats["std"].max() > 0

    assert json.loads((repo / "digits" / "preprocess.json").read_text()) == {
        "inputs": {"input": [{"op": "impute", "fill": "train_stats.npz:mean"}]}
    }


def test_imgcls(repo: pathlib.Path) -> None:
    """A CNN over FP32 [N, 3, 56, 56]; config.pbtxt and preprocess.json describe the UINT8 [N, 64, 64, 3] clients
    send (tests/integration/test_preprocess.py checks what the server makes of them)."""
    config = (repo / "imgcls" / "config.pbtxt").read_text()
    assert 'name: "imgcls"' in config and "TYPE_UINT8 dims: [ 64, 64, 3 ]" in config and "max_batch_size: 64" in config
    session = _session(repo / "imgcls" / "1" / "model.onnx")
    assert _signature(session.get_inputs()) == {"image": ("tensor(float)", ["batch", 3, 56, 56])}
    assert _signature(session.get_outputs()) == {"probabilities": ("tensor(float)", ["batch", 10])}
    x = np.random.default_rng(3).standard_normal((4, 3, 56, 56), dtype=np.float32)
    (probabilities,) = session.run(None, {"image": x})
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(probabilities[0], probabilities[1])  # the answer depends on the image
    steps = json.loads((repo / "imgcls" / "preprocess.json").read_text())["inputs"]["image"]
    assert [(s["op"], s["height"], s["width"], s["crop"]) for s in steps] == [("image", 64, 64, 56)]
    assert steps[0]["mean"] == [0.485, 0.456, 0.406] and steps[0]["std"] == [0.229, 0.224, 0.225]


@pytest.mark.parametrize("force", [False, True])
def test_rerun_rewrites_only_with_force(rebuilt: pathlib.Path, force: bool) -> None:
    paths = [rebuilt / file for file in EXPECTED_FILES]
    for path in paths:
        os.utime(path, ns=(0, 0))
    make_models.main(["--out", str(rebuilt)] + (["--force"] if force else []))
    rewritten = {path.relative_to(rebuilt).as_posix() for path in paths if path.stat().st_mtime_ns != 0}
    assert rewritten == (EXPECTED_FILES if force else set())
    assert _files(rebuilt) == EXPECTED_FILES


def test_rerun_brings_an_older_config_up_to_date(rebuilt: pathlib.Path) -> None:
    """A repository built before digits gained its outcome and prediction-log parameters gets them on the next
    run, without retraining anything."""
    for file in EXPECTED_FILES:
        os.utime(rebuilt / file, ns=(0, 0))
    (rebuilt / "digits" / "config.pbtxt").write_text(DIGITS_CONFIG.split("# requests")[0])
    make_models.build_repository(rebuilt)
    rewritten = {file for file in EXPECTED_FILES if (rebuilt / file).stat().st_mtime_ns != 0}
    assert rewritten == {"digits/config.pbtxt"}
    assert (rebuilt / "digits" / "config.pbtxt").read_text() == DIGITS_CONFIG


def test_rerun_completes_a_partial_model(rebuilt: pathlib.Path) -> None:
    for file in EXPECTED_FILES:
        os.utime(rebuilt / file, ns=(0, 0))
    (rebuilt / "tiny" / "1" / "model.onnx").unlink()
    make_models.build_repository(rebuilt)
    rewritten = {file for file in EXPECTED_FILES if (rebuilt / file).stat().st_mtime_ns != 0}
    assert rewritten == {"tiny/config.pbtxt", "tiny/1/model.onnx"}  # the whole model, and only that one
    assert _files(rebuilt) == EXPECTED_FILES


def test_interrupted_write_keeps_the_old_file(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "1" / "model.onnx"
    make_models.write_atomic(path, b"old")

    def interrupted(src: object, dst: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(make_models.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_models.write_atomic(path, b"new")
    assert path.read_bytes() == b"old"
    assert _files(tmp_path) == {"1/model.onnx"}


def _identity_feed(elem_type: int) -> np.ndarray:
    if elem_type == onnx.TensorProto.STRING:
        return np.array([["a", "bc", ""], ["déf", "g", "h"]], dtype=object)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    return np.array([[0, 1, 1], [1, 0, 1]]).astype(dtype)


def test_identity_all_types(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "identity" / "1" / "model.onnx"
    models.write_identity_all_types(path)
    session = _session(path)
    types = models.IDENTITY_DATATYPES
    assert [arg.name for arg in session.get_inputs()] == [f"in_{dt}" for dt in types]
    assert all(arg.shape == ["batch", 3] for arg in session.get_inputs())
    feeds = {f"in_{dt}": _identity_feed(elem_type) for dt, elem_type in types.items()}
    outputs = session.run([f"out_{dt}" for dt in types], feeds)
    for (dt, elem_type), out in zip(types.items(), outputs, strict=True):
        expected = feeds[f"in_{dt}"]
        if elem_type != onnx.TensorProto.STRING:
            assert out.dtype == expected.dtype, dt
        np.testing.assert_array_equal(out, expected, err_msg=dt)


@pytest.mark.parametrize("dims", [1, 4, 7])
def test_add(tmp_path: pathlib.Path, dims: int) -> None:
    models.write_add(tmp_path / "model.onnx", dims=dims)
    session = _session(tmp_path / "model.onnx")
    assert _signature(session.get_outputs()) == {
        "sum": ("tensor(float)", ["batch", dims]),
        "diff": ("tensor(float)", ["batch", dims]),
    }
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 3, dims), dtype=np.float32)
    total, diff = session.run(["sum", "diff"], {"a": a, "b": b})
    np.testing.assert_array_equal(total, a + b)
    np.testing.assert_array_equal(diff, a - b)


def test_fixed_shape(tmp_path: pathlib.Path) -> None:
    models.write_fixed_shape(tmp_path / "model.onnx")
    session = _session(tmp_path / "model.onnx")
    assert _signature(session.get_inputs()) == {"x": ("tensor(float)", [2, 3])}
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(session.run(["y"], {"x": x})[0], 2 * x)
    with pytest.raises(InvalidArgument, match="Got: 4 Expected: 2"):
        session.run(["y"], {"x": np.zeros((4, 3), dtype=np.float32)})


@pytest.mark.parametrize("factor", [1.0, 2.0, 3.0])
def test_scale(tmp_path: pathlib.Path, factor: float) -> None:
    models.write_scale(tmp_path / "model.onnx", factor)
    session = _session(tmp_path / "model.onnx")
    assert _signature(session.get_inputs()) == {"input": ("tensor(float)", ["batch", 4])}
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(session.run(["output"], {"input": x})[0], factor * x)


def test_corrupt(tmp_path: pathlib.Path) -> None:
    models.write_corrupt(tmp_path / "1" / "model.onnx")
    with pytest.raises(InvalidProtobuf):
        _session(tmp_path / "1" / "model.onnx")
