"""Identities, permissions, the audit log and rate limits through a real server, on both transports.

The authorization matrix: every method Ferry serves x {no credential, wrong token, a token without the method's
scope, a token with the scope but not the model, allowed} gives the documented code, and a hidden model is
answered exactly as an unknown one (same code, same message but for the name)."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from ferry.client._proto import ferry_pb2 as fpb
from ferry.client._proto import grpc_service_pb2 as pb
from ferry.server.security.auth import METHOD_SCOPES, SCOPES, hash_token
from ferry.server.security.guard import Guard
from tests.integration.test_rpcs import request_for
from tests.serving import BackgroundServer, background_server

TOKENS = {"admin": "admin-token", "narrow": "narrow-token", "limited": "limited-token", "paced": "paced-token"}
TOKENS.update({f"no-{scope}": f"no-{scope}-token" for scope in SCOPES})
WRONG = "not-a-token"
VISIBLE, HIDDEN, UNKNOWN = "tiny", "secret", "nosuch"
UNIMPLEMENTED_SCOPES = {"shared-memory", "logging"}


def policy() -> dict[str, Any]:
    everything = list(SCOPES)
    identities = [
        {"name": "admin", "token_sha256": hash_token(TOKENS["admin"]), "scopes": everything, "models": ["*"]},
        {"name": "narrow", "token_sha256": hash_token(TOKENS["narrow"]), "scopes": everything, "models": ["ti*"]},
        {
            "name": "limited",
            "token_sha256": hash_token(TOKENS["limited"]),
            "scopes": everything,
            "models": ["*"],
            "rate": {"per_second": 0.1, "burst": 3},
        },
    ]
    identities.append(
        {
            "name": "paced",
            "token_sha256": hash_token(TOKENS["paced"]),
            "scopes": ["inference"],
            "models": ["*"],
            "rate": {"per_second": 5, "burst": 1},
        }
    )
    for scope in SCOPES:
        others = [s for s in SCOPES if s != scope]
        identities.append(
            {
                "name": f"no-{scope}",
                "token_sha256": hash_token(TOKENS[f"no-{scope}"]),
                "scopes": others,
                "models": ["*"],
            }
        )
    return {"anonymous": {"scopes": ["health"]}, "identities": identities, "x-operator-note": "extra keys are fine"}


def repository(example_repo: Path, root: Path) -> Path:
    for name in (VISIBLE, HIDDEN):
        shutil.copytree(example_repo / "tiny", root / name)
        config = root / name / "config.pbtxt"
        if config.exists():
            config.write_text(config.read_text().replace('name: "tiny"', f'name: "{name}"'))
    return root


@pytest.fixture(scope="module", params=["ferry", "grpcio"])
def server(
    request: pytest.FixtureRequest, example_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BackgroundServer]:
    root = tmp_path_factory.mktemp(f"auth-{request.param}")
    repo = repository(example_repo, root / "models")
    auth = root / "auth.json"
    auth.write_text(json.dumps(policy()))
    with background_server(
        repo,
        transport=request.param,
        auth_config_path=auth,
        audit_log_path=root / "audit.jsonl",
        auth_poll_s=0.2,
        model_control_mode="explicit",  # load and unload are part of the matrix
        load_models=("*",),
    ) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server: BackgroundServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


# --- calling any method generically ---------------------------------------------------------------------------

_FILES = (pb.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR, fpb.DESCRIPTOR)
METHODS = {
    f"/{service.full_name}/{method.name}": method
    for file in _FILES
    for service in file.services_by_name.values()
    for method in service.methods
}


def message(method: str, model: str) -> Any:
    """A request of ``method`` naming ``model`` where the method takes one."""
    name = method.rsplit("/", 1)[1]
    cls = message_factory.GetMessageClass(METHODS[method].input_type)
    if name in ("ModelInfer", "ModelStreamInfer"):
        return request_for(model, {"input": np.zeros((1, 16), np.float32)}, id="r-1")
    if name in ("ModelReady", "ModelMetadata", "ModelConfig", "ModelStatistics"):
        return cls(name=model)
    if name in ("RepositoryModelLoad", "RepositoryModelUnload", "TraceSetting"):
        return cls(model_name=model)
    if name in ("Check", "Watch"):
        return cls(service=model)
    if name == "ServerReflectionInfo":
        return cls(list_services="")
    if name == "ReportOutcomes":
        return cls(outcomes=[fpb.Outcome(request_id="r-1", model_name=model, label=1)])
    return cls()


class Answer:
    def __init__(self, code: grpc.StatusCode, details: str = "", reply: Any = None) -> None:
        self.code, self.details, self.reply = code, details or "", reply

    def same_as(self, other: Answer, mine: str, theirs: str) -> bool:
        def norm(text: str, name: str) -> str:
            return text.replace(name, "M") if name else text  # the names are chosen to appear nowhere else

        return (
            self.code == other.code
            and norm(self.details, mine) == norm(other.details, theirs)
            and norm(str(self.reply), mine) == norm(str(other.reply), theirs)
        )

    def __repr__(self) -> str:
        return f"Answer({self.code.name}, {self.details!r}, {self.reply!r})"


def call(channel: grpc.Channel, method: str, model: str, token: str | None) -> Answer:
    desc = METHODS[method]
    response = message_factory.GetMessageClass(desc.output_type)
    metadata = [("authorization", f"Bearer {token}")] if token is not None else []
    request = message(method, model)
    kwargs: dict[str, Any] = {"request_serializer": type(request).SerializeToString,
                              "response_deserializer": response.FromString}  # fmt: skip
    try:
        if desc.client_streaming:
            stream = channel.stream_stream(method, **kwargs)(iter([request]), metadata=metadata, timeout=20)
            return Answer(grpc.StatusCode.OK, reply=next(stream))
        if desc.server_streaming:
            watch = channel.unary_stream(method, **kwargs)(request, metadata=metadata, timeout=20)
            try:
                return Answer(grpc.StatusCode.OK, reply=next(watch))
            finally:
                watch.cancel()
        return Answer(grpc.StatusCode.OK, reply=channel.unary_unary(method, **kwargs)(request, metadata=metadata,
                                                                                     timeout=20))  # fmt: skip
    except grpc.RpcError as err:
        return Answer(err.code(), err.details())


def scope_of(method: str) -> str:
    return METHOD_SCOPES[method]


def allowed_code(method: str) -> grpc.StatusCode:
    unimplemented = scope_of(method) in UNIMPLEMENTED_SCOPES or method == "/grpc.health.v1.Health/List"
    return grpc.StatusCode.UNIMPLEMENTED if unimplemented else grpc.StatusCode.OK


def test_every_served_method_is_in_the_table() -> None:
    assert set(METHODS) == set(METHOD_SCOPES)


@pytest.mark.parametrize("method", sorted(METHOD_SCOPES))
def test_authorization_matrix(server: BackgroundServer, channel: grpc.Channel, method: str) -> None:
    scope = scope_of(method)
    none = call(channel, method, VISIBLE, None)
    if scope == "health":  # the default anonymous identity: Kubernetes probes keep working, but it sees no model
        assert none.same_as(call(channel, method, UNKNOWN, TOKENS["admin"]), VISIBLE, UNKNOWN), none
        assert call(channel, method, "", None).code == allowed_code(method)
    else:
        assert none.code == grpc.StatusCode.UNAUTHENTICATED, none
        assert "needs a credential" in none.details
    wrong = call(channel, method, VISIBLE, WRONG)
    assert (wrong.code, wrong.details) == (grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token"), wrong
    without = call(channel, method, VISIBLE, TOKENS[f"no-{scope}"])
    assert without.code == grpc.StatusCode.PERMISSION_DENIED, without
    assert f"no-{scope}" in without.details and scope in without.details
    assert WRONG not in without.details and "token" not in without.details

    hidden = call(channel, method, HIDDEN, TOKENS["narrow"])
    unknown = call(channel, method, UNKNOWN, TOKENS["admin"])
    if method.endswith("/RepositoryIndex"):  # a list: the hidden model is left out (test_lists_show_only_visible)
        assert HIDDEN not in str(hidden.reply) and HIDDEN in str(unknown.reply)
    else:
        assert hidden.same_as(unknown, HIDDEN, UNKNOWN), (hidden, unknown)
    if method.endswith(("/ModelMetadata", "/ModelConfig", "/ModelInfer", "/TraceSetting", "/RepositoryModelUnload")):
        assert hidden.code == grpc.StatusCode.NOT_FOUND, hidden  # a model-bearing method: answered as unknown

    for identity in ("admin", "narrow"):
        allowed = call(channel, method, VISIBLE, TOKENS[identity])
        assert allowed.code == allowed_code(method), (identity, allowed)
        if method.endswith("/RepositoryModelUnload"):  # put it back
            assert call(channel, method.replace("Unload", "Load"), VISIBLE, TOKENS["admin"]).code == grpc.StatusCode.OK


def test_lists_show_only_visible_models(channel: grpc.Channel) -> None:
    index = "/inference.GRPCInferenceService/RepositoryIndex"
    stats = "/inference.GRPCInferenceService/ModelStatistics"
    assert {m.name for m in call(channel, index, "", TOKENS["admin"]).reply.models} == {VISIBLE, HIDDEN}
    assert {m.name for m in call(channel, index, "", TOKENS["narrow"]).reply.models} == {VISIBLE}
    assert {s.name for s in call(channel, stats, "", TOKENS["admin"]).reply.model_stats} == {VISIBLE, HIDDEN}
    assert {s.name for s in call(channel, stats, "", TOKENS["narrow"]).reply.model_stats} == {VISIBLE}


def test_a_stream_answers_a_hidden_model_per_request_and_keeps_serving(channel: grpc.Channel) -> None:
    stream = channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )
    requests = [message("/inference.GRPCInferenceService/ModelStreamInfer", m) for m in (HIDDEN, VISIBLE, UNKNOWN)]
    replies = list(stream(iter(requests), metadata=[("authorization", f"Bearer {TOKENS['narrow']}")], timeout=20))
    by_model = {r.infer_response.model_name: r for r in replies}
    assert not by_model[VISIBLE].error_message
    assert by_model[HIDDEN].error_message == f"unknown model {HIDDEN!r}"
    assert by_model[UNKNOWN].error_message == f"unknown model {UNKNOWN!r}"


# --- malformed credentials ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("Basic dXNlcjpwYXNz", 'must be "Bearer <token>"'),
        ("Bearer", 'must be "Bearer <token>"'),
        ("Bearer a b", 'must be "Bearer <token>"'),
        ("Bearer " + "x" * 5000, "over the 4096-byte limit"),
    ],
)
def test_malformed_authorization_is_unauthenticated(channel: grpc.Channel, value: str, says: str) -> None:
    live = channel.unary_unary(
        "/inference.GRPCInferenceService/ServerMetadata",
        request_serializer=pb.ServerMetadataRequest.SerializeToString,
        response_deserializer=pb.ServerMetadataResponse.FromString,
    )
    with pytest.raises(grpc.RpcError) as err:
        live(pb.ServerMetadataRequest(), metadata=[("authorization", value)], timeout=20)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert says in (err.value.details() or "")
    assert "x" * 100 not in (err.value.details() or "")
    ok = live(pb.ServerMetadataRequest(), metadata=[("authorization", f"Bearer {TOKENS['admin']}")], timeout=20)
    assert ok.name == "ferry"


def test_two_authorization_headers_are_refused(channel: grpc.Channel) -> None:
    live = channel.unary_unary(
        "/inference.GRPCInferenceService/ServerMetadata",
        request_serializer=pb.ServerMetadataRequest.SerializeToString,
        response_deserializer=pb.ServerMetadataResponse.FromString,
    )
    admin = ("authorization", f"Bearer {TOKENS['admin']}")
    with pytest.raises(grpc.RpcError) as err:
        live(pb.ServerMetadataRequest(), metadata=[admin, admin], timeout=20)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "more than one authorization header" in (err.value.details() or "")


# --- rate limits --------------------------------------------------------------------------------------------


def test_rate_limit_past_the_burst(server: BackgroundServer, channel: grpc.Channel) -> None:
    metadata_rpc = channel.unary_unary(
        "/inference.GRPCInferenceService/ServerMetadata",
        request_serializer=pb.ServerMetadataRequest.SerializeToString,
        response_deserializer=pb.ServerMetadataResponse.FromString,
    )
    codes, details = [], []
    for _ in range(6):  # burst 3 at 0.1/s: another token only after 10 s
        try:
            metadata_rpc(pb.ServerMetadataRequest(), metadata=[("authorization", f"Bearer {TOKENS['limited']}")],
                         timeout=20)  # fmt: skip
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as err:
            codes.append(err.code())
            details.append(err.details() or "")
    assert codes[:3] == [grpc.StatusCode.OK] * 3
    assert codes[3:].count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 2
    assert all("'limited'" in d and "retry in" in d and " s" in d for d in details)
    # another identity is not held back
    other = metadata_rpc(pb.ServerMetadataRequest(), metadata=[("authorization", f"Bearer {TOKENS['admin']}")])
    assert other.name == "ferry"
    text = scrape(server)
    assert 'ferry_auth_rate_limited_total{identity="limited"}' in text


def scrape(server: BackgroundServer) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.http_port}/metrics", timeout=10) as response:
        return response.read().decode()


def test_failures_are_counted_by_reason(server: BackgroundServer, channel: grpc.Channel) -> None:
    call(channel, "/inference.GRPCInferenceService/ServerMetadata", VISIBLE, WRONG)
    text = scrape(server)
    assert 'ferry_auth_failures_total{reason="invalid_token"}' in text


# --- the audit log ------------------------------------------------------------------------------------------


def audit_lines(server: BackgroundServer) -> list[dict[str, Any]]:
    path = server.config.audit_log_path
    assert path is not None
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(predicate: Callable[[], Any], timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        found = predicate()
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


FIELDS = {"time", "event", "identity", "peer", "method", "model", "version", "code", "request_id", "trace_id",
          "action", "detail"}  # fmt: skip


def test_audit_a_denial_an_unload_and_a_reload(server: BackgroundServer, channel: grpc.Channel) -> None:
    marker = f"{time.time_ns()}"
    trace = f"00-{marker.rjust(32, '0')[-32:]}-00f067aa0ba902b7-01"
    deny = channel.unary_unary(
        "/inference.GRPCInferenceService/RepositoryModelUnload",
        request_serializer=pb.RepositoryModelUnloadRequest.SerializeToString,
        response_deserializer=pb.RepositoryModelUnloadResponse.FromString,
    )
    token = TOKENS["no-model-repository"]
    with pytest.raises(grpc.RpcError):
        deny(pb.RepositoryModelUnloadRequest(model_name=VISIBLE), timeout=20,
             metadata=[("authorization", f"Bearer {token}"), ("traceparent", trace)])  # fmt: skip
    denials = wait_for(lambda: [e for e in audit_lines(server) if e["trace_id"] == trace.split("-")[1]])
    assert len(denials) == 1
    (denial,) = denials
    assert set(denial) == FIELDS
    assert denial["event"] == "authz_fail" and denial["identity"] == "no-model-repository"
    assert denial["code"] == "PERMISSION_DENIED" and denial["model"] == VISIBLE
    assert denial["method"] == "/inference.GRPCInferenceService/RepositoryModelUnload"
    assert "127.0.0.1" in denial["peer"]

    admin = [("authorization", f"Bearer {TOKENS['admin']}")]
    before = len(audit_lines(server))
    deny(pb.RepositoryModelUnloadRequest(model_name=HIDDEN), timeout=20, metadata=admin)
    unloads = wait_for(lambda: [e for e in audit_lines(server)[before:] if e["action"] == "model_unload"])
    assert len(unloads) == 1
    assert unloads[0]["event"] == "authz_admin" and unloads[0]["identity"] == "admin"
    assert unloads[0]["code"] == "OK" and unloads[0]["model"] == HIDDEN
    load = channel.unary_unary(
        "/inference.GRPCInferenceService/RepositoryModelLoad",
        request_serializer=pb.RepositoryModelLoadRequest.SerializeToString,
        response_deserializer=pb.RepositoryModelLoadResponse.FromString,
    )
    load(pb.RepositoryModelLoadRequest(model_name=HIDDEN), timeout=60, metadata=admin)

    before = len(audit_lines(server))
    assert server.call(server.server.reload()) is None
    reloads = wait_for(lambda: [e for e in audit_lines(server)[before:] if e["action"] == "auth_reload"])
    assert len(reloads) == 1
    assert reloads[0]["event"] == "authz_change" and reloads[0]["code"] == "OK"

    path = server.config.audit_log_path
    assert path is not None
    text = path.read_text()
    for secret in TOKENS.values():
        assert secret not in text
    assert WRONG not in text


# --- reloads ------------------------------------------------------------------------------------------------


def test_reload_under_load_fails_nothing_and_applies_to_new_calls(
    server: BackgroundServer, channel: grpc.Channel
) -> None:
    path = server.config.auth_config_path
    assert path is not None
    infer = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelInferResponse.FromString,
    )
    request = message("/inference.GRPCInferenceService/ModelInfer", VISIBLE)
    admin = [("authorization", f"Bearer {TOKENS['admin']}")]
    stop = threading.Event()
    failures: list[str] = []
    done = [0]

    def load() -> None:
        while not stop.is_set():
            try:
                infer(request, metadata=admin, timeout=30)
                done[0] += 1
            except grpc.RpcError as err:
                failures.append(f"{err.code()}: {err.details()}")

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    original = path.read_text()
    try:
        new_token = f"fresh-{time.time_ns()}"
        rules = policy()
        rules["identities"].append(
            {"name": "fresh", "token_sha256": hash_token(new_token), "scopes": ["inference"], "models": [VISIBLE]}
        )
        path.write_text(json.dumps(rules))
        fresh = [("authorization", f"Bearer {new_token}")]

        def accepted() -> bool:
            try:
                infer(request, metadata=fresh, timeout=30)
                return True
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED
                return False

        assert wait_for(accepted), "the new identity was never accepted"
        seen = len(audit_lines(server))
        path.write_text("identities: [ {name: broken")  # a bad file keeps the rules in force
        refused = wait_for(
            lambda: [e for e in audit_lines(server)[seen:] if e["action"] == "auth_reload" and e["code"] != "OK"]
        )
        assert refused and "neither JSON nor YAML" in refused[0]["detail"]
        assert accepted()
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
        path.write_text(original)
    assert failures == []
    assert done[0] > 0


def test_without_auth_nothing_is_wrapped(example_repo: Path, tmp_path: Path) -> None:
    repo = repository(example_repo, tmp_path / "models")
    with background_server(repo) as running:
        assert running.server.guard is None
        with grpc.insecure_channel(running.address) as ch:
            unload = call(ch, "/inference.GRPCInferenceService/ServerMetadata", VISIBLE, None)
            assert unload.code == grpc.StatusCode.OK
            assert call(ch, "/inference.GRPCInferenceService/ServerMetadata", VISIBLE, WRONG).code == grpc.StatusCode.OK


def test_guard_class_is_what_wraps(server: BackgroundServer) -> None:
    guard = server.server.guard
    assert isinstance(guard, Guard)
    assert set(guard.methods) == set(METHOD_SCOPES)
    assert None not in guard.methods.values()


# --- bytes no client library would send ---------------------------------------------------------------------


def test_non_ascii_authorization_bytes_are_refused_and_the_server_keeps_serving(
    server: BackgroundServer, channel: grpc.Channel
) -> None:
    from ferry.server.transport.http2 import ACK, PING, frame
    from tests.rawh2 import RawConn, grpc_message

    class Answering(RawConn):
        """grpc-core pings its peers (BDP probes): answer them."""

        def _dispatch(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
            if kind == PING and not flags & ACK:
                self.send(frame(PING, ACK, 0, payload))
                return
            super()._dispatch(kind, flags, sid, payload)

    body = grpc_message(pb.ServerMetadataRequest().SerializeToString())
    path = b"/inference.GRPCInferenceService/ServerMetadata"
    with Answering(server.address) as raw:
        sid = raw.call(path, body, (b"authorization", b"Bearer \xff\xfe\x80token"))
        reply = raw.finish(sid)
        assert reply.status == grpc.StatusCode.UNAUTHENTICATED.value[0], reply
        # Ferry's transport hands the value on as latin-1 text, grpc.aio as the raw bytes it could not decode
        assert "not printable ASCII" in reply.message or "not text" in reply.message, reply.message
    ok = call(channel, "/inference.GRPCInferenceService/ServerMetadata", "", TOKENS["admin"])
    assert ok.code == grpc.StatusCode.OK


def test_audit_samples_allowed_inference(example_repo: Path, tmp_path: Path) -> None:
    """--audit-log alone (no auth file): everyone is anonymous with every scope; allowed inference calls are
    audited at the sample rate (1: all), state changes always."""
    repo = repository(example_repo, tmp_path / "models")
    log = tmp_path / "audit.jsonl"
    infer = "/inference.GRPCInferenceService/ModelInfer"
    with (
        background_server(repo, audit_log_path=log, audit_sample_rate=1.0) as running,
        grpc.insecure_channel(running.address) as ch,
    ):
        for _ in range(3):
            assert call(ch, infer, VISIBLE, None).code == grpc.StatusCode.OK
        assert call(ch, infer, UNKNOWN, None).code == grpc.StatusCode.NOT_FOUND
    entries = [json.loads(x) for x in log.read_text().splitlines()]  # stopping the server flushed the log
    reads = [e for e in entries if e["event"] == "sensitive_read"]
    assert [e["code"] for e in reads] == ["OK", "OK", "OK", "NOT_FOUND"]
    assert all(e["identity"] == "anonymous" and e["request_id"] == "r-1" for e in reads)
    assert reads[0]["model"] == VISIBLE and reads[3]["model"] == UNKNOWN


@pytest.mark.parametrize("transport", ["ferry", "grpcio"])
def test_triton_restricted_protocol(example_repo: Path, tmp_path: Path, transport: str) -> None:
    """Triton's flags without an auth file: the restricted groups need the header, the others stay open."""
    repo = repository(example_repo, tmp_path / "models")
    restricted = ("model-repository,statistics:admin-key=s3cret",)
    with (
        background_server(repo, transport=transport, grpc_restricted_protocol=restricted) as running,
        grpc.insecure_channel(running.address) as ch,
    ):
        index = "/inference.GRPCInferenceService/RepositoryIndex"
        infer = "/inference.GRPCInferenceService/ModelInfer"
        assert call(ch, infer, VISIBLE, None).code == grpc.StatusCode.OK  # not restricted
        assert call(ch, index, "", None).code == grpc.StatusCode.UNAUTHENTICATED
        rpc = ch.unary_unary(index, request_serializer=pb.RepositoryIndexRequest.SerializeToString,
                             response_deserializer=pb.RepositoryIndexResponse.FromString)  # fmt: skip
        header = "triton-grpc-protocol-admin-key"
        reply = rpc(pb.RepositoryIndexRequest(), metadata=[(header, "s3cret")], timeout=20)
        assert {m.name for m in reply.models} == {VISIBLE, HIDDEN}
        with pytest.raises(grpc.RpcError) as err:
            rpc(pb.RepositoryIndexRequest(), metadata=[(header, "wrong")], timeout=20)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "s3cret" not in (err.value.details() or "")


def test_sighup_reloads_the_auth_file(example_repo: Path, tmp_path: Path) -> None:
    """``ferry serve``: SIGHUP reloads the file at once (the file watcher would too, later)."""
    import signal

    from tests.serving import ferry_serve, grpc_address

    repo = repository(example_repo, tmp_path / "models")
    auth = tmp_path / "auth.yaml"
    auth.write_text("anonymous: {scopes: [health]}\n")
    with ferry_serve("--model-repository", str(repo), "--grpc-port", "0", "--http-port", "-1",
                     "--auth-config", str(auth)) as (proc, ready):  # fmt: skip
        address = grpc_address(ready)
        with grpc.insecure_channel(address) as ch:
            method = "/inference.GRPCInferenceService/ServerMetadata"
            assert call(ch, method, "", "new-token").code == grpc.StatusCode.UNAUTHENTICATED
            auth.write_text(
                "identities:\n  - name: newcomer\n"
                f"    token_sha256: {hash_token('new-token')}\n    scopes: [metadata]\n"
            )
            proc.send_signal(signal.SIGHUP)
            assert wait_for(lambda: call(ch, method, "", "new-token").code == grpc.StatusCode.OK)


def test_clients_send_their_token(server: BackgroundServer) -> None:
    """Ferry's SDK and tritonclient, as the README shows them."""
    import tritonclient.grpc as triton

    from ferry.client import Client

    x = np.zeros((1, 16), np.float32)
    with Client(server.address, metadata=[("authorization", f"Bearer {TOKENS['narrow']}")], retries=0) as client:
        assert client.infer(VISIBLE, {"input": x})  # answered
        with pytest.raises(Exception, match="unknown model 'secret'"):
            client.infer(HIDDEN, {"input": x})
    triton_client = triton.InferenceServerClient(server.address)
    headers = {"authorization": f"Bearer {TOKENS['admin']}"}
    assert triton_client.is_server_live(headers=headers)
    assert {m["name"] for m in triton_client.get_model_repository_index(headers=headers, as_json=True)["models"]} == {
        VISIBLE,
        HIDDEN,
    }
    with pytest.raises(Exception, match="needs a credential"):
        triton_client.get_model_repository_index()


@pytest.mark.parametrize("client", ["wire", "grpcio"])
def test_the_load_generator_sends_metadata(server: BackgroundServer, tmp_path: Path, client: str) -> None:
    """``ferry loadtest --metadata``: with the token every call is answered (unary and stream), without it the
    generator is refused before any load."""
    from ferry.loadtest import cli

    common = ["--target", server.address, "--model", VISIBLE, "--duration", "0.5", "--warmup", "0.2",
              "--progress", "plain", "--concurrency", "2", "--processes", "1", "--client", client]  # fmt: skip
    token = ["--metadata", f"authorization=Bearer {TOKENS['admin']}"]
    for mode in ("unary", "stream"):
        out = tmp_path / mode
        assert cli.main([*common, "--out", str(out), "--mode", mode, *token]) == 0
        (step,) = json.loads((out / "report.json").read_text())["steps"]
        assert step["ok"] > 0 and step["errors"] == {}
    assert cli.main([*common, "--out", str(tmp_path / "none")]) != 0


def test_a_stream_is_paced_to_its_rate_not_refused(server: BackgroundServer, channel: grpc.Channel) -> None:
    stream = channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )
    requests = [request_for(VISIBLE, {"input": np.zeros((1, 16), np.float32)}, id=f"p-{i}") for i in range(4)]
    started = time.monotonic()
    replies = list(stream(iter(requests), metadata=[("authorization", f"Bearer {TOKENS['paced']}")], timeout=60))
    elapsed = time.monotonic() - started
    assert sorted(r.infer_response.id for r in replies) == [f"p-{i}" for i in range(4)]
    assert all(not r.error_message for r in replies)
    assert elapsed >= 0.5  # burst 1 at 5/s: the last three waited 0.2 s each for a token (a lower bound only)
    assert "paced" not in scrape(server).split("ferry_auth_rate_limited_total")[-1].split("\n# ")[0]


# --- certificate identities through grpcio's TLS (the transport's own TLS comes with the TLS work) ----------


def make_certificates(root: Path) -> dict[str, bytes]:
    """A CA, a server certificate for 127.0.0.1 and two client certificates (CN ops.internal; CN other with a
    spiffe SAN), made at test time with openssl."""
    import subprocess

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=root, check=True, capture_output=True, timeout=60)

    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=test-ca")
    for name, subject, san in (
        ("server", "/CN=localhost", "DNS:localhost,IP:127.0.0.1"),
        ("ops", "/CN=ops.internal", "DNS:ops.internal"),
        ("mesh", "/CN=other", "URI:spiffe://cluster/ns/default/sa/mesh"),
    ):
        (root / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        run("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext")  # fmt: skip
    return {p.name: p.read_bytes() for p in root.iterdir() if p.suffix in (".pem", ".key")}


def test_certificate_identities_over_grpcio_mtls(example_repo: Path, tmp_path: Path) -> None:
    """Ferry's registrations (every service, guarded) on a grpc.aio server with mTLS: the identity comes from the
    verified client certificate's CN or SAN, read through context.auth_context() as the guard reads it."""
    import asyncio

    from ferry.server.api.servicer import InferenceServicer
    from ferry.server.app import FerryServer
    from ferry.server.config import ServerConfig
    from ferry.server.observability.outcomes import OutcomeServicer

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    certs = make_certificates(tmp_path)
    repo = repository(example_repo, tmp_path / "models")
    auth = tmp_path / "auth.yaml"
    auth.write_text(
        "identities:\n"
        "  - {name: ops, certificate: {cn: ops.internal}, scopes: [metadata, model-repository], models: ['*']}\n"
        "  - {name: mesh, certificate: {san: 'spiffe://cluster/ns/default/sa/mesh'}, scopes: [model-repository],"
        " models: [tiny]}\n"
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def on_loop(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(60)

    ferry = FerryServer(ServerConfig.build(model_repository=repo, auth_config_path=auth, http_port=None))

    async def start() -> tuple[grpc.aio.Server, int]:
        async def changed() -> None:
            return None

        await asyncio.to_thread(ferry.repository.load_all)
        aio = grpc.aio.server()
        servicer = InferenceServicer(ferry.repository, ferry.cache, lambda: True, changed)
        ferry._register(servicer, OutcomeServicer(ferry.monitoring.outcomes), aio)
        credentials = grpc.ssl_server_credentials(
            [(certs["server.key"], certs["server.pem"])], certs["ca.pem"], require_client_auth=True
        )
        port = aio.add_secure_port("127.0.0.1:0", credentials)
        await aio.start()
        return aio, port

    aio, port = on_loop(start())
    try:

        def index(client: str) -> Answer:
            credentials = grpc.ssl_channel_credentials(certs["ca.pem"], certs[f"{client}.key"], certs[f"{client}.pem"])
            with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as ch:
                return call(ch, "/inference.GRPCInferenceService/RepositoryIndex", "", None)

        assert {m.name for m in index("ops").reply.models} == {VISIBLE, HIDDEN}  # by CN
        assert {m.name for m in index("mesh").reply.models} == {VISIBLE}  # by SAN, its own allow-list
        credentials = grpc.ssl_channel_credentials(certs["ca.pem"], certs["mesh.key"], certs["mesh.pem"])
        with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as ch:
            denied = call(ch, "/inference.GRPCInferenceService/ServerMetadata", "", None)
        assert denied.code == grpc.StatusCode.PERMISSION_DENIED and "'mesh'" in denied.details
    finally:
        on_loop(aio.stop(0))
        on_loop(ferry.repository.close())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()  # its self-pipe sockets, else collected later as an unclosed-socket warning in another test
