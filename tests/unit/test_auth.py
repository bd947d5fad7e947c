"""The auth file, identities, the guard's table and wrapping, token buckets and ``ferry auth hash-token``."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from ferry.client.errors import InvalidArgument
from ferry.server.__main__ import main
from ferry.server.app import FerryServer
from ferry.server.config import ServerConfig
from ferry.server.security.auth import (
    MAX_AUTHORIZATION_BYTES,
    METHOD_SCOPES,
    Denied,
    parse_restriction,
)
from ferry.server.security.auth import hash_token as digest_of
from ferry.server.security.authfile import parse_policy, read_policy
from ferry.server.security.guard import Guard
from ferry.server.security.ratelimit import TokenBucket
from ferry.server.transport import Services

ISSUE_EXAMPLE = f"""
anonymous: {{scopes: [health]}}
identities:
  - name: checkout-service
    token_sha256: "{digest_of("checkout")}"
    scopes: [inference, metadata]
    models: ["tiny", "digits*"]
    rate: {{per_second: 200, burst: 400}}
    team: payments            # operators' own keys are allowed
  - name: ops
    certificate: {{cn: "ops.internal"}}
    scopes: [model-repository, statistics, trace, metadata, health]
    models: ["*"]
  - name: mesh
    certificate: {{san: "spiffe://cluster/ns/default/sa/mesh"}}
    scopes: [inference]
    models: ["tiny"]
"""


class FakeContext:
    """The C1 context surface: metadata and auth_context, as any transport offers them."""

    def __init__(self, metadata: list[tuple[str, Any]] = (), auth: dict[str, list[bytes]] | None = None) -> None:  # type: ignore[assignment]
        self._metadata = tuple(metadata)
        self._auth = auth or {}
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self.aborted = (code, details)
        raise RuntimeError("aborted")


def test_the_issue_example_parses(tmp_path: Path) -> None:
    path = tmp_path / "auth.yaml"
    path.write_text(ISSUE_EXAMPLE)
    policy = read_policy(path)
    assert policy.anonymous.scopes == {"health"} and policy.anonymous.anonymous
    checkout = policy.identify([("authorization", "Bearer checkout")], FakeContext())
    assert checkout.name == "checkout-service" and checkout.rate is not None and checkout.rate.burst == 400
    assert checkout.sees("tiny") and checkout.sees("digits") and not checkout.sees("mlp")
    json_path = tmp_path / "auth.json"
    json_path.write_text(json.dumps({"identities": [{"name": "a", "token_sha256": digest_of("x"), "scopes": []}]}))
    assert read_policy(json_path).identities[0].name == "a"


def test_certificate_identities_come_from_the_auth_context() -> None:
    policy = parse_policy(__import__("yaml").safe_load(ISSUE_EXAMPLE))
    ops = policy.identify([], FakeContext(auth={"x509_common_name": [b"ops.internal"]}))
    assert ops.name == "ops"
    mesh = policy.identify(
        [], FakeContext(auth={"x509_subject_alternative_name": [b"other.dns", b"spiffe://cluster/ns/default/sa/mesh"]})
    )
    assert mesh.name == "mesh"
    stranger = policy.identify([], FakeContext(auth={"x509_common_name": [b"someone.else"]}))
    assert stranger.anonymous
    assert policy.identify([], object()).anonymous  # a context without auth_context(): no certificate


@pytest.mark.parametrize(
    ("data", "names"),
    [
        ({"anonymous": {"scopes": ["infer"]}}, "anonymous.scopes: unknown scopes ['infer']"),
        ({"identities": [{"name": "a", "token_sha256": "abc", "scopes": []}]}, "identities[0] (a).token_sha256"),
        ({"identities": [{"token_sha256": digest_of("x"), "scopes": []}]}, "identities[0].name"),
        ({"identities": [{"name": "a", "scopes": []}]}, "exactly one of token_sha256 and certificate"),
        (
            {"identities": [{"name": "a", "certificate": {"cn": "x"}, "token_sha256": digest_of("x"), "scopes": []}]},
            "exactly one of token_sha256 and certificate",
        ),
        ({"identities": [{"name": "a", "certificate": {"ou": "x"}, "scopes": []}]}, "(a).certificate"),
        ({"identities": [{"name": "a", "token_sha256": digest_of("x"), "scopes": "inference"}]}, "(a).scopes"),
        ({"identities": [{"name": "a", "token_sha256": digest_of("x"), "scopes": [], "models": [1]}]}, "(a).models"),
        (
            {"identities": [{"name": "a", "token_sha256": digest_of("x"), "scopes": [], "rate": {"per_second": 0}}]},
            "(a).rate.per_second",
        ),
        (
            {
                "identities": [
                    {"name": "a", "token_sha256": digest_of("x"), "scopes": [], "rate": {"per_second": 5, "burst": 0.5}}
                ]
            },
            "(a).rate.burst",
        ),
        (
            {
                "identities": [
                    {"name": "a", "token_sha256": digest_of("x"), "scopes": []},
                    {"name": "a", "token_sha256": digest_of("y"), "scopes": []},
                ]
            },
            "identities[1].name: the same as identities[0]'s",
        ),
        (
            {
                "identities": [
                    {"name": "a", "token_sha256": digest_of("x"), "scopes": []},
                    {"name": "b", "token_sha256": digest_of("x"), "scopes": []},
                ]
            },
            "identities[1].token_sha256",
        ),
        ({"identities": [{"name": "anonymous", "token_sha256": digest_of("x"), "scopes": []}]}, "reserved"),
        ({"anonymous": {"scopes": [], "token_sha256": digest_of("x")}}, "anonymous.token_sha256"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_validation_errors_name_the_bad_key(data: Any, names: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_policy(data, "f.yaml")
    assert names in err.value.message and "f.yaml" in err.value.message


def test_an_unreadable_or_unparsable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="cannot read"):
        read_policy(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("identities: [ {name: broken")
    with pytest.raises(InvalidArgument, match="neither JSON nor YAML"):
        read_policy(bad)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("Bearer nope", "invalid_token"),
        ("bearer checkout-typo", "invalid_token"),
        ("Basic Y2hlY2tvdXQ=", "malformed"),
        ("Bearer", "malformed"),
        ("Bearer two words", "malformed"),
        ("Bearer caf\u00e9", "malformed"),  # a byte over 0x7f, as Ferry's transport hands it on (latin-1)
        ("Bearer \x00", "malformed"),
        (b"Bearer \xff", "malformed"),  # grpc.aio hands on bytes it could not decode
        ("Bearer " + "a" * MAX_AUTHORIZATION_BYTES, "malformed"),
    ],
)
def test_bad_credentials_are_unauthenticated(value: Any, reason: str) -> None:
    policy = parse_policy(__import__("yaml").safe_load(ISSUE_EXAMPLE))
    with pytest.raises(Denied) as err:
        policy.identify([("authorization", value)], FakeContext())
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and err.value.reason == reason
    assert "checkout" not in err.value.message and "a" * 50 not in err.value.message
    assert policy.identify([("authorization", "bearer checkout")], FakeContext()).name == "checkout-service"


def test_triton_restrictions() -> None:
    r = parse_restriction("model-repository,statistics:admin-key=s3=cret", grpc_form=True)
    assert r.groups == {"model-repository", "statistics"} and r.header == "triton-grpc-protocol-admin-key"
    assert parse_restriction("trace:X-Admin=v", grpc_form=False).header == "x-admin"
    for bad in ("model-repository", "model-repository:key", "bogus:k=v", ":k=v", "trace:=v"):
        with pytest.raises(InvalidArgument):
            parse_restriction(bad, grpc_form=True)
    policy = parse_policy({"anonymous": {"scopes": ["health", "trace"], "models": ["*"]}}, restrictions=[r])
    assert policy.anonymous.scopes == {"health", "trace"}
    granted = policy.identify([("triton-grpc-protocol-admin-key", "s3=cret")], FakeContext())
    assert {"model-repository", "statistics", "trace"} <= granted.scopes and granted.name == "triton:admin-key"
    assert policy.identify([("triton-grpc-protocol-admin-key", "wrong")], FakeContext()).anonymous


def test_a_group_in_two_restrictions_of_one_flag_is_refused(tmp_path: Path) -> None:
    config = ServerConfig.build(model_repository=tmp_path, grpc_restricted_protocol=["trace:a=1", "trace,health:b=2"])
    with pytest.raises(InvalidArgument, match="--grpc-restricted-protocol: groups \\['trace'\\]"):
        Guard.from_config(config, None)
    # Triton's own example restricts the same groups with both flags
    both = ServerConfig.build(
        model_repository=tmp_path, grpc_restricted_protocol=["trace:admin=1"], http_restricted_api=["trace:admin=1"]
    )
    guard = Guard.from_config(both, None)
    assert guard is not None and "trace" not in guard.policy.anonymous.scopes
    for header in ("triton-grpc-protocol-admin", "admin"):
        assert "trace" in guard.policy.identify([(header, "1")], FakeContext()).scopes


def test_token_bucket() -> None:
    bucket = TokenBucket(per_second=2.0, burst=3.0)
    now = bucket.stamp
    assert [bucket.take(now) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(now) == pytest.approx(0.5)
    assert bucket.take(now + 0.5) == 0.0
    assert bucket.take(now + 0.5) == pytest.approx(0.5)
    assert [bucket.take(now + 100) for _ in range(4)][:3] == [0.0, 0.0, 0.0]  # refilled to the burst, not past


def registered(tmp_path: Path, **settings: Any) -> tuple[FerryServer, Services]:
    server = FerryServer(ServerConfig.build(model_repository=tmp_path, **settings))
    from ferry.server.api.servicer import InferenceServicer
    from ferry.server.observability.outcomes import OutcomeServicer

    async def changed() -> None:
        return None

    servicer = InferenceServicer(server.repository, server.cache, lambda: True, changed)
    services = Services()
    server._register(servicer, OutcomeServicer(server.monitoring.outcomes), services)
    return server, services


def test_every_registered_method_has_a_scope(tmp_path: Path) -> None:
    """A method added later without a scope fails here (and is refused to everyone at run time)."""
    auth = tmp_path / "auth.yaml"
    auth.write_text("anonymous: {scopes: [health]}\n")
    (tmp_path / "models").mkdir()
    server, services = registered(tmp_path / "models", auth_config_path=auth)
    methods = {path.decode() for path in services._methods}
    assert methods == set(METHOD_SCOPES), methods ^ set(METHOD_SCOPES)
    assert server.guard is not None and set(server.guard.methods) == methods


def test_without_auth_handlers_are_registered_unwrapped(tmp_path: Path) -> None:
    server, services = registered(tmp_path)
    assert server.guard is None and server.reloaders == []
    method = services.lookup(b"/inference.GRPCInferenceService/ModelInfer")
    assert method is not None and method.behavior.__func__.__qualname__ == "InferenceServicer.ModelInfer"  # type: ignore[attr-defined]


def test_a_method_without_a_scope_is_refused_to_everyone(tmp_path: Path) -> None:
    guard = Guard(parse_policy({"anonymous": {"scopes": ["health", "inference"], "models": ["*"]}}))

    async def behavior(request: Any, context: Any) -> str:
        return "ran"

    handler = grpc.unary_unary_rpc_method_handler(behavior)
    wrapped = guard.wrap("/some.New/Method", handler)
    context = FakeContext()
    with pytest.raises(RuntimeError, match="aborted"):
        asyncio.run(wrapped.unary_unary(None, context))
    assert context.aborted is not None and context.aborted[0] == grpc.StatusCode.PERMISSION_DENIED
    assert guard.methods["/some.New/Method"] is None
    known = guard.wrap("/inference.GRPCInferenceService/ServerLive", handler)
    assert asyncio.run(known.unary_unary(None, FakeContext())) == "ran"


def test_hash_token_command(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["auth", "hash-token", "test"]) == 0
    assert capsys.readouterr().out.strip() == "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    monkeypatch.setattr("sys.stdin", io.StringIO("test\n"))
    assert main(["auth", "hash-token"]) == 0
    assert capsys.readouterr().out.strip() == digest_of("test")
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["auth", "hash-token"]) == 2


def test_a_full_audit_queue_drops_and_counts(tmp_path: Path) -> None:
    from ferry.server.security.audit import AuditEvent, AuditLog

    audit = AuditLog(tmp_path / "audit.jsonl", queue_size=2)
    accepted = sum(audit.record(AuditEvent("authz_fail", identity=f"i{i}")) for i in range(500))
    audit.close()
    assert audit.dropped == 500 - accepted and audit.dropped > 0  # never waited: the writer drains every 50 ms
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert len(lines) == audit.written == accepted
    assert json.loads(lines[0])["event"] == "authz_fail"


def test_serve_refuses_a_bad_auth_file_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "auth.yaml"
    bad.write_text("identities:\n  - name: x\n    token_sha256: nothex\n    scopes: [inference]\n")
    (tmp_path / "models").mkdir()
    argv = ["serve", "--model-repository", str(tmp_path / "models"), "--grpc-port", "0", "--http-port", "-1"]
    assert main([*argv, "--auth-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "identities[0] (x).token_sha256" in err
    assert main([*argv, "--grpc-restricted-protocol", "bogus:k=v"]) == 2
    assert "unknown groups ['bogus']" in capsys.readouterr().err
