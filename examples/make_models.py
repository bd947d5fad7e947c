"""Write Ferry's example model repository (Triton layout) from nothing the network must provide.

    python examples/make_models.py [--out examples/models] [--force]

- ``mlp``: FP32 [N, 256] -> Gemm 1024 -> Relu -> Gemm 1024 -> Relu -> Gemm 10; the compute benchmark.
- ``tiny``: FP32 [N, 16] -> Gemm 4; the per-request overhead benchmark.
- ``digits``: two scikit-learn classifiers of the bundled digits data set, served as versions 1 and 2,
  with ``heldout.npz`` (``X``, ``y``: the test split) and ``train_stats.npz`` (per-feature ``mean``,
  ``std``, ``min``, ``max`` of the training split) for preprocessing and drift detection. Its
  ``preprocess.json`` replaces a missing pixel (NaN) with the training mean of that pixel, so finite
  inputs reach the classifiers unchanged. Its ``config.pbtxt`` turns on what the README shows: outcomes
  (``outcome_output`` ``label``: requests sent with an id are remembered for ``report_outcomes``) and, when
  the server runs with ``--prediction-log``, logging of every request.
- ``imgcls``: a small CNN with fixed-seed weights, graph input FP32 [N, 3, 56, 56] -> ``probabilities``
  [N, 10]; clients send UINT8 [N, 64, 64, 3] images, which its ``preprocess.json`` center-crops to 56,
  scales to [0, 1] and normalizes with the ImageNet mean and std into NCHW.

Weights come from fixed seeds and training is seeded, so every run writes the same bytes. A model whose
files all exist is skipped unless ``--force`` (only its ``config.pbtxt`` is rewritten when this script now
writes another, so an older repository gains new settings without retraining). Each file is written under a
temporary name and renamed into place, so an interrupted run never leaves a half-written model.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_digits
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from ferry.server.observability.drift import DriftReference

OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17; onnxruntime 1.32 loads up to IR 11
ML_OPSET = 3  # ai.onnx.ml, for the scikit-learn converters
DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "models"
MIN_DIGITS_ACCURACY = 0.9

Files = dict[str, bytes]  # path relative to the model's directory -> file content


class ExampleModel(NamedTuple):
    files: tuple[str, ...]  # paths relative to the model's directory, known before building
    build: Callable[[], Files]
    config: bytes  # config.pbtxt, known without building


def _dense_config(name: str, in_dim: int, out_dim: int) -> bytes:
    return (
        f'name: "{name}"\n'
        'platform: "onnxruntime_onnx"\n'
        "max_batch_size: 128\n"
        f'input [ {{ name: "input" data_type: TYPE_FP32 dims: [ {in_dim} ] }} ]\n'
        f'output [ {{ name: "output" data_type: TYPE_FP32 dims: [ {out_dim} ] }} ]\n'
        "dynamic_batching { }\n"  # requests that arrive while a batch runs go together into the next one
    ).encode()


# Inputs and outputs are left to the server, which reads them from the ONNX graph. The parameters are what the
# README's outcome and prediction-log examples use.
DIGITS_CONFIG = b"""name: "digits"
platform: "onnxruntime_onnx"
max_batch_size: 64
version_policy: { all { } }
# requests sent with an id are remembered: report_outcomes joins the truth with their label (live accuracy)
parameters { key: "outcome_output" value: { string_value: "label" } }
# with `ferry serve --prediction-log FILE`: every request is logged (0 = off)
parameters { key: "prediction_log_rate" value: { string_value: "1" } }
"""
# NaN policy: a missing pixel becomes its training mean; every other value passes unchanged.
DIGITS_PREPROCESS = {"inputs": {"input": [{"op": "impute", "fill": "train_stats.npz:mean"}]}}

IMAGE_SIZE, CROP, IMAGE_CLASSES = 64, 56, 10
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# The config says what clients send; preprocess.json turns it into the graph's FP32 [N, 3, 56, 56].
IMGCLS_CONFIG = (
    'name: "imgcls"\n'
    'platform: "onnxruntime_onnx"\n'
    "max_batch_size: 64\n"
    f'input [ {{ name: "image" data_type: TYPE_UINT8 dims: [ {IMAGE_SIZE}, {IMAGE_SIZE}, 3 ] }} ]\n'
    f'output [ {{ name: "probabilities" data_type: TYPE_FP32 dims: [ {IMAGE_CLASSES} ] }} ]\n'
).encode()
IMGCLS_PREPROCESS = {
    "inputs": {
        "image": [
            {
                "op": "image",
                "height": IMAGE_SIZE,
                "width": IMAGE_SIZE,
                "channels": 3,
                "crop": CROP,
                "scale": 1 / 255,
                "mean": IMAGENET_MEAN,
                "std": IMAGENET_STD,
            }
        ]
    }
}


def _json(doc: object) -> bytes:
    return (json.dumps(doc, indent=2) + "\n").encode()


def dense_relu_net(name: str, sizes: Sequence[int], seed: int = 0) -> onnx.ModelProto:
    """Gemm layers of ``sizes`` (input width first), Relu between them: ``input`` [N, sizes[0]] -> ``output``.

    Weights are He-initialised (normal, std sqrt(2 / fan_in)) and biases small, so activations keep roughly
    unit scale and outputs for unit-scale inputs stay finite and small.
    """
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    initializers: list[TensorProto] = []
    x = "input"
    layers = list(itertools.pairwise(sizes))
    for i, (fan_in, fan_out) in enumerate(layers):
        weight = rng.standard_normal((fan_out, fan_in), dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        bias = rng.standard_normal(fan_out, dtype=np.float32) * np.float32(0.01)
        initializers += [numpy_helper.from_array(weight, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        last = i == len(layers) - 1
        y = "output" if last else f"gemm{i}"
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [y], transB=1))
        if not last:
            x = f"relu{i}"
            nodes.append(helper.make_node("Relu", [y], [x]))
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", sizes[-1]])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def small_cnn(name: str, seed: int = 0) -> onnx.ModelProto:
    """``image`` FP32 [N, 3, 56, 56] -> Conv 3x3/2 (16) -> Relu -> Conv 3x3/2 (32) -> Relu -> GlobalAveragePool
    -> Gemm 10 -> Softmax -> ``probabilities`` [N, 10]. He-initialised from a fixed seed."""
    rng = np.random.default_rng(seed)

    def he(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))

    initializers = [
        numpy_helper.from_array(he((16, 3, 3, 3), 27), "conv0_w"),
        numpy_helper.from_array(np.zeros(16, np.float32), "conv0_b"),
        numpy_helper.from_array(he((32, 16, 3, 3), 144), "conv1_w"),
        numpy_helper.from_array(np.zeros(32, np.float32), "conv1_b"),
        numpy_helper.from_array(he((IMAGE_CLASSES, 32), 32), "fc_w"),
        numpy_helper.from_array(np.zeros(IMAGE_CLASSES, np.float32), "fc_b"),
    ]
    conv = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["image", "conv0_w", "conv0_b"], ["conv0"], **conv),
        helper.make_node("Relu", ["conv0"], ["relu0"]),
        helper.make_node("Conv", ["relu0", "conv1_w", "conv1_b"], ["conv1"], **conv),
        helper.make_node("Relu", ["conv1"], ["relu1"]),
        helper.make_node("GlobalAveragePool", ["relu1"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"]),
        helper.make_node("Gemm", ["features", "fc_w", "fc_b"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, CROP, CROP])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", IMAGE_CLASSES])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def _build_imgcls() -> Files:
    return {
        "config.pbtxt": IMGCLS_CONFIG,
        "preprocess.json": _json(IMGCLS_PREPROCESS),
        "1/model.onnx": small_cnn("imgcls").SerializeToString(),
    }


def _dense(name: str, sizes: Sequence[int]) -> ExampleModel:
    def build() -> Files:
        model = dense_relu_net(name, sizes)
        return {
            "config.pbtxt": _dense_config(name, sizes[0], sizes[-1]),
            "1/model.onnx": model.SerializeToString(),
        }

    return ExampleModel(("config.pbtxt", "1/model.onnx"), build, _dense_config(name, sizes[0], sizes[-1]))


def digits_classifiers() -> dict[int, Pipeline]:
    """The unfitted classifier of each ``digits`` version: two different model families."""
    return {
        1: make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)),
        2: make_pipeline(RandomForestClassifier(n_estimators=50, random_state=0)),
    }


def sklearn_to_onnx(pipeline: Pipeline, name: str, n_features: int) -> onnx.ModelProto:
    """Convert a fitted classifier pipeline: ``input`` FP32 [N, n_features] -> ``label`` INT64 [N] and
    ``probabilities`` FP32 [N, classes]. ZipMap is off: it would make probabilities a sequence of maps."""
    model = convert_sklearn(
        pipeline,
        initial_types=[("input", FloatTensorType([None, n_features]))],
        options={id(pipeline[-1]): {"zipmap": False}},
        target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET},
    )
    outputs = [output.name for output in model.graph.output]
    if outputs != ["label", "probabilities"]:
        raise RuntimeError(f"skl2onnx named the outputs {outputs}, expected ['label', 'probabilities']")
    # skl2onnx lists the default opset twice and names the graph with a random uuid: keep one entry per domain
    # and a fixed name, so the file is the same on every run.
    opsets = {opset.domain: opset.version for opset in model.opset_import}
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in opsets.items())
    model.graph.name = name
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_param = "batch"  # unnamed otherwise, like the Gemm models'
    onnx.checker.check_model(model)
    return model


def onnx_accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of the ``label`` output of a converted classifier, run in onnxruntime."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (labels,) = session.run(["label"], {"input": x})
    return float(np.mean(labels == y))


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]  # stubs fear a key named allow_pickle
    return buffer.getvalue()


def drift_reference(x_train: np.ndarray) -> bytes:
    """``drift_reference.npz`` beside the digits versions: per-feature bin edges, histogram counts, means and
    variances of the training split (``ferry.server.observability.drift.DriftReference``); its presence turns
    drift monitoring on."""
    return DriftReference.from_training(x_train).to_bytes()


def _build_digits() -> Files:
    x, y = load_digits(return_X_y=True)
    x, y = x.astype(np.float32), y.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    files: Files = {"config.pbtxt": DIGITS_CONFIG, "preprocess.json": _json(DIGITS_PREPROCESS)}
    for version, pipeline in digits_classifiers().items():
        pipeline.fit(x_train, y_train)
        model = sklearn_to_onnx(pipeline, f"digits_v{version}", x.shape[1])
        accuracy = onnx_accuracy(model, x_test, y_test)
        print(f"digits v{version} ({type(pipeline[-1]).__name__}): held-out accuracy {accuracy:.4f}")
        if accuracy <= MIN_DIGITS_ACCURACY:
            raise RuntimeError(f"digits v{version} accuracy {accuracy:.4f} is not above {MIN_DIGITS_ACCURACY}")
        files[f"{version}/model.onnx"] = model.SerializeToString()
    files["heldout.npz"] = _npz(X=x_test, y=y_test)
    files["train_stats.npz"] = _npz(
        mean=x_train.mean(axis=0), std=x_train.std(axis=0), min=x_train.min(axis=0), max=x_train.max(axis=0)
    )
    files["drift_reference.npz"] = drift_reference(x_train)
    return files


MODELS: dict[str, ExampleModel] = {
    "mlp": _dense("mlp", (256, 1024, 1024, 10)),
    "tiny": _dense("tiny", (16, 4)),
    "digits": ExampleModel(
        (
            "config.pbtxt",
            "preprocess.json",
            "1/model.onnx",
            "2/model.onnx",
            "heldout.npz",
            "train_stats.npz",
            "drift_reference.npz",
        ),
        _build_digits,
        DIGITS_CONFIG,
    ),
    "imgcls": ExampleModel(("config.pbtxt", "preprocess.json", "1/model.onnx"), _build_imgcls, IMGCLS_CONFIG),
}


def write_atomic(path: pathlib.Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``: readers see the old
    file or the whole new one, never part of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def build_repository(out: pathlib.Path, force: bool = False) -> None:
    """Write every example model under ``out``; skip a model whose files all exist unless ``force``, but bring
    its config.pbtxt up to date."""
    for name, model in MODELS.items():
        model_dir = out / name
        if not force and all((model_dir / file).is_file() for file in model.files):
            config = model_dir / "config.pbtxt"
            if config.read_bytes() != model.config:
                write_atomic(config, model.config)
                print(f"{name}: config.pbtxt updated in {model_dir}")
            else:
                print(f"{name}: up to date in {model_dir} (--force rewrites it)")
            continue
        started = time.perf_counter()
        files = model.build()
        if set(files) != set(model.files):
            raise RuntimeError(f"{name} built {sorted(files)}, expected {sorted(model.files)}")
        for file, data in files.items():
            write_atomic(model_dir / file, data)
        print(f"{name}: wrote {len(files)} files to {model_dir} in {time.perf_counter() - started:.2f} s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="repository root (%(default)s)")
    parser.add_argument("--force", action="store_true", help="rewrite models whose files already exist")
    args = parser.parse_args(argv)
    build_repository(args.out, force=args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
