"""Prometheus metrics on the HTTP port, through a real server: what they count after real traffic."""

from __future__ import annotations

import re
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ferry.client._proto import ferry_pb2 as fpb
from ferry.client._proto import ferry_pb2_grpc as fpb_grpc
from ferry.client._proto import grpc_service_pb2_grpc as pb_grpc
from ferry.server.observability.metrics import METRICS
from tests.integration.test_rpcs import request_for
from tests.serving import BackgroundServer, background_server


@pytest.fixture(scope="module")
def server(example_repo: Path, test_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    root = tmp_path_factory.mktemp("metrics")
    shutil.copytree(example_repo / "tiny" / "1", root / "tiny" / "1")
    (root / "tiny" / "config.pbtxt").write_text(
        "max_batch_size: 64\ndynamic_batching { }\nresponse_cache { enable: true }\n"
    )
    shutil.copytree(test_repo / "broken", root / "broken")
    with background_server(root) as running:
        yield running


def scrape(server: BackgroundServer) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.http_port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return response.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


TINY = {"model": "tiny", "version": "1"}


def test_every_documented_metric_is_exposed(server: BackgroundServer) -> None:
    names = {family.name for family in text_string_to_metric_families(scrape(server))}
    for doc in METRICS:
        assert doc.name in names, doc.name


def test_counts_follow_traffic(server: BackgroundServer) -> None:
    before = scrape(server)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for i in range(3):
            stub.ModelInfer(request_for("tiny", {"input": np.full((2, 16), float(i), np.float32)}))
        stub.ModelInfer(request_for("tiny", {"input": np.full((2, 16), 0.0, np.float32)}))  # a cache hit
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(request_for("tiny", {"input": np.ones((2, 3), np.float32)}))
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("ferry_inference_request_success_total", **TINY) == 4
    assert value(after, "ferry_inference_request_failure_total", code="INVALID_ARGUMENT", **TINY) >= 1
    assert delta("ferry_inference_count_total", **TINY) == 6  # 3 executions of 2 rows; the hit ran nothing
    assert delta("ferry_inference_exec_count_total", **TINY) == 3
    assert delta("ferry_cache_hits_total", **TINY) == 1 and delta("ferry_cache_misses_total", **TINY) == 3
    assert value(after, "ferry_cache_entries", **TINY) >= 3 and value(after, "ferry_cache_bytes", **TINY) > 0
    assert delta("ferry_request_duration_seconds_count", **TINY) == 5
    assert delta("ferry_batch_size_rows_count", **TINY) == 3
    assert value(after, "ferry_batch_size_rows_bucket", le="2.0", **TINY) >= 3
    assert value(after, "ferry_queue_depth", **TINY) == 0
    assert value(after, "ferry_inflight_requests") == 0
    assert value(after, "ferry_model_ready", **TINY) == 1
    assert value(after, "ferry_model_ready", model="broken", version="1") == 0


def test_alert_rules_only_use_exposed_metrics(server: BackgroundServer) -> None:
    import yaml

    rules_file = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "ferry-alerts.yml"
    groups = yaml.safe_load(rules_file.read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {"FerryHighErrorRate", "FerryHighP99Latency", "FerryQueueSaturated", "FerryInputDrift"} <= {
        r["alert"] for r in rules
    }
    text = scrape(server)
    exposed = {s[0] for s in samples(text)} | {family.name for family in text_string_to_metric_families(text)}
    for rule in rules:
        names = set(re.findall(r"\bferry_[a-z0-9_]+", rule["expr"]))
        assert names, rule["alert"]
        for name in names:
            assert name in exposed, f"{rule['alert']} uses {name}, which /metrics does not expose"


# ---- conformance: the exposition is valid Prometheus text and matches the README's table ----------------------

README = Path(__file__).resolve().parents[2] / "README.md"
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
}


WORKERS_ONLY = frozenset({"ferry_workers", "ferry_worker_up", "ferry_worker_restarts", "ferry_worker_requests"})
"""Served by ``ferry serve --workers N`` only (tests/integration/test_workers.py checks them)."""


def documented_metrics() -> dict[str, tuple[str, frozenset[str]]]:
    """Family name (a counter's without ``_total``) -> (type, labels) from the README's metrics table."""
    section = README.read_text().split("### Metrics", 1)[1].split("\n### ", 1)[0]
    documented = {}
    for row in section.splitlines():
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`ferry_"):
            continue
        labels = frozenset(label.strip() for label in cells[2].split(",") if label.strip())
        for name in re.findall(r"`(ferry_\w+)`", cells[0]):
            family = name.removesuffix("_total") if cells[1] == "counter" else name
            documented[family] = (cells[1], labels)
    return documented


@pytest.fixture(scope="module")
def busy_server(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    """The example digits (outcomes and drift on) and tiny, with the prediction log on, after traffic that gives
    every kind of family samples: successes, a failure, a reported outcome."""
    root = tmp_path_factory.mktemp("conformance")
    for model in ("digits", "tiny"):
        shutil.copytree(example_repo / model, root / model)
    log = root.parent / f"{root.name}-predictions.jsonl"
    with background_server(root, prediction_log_path=log) as running, grpc.insecure_channel(running.address) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        x = np.zeros((2, 64), np.float32)
        stub.ModelInfer(request_for("digits", {"input": x}, id="conformance-1"), timeout=30)
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(request_for("tiny", {"input": x}), timeout=30)  # 64 features, tiny takes 16
        outcome = fpb.Outcome(request_id="conformance-1", model_name="digits", label=0)
        report = fpb.ReportOutcomesRequest(outcomes=[outcome])
        assert fpb_grpc.OutcomeServiceStub(ch).ReportOutcomes(report, timeout=30).matched == 1
        yield running


def test_each_family_appears_once(busy_server: BackgroundServer) -> None:
    text = scrape(busy_server)
    for directive in ("# HELP ", "# TYPE "):
        names = [line.split()[2] for line in text.splitlines() if line.startswith(directive)]
        assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    families = [family.name for family in text_string_to_metric_families(text)]
    assert len(families) == len(set(families)), sorted(n for n in families if families.count(n) > 1)


def test_every_sample_belongs_to_its_family_with_the_documented_type_and_labels(
    busy_server: BackgroundServer,
) -> None:
    documented = documented_metrics()
    served = {}
    for family in text_string_to_metric_families(scrape(busy_server)):
        if not family.name.startswith("ferry_"):
            continue  # the client library's own (none today)
        assert family.type != "unknown", f"{family.name}: samples outside any declared family"
        assert family.name in documented, f"{family.name} is served but not in the README's metrics table"
        kind, labels = documented[family.name]
        assert family.type == kind, family.name
        for sample in family.samples:
            assert sample.name in {family.name + suffix for suffix in SAMPLE_SUFFIXES[kind]}, sample.name
            assert set(sample.labels) - {"le"} == labels, (sample.name, sample.labels)
        served[family.name] = family
    assert set(served) == set(documented) - WORKERS_ONLY, set(documented) - set(served)
    assert served["ferry_inference_request_failure"].samples, "the failure above was not counted"
    assert served["ferry_outcome_window"].samples


def test_openmetrics_is_not_negotiated(busy_server: BackgroundServer) -> None:
    """Only the text format is served: an OpenMetrics Accept header gets it too (so the check above covers all)."""
    url = f"http://127.0.0.1:{busy_server.server.http_port}/metrics"
    request = urllib.request.Request(url, headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
