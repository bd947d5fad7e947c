"""Preprocessing through a real server: imgcls (uint8 images) and digits (NaN imputation) with dynamic batching on,
and string categories hashed to one-hot columns.

Every answer is checked against the numpy reference of the declared preprocessing followed by onnxruntime on the raw
ONNX file, in this process. Batches are made deterministic with a preferred batch size and a long window: the batch
leaves exactly when the requests sent together have all arrived.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from sklearn.utils import murmurhash3_32

from ferry.client import AsyncClient, Client, InvalidArgument
from ferry.kernels.image import ImageSpec, image_to_nchw_ref
from ferry.kernels.tabular import one_hot_ref
from tests import models
from tests.serving import running_server

ROWS = [1, 2, 1, 3, 1]  # one batch of 8 rows from 5 requests
BATCHING = "dynamic_batching { preferred_batch_size: [ 8 ] max_queue_delay_microseconds: 30000000 }\n"
IMAGENET = {"scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


@pytest.fixture(scope="module")
def repo(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """imgcls and digits as the examples have them, with dynamic batching switched on."""
    root = tmp_path_factory.mktemp("preprocess")
    for name in ("imgcls", "digits"):
        shutil.copytree(example_repo / name, root / name)
        config = root / name / "config.pbtxt"
        config.write_text(config.read_text() + BATCHING)
    return root


@pytest.fixture(scope="module")
def address(repo: Path) -> Iterator[str]:
    with running_server(repo, http_port=None) as address:
        yield address


@pytest.fixture(scope="module")
def client(address: str) -> Iterator[Client]:
    with Client(address, timeout_s=60) as c:
        yield c


def onnx_reference(path: Path, name: str, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return list(session.run(None, {name: x}))


def send_together(address: str, model: str, name: str, parts: list[np.ndarray], version: int | None = None) -> list:
    """Send one request per part at once (they form one batch); returns each request's outputs."""

    async def run() -> list:
        async with AsyncClient(address, timeout_s=60) as ferry:
            return await asyncio.gather(*(ferry.infer(model, {name: part}, version) for part in parts))

    return asyncio.run(run())


def batch_sizes(client: Client, model: str, version: int = 1) -> dict[int, int]:
    (stats,) = client.statistics(model, version)
    return {b.batch_size: b.compute_infer.count for b in stats.batch_stats}


def test_imgcls_reports_what_clients_send(client: Client) -> None:
    metadata = client.model_metadata("imgcls")
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("image", "UINT8", [-1, 64, 64, 3])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("probabilities", "FP32", [-1, 10])]
    config = client.model_config("imgcls")
    assert [(t.name, list(t.dims)) for t in config.input] == [("image", [64, 64, 3])]


def test_imgcls_batched_answers_equal_reference(client: Client, address: str, repo: Path) -> None:
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 256, (rows, 64, 64, 3), dtype=np.uint8) for rows in ROWS]
    before = batch_sizes(client, "imgcls")
    answers = send_together(address, "imgcls", "image", parts)
    assert batch_sizes(client, "imgcls").get(8, 0) == before.get(8, 0) + 1  # the five requests ran as one batch
    spec = ImageSpec.build(64, 64, 3, crop=(56, 56), **IMAGENET)  # type: ignore[arg-type]
    graph_input = image_to_nchw_ref(np.concatenate(parts), spec)
    (expected,) = onnx_reference(repo / "imgcls" / "1" / "model.onnx", "image", graph_input)
    got = np.concatenate([answer["probabilities"] for answer in answers])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got[0], got[1])  # different images, different answers


def test_imgcls_single_request(client: Client, repo: Path) -> None:
    """A request alone in its batch (8 rows: the batch leaves at once): the read-only view of the message goes
    straight to the kernel."""
    image = np.full((8, 64, 64, 3), 128, dtype=np.uint8)
    image[:, 4:60, 4:60] = np.arange(56, dtype=np.uint8)[:, None, None]  # a gradient, all inside the crop
    image[:, :4] = 255  # outside the crop: no effect
    image[1] = 0
    got = client.infer("imgcls", {"image": image}, outputs=["probabilities"])["probabilities"]
    spec = ImageSpec.build(64, 64, 3, crop=(56, 56), **IMAGENET)  # type: ignore[arg-type]
    (expected,) = onnx_reference(repo / "imgcls" / "1" / "model.onnx", "image", image_to_nchw_ref(image, spec))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("shape", "dtype", "message"),
    [
        ((1, 60, 64, 3), np.uint8, r"expected shape \[-1, 64, 64, 3\], got \[1, 60, 64, 3\]"),
        ((1, 64, 64, 1), np.uint8, r"expected shape \[-1, 64, 64, 3\], got \[1, 64, 64, 1\]"),
        ((1, 64, 64, 4), np.uint8, r"expected shape \[-1, 64, 64, 3\], got \[1, 64, 64, 4\]"),
        ((1, 3, 64, 64), np.uint8, r"expected shape \[-1, 64, 64, 3\], got \[1, 3, 64, 64\]"),  # NCHW sent
        ((64, 64, 3), np.uint8, r"expected shape \[-1, 64, 64, 3\] \(rank 4\), got \[64, 64, 3\]"),
        ((1, 64, 64, 3), np.float32, r"expected datatype UINT8 \(shape \[-1, 64, 64, 3\]\), got 'FP32'"),
    ],
)
def test_bad_images_are_invalid_arguments(client: Client, shape: tuple[int, ...], dtype: type, message: str) -> None:
    with pytest.raises(InvalidArgument, match=r"model 'imgcls' version 1 input 'image': " + message) as caught:
        client.infer("imgcls", {"image": np.zeros(shape, dtype=dtype)})
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_digits_nan_policy(client: Client, address: str, repo: Path, example_repo: Path) -> None:
    """digits' declared policy: a NaN pixel becomes that pixel's training mean; finite pixels pass unchanged.
    Both versions, requests batched together."""
    with np.load(example_repo / "digits" / "heldout.npz") as data:
        x = np.ascontiguousarray(data["X"][: sum(ROWS)], dtype=np.float32)
    with np.load(example_repo / "digits" / "train_stats.npz") as stats:
        mean = stats["mean"].astype(np.float32)
    x[::2, ::3] = np.nan  # every other row loses a third of its pixels
    x[1, :] = np.nan  # and one row all of them
    parts = np.split(x, np.cumsum(ROWS)[:-1])
    for version in (1, 2):
        answers = send_together(address, "digits", "input", parts, version)
        label, probabilities = onnx_reference(
            repo / "digits" / str(version) / "model.onnx", "input", np.where(np.isnan(x), mean, x)
        )
        np.testing.assert_array_equal(np.concatenate([a["label"] for a in answers]), label)
        np.testing.assert_allclose(
            np.concatenate([a["probabilities"] for a in answers]), probabilities, rtol=1e-5, atol=1e-6
        )
        assert batch_sizes(client, "digits", version).get(8, 0) >= 1
    finite = np.nan_to_num(x, nan=3.0)  # 8 rows in one request: no NaN, nothing to change
    (label, probabilities) = onnx_reference(repo / "digits" / "1" / "model.onnx", "input", finite)
    np.testing.assert_allclose(client.infer("digits", {"input": finite}, 1)["probabilities"], probabilities, rtol=1e-6)


def test_a_bad_declaration_fails_only_its_model(example_repo: Path, tmp_path: Path) -> None:
    for name in ("imgcls", "tiny"):
        shutil.copytree(example_repo / name, tmp_path / name)
    (tmp_path / "imgcls" / "preprocess.json").write_text('{"inputs": {"image": [{"op": "normalise"}]}}')
    with running_server(tmp_path, http_port=None) as address, Client(address, timeout_s=60) as ferry:
        index = {(m.name, m.version): (m.state, m.reason) for m in ferry.repository_index()}
        state, reason = index[("imgcls", "1")]
        assert state == "UNAVAILABLE"
        assert "model 'imgcls' preprocess.json: input 'image' step 1 (normalise): unknown op 'normalise'" in reason
        assert ferry.infer("tiny", {"input": np.ones((1, 16), np.float32)})["output"].shape == (1, 4)


def test_string_categories_hash_to_one_hot(tmp_path: Path) -> None:
    """BYTES categories -> stable bucket ids -> one-hot FP32, through the server (scale: output = 1 * input)."""
    models.write_scale(tmp_path / "categories" / "1" / "model.onnx", 1.0)
    steps = [{"op": "hash", "buckets": 2, "seed": 0}, {"op": "one_hot", "cardinalities": [2, 2]}]
    (tmp_path / "categories" / "preprocess.json").write_text(json.dumps({"inputs": {"input": steps}}))
    items = np.array([["red", "small"], ["blue", "large"], ["", "größer"]], dtype=object)
    codes = np.array([[murmurhash3_32(s, 0, positive=True) % 2 for s in row] for row in items])
    with running_server(tmp_path, http_port=None) as address, Client(address, timeout_s=60) as ferry:
        (spec,) = ferry.model_metadata("categories").inputs
        assert (spec.datatype, list(spec.shape)) == ("BYTES", [-1, 2])
        got = ferry.infer("categories", {"input": items})["output"]
    np.testing.assert_array_equal(got, one_hot_ref(codes, np.array([2, 2])))
