"""The auth file guards the REST API as it guards gRPC: REST calls run the same guarded handlers (one method table),
so a missing or unknown token is 401, a missing scope 403, a hidden model answers exactly as an unknown one (404),
a rate past its burst 429, and anonymous health keeps working for probes."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.server.security.auth import hash_token
from tests.serving import BackgroundServer, background_server

TOKENS = {"reader": "reader-token-1", "ops": "ops-token-2", "slow": "slow-token-3"}


@pytest.fixture(scope="module")
def server(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    auth = tmp_path_factory.mktemp("rest-auth") / "auth.json"
    auth.write_text(
        json.dumps(
            {
                "anonymous": {"scopes": ["health"]},
                "identities": [
                    {
                        "name": "reader",
                        "token_sha256": hash_token(TOKENS["reader"]),
                        "scopes": ["inference", "metadata"],
                        "models": ["tiny"],
                    },
                    {
                        "name": "ops",
                        "token_sha256": hash_token(TOKENS["ops"]),
                        "scopes": ["model-repository", "model-config", "metadata"],
                        "models": ["*"],
                    },
                    {
                        "name": "slow",
                        "token_sha256": hash_token(TOKENS["slow"]),
                        "scopes": ["metadata"],
                        "models": ["*"],
                        "rate": {"per_second": 0.01, "burst": 2},
                    },
                ],
            }
        )
    )
    with background_server(example_repo, auth_config_path=auth) as running:
        yield running


def call(server: BackgroundServer, method: str, path: str, token: str | None = None, body: Any = None) -> Any:
    """(status, the JSON body) of one REST call."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{server.server.http_port}{path}", data=data, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def tiny_body() -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]}


def test_anonymous_health_answers_and_everything_else_needs_a_credential(server: BackgroundServer) -> None:
    assert call(server, "GET", "/v2/health/ready") == (200, {"ready": True})
    assert call(server, "GET", "/v2/health/live")[0] == 200
    status, body = call(server, "GET", "/v2/models/tiny")
    assert status == 401 and "error" in body
    status, body = call(server, "POST", "/v2/models/tiny/infer", body=tiny_body())
    assert status == 401
    status, body = call(server, "GET", "/v2/models/tiny", token="not-a-token")
    assert status == 401
    assert "not-a-token" not in body["error"]  # a token never appears in an answer


def test_an_identity_reaches_what_its_scopes_and_models_allow(server: BackgroundServer) -> None:
    reader = TOKENS["reader"]
    assert call(server, "GET", "/v2/models/tiny", token=reader)[0] == 200
    status, body = call(server, "POST", "/v2/models/tiny/infer", token=reader, body=tiny_body())
    assert status == 200 and body["outputs"]
    status, body = call(server, "GET", "/v2/models/tiny/config", token=reader)  # no model-config scope
    assert status == 403 and "error" in body
    status, body = call(server, "POST", "/v2/repository/index", token=reader)
    assert status == 403
    status, body = call(server, "POST", "/v2/repository/index", token=TOKENS["ops"])
    assert status == 200 and {m["name"] for m in body} >= {"tiny", "mlp"}


def test_a_hidden_model_answers_exactly_as_an_unknown_one(server: BackgroundServer) -> None:
    reader = TOKENS["reader"]
    for method, suffix, body in (("GET", "", None), ("POST", "/infer", tiny_body())):
        hidden = call(server, method, f"/v2/models/mlp{suffix}", token=reader, body=body)
        unknown = call(server, method, f"/v2/models/nosuchmodel{suffix}", token=reader, body=body)
        assert hidden[0] == unknown[0] == 404
        assert hidden[1]["error"].replace("mlp", "X") == unknown[1]["error"].replace("nosuchmodel", "X")
    assert call(server, "GET", "/v2/models/mlp", token=TOKENS["ops"])[0] == 200  # the model is there


def test_past_its_rate_an_identity_gets_429_with_when_to_retry(server: BackgroundServer) -> None:
    slow = TOKENS["slow"]
    answers = [call(server, "GET", "/v2/models/tiny", token=slow) for _ in range(4)]
    assert [status for status, _ in answers[:2]] == [200, 200]
    status, body = answers[-1]
    assert status == 429 and "retry in" in body["error"]
