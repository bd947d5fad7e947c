"""``ferry serve --workers 2`` pushed where it broke, through real processes on 127.0.0.1.

One fleet serves the module (explicit mode, auth on, tiny and ``gated`` loaded at start): ``gated`` warms up from a
sample file that a test can swap for a named pipe, so a worker started again blocks in its start-up load until the
test writes the sample (the window where it is alive but not yet a full member of the fleet). Tests that need their
own command line (many models, signals at start) start their own fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client._proto import grpc_service_pb2_grpc as pb_grpc
from ferry.server.config import ServerConfig
from ferry.server.security.auth import SCOPES, hash_token
from ferry.server.workers.supervisor import GATHER_TIMEOUT_S, Supervisor
from tests.integration.test_workers import FRESH, Fleet, fresh, tiny_request

ADMIN, NARROW, READER = "admin-token", "narrow-token", "reader-token"
HIDDEN = "secret"
GATED_CONFIG = """name: "gated"
max_batch_size: 4
model_warmup [ { name: "pipe" batch_size: 1 inputs { key: "input" value: {
  data_type: TYPE_FP32 dims: [ 256 ] input_data_file: "x.bin" } } } ]
"""
SAMPLE = np.ones(256, np.float32).tobytes()


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def policy() -> dict[str, Any]:
    everything = list(SCOPES)
    return {
        "anonymous": {"scopes": ["health"]},
        "identities": [
            {"name": "admin", "token_sha256": hash_token(ADMIN), "scopes": everything, "models": ["*"]},
            {"name": "narrow", "token_sha256": hash_token(NARROW), "scopes": everything, "models": ["ti*", "g*"]},
            {
                "name": "reader",
                "token_sha256": hash_token(READER),
                "scopes": [s for s in SCOPES if s != "model-repository"],
                "models": ["*"],
            },
        ],
    }


@pytest.fixture(scope="module")
def repo(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("workers-abuse")
    for name, source in (("tiny", "tiny"), (HIDDEN, "tiny"), ("gated", "mlp")):
        shutil.copytree(example_repo / source, root / name)
        config = root / name / "config.pbtxt"
        config.write_text(config.read_text().replace(f'name: "{source}"', f'name: "{name}"'))
    (root / "gated" / "config.pbtxt").write_text(GATED_CONFIG)
    (root / "gated" / "warmup").mkdir()
    (root / "gated" / "warmup" / "x.bin").write_bytes(SAMPLE)
    (root.parent / "auth.json").write_text(json.dumps(policy()))
    return root


@pytest.fixture(scope="module")
def fleet(repo: Path) -> Iterator[Fleet]:
    server = Fleet(
        repo,
        *("--model-control-mode", "explicit", "--load-model", "tiny", "--load-model", "gated"),
        *("--auth-config", str(repo.parent / "auth.json")),
    )
    try:
        yield server
    finally:
        assert server.stop() == 0


def call(fleet: Fleet, token: str, method: str, request: Any) -> Any:
    """``method`` on a fresh connection with ``token``: the reply, or the error's ``(code, details)``."""
    with fresh(fleet.grpc) as channel:
        try:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            return getattr(stub, method)(request, metadata=bearer(token), timeout=60)
        except grpc.RpcError as err:
            return err.code(), err.details()


def everywhere(fleet: Fleet, ask: Callable[[pb_grpc.GRPCInferenceServiceStub], object]) -> set[object]:
    """The answers to ``ask`` over :data:`FRESH` fresh connections (so from both workers)."""
    answers = set()
    for _ in range(FRESH):
        with fresh(fleet.grpc) as channel:
            answers.add(ask(pb_grpc.GRPCInferenceServiceStub(channel)))
    return answers


def ready_everywhere(fleet: Fleet, model: str) -> set[object]:
    def ready(stub: pb_grpc.GRPCInferenceServiceStub) -> object:
        return stub.ModelReady(pb.ModelReadyRequest(name=model), metadata=bearer(ADMIN), timeout=10).ready

    return everywhere(fleet, ready)


def workers_by_index(fleet: Fleet) -> dict[int, int]:
    """Worker index -> pid (the index the supervisor gave it, read from its environment)."""
    found = {}
    for pid in fleet.workers():
        with contextlib.suppress(OSError), open(f"/proc/{pid}/environ", "rb") as env:  # OSError: it just died
            for entry in env.read().split(b"\0"):
                if entry.startswith(b"FERRY_WORKER="):
                    found[int(entry.split(b"=")[1].split(b"/")[0])] = pid
    return found


def up(fleet: Fleet) -> list[float]:
    try:
        metrics = fleet.metrics()
    except OSError:  # a connection a killed worker's listener had queued, reset as it closes
        return []
    return [metrics.get(("ferry_worker_up", (("worker", w),)), 0) for w in "01"]


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout_s}s")
        time.sleep(0.05)


def blocked_on_pipe(pid: int) -> bool:
    """Whether a thread of ``pid`` waits in the open of a named pipe for a writer."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/wchan") as wchan:
            if wchan.read() == "wait_for_partner":
                return True
    return False


def kill(fleet: Fleet, index: int) -> None:
    """SIGKILL worker ``index``; returns once the worker started in its place is up."""
    old = workers_by_index(fleet)[index]
    os.kill(old, signal.SIGKILL)
    wait_for(f"new worker {index}", lambda: workers_by_index(fleet).get(index, old) != old)
    wait_for("both workers up", lambda: up(fleet) == [1, 1])


@contextlib.contextmanager
def restarting(fleet: Fleet, repo: Path) -> Iterator[int]:
    """Worker 0 killed and started again, held in its start-up load of ``gated`` (its warmup sample is a named pipe
    until the end of the block); yields the new worker's pid. Afterwards both workers are up again."""
    sample = repo / "gated" / "warmup" / "x.bin"
    sample.unlink()
    os.mkfifo(sample)
    try:
        old = workers_by_index(fleet)[0]
        os.kill(old, signal.SIGKILL)
        wait_for("new worker 0", lambda: workers_by_index(fleet).get(0, old) != old)
        new = workers_by_index(fleet)[0]
        wait_for("worker 0 blocked in its start-up load", lambda: blocked_on_pipe(new))
        yield new
    finally:
        writer = os.open(sample, os.O_RDWR)  # never blocks; the worker reads the sample, then the end
        os.write(writer, SAMPLE)
        os.close(writer)
        sample.unlink()
        sample.write_bytes(SAMPLE)
    wait_for("both workers up", lambda: up(fleet) == [1, 1])


def rest(fleet: Fleet, method: str, path: str, body: bytes | None = None, token: str = ADMIN) -> tuple[int, bytes]:
    """One REST call on a connection of its own: status and body."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{fleet.http}{path}", data=body, method=method, headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


# ---- auth: a change the caller may not make reaches no worker -------------------------------------------------


def test_a_model_hidden_from_the_caller_is_changed_on_no_worker(fleet: Fleet) -> None:
    """The other workers' handlers are called with no caller (they see every model): a load, unload or trace
    change of a model hidden from the caller must be refused as an unknown model before it is broadcast."""
    unknown = call(fleet, NARROW, "RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="nosuch"))
    hidden = call(fleet, NARROW, "RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name=HIDDEN))
    assert hidden == (unknown[0], unknown[1].replace("nosuch", HIDDEN)) and unknown[0] == grpc.StatusCode.NOT_FOUND
    assert ready_everywhere(fleet, HIDDEN) == {False}
    refused = call(fleet, READER, "RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name=HIDDEN))
    assert refused[0] == grpc.StatusCode.PERMISSION_DENIED
    assert rest(fleet, "POST", f"/v2/repository/models/{HIDDEN}/load", b"{}", READER)[0] == 403
    assert ready_everywhere(fleet, HIDDEN) == {False}

    assert call(fleet, ADMIN, "RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name=HIDDEN)) == (
        pb.RepositoryModelLoadResponse()
    )
    try:
        value = pb.TraceSettingRequest.SettingValue
        change = pb.TraceSettingRequest(model_name=HIDDEN, settings={"trace_rate": value(value=["9"])})
        assert call(fleet, NARROW, "TraceSetting", change)[0] == grpc.StatusCode.NOT_FOUND
        rates = everywhere(
            fleet,
            lambda stub: tuple(
                stub.TraceSetting(pb.TraceSettingRequest(model_name=HIDDEN), metadata=bearer(ADMIN), timeout=10)
                .settings["trace_rate"]
                .value
            ),
        )
        assert ("9",) not in rates
        unload = call(fleet, NARROW, "RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=HIDDEN))
        assert unload[0] == grpc.StatusCode.NOT_FOUND
        assert ready_everywhere(fleet, HIDDEN) == {True}
        # gathered statistics: the other workers' hidden models stay hidden
        stats = call(fleet, NARROW, "ModelStatistics", pb.ModelStatisticsRequest())
        assert {s.name for s in stats.model_stats} == {"tiny", "gated"}
        assert call(fleet, NARROW, "ModelStatistics", pb.ModelStatisticsRequest(name=HIDDEN))[0] == (
            grpc.StatusCode.NOT_FOUND
        )
    finally:
        call(fleet, ADMIN, "RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=HIDDEN))
    assert ready_everywhere(fleet, HIDDEN) == {False}


# ---- a worker started again: what callers see while it loads --------------------------------------------------


def requests_by_worker(fleet: Fleet) -> dict[str, float]:
    return {
        labels[0][1]: value
        for (name, labels), value in fleet.metrics().items()
        if name == "ferry_worker_requests_total"
    }


def test_metrics_gathered_while_a_worker_restarts_keep_each_workers_label(fleet: Fleet, repo: Path) -> None:
    for _ in range(FRESH):
        with fresh(fleet.grpc) as channel:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(tiny_request(), metadata=bearer(ADMIN), timeout=10)
    before = requests_by_worker(fleet)
    assert sum(before.values()) >= FRESH and set(before) == {"0", "1"}
    with restarting(fleet, repo):
        for _ in range(6):  # worker 1's count under worker 1's label; worker 0's (if it answers) is new
            during = requests_by_worker(fleet)
            assert during["1"] == before["1"] and during.get("0", 0) == 0
            assert up(fleet) == [0, 1]


def test_http_calls_reach_only_workers_that_have_every_model_and_change(fleet: Fleet, repo: Path) -> None:
    """A worker started again takes REST calls only once it loaded its models and got the changes made meanwhile,
    as it does gRPC calls: the fleet stays ready, serves ``gated`` and takes changes on every connection."""
    infer = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 256], "datatype": "FP32", "data": [1.0] * 256}]}
    ).encode()
    with restarting(fleet, repo):
        answers = [rest(fleet, "GET", "/v2/health/ready")[0] for _ in range(FRESH)]
        answers += [rest(fleet, "POST", "/v2/models/gated/infer", infer)[0] for _ in range(FRESH)]
        loads = [rest(fleet, "POST", "/v2/repository/models/tiny/load", b"{}") for _ in range(6)]
        assert set(answers) == {200} and loads == [(200, b"{}")] * 6, (answers, loads)
    assert ready_everywhere(fleet, "tiny") == {True}


def test_concurrent_loads_and_unloads_through_both_workers_leave_them_alike(fleet: Fleet, example_repo: Path) -> None:
    """Loads (from the repository and uploaded) and unloads of two models, from 8 callers on fresh connections
    (so through both workers at once): every worker ends in the same state, and that state is served."""
    changes: list[tuple[str, Any]] = []
    for i in range(24):
        if i % 3 == 2:
            changes.append(("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=(HIDDEN, "up")[i % 2])))
        else:
            load = pb.RepositoryModelLoadRequest(model_name=HIDDEN) if i % 2 == 0 else upload("up", example_repo)
            changes.append(("RepositoryModelLoad", load))
    try:
        with ThreadPoolExecutor(8) as callers:
            answers = list(callers.map(lambda change: call(fleet, ADMIN, *change), changes))
        for answer in answers:  # done, or an unload of a model another caller's unload had just taken
            assert not isinstance(answer, tuple) or answer[0] == grpc.StatusCode.NOT_FOUND, answer
        for model in (HIDDEN, "up"):
            assert len(ready_everywhere(fleet, model)) == 1, model
    finally:
        for model in (HIDDEN, "up"):
            call(fleet, ADMIN, "RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=model))


# ---- resource bounds ------------------------------------------------------------------------------------------


def upload(name: str, example_repo: Path) -> pb.RepositoryModelLoadRequest:
    """A load of ``name`` from uploaded files (tiny's model): a model with no directory in the repository."""
    config = {
        "name": name,
        "platform": "onnxruntime_onnx",
        "max_batch_size": 8,
        "input": [{"name": "input", "data_type": "TYPE_FP32", "dims": [16]}],
        "output": [{"name": "output", "data_type": "TYPE_FP32", "dims": [4]}],
    }
    request = pb.RepositoryModelLoadRequest(model_name=name)
    request.parameters["config"].string_param = json.dumps(config)
    request.parameters["file:1/model.onnx"].bytes_param = (example_repo / "tiny" / "1" / "model.onnx").read_bytes()
    return request


def test_the_supervisor_forgets_unloads_a_new_worker_would_not_replay(fleet: Fleet, example_repo: Path) -> None:
    """The supervisor remembers the latest change per model to replay it on a worker started again. An unload of
    a model a new worker does not load at start (an upload) has nothing to replay: kept, a client uploading and
    unloading new names would grow that memory (and every restart's replay) without a bound."""
    names = [f"cycle{i}" for i in range(5)]
    value = pb.TraceSettingRequest.SettingValue
    for name in names:
        assert call(fleet, ADMIN, "RepositoryModelLoad", upload(name, example_repo)) == pb.RepositoryModelLoadResponse()
        trace = pb.TraceSettingRequest(model_name=name, settings={"trace_rate": value(value=["5"])})
        assert call(fleet, ADMIN, "TraceSetting", trace).settings["trace_rate"].value == ["5"]
        unloaded = call(fleet, ADMIN, "RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=name))
        assert unloaded == pb.RepositoryModelUnloadResponse()
    kept = call(fleet, ADMIN, "RepositoryModelLoad", upload("kept", example_repo))
    assert kept == pb.RepositoryModelLoadResponse()
    try:
        kill(fleet, 1)
        assert ready_everywhere(fleet, "kept") == {True}  # the upload is replayed, files and all
        assert ready_everywhere(fleet, names[0]) == {False}
        replayed = [line for line in Path(fleet.log.name).read_text().splitlines() if "replaying" in line]
        assert not [line for line in replayed if any(repr(name) in line for name in names)], replayed
    finally:
        call(fleet, ADMIN, "RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name="kept"))


def test_metrics_bigger_than_a_message_are_gathered_without_ending_a_worker(example_repo: Path, tmp_path: Path) -> None:
    """The link's frame bound was 2 x --max-message-bytes + 1 MiB; a worker's /metrics text grows with its models
    (some 10 KB each), and the worker whose text was over the bound lost its link at the scrape, so it stopped
    and was started again, on every scrape."""
    models = 120  # some 1.1 MB of /metrics per worker
    for i in range(models):
        shutil.copytree(example_repo / "tiny", tmp_path / f"m{i:03d}")
        config = tmp_path / f"m{i:03d}" / "config.pbtxt"
        config.write_text(config.read_text().replace('name: "tiny"', f'name: "m{i:03d}"'))
    server = Fleet(tmp_path, "--max-message-bytes", "1024")
    try:
        pids = sorted(server.workers())
        for _ in range(2):  # the worker asked gathers the other's text (over the old bound: that link ended)
            metrics = server.metrics()
            assert {labels for name, labels in metrics if name == "ferry_worker_requests_total"} == {
                (("worker", "0"),),
                (("worker", "1"),),
            }
            assert sum(v for (name, _), v in metrics.items() if name == "ferry_model_ready") == models
        time.sleep(0.5)  # a worker that lost its link stops within this
        metrics = server.metrics()
        assert [metrics[("ferry_worker_restarts_total", (("worker", w),))] for w in "01"] == [0, 0]
        assert sorted(server.workers()) == pids
    finally:
        assert server.stop() == 0


# ---- signals while workers start ------------------------------------------------------------------------------


def signal_while_workers_start(repo: Path, sig: signal.Signals) -> subprocess.Popen[str]:
    """``ferry serve --workers 2`` sent ``sig`` once both workers exist but are still starting Python (their own
    handlers are not installed for a second or so; the supervisor's are)."""
    command = [sys.executable, "-m", "ferry.server", "serve", "--model-repository", str(repo), "--workers", "2"]
    command += ["--grpc-port", "0", "--http-port", "0", "--drain-delay-s", "0", "--model-control-mode", "explicit"]
    command += ["--load-model", "tiny", "--auth-config", str(repo.parent / "auth.json")]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    wait_for("two workers", lambda: len(children.read_text().split()) == 2, timeout_s=30)
    time.sleep(0.2)  # the supervisor has them as its workers (not a signal at the fork: see the next test)
    proc.send_signal(sig)
    return proc


def test_sighup_while_workers_start_reaches_them_once_they_can_take_it(repo: Path) -> None:
    """SIGHUP (certificates or auth rules changed) passed to a worker still starting Python ended it, and while
    the fleet starts that stops the fleet."""
    proc = signal_while_workers_start(repo, signal.SIGHUP)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ferry ready:"), proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert err.count("auth config reloaded (SIGHUP)") == 2  # each worker got it once
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_sigterm_while_workers_start_stops_the_fleet_cleanly(repo: Path) -> None:
    proc = signal_while_workers_start(repo, signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=30)
        assert (proc.returncode, out) == (0, ""), err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_a_sigterm_while_a_worker_is_spawned_reaches_it(repo: Path) -> None:
    """The supervisor's stop signalled the workers it had: one whose process was created but not yet recorded
    (the spawn awaits the new process's pipes) never got the SIGTERM, and the supervisor waited for it forever.
    Driven in this process to land the signal exactly there: the stop is queued right behind the spawn."""
    argv = ["serve", "--model-repository", str(repo), "--http-port", "-1", "--drain-delay-s", "0"]
    config = ServerConfig.build(model_repository=repo, grpc_port=0, http_port=None, workers=2)

    async def main() -> None:
        supervisor = Supervisor(config, argv)
        supervisor._reserve_ports()
        slot = supervisor.slots[0]
        keeper = asyncio.create_task(supervisor._keep(slot))
        asyncio.get_running_loop().call_soon(supervisor._stop, signal.SIGTERM)
        try:
            await asyncio.wait_for(keeper, 30)
        finally:
            if slot.process is not None and slot.process.returncode is None:
                slot.process.kill()
                await slot.process.wait()
            for sock in supervisor._reserved:
                sock.close()
        assert slot.process is not None and slot.process.returncode in (0, -signal.SIGTERM)

    asyncio.run(main())


def test_a_worker_started_again_gets_the_trace_settings_of_a_model_reloaded_since(fleet: Fleet) -> None:
    """Trace settings outlive a reload of the model. The replay log keeps the latest change per key in the order
    made, so a reload after a trace change put the trace change first: replayed onto a worker that has not loaded
    the model yet, it failed, and that worker traced the model at the default rate."""
    value = pb.TraceSettingRequest.SettingValue
    load = pb.RepositoryModelLoadRequest(model_name=HIDDEN)  # admin: not loaded at start
    assert call(fleet, ADMIN, "RepositoryModelLoad", load) == pb.RepositoryModelLoadResponse()
    try:
        change = pb.TraceSettingRequest(model_name=HIDDEN, settings={"trace_rate": value(value=["7"])})
        assert list(call(fleet, ADMIN, "TraceSetting", change).settings["trace_rate"].value) == ["7"]
        assert call(fleet, ADMIN, "RepositoryModelLoad", load) == pb.RepositoryModelLoadResponse()  # a reload
        kill(fleet, 0)

        def rate(stub: pb_grpc.GRPCInferenceServiceStub) -> object:
            reply = stub.TraceSetting(pb.TraceSettingRequest(model_name=HIDDEN), metadata=bearer(ADMIN), timeout=10)
            return tuple(reply.settings["trace_rate"].value)

        assert everywhere(fleet, rate) == {("7",)}
    finally:
        call(fleet, ADMIN, "RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=HIDDEN))


def test_a_second_fleet_on_the_same_ports_is_refused(fleet: Fleet, repo: Path) -> None:
    """The supervisor binds with SO_REUSEPORT, which another socket of the same user may share: a second fleet on
    the running fleet's ports started and took part of its connections, where a lone server is refused."""
    command = [sys.executable, "-m", "ferry.server", "serve", "--model-repository", str(repo), "--workers", "2"]
    command += ["--grpc-port", fleet.grpc.split(":")[1], "--http-port", str(fleet.http)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "ferry ready" not in done.stdout
    assert "cannot bind the workers' ports" in done.stderr and "Address already in use" in done.stderr, done.stderr
    command[command.index("--grpc-port") + 1] = "0"  # the HTTP port alone is checked too
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "Address already in use" in done.stderr, done.stderr


def test_statistics_answer_without_a_worker_that_stopped_answering(fleet: Fleet) -> None:
    """A worker whose process is stopped (SIGSTOP; as one whose event loop stalls) held up every ModelStatistics
    and /metrics gathered on the other workers until the caller's deadline: it is now left out after
    GATHER_TIMEOUT_S. (Calls whose connection lands on the stopped worker itself wait, as on any stopped server.)"""
    frozen = workers_by_index(fleet)[1]
    os.kill(frozen, signal.SIGSTOP)
    try:
        answered = 0
        for _ in range(20):
            with fresh(fleet.grpc) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                try:
                    stub.ServerReady(pb.ServerReadyRequest(), timeout=1)
                except grpc.RpcError:
                    continue  # this connection is on the stopped worker
                request = pb.ModelStatisticsRequest(name="tiny")
                reply = stub.ModelStatistics(request, metadata=bearer(ADMIN), timeout=GATHER_TIMEOUT_S + 5)
                assert [s.name for s in reply.model_stats] == ["tiny"]
                answered += 1
                if answered == 2:
                    break
        assert answered == 2
    finally:
        os.kill(frozen, signal.SIGCONT)


def test_a_worker_that_stops_answering_during_a_change_is_restarted_and_the_change_lands(fleet: Fleet) -> None:
    """A stopped worker (SIGSTOP: a wedged loop) held the change lock forever, and with it every later load and
    every restarted worker's join: the supervisor pings a worker applying a change and kills one that does not
    answer; the load returns, and the worker started in its place has the change replayed."""
    old = workers_by_index(fleet)
    os.kill(old[1], signal.SIGSTOP)
    try:
        for _ in range(40):  # a connection on the worker that still answers
            channel = grpc.insecure_channel(fleet.grpc, options=[("grpc.use_local_subchannel_pool", 1)])
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            try:
                stub.ServerReady(pb.ServerReadyRequest(), timeout=1)
                break
            except grpc.RpcError:
                channel.close()
        else:
            pytest.fail("no connection reached the running worker")
        with channel:
            stub.RepositoryModelLoad(
                pb.RepositoryModelLoadRequest(model_name=HIDDEN), metadata=bearer(ADMIN), timeout=60
            )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(old[1], signal.SIGCONT)
    wait_for("worker 1 started again", lambda: workers_by_index(fleet).get(1, old[1]) != old[1])
    wait_for("both workers up", lambda: up(fleet) == [1, 1])
    assert ready_everywhere(fleet, HIDDEN) == {True}
    call(fleet, ADMIN, "RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=HIDDEN))
