"""Model lifecycle through real servers (issue 15): swaps that lose nothing, control modes, warmup, provenance, the
SDK's load/unload, and the acceptance run: reloads, a swap, a failed reload, an unload and a poll under sustained
unary and streaming load, with every answer checked against onnxruntime for the version the response names."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
from onnx import numpy_helper
from tritonclient.utils import InferenceServerException

from ferry.client import Client, InvalidArgument, NotFound, ResourceExhausted
from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client._proto import grpc_service_pb2_grpc as pb_grpc
from tests.integration.test_rpcs import outputs_of, request_for
from tests.serving import BackgroundServer, FerryProcess, background_server

EXPLICIT_ALL = {"model_control_mode": "explicit", "load_models": ("*",)}
MLP_BATCHED = (
    'name: "mlp"\nmax_batch_size: 128\n'
    "dynamic_batching { preferred_batch_size: [ 8, 16 ] max_queue_delay_microseconds: 2000 }\n"
)


def copy_models(example_repo: Path, root: Path, *names: str) -> Path:
    for name in names:
        shutil.copytree(example_repo / name, root / name)
    return root


def write_mlp_variant(source: Path, target: Path, shift: float) -> None:
    """``mlp`` with ``shift`` added to its last bias: another version whose answers differ."""
    model = onnx.load(str(source))
    for i, init in enumerate(model.graph.initializer):
        if init.name == "b2":
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + shift, "b2"))
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target))


def index_of(stub: pb_grpc.GRPCInferenceServiceStub) -> dict[tuple[str, str], tuple[str, str]]:
    return {(m.name, m.version): (m.state, m.reason) for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}


def infer_tiny(stub: pb_grpc.GRPCInferenceServiceStub, version: str = "") -> pb.ModelInferResponse:
    return stub.ModelInfer(request_for("tiny", {"input": np.ones((1, 16), np.float32)}, version), timeout=30)


# ---- swaps that lose nothing --------------------------------------------------------------------------------


def test_a_failed_reload_keeps_the_serving_version_ready(
    example_repo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before issue 15 a corrupt file on reload took the model offline (UNAVAILABLE); now the build that served
    keeps serving, and the index, the load call and /metrics tell what failed."""
    repo = copy_models(example_repo, tmp_path, "tiny")
    with background_server(repo, **EXPLICIT_ALL) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        before = infer_tiny(stub)
        (repo / "tiny" / "1" / "model.onnx").write_bytes(b"not an onnx model")
        with pytest.raises(grpc.RpcError) as err:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="tiny"), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "version 1" in err.value.details() and "serving versions [1]" in err.value.details()
        assert stub.ModelReady(pb.ModelReadyRequest(name="tiny")).ready
        assert stub.ModelReady(pb.ModelReadyRequest(name="tiny", version="1")).ready
        after = infer_tiny(stub)
        assert after.model_version == "1" and after.raw_output_contents == before.raw_output_contents
        state, reason = index_of(stub)[("tiny", "1")]
        assert state == "READY" and "last load failed" in reason and "onnxruntime cannot load" in reason
        metrics = scrape(server)
        assert 'ferry_model_load_failed{model="tiny",version="1"} 1.0' in metrics
        logged = [r.getMessage() for r in caplog.records if r.name == "ferry.server.models.repository"]
        assert any("reload of version 1 failed, still serving 1 (sha256" in line for line in logged), logged


def test_a_broken_config_keeps_every_serving_version(example_repo: Path, tmp_path: Path) -> None:
    repo = copy_models(example_repo, tmp_path, "digits")
    with background_server(repo, **EXPLICIT_ALL) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        (repo / "digits" / "config.pbtxt").write_text("max_batch_size: [oops\n")
        with pytest.raises(grpc.RpcError) as err:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="digits"), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "config.pbtxt" in err.value.details()
        index = index_of(stub)
        for version in ("1", "2"):
            assert index[("digits", version)][0] == "READY" and "config.pbtxt" in index[("digits", version)][1]
            assert stub.ModelReady(pb.ModelReadyRequest(name="digits", version=version)).ready


def test_loads_of_different_models_run_side_by_side_and_one_models_loads_wait_in_turn(
    example_repo: Path, tmp_path: Path
) -> None:
    """mlp's warmup reads its sample from a named pipe, so its load blocks (in a load thread) until the test writes:
    meanwhile tiny keeps answering (the loop is free), digits loads (another load thread), and a second load of mlp
    waits for the first."""
    repo = copy_models(example_repo, tmp_path, "mlp", "tiny", "digits")
    (repo / "mlp" / "config.pbtxt").write_text(
        'name: "mlp"\nmax_batch_size: 4\nmodel_warmup [ { name: "pipe" batch_size: 1 inputs { key: "input" value: '
        '{ data_type: TYPE_FP32 dims: [ 256 ] input_data_file: "x.bin" } } } ]\n'
    )
    (repo / "mlp" / "warmup").mkdir()
    pipe = repo / "mlp" / "warmup" / "x.bin"
    os.mkfifo(pipe)
    sample = np.ones(256, np.float32).tobytes()
    with (
        background_server(repo, model_control_mode="explicit", load_models=("tiny",), model_load_threads=2) as server,
        grpc.insecure_channel(server.address) as channel,
        ThreadPoolExecutor(2) as callers,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def load(name: str) -> None:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name), timeout=120)

        loads = [callers.submit(load, "mlp"), callers.submit(load, "mlp")]
        with pipe.open("wb") as writer:  # opens once one mlp load reads the pipe: it is blocked in its warmup now
            for _ in range(20):
                assert infer_tiny(stub).model_version == "1"
            load("digits")  # on the other load thread
            assert stub.ModelReady(pb.ModelReadyRequest(name="digits")).ready
            assert not any(f.done() for f in loads)
            assert not stub.ModelReady(pb.ModelReadyRequest(name="mlp")).ready
            writer.write(sample)
        done, waiting = wait(loads, timeout=120, return_when=FIRST_COMPLETED)
        assert len(done) == 1 and len(waiting) == 1
        done.pop().result()
        with pipe.open("wb") as writer:  # the other load reads the pipe only now that the first one finished
            assert not waiting.pop().done()
            writer.write(sample)
        for f in loads:
            f.result(timeout=120)
        assert stub.ModelReady(pb.ModelReadyRequest(name="mlp")).ready


# ---- control modes ------------------------------------------------------------------------------------------


def test_the_none_mode_refuses_load_and_unload_as_triton_does(example_repo: Path, tmp_path: Path) -> None:
    repo = copy_models(example_repo, tmp_path, "tiny")
    with background_server(repo) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for call in (
            lambda: stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="tiny")),
            lambda: stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="tiny")),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "explicit model load / unload is not allowed if polling is enabled" in err.value.details()
        assert infer_tiny(stub).model_version == "1"  # loaded at start, untouched


def test_explicit_mode_loads_only_the_named_models_and_takes_config_and_files(
    example_repo: Path, tmp_path: Path
) -> None:
    repo = copy_models(example_repo, tmp_path, "tiny", "mlp", "digits")
    with background_server(repo, model_control_mode="explicit", load_models=("tiny",)) as server:
        client = tc.InferenceServerClient(server.address)
        try:
            assert client.is_model_ready("tiny")
            assert not client.is_model_ready("mlp") and not client.is_model_ready("digits")
            states = {m.name: m.state for m in client.get_model_repository_index().models}
            assert states == {"tiny": "READY", "mlp": "UNAVAILABLE", "digits": "UNAVAILABLE"}

            # config override: the JSON config is used instead of config.pbtxt
            config = {"name": "mlp", "max_batch_size": 8, "platform": "onnxruntime_onnx"}
            client.load_model("mlp", config=json.dumps(config))
            assert client.get_model_config("mlp").config.max_batch_size == 8

            # file upload (tritonclient takes the parameter names, "file:" included): a model nowhere on disk
            tiny_bytes = (example_repo / "tiny" / "1" / "model.onnx").read_bytes()
            uploaded = json.dumps({"name": "uploaded", "max_batch_size": 4})
            client.load_model("uploaded", config=uploaded, files={"file:3/model.onnx": tiny_bytes})
            assert client.is_model_ready("uploaded", "3")
            x = np.arange(32, dtype=np.float32).reshape(2, 16)
            expected = ort.InferenceSession(str(example_repo / "tiny" / "1" / "model.onnx")).run(None, {"input": x})
            inputs = [tc.InferInput("input", [2, 16], "FP32")]
            inputs[0].set_data_from_numpy(x)
            result = client.infer("uploaded", inputs)
            np.testing.assert_allclose(result.as_numpy("output"), expected[0], rtol=1e-5)
            config_back = client.get_model_config("uploaded").config
            assert config_back.max_batch_size == 4
            assert config_back.parameters["ferry.sha256"].string_value == hashlib.sha256(tiny_bytes).hexdigest()

            with pytest.raises(InferenceServerException) as err:  # files without a config: refused
                client.load_model("other", files={"file:1/model.onnx": tiny_bytes})
            assert "config" in str(err.value)
            with pytest.raises(InferenceServerException) as err:  # a path out of the model folder: refused
                client.load_model("other", config=uploaded.replace("uploaded", "other"), files={"file:../x": b""})
            assert "relative path" in str(err.value)
            for name in ("../tiny", "..", "a/b"):  # a model name never leaves the repository
                with pytest.raises(InferenceServerException) as err:
                    client.load_model(name, config=uploaded, files={"file:1/model.onnx": tiny_bytes})
                assert "must be a directory name" in str(err.value)
            client.unload_model("uploaded")
            assert not client.is_model_ready("uploaded")
        finally:
            client.close()


def test_tritonclient_http_loads_a_config_and_files_over_rest(example_repo: Path, tmp_path: Path) -> None:
    """Triton's HTTP API carries a ``file:`` parameter as base64 (tritonclient.http encodes it): the same upload as
    over gRPC; what is not base64 is refused 400."""
    import tritonclient.http as th

    tiny_bytes = (example_repo / "tiny" / "1" / "model.onnx").read_bytes()
    with background_server(tmp_path, model_control_mode="explicit") as server:
        client = th.InferenceServerClient(f"127.0.0.1:{server.server.http_port}")
        try:
            config = json.dumps({"name": "uploaded", "max_batch_size": 4})
            client.load_model("uploaded", config=config, files={"file:2/model.onnx": tiny_bytes})
            assert client.is_model_ready("uploaded", "2")
            assert client.get_model_config("uploaded")["max_batch_size"] == 4
            x = np.ones((1, 16), np.float32)
            inputs = [th.InferInput("input", [1, 16], "FP32")]
            inputs[0].set_data_from_numpy(x)
            expected = ort.InferenceSession(str(example_repo / "tiny" / "1" / "model.onnx")).run(None, {"input": x})
            np.testing.assert_allclose(client.infer("uploaded", inputs).as_numpy("output"), expected[0], rtol=1e-5)
        finally:
            client.close()
            del client
            gc.collect()  # tritonclient.http's gevent objects freed on this thread (see tests/integration/test_rest.py)
        body = json.dumps({"parameters": {"config": config, "file:1/model.onnx": "not base64!"}}).encode()
        url = f"http://127.0.0.1:{server.server.http_port}/v2/repository/models/uploaded/load"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=30)
        assert err.value.code == 400 and b"base64" in err.value.read()


def test_models_served_from_uploads_are_bounded(example_repo: Path, tmp_path: Path) -> None:
    """Each uploaded model holds a session and threads, and the client picks the names: past the bound (2 here, 64
    by default) a new upload is RESOURCE_EXHAUSTED; reloading an uploaded model or unloading one is always taken."""
    tiny_bytes = (example_repo / "tiny" / "1" / "model.onnx").read_bytes()
    with background_server(tmp_path, model_control_mode="explicit") as server, Client(server.address) as client:
        server.server.repository.max_uploaded_models = 2

        def upload(name: str) -> None:
            client.load(name, config={"name": name}, files={"1/model.onnx": tiny_bytes})

        upload("a")
        upload("b")
        with pytest.raises(ResourceExhausted, match="unload one first"):
            upload("c")
        upload("a")  # a reload of an uploaded model replaces it
        client.unload("b")
        upload("c")
        assert {e.name for e in client.repository_index(ready=True)} == {"a", "c"}


def test_ferry_serve_takes_the_lifecycle_flags(example_repo: Path, tmp_path: Path) -> None:
    repo = copy_models(example_repo, tmp_path / "repo", "tiny", "mlp")
    flags = ("--model-control-mode", "explicit", "--load-model", "tiny", "--model-load-threads", "1")
    process = FerryProcess(repo, *flags)
    process.start()
    try:
        with grpc.insecure_channel(process.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert {k: v[0] for k, v in index_of(stub).items()} == {("tiny", "1"): "READY", ("mlp", ""): "UNAVAILABLE"}
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="mlp"), timeout=120)
            assert stub.ModelReady(pb.ModelReadyRequest(name="mlp")).ready
    finally:
        process.stop()


def test_the_sdk_loads_unloads_and_reads_the_index(example_repo: Path, tmp_path: Path) -> None:
    repo = copy_models(example_repo, tmp_path, "tiny", "digits")
    with (
        background_server(repo, model_control_mode="explicit", load_models=("digits",)) as server,
        Client(server.address) as client,
    ):
        assert {(e.name, e.state) for e in client.repository_index()} >= {("tiny", "UNAVAILABLE")}
        client.load("tiny")
        assert client.model_ready("tiny")
        client.load("tiny", config={"name": "tiny", "max_batch_size": 2})
        assert client.model_config("tiny").max_batch_size == 2
        tiny_bytes = (example_repo / "tiny" / "1" / "model.onnx").read_bytes()
        client.load("up", config={"name": "up", "max_batch_size": 2}, files={"7/model.onnx": tiny_bytes})
        assert client.model_ready("up", 7)
        client.unload("tiny")
        with pytest.raises(NotFound):
            client.infer("tiny", {"input": np.ones((1, 16), np.float32)})
        (repo / "tiny" / "1" / "model.onnx").write_bytes(b"garbage")
        with pytest.raises(InvalidArgument):
            client.load("tiny")
        assert [e.state for e in client.repository_index() if e.name == "tiny"] == ["UNAVAILABLE"]


def test_poll_applies_a_version_once_its_files_settle_and_removes_a_deleted_one(
    example_repo: Path, tmp_path: Path
) -> None:
    """Polls driven one at a time (the server's own poller waits a day here): a new version is served by the
    second poll that sees it; a file still growing between polls is not loaded (no failed attempt either)."""
    repo = copy_models(example_repo, tmp_path, "digits")
    with (
        background_server(repo, model_control_mode="poll", repository_poll_secs=86400) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def poll() -> dict[tuple[str, str], tuple[str, str]]:
            server.call(server.server.repository.poll())
            return index_of(stub)

        source = (repo / "digits" / "1" / "model.onnx").read_bytes()
        (repo / "digits" / "3").mkdir()
        target = repo / "digits" / "3" / "model.onnx"
        target.write_bytes(source[: len(source) // 3])
        assert ("digits", "3") not in poll()  # just appeared: is it still being written?
        with target.open("ab") as f:
            f.write(source[len(source) // 3 : len(source) // 2])
        assert ("digits", "3") not in poll()  # it grew: still being written
        with target.open("ab") as f:
            f.write(source[len(source) // 2 :])
        assert ("digits", "3") not in poll()
        assert poll()[("digits", "3")][0] == "READY"  # unchanged across two polls: loaded
        assert stub.ModelInfer(request_for("digits", {"input": np.zeros((1, 64), np.float32)})).model_version == "3"

        shutil.rmtree(repo / "digits" / "3")
        index = poll()  # the removal is applied once settled too
        index = poll()
        assert ("digits", "3") not in index and index[("digits", "2")][0] == "READY"
        shutil.rmtree(repo / "digits")
        poll()
        poll()
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request_for("digits", {"input": np.zeros((1, 64), np.float32)}))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


# ---- warmup and provenance ----------------------------------------------------------------------------------


def test_model_warmup_runs_the_declared_samples_before_ready(example_repo: Path, tmp_path: Path) -> None:
    repo = copy_models(example_repo, tmp_path, "mlp", "tiny")
    (repo / "mlp" / "config.pbtxt").write_text(
        'name: "mlp"\nmax_batch_size: 16\n'
        "model_warmup [\n"
        '  { name: "zeros" batch_size: 4 count: 3\n'
        '    inputs { key: "input" value: { data_type: TYPE_FP32 dims: [ 256 ] zero_data: true } } },\n'
        '  { name: "file" batch_size: 2\n'
        '    inputs { key: "input" value: { data_type: TYPE_FP32 dims: [ 256 ] input_data_file: "x.bin" } } }\n'
        "]\n"
    )
    (repo / "mlp" / "warmup").mkdir()
    (repo / "mlp" / "warmup" / "x.bin").write_bytes(np.ones((2, 256), np.float32).tobytes())
    (repo / "tiny" / "config.pbtxt").write_text(
        'name: "tiny"\nmax_batch_size: 32\ndynamic_batching { preferred_batch_size: [ 4, 16 ] }\n'
    )
    with background_server(repo, **EXPLICIT_ALL) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def stats(model: str) -> pb.ModelStatistics:
            return stub.ModelStatistics(pb.ModelStatisticsRequest(name=model)).model_stats[0]

        mlp = stats("mlp")
        assert (mlp.execution_count, mlp.inference_count) == (4, 3 * 4 + 2)
        tiny = stats("tiny")  # no model_warmup: one run at batch 1, one at the largest preferred size
        assert (tiny.execution_count, tiny.inference_count) == (2, 1 + 16)
        assert 'ferry_model_warmup_seconds{model="mlp",version="1"}' in scrape(server)

        # a warmup that cannot run fails the load: the serving build stays
        (repo / "mlp" / "warmup" / "x.bin").write_bytes(b"short")
        with pytest.raises(grpc.RpcError) as err:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="mlp"), timeout=60)
        assert "x.bin" in err.value.details() and stub.ModelReady(pb.ModelReadyRequest(name="mlp")).ready


def test_provenance_in_config_index_and_metrics(example_repo: Path, tmp_path: Path) -> None:
    repo = copy_models(example_repo, tmp_path, "tiny")
    digest = hashlib.sha256((repo / "tiny" / "1" / "model.onnx").read_bytes()).hexdigest()
    with background_server(repo) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        params = stub.ModelConfig(pb.ModelConfigRequest(name="tiny")).config.parameters
        assert params["ferry.sha256"].string_value == digest
        assert params["ferry.model_file"].string_value == str(repo / "tiny" / "1" / "model.onnx")
        loaded_at = params["ferry.loaded_at"].string_value
        assert index_of(stub)[("tiny", "1")] == ("READY", f"sha256={digest} loaded_at={loaded_at}")
        metrics = scrape(server)
        assert f'ferry_model_version_info{{model="tiny",sha256="{digest}",version="1"}} 1.0' in metrics
        assert 'ferry_model_load_timestamp_seconds{model="tiny",version="1"}' in metrics


def scrape(server: BackgroundServer) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.http_port}/metrics", timeout=30) as reply:
        return str(reply.read().decode())


# ---- acceptance: lifecycle under sustained load -------------------------------------------------------------


@dataclass
class Traffic:
    """Unary and streaming callers on mlp and digits until stopped; every answer kept with its input."""

    address: str
    answers: dict[tuple[str, str], list[tuple[np.ndarray, dict[str, np.ndarray]]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    count: int = 0

    def versions_seen(self, model: str) -> set[str]:
        return {v for m, v in list(self.answers) if m == model}

    def _record(self, x: np.ndarray, reply: pb.ModelInferResponse) -> None:
        outputs = outputs_of(reply)
        self.answers[(reply.model_name, reply.model_version)].append((x, outputs))
        self.count += 1

    async def _unary(self, stub: pb_grpc.GRPCInferenceServiceStub, model: str, width: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not self.stop.is_set():
            x = rng.random((int(rng.integers(1, 4)), width), dtype=np.float32)
            try:
                self._record(x, await stub.ModelInfer(request_for(model, {"input": x}), timeout=60))
            except grpc.RpcError as err:
                self.failures.append(f"{model} unary: {err.code()} {err.details()}")

    async def _stream(self, stub: pb_grpc.GRPCInferenceServiceStub, model: str, width: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        sent: dict[str, np.ndarray] = {}
        queue: asyncio.Queue[pb.ModelInferRequest | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[pb.ModelInferRequest]:
            while (item := await queue.get()) is not None:
                yield item

        def send(i: int) -> None:
            x = rng.random((1, width), dtype=np.float32)
            sent[str(i)] = x
            queue.put_nowait(request_for(model, {"input": x}, id=str(i)))

        i = 0
        for _ in range(4):  # four in flight on the stream at a time
            send(i)
            i += 1
        try:
            async for reply in stub.ModelStreamInfer(requests(), timeout=600):
                x = sent.pop(reply.infer_response.id)
                if reply.error_message:
                    self.failures.append(f"{model} stream: {reply.error_message}")
                else:
                    self._record(x, reply.infer_response)
                if self.stop.is_set():
                    if not sent:
                        queue.put_nowait(None)
                    continue
                send(i)
                i += 1
        except grpc.RpcError as err:
            self.failures.append(f"{model} stream: {err.code()} {err.details()}")

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            await asyncio.gather(
                *(self._unary(stub, "mlp", 256, seed) for seed in range(3)),
                self._stream(stub, "mlp", 256, 10),
                self._unary(stub, "digits", 64, 20),
                self._stream(stub, "digits", 64, 21),
            )

    @contextlib.contextmanager
    def running(self) -> Iterator[Traffic]:
        def run() -> None:
            try:
                asyncio.run(self._run())
            except BaseException as err:  # a broken caller fails the test, not just its thread
                self.failures.append(f"callers crashed: {err!r}")
                self.stop.set()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.stop.set()
            thread.join(120)
            assert not thread.is_alive(), "the callers did not finish"

    def wait_for(self, condition: Callable[[], bool], what: str, timeout_s: float = 120) -> None:
        """Wait (a generous bound: the machine is shared) until ``condition()`` holds."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline or (self.stop.is_set() and self.failures):
                raise AssertionError(f"timed out waiting for {what}; failures {self.failures[:3]}")
            time.sleep(0.05)

    def check_against(self, files: dict[tuple[str, str], bytes]) -> int:
        """Every answer equals onnxruntime's for the version the response names (``files``: each version's model
        file as it was served); returns how many answers were checked."""
        checked = 0
        for (model, version), answers in self.answers.items():
            session = ort.InferenceSession(files[(model, version)])
            for x, outputs in answers:
                names = [o.name for o in session.get_outputs()]
                expected = dict(zip(names, session.run(names, {"input": x}), strict=True))
                for name, got in outputs.items():
                    np.testing.assert_allclose(got, expected[name], rtol=1e-4, atol=1e-5, err_msg=f"{model} v{version}")
                checked += 1
        return checked


@pytest.mark.parametrize("transport", ["ferry", "grpcio"])
def test_lifecycle_under_load_loses_nothing_explicit(example_repo: Path, tmp_path: Path, transport: str) -> None:
    """20 reloads of mlp, a swap to a new mlp version, a failed reload (corrupt file) and an unload of another model,
    while unary and streaming callers keep mlp (batching on) and digits busy: no request fails, and every answer is
    onnxruntime's for the version the response names."""
    repo = copy_models(example_repo, tmp_path, "mlp", "digits", "tiny")
    (repo / "mlp" / "config.pbtxt").write_text(MLP_BATCHED)
    files = {("mlp", "1"): (repo / "mlp" / "1" / "model.onnx").read_bytes()}
    for v in ("1", "2"):
        files[("digits", v)] = (repo / "digits" / v / "model.onnx").read_bytes()
    with (
        background_server(repo, transport=transport, **EXPLICIT_ALL) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        traffic = Traffic(server.address)
        with traffic.running():
            traffic.wait_for(lambda: traffic.count > 50, "traffic")
            for _ in range(20):
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="mlp"), timeout=120)
            write_mlp_variant(repo / "mlp" / "1" / "model.onnx", repo / "mlp" / "2" / "model.onnx", 1.0)
            files[("mlp", "2")] = (repo / "mlp" / "2" / "model.onnx").read_bytes()
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="mlp"), timeout=120)
            traffic.wait_for(lambda: "2" in traffic.versions_seen("mlp"), "answers from mlp version 2")
            (repo / "mlp" / "2" / "model.onnx").write_bytes(b"corrupt")
            with pytest.raises(grpc.RpcError) as err:
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="mlp"), timeout=120)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            state, reason = index_of(stub)[("mlp", "2")]
            assert state == "READY" and "last load failed" in reason
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="tiny"), timeout=120)
            assert not stub.ModelReady(pb.ModelReadyRequest(name="tiny")).ready
            seen = traffic.count
            traffic.wait_for(lambda: traffic.count > seen + 50, "traffic after the changes")
        assert traffic.failures == []
        assert traffic.versions_seen("mlp") == {"1", "2"} and traffic.versions_seen("digits") == {"2"}
        assert traffic.check_against(files) == traffic.count


def test_lifecycle_under_load_loses_nothing_poll(example_repo: Path, tmp_path: Path) -> None:
    """The poll mode under the same load: a new digits version is picked up, then deleted and drained; mlp reloads
    when its file changes. No request fails; every answer is its version's."""
    repo = copy_models(example_repo, tmp_path, "mlp", "digits")
    (repo / "mlp" / "config.pbtxt").write_text(MLP_BATCHED)
    files = {("mlp", "1"): (repo / "mlp" / "1" / "model.onnx").read_bytes()}
    for v in ("1", "2"):
        files[("digits", v)] = (repo / "digits" / v / "model.onnx").read_bytes()
    files[("digits", "3")] = files[("digits", "1")]
    with background_server(repo, model_control_mode="poll", repository_poll_secs=0.3) as server:
        traffic = Traffic(server.address)
        with traffic.running():
            traffic.wait_for(lambda: traffic.count > 50, "traffic")
            shutil.copytree(repo / "digits" / "1", repo / "digits" / "3")
            traffic.wait_for(lambda: "3" in traffic.versions_seen("digits"), "answers from digits version 3")
            write_mlp_variant(repo / "mlp" / "1" / "model.onnx", repo / "mlp" / "2" / "model.onnx", -1.0)
            files[("mlp", "2")] = (repo / "mlp" / "2" / "model.onnx").read_bytes()
            traffic.wait_for(lambda: "2" in traffic.versions_seen("mlp"), "answers from mlp version 2")
            shutil.rmtree(repo / "digits" / "3")
            with grpc.insecure_channel(server.address) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                traffic.wait_for(lambda: ("digits", "3") not in index_of(stub), "digits version 3 removed")
            seen = traffic.count
            traffic.wait_for(lambda: traffic.count > seen + 50, "traffic after the removal")
        assert traffic.failures == []
        assert traffic.versions_seen("digits") >= {"2", "3"}
        assert traffic.check_against(files) == traffic.count
