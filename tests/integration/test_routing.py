"""Version labels, the weighted traffic split and the shadow, through a real server (models/routing.py,
inference/shadow.py): labels wherever a version is named, a split's observed shares and sticky ids, a shadow's
agreement, prediction-log entries and drops, and the route of every request in /metrics and traces."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from ferry.client import Client
from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client._proto import grpc_service_pb2_grpc as pb_grpc
from ferry.server.observability.telemetry import Tracing
from tests import models
from tests.integration.test_rpcs import outputs_of, request_for
from tests.serving import BackgroundServer, background_server

ONES = np.ones((2, 4), np.float32)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def config(*parameters: tuple[str, str], policy: str = "all { }") -> str:
    lines = [f"version_policy: {{ {policy} }}"]
    lines += [f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in parameters]
    return "\n".join(lines) + "\n"


def copy_versions(source: Path, target: Path, versions: list[tuple[int, int]]) -> None:
    """``target``/<new>/ from ``source``/<old>/ for each (old, new) in ``versions``; other files of the model too."""
    target.mkdir(parents=True)
    for item in source.iterdir():
        if item.is_file() and item.name != "config.pbtxt":
            shutil.copy(item, target / item.name)
    for old, new in versions:
        shutil.copytree(source / str(old), target / str(new))


def write_scale(root: Path, name: str, *parameters: tuple[str, str]) -> None:
    """Versions 1, 2, 3 multiply their input by 1, 2, 3: an answer shows which version made it."""
    for version in (1, 2, 3):
        models.write_scale(root / name / str(version) / "model.onnx", float(version))
    (root / name / "config.pbtxt").write_text(config(*parameters))


def scrape(server: BackgroundServer) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.http_port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def dropped(samples: Samples, **labels: str) -> dict[str, float]:
    """``ferry_shadow_dropped_total`` of one (model, version, shadow_version) by reason (every reason is exported)."""
    out = {}
    for (name, items), value in samples.items():
        found = dict(items)
        if name == "ferry_shadow_dropped_total" and {k: found.get(k) for k in labels} == labels:
            out[found["reason"]] = value
    return out


@pytest.fixture(scope="module", params=["ferry", "grpcio"])
def served(
    request: pytest.FixtureRequest, example_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[BackgroundServer, Path]]:
    """Both transports: routing lives above them, and this shows it."""
    root = tmp_path_factory.mktemp("routing")
    write_scale(root, "scale", ("version_labels", "stable=1,canary=3"))
    copy_versions(example_repo / "tiny", root / "tiny", [(1, 1), (1, 2)])
    (root / "tiny" / "config.pbtxt").write_text(config(("traffic_split", "1=90,2=10")))
    # digits 1 (logistic regression) shadowed by digits 2 (random forest): they disagree on some digits
    copy_versions(example_repo / "digits", root / "digits", [(1, 1), (2, 2)])
    shadow = ("shadow", "version=2,fraction=1")
    (root / "digits" / "config.pbtxt").write_text(config(shadow, ("prediction_log_rate", "1")))
    # the same, shadowed by a copy of itself: they agree on everything
    copy_versions(example_repo / "digits", root / "digitsame", [(1, 1), (1, 2)])
    (root / "digitsame" / "config.pbtxt").write_text(config(shadow))
    copy_versions(example_repo / "mlp", root / "mlp", [(1, 1), (1, 2)])  # shadow bounded to one run at once
    (root / "mlp" / "config.pbtxt").write_text(config(("shadow", "version=2,fraction=1,max_in_flight=1")))
    write_scale(root, "unloaded", ("version_labels", "stable=1,canary=7"))
    write_scale(root, "malformed", ("traffic_split", "1=90,2=ten"))
    log = root.parent / f"{root.name}-predictions.jsonl"
    with background_server(root, prediction_log_path=log, transport=request.param) as server:
        yield server, log


@pytest.fixture(scope="module")
def stub(served: tuple[BackgroundServer, Path]) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(served[0].address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


# ---- labels ---------------------------------------------------------------------------------------------------


def test_a_label_names_its_version_on_infer_ready_metadata_config_and_statistics(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    for label, version in (("stable", 1), ("canary", 3), ("1", 1), ("", 3)):
        response = stub.ModelInfer(request_for("scale", {"input": ONES}, version=label), timeout=30)
        assert response.model_version == str(version), label
        np.testing.assert_array_equal(outputs_of(response)["output"], ONES * version)
    assert stub.ModelReady(pb.ModelReadyRequest(name="scale", version="canary"), timeout=30).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="scale", version="beta"), timeout=30).ready
    metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="scale", version="stable"), timeout=30)
    assert list(metadata.versions) == ["1"]
    assert stub.ModelConfig(pb.ModelConfigRequest(name="scale", version="canary"), timeout=30).config.name == "scale"
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="scale", version="canary"), timeout=30)
    assert [s.version for s in stats.model_stats] == ["3"]


def test_each_request_is_counted_by_its_version_and_route(
    served: tuple[BackgroundServer, Path], stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    server, _ = served
    before = scrape(server)
    for version in ("canary", "canary", "3", "", "stable"):
        stub.ModelInfer(request_for("scale", {"input": ONES}, version=version), timeout=30)
    after = scrape(server)

    def routed(version: str, route: str) -> float:
        labels = {"model": "scale", "version": version, "route": route}
        return sample(after, "ferry_route_requests_total", **labels) - sample(
            before, "ferry_route_requests_total", **labels
        )

    assert (routed("3", "label"), routed("3", "direct"), routed("3", "latest"), routed("1", "label")) == (2, 1, 1, 1)


def test_an_unknown_label_is_refused_with_the_labels_the_model_has(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request_for("scale", {"input": ONES}, version="beta"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "one of its labels ['canary', 'stable'], got 'beta'" in str(caught.value.details())


def test_the_sdk_tritonclient_and_streams_pass_a_label(
    served: tuple[BackgroundServer, Path], stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    with Client(served[0].address) as client:
        result = client.infer_result("scale", {"input": ONES}, version="canary")
        assert result.model_version == "3"
        np.testing.assert_array_equal(result.outputs["output"], ONES * 3)
        assert client.model_ready("scale", "stable")
    triton = tc.InferenceServerClient(served[0].address)
    try:
        given = tc.InferInput("input", list(ONES.shape), "FP32")
        given.set_data_from_numpy(ONES)
        answer = triton.infer("scale", [given], model_version="stable")
        assert answer.get_response().model_version == "1"
        np.testing.assert_array_equal(answer.as_numpy("output"), ONES)
    finally:
        triton.close()
    requests = [request_for("scale", {"input": ONES}, version=v, id=v) for v in ("canary", "stable", "beta")]
    replies = {r.infer_response.id: r for r in stub.ModelStreamInfer(iter(requests), timeout=30)}
    assert (
        replies["canary"].infer_response.model_version == "3" and replies["stable"].infer_response.model_version == "1"
    )
    assert "one of its labels ['canary', 'stable'], got 'beta'" in replies["beta"].error_message


def test_a_config_naming_a_version_that_is_not_loaded_fails_with_that_version(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30)
    reasons = {(m.name, m.version): (m.state, m.reason) for m in index.models}
    state, reason = reasons[("unloaded", "")]
    assert state == "UNAVAILABLE"
    assert "version_labels (canary=7) names version 7, which is not loaded (loaded: [1, 2, 3]" in reason
    state, reason = reasons[("malformed", "")]
    assert state == "UNAVAILABLE" and "traffic_split entry 2=ten: a weight is an integer" in reason
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request_for("unloaded", {"input": ONES}, version="stable"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "names version 7" in str(caught.value.details())


def test_a_reload_moves_a_label_and_refuses_one_naming_an_unloaded_version(tmp_path: Path) -> None:
    write_scale(tmp_path, "scale", ("version_labels", "canary=3"))
    with (
        background_server(tmp_path, http_port=None, model_control_mode="explicit", load_models=("*",)) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def canary() -> str:
            return str(stub.ModelInfer(request_for("scale", {"input": ONES}, "canary"), timeout=30).model_version)

        assert canary() == "3"
        (tmp_path / "scale" / "config.pbtxt").write_text(config(("version_labels", "canary=2")))
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="scale"), timeout=60)
        assert canary() == "2"
        (tmp_path / "scale" / "config.pbtxt").write_text(config(("shadow", "version=9,fraction=0.5")))
        with pytest.raises(grpc.RpcError) as caught:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="scale"), timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "shadow (version=9,fraction=0.5) names version 9, which is not loaded" in str(caught.value.details())


# ---- the split ------------------------------------------------------------------------------------------------


def test_the_split_shares_requests_by_weight_and_keeps_an_id_on_one_version(
    served: tuple[BackgroundServer, Path], stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    server, _ = served
    x = np.ones((1, 16), np.float32)
    before = scrape(server)
    drawn = Counter(stub.ModelInfer(request_for("tiny", {"input": x}), timeout=30).model_version for _ in range(2000))
    assert set(drawn) == {"1", "2"}
    assert abs(drawn["2"] / 2000 - 0.10) <= 0.03, drawn
    ids = [f"user-{i}" for i in range(2000)]
    by_id = {i: stub.ModelInfer(request_for("tiny", {"input": x}, id=i), timeout=30).model_version for i in ids}
    hashed = Counter(by_id.values())
    assert set(hashed) == {"1", "2"} and abs(hashed["2"] / 2000 - 0.10) <= 0.03, hashed
    repeated = Counter[str]()
    for request_id in ids[::40]:  # the same id lands where it landed before
        again = stub.ModelInfer(request_for("tiny", {"input": x}, id=request_id), timeout=30)
        assert again.model_version == by_id[request_id] and again.id == request_id
        repeated[again.model_version] += 1
    named = stub.ModelInfer(request_for("tiny", {"input": x}, version="1"), timeout=30)  # a named version: no split
    assert named.model_version == "1"
    after = scrape(server)

    def routed(version: str, route: str) -> float:
        labels = {"model": "tiny", "version": version, "route": route}
        return sample(after, "ferry_route_requests_total", **labels) - sample(
            before, "ferry_route_requests_total", **labels
        )

    for version in ("1", "2"):
        assert routed(version, "split") == drawn[version] + hashed[version] + repeated[version]
    assert routed("1", "direct") == 1 and routed("2", "direct") == 0
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="tiny"), timeout=30)
    assert {s.version for s in stats.model_stats} == {"1", "2"} and all(s.inference_count for s in stats.model_stats)


# ---- the shadow -----------------------------------------------------------------------------------------------


def heldout(example_repo: Path) -> np.ndarray:
    return np.load(example_repo / "digits" / "heldout.npz")["X"].astype(np.float32)


def settled(server: BackgroundServer, model: str, sent: int, timeout_s: float = 120) -> Samples:
    """/metrics once every shadow run of ``sent`` shadowed requests answered, failed or was dropped."""
    key = {"model": model, "version": "1", "shadow_version": "2"}
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(server)
        done = sum(sample(samples, f"ferry_shadow_{n}_total", **key) for n in ("runs", "failures"))
        done += sum(dropped(samples, **key).values())
        if done >= sent or time.monotonic() > deadline:
            assert done == sent, f"{model}: {done} of {sent} shadow runs settled"
            return samples
        time.sleep(0.1)


def test_shadow_agreement_moves_when_the_shadow_version_differs(
    served: tuple[BackgroundServer, Path], stub: pb_grpc.GRPCInferenceServiceStub, example_repo: Path
) -> None:
    server, _ = served
    x = heldout(example_repo)[:320]
    for model in ("digits", "digitsame"):
        for i in range(0, len(x), 32):  # one at a time: at most one shadow run in flight, none dropped
            response = stub.ModelInfer(request_for(model, {"input": x[i : i + 32]}, version="1"), timeout=30)
            assert response.model_version == "1"
    key = {"version": "1", "shadow_version": "2"}
    different, same = settled(server, "digits", 10), settled(server, "digitsame", 10)
    assert sample(same, "ferry_shadow_runs_total", model="digitsame", **key) > 0
    assert sample(different, "ferry_shadow_runs_total", model="digits", **key) > 0
    for model, samples in (("digits", different), ("digitsame", same)):
        runs = sample(samples, "ferry_shadow_runs_total", model=model, **key)
        compared = sample(samples, "ferry_shadow_compared_rows_total", model=model, output="label", **key)
        assert compared == 32 * runs
        routes = sample(samples, "ferry_route_requests_total", model=model, version="2", route="shadow")
        assert routes == runs  # counted on the shadow version when it ran
        assert sample(samples, "ferry_shadow_duration_seconds_count", model=model, **key) == runs
    assert sample(same, "ferry_shadow_agreement", model="digitsame", output="label", **key) == 1.0
    assert sample(same, "ferry_shadow_agreement", model="digitsame", output="probabilities", **key) == 1.0
    assert sample(same, "ferry_shadow_mean_abs_difference", model="digitsame", output="probabilities", **key) == 0.0
    agreement = sample(different, "ferry_shadow_agreement", model="digits", output="label", **key)
    assert 0.5 < agreement < 1.0  # two decent classifiers that differ on a few digits
    assert sample(different, "ferry_shadow_mean_abs_difference", model="digits", output="probabilities", **key) > 0


def test_shadowed_requests_are_logged_with_both_outputs(
    served: tuple[BackgroundServer, Path], stub: pb_grpc.GRPCInferenceServiceStub, example_repo: Path
) -> None:
    server, log = served
    x = heldout(example_repo)[:4]
    before = scrape(server)
    key = {"model": "digits", "version": "1", "shadow_version": "2"}
    sent = sum(sample(before, f"ferry_shadow_{n}_total", **key) for n in ("runs", "failures"))
    sent += sum(dropped(before, **key).values())
    for i in range(4):
        stub.ModelInfer(request_for("digits", {"input": x[i : i + 1]}, version="1", id=f"logged-{i}"), timeout=30)
    settled(server, "digits", int(sent) + 4)
    deadline = time.monotonic() + 60
    while True:
        lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        entries = {e["request_id"]: e for e in lines if e["request_id"].startswith("logged-")}
        if len(entries) == 4 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sorted(entries) == [f"logged-{i}" for i in range(4)]  # one line per request, with the shadow in it
    for entry in entries.values():
        assert entry["version"] == 1 and entry["shadow"]["version"] == 2
        assert len(entry["shadow"]["sha256"]) == 64 and entry["shadow"]["sha256"] != entry["sha256"]
        assert set(entry["shadow"]["outputs"]) == set(entry["outputs"]) == {"label", "probabilities"}
        assert entry["shadow"]["outputs"]["label"]["shape"] == [1] and entry["shadow"]["latency_ms"] > 0


def test_shadow_runs_past_their_bound_are_dropped_and_counted_without_failing_a_request(
    served: tuple[BackgroundServer, Path], example_repo: Path
) -> None:
    server, _ = served
    x = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    sent = 48
    with grpc.insecure_channel(server.address) as channel:  # mlp's shadow takes one run at a time
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        calls = [stub.ModelInfer.future(request_for("mlp", {"input": x}, version="1"), timeout=60) for _ in range(sent)]
        responses = [call.result() for call in calls]
    assert all(r.model_version == "1" for r in responses)  # every request answered by the primary
    samples = settled(server, "mlp", sent)
    key = {"model": "mlp", "version": "1", "shadow_version": "2"}
    reasons = dropped(samples, **key)
    assert set(reasons) == {"max_in_flight", "queued", "saturated", "withdrawn", "shutdown"}
    # past the bound of one run at once, or (under the default bound) while the loop was saturated by the 48 calls
    assert reasons["max_in_flight"] + reasons["saturated"] > 0 and reasons["withdrawn"] == reasons["shutdown"] == 0
    assert sample(samples, "ferry_shadow_runs_total", **key) >= 1  # the first: nothing ran before, or the trickle
    assert sample(samples, "ferry_shadow_failures_total", **key) == 0
    assert sample(samples, "ferry_shadow_agreement", output="output", **key) == 1.0  # version 2 is a copy
    assert sample(samples, "ferry_inference_request_success_total", model="mlp", version="1") == sent


def test_shadow_runs_are_shed_while_the_loop_is_saturated_and_resume_once_it_is_not(
    example_repo: Path, tmp_path: Path
) -> None:
    """Bursts of concurrent calls keep the loop busier than its bound (lowered to 0.2 here, so that any machine's
    load crosses it): sampled shadow runs are dropped as ``saturated`` (all but the trickle), counted and logged, and
    no call fails. Once the loop is idle again, every sampled call runs its shadow."""
    root = tmp_path / "repo"
    copy_versions(example_repo / "tiny", root / "tiny", [(1, 1), (1, 2)])
    shadow = ("shadow", "version=2,fraction=1,max_in_flight=1024")
    (root / "tiny" / "config.pbtxt").write_text(config(shadow, ("prediction_log_rate", "1")))
    log = tmp_path / "predictions.jsonl"
    key = {"model": "tiny", "version": "1", "shadow_version": "2"}
    x = np.ones((1, 16), np.float32)
    with background_server(root, prediction_log_path=log, shadow_max_loop_busy=0.2) as server:
        sent = 0
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while not dropped(scrape(server), **key).get("saturated"):
                assert time.monotonic() < deadline, "64 calls at once never saturated the loop"
                burst = [
                    stub.ModelInfer.future(request_for("tiny", {"input": x}, version="1"), timeout=60)
                    for _ in range(64)
                ]
                assert all(call.result().model_version == "1" for call in burst)  # answered by the primary
                sent += len(burst)
            loaded = settled(server, "tiny", sent)
            reasons = dropped(loaded, **key)
            assert reasons["saturated"] > 0 and reasons["max_in_flight"] == 0
            assert sample(loaded, "ferry_inference_request_success_total", model="tiny", version="1") == sent
            failures = [v for (name, labels), v in loaded.items() if name == "ferry_inference_request_failure_total"]
            assert sum(failures) == 0

            while sample(scrape(server), "ferry_event_loop_busy_ratio") >= 0.1:  # idle: under 0.2 * (1 - 0.2)
                assert time.monotonic() < deadline, "the loop did not come back to idle"
                time.sleep(0.2)
            runs = sample(loaded, "ferry_shadow_runs_total", **key)
            for _ in range(3):  # one at a time: a few µs of loop work each
                assert stub.ModelInfer(request_for("tiny", {"input": x}, version="1"), timeout=60).model_version == "1"
            idle = settled(server, "tiny", sent + 3)
        assert sample(idle, "ferry_shadow_runs_total", **key) == runs + 3  # none dropped: the trickle allows one
        assert dropped(idle, **key) == reasons
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    errors = Counter(e["shadow"].get("error", "") for e in entries if "shadow" in e)
    assert errors["dropped: the event loop was saturated"] == reasons["saturated"]
    assert errors[""] == runs + 3


def test_traces_carry_the_route_label_and_shadow(example_repo: Path, tmp_path: Path) -> None:
    write_scale(tmp_path, "scale", ("version_labels", "canary=3"), ("shadow", "version=2,fraction=1"))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with background_server(tmp_path, Tracing(provider), http_port=None) as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stub.ModelInfer(request_for("scale", {"input": ONES}, version="canary"), timeout=30)
        deadline = time.monotonic() + 60
        while not [s for s in exporter.get_finished_spans() if s.name == "shadow run"]:
            assert time.monotonic() < deadline, "the shadow run was not traced"
            time.sleep(0.05)
    spans = exporter.get_finished_spans()
    (rpc,) = [s for s in spans if s.name == "inference.GRPCInferenceService/ModelInfer"]
    (shadow,) = [s for s in spans if s.name == "shadow run"]
    assert rpc.attributes is not None and shadow.attributes is not None
    assert rpc.attributes["ferry.route"] == "label" and rpc.attributes["ferry.version_label"] == "canary"
    assert rpc.attributes["ferry.model_version"] == 3 and rpc.attributes["ferry.shadow_version"] == 2
    assert shadow.parent is not None and shadow.parent.span_id == rpc.context.span_id
    assert shadow.attributes["ferry.model_version"] == 2 and shadow.attributes["ferry.route"] == "shadow"
