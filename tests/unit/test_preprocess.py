"""preprocess.json: parsing, binding to the graph, and the precise errors a bad declaration gets at load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ferry.client._proto import model_config_pb2 as mc
from ferry.client.errors import InvalidArgument
from ferry.kernels.hashing import hash_buckets, pack_strings
from ferry.kernels.image import ImageSpec, image_to_nchw_ref
from ferry.kernels.tabular import one_hot_ref
from ferry.server.models.modelconfig import GraphTensor, complete_config
from ferry.server.models.preprocess import Pipeline

IMAGE_GRAPH = GraphTensor("image", "tensor(float)", (None, 3, 56, 56))
TABLE_GRAPH = GraphTensor("x", "tensor(float)", (None, 4))
IMAGE_STEP = {"op": "image", "height": 64, "width": 64, "crop": 56, "scale": 1 / 255, "mean": [0.5] * 3}


def declare(tmp_path: Path, doc: Any, **arrays: np.ndarray) -> Path:
    model_dir = tmp_path / "m"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "preprocess.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    if arrays:
        np.savez(model_dir / "stats.npz", **arrays)  # type: ignore[arg-type]
    return model_dir


def load(tmp_path: Path, doc: Any, **arrays: np.ndarray) -> Pipeline:
    pipeline = Pipeline.load(declare(tmp_path, doc, **arrays), mc.ModelConfig())
    assert pipeline is not None
    return pipeline


def bind(tmp_path: Path, doc: Any, graph: list[GraphTensor], **arrays: np.ndarray) -> list[GraphTensor]:
    return load(tmp_path, doc, **arrays).client_inputs(graph)


def test_no_file_means_no_pipeline(tmp_path: Path) -> None:
    assert Pipeline.load(tmp_path, mc.ModelConfig()) is None


def test_image_pipeline_reports_what_clients_send(tmp_path: Path) -> None:
    other = GraphTensor("scale", "tensor(float)", (None, 1))
    pipeline = load(tmp_path, {"inputs": {"image": [IMAGE_STEP]}})
    assert pipeline.client_inputs([IMAGE_GRAPH, other]) == [
        GraphTensor("image", "tensor(uint8)", (None, 64, 64, 3)),
        other,  # undeclared inputs pass through
    ]
    pipeline.warmup()
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    feeds = pipeline({"image": images, "scale": np.ones((2, 1), np.float32)})
    spec = ImageSpec.build(64, 64, 3, crop=(56, 56), scale=1 / 255, mean=[0.5] * 3)
    np.testing.assert_allclose(feeds["image"], image_to_nchw_ref(images, spec), rtol=1e-6, atol=1e-6)
    assert feeds["scale"].tolist() == [[1.0], [1.0]]


def test_the_completed_config_describes_the_client_side(tmp_path: Path) -> None:
    inputs = bind(tmp_path, {"inputs": {"image": [IMAGE_STEP]}}, [IMAGE_GRAPH])
    output = GraphTensor("probabilities", "tensor(float)", (None, 10))
    config = complete_config(mc.ModelConfig(), "m", inputs, [output])
    assert (config.input[0].data_type, list(config.input[0].dims)) == (mc.TYPE_UINT8, [64, 64, 3])
    wrong = mc.ModelConfig(max_batch_size=8)
    wrong.input.add(name="image", data_type=mc.TYPE_FP32, dims=[3, 56, 56])  # the graph's view, not the client's
    with pytest.raises(InvalidArgument, match="config says TYPE_FP32"):
        complete_config(wrong, "m", inputs, [output])


def test_feature_steps_from_stored_statistics(tmp_path: Path) -> None:
    mean, std = np.array([1, 2, 3, 4], np.float32), np.array([2, 2, 4, 4], np.float32)
    doc = {
        "inputs": {
            "x": [
                {"op": "impute", "fill": "stats.npz:mean"},
                {"op": "standardize", "mean": "stats.npz:mean", "std": "stats.npz:std"},
                {"op": "clip", "min": -1, "max": 1},
            ]
        }
    }
    pipeline = load(tmp_path, doc, mean=mean, std=std)
    graph = GraphTensor("x", "tensor(float)", (None, None))  # the width comes from the statistics
    assert pipeline.client_inputs([graph]) == [GraphTensor("x", "tensor(float)", (None, 4))]
    pipeline.warmup()
    x = np.array([[np.nan, 2, 11, -40]], np.float32)
    np.testing.assert_array_equal(pipeline({"x": x})["x"], [[0, 0, 1, -1]])


def test_hash_then_one_hot(tmp_path: Path) -> None:
    doc = {"inputs": {"c": [{"op": "hash", "buckets": 5, "seed": 7}, {"op": "one_hot", "cardinalities": [5, 5]}]}}
    pipeline = load(tmp_path, doc)
    assert pipeline.client_inputs([GraphTensor("c", "tensor(float)", (None, 10))]) == [
        GraphTensor("c", "tensor(string)", (None, 2))
    ]
    pipeline.warmup()
    items = np.array([["red", "small"], ["blue", ""]], dtype=object)
    data, offsets = pack_strings(items.reshape(-1))
    codes = hash_buckets(data, offsets, 5, 7).reshape(2, 2)
    np.testing.assert_array_equal(pipeline({"c": items})["c"], one_hot_ref(codes, np.array([5, 5])))


def test_warmup_needs_binding(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="client_inputs"):
        load(tmp_path, {"inputs": {"image": [IMAGE_STEP]}}).warmup()


PREFIX = "model 'm' preprocess.json: "
LOAD_ERRORS = {
    "not json": ("{oops", "cannot read it"),
    "no inputs": ({"steps": []}, 'expected an object {"inputs"'),
    "empty chain": ({"inputs": {"x": []}}, "input 'x': expected a non-empty list of steps"),
    "step without op": ({"inputs": {"x": [{"mean": 1}]}}, "input 'x' step 1: expected an object with an \"op\""),
    "unknown op": (
        {"inputs": {"x": [{"op": "normalize"}]}},
        "input 'x' step 1 \\(normalize\\): unknown op 'normalize'; ops are \\['clip', 'hash', 'image'",
    ),
    "unknown parameter": (
        {"inputs": {"x": [{"op": "standardize", "mean": 0, "stdev": 1}]}},
        "step 1 \\(standardize\\): unknown parameter 'stdev'; standardize takes \\['mean', 'std'\\]",
    ),
    "missing parameter": ({"inputs": {"x": [{"op": "standardize", "mean": 0}]}}, "missing parameter 'std'"),
    "wrong type": (
        {"inputs": {"x": [{**IMAGE_STEP, "height": "64"}]}},
        "step 1 \\(image\\): height: expected an integer >= 1, got '64'",
    ),
    "boolean is no size": ({"inputs": {"x": [{"op": "hash", "buckets": True}]}}, "buckets: expected an integer"),
    "image parameters": (
        {"inputs": {"x": [{**IMAGE_STEP, "mean": [0.5, 0.5]}]}},
        "step 1 \\(image\\): mean has 2 values for 3 channels",
    ),
    "crop too large": ({"inputs": {"x": [{**IMAGE_STEP, "crop": 65}]}}, "crop \\[65, 65\\] does not fit"),
    "clip without bounds": ({"inputs": {"x": [{"op": "clip"}]}}, "clip needs min, max or both"),
    "too many buckets": ({"inputs": {"x": [{"op": "hash", "buckets": 2**33}]}}, "buckets must be at most 2\\*\\*32"),
    "steps that do not chain": (
        {"inputs": {"x": [IMAGE_STEP, {"op": "standardize", "mean": 0, "std": 1}]}},
        "step 2 \\(standardize\\): takes tensor\\(float\\) rows of rank 1, but input 'x' step 1 \\(image\\) makes "
        "tensor\\(float\\) rows of rank 3",
    ),
    "missing file": (
        {"inputs": {"x": [{"op": "impute", "fill": "train.npz:mean"}]}},
        "step 1 \\(impute\\): fill: file 'train.npz' not found in",
    ),
    "outside the model directory": (
        {"inputs": {"x": [{"op": "impute", "fill": "../stats.npz:mean"}]}},
        "must name a .npz or .npy file inside the model directory",
    ),
    "npz without key": ({"inputs": {"x": [{"op": "impute", "fill": "stats.npz"}]}}, 'write "file.npz:array"'),
    "unknown key": ({"inputs": {"x": [{"op": "impute", "fill": "stats.npz:mu"}]}}, "has no array 'mu'"),
    "2-d statistics": (
        {"inputs": {"x": [{"op": "impute", "fill": "stats.npz:grid"}]}},
        "must be a 1-D numeric array, got float64 \\[2, 2\\]",
    ),
}


@pytest.mark.parametrize("case", LOAD_ERRORS, ids=list(LOAD_ERRORS))
def test_load_errors(tmp_path: Path, case: str) -> None:
    doc, message = LOAD_ERRORS[case]
    model_dir = declare(tmp_path, doc, mean=np.zeros(4), grid=np.zeros((2, 2)))
    with pytest.raises(InvalidArgument, match=f"^{PREFIX}.*{message}"):
        Pipeline.load(model_dir, mc.ModelConfig())


BIND_ERRORS = {
    "input not in the graph": (
        {"inputs": {"nope": [IMAGE_STEP]}},
        [IMAGE_GRAPH],
        "input 'nope' is not in the ONNX graph, whose inputs are \\['image'\\]",
    ),
    "graph type": (
        {"inputs": {"image": [IMAGE_STEP]}},
        [GraphTensor("image", "tensor(double)", (None, 3, 56, 56))],
        "input 'image' step 1 \\(image\\): makes tensor\\(float\\), but graph input 'image' is tensor\\(double\\)",
    ),
    "graph rank": (
        {"inputs": {"image": [IMAGE_STEP]}},
        [GraphTensor("image", "tensor(float)", (None, 3 * 56 * 56))],
        "makes rows of rank 3, but graph input 'image' has shape \\[-1, 9408\\]",
    ),
    "graph size": (
        {"inputs": {"image": [IMAGE_STEP]}},
        [GraphTensor("image", "tensor(float)", (None, 3, 64, 64))],
        "step 1 \\(image\\): its output rows of shape \\[3, 56, 56\\] do not fit the \\[3, 64, 64\\] required there",
    ),
    "statistics of the wrong length": (
        {"inputs": {"x": [{"op": "impute", "fill": 0}, {"op": "standardize", "mean": [0, 0, 0], "std": 1}]}},
        [TABLE_GRAPH],
        "input 'x' step 2 \\(standardize\\): mean has 3 values, the input has 4 features",
    ),
    "stored statistics of the wrong length": (
        {"inputs": {"x": [{"op": "impute", "fill": "stats.npz:short"}]}},
        [TABLE_GRAPH],
        "step 1 \\(impute\\): fill has 3 values, the input has 4 features",
    ),
    "vectors that disagree": (
        {"inputs": {"x": [{"op": "standardize", "mean": [0, 0], "std": [1, 1, 1]}]}},
        [GraphTensor("x", "tensor(float)", (None, None))],
        "the number of features is unknown",
    ),
    "zero std": (
        {"inputs": {"x": [{"op": "clip", "max": 9}, {"op": "standardize", "mean": 0, "std": [1, 1, 0, 1]}]}},
        [TABLE_GRAPH],
        "step 2 \\(standardize\\): std must be finite and > 0, got 0.0 at feature 2",
    ),
    "unknown width": (
        {"inputs": {"x": [{"op": "clip", "min": 0}]}},
        [GraphTensor("x", "tensor(float)", (None, None))],
        "step 1 \\(clip\\): the number of features is unknown",
    ),
    "one-hot width": (
        {"inputs": {"x": [{"op": "one_hot", "cardinalities": [2, 3]}]}},
        [TABLE_GRAPH],
        "step 1 \\(one_hot\\): its output rows of shape \\[5\\] do not fit the \\[4\\] required there",
    ),
    "hash feeding a float graph": (
        {"inputs": {"x": [{"op": "hash", "buckets": 8}]}},
        [TABLE_GRAPH],
        "makes tensor\\(int64\\), but graph input 'x' is tensor\\(float\\)",
    ),
}


@pytest.mark.parametrize("case", BIND_ERRORS, ids=list(BIND_ERRORS))
def test_bind_errors(tmp_path: Path, case: str) -> None:
    doc, graph, message = BIND_ERRORS[case]
    with pytest.raises(InvalidArgument, match=f"^{PREFIX}.*{message}"):
        bind(tmp_path, doc, graph, short=np.zeros(3))
