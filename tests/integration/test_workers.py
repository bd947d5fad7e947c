"""``ferry serve --workers 2``: one supervisor, two worker processes on the same ports, through real processes.

Each fresh connection lands on one worker (the kernel spreads them: SO_REUSEPORT), so a check made over many fresh
connections reaches both workers: a load or unload through one connection is seen on every one; ``/metrics`` and
``ModelStatistics`` count every request sent, whichever worker answered; an outcome reaches the worker that made
the prediction; a worker killed with SIGKILL is started again, reported, and gets the changes made before it died.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ferry.client._proto import ferry_pb2 as fpb
from ferry.client._proto import ferry_pb2_grpc as fpb_grpc
from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client._proto import grpc_service_pb2_grpc as pb_grpc
from ferry.server.workers.merge import LEAST_GAUGES, MOST_GAUGES, SUMMED_GAUGES
from tests.integration.test_metrics import WORKERS_ONLY, documented_metrics
from tests.integration.test_rpcs import outputs_of, request_for

FRESH = 24
"""Fresh connections a check is made over: all on one of two workers has odds 2^-23."""

DIGITS_CONFIG = """name: "digits"
max_batch_size: 64
version_policy: { specific { versions: [ 1 ] } }
dynamic_batching { }
parameters { key: "outcome_output" value: { string_value: "label" } }
"""


class Fleet:
    """``ferry serve --workers 2`` in a subprocess; its ready line's ports."""

    def __init__(self, repository: Path, *args: str) -> None:
        command = [sys.executable, "-m", "ferry.server", "serve", "--model-repository", str(repository)]
        command += ["--grpc-port", "0", "--http-port", "0", "--workers", "2", "--drain-delay-s", "0", *args]
        self.log = tempfile.NamedTemporaryFile(prefix="ferry-workers-", suffix=".log")  # noqa: SIM115
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log, text=True)
        assert self.proc.stdout is not None
        self.line = self.proc.stdout.readline()
        assert "ferry ready:" in self.line, Path(self.log.name).read_text()
        self.grpc = "127.0.0.1:" + self.line.split("grpc=127.0.0.1:")[1].split()[0]
        self.http = int(self.line.split("http=127.0.0.1:")[1].split()[0])

    def workers(self) -> list[int]:
        """The worker processes' pids (the supervisor's children)."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(pid) for pid in path.read_text().split()]

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        code = self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()
        return code


@contextlib.contextmanager
def fresh(address: str) -> Iterator[grpc.Channel]:
    """A channel with a connection of its own (gRPC shares subchannels between channels unless told not to)."""
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        yield channel


def each_fresh(address: str, call: object) -> list[object]:
    """``call(stub)`` on :data:`FRESH` fresh connections; the results."""
    out = []
    for _ in range(FRESH):
        with fresh(address) as channel:
            out.append(call(pb_grpc.GRPCInferenceServiceStub(channel)))  # type: ignore[operator]
    return out


def tiny_request() -> pb.ModelInferRequest:
    return request_for("tiny", {"input": np.ones((1, 16), np.float32)})


@pytest.fixture(scope="module")
def repo(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("workers-repo")
    for name in ("tiny", "mlp", "digits"):
        shutil.copytree(example_repo / name, root / name)
    (root / "digits" / "config.pbtxt").write_text(DIGITS_CONFIG)
    return root


@pytest.fixture(scope="module")
def fleet(repo: Path) -> Iterator[Fleet]:
    server = Fleet(repo, "--model-control-mode", "explicit", "--load-model", "tiny", "--load-model", "digits")
    try:
        yield server
    finally:
        assert server.stop() == 0


def test_the_supervisor_runs_two_workers_on_one_port(fleet: Fleet) -> None:
    assert fleet.line.rstrip().endswith("workers=2")
    assert len(fleet.workers()) == 2
    metrics = fleet.metrics()
    assert metrics[("ferry_workers", ())] == 2
    assert [metrics[("ferry_worker_up", (("worker", w),))] for w in "01"] == [1, 1]


def test_every_family_served_is_documented_with_its_labels(fleet: Fleet) -> None:
    """As test_metrics checks one server's; with several workers, a gauge that does not add up carries ``worker``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{fleet.http}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    documented = documented_metrics()
    served = set()
    for family in text_string_to_metric_families(text):
        kind, labels = documented[family.name]
        assert family.type == kind, family.name
        merged = SUMMED_GAUGES | LEAST_GAUGES | MOST_GAUGES | WORKERS_ONLY
        per_worker = kind == "gauge" and family.name not in merged
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels | ({"worker"} if per_worker else set()), sample
        served.add(family.name)
    assert served >= WORKERS_ONLY


def test_metrics_and_statistics_count_every_request_whichever_worker_answered(fleet: Fleet) -> None:
    def successes() -> float:
        return fleet.metrics()[("ferry_inference_request_success_total", (("model", "tiny"), ("version", "1")))]

    def per_worker() -> list[float]:
        m = fleet.metrics()
        return [m[("ferry_worker_requests_total", (("worker", w),))] for w in "01"]

    def statistics() -> int:
        with fresh(fleet.grpc) as channel:
            stats = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(pb.ModelStatisticsRequest(name="tiny"))
        return int(stats.model_stats[0].inference_stats.success.count)

    before, before_workers, before_stats = successes(), per_worker(), statistics()
    sent = 0
    for _ in range(FRESH):
        with fresh(fleet.grpc) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(5):
                assert outputs_of(stub.ModelInfer(tiny_request(), timeout=10))["output"].shape == (1, 4)
                sent += 1
    assert successes() - before == sent
    assert statistics() - before_stats == sent
    spread = [after - b for after, b in zip(per_worker(), before_workers, strict=True)]
    assert all(share > 0 for share in spread), f"requests by worker: {spread}"  # both answered some
    assert sum(spread) == sent


def test_a_load_and_an_unload_through_one_worker_reach_every_worker(fleet: Fleet) -> None:
    def ready(stub: pb_grpc.GRPCInferenceServiceStub) -> bool:
        return bool(stub.ModelReady(pb.ModelReadyRequest(name="mlp"), timeout=10).ready)

    assert not any(each_fresh(fleet.grpc, ready))
    with fresh(fleet.grpc) as channel:
        pb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(model_name="mlp"), timeout=60
        )
    assert all(each_fresh(fleet.grpc, ready))
    metrics = fleet.metrics()
    assert metrics[("ferry_model_ready", (("model", "mlp"), ("version", "1")))] == 1  # the least of the workers'
    with fresh(fleet.grpc) as channel:
        pb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload(
            pb.RepositoryModelUnloadRequest(model_name="mlp"), timeout=60
        )
    assert not any(each_fresh(fleet.grpc, ready))


def test_a_refused_load_fails_once_with_its_reason(fleet: Fleet) -> None:
    with fresh(fleet.grpc) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(model_name="no-such-model"), timeout=60
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "worker 0:" not in (err.value.details() or "")  # all failed alike: one message, as one server gives


def test_trace_settings_changed_through_one_worker_are_every_workers(fleet: Fleet) -> None:
    value = pb.TraceSettingRequest.SettingValue
    with fresh(fleet.grpc) as channel:
        pb_grpc.GRPCInferenceServiceStub(channel).TraceSetting(
            pb.TraceSettingRequest(model_name="tiny", settings={"trace_rate": value(value=["7"])}), timeout=30
        )

    def rate(stub: pb_grpc.GRPCInferenceServiceStub) -> list[str]:
        reply = stub.TraceSetting(pb.TraceSettingRequest(model_name="tiny"), timeout=10)
        return list(reply.settings["trace_rate"].value)

    assert each_fresh(fleet.grpc, rate) == [["7"]] * FRESH


def test_an_outcome_reaches_the_worker_that_made_the_prediction(fleet: Fleet, example_repo: Path) -> None:
    x = np.load(example_repo / "digits" / "heldout.npz")["X"][:FRESH].astype(np.float32)
    labels = {}
    for i in range(FRESH):  # each prediction on a fresh connection: on one worker or the other
        with fresh(fleet.grpc) as channel:
            reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                request_for("digits", {"input": x[i : i + 1]}, id=f"w-{i}"), timeout=10
            )
            labels[i] = int(outputs_of(reply)["label"][0])
    outcomes = [fpb.Outcome(request_id=f"w-{i}", model_name="digits", label=labels[i]) for i in range(FRESH)]
    outcomes.append(fpb.Outcome(request_id="never-sent", model_name="digits", label=1))
    with fresh(fleet.grpc) as channel:
        reply = fpb_grpc.OutcomeServiceStub(channel).ReportOutcomes(fpb.ReportOutcomesRequest(outcomes=outcomes))
    assert (reply.matched, reply.unmatched, list(reply.unmatched_index)) == (FRESH, 1, [FRESH])


def test_a_killed_worker_is_started_again_with_the_changes_made_before(repo: Path) -> None:
    server = Fleet(repo, "--model-control-mode", "explicit", "--load-model", "tiny")
    try:
        with fresh(server.grpc) as channel:
            pb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(
                pb.RepositoryModelLoadRequest(model_name="mlp"), timeout=60
            )
        victim = server.workers()[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                metrics = server.metrics()
            except OSError:  # a connection the killed worker's listener had queued, reset as it closes
                time.sleep(0.2)
                continue
            restarts = sum(metrics.get(("ferry_worker_restarts_total", (("worker", w),)), 0) for w in "01")
            up = [metrics.get(("ferry_worker_up", (("worker", w),)), 0) for w in "01"]
            if restarts == 1 and up == [1, 1]:
                break
            time.sleep(0.2)
        else:
            pytest.fail("no restart seen")
        assert victim not in server.workers() and len(server.workers()) == 2

        def ready(stub: pb_grpc.GRPCInferenceServiceStub) -> bool:
            return bool(stub.ModelReady(pb.ModelReadyRequest(name="mlp"), timeout=10).ready)

        assert all(each_fresh(server.grpc, ready))  # the restarted worker got the load replayed
    finally:
        assert server.stop() == 0


def test_a_worker_that_cannot_start_stops_the_start(repo: Path, tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate")
    command = [sys.executable, "-m", "ferry.server", "serve", "--model-repository", str(repo), "--workers", "2"]
    command += ["--grpc-port", "0", "--http-port", "-1", "--tls-cert", str(tmp_path / "cert.pem")]
    command += ["--tls-key", str(tmp_path / "cert.pem")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "ferry ready" not in done.stdout
    assert "while starting" in done.stderr


def test_sigterm_drains_every_worker_without_failing_a_call_started_before_it(repo: Path) -> None:
    server = Fleet(repo, "--drain-delay-s", "1", "--shutdown-grace-s", "10")
    calls: list[tuple[float, str]] = []
    stop = threading.Event()

    def caller() -> None:
        with fresh(server.grpc) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while not stop.is_set():
                started = time.monotonic()
                try:
                    stub.ModelInfer(tiny_request(), timeout=10)
                    calls.append((started, "OK"))
                except grpc.RpcError as err:
                    calls.append((started, str(err.code())))
                    time.sleep(0.01)

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        server.stop()
    before = [outcome for started, outcome in calls if started < signalled]
    assert len(before) > 50 and set(before) == {"OK"}
