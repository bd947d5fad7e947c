"""deploy/kubernetes against a live server: every metric the autoscaling queries read is in a real /metrics scrape,
every HTTP path a probe or a scrape annotation names answers 200 on a ready server, and the gRPC health service name
the probes ask for says SERVING. (Schemas, flags and ports: tests/unit/test_manifests.py.)"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from ferry.client import Client
from tests.serving import BackgroundServer, background_server
from tests.unit.test_manifests import DOCS, containers, one

METRIC = re.compile(r"(?<![\w:])(ferry_[a-z0-9_]+)")


@pytest.fixture(scope="module")
def server(example_repo: Path) -> Iterator[BackgroundServer]:
    with background_server(example_repo) as running:
        with Client(running.address) as client:  # tiny batches: its queue histogram gets samples
            for _ in range(3):
                client.infer("tiny", {"input": np.zeros((2, 16), np.float32)})
        yield running


def get(server: BackgroundServer, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.http_port}{path}", timeout=10) as response:
        return response.status, response.read().decode()


def queries() -> dict[str, str]:
    """Every PromQL text in the autoscaling manifests, by where it is."""
    found: dict[str, str] = {}
    rules = yaml.safe_load(one("ConfigMap", "prometheus-adapter-ferry")["data"]["config.yaml"])["rules"]
    for i, rule in enumerate(rules):
        found[f"prometheus-adapter rule {i} seriesQuery"] = rule["seriesQuery"]
        found[f"prometheus-adapter rule {i} metricsQuery"] = rule["metricsQuery"]
        found[f"prometheus-adapter rule {i} name.matches"] = rule["name"]["matches"]
    for trigger in one("ScaledObject", "ferry")["spec"]["triggers"]:
        found[f"ScaledObject trigger {trigger['name']}"] = trigger["metadata"]["query"]
    return found


def unexposed(found: dict[str, str], exposed: set[str]) -> dict[str, list[str]]:
    """Per query, the Ferry metric names it reads that the scrape lacks (a query naming none is listed too)."""
    out = {}
    for where, query in found.items():
        names = set(METRIC.findall(query))
        if not names or names - exposed:
            out[where] = sorted(names - exposed) or ["(no ferry_ metric)"]
    return out


def scraped(server: BackgroundServer) -> set[str]:
    status, text = get(server, "/metrics")
    assert status == 200
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_every_metric_the_autoscalers_read_is_in_a_live_scrape(server: BackgroundServer) -> None:
    assert unexposed(queries(), scraped(server)) == {}


def test_a_query_with_a_wrong_metric_name_is_reported(server: BackgroundServer) -> None:
    """The check above is not vacuous: the queries with one name mangled are reported, with the name."""
    mangled = {where: query.replace("_seconds_", "_secs_") for where, query in queries().items()}
    report = unexposed(mangled, scraped(server))
    assert report and all(names for names in report.values())
    assert "ferry_queue_duration_secs_sum" in report["ScaledObject trigger queue-time"]


def http_paths() -> set[str]:
    paths: set[str] = set()
    for _, doc in DOCS:
        for container in containers(doc):
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if "httpGet" in container.get(probe, {}):
                    paths.add(container[probe]["httpGet"]["path"])
        annotations: dict[str, Any] = {}
        if doc["kind"] == "Deployment":
            annotations = doc["spec"]["template"]["metadata"].get("annotations", {})
        elif doc["kind"] == "ClusterServingRuntime":
            annotations = doc["spec"].get("annotations", {})
        paths |= {value for key, value in annotations.items() if key.endswith("/path")}
    return paths


def test_probe_and_scrape_paths_answer_on_a_ready_server(server: BackgroundServer) -> None:
    paths = http_paths()
    assert {"/v2/health/live", "/metrics"} <= paths
    for path in paths:
        assert get(server, path)[0] == 200, path


def test_the_grpc_probes_service_name_is_served(server: BackgroundServer) -> None:
    services = set()
    for _, doc in DOCS:
        for container in containers(doc):
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if "grpc" in container.get(probe, {}):
                    services.add(container[probe]["grpc"].get("service", ""))
    assert services == {""}
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in services:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
