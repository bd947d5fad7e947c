"""The OpenAPI document (docs/openapi.yaml, served at ``GET /v2/openapi.yaml``) is true: it names exactly the routes
the server registers, and schemathesis, generating requests from it (valid ones and ones the schema forbids),
finds no 5xx, no hang and no answer outside the schema on a live server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from ferry.server.api.http import create_http_app
from ferry.server.api.rest import OPENAPI
from tests.resthttp import call
from tests.serving import background_server

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = 25
"""Generated requests per operation: enough to reach every property of a body, bounded for a 2-core machine."""
CALL_TIMEOUT_S = 30
UNIMPLEMENTED = ("/v2/systemsharedmemory", "/v2/cudasharedmemory", "/v2/logging")
"""A request not answered in this long is a hang."""


def documented() -> set[tuple[str, str]]:
    doc = yaml.safe_load(OPENAPI.read_text())
    return {(method.upper(), path) for path, item in doc["paths"].items() for method in item if method != "parameters"}


def test_docs_holds_the_served_document() -> None:
    assert (ROOT / "docs" / "openapi.yaml").resolve() == OPENAPI.resolve()


def test_every_route_is_documented_and_every_documented_route_served() -> None:
    app = create_http_app(lambda: b"", lambda path: None)
    registered = set(app.routes())
    assert registered == documented()


@pytest.fixture(scope="module")
def port(example_repo: Path) -> Iterator[int]:
    with background_server(example_repo, model_control_mode="explicit", load_models=("*",)) as running:
        assert running.server.http_port is not None
        yield running.server.http_port


def test_the_served_document_is_the_file(port: int) -> None:
    assert call(port, "GET", "/v2/openapi.yaml").body == OPENAPI.read_bytes()


schema = schemathesis.openapi.from_path(str(OPENAPI))


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
def test_generated_requests(case: schemathesis.Case, port: int) -> None:
    response = case.call(base_url=f"http://127.0.0.1:{port}", timeout=CALL_TIMEOUT_S)
    checks = list(CHECKS)
    if response.status_code == 503 and case.operation.path.endswith("/ready"):
        checks.remove(not_a_server_error)  # "not ready" is 503 by design (probes and load balancers read it)
    if response.status_code == 501 and case.operation.path.startswith(UNIMPLEMENTED):
        checks.remove(not_a_server_error)  # the extensions Ferry does not implement, as gRPC's UNIMPLEMENTED
    case.validate_response(response, checks=checks)


CHECKS = (
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
)
